#!/usr/bin/env bash
# The GPU check: run from the folder scripts/gpu_pack.sh makes, on a machine with one GPU and
# Python torch 2.11 (+ the nvidia wheels, nvidia-nccl-cu13 among them). About 2–5 minutes.
#   (a) NCCL, world size 1: the reference CNN for 300 steps on cuda:0 — loss falls, accuracy
#   (b) 2 workers sharing the GPU with the ring backend (host staging): replicas identical
#   (c) (a) with bf16 autocast
#   (d) ringtrain's single-GPU throughput against PyTorch eager (same CNN, batch 64, data), ratio
#   (e) NCCL all-reduce 1 MB–256 MB at world size 1 (smoke test, nccl-tests' columns)
#   (f) the GPT demo model with bf16 autocast on cuda with NCCL, 300 steps of batch 64 × block 128:
#       tokens/s against PyTorch eager (nanoGPT's GPT, same model, batch, optimizer), ratio
#   (g) resume under NCCL with checkpoints on: the CNN with Adam, 60 steps straight against 30 +
#       resume to 60 (optimizer state restored onto the GPU): equal parameter hashes
#   (h) a TorchScript module (BatchNorm, tied weight; exported here with torch.jit.script) on cuda
#       with NCCL: loss falls; stopped at 20 and resumed to 40, equal to 40 straight
#   (i) ResNet-18 (small stem, BatchNorm) with random crop + flip on cuda with NCCL and bf16
#       autocast, 200 steps of batch 128, 2 loader threads: loss falls, test accuracy, samples/s
#   (j) ZeRO-1 under NCCL (world size 1: in-place ncclAllGather of the shards, state gathered on the
#       GPU for checkpoints): Adam sharded, 30 + resume to 60, equal to (g)'s unsharded 60 straight
#   (k) ZeRO-1 with the ring and CUDA parameters (2 workers sharing the GPU, buckets on the GPU,
#       staged through the host): equal to (b) unsharded
#   (l) NCCL's device contract at world size 2: the ring wrapped in the strict device check
#       (RINGTRAIN_STRICT_DEVICE=1, refuses tensors off cuda:0), Adam, checkpoints, evaluation,
#       30 + resume to 60 and init_from: equal to the plain ring's 60 straight
# Prints a summary table; exits non-zero if any part failed.
#   RINGTRAIN_PYTHON: the Python with torch (default /opt/torch/.venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")"
here="$PWD"
py="${RINGTRAIN_PYTHON:-/opt/torch/.venv/bin/python}"
site="$("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')" || {
    echo "gpu_check: no Python with torch at $py (set RINGTRAIN_PYTHON)"; exit 1; }
# Our binaries were linked against the same libtorch 2.11; use the GPU machine's copy.
export LD_LIBRARY_PATH="$site/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RINGTRAIN_NCCL_LIB="${RINGTRAIN_NCCL_LIB:-$site/nvidia/nccl/lib/libnccl.so.2}"
export OMP_NUM_THREADS=4
runs="$here/runs"
rm -rf "$runs"
mkdir -p "$runs"
common=(--config "$here/configs/fashion_mnist_cnn.yaml" --set "data.dir=$here/data/fashion-mnist" --set device=cuda
        --set train.max_steps=300 --set train.log_every_steps=50 --set checkpoint.enabled=false)
declare -A result

metric() { # metric RUN_DIR KEY: the last epoch line's value
    "$py" -c "import json,sys; ls=[json.loads(l) for l in open('$1/metrics.jsonl')]; e=[l for l in ls if l['kind']=='epoch'][-1]; print(e['$2'])"
}
first_loss() { "$py" -c "import json; ls=[json.loads(l) for l in open('$1/metrics.jsonl') if '\"step\"' in l]; print(ls[0]['loss'])"; }

