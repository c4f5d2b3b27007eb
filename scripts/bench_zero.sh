#!/usr/bin/env bash
# ZeRO-1 (optimizer.shard) against unsharded training, in one invocation: the wide MLP
# (784-4096-4096-10, 20.0 M parameters) with Adam on Fashion-MNIST, 2 workers × batch 64, 1
# compute thread each, the same steps; and bf16 gradients on the ring.
#   scripts/bench_zero.sh [STEPS]        (default 100 steps per run)
# Columns: samples/s and its ratio to unsharded fp32; the step's optimizer and communication
# time (ms, mean over the run); peak RSS of the larger worker; Adam's state per rank as the
# checkpoint's optimizer file divides by the world size (2 × 4 bytes per parameter unsharded).
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-100}"
source scripts/bench_preamble.sh
py=python3

runs=("fp32 unsharded|" "fp32 ZeRO-1|--set optimizer.shard=true" "bf16 unsharded|--set ddp.reduce_dtype=bf16")
for i in "${!runs[@]}"; do
    IFS='|' read -r _ sets <<<"${runs[$i]}"
    # shellcheck disable=SC2086
    target/release/ringrun --nproc-per-node 2 --threads-per-worker 1 ringtrain --config configs/fashion_mnist_wide_mlp.yaml \
        --run-dir "$tmp/$i" --set optimizer.name=adam --set optimizer.lr=0.0005 --set train.max_steps="$steps" \
        --set train.eval=false --set checkpoint.enabled=false $sets >"$tmp/$i.log" 2>&1 || { cat "$tmp/$i.log"; exit 1; }
done

echo "# $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); wide MLP, Adam, 2 workers × batch 64, $steps steps per run"
printf "%-16s %10s %9s %9s %9s %14s %16s\n" run "samples/s" "vs fp32" "opt ms" "comm ms" "peak RSS MiB" "Adam state MiB"
for i in "${!runs[@]}"; do
    IFS='|' read -r name sets <<<"${runs[$i]}"
    "$py" - "$tmp" "$i" "$name" "$sets" <<'PY'
import json, glob, sys
tmp, i, name, sets = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
def epoch(run):
    return [json.loads(l) for l in open(f"{tmp}/{run}/metrics.jsonl") if '"kind":"epoch"' in l][-1]
e, base = epoch(i), epoch("0")
rss = max(json.load(open(f))["peak_rss_mib"] for f in glob.glob(f"{tmp}/{i}/ranks/*.json"))
ms = e["step_ms"]
params = 784 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 10 + 10
state = 2 * 4 * params / 2**20 / (2 if "shard" in sets else 1)
print(f"{name:<16} {e['samples_per_s']:>10.0f} {e['samples_per_s'] / base['samples_per_s']:>9.2f} "
      f"{ms.get('optimizer', 0):>9.1f} {ms.get('communication', 0):>9.1f} {rss:>14.0f} {state:>16.0f}")
PY
done
