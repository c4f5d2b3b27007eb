#!/usr/bin/env python3
"""Exports a PyTorch module for ringtrain (model.name: torchscript).

  python scripts/export_torchscript.py torchvision.models:resnet18 --kwargs '{"num_classes": 10}' \
      --input-shape 2,3,32,32 --out resnet18.pt
  python scripts/export_torchscript.py path/to/model.py:Net --input-shape 2,1,28,28 --out net.pt
  python scripts/export_torchscript.py scripts/reference/gpt_reference.py:gpt_from_json \
      --args '["config.json"]' --input-shape 2,64 --input-dtype long --input-high 65 --out gpt.pt

MODULE is `package.module:name` or `file.py:name`, where name is an nn.Module class or a function
returning a module, called with --args (a JSON list) and --kwargs (a JSON object) after
torch.manual_seed(--seed), so the weights are reproducible. The module is scripted
(torch.jit.script; tracing would freeze BatchNorm and Dropout in training mode), saved with the
torch version in extra/ringtrain.json, loaded back, and checked: the reloaded module gives the
same outputs as the original in evaluation mode on a random input of --input-shape. It then lists
the parameters, buffers and tied tensors ringtrain will train, checkpoint and broadcast.

Exits non-zero with a one-line reason when the module cannot be imported, built or scripted, or
the reloaded module disagrees. TorchScript is deprecated upstream in favour of torch.export, which
cannot train; it still ships and works in torch 2.11.
"""
import argparse
import importlib
import importlib.util
import json
import os
import sys

import torch


def fail(msg):
    print(f"export_torchscript: {msg}", file=sys.stderr)
    sys.exit(2)


def load_object(spec):
    if ":" not in spec:
        fail(f"MODULE {spec!r} must be package.module:name or file.py:name")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                fail(f"{where}: no such file")
            sys.path.insert(0, os.path.dirname(os.path.abspath(where)))
            s = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
        else:
            mod = importlib.import_module(where)
    except Exception as e:  # an import error of the user's code, in one line
        fail(f"importing {where} failed: {type(e).__name__}: {e}")
    if not hasattr(mod, name):
        fail(f"{where} has no {name!r}")
    return getattr(mod, name)


def tied_groups(module):
    """Names sharing one tensor (remove_duplicate=False lists every name of a tied weight)."""
    by_ptr = {}
    for n, p in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False)):
        by_ptr.setdefault((p.data_ptr(), tuple(p.shape), p.dtype), []).append(n)
    return [names for names in by_ptr.values() if len(names) > 1]


def describe(out):
    if isinstance(out, torch.Tensor):
        return f"Tensor{list(out.shape)}"
    if isinstance(out, (tuple, list)):
        return "(" + ", ".join(describe(o) for o in out) + ")"
    return type(out).__name__


def same(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a is None and b is None


def main():
    p = argparse.ArgumentParser(description="Script and save a PyTorch module for ringtrain (model.name: torchscript).")
    p.add_argument("module", help="package.module:name or file.py:name (an nn.Module class or a function returning one)")
    p.add_argument("--args", default="[]", help="JSON list of positional constructor arguments")
    p.add_argument("--kwargs", default="{}", help="JSON object of keyword constructor arguments")
    p.add_argument("--input-shape", required=True, help="shape of a checking input batch, e.g. 2,3,32,32")
    p.add_argument("--input-dtype", choices=["float", "long"], default="float", help="long: token ids")
    p.add_argument("--input-high", type=int, default=2, help="token ids are drawn from [0, this) (--input-dtype long)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before building the module")
    p.add_argument("--out", required=True, help="the .pt file to write")
    a = p.parse_args()
    try:
        args, kwargs = json.loads(a.args), json.loads(a.kwargs)
        shape = [int(d) for d in a.input_shape.split(",")]
    except ValueError as e:
        fail(f"bad --args, --kwargs or --input-shape: {e}")
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        fail("--args must be a JSON list and --kwargs a JSON object")

    factory = load_object(a.module)
    torch.manual_seed(a.seed)
    try:
        module = factory(*args, **kwargs)
    except Exception as e:
        fail(f"building {a.module} failed: {type(e).__name__}: {e}")
    if not isinstance(module, torch.nn.Module):
        fail(f"{a.module} returned {type(module).__name__}, not an nn.Module")
    module.eval()
    try:
        scripted = torch.jit.script(module)
    except Exception as e:
        reason = " ".join(str(e).split())[:600]
        fail(f"{a.module} cannot be scripted (torch.jit.script): {reason}")

    out_dir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = a.out + ".tmp"
    info = {"torch": torch.__version__, "module": a.module, "args": args, "kwargs": kwargs, "seed": a.seed}
    scripted.save(tmp, _extra_files={"ringtrain.json": json.dumps(info)})
    os.replace(tmp, a.out)  # a reader never sees half a file

    reloaded = torch.jit.load(a.out)
    reloaded.eval()
    gen = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randint(0, a.input_high, shape, generator=gen) if a.input_dtype == "long" else torch.randn(shape, generator=gen)
    with torch.no_grad():
        want, got = module(x), reloaded(x)
    if not same(want, got):
        os.remove(a.out)
        fail(f"the reloaded module's output differs from the original's ({describe(want)} vs {describe(got)}); nothing written")

    params = list(reloaded.named_parameters())
    buffers = list(reloaded.named_buffers())
    print(f"wrote {a.out} (torch {torch.__version__})")
    print(f"forward({a.input_dtype}{shape}) -> {describe(got)}")
    print(f"parameters: {len(params)} tensors, {sum(p.numel() for _, p in params)} values")
    for n, t in params:
        print(f"  {n} {list(t.shape)}")
    print(f"buffers: {len(buffers)}")
    for n, t in buffers:
        print(f"  {n} {list(t.shape)} {str(t.dtype).replace('torch.', '')}")
    groups = tied_groups(module)
    print(f"tied: {len(groups)}" + "".join(f"\n  {' = '.join(g)}" for g in groups))


if __name__ == "__main__":
    main()
