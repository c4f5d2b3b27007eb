#!/usr/bin/env bash
# All-reduce busbw of every backend built in, one after the other in one invocation, so the
# figures are comparable (this machine is noisy: compare within one run). With NPROC ≥ 4 (even),
# also two emulated nodes on loopback: the flat ring and the hierarchical all-reduce.
#   scripts/bench_allreduce.sh [NPROC] [SIZES]
set -euo pipefail
cd "$(dirname "$0")/.."
np="${1:-2}"
sizes="${2:-4K,64K,1M,4M,25M,64M,256M}"
cargo build --release --quiet
bin=target/release
# Shared buffers first (what the DDP buckets are on one node), then the ring through each kind of
# link with ordinary buffers.
echo "## ring, shared buffers (as DDP's buckets), ringrun --nproc-per-node $np"
"$bin/ringrun" --nproc-per-node "$np" ringbench allreduce --backend ring --shared-buffers --sizes "$sizes" 2>/dev/null | sed 's/^\[rank0\] //'
for t in shm unix tcp; do
    echo "## ring ($t links), ringrun --nproc-per-node $np"
    "$bin/ringrun" --nproc-per-node "$np" ringbench allreduce --backend ring --local-transport "$t" --sizes "$sizes" 2>/dev/null | sed 's/^\[rank0\] //'
done
if command -v mpirun >/dev/null; then
    echo "## mpi (Open MPI), mpirun -np $np"
    # MALLOC_MMAP_THRESHOLD_: Open MPI otherwise reallocates large buffers on every call.
    mpirun --allow-run-as-root --oversubscribe -np "$np" -x OMP_NUM_THREADS=1 -x MALLOC_MMAP_THRESHOLD_=1073741824 \
        "$bin/ringbench" allreduce --backend mpi --sizes "$sizes" 2>/dev/null
fi
# Two nodes of NPROC/2 ranks on this one machine (two ringrun node launchers on loopback): TCP
# between the nodes, shared memory within; the flat ring beside the hierarchical all-reduce.
if [ "$np" -ge 4 ] && [ $((np % 2)) -eq 0 ]; then
    for flag in "" --hierarchical; do
        echo "## ring, 2 nodes × $((np / 2)) on loopback ${flag:-(flat)}"
        for k in 0 1; do
            "$bin/ringrun" --nnodes 2 --node-rank "$k" --nproc-per-node $((np / 2)) --master-addr 127.0.0.1 --master-port 29730 \
                ringbench allreduce --backend ring $flag --sizes "$sizes" 2>/dev/null | sed 's/^\[rank0\] //' &
        done
        wait
    done
fi
