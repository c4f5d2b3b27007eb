"""Writes src/optim/fixture.txt: what torch 2.11's optimizers, clip_grad_norm_ and nanoGPT's
get_lr compute on fixed inputs, so unit tests can check ringtrain's against them without Python.

Usage: python scripts/reference/optim_fixture.py > src/optim/fixture.txt

Format: `## section` lines, each followed by rows of space-separated numbers (float32 values are
printed with float64 repr, which is exact).
"""
import math

import torch

torch.manual_seed(0)
out = []


def section(name, rows):
    out.append(f"## {name}")
    for r in rows:
        out.append(" ".join(repr(float(x)) for x in r))


def flat(ts):
    return [t.detach().reshape(-1).tolist() for t in ts]


# nanoGPT's get_lr (train.py, master).
def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


section("schedule", [[s, get_lr(s, 6e-4, 10, 100, 6e-5)] for s in [0, 1, 5, 9, 10, 11, 37, 50, 99, 100, 101, 150]])

# Two parameters: a matrix (decays under nanoGPT's groups) and a vector (does not).
init = [torch.randn(3, 4), torch.randn(4)]
steps = 5
grads = [[torch.randn(3, 4), torch.randn(4)] for _ in range(steps)]
section("opt_init", flat(init))
section("opt_grads", [row for g in grads for row in flat(g)])


def run(make, lrs=None):
    ps = [t.clone().requires_grad_(True) for t in init]
    opt = make(ps)
    for k in range(steps):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[k]
        for p, g in zip(ps, grads[k]):
            p.grad = g.clone()
        opt.step()
    return flat(ps)


lrs = [get_lr(k, 1e-2, 2, 4, 1e-3) for k in range(steps)]
section("opt_adamw_lrs", [lrs])
# nanoGPT's configure_optimizers: 2-d and up decay, 1-d does not.
section(
    "opt_adamw",
    run(
        lambda ps: torch.optim.AdamW(
            [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8
        ),
        lrs,
    ),
)
section("opt_adamw_all_decay", run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)))
section("opt_sgd", run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)))
section("opt_sgd_nesterov", run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)))
section("opt_adam", run(lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.01)))

# clip_grad_norm_: one case that clips, one that does not.
for name, max_norm in [("clip", 0.5), ("clip_big", 100.0)]:
    ps = [t.clone().requires_grad_(True) for t in init]
    for p, g in zip(ps, grads[0]):
        p.grad = g.clone() * 3.0
    total = torch.nn.utils.clip_grad_norm_(ps, max_norm)
    section(name, [[max_norm, float(total)]] + flat([p.grad for p in ps]))

print("\n".join(out))
