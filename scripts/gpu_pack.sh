#!/usr/bin/env bash
# Packs what scripts/gpu_check.sh needs on a GPU machine that has Python torch but no Rust
# toolchain: stripped release binaries, configs, the Fashion-MNIST files, the fortunes token files,
# the PyTorch references.
#   scripts/gpu_pack.sh [OUT]     (default target/gpu-pack; well under 64 MiB)
#   RINGTRAIN_BIN_DIR=DIR: take the binaries from DIR instead of building (a test that runs
#   inside `cargo test`, which holds cargo's lock)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/gpu-pack}"
bins="${RINGTRAIN_BIN_DIR:-target/release}"
[ -n "${RINGTRAIN_BIN_DIR:-}" ] || cargo build --release --quiet
rm -rf "$out"
mkdir -p "$out/bin" "$out/configs" "$out/data/fashion-mnist" "$out/reference"
for b in ringtrain ringrun ringbench; do
    strip --strip-debug -o "$out/bin/$b" "$bins/$b"
done
cp configs/*.yaml "$out/configs/"
cp /usr/share/datasets/fashion-mnist/*.gz "$out/data/fashion-mnist/"
cp scripts/reference/ddp_train.py scripts/reference/gpt_reference.py scripts/reference/gpt_train.py \
    scripts/reference/torchscript_ddp.py scripts/reference/amp_ddp.py scripts/reference/st.py \
    scripts/export_torchscript.py "$out/reference/"
"$bins/ringtrain" prepare-text --input /usr/share/games/fortunes --out "$out/data/fortunes" >/dev/null
cp scripts/gpu_check.sh "$out/"
du -sh "$out"
