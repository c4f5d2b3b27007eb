"""PyTorch DDP training of ringtrain's `model: {name: yolo}` (yolo_reference.py's Yolo and
detection_loss), for the throughput comparison in scripts/bench_detect.sh.

  torchrun --nproc-per-node 2 scripts/reference/yolo_ddp.py --steps 30 --batch-size 32 --width 16

Batches are made before the clock starts and held in memory (1-channel 128 x 128 images in [0, 1]
with 1-6 boxes of 14-56 px, as data.format mosaic draws them), so PyTorch pays nothing for data;
AdamW, gloo, one compute thread per process. Prints one JSON line (rank 0) with samples_per_s over
every step, as ringtrain's epoch line counts it.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from yolo_reference import Yolo, anchor_points, detection_loss  # noqa: E402


def batch(g, b, side):
    x = torch.rand(b, 1, side, side, generator=g) * 0.2
    target = torch.full((b, 6, 5), -1.0)
    target[..., 1:] = 0
    for i in range(b):
        for k in range(int(torch.randint(1, 7, (1,), generator=g))):
            s = int(torch.randint(14, 57, (1,), generator=g))
            x1, y1 = (int(v) for v in torch.randint(0, side - s, (2,), generator=g))
            x[i, 0, y1:y1 + s, x1:x1 + s] += 0.7
            target[i, k] = torch.tensor([float(torch.randint(0, 10, (1,), generator=g)), x1, y1, x1 + s, y1 + s])
    return x.clamp(0, 1), target


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--side", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(Yolo(1, 10, a.width))
    opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.0005)
    g = torch.Generator().manual_seed(rank)
    batches = [batch(g, a.batch_size, a.side) for _ in range(8)]
    points = anchor_points(a.side, a.side)
    model.train()
    t0 = time.perf_counter()
    for step in range(a.steps):
        x, target = batches[step % len(batches)]
        loss = detection_loss(model(x), points, target)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    secs = time.perf_counter() - t0
    if rank == 0:
        print(json.dumps({"framework": "pytorch", "world": world, "loss": loss.item(),
                          "samples_per_s": a.steps * a.batch_size * world / secs}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
