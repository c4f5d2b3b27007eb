#!/usr/bin/env bash
# Installs everything ringtrain needs to build and run on a Debian machine; safe to re-run.
#
# - Debian packages: the Fashion-MNIST data set, fortunes' English text (the GPT demo's corpus), a
#   TTF for plots (fonts-dejavu-core), the C/C++ toolchain bits the -sys crates use,
#   Open MPI (the MPI backend, built by default) and libclang (rsmpi's bindgen).
# - libtorch 2.11.0 (what tch 0.24 is built for), taken from the PyPI wheels because that is the
#   registry reachable everywhere we run. Unpacked once into a cache outside the repo
#   ($RINGTRAIN_CACHE, default ~/.cache/ringtrain) and linked into the repo as .deps/libtorch,
#   which .cargo/config.toml points LIBTORCH at.
#
# With --python, also a Python venv with torch 2.11 (scripts/bench_setup.sh), which the tests that
# compare with PyTorch and the benchmarks use, and Debian's Slurm and munge for the test against a
# real single-node Slurm; the test command asks for it.
#
# Quiet when nothing is missing.
set -euo pipefail

with_python=0
for arg in "$@"; do
    case "$arg" in
        --python) with_python=1 ;;
        *) echo "setup: unknown option $arg (expected --python)" >&2; exit 2 ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${RINGTRAIN_CACHE:-$HOME/.cache/ringtrain}"
torch_version="2.11.0"
# libtorch_cpu.so NEEDs these two CUDA runtime libraries even for CPU work (found via its RPATH
# in the nvidia/ folder beside torch/), so they are unpacked next to it.
wheels=("torch==${torch_version}" "nvidia-cuda-runtime==13.0.96.*" "nvidia-cuda-cupti==13.0.85.*")
site="$cache/libtorch-${torch_version}"

say() { echo "setup: $*"; }

# --- Debian packages -------------------------------------------------------------------------
apt_packages=(dataset-fashion-mnist fortunes fonts-dejavu-core pkg-config g++ unzip libopenmpi-dev openmpi-bin libclang-dev)
# The test command's extras: python3-venv for the PyTorch venv; slurm-wlm and munge for
# tests/slurm_real.rs, which starts its own daemons (scripts/slurm_local.sh). Installing them
# starts no Slurm daemon (Debian's units and init scripts need /etc/slurm/slurm.conf, which we
# never write); a system munged, where the package starts one, is left alone and unused.
((with_python)) && apt_packages+=(python3-venv slurm-wlm munge)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- libtorch from the PyPI wheels -----------------------------------------------------------
if [ ! -f "$site/.complete" ]; then
    say "fetching libtorch ${torch_version} wheels into $cache (about 545 MB, once)"
    mkdir -p "$cache/wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        -d "$cache/wheels" "${wheels[@]}"
    tmp="$(mktemp -d "$cache/unpack.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    unzip -q -o "$cache"/wheels/torch-${torch_version}-*.whl 'torch/lib/*' 'torch/include/*' 'torch/share/*' -d "$tmp"
    unzip -q -o "$cache"/wheels/nvidia_cuda_runtime-*.whl 'nvidia/*' -d "$tmp"
    unzip -q -o "$cache"/wheels/nvidia_cuda_cupti-*.whl 'nvidia/*' -d "$tmp"
    rm -rf "$site"
    mv "$tmp" "$site"
    trap - EXIT
    touch "$site/.complete"
fi

mkdir -p "$repo/.deps"
if [ "$(readlink "$repo/.deps/libtorch" 2>/dev/null)" != "$site/torch" ]; then
    ln -sfn "$site/torch" "$repo/.deps/libtorch"
    say "linked .deps/libtorch -> $site/torch"
fi

# --- Rust toolchain --------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found; install Rust (https://rustup.rs) and re-run" >&2
    exit 1
fi

# --- Python torch for the tests that compare with PyTorch --------------------------------------
if ((with_python)); then
    "$repo/scripts/bench_setup.sh" >/dev/null
fi
