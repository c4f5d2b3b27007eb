"""PyTorch DDP reference for ringtrain's jobs: same models, data, batch, optimizer and threads.

torchrun --nproc-per-node 2 scripts/reference/ddp_train.py --model cnn --epochs 1
Reads the Fashion-MNIST IDX files directly (no torchvision needed) and scales pixels by 1/255,
as ringtrain does. Prints one JSON line at the end (rank 0): accuracy and samples/s.
"""
import argparse, gzip, json, os, resource, time
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def idx(path):
    with gzip.open(path, "rb") as f:
        b = f.read()
    ndim = b[3]
    dims = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(b, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(3136, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class WideMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 4096)
        self.fc2 = nn.Linear(4096, 4096)
        self.fc3 = nn.Linear(4096, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def resnet18_small():
    """torchvision's resnet18 with the small-image stem and 1 input channel (ringtrain's
    `model: {name: resnet18, small_stem: true}` on Fashion-MNIST)."""
    import torchvision
    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["cnn", "wide_mlp", "resnet18"], default="cnn")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--normalize", action="store_true", help="Fashion-MNIST mean/std, as ringtrain's data.normalize")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if a.device == "cuda" else "cpu")
    torch.manual_seed(a.seed)
    x = torch.from_numpy(idx(f"{a.data}/train-images-idx3-ubyte.gz").copy()).float().div_(255).unsqueeze(1)
    y = torch.from_numpy(idx(f"{a.data}/train-labels-idx1-ubyte.gz").astype(np.int64))
    tx = torch.from_numpy(idx(f"{a.data}/t10k-images-idx3-ubyte.gz").copy()).float().div_(255).unsqueeze(1)
    ty = torch.from_numpy(idx(f"{a.data}/t10k-labels-idx1-ubyte.gz").astype(np.int64))
    if a.normalize:
        x, tx = (x - 0.2860) / 0.3530, (tx - 0.2860) / 0.3530
    train = TensorDataset(x, y)
    sampler = DistributedSampler(train, seed=a.seed)
    loader = DataLoader(train, batch_size=a.batch_size, sampler=sampler)
    model = (Cnn() if a.model == "cnn" else WideMlp() if a.model == "wide_mlp" else resnet18_small()).to(dev)
    model = DDP(model, device_ids=[dev.index] if a.device == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    steps, samples, t0 = 0, 0, time.perf_counter()
    for epoch in range(a.epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            steps += 1
            samples += len(xb) * world
            if a.max_steps and steps >= a.max_steps:
                break
    if a.device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        shard = slice(rank, None, world)
        logits = model.module(tx[shard].to(dev))
        stats = torch.tensor([(logits.argmax(1).cpu() == ty[shard]).sum().item(), len(ty[shard])], dtype=torch.float64, device=dev)
    dist.all_reduce(stats)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64, device=dev)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"framework": "pytorch", "model": a.model, "device": a.device, "workers": world, "steps": steps,
                          "test_acc": stats[0].item() / stats[1].item(), "samples_per_s": samples / secs,
                          "peak_rss_mib": rss.item()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
