"""PyTorch DDP (torchrun + gloo, or NCCL on CUDA) training nanoGPT's GPT on the same token files,
batch, block and optimizer as a ringtrain GPT config: the other side of scripts/bench_gpt.sh and of
the GPU check's GPT comparison.

torchrun --nproc-per-node 2 scripts/reference/gpt_train.py --data data/fortunes --max-steps 100
Windows are drawn as nanoGPT does (random starts); throughput does not depend on which.
Prints one JSON line at the end (rank 0): tokens/s and the last loss.
"""
import argparse, json, os, resource, time
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt_reference import GPT, GPTConfig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--warmup-steps", type=int, default=5, help="steps before the clock starts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="autocast to bf16 (torch.autocast on the device in use, CPU included)")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if a.device == "cuda" else "cpu")
    torch.manual_seed(1337)
    data = np.memmap(os.path.join(a.data, "train.bin"), dtype=np.uint16, mode="r")
    meta = json.load(open(os.path.join(a.data, "meta.json")))
    cfg = GPTConfig(block_size=a.block_size, vocab_size=meta["vocab_size"], n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, bias=True)
    model = GPT(cfg).to(dev)
    opt = model.configure_optimizers(0.1, a.lr, (0.9, 0.99))
    if world > 1:
        model = DDP(model, device_ids=[dev.index] if a.device == "cuda" else None)
    gen = torch.Generator().manual_seed(rank)

    def batch():
        ix = torch.randint(len(data) - a.block_size, (a.batch_size,), generator=gen)
        x = torch.stack([torch.from_numpy(data[i : i + a.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + a.block_size].astype(np.int64)) for i in ix])
        return x.to(dev), y.to(dev)

    t0 = None
    for step in range(a.warmup_steps + a.max_steps):
        if step == a.warmup_steps:
            if a.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x, y = batch()
        with torch.autocast(device_type=a.device, dtype=torch.bfloat16, enabled=a.bf16):
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    if a.device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    if rank == 0:
        print(json.dumps({"framework": "pytorch", "workers": world, "steps": a.max_steps, "loss": loss.item(),
                          "tokens_per_s": a.max_steps * a.batch_size * a.block_size * world / secs,
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
