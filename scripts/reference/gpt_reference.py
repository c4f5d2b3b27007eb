"""nanoGPT's GPT (model.py, as written there: LayerNorm with optional bias, causal self-attention
through scaled_dot_product_attention, exact GELU, tied lm_head/wte, its initialisation) and the
PyTorch side of ringtrain's GPT equivalence tests.

  python gpt_reference.py init  CONFIG_JSON OUT_DIR SEED   -> OUT_DIR/init.safetensors, OUT_DIR/batch.safetensors
  python gpt_reference.py step  CONFIG_JSON WEIGHTS BATCH OPT OUT   (OPT: sgd | adamw) -> prints {"loss": …}
  python gpt_reference.py check CONFIG_JSON WEIGHTS BATCH   -> loads WEIGHTS (load_model strict; load_state_dict with
                                                              only the tied lm_head.weight missing), prints {"loss": …}

CONFIG_JSON: {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "dropout"}.
"""
import json
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets: Optional[torch.Tensor] = None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss: Optional[torch.Tensor] = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def gpt_from_json(config_path):
    """The GPT of a CONFIG_JSON file (for scripts/export_torchscript.py)."""
    return model_of(config_path)[0]


def model_of(config_path):
    cfg = json.load(open(config_path))
    return GPT(GPTConfig(**cfg)), cfg


def main():
    # Here, not at the top: gpt_train.py imports this module's GPT on machines (the GPU check's)
    # whose Python may have no safetensors package.
    from safetensors.torch import load_file, load_model, save_file, save_model

    torch.set_num_threads(1)
    cmd = sys.argv[1]
    if cmd == "init":
        _, config_path, out, seed = sys.argv[1:5]
        torch.manual_seed(int(seed))
        model, cfg = model_of(config_path)
        # save_model keeps one name of the tied pair: what a PyTorch user's file looks like.
        save_model(model, f"{out}/init.safetensors")
        x = torch.randint(0, cfg["vocab_size"], (4, cfg["block_size"]))
        y = torch.randint(0, cfg["vocab_size"], (4, cfg["block_size"]))
        save_file({"x": x, "y": y}, f"{out}/batch.safetensors")
    elif cmd == "step":
        _, config_path, weights, batch, opt_name, out = sys.argv[1:7]
        model, _ = model_of(config_path)
        load_model(model, weights, strict=True)
        b = load_file(batch)
        model.train()
        _, loss = model(b["x"], b["y"])
        loss.backward()
        if opt_name == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
        else:
            opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
        opt.step()
        save_model(model, out)
        print(json.dumps({"loss": loss.item()}))
    elif cmd == "amp":
        # STEPS SGD steps (lr 0.1) on one batch under torch.autocast("cpu", dtype), with
        # GradScaler("cpu") (default settings) for fp16: the losses, the final weights.
        _, config_path, weights, batch, precision, steps, out = sys.argv[1:8]
        model, _ = model_of(config_path)
        load_model(model, weights, strict=True)
        b = load_file(batch)
        model.train()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        # Under CPU autocast ringtrain's GPT uses nanoGPT's unfused attention (its bf16 matmuls beat
        # libtorch's bf16 CPU flash kernel): the same here, so the rest compares exactly.
        def manual_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True):
            T = q.size(-2)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
            return F.dropout(F.softmax(att, dim=-1), dropout_p) @ v

        F.scaled_dot_product_attention = manual_attention
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
        losses = []
        for _ in range(int(steps)):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype):
                _, loss = model(b["x"], b["y"])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        save_model(model, out)
        print(json.dumps({"losses": losses, "scale": scaler.get_scale() if scaler.is_enabled() else 1.0}))
    elif cmd == "check":
        _, config_path, weights, batch = sys.argv[1:5]
        # safetensors' own way for tied weights, strictly; and load_state_dict, where only the
        # tied alias may be missing.
        model, _ = model_of(config_path)
        load_model(model, weights, strict=True)
        other, _ = model_of(config_path)
        missing, unexpected = other.load_state_dict(load_file(weights), strict=False)
        assert unexpected == [] and missing == ["lm_head.weight"], (missing, unexpected)
        b = load_file(batch)
        model.eval()
        other.eval()
        with torch.no_grad():
            _, loss = model(b["x"], b["y"])
            _, loss2 = other(b["x"], b["y"])
        assert loss.item() == loss2.item()
        print(json.dumps({"loss": loss.item(), "tied": model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()}))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
