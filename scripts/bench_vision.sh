#!/usr/bin/env bash
# Vision benchmarks, ringtrain beside PyTorch in one invocation:
#  1. The image loader alone (decode + transforms, no model): `ringbench loader` against torchvision's
#     ImageFolder + DataLoader(num_workers=N) on the same generated folder of JPEGs (2,000 images of
#     160×120, 10 classes), the same pipeline (Resize 128, RandomCrop 112, RandomHorizontalFlip,
#     ToTensor, Normalize), batch 64, 1 and 2 workers.
#  2. ResNet-18 (small-image stem, BatchNorm) training on Fashion-MNIST, batch 32 per worker, SGD
#     momentum, no augmentation, 1 compute thread per worker: ringtrain against PyTorch DDP
#     (torchrun + gloo, torchvision's resnet18 with the same stem) at 1 and 2 workers.
#   scripts/bench_vision.sh [STEPS]        (default 30 training steps per run)
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-30}"
py="$(scripts/bench_setup.sh)"
torchrun="$(dirname "$py")/torchrun"
source scripts/bench_preamble.sh

# A folder of JPEGs: smooth colour fields with a class-dependent tint, quality 90.
"$py" - "$tmp/images" <<'PY'
import os, sys
import numpy as np
from PIL import Image
root = sys.argv[1]
rng = np.random.default_rng(0)
for split, n in (("train", 200), ("val", 10)):
    for k in range(10):
        d = f"{root}/{split}/class{k}"
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            base = rng.integers(0, 255, size=(12, 16, 3)).astype(np.uint8)
            img = Image.fromarray(base).resize((160, 120), Image.BILINEAR)
            arr = np.asarray(img).astype(np.int16)
            arr[..., k % 3] += 40
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(f"{d}/{i:04d}.jpg", quality=90)
PY
cat > "$tmp/loader.yaml" <<YAML
model: {name: mlp, hidden: [16]}
data:
  format: image_folder
  dir: $tmp/images
  transforms:
    train: [{resize: 128}, {random_crop: {size: 112}}, {random_horizontal_flip: 0.5}, {normalize: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}]
    test: [{resize: 128}, {center_crop: 112}, {normalize: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}]
train: {batch_size: 64}
optimizer: {name: sgd, lr: 0.1}
YAML
echo "# $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "## 1. loader alone: 2,000 JPEGs 160x120 -> Resize 128, RandomCrop 112, flip, Normalize; batch 64"
target/release/ringbench loader --config "$tmp/loader.yaml" --workers 1,2 2>/dev/null | tee "$tmp/loader.txt"
"$py" scripts/reference/loader_bench.py "$tmp/images" --workers 1,2 --batch-size 64 --resize 128 --crop 112 | tee -a "$tmp/loader.txt"
"$py" - "$tmp/loader.txt" <<'PY'
import re, sys
rate = {}
for line in open(sys.argv[1]):
    m = re.match(r"(\w+) loader workers=(\d+) .* images_per_s=(\d+)", line)
    if m:
        rate[m[1], int(m[2])] = float(m[3])
print(f"{'workers':>7} {'ringtrain img/s':>16} {'torchvision img/s':>18} {'ratio':>6}")
for w in (1, 2):
    r, t = rate.get(("ringtrain", w)), rate.get(("torchvision", w))
    print(f"{w:>7} {r:>16.0f} {t:>18.0f} {r / t:>6.2f}")
PY

echo "## 2. ResNet-18 (small stem) on Fashion-MNIST, batch 32/worker, $steps steps, 1 thread/worker"
cat > "$tmp/resnet.yaml" <<YAML
model: {name: resnet18, small_stem: true}
data:
  format: idx
  dir: /usr/share/datasets/fashion-mnist
  normalize: [0.2860, 0.3530]
train: {max_steps: $steps, batch_size: 32, seed: 0, log_every_steps: 10, eval: false}
optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
checkpoint: {enabled: false}
YAML
declare -A rate
for n in 1 2; do
    out=$("$torchrun" --nproc-per-node "$n" --master-port $((29850 + n)) scripts/reference/ddp_train.py --model resnet18 \
          --batch-size 32 --max-steps "$steps" --lr 0.05 --normalize 2>/dev/null | tail -n 1)
    rate[pytorch,$n]=$(field "$out" samples_per_s)
    target/release/ringrun --nproc-per-node "$n" --threads-per-worker 1 ringtrain --config "$tmp/resnet.yaml" \
        --run-dir "$tmp/resnet-$n" >/dev/null 2>&1
    rate[ringtrain,$n]=$(epoch_rate "$tmp/resnet-$n")
done
vs_pytorch_table
