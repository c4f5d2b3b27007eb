#!/usr/bin/env bash
# The detector's training throughput, ringtrain beside PyTorch DDP in one invocation: the same
# model (model: {name: yolo, width: 16}: strides 8/16/32, SPPF, FPN + PAN, decoupled heads), the
# same loss, AdamW, batch 32 per worker of 128 x 128 images, 1 compute thread per worker, 1 and 2
# workers. ringtrain composes its mosaics in its loader as it trains; PyTorch's batches are made
# before its clock starts (scripts/reference/yolo_ddp.py).
#   scripts/bench_detect.sh [STEPS]        (default 30 steps per run)
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-30}"
py="$(scripts/bench_setup.sh)"
torchrun="$(dirname "$py")/torchrun"
source scripts/bench_preamble.sh
cat > "$tmp/yolo.yaml" <<YAML
model: {name: yolo, width: 16}
data: {format: mosaic, dir: /usr/share/datasets/fashion-mnist, mosaic: {train_images: 20000, test_images: 100}}
train: {max_steps: $steps, batch_size: 32, seed: 0, log_every_steps: 10, eval: false}
optimizer: {name: adamw, lr: 0.003, weight_decay: 0.0005}
checkpoint: {enabled: false}
YAML
echo "# $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "## yolo (width 16) on 128x128 mosaics, batch 32/worker, $steps steps, 1 thread/worker"
declare -A rate
for n in 1 2; do
    out=$("$torchrun" --nproc-per-node "$n" --master-port $((29870 + n)) scripts/reference/yolo_ddp.py \
          --steps "$steps" --batch-size 32 --width 16 2>/dev/null | tail -n 1)
    rate[pytorch,$n]=$(field "$out" samples_per_s)
    target/release/ringrun --nproc-per-node "$n" --threads-per-worker 1 ringtrain --config "$tmp/yolo.yaml" \
        --run-dir "$tmp/yolo-$n" >/dev/null 2>&1
    rate[ringtrain,$n]=$(epoch_rate "$tmp/yolo-$n")
done
vs_pytorch_table
