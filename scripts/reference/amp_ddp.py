"""PyTorch DDP with autocast (torchrun + gloo on the CPU, NCCL on CUDA): the reference for ringtrain's
`train.precision: bf16 | fp16` (tests/amp_pytorch.rs on the CPU, the GPU check on CUDA).

  python scripts/reference/amp_ddp.py INIT.safetensors - - --precision bf16 --write-init
  torchrun --nproc-per-node 2 scripts/reference/amp_ddp.py INIT.safetensors DATA_DIR OUT.safetensors \
      --precision fp16 --steps 10 --batch-size 16 --lr 0.05 --momentum 0.9 --seed 0 \
      [--init-scale 65536 --growth-interval 2000] [--trace TRACE.jsonl] [--device cuda]

Trains the reference CNN (ddp_train.Cnn) from INIT.safetensors on the Fashion-MNIST IDX files in
DATA_DIR as ringtrain reads them (pixels / 255, no normalisation), sharded by
DistributedSampler(seed), SGD, under torch.autocast(device, dtype) — with torch.amp.GradScaler(device)
for fp16. Tensors are read and written with st.py (no safetensors package needed). Rank 0 writes the final parameters to OUT.safetensors and, with --trace, one JSON line
per step: the loss, the scale after the step's update and whether the step was skipped.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_train import Cnn, idx  # noqa: E402
from st import load as load_file, save as save_file  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("init")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--precision", choices=["bf16", "fp16"], required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-scale", type=float, default=65536.0)
    p.add_argument("--growth-interval", type=int, default=2000)
    p.add_argument("--trace")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--write-init", action="store_true", help="write Cnn's initial weights (seed) to INIT and exit")
    a = p.parse_args()
    if a.write_init:
        torch.manual_seed(a.seed)
        save_file(Cnn().state_dict(), a.init)
        return
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if a.device == "cuda" else "cpu")
    model = Cnn()
    model.load_state_dict(load_file(a.init), strict=True)
    model = model.to(dev)
    x = torch.from_numpy(idx(f"{a.data}/train-images-idx3-ubyte.gz").copy()).float().div_(255).unsqueeze(1)
    y = torch.from_numpy(idx(f"{a.data}/train-labels-idx1-ubyte.gz").astype(np.int64))
    train = TensorDataset(x, y)
    sampler = DistributedSampler(train, seed=a.seed)
    loader = DataLoader(train, batch_size=a.batch_size, sampler=sampler)
    ddp = DDP(model, device_ids=[dev.index] if a.device == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=a.lr, momentum=a.momentum)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(a.device, init_scale=a.init_scale, growth_interval=a.growth_interval,
                                  enabled=a.precision == "fp16")
    trace = []
    steps, epoch = 0, 0
    while steps < a.steps:
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            xb, yb = xb.to(dev), yb.to(dev)
            opt.zero_grad()
            with torch.autocast(a.device, dtype=dtype):
                loss = F.cross_entropy(ddp(xb), yb)
            scaler.scale(loss).backward()
            before = scaler.get_scale() if scaler.is_enabled() else 1.0
            scaler.step(opt)
            scaler.update()
            steps += 1
            # A skipped step is one whose update backed the scale off.
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            trace.append({"step": steps, "loss": loss.item(), "loss_scale": scale, "skipped": scale < before})
            if steps == a.steps:
                break
        epoch += 1
    if dist.get_rank() == 0:
        save_file(model.state_dict(), a.out)
        if a.trace:
            with open(a.trace, "w") as f:
                f.writelines(json.dumps(t) + "\n" for t in trace)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
