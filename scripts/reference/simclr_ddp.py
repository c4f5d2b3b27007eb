"""SimCLR under PyTorch DDP, the baseline of scripts/bench_simclr.sh: the same network as
ringtrain's `model: {name: simclr, encoder: resnet18, small_stem: true, width: W}` (torchvision's
BasicBlock ResNet-18 layout at first-stage width W, no fc; Linear-BatchNorm1d-ReLU-Linear head),
the same random views (resized crop, flip, brightness/contrast jitter through affine grids), NT-Xent
with negatives from every rank through torch.distributed.nn.functional.all_gather, AdamW.
BatchNorm is plain (per rank): nn.SyncBatchNorm refuses CPU tensors.

  torchrun --nproc-per-node 2 simclr_ddp.py --width 16 --batch-size 64 --steps 20

Prints one JSON line (rank 0): images per second over all ranks, every step timed.
"""
import argparse
import gzip
import json
import math
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock


class Encoder(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, inplanes = [], width
        for s in range(4):
            planes, stride = width << s, 1 if s == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.features = inplanes

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class SimCLR(nn.Module):
    def __init__(self, width, proj_dim):
        super().__init__()
        self.encoder = Encoder(width)
        f = self.encoder.features
        self.projector = nn.Sequential(nn.Linear(f, f), nn.BatchNorm1d(f), nn.ReLU(), nn.Linear(f, proj_dim))

    def forward(self, x):
        return self.projector(self.encoder(x))


def view(x, min_scale=0.3, flip=0.5, jitter=0.4):
    """ringtrain's data::views::view_from, written with the same operations."""
    n = x.shape[0]
    u = torch.rand(n, 7)
    area = u[:, 0] * (1 - min_scale) + min_scale
    ratio = torch.exp(u[:, 1] * (math.log(4 / 3) - math.log(3 / 4)) + math.log(3 / 4))
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    cx, cy = (u[:, 2] * 2 - 1) * (1 - w), (u[:, 3] * 2 - 1) * (1 - h)
    sign = 1 - 2 * (u[:, 4] < flip).float()
    zero = torch.zeros(n)
    theta = torch.stack([w * sign, zero, cx, zero, h, cy], 1).view(n, 2, 3)
    v = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="border", align_corners=False)
    contrast = (u[:, 5] * 2 * jitter + 1 - jitter).view(n, 1, 1, 1)
    shift = (u[:, 6] * jitter - jitter / 2).view(n, 1, 1, 1)
    mean = v.mean((1, 2, 3), keepdim=True)
    return (v - mean) * contrast + mean + shift


def nt_xent(z, t):
    b = z.shape[0] // 2
    z = F.normalize(z, dim=1)
    local = torch.cat([z[:b], z[b:]], 1)
    all_ = torch.cat(dnn.all_gather(local), 0)
    n, d = all_.shape[0], z.shape[1]
    keys = torch.cat([all_[:, :d], all_[:, d:]], 0)
    logits = z @ keys.t() / t
    offset = dist.get_rank() * b
    i = torch.arange(b) + offset
    own, partner = torch.cat([i, i + n]), torch.cat([i + n, i])
    logits = logits.scatter(1, own.unsqueeze(1), float("-inf"))
    return F.cross_entropy(logits, partner)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--proj-dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.002)
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(SimCLR(a.width, a.proj_dim))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-6)
    with gzip.open(f"{a.data}/train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    images = (torch.from_numpy(raw.copy()).view(-1, 1, 28, 28).float() / 255 - 0.2860) / 0.3530
    torch.manual_seed(1 + rank)
    order = torch.randperm(images.shape[0])[rank::world]
    dist.barrier()
    start = time.perf_counter()
    for step in range(a.steps):
        x = images[order[step * a.batch_size:(step + 1) * a.batch_size]]
        loss = nt_xent(model(torch.cat([view(x), view(x)])), 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dist.barrier()
    secs = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({"framework": "pytorch", "workers": world, "steps": a.steps, "loss": loss.item(),
                          "images_per_s": a.steps * a.batch_size * world / secs}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
