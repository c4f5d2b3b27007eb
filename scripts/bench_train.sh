#!/usr/bin/env bash
# Training throughput, PyTorch DDP (torchrun + gloo) beside ringtrain, in one invocation: same data
# (Fashion-MNIST, normalised), batch 64 per worker, SGD momentum 0.9, 1 compute thread per worker,
# the reference CNN (compute-bound) and the wide MLP (communication-bound).
#   scripts/bench_train.sh [STEPS] [ROUNDS]     (defaults: 100 steps per run, 3 rounds)
#   MODELS=wide_mlp scripts/bench_train.sh      (one model; default "cnn wide_mlp")
# Every run is repeated ROUNDS times, the rounds interleaved (a slow minute of a shared machine then
# hits every column alike), and each cell is the median.
# Columns: samples/s; ringtrain/PyTorch; share of the honest ceiling = rate at N workers over the
# summed rate of N independent 1-worker runs started at once (each core busy with a job of its
# own, as under DDP; "N × the 1-worker rate" would credit a lone run with the idle core its loader
# and background threads use for free), also shown; peak RSS per worker.
# `ring-links`: ringtrain at 2 workers without shared buffers (RINGTRAIN_SHARED_BUFFERS=0).
# `ring-zero1`: ringtrain at 2 workers with the optimizer sharded (`optimizer.shard: true`, ZeRO-1:
# the same bits; on one node the parameters are one node-shared copy, each rank steps half).
# The CNN also runs at 3 and 4 workers: more workers than this machine's cores, as on a laptop.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-100}"
rounds="${2:-3}"
py="$(scripts/bench_setup.sh)"
torchrun="$(dirname "$py")/torchrun"
cargo build --release --quiet
data=/usr/share/datasets/fashion-mnist
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1
results="$tmp/results.jsonl"

field() { "$py" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
sum2() { "$py" -c "import sys; print(float(sys.argv[1]) + float(sys.argv[2]))" "$1" "$2"; }
record() { echo "{\"fw\":\"$1\",\"model\":\"$2\",\"n\":$3,\"kind\":\"$4\",\"rate\":$5,\"rss\":$6}" >>"$results"; }

# One PyTorch DDP run of N workers on port PORT; prints its JSON line.
pytorch() {
    local model=$1 n=$2 port=$3 lr
    lr=$( [ "$model" = cnn ] && echo 0.05 || echo 0.01 )
    "$torchrun" --nproc-per-node "$n" --master-port "$port" scripts/reference/ddp_train.py --model "$model" \
        --max-steps "$steps" --lr "$lr" --data "$data" --normalize 2>/dev/null | tail -n 1
}

# One ringtrain run of N workers into DIR (further arguments: config overrides).
ring() {
    local model=$1 n=$2 dir=$3 cfg
    shift 3
    cfg=configs/fashion_mnist_$( [ "$model" = cnn ] && echo cnn || echo wide_mlp ).yaml
    target/release/ringrun --nproc-per-node "$n" --threads-per-worker 1 ringtrain --config "$cfg" --run-dir "$dir" \
        --set train.max_steps="$steps" --set train.eval=false --set checkpoint.enabled=false "$@" >/dev/null 2>&1
}
ring_rate() { field "$(grep '"kind":"epoch"' "$1/metrics.jsonl" | tail -n 1)" samples_per_s; }
ring_rss() { "$py" -c "import json,glob,sys; print(max(json.load(open(f))['peak_rss_mib'] for f in glob.glob(sys.argv[1] + '/ranks/*.json')))" "$1"; }

for round in $(seq "$rounds"); do
    echo "round $round of $rounds" >&2
    for model in ${MODELS:-cnn wide_mlp}; do
        max=2
        [ "$model" = cnn ] && max=4
        for n in $(seq "$max"); do
            out=$(pytorch "$model" "$n" $((29800 + n)))
            record pytorch "$model" "$n" ddp "$(field "$out" samples_per_s)" "$(field "$out" peak_rss_mib)"
            rm -rf "$tmp/run"
            ring "$model" "$n" "$tmp/run"
            record ringtrain "$model" "$n" ddp "$(ring_rate "$tmp/run")" "$(ring_rss "$tmp/run")"
        done
        # The honest ceiling at 2: two independent 1-worker runs at once, summed.
        pytorch "$model" 1 29811 >"$tmp/pa" &
        pytorch "$model" 1 29812 >"$tmp/pb"
        wait
        record pytorch "$model" 2 ceiling "$(sum2 "$(field "$(cat "$tmp/pa")" samples_per_s)" "$(field "$(cat "$tmp/pb")" samples_per_s)")" 0
        rm -rf "$tmp/ra" "$tmp/rb"
        ring "$model" 1 "$tmp/ra" &
        ring "$model" 1 "$tmp/rb"
        wait
        record ringtrain "$model" 2 ceiling "$(sum2 "$(ring_rate "$tmp/ra")" "$(ring_rate "$tmp/rb")")" 0
        # The buckets in private memory, so the ring streams them through its shared-memory links
        # (what the shared buffers replace).
        rm -rf "$tmp/run"
        RINGTRAIN_SHARED_BUFFERS=0 ring "$model" 2 "$tmp/run"
        record ring-links "$model" 2 ddp "$(ring_rate "$tmp/run")" "$(ring_rss "$tmp/run")"
        rm -rf "$tmp/run"
        ring "$model" 2 "$tmp/run" --set optimizer.shard=true
        record ring-zero1 "$model" 2 ddp "$(ring_rate "$tmp/run")" "$(ring_rss "$tmp/run")"
    done
done

echo "# $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $steps steps per run; batch 64/worker; 1 thread/worker; median of $rounds rounds"
"$py" - "$results" <<'PY'
import json, os, sys, statistics as st
cores = len(os.sched_getaffinity(0))
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(fw, model, n, kind="ddp", key="rate"):
    v = [r[key] for r in rows if (r["fw"], r["model"], r["n"], r["kind"]) == (fw, model, n, kind)]
    return st.median(v) if v else None
print(f"{'model':<9} {'framework':<10} {'N':>2} {'samples/s':>10} {'vs PyTorch':>10} {'honest ceil.':>12} {'share':>6} {'N x 1-worker':>12} {'peak RSS MiB':>12}")
for model in ("cnn", "wide_mlp"):
    for fw in ("pytorch", "ringtrain", "ring-links", "ring-zero1"):
        for n in (1, 2, 3, 4):
            r = med(fw, model, n)
            if r is None:
                continue
            own = "pytorch" if fw == "pytorch" else "ringtrain"
            pt, one, ceil = med("pytorch", model, n), med(own, model, 1), med(own, model, n, "ceiling")
            ceil_s = f"{ceil:>12.0f} {r / ceil:>6.0%}" if ceil else f"{'':>12} {'':>6}"
            naive = f"{n * one:>12.0f}" if n <= cores else f"{'':>12}"
            print(f"{model:<9} {fw:<10} {n:>2} {r:>10.0f} {r / pt:>10.2f} {ceil_s} {naive} {med(fw, model, n, key='rss'):>12.0f}")
PY
