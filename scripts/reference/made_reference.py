"""MADE as Karpathy's pytorch-made writes it, the reference for ringtrain's `made` (tests/made.rs).

  python made_reference.py WEIGHTS FASHION_MNIST_DIR --hidden 500 [--limit N]

Builds MADE(784, hidden, 784) with one MaskedLinear per layer (its `mask` a buffer) and ReLUs
between, in an nn.Sequential named `net` (as pytorch-made), loads WEIGHTS (ringtrain's
model.safetensors, masks included) with load_state_dict(strict=True), binarises the test images
(pixels / 255 > 0.5) and prints `nll L images N`: the mean negative log-likelihood in nats per
image, -log p(x) = sum over pixels of BCE-with-logits(net(x), x).
"""
import argparse
import gzip

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


class MaskedLinear(nn.Linear):
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", torch.ones(out_features, in_features))

    def forward(self, x):
        return F.linear(x, self.mask * self.weight, self.bias)


class MADE(nn.Module):
    def __init__(self, nin, hidden, nout):
        super().__init__()
        layers = []
        sizes = [nin] + hidden + [nout]
        for h0, h1 in zip(sizes, sizes[1:]):
            layers += [MaskedLinear(h0, h1), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x):
        return self.net(x)


def test_images(folder):
    with gzip.open(f"{folder}/t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return torch.from_numpy(raw.copy()).view(-1, 784).float() / 255.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("weights")
    p.add_argument("data")
    p.add_argument("--hidden", type=int, nargs="+", default=[500])
    p.add_argument("--limit", type=int, default=0)
    a = p.parse_args()
    model = MADE(784, a.hidden, 784)
    model.load_state_dict(load_file(a.weights), strict=True)
    model.eval()
    x = (test_images(a.data) > 0.5).float()
    if a.limit:
        x = x[: a.limit]
    with torch.no_grad():
        nll = F.binary_cross_entropy_with_logits(model(x), x, reduction="sum").double() / x.shape[0]
    print(f"nll {nll.item():.9g} images {x.shape[0]}")


if __name__ == "__main__":
    main()
