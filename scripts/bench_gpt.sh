#!/usr/bin/env bash
# GPT training throughput, PyTorch DDP (torchrun + gloo) beside ringtrain, in one invocation: the
# demo's GPT (4 layers, 4 heads, 128 wide, block 128) on the fortunes token files, batch 16 per
# worker, AdamW with nanoGPT's groups, clipping at 1.0, 1 compute thread per worker, 1 and 2 workers.
#   scripts/bench_gpt.sh [STEPS]        (default 100 steps per run, after 5 untimed ones for PyTorch)
# Columns: tokens/s; ringtrain/PyTorch; scaling efficiency = rate at N / (N × rate at 1).
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-100}"
py="$(scripts/bench_setup.sh)"
torchrun="$(dirname "$py")/torchrun"
cargo build --release --quiet
data=data/fortunes
[ -f "$data/train.bin" ] || target/release/ringtrain prepare-text --input /usr/share/games/fortunes --out "$data" >/dev/null
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1

field() { "$py" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

declare -A rate
for n in 1 2; do
    out=$(cd scripts/reference && "$torchrun" --nproc-per-node "$n" --master-port $((29810 + n)) gpt_train.py --data "../../$data" \
          --max-steps "$steps" 2>/dev/null | tail -n 1)
    rate[pytorch,$n]=$(field "$out" tokens_per_s)
    target/release/ringrun --nproc-per-node "$n" --threads-per-worker 1 ringtrain --config configs/gpt_fortunes.yaml --run-dir "$tmp/gpt-$n" \
        --set train.max_steps="$steps" --set train.eval=false --set checkpoint.enabled=false --set sample=null >/dev/null 2>&1
    line=$(grep '"kind":"epoch"' "$tmp/gpt-$n/metrics.jsonl" | tail -n 1)
    rate[ringtrain,$n]=$(field "$line" tokens_per_s)
done

echo "# $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $steps steps per run; batch 16 × block 128 per worker; 1 thread/worker"
printf "%-10s %3s %12s %10s %11s\n" framework N "tokens/s" "vs PyTorch" "scaling eff"
for fw in pytorch ringtrain; do
    for n in 1 2; do
        "$py" - "$fw" "$n" "${rate[$fw,$n]}" "${rate[$fw,1]}" "${rate[pytorch,$n]}" <<'PY'
import sys
fw, n, r, one, pt = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:])
print(f"{fw:<10} {n:>3} {r:>12.0f} {r/pt:>10.2f} {r/(n*one):>11.0%}")
PY
    done
done
