#!/usr/bin/env bash
# GPT training throughput, PyTorch DDP (torchrun + gloo) beside ringtrain, fp32 and bf16 (CPU
# autocast: torch.autocast("cpu", bfloat16) / train.precision: bf16), in one invocation, 2 workers
# with 1 compute thread each, on the fortunes token files, AdamW with nanoGPT's groups, clipping 1.0:
#   demo: the demo's GPT (4 layers, 4 heads, 128 wide, block 128), batch 16 per worker
#   baby: nanoGPT's "baby GPT" (6 layers, 6 heads, 384 wide, block 256), batch 8 per worker
#   scripts/bench_gpt.sh [DEMO_STEPS [BABY_STEPS]]   (default 60 and 20; PyTorch runs 5 untimed first)
# Columns: tokens/s; ringtrain/PyTorch at the same precision; bf16/fp32 of the same framework.
set -euo pipefail
cd "$(dirname "$0")/.."
demo_steps="${1:-60}"
baby_steps="${2:-20}"
py="$(scripts/bench_setup.sh)"
torchrun="$(dirname "$py")/torchrun"
cargo build --release --quiet
data=data/fortunes
[ -f "$data/train.bin" ] || target/release/ringtrain prepare-text --input /usr/share/games/fortunes --out "$data" >/dev/null
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1

field() { "$py" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

declare -A rate shape steps_of
shape[demo]="4 4 128 128 16"
shape[baby]="6 6 384 256 8"
steps_of[demo]=$demo_steps
steps_of[baby]=$baby_steps
for size in demo baby; do
    read -r layers heads width block batch <<<"${shape[$size]}"
    steps=${steps_of[$size]}
    for prec in fp32 bf16; do
        flag=""
        [ "$prec" = bf16 ] && flag="--bf16"
        out=$(cd scripts/reference && "$torchrun" --nproc-per-node 2 --master-port 29813 gpt_train.py --data "../../$data" \
              --max-steps "$steps" --n-layer "$layers" --n-head "$heads" --n-embd "$width" --block-size "$block" \
              --batch-size "$batch" $flag 2>/dev/null | tail -n 1)
        rate[pytorch,$size,$prec]=$(field "$out" tokens_per_s)
        run="$tmp/$size-$prec"
        target/release/ringrun --nproc-per-node 2 --threads-per-worker 1 ringtrain --config configs/gpt_fortunes.yaml --run-dir "$run" \
            --set model.n_layer="$layers" --set model.n_head="$heads" --set model.n_embd="$width" --set model.block_size="$block" \
            --set train.batch_size="$batch" --set train.precision="$prec" --set train.max_steps="$steps" \
            --set train.eval=false --set checkpoint.enabled=false --set sample=null >"$run.log" 2>&1 || { cat "$run.log"; exit 1; }
        line=$(grep '"kind":"epoch"' "$run/metrics.jsonl" | tail -n 1)
        rate[ringtrain,$size,$prec]=$(field "$line" tokens_per_s)
    done
done

echo "# $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); 2 workers × 1 thread; steps: demo $demo_steps, baby $baby_steps"
printf "%-5s %-5s %14s %14s %10s %14s %14s\n" model prec "PyTorch tok/s" "ringtrain tok/s" "rt/PyTorch" "PyTorch bf16/32" "rt bf16/32"
for size in demo baby; do
    for prec in fp32 bf16; do
        "$py" - "$size" "$prec" "${rate[pytorch,$size,$prec]}" "${rate[ringtrain,$size,$prec]}" \
            "${rate[pytorch,$size,fp32]}" "${rate[ringtrain,$size,fp32]}" <<'PY'
import sys
size, prec, pt, rt, pt32, rt32 = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
print(f"{size:<5} {prec:<5} {pt:>14.0f} {rt:>14.0f} {rt/pt:>10.2f} {pt/pt32:>14.2f} {rt/rt32:>14.2f}")
PY
    done
done
