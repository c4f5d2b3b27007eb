#!/usr/bin/env bash
# ZeRO-3 trains a model DDP cannot hold on this machine: a GPT of about 654 M parameters (13
# layers × 2048 wide, byte tokens, context 64, batch 4 per rank) with AdamW at 2 ranks. Under DDP each rank would
# hold 4 + 4 + 12 bytes per parameter (parameters, gradients, AdamW's moments and scratch): about
# 2 × 13 GB, more than a 24 GiB machine has, and ringtrain refuses it up front with the numbers.
# ZeRO-3 (ddp.shard: params) divides all three by the 2 ranks, and a few steps run; the loss
# falls, and the run ends with a whole, world-size independent checkpoint written streamed. Not
# part of the test suite: it uses most of the machine's memory.
#   scripts/demo_zero3.sh [STEPS]          (default 5 steps)
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-5}"
source scripts/bench_preamble.sh
model='{name: gpt, n_layer: 13, n_head: 16, n_embd: 2048, block_size: 64, bias: false, dropout: 0.0}'
common=(--set "model=$model" --set train.max_steps="$steps" --set train.batch_size=4 --set train.eval=false
    --set train.log_every_steps=1 --set checkpoint.enabled=false --set sample.max_new_tokens=0
    --set optimizer.schedule.warmup_steps=5 --set optimizer.schedule.min_lr=0.00001 --set optimizer.lr=0.00003)
run() {
    target/release/ringrun --nproc-per-node 2 --threads-per-worker 1 ringtrain --config configs/gpt_fortunes.yaml \
        --run-dir "$tmp/$1" "${common[@]}" "${@:2}" >"$tmp/$1.log" 2>&1
}

echo "# $(grep MemTotal /proc/meminfo | awk '{printf "%.1f GiB", $2 / 2^20}') of memory, $(getconf _NPROCESSORS_ONLN) cores"
echo "## DDP (expected: refused before the first step)"
if run ddp; then
    echo "DDP ran: this machine has room for it, so the demo shows nothing here"
else
    grep -m1 "does not fit" "$tmp/ddp.log" || { tail -5 "$tmp/ddp.log"; exit 1; }
fi
echo "## ZeRO-3"
start=$(date +%s)
# With the end-of-run checkpoint: streamed, so no rank holds the whole model or optimizer state.
run zero3 --set ddp.shard=params --set checkpoint.enabled=true || { tail -20 "$tmp/zero3.log"; exit 1; }
grep -m1 "model gpt:" "$tmp/zero3.log" | sed 's/ (.*//' | cut -c1-160
grep -E "step [0-9]+/[0-9]+ loss" "$tmp/zero3.log" | grep rank0 | sed 's/.*INFO rank{rank=0}: //'
python3 - "$tmp/zero3" <<'PY'
import json, glob, sys
rss = sorted(json.load(open(f))["peak_rss_mib"] / 1024 for f in glob.glob(f"{sys.argv[1]}/ranks/*.json"))
print("peak RSS per rank (GiB): " + " / ".join(f"{r:.1f}" for r in rss) + f", {sum(rss):.1f} in total")
PY
ckpt="$(ls -d "$tmp/zero3/checkpoints"/step-* | tail -n 1)"
(cd "$ckpt" && sha256sum -c --quiet checksums.sha256) && echo "checkpoint $(basename "$ckpt") verifies: $(du -sh "$ckpt" | cut -f1) \
($(grep -m1 -o "checkpoint .* written (end) in [0-9]* ms" "$tmp/zero3.log" | grep -o "in [0-9]* ms"))"
echo "($(( $(date +%s) - start )) s)"