echo "== (a) NCCL, world size 1, CNN 300 steps on cuda:0"
if "$here/bin/ringtrain" "${common[@]}" --set comm.backend=nccl --run-dir "$runs/a" 2>&1 | tail -n 8; then
    result[a]="PASS loss $(first_loss "$runs/a") -> $(metric "$runs/a" train_loss), test_acc $(metric "$runs/a" test_acc), $(metric "$runs/a" samples_per_s) samples/s"
else result[a]="FAIL"; fi

echo "== (b) 2 workers on one GPU, ring backend"
if RINGTRAIN_CUDA_DEVICE=0 "$here/bin/ringrun" --nproc-per-node 2 "$here/bin/ringtrain" "${common[@]}" --set comm.backend=ring \
        --set train.max_steps=100 --run-dir "$runs/b" 2>&1 | tail -n 4; then
    h0=$(cat "$runs/b/ranks/rank0.json"); h1=$(cat "$runs/b/ranks/rank1.json")
    if [ "${h0/\"rank\":0/}" = "${h1/\"rank\":1/}" ]; then result[b]="PASS replicas identical ($h0)"; else result[b]="FAIL replicas differ: $h0 vs $h1"; fi
else result[b]="FAIL"; fi

echo "== (c) bf16 autocast"
if "$here/bin/ringtrain" "${common[@]}" --set comm.backend=nccl --set train.precision=bf16 --run-dir "$runs/c" 2>&1 | tail -n 4; then
    result[c]="PASS loss $(first_loss "$runs/c") -> $(metric "$runs/c" train_loss), test_acc $(metric "$runs/c" test_acc) (fp32: $(metric "$runs/a" test_acc))"
else result[c]="FAIL"; fi

echo "== (d) ringtrain vs PyTorch eager, one GPU, batch 64"
torchrun="$(dirname "$py")/torchrun"
pt=$("$torchrun" --nproc-per-node 1 "$here/reference/ddp_train.py" --model cnn --device cuda --max-steps 300 \
        --data "$here/data/fashion-mnist" --normalize 2>/dev/null | tail -n 1)
if [ -n "$pt" ] && [ -f "$runs/a/metrics.jsonl" ]; then
    rt=$(metric "$runs/a" samples_per_s)
    ps=$("$py" -c "import json; print(json.loads('$pt')['samples_per_s'])")
    result[d]="ringtrain $rt vs PyTorch $ps samples/s: ratio $("$py" -c "print(round($rt/$ps, 3))")"
else result[d]="FAIL (PyTorch reference: $pt)"; fi

echo "== (e) NCCL all-reduce, world size 1"
if "$here/bin/ringbench" allreduce --backend nccl --device cuda --sizes 1M,4M,16M,64M,256M 2>&1 | tee "$runs/e.txt" | grep -v INFO; then
    result[e]="PASS ($(grep -c ' 0$' "$runs/e.txt") sizes, #wrong 0)"
else result[e]="FAIL"; fi

echo "== (f) GPT, bf16 on cuda with NCCL, against PyTorch eager"
gpt=(--config "$here/configs/gpt_fortunes.yaml" --set "data.dir=$here/data/fortunes" --set "data.prepare_from=[]" --set device=cuda
     --set comm.backend=nccl --set train.precision=bf16 --set train.batch_size=64 --set train.max_steps=300
     --set train.eval_every_steps=0 --set checkpoint.enabled=false --set sample.max_new_tokens=100)
if "$here/bin/ringtrain" "${gpt[@]}" --run-dir "$runs/f" 2>&1 | tail -n 12; then
    rt=$(metric "$runs/f" tokens_per_s)
    pt=$(cd "$here/reference" && "$py" gpt_train.py --data "$here/data/fortunes" --device cuda --bf16 --batch-size 64 --max-steps 300 2>/dev/null | tail -n 1)
    ps=$("$py" -c "import json; print(json.loads('$pt')['tokens_per_s'])" 2>/dev/null)
    result[f]="PASS val loss $(metric "$runs/f" test_loss); ringtrain $rt vs PyTorch ${ps:-?} tokens/s: ratio $("$py" -c "print(round($rt/${ps:-0.0001}, 3))")"
