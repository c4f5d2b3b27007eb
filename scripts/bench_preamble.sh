# Sourced by the benchmark and demo scripts after `set -euo pipefail` and `cd` to the repository:
# builds the release binaries, makes a temporary folder `$tmp` removed on exit, and runs every
# worker with one compute thread.
cargo build --release --quiet
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1

# For the ringtrain-beside-PyTorch throughput scripts (they set $py to the bench venv's Python):
# field JSON KEY: one value of a JSON line.
field() { "$py" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
# epoch_rate RUN_DIR: samples/s of a ringtrain run's last epoch line.
epoch_rate() { field "$(grep '"kind":"epoch"' "$1/metrics.jsonl" | tail -n 1)" samples_per_s; }
# vs_pytorch_table: the caller's `rate[pytorch|ringtrain,1|2]` (samples/s), each against PyTorch
# at the same worker count and against N times its own 1-worker rate.
vs_pytorch_table() {
    printf "%-10s %3s %10s %11s %12s\n" framework N "samples/s" "vs PyTorch" "scaling eff"
    for fw in pytorch ringtrain; do
        for n in 1 2; do
            "$py" -c "import sys; fw, n, r, one, pt = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:]); print(f'{fw:<10} {n:>3} {r:>10.1f} {r/pt:>11.2f} {r/(n*one):>12.0%}')" \
                "$fw" "$n" "${rate[$fw,$n]}" "${rate[$fw,1]}" "${rate[pytorch,$n]}"
        done
    done
}
