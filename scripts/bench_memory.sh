#!/usr/bin/env bash
# Memory per rank, measured against the formula each layout should follow, in one invocation: a
# GPT of about 85 M parameters (nanoGPT's layout, 12 layers × 768 wide, byte tokens, context
# 128) with AdamW at 2 ranks, a few steps each: DDP, ZeRO-1 (ddp.shard: optimizer), ZeRO-2
# (ddp.shard: grads), ZeRO-3 (ddp.shard: params), the last two also with activation checkpointing.
#   scripts/bench_memory.sh [STEPS]        (default 4 steps per run)
# Columns: peak RSS of each rank (MiB); the training state the formula predicts per rank (P
# parameters of 4 bytes: parameters 4P (divided by N under ZeRO-3), gradients 4P (the buckets they are views of; divided by N
# under ZeRO-2), AdamW's two moments 8P and its scratch 4P (divided by N under ZeRO-1 and 2)); what the rest is
# (libtorch, data, communication buffers, temporaries: the measured peak less the prediction).
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-4}"
source scripts/bench_preamble.sh
model='{name: gpt, n_layer: 12, n_head: 12, n_embd: 768, block_size: 128, bias: true, dropout: 0.0}'

runs=("DDP|" "ZeRO-1|--set ddp.shard=optimizer" "ZeRO-2|--set ddp.shard=grads"
    "ZeRO-2+ckpt|--set ddp.shard=grads --set train.activation_checkpointing=true" "ZeRO-3|--set ddp.shard=params"
    "ZeRO-3+ckpt|--set ddp.shard=params --set train.activation_checkpointing=true")
for i in "${!runs[@]}"; do
    IFS='|' read -r _ sets <<<"${runs[$i]}"
    # shellcheck disable=SC2086
    target/release/ringrun --nproc-per-node 2 --threads-per-worker 1 ringtrain --config configs/gpt_fortunes.yaml \
        --run-dir "$tmp/$i" --set "model=$model" --set train.max_steps="$steps" --set train.batch_size=2 \
        --set train.eval=false --set checkpoint.enabled=false --set sample.max_new_tokens=0 $sets \
        >"$tmp/$i.log" 2>&1 || { cat "$tmp/$i.log"; exit 1; }
done

echo "# $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); GPT 12×768, AdamW, 2 ranks × batch 2 × 128 tokens, $steps steps per run"
printf "%-12s %10s %20s %18s %18s %10s\n" layout "params (M)" "formula" "predicted MiB/rank" "peak RSS MiB/rank" "rest MiB"
for i in "${!runs[@]}"; do
    IFS='|' read -r name sets <<<"${runs[$i]}"
    python3 - "$tmp" "$i" "$name" "$sets" <<'PY'
import json, glob, re, sys
tmp, i, name, sets = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
log = open(f"{tmp}/{i}.log").read()
# "model gpt: N tensors, P parameters" from rank 0's log.
p = int(re.search(r"model gpt: \d+ tensors, (\d+) parameters", log).group(1))
n = 2
stage = int(name[5]) if name.startswith("ZeRO") else 0
per_elem = (4 / n if stage >= 3 else 4) + (4 / n if stage >= 2 else 4) + (12 / n if stage >= 1 else 12)
formula = ["4+4+12", "4+4+12/N", "4+4/N+12/N", "4/N+4/N+12/N"][stage]
# Activations, Megatron-LM's estimate per layer (34·B·T·C + 5·heads·T²·B bytes at 16 bits, so
# twice that in fp32): every layer's without checkpointing; with it, each block's input (4·B·T·C)
# and one layer's being recomputed.
L, B, T, C, H = 12, 2, 128, 768, 12
layer = 2 * (34 * B * T * C + 5 * H * T * T * B)
acts = L * 4 * B * T * C + layer if "ckpt" in name else L * layer
formula += " +acts"
predicted = (p * per_elem + acts) / 2**20
rss = sorted(json.load(open(f))["peak_rss_mib"] for f in glob.glob(f"{tmp}/{i}/ranks/*.json"))
shown = "/".join(f"{r:.0f}" for r in rss)
print(f"{name:<12} {p / 1e6:>10.1f} {formula:>20} {predicted:>18.0f} {shown:>18} {max(rss) - predicted:>10.0f}")
PY
done