else result[f]="FAIL"; fi

hash_of() { "$py" -c "import json; print(json.load(open('$1/ranks/rank0.json'))['param_hash'])"; }

echo "== (g) resume under NCCL, Adam, checkpoints on"
resume=(--config "$here/configs/fashion_mnist_cnn.yaml" --set "data.dir=$here/data/fashion-mnist" --set device=cuda
        --set comm.backend=nccl --set optimizer.name=adam --set optimizer.lr=0.001 --set train.eval=false
        --set checkpoint.every_steps=10)
if "$here/bin/ringtrain" "${resume[@]}" --set train.max_steps=60 --run-dir "$runs/g-whole" 2>&1 | tail -n 2 &&
   "$here/bin/ringtrain" "${resume[@]}" --set train.max_steps=30 --run-dir "$runs/g-resumed" 2>&1 | tail -n 2 &&
   "$here/bin/ringtrain" "${resume[@]}" --set train.max_steps=60 --run-dir "$runs/g-resumed" --resume auto 2>&1 | tail -n 3; then
    a=$(hash_of "$runs/g-whole"); b=$(hash_of "$runs/g-resumed")
    if [ "$a" = "$b" ]; then result[g]="PASS resumed = straight ($a)"; else result[g]="FAIL resumed $b vs straight $a"; fi
else result[g]="FAIL"; fi

echo "== (h) TorchScript module on cuda with NCCL, resume"
ts=(--config "$here/configs/fashion_mnist_cnn.yaml" --set "data.dir=$here/data/fashion-mnist" --set device=cuda
    --set comm.backend=nccl --set model.name=torchscript --set "model.path=$runs/bn.pt" --set train.eval=false
    --set train.log_every_steps=10
    --set checkpoint.every_steps=10)
if "$py" "$here/reference/export_torchscript.py" "$here/reference/torchscript_ddp.py:BnTiedNet" --input-shape 2,1,28,28 \
        --out "$runs/bn.pt" | tail -n 3 &&
   "$here/bin/ringtrain" "${ts[@]}" --set train.max_steps=40 --run-dir "$runs/h-whole" 2>&1 | tail -n 3 &&
   "$here/bin/ringtrain" "${ts[@]}" --set train.max_steps=20 --run-dir "$runs/h-resumed" 2>&1 | tail -n 2 &&
   "$here/bin/ringtrain" "${ts[@]}" --set train.max_steps=40 --run-dir "$runs/h-resumed" --resume auto 2>&1 | tail -n 2; then
    a=$(hash_of "$runs/h-whole"); b=$(hash_of "$runs/h-resumed")
    if [ "$a" = "$b" ]; then result[h]="PASS loss $(first_loss "$runs/h-whole") -> $(metric "$runs/h-whole" train_loss); resumed = straight ($a)"
    else result[h]="FAIL resumed $b vs straight $a"; fi
else result[h]="FAIL"; fi

echo "== (i) ResNet-18 with augmentation on cuda, NCCL, bf16"
if "$here/bin/ringtrain" --config "$here/configs/fashion_mnist_resnet18.yaml" --set "data.dir=$here/data/fashion-mnist" \
        --set device=cuda --set comm.backend=nccl --set train.precision=bf16 --set train.batch_size=128 --set data.workers=2 \
        --set checkpoint.enabled=false --run-dir "$runs/i" 2>&1 | tail -n 4; then
    result[i]="PASS loss $(first_loss "$runs/i") -> $(metric "$runs/i" train_loss), test_acc $(metric "$runs/i" test_acc), $(metric "$runs/i" samples_per_s) samples/s"
else result[i]="FAIL"; fi

