#!/usr/bin/env bash
# ZeRO-3's cost in step time against DDP, in one invocation: the GPT of bench_memory.sh (85 M
# parameters, 12 × 768, byte tokens, context 128) with AdamW at 2 ranks × batch 2, one compute
# thread each, shared-memory buffers; DDP, ZeRO-2, ZeRO-3, and ZeRO-3 without prefetch, the
# runs taken in turn, twice over (A B C D A B C D) so that drift on a noisy machine hits all.
#   scripts/bench_zero3.sh [STEPS]        (default 12 steps per run; the first 2 are not counted)
# Columns: the median step time over the counted steps of both rounds (ms) and its ratio to
# DDP's; the parameter all-gathers per step and how many of them were prefetched.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-12}"
source scripts/bench_preamble.sh
model='{name: gpt, n_layer: 12, n_head: 12, n_embd: 768, block_size: 128, bias: true, dropout: 0.0}'

runs=("DDP|" "ZeRO-2|--set ddp.shard=grads" "ZeRO-3|--set ddp.shard=params" "ZeRO-3, no prefetch|--set ddp.shard=params --set ddp.prefetch=false")
for round in 1 2; do
    for i in "${!runs[@]}"; do
        IFS='|' read -r _ sets <<<"${runs[$i]}"
        # shellcheck disable=SC2086
        target/release/ringrun --nproc-per-node 2 --threads-per-worker 1 ringtrain --config configs/gpt_fortunes.yaml \
            --run-dir "$tmp/$i-$round" --set "model=$model" --set train.max_steps="$steps" --set train.batch_size=2 \
            --set train.log_every_steps=1 --set train.eval=false --set checkpoint.enabled=false --set sample.max_new_tokens=0 \
            $sets >"$tmp/$i-$round.log" 2>&1 || { cat "$tmp/$i-$round.log"; exit 1; }
    done
done

echo "# $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); GPT 12×768, AdamW, 2 ranks × batch 2 × 128 tokens, $steps steps per run, 2 rounds"
printf "%-20s %14s %9s %16s %12s\n" layout "step ms" "vs DDP" "gathers/step" "prefetched"
for i in "${!runs[@]}"; do
    IFS='|' read -r name _ <<<"${runs[$i]}"
    python3 - "$tmp" "$i" "$name" "$steps" <<'PY'
import json, re, statistics, sys
tmp, i, name, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def step_ms(run):
    # Each step line's rate is over that step alone (logging every step): 4 samples per step.
    lines = [json.loads(l) for l in open(f"{tmp}/{run}/metrics.jsonl") if '"kind":"step"' in l]
    return [4000 / l["samples_per_s"] for l in lines if l["global_step"] > 2]
def median(run):
    return statistics.median(step_ms(f"{run}-1") + step_ms(f"{run}-2"))
ms, base = median(i), median("0")
g = re.search(r"ZeRO-3: (\d+) parameter all-gathers, (\d+) of them", open(f"{tmp}/{i}-1.log").read())
gathers = f"{int(g.group(1)) / steps:.1f}" if g else "-"
ahead = f"{int(g.group(2)) / steps:.1f}" if g else "-"
print(f"{name:<20} {ms:>14.0f} {ms / base:>9.2f} {gathers:>16} {ahead:>12}")
PY
done
