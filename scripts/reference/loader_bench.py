"""torchvision's ImageFolder + DataLoader throughput, the reference for `ringbench loader`.

  python loader_bench.py ROOT --workers 1,2 --batch-size 64 --resize 128 --crop 112
Decodes and transforms every image of ROOT/train once per worker count (Resize, RandomCrop,
RandomHorizontalFlip, ToTensor, Normalize), shuffled, and prints images/s per line.
"""
import argparse
import time

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resize", type=int, default=128)
    p.add_argument("--crop", type=int, default=112)
    a = p.parse_args()
    torch.set_num_threads(1)
    t = transforms.Compose([transforms.Resize(a.resize), transforms.RandomCrop(a.crop), transforms.RandomHorizontalFlip(),
                            transforms.ToTensor(), transforms.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])])
    ds = datasets.ImageFolder(f"{a.root}/train", transform=t)
    for w in [int(x) for x in a.workers.split(",")]:
        start = time.perf_counter()
        n = 0
        for x, _ in DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=w):
            n += len(x)
        secs = time.perf_counter() - start
        print(f"torchvision loader workers={w} images={n} seconds={secs:.2f} images_per_s={n / secs:.0f}")


if __name__ == "__main__":
    main()
