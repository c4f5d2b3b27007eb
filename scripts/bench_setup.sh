#!/usr/bin/env bash
# Python torch 2.11 (CPU use; the PyPI wheel) in a cached venv, for the PyTorch side of the
# benchmarks and the tests that compare with PyTorch (torchvision 0.26 pairs with torch 2.11; TensorBoard's reader; pycocotools for COCO's mAP): $RINGTRAIN_CACHE/pytorch-venv. Idempotent; prints
# the venv's python.
set -euo pipefail
cache="${RINGTRAIN_CACHE:-$HOME/.cache/ringtrain}"
venv="$cache/pytorch-venv"
if ! "$venv/bin/python" -c "import torch, torchvision, numpy, safetensors, tensorboard, pycocotools; assert torch.__version__.startswith('2.11.0') and torchvision.__version__.startswith('0.26.')" 2>/dev/null; then
    echo "bench_setup: installing torch 2.11.0 into $venv (about 2.7 GB with its nvidia wheels, once)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --find-links "$cache/wheels" torch==2.11.0 torchvision==0.26.0 numpy safetensors tensorboard pycocotools >&2
fi
echo "$venv/bin/python"
