#!/usr/bin/env bash
# SimCLR throughput, ringtrain beside PyTorch DDP in one invocation: the configs/simclr_fashion_mnist.yaml
# network (ResNet-18 encoder, small stem, width 16, 2-layer head), 2 workers × 64 images (2 views each),
# NT-Xent with negatives from both ranks through a differentiable all-gather, AdamW, 1 compute
# thread per worker, no evaluation. PyTorch: torchrun + gloo, torch.distributed.nn.functional.all_gather,
# plain BatchNorm (nn.SyncBatchNorm refuses CPU tensors); ringtrain with plain BatchNorm (the same
# work, buffers broadcast after each step as DDP's default does) and with SyncBatchNorm (what the
# config trains with; its statistics are already equal on every rank, nothing to broadcast).
#   scripts/bench_simclr.sh [STEPS]        (default 20 steps per run)
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-20}"
py="$(scripts/bench_setup.sh)"
torchrun="$(dirname "$py")/torchrun"
cargo build --release --quiet
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1
field() { "$py" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
echo "# $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "## SimCLR, ResNet-18 width 16 on Fashion-MNIST, 2 workers x 64 images, $steps steps, 1 thread/worker"
out=$("$torchrun" --nproc-per-node 2 --master-port 29871 scripts/reference/simclr_ddp.py --width 16 --batch-size 64 \
      --steps "$steps" 2>/dev/null | tail -n 1)
pytorch=$(field "$out" images_per_s)
declare -A rate
for sync in false true; do
    target/release/ringrun --nproc-per-node 2 --threads-per-worker 1 ringtrain --config configs/simclr_fashion_mnist.yaml \
        --run-dir "$tmp/sync-$sync" --set train.max_steps="$steps" --set train.eval=false --set train.eval_at_start=false \
        --set checkpoint.enabled=false --set model.sync_batchnorm=$sync --set train.plot=false \
        --set ddp.broadcast_buffers=$([ "$sync" = false ] && echo true || echo false) >/dev/null 2>&1
    line=$(grep '"kind":"epoch"' "$tmp/sync-$sync/metrics.jsonl" | tail -n 1)
    rate[$sync]=$(field "$line" samples_per_s)
done
printf "%-44s %9s %11s\n" run "images/s" "vs PyTorch"
row() { "$py" -c "import sys; print(f'{sys.argv[1]:<44} {float(sys.argv[2]):>9.1f} {float(sys.argv[2])/float(sys.argv[3]):>11.2f}')" "$@"; }
row "PyTorch DDP (gloo), BatchNorm per rank" "$pytorch" "$pytorch"
row "ringtrain, BatchNorm per rank" "${rate[false]}" "$pytorch"
row "ringtrain, SyncBatchNorm" "${rate[true]}" "$pytorch"
