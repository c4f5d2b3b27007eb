#!/usr/bin/env bash
# Training throughput, PyTorch DDP (torchrun + gloo) beside ringtrain, in one invocation: same data
# (Fashion-MNIST, normalised), batch 64 per worker, SGD momentum 0.9, 1 compute thread per worker,
# 1 and 2 workers, the reference CNN (compute-bound) and the wide MLP (communication-bound).
#   scripts/bench_train.sh [STEPS]        (default 150 steps per run)
# Columns: samples/s; ringtrain/PyTorch; scaling efficiency = rate at N / (N × rate at 1); the
# compute-only ceiling = N × the 1-worker rate (one worker has no communication); peak RSS per worker.
# `ring-links`: ringtrain at 2 workers without shared buffers (RINGTRAIN_SHARED_BUFFERS=0).
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-150}"
py="$(scripts/bench_setup.sh)"
torchrun="$(dirname "$py")/torchrun"
cargo build --release --quiet
data=/usr/share/datasets/fashion-mnist
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1

field() { "$py" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

declare -A rate rss
for model in cnn wide_mlp; do
    cfg=configs/fashion_mnist_$( [ $model = cnn ] && echo cnn || echo wide_mlp ).yaml
    lr=$( [ $model = cnn ] && echo 0.05 || echo 0.01 )
    for n in 1 2; do
        out=$("$torchrun" --nproc-per-node "$n" --master-port $((29800 + n)) scripts/reference/ddp_train.py --model "$model" \
              --max-steps "$steps" --lr "$lr" --data "$data" --normalize 2>/dev/null | tail -n 1)
        rate[pytorch,$model,$n]=$(field "$out" samples_per_s)
        rss[pytorch,$model,$n]=$(field "$out" peak_rss_mib)
        target/release/ringrun --nproc-per-node "$n" --threads-per-worker 1 ringtrain --config "$cfg" --run-dir "$tmp/$model-$n" \
            --set train.max_steps="$steps" --set train.eval=false --set checkpoint.enabled=false >/dev/null 2>&1
        line=$(grep '"kind":"epoch"' "$tmp/$model-$n/metrics.jsonl" | tail -n 1)
        rate[ringtrain,$model,$n]=$(field "$line" samples_per_s)
        rss[ringtrain,$model,$n]=$("$py" -c "import json,glob; print(max(json.load(open(f))['peak_rss_mib'] for f in glob.glob('$tmp/$model-$n/ranks/*.json')))")
    done
    # The same at 2 workers with the buckets in private memory, so the ring streams them through
    # its shared-memory links (what the shared buffers replace); 1 worker has no communication.
    RINGTRAIN_SHARED_BUFFERS=0 target/release/ringrun --nproc-per-node 2 --threads-per-worker 1 ringtrain --config "$cfg" \
        --run-dir "$tmp/$model-links" --set train.max_steps="$steps" --set train.eval=false --set checkpoint.enabled=false >/dev/null 2>&1
    line=$(grep '"kind":"epoch"' "$tmp/$model-links/metrics.jsonl" | tail -n 1)
    rate[ring-links,$model,2]=$(field "$line" samples_per_s)
    rate[ring-links,$model,1]=${rate[ringtrain,$model,1]}
    rss[ring-links,$model,2]=$("$py" -c "import json,glob; print(max(json.load(open(f))['peak_rss_mib'] for f in glob.glob('$tmp/$model-links/ranks/*.json')))")
done

echo "# $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $steps steps per run; batch 64/worker; 1 thread/worker"
printf "%-9s %-10s %3s %12s %10s %11s %14s %14s\n" model framework N "samples/s" "vs PyTorch" "scaling eff" "compute ceil." "peak RSS MiB"
for model in cnn wide_mlp; do
    for fw in pytorch ringtrain ring-links; do
        for n in 1 2; do
            [ "$fw" = ring-links ] && [ "$n" = 1 ] && continue
            r=${rate[$fw,$model,$n]}; one=${rate[$fw,$model,1]}; pt=${rate[pytorch,$model,$n]}
            "$py" - "$model" "$fw" "$n" "$r" "$one" "$pt" "${rss[$fw,$model,$n]}" <<'PY'
import sys
model, fw, n, r, one, pt, rss = sys.argv[1], sys.argv[2], int(sys.argv[3]), *map(float, sys.argv[4:])
print(f"{model:<9} {fw:<10} {n:>3} {r:>12.0f} {r/pt:>10.2f} {r/(n*one):>11.0%} {n*one:>14.0f} {rss:>14.0f}")
PY
        done
    done
done
