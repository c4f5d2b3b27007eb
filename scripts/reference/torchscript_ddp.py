"""PyTorch DDP (torchrun + gloo) training a TorchScript module, the reference for ringtrain's
`model.name: torchscript` (tests/torchscript.rs), and the module that test exports.

  torchrun --nproc-per-node 2 scripts/reference/torchscript_ddp.py MODEL.pt DATA_DIR OUT.safetensors \
      --steps 6 --batch-size 16 --lr 0.05 --momentum 0.9 --seed 0

Trains MODEL.pt (loaded with torch.jit.load, wrapped in DistributedDataParallel with its default
broadcast_buffers) on the Fashion-MNIST IDX files in DATA_DIR as ringtrain reads them (pixels / 255,
shape [1, 28, 28]), sharded by DistributedSampler(seed), SGD, for --steps steps; rank 0 writes its
parameters and buffers (tied weights once) to OUT.safetensors.
"""
import argparse
import gzip
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


class BnTiedNet(nn.Module):
    """Convolution + BatchNorm (running statistics as buffers) and a weight shared by two layers."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 7 * 7, 32)
        self.shared_a = nn.Linear(32, 32, bias=False)
        self.shared_b = nn.Linear(32, 32, bias=False)
        self.shared_b.weight = self.shared_a.weight
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 4)
        x = F.relu(self.fc1(x.flatten(1)))
        x = self.shared_b(F.relu(self.shared_a(x)))
        return self.head(F.relu(x))


def idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        b = f.read()
    ndim = b[3]
    dims = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(b, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(d, name):
    for c in (f"{d}/{name}.gz", f"{d}/{name}"):
        if os.path.exists(c):
            return c
    raise SystemExit(f"no {name} in {d}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = torch.jit.load(a.model)
    model.train()
    x = torch.from_numpy(idx(find(a.data, "train-images-idx3-ubyte")).copy()).float().div_(255).unsqueeze(1)
    y = torch.from_numpy(idx(find(a.data, "train-labels-idx1-ubyte")).astype(np.int64))
    train = TensorDataset(x, y)
    sampler = DistributedSampler(train, seed=a.seed)
    loader = DataLoader(train, batch_size=a.batch_size, sampler=sampler)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=a.lr, momentum=a.momentum)
    steps, epoch = 0, 0
    while steps < a.steps:
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(ddp(xb), yb).backward()
            opt.step()
            steps += 1
            if steps == a.steps:
                break
        epoch += 1
    if dist.get_rank() == 0:
        # Only the import is deferred: the GPU check imports this module for BnTiedNet where the
        # safetensors package may be missing.
        from safetensors.torch import save_model
        save_model(model, a.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
