#!/usr/bin/env bash
# Ring all-reduce busbw between two emulated nodes (network namespaces + veth, scripts/netns_nodes.sh)
# beside the same-node figure, in one invocation; then 2 nodes × 2 workers over rate-limited links
# (RT_LINK_RATE, default 500mbit), flat ring against the hierarchical all-reduce. Needs root.
#   scripts/bench_multinode.sh [SIZES]
set -euo pipefail
cd "$(dirname "$0")/.."
sizes="${1:-1M,25M}"
cargo build --release --quiet
bin="$PWD/target/release"
export RT_NETNS_ID="${RT_NETNS_ID:-41}"
echo "## same node: ringrun --nproc-per-node 2 (shared-memory links)"
"$bin/ringrun" --nproc-per-node 2 ringbench allreduce --backend ring --local-transport shm --sizes "$sizes" 2>/dev/null | sed 's/^\[rank0\] //'
echo "## same node: ringrun --nproc-per-node 2 (Unix-socket links)"
"$bin/ringrun" --nproc-per-node 2 ringbench allreduce --backend ring --local-transport unix --sizes "$sizes" 2>/dev/null | sed 's/^\[rank0\] //'
echo "## same node: ringrun --nproc-per-node 2 (TCP loopback links)"
"$bin/ringrun" --nproc-per-node 2 ringbench allreduce --backend ring --local-transport tcp --sizes "$sizes" 2>/dev/null | sed 's/^\[rank0\] //'
echo "## two emulated nodes × 1 worker: TCP over veth + bridge"
scripts/netns_nodes.sh run 2 bash -c "'$bin/ringrun' --nnodes 2 --node-rank \$NODE_RANK --nproc-per-node 1 \
    --master-addr \$MASTER_ADDR --master-port 29700 ringbench allreduce --backend ring --sizes $sizes 2>/dev/null | sed 's/^\[rank0\] //'"
rate="${RT_LINK_RATE:-500mbit}"
for mode in flat hierarchical; do
    flag=$( [ $mode = hierarchical ] && echo --hierarchical || true )
    echo "## two emulated nodes × 2 workers, each node sending at most $rate: $mode"
    RT_LINK_RATE="$rate" scripts/netns_nodes.sh run 2 bash -c "'$bin/ringrun' --nnodes 2 --node-rank \$NODE_RANK --nproc-per-node 2 \
        --master-addr \$MASTER_ADDR --master-port 29710 ringbench allreduce --backend ring $flag --sizes $sizes 2>/dev/null | sed 's/^\[rank0\] //'"
done
