# Sourced by the benchmark and demo scripts after `set -euo pipefail` and `cd` to the repository:
# builds the release binaries, makes a temporary folder `$tmp` removed on exit, and runs every
# worker with one compute thread.
cargo build --release --quiet
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=1
