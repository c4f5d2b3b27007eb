"""torchvision's ResNet as the reference for ringtrain's (tests/resnet.rs).

  python resnet_reference.py check WEIGHTS OUT --depth 18 --classes 10 --channels 3 [--small-stem]
  python resnet_reference.py accuracy WEIGHTS CIFAR_DIR --mean M M M --std S S S [--small-stem]

Builds torchvision.models.resnet{depth}(num_classes=classes) — with the small-image stem (3x3
stride-1 conv1, no max-pool) and `channels` input channels where asked — loads WEIGHTS (ringtrain's
model.safetensors) with load_state_dict(strict=True), and writes OUT (safetensors): a fixed input
`x`, the eval-mode logits `eval`, then after one train-mode forward on `x` the logits `train` and
bn1's running statistics and batch count.

`accuracy` evaluates WEIGHTS in eval mode on CIFAR_DIR/test_batch.bin (pixels / 255, normalised
with --mean/--std) and prints `loss L correct C of N`: the mean cross-entropy and the count right.
"""
import argparse

import torch
import torch.nn as nn
import torchvision
from safetensors.torch import load_file, save_file


def build(depth, classes, channels, small_stem):
    m = getattr(torchvision.models, f"resnet{depth}")(num_classes=classes)
    if small_stem:
        m.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
    elif channels != 3:
        m.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return m


def accuracy(m, cifar_dir, mean, std):
    raw = torch.frombuffer(bytearray(open(f"{cifar_dir}/test_batch.bin", "rb").read()), dtype=torch.uint8).view(-1, 1 + 3 * 32 * 32)
    y = raw[:, 0].long()
    x = raw[:, 1:].float().view(-1, 3, 32, 32) / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    m.eval()
    with torch.no_grad():
        logits = m(x)
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    correct = int((logits.argmax(-1) == y).sum())
    print(f"loss {loss:.6f} correct {correct} of {len(y)}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["check", "accuracy"])
    p.add_argument("weights")
    p.add_argument("out")
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--small-stem", action="store_true")
    p.add_argument("--mean", type=float, nargs=3, default=[0.0, 0.0, 0.0])
    p.add_argument("--std", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    a = p.parse_args()
    torch.set_num_threads(1)
    m = build(a.depth, a.classes, a.channels, a.small_stem)
    m.load_state_dict(load_file(a.weights), strict=True)
    if a.cmd == "accuracy":
        accuracy(m, a.out, a.mean, a.std)
        return
    x = torch.randn(4, a.channels, a.size, a.size, generator=torch.Generator().manual_seed(7))
    m.eval()
    with torch.no_grad():
        ev = m(x)
    m.train()
    with torch.no_grad():
        tr = m(x)
    save_file({"x": x, "eval": ev, "train": tr, "bn1.running_mean": m.bn1.running_mean, "bn1.running_var": m.bn1.running_var,
               "bn1.num_batches_tracked": m.bn1.num_batches_tracked}, a.out)
    print("ok", len(m.state_dict()))


if __name__ == "__main__":
    main()