echo "== (j) ZeRO-1 under NCCL, resume"
if "$here/bin/ringtrain" "${resume[@]}" --set optimizer.shard=true --set train.max_steps=30 --run-dir "$runs/j" 2>&1 | tail -n 2 &&
   "$here/bin/ringtrain" "${resume[@]}" --set optimizer.shard=true --set train.max_steps=60 --run-dir "$runs/j" --resume auto 2>&1 | tail -n 3; then
    a=$(hash_of "$runs/g-whole" 2>/dev/null); b=$(hash_of "$runs/j")
    if [ "$a" = "$b" ]; then result[j]="PASS sharded + resumed = unsharded straight ($a)"; else result[j]="FAIL sharded $b vs unsharded $a"; fi
else result[j]="FAIL"; fi

echo "== (k) ZeRO-1, ring backend, CUDA parameters, 2 workers on one GPU"
if RINGTRAIN_CUDA_DEVICE=0 "$here/bin/ringrun" --nproc-per-node 2 "$here/bin/ringtrain" "${common[@]}" --set comm.backend=ring \
        --set train.max_steps=100 --set optimizer.shard=true --run-dir "$runs/k" 2>&1 | tail -n 4; then
    a=$(hash_of "$runs/b" 2>/dev/null); b=$(hash_of "$runs/k")
    if [ "$a" = "$b" ]; then result[k]="PASS sharded = unsharded ($a)"; else result[k]="FAIL sharded $b vs unsharded $a"; fi
else result[k]="FAIL"; fi

echo "== (l) NCCL's device contract under the ring: 2 workers on one GPU, strict device check"
# RINGTRAIN_STRICT_DEVICE=1 wraps the ring in a backend that, like NCCL, refuses any tensor not on
# cuda:0 (src/comm/strict.rs): parameters, buffers and optimizer state broadcast, checkpoint save and
# resume, init_from, evaluation and the stop vote all go through it at world size 2, which NCCL
# itself cannot do on one GPU.
strict=(--config "$here/configs/fashion_mnist_cnn.yaml" --set "data.dir=$here/data/fashion-mnist" --set device=cuda
        --set comm.backend=ring --set optimizer.name=adam --set optimizer.lr=0.001 --set checkpoint.every_steps=10
        --set train.log_every_steps=10)
two() { RINGTRAIN_CUDA_DEVICE=0 "$here/bin/ringrun" --nproc-per-node 2 "$here/bin/ringtrain" "$@"; }
if two "${strict[@]}" --set train.max_steps=60 --run-dir "$runs/l-plain" 2>&1 | tail -n 2 &&
   RINGTRAIN_STRICT_DEVICE=1 two "${strict[@]}" --set train.max_steps=60 --run-dir "$runs/l-whole" 2>&1 | tail -n 2 &&
   RINGTRAIN_STRICT_DEVICE=1 two "${strict[@]}" --set train.max_steps=30 --run-dir "$runs/l-resumed" 2>&1 | tail -n 2 &&
   RINGTRAIN_STRICT_DEVICE=1 two "${strict[@]}" --set train.max_steps=60 --run-dir "$runs/l-resumed" --resume auto 2>&1 | tail -n 2 &&
   RINGTRAIN_STRICT_DEVICE=1 two "${strict[@]}" --set train.max_steps=10 --set "model.init_from=$runs/l-whole/model.safetensors" \
        --run-dir "$runs/l-init" 2>&1 | tail -n 2; then
    p=$(hash_of "$runs/l-plain"); a=$(hash_of "$runs/l-whole"); b=$(hash_of "$runs/l-resumed")
    if ! grep -q "strict device check" "$runs/l-whole/logs/rank0.log"; then result[l]="FAIL the strict check was not on"
    elif [ "$a" = "$b" ] && [ "$a" = "$p" ]; then result[l]="PASS strict = plain = resumed ($a); init_from ran"
    else result[l]="FAIL strict $a, resumed $b, plain $p"; fi
else result[l]="FAIL (a tensor off the device? see the log above)"; fi

echo
echo "| part | result |"
echo "|---|---|"
status=0
for k in a b c d e f g h i j k l; do
    echo "| ($k) | ${result[$k]} |"
    case "${result[$k]}" in FAIL*) status=1 ;; esac
done
exit $status
