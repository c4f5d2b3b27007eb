#!/usr/bin/env bash
# The GPU check: run from the folder scripts/gpu_pack.sh makes, on a machine with one GPU and
# Python torch 2.11 (+ the nvidia wheels, nvidia-nccl-cu13 among them). Well under 8 minutes on one
# H100/H200. NCCL cannot put two ranks on one GPU, so the NCCL parts run at world size 1 with
# RINGTRAIN_FORCE_COLLECTIVES=1: the reducer (bucket all-reduce on NCCL's stream, overlapped with
# backward), the coalesced buffer broadcast, ZeRO-1's reduce-scatter/all-gather and the checkpoint
# paths then issue their collectives for real; the multi-rank logic runs at world size 2 with the
# ring on the same GPU.
#   (a) NCCL: the reference CNN, 300 steps: loss falls; a traced run: buckets issued during
#       backward; the same bits as with ddp.overlap off
#   (b) 2 workers sharing the GPU with the ring backend (host staging): replicas identical
#   (c) bf16 autocast (read back from libtorch) against PyTorch DDP with torch.autocast(cuda, bf16):
#       the same CNN from the same weights and batches, 50 steps: losses and weights close
#   (d) fp16 autocast + loss scaling against PyTorch's autocast + GradScaler, started at 2^20 with a
#       growth interval of 3 (overflows on purpose): the same scales and skipped steps
#   (e) ringtrain's throughput against PyTorch DDP, world size 1 (both all-reduce), CNN batch 64
#   (f) NCCL all-reduce 1 MB–256 MB (ringbench, nccl-tests' columns), results checked
#   (g) the GPT demo model with bf16 on NCCL, 300 steps of batch 64 × block 128, against PyTorch
#   (h) resume under NCCL with Adam, checkpoints on: 30 + resume to 60 equal to 60 straight
#   (i) a TorchScript module (BatchNorm, tied weight) on NCCL: loss falls; 20 + resume = 40 straight
#   (j) ResNet-18 (BatchNorm buffers broadcast coalesced on NCCL) with augmentation, bf16, 200 steps
#   (k) ZeRO-1 under NCCL: Adam sharded, 30 + resume to 60, equal to (h)'s unsharded 60 straight
#   (l) ZeRO-1 with the ring and CUDA parameters (2 workers on the GPU): equal to (b) unsharded
#   (m) NCCL's device contract at world size 2: the ring wrapped in the strict device check
#       (RINGTRAIN_STRICT_DEVICE=1, refuses tensors off cuda:0), Adam, checkpoints, evaluation,
#       30 + resume to 60 and init_from: equal to the plain ring's 60 straight
#   (n) SimCLR (SyncBatchNorm, the differentiable all-gather, whose backward libtorch runs on its
#       CUDA engine thread): NCCL at world size 1, loss falls and the linear probe runs; 2 workers
#       on the GPU with the ring: replicas identical
#   (o) ZeRO-2 and ZeRO-3 with activation checkpointing (dropout on) on NCCL at world size 1 with
#       the collectives forced: equal to DDP (bitwise, or within 1e-3 where the GPU's attention
#       backward is not deterministic), ZeRO-3's prefetches having run (NCCL from its prefetch
#       thread) and its gathered copies freed between steps (device memory: the storage freed);
#       ZeRO-3 with 2 workers on the GPU (ring): equal to DDP
#   (p) the YOLO detector (BatchNorm, SPPF, FPN + PAN, the detection loss) with bf16 on NCCL: loss
#       falls, mAP@0.5 above chance-level 0.05 with predictions.png written; 2 workers on the GPU
#       with the ring: replicas identical
# A part whose PyTorch reference fails fails. Prints one summary table; exits non-zero if any failed.
#   gpu_check.sh --dry-run: the same parts on the CPU (ring instead of NCCL, a tenth of the steps,
#   small batches), so a broken script shows without a GPU; its figures mean nothing.
#   RINGTRAIN_PYTHON: the Python with torch (default /opt/torch/.venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")"
here="$PWD"
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
py="${RINGTRAIN_PYTHON:-/opt/torch/.venv/bin/python}"
site="$("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')" || {
    echo "gpu_check: no Python with torch at $py (set RINGTRAIN_PYTHON)"; exit 1; }
torchrun="$(dirname "$py")/torchrun"
# Our binaries were linked against the same libtorch 2.11; use this Python's copy.
export LD_LIBRARY_PATH="$site/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RINGTRAIN_NCCL_LIB="${RINGTRAIN_NCCL_LIB:-$site/nvidia/nccl/lib/libnccl.so.2}"
export RINGTRAIN_FORCE_COLLECTIVES=1
if ((dry)); then
    export OMP_NUM_THREADS=1
    dev=cpu nccl=ring
else
    export OMP_NUM_THREADS=4
    dev=cuda nccl=nccl
fi
s() { if ((dry)); then echo $(($1 / 10 > 0 ? $1 / 10 : 1)); else echo "$1"; fi; } # steps
b() { if ((dry)); then echo 16; else echo "$1"; fi; }                                  # batch size
bin() { "$here/bin/$@"; }
two() { # 2 workers on the one GPU (host backends only)
    if ((dry)); then bin ringrun --nproc-per-node 2 "$here/bin/ringtrain" "$@"
    else RINGTRAIN_CUDA_DEVICE=0 bin ringrun --nproc-per-node 2 "$here/bin/ringtrain" "$@"; fi
}
runs="$here/runs"
rm -rf "$runs"
mkdir -p "$runs"
data="$here/data/fashion-mnist"
cnn=(--config "$here/configs/fashion_mnist_cnn.yaml" --set "data.dir=$data" --set device=$dev
     --set train.max_steps=$(s 300) --set train.log_every_steps=$(s 50) --set checkpoint.enabled=false)
declare -A result
started=$(date +%s)

# py_json JSON KEY: a field of a JSON line ("" if it is not one)
py_json() { "$py" -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2" 2>/dev/null; }
metric() { # metric RUN_DIR KEY: the last epoch line's value
    "$py" -c "import json,sys; ls=[json.loads(l) for l in open('$1/metrics.jsonl')]; e=[l for l in ls if l['kind']=='epoch'][-1]; print(e['$2'])"
}
first_loss() { "$py" -c "import json; ls=[json.loads(l) for l in open('$1/metrics.jsonl') if '\"step\"' in l]; print(ls[0]['loss'])"; }
hash_of() { "$py" -c "import json; print(json.load(open('$1/ranks/rank0.json'))['param_hash'])"; }
falls() { "$py" -c "import sys; sys.exit(0 if float('$2') < float('$1') else 1)"; } # falls FIRST LAST
ratio() { "$py" -c "print(round(float('$1') / float('$2'), 3))"; }

echo "== (a) NCCL, CNN $(s 300) steps: loss falls; buckets overlap backward (trace)"
if bin ringtrain "${cnn[@]}" --set comm.backend=$nccl --run-dir "$runs/a" 2>&1 | tail -n 6; then
    f=$(first_loss "$runs/a"); l=$(metric "$runs/a" train_loss)
    # A shorter run with the trace: steps in which some bucket's collective was issued while
    # backward still ran. (Its own run, so the trace's cost stays out of (e)'s throughput.)
    bin ringtrain "${cnn[@]}" --set comm.backend=$nccl --set train.max_steps=$(s 50) --set train.trace=true \
        --run-dir "$runs/a-trace" >"$runs/a-trace.log" 2>&1
    ov=$("$py" - "$runs/a-trace/trace/merged.json" <<'PY' 2>/dev/null
import json, sys
ev = [e for e in json.load(open(sys.argv[1]))["traceEvents"] if e.get("ph") == "X" and e.get("pid") == 0]
bw = [e for e in ev if e["name"] == "backward"]
bk = [e for e in ev if e["name"].startswith("bucket")]
n = sum(any(b["ts"] >= w["ts"] and b["ts"] < w["ts"] + w["dur"] for b in bk) for w in bw)
print(f"{n} {len(bw)}")
PY
)
    read -r ovn ovm <<<"${ov:-0 0}"
    # The same run without overlap must end with the same bits. (At world size 1 a missed stream
    # wait cannot change a sum of one, so this checks the bucket copies and the step's order, not
    # NCCL's; the CPU tests check the deferred waits with fakes.)
    if bin ringtrain "${cnn[@]}" --set comm.backend=$nccl --set ddp.overlap=false --run-dir "$runs/a-serial" >"$runs/a-serial.log" 2>&1; then
        same=$([ "$(hash_of "$runs/a")" = "$(hash_of "$runs/a-serial")" ] && echo yes || echo no)
    else same="failed (see $runs/a-serial.log)"; fi
    if ! falls "$f" "$l"; then result[a]="FAIL loss did not fall ($f -> $l)"
    elif [ "$same" != yes ]; then result[a]="FAIL without overlap: $same"
    elif [ "${ovm:-0}" -eq 0 ] || [ $((ovn * 2)) -lt "$ovm" ]; then result[a]="FAIL no overlap: a bucket issued during backward in $ovn of $ovm steps"
    else result[a]="PASS loss $f -> $l, test_acc $(metric "$runs/a" test_acc); buckets issued during backward in $ovn of $ovm steps; = without overlap"; fi
else result[a]="FAIL"; fi

echo "== (b) 2 workers on one GPU, ring backend"
if two "${cnn[@]}" --set comm.backend=ring --set train.max_steps=$(s 100) --run-dir "$runs/b" 2>&1 | tail -n 3; then
    h0=$(hash_of "$runs/b"); h1=$("$py" -c "import json; print(json.load(open('$runs/b/ranks/rank1.json'))['param_hash'])")
    if [ "$h0" = "$h1" ]; then result[b]="PASS replicas identical ($h0)"; else result[b]="FAIL replicas differ: $h0 vs $h1"; fi
else result[b]="FAIL"; fi

# (c), (d): ringtrain and PyTorch DDP (world size 1) from the same initial weights and batches.
amp_steps=$(s 50)
amp=(--config "$here/configs/fashion_mnist_cnn.yaml" --set "data.dir=$data" --set device=$dev --set comm.backend=$nccl
     --set "data.normalize=null" --set train.batch_size=16 --set train.max_steps=$amp_steps --set train.log_every_steps=1
     --set train.eval=false --set checkpoint.enabled=false --set "model.init_from=$runs/init.safetensors")
"$py" "$here/reference/amp_ddp.py" "$runs/init.safetensors" - - --precision bf16 --write-init
amp_part() { # amp_part PART PRECISION [SCALER SETTINGS...]: compares with PyTorch, sets result[PART]
    local part=$1 prec=$2; shift 2
    local sets=() args=()
    while [ $# -gt 0 ]; do sets+=(--set "train.grad_scaler.$1=$2"); args+=("--${1//_/-}" "$2"); shift 2; done
    local dtype=BFloat16; [ "$prec" = fp16 ] && dtype=Half
    if ! bin ringtrain "${amp[@]}" --set train.precision=$prec ${sets[@]+"${sets[@]}"} --run-dir "$runs/$part" >"$runs/$part.log" 2>&1; then
        tail -n 5 "$runs/$part.log"; result[$part]="FAIL ringtrain (see $runs/$part.log)"; return; fi
    local seen; seen=$(grep -o "autocast on [A-Za-z]*[(0-9)]*: dtype [A-Za-z0-9]*" "$runs/$part.log" | head -n 1)
    if ! "$torchrun" --nproc-per-node 1 --master-port 29731 "$here/reference/amp_ddp.py" "$runs/init.safetensors" "$data" \
            "$runs/$part-ref.safetensors" --precision $prec --steps $amp_steps --batch-size 16 --device $dev \
            --trace "$runs/$part-ref.jsonl" ${args[@]+"${args[@]}"} >"$runs/$part-ref.log" 2>&1; then
        tail -n 5 "$runs/$part-ref.log"; result[$part]="FAIL PyTorch reference (see $runs/$part-ref.log)"; return; fi
    local cmp; cmp=$("$py" - "$here/reference" "$runs/$part" "$runs/$part-ref" <<'PY'
import json, sys
sys.path.insert(0, sys.argv[1])
import st
ours, theirs = st.load(sys.argv[2] + "/model.safetensors"), st.load(sys.argv[3] + ".safetensors")
w = max(float((ours[k].double() - theirs[k].double()).norm() / theirs[k].double().norm().clamp_min(1e-12)) for k in theirs)
a = [json.loads(l) for l in open(sys.argv[2] + "/metrics.jsonl") if '"kind":"step"' in l]
b = [json.loads(l) for l in open(sys.argv[3] + ".jsonl")]
loss = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b))
scales = [x.get("loss_scale") for x in a] == [y["loss_scale"] for y in b] if "loss_scale" in a[0] else None
skips = sum(y["skipped"] for y in b)
print(f"{w:.2e} {loss:.2e} {scales} {skips} {len(a)} {len(b)}")
PY
)
    local w l sc sk na nb; read -r w l sc sk na nb <<<"$cmp"
    local say="$seen; weights max rel diff ${w:-?}, loss ${l:-?} over $amp_steps steps"
    [ "$prec" = fp16 ] && say="$say; scales equal: ${sc:-?} ($sk skipped by GradScaler)"
    # GPU kernels differ in summation order between runs (cuDNN picks algorithms), so the weights
    # are compared loosely here; the CPU test compares them at 1e-6.
    if [ "$seen" = "${seen%"dtype $dtype"}" ]; then result[$part]="FAIL autocast dtype is not $dtype: '$seen'"
    elif [ -z "$cmp" ] || [ "$na" != "$nb" ]; then result[$part]="FAIL comparison ($cmp)"
    elif ! "$py" -c "import sys; sys.exit(0 if $w <= 2e-2 and $l <= 2e-2 else 1)"; then result[$part]="FAIL $say"
    elif [ "$prec" = fp16 ] && [ "$sc" != True ]; then result[$part]="FAIL $say"
    else result[$part]="PASS $say"; fi
}
echo "== (c) bf16 autocast against PyTorch's"
amp_part c bf16
echo "== (d) fp16 autocast + loss scaling against PyTorch's GradScaler"
amp_part d fp16 init_scale 1048576 growth_interval 3

echo "== (e) ringtrain vs PyTorch DDP, world size 1, batch 64"
pt=$("$torchrun" --nproc-per-node 1 --master-port 29732 "$here/reference/ddp_train.py" --model cnn --device $dev --max-steps $(s 300) \
        --data "$data" --normalize 2>"$runs/e-ref.log" | tail -n 1)
ps=$(py_json "$pt" samples_per_s)
if [ -z "$ps" ]; then tail -n 5 "$runs/e-ref.log"; result[e]="FAIL PyTorch reference (see $runs/e-ref.log)"
elif [ ! -f "$runs/a/metrics.jsonl" ]; then result[e]="FAIL (a) did not run"
else rt=$(metric "$runs/a" samples_per_s); result[e]="PASS ringtrain $rt vs PyTorch $ps samples/s: ratio $(ratio "$rt" "$ps")"; fi

echo "== (f) all-reduce, world size 1"
sizes=1M,4M,16M,64M,256M; ((dry)) && sizes=1M
if bin ringbench allreduce --backend $nccl --device $dev --sizes $sizes 2>&1 | tee "$runs/f.txt" | grep -v INFO; then
    result[f]="PASS ($(grep -c ' 0$' "$runs/f.txt") sizes, #wrong 0)"
else result[f]="FAIL"; fi

echo "== (g) GPT, bf16 with NCCL, against PyTorch"
gpt=(--config "$here/configs/gpt_fortunes.yaml" --set "data.dir=$here/data/fortunes" --set "data.prepare_from=[]" --set device=$dev
     --set comm.backend=$nccl --set train.precision=bf16 --set train.batch_size=$(b 64) --set train.max_steps=$(s 300)
     --set train.eval_every_steps=0 --set train.log_every_steps=$(s 50) --set checkpoint.enabled=false
     --set sample.max_new_tokens=$(s 100))
if bin ringtrain "${gpt[@]}" --run-dir "$runs/g" 2>&1 | tail -n 6; then
    rt=$(metric "$runs/g" tokens_per_s)
    pt=$(cd "$here/reference" && "$py" gpt_train.py --data "$here/data/fortunes" --device $dev --bf16 --batch-size $(b 64) \
            --max-steps $(s 300) 2>"$runs/g-ref.log" | tail -n 1)
    ps=$(py_json "$pt" tokens_per_s)
    f=$(first_loss "$runs/g"); l=$(metric "$runs/g" test_loss)
    if [ -z "$ps" ]; then tail -n 5 "$runs/g-ref.log"; result[g]="FAIL PyTorch reference (see $runs/g-ref.log)"
    elif ! falls "$f" "$l"; then result[g]="FAIL loss did not fall ($f -> val $l)"
    else result[g]="PASS loss $f -> val $l; ringtrain $rt vs PyTorch $ps tokens/s: ratio $(ratio "$rt" "$ps")"; fi
else result[g]="FAIL"; fi

echo "== (h) resume under NCCL, Adam, checkpoints on"
resume=(--config "$here/configs/fashion_mnist_cnn.yaml" --set "data.dir=$data" --set device=$dev --set train.batch_size=$(b 64)
        --set comm.backend=$nccl --set optimizer.name=adam --set optimizer.lr=0.001 --set train.eval=false
        --set checkpoint.every_steps=$(s 10))
if bin ringtrain "${resume[@]}" --set train.max_steps=$(s 60) --run-dir "$runs/h-whole" 2>&1 | tail -n 2 &&
   bin ringtrain "${resume[@]}" --set train.max_steps=$(s 30) --run-dir "$runs/h-resumed" 2>&1 | tail -n 2 &&
   bin ringtrain "${resume[@]}" --set train.max_steps=$(s 60) --run-dir "$runs/h-resumed" --resume auto 2>&1 | tail -n 2; then
    x=$(hash_of "$runs/h-whole"); y=$(hash_of "$runs/h-resumed")
    if [ "$x" = "$y" ]; then result[h]="PASS resumed = straight ($x)"; else result[h]="FAIL resumed $y vs straight $x"; fi
else result[h]="FAIL"; fi

echo "== (i) TorchScript module with NCCL, resume"
ts=(--config "$here/configs/fashion_mnist_cnn.yaml" --set "data.dir=$data" --set device=$dev --set train.batch_size=$(b 64)
    --set comm.backend=$nccl --set model.name=torchscript --set "model.path=$runs/bn.pt" --set train.eval=false
    --set train.log_every_steps=$(s 10) --set checkpoint.every_steps=$(s 10))
if "$py" "$here/reference/export_torchscript.py" "$here/reference/torchscript_ddp.py:BnTiedNet" --input-shape 2,1,28,28 \
        --out "$runs/bn.pt" | tail -n 2 &&
   bin ringtrain "${ts[@]}" --set train.max_steps=$(s 40) --run-dir "$runs/i-whole" 2>&1 | tail -n 2 &&
   bin ringtrain "${ts[@]}" --set train.max_steps=$(s 20) --run-dir "$runs/i-resumed" 2>&1 | tail -n 2 &&
   bin ringtrain "${ts[@]}" --set train.max_steps=$(s 40) --run-dir "$runs/i-resumed" --resume auto 2>&1 | tail -n 2; then
    x=$(hash_of "$runs/i-whole"); y=$(hash_of "$runs/i-resumed")
    if [ "$x" = "$y" ]; then result[i]="PASS loss $(first_loss "$runs/i-whole") -> $(metric "$runs/i-whole" train_loss); resumed = straight ($x)"
    else result[i]="FAIL resumed $y vs straight $x"; fi
else result[i]="FAIL"; fi

echo "== (j) ResNet-18 with augmentation, NCCL, bf16"
# The dry run trains it in fp32 and skips the 10,000-image evaluation: bf16 convolutions on the
# CPU take ~20x fp32's time here (the evaluation alone would run for half an hour, fp32 minutes),
# and (c) and (g) already run bf16.
jprec=bf16 jeval=true; ((dry)) && jprec=fp32 jeval=false
if bin ringtrain --config "$here/configs/fashion_mnist_resnet18.yaml" --set "data.dir=$data" --set device=$dev \
        --set comm.backend=$nccl --set train.precision=$jprec --set train.eval=$jeval --set train.batch_size=$(b 128) --set train.max_steps=$(s 200) \
        --set data.workers=2 --set train.log_every_steps=$(s 50) --set checkpoint.enabled=false --run-dir "$runs/j" 2>&1 | tail -n 3; then
    f=$(first_loss "$runs/j"); l=$(metric "$runs/j" train_loss)
    if falls "$f" "$l" || ((dry)); then
        result[j]="PASS loss $f -> $l, test_acc $(metric "$runs/j" test_acc), $(metric "$runs/j" samples_per_s) samples/s"
    else result[j]="FAIL loss did not fall ($f -> $l)"; fi
else result[j]="FAIL"; fi

echo "== (k) ZeRO-1 under NCCL, resume"
if bin ringtrain "${resume[@]}" --set optimizer.shard=true --set train.max_steps=$(s 30) --run-dir "$runs/k" 2>&1 | tail -n 2 &&
   bin ringtrain "${resume[@]}" --set optimizer.shard=true --set train.max_steps=$(s 60) --run-dir "$runs/k" --resume auto 2>&1 | tail -n 2; then
    x=$(hash_of "$runs/h-whole" 2>/dev/null); y=$(hash_of "$runs/k")
    if [ "$x" = "$y" ]; then result[k]="PASS sharded + resumed = unsharded straight ($x)"; else result[k]="FAIL sharded $y vs unsharded $x"; fi
else result[k]="FAIL"; fi

echo "== (l) ZeRO-1, ring backend, CUDA parameters, 2 workers on one GPU"
if two "${cnn[@]}" --set comm.backend=ring --set train.max_steps=$(s 100) --set optimizer.shard=true --run-dir "$runs/l" 2>&1 | tail -n 3; then
    x=$(hash_of "$runs/b" 2>/dev/null); y=$(hash_of "$runs/l")
    if [ "$x" = "$y" ]; then result[l]="PASS sharded = unsharded ($x)"; else result[l]="FAIL sharded $y vs unsharded $x"; fi
else result[l]="FAIL"; fi

echo "== (m) NCCL's device contract under the ring: 2 workers on one GPU, strict device check"
# RINGTRAIN_STRICT_DEVICE=1 wraps the ring in a backend that, like NCCL, refuses any tensor not on
# the model's device (src/comm/strict.rs): parameters, buffers and optimizer state broadcast,
# checkpoint save and resume, init_from, evaluation and the stop vote all go through it at world
# size 2, which NCCL itself cannot do on one GPU.
strict=(--config "$here/configs/fashion_mnist_cnn.yaml" --set "data.dir=$data" --set device=$dev --set train.batch_size=$(b 64)
        --set comm.backend=ring --set optimizer.name=adam --set optimizer.lr=0.001 --set checkpoint.every_steps=$(s 10)
        --set train.log_every_steps=$(s 10))
if two "${strict[@]}" --set train.max_steps=$(s 60) --run-dir "$runs/m-plain" 2>&1 | tail -n 2 &&
   RINGTRAIN_STRICT_DEVICE=1 two "${strict[@]}" --set train.max_steps=$(s 60) --run-dir "$runs/m-whole" 2>&1 | tail -n 2 &&
   RINGTRAIN_STRICT_DEVICE=1 two "${strict[@]}" --set train.max_steps=$(s 30) --run-dir "$runs/m-resumed" 2>&1 | tail -n 2 &&
   RINGTRAIN_STRICT_DEVICE=1 two "${strict[@]}" --set train.max_steps=$(s 60) --run-dir "$runs/m-resumed" --resume auto 2>&1 | tail -n 2 &&
   RINGTRAIN_STRICT_DEVICE=1 two "${strict[@]}" --set train.max_steps=$(s 10) --set "model.init_from=$runs/m-whole/model.safetensors" \
        --run-dir "$runs/m-init" 2>&1 | tail -n 2; then
    p=$(hash_of "$runs/m-plain"); x=$(hash_of "$runs/m-whole"); y=$(hash_of "$runs/m-resumed")
    if ! grep -q "strict device check" "$runs/m-whole/logs/rank0.log"; then result[m]="FAIL the strict check was not on"
    elif [ "$x" = "$y" ] && [ "$x" = "$p" ]; then result[m]="PASS strict = plain = resumed ($x); init_from ran"
    else result[m]="FAIL strict $x, resumed $y, plain $p"; fi
else result[m]="FAIL (a tensor off the device? see the log above)"; fi

echo "== (n) SimCLR: SyncBatchNorm and the differentiable all-gather on the GPU"
simclr=(--config "$here/configs/simclr_fashion_mnist.yaml" --set "data.dir=$data" --set device=$dev --set train.batch_size=$(b 64)
        --set train.max_steps=$(s 60) --set train.log_every_steps=$(s 10) --set train.eval_every_steps=0 --set train.eval_at_start=false
        --set model.probe_train_samples=$(s 5000) --set checkpoint.enabled=false)
if bin ringtrain "${simclr[@]}" --set comm.backend=$nccl --run-dir "$runs/n-nccl" 2>&1 | tail -n 2 &&
   two "${simclr[@]}" --set comm.backend=ring --set train.max_steps=$(s 20) --set train.eval=false --run-dir "$runs/n-two" 2>&1 | tail -n 2; then
    f=$(first_loss "$runs/n-nccl"); l=$(metric "$runs/n-nccl" train_loss)
    x=$(hash_of "$runs/n-two"); y=$("$py" -c "import json; print(json.load(open('$runs/n-two/ranks/rank1.json'))['param_hash'])")
    acc=$(metric "$runs/n-nccl" test_acc 2>/dev/null)
    if ! falls "$f" "$l" && ((!dry)); then result[n]="FAIL loss did not fall ($f -> $l)"
    elif ! "$py" -c "import sys; sys.exit(0 if float('$acc') > 0.1 else 1)" 2>/dev/null; then result[n]="FAIL no linear-probe accuracy above chance ('$acc')"
    elif [ "$x" != "$y" ]; then result[n]="FAIL the 2 workers' replicas differ ($x, $y)"
    else result[n]="PASS loss $f -> $l, probe test_acc $acc; 2 workers identical ($x)"; fi
else result[n]="FAIL"; fi

echo "== (o) ZeRO-2 and ZeRO-3 with activation checkpointing"
z=(--config "$here/configs/gpt_fortunes.yaml" --set "data.dir=$here/data/fortunes" --set "data.prepare_from=[]" --set device=$dev
   --set train.batch_size=$(b 16) --set train.max_steps=$(s 30) --set train.eval=false --set train.log_every_steps=$(s 10)
   --set checkpoint.enabled=false --set sample.max_new_tokens=0 --set model.dropout=0.1)
if bin ringtrain "${z[@]}" --set comm.backend=$nccl --run-dir "$runs/o-ddp" 2>&1 | tail -n 2 &&
   bin ringtrain "${z[@]}" --set comm.backend=$nccl --set ddp.shard=grads --set train.activation_checkpointing=true \
        --run-dir "$runs/o-z2" 2>&1 | tail -n 2 &&
   bin ringtrain "${z[@]}" --set comm.backend=$nccl --set ddp.shard=params --set train.activation_checkpointing=true \
        --run-dir "$runs/o-z3" 2>&1 | tail -n 2 &&
   two "${z[@]}" --set comm.backend=ring --set train.max_steps=$(s 10) --run-dir "$runs/o-two" 2>&1 | tail -n 2 &&
   two "${z[@]}" --set comm.backend=ring --set train.max_steps=$(s 10) --set ddp.shard=params --run-dir "$runs/o-two-z3" 2>&1 | tail -n 2; then
    close() { # close RUN_A RUN_B: "equal", or the largest relative difference of any tensor
        "$py" - "$1/model.safetensors" "$2/model.safetensors" <<'PY'
import json, struct, sys, torch
def load(path):  # safetensors by hand: the GPU machine's Python may lack the package
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n]); head.pop("__metadata__", None)
    kinds = {"F32": torch.float32, "I64": torch.int64}
    return {k: torch.frombuffer(bytearray(raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]), dtype=kinds[v["dtype"]])
            for k, v in head.items()}
a, b = load(sys.argv[1]), load(sys.argv[2])
d = max(float((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-12)) for k in a)
print("equal" if d == 0 else f"{d:.1e}")
PY
    }
    x=$(close "$runs/o-ddp" "$runs/o-z2"); y=$(close "$runs/o-ddp" "$runs/o-z3"); u=$(close "$runs/o-two" "$runs/o-two-z3")
    ok() { [ "$1" = equal ] || "$py" -c "import sys; sys.exit(0 if float('$1') <= 1e-3 else 1)"; }
    # ZeRO-3's gathers of the next unit ran on the prefetch thread (NCCL from a second thread).
    ahead=$(grep -ho "[0-9]* of them prefetched" "$runs/o-z3/logs/rank0.log" | cut -d' ' -f1)
    # Between steps the gathered copies are freed (device memory: storage freed): at world size 1
    # the shard is every parameter, so what is held must not exceed the parameters once.
    held=$(grep -ho "holds [0-9.]* MiB of the parameters' [0-9.]* MiB" "$runs/o-z3/logs/rank0.log" | tail -n 1 | awk '{print $2, $7}')
    freed=$("$py" -c "import sys; h, a = map(float, sys.argv[1:3]); print('yes' if h <= a * 1.01 else 'no')" $held 2>/dev/null)
    if ok "$x" && ok "$y" && [ "$u" = equal ] && [ "${ahead:-0}" -gt 0 ] && [ "$freed" = yes ]; then
        result[o]="PASS vs DDP: ZeRO-2 $x, ZeRO-3 $y (checkpointed, $ahead gathers prefetched, ${held% *} of ${held#* } MiB held between steps); 2 workers ZeRO-3 $u"
    else result[o]="FAIL vs DDP: ZeRO-2 $x, ZeRO-3 $y (checkpointed, ${ahead:-no} gathers prefetched, held ${held:-?} MiB); 2 workers ZeRO-3 $u"; fi
else result[o]="FAIL"; fi

echo "== (p) the YOLO detector on the GPU"
yolo=(--config "$here/configs/yolo_mosaic.yaml" --set "data.dir=$data" --set device=$dev --set train.batch_size=$(b 32)
      --set train.max_steps=$(s 300) --set train.log_every_steps=$(s 50) --set train.eval_every_steps=0 --set data.mosaic.test_images=200
      --set checkpoint.enabled=false)
if bin ringtrain "${yolo[@]}" --set comm.backend=$nccl --set train.precision=bf16 --run-dir "$runs/p-nccl" 2>&1 | tail -n 2 &&
   two "${yolo[@]}" --set comm.backend=ring --set train.max_steps=$(s 20) --set train.eval=false --run-dir "$runs/p-two" 2>&1 | tail -n 2; then
    f=$(first_loss "$runs/p-nccl"); l=$(metric "$runs/p-nccl" train_loss); m=$(metric "$runs/p-nccl" test_map50 2>/dev/null)
    x=$(hash_of "$runs/p-two"); y=$("$py" -c "import json; print(json.load(open('$runs/p-two/ranks/rank1.json'))['param_hash'])")
    if ! falls "$f" "$l"; then result[p]="FAIL loss did not fall ($f -> $l)"
    elif ((!dry)) && ! "$py" -c "import sys; sys.exit(0 if float('$m') > 0.05 else 1)" 2>/dev/null; then result[p]="FAIL mAP@0.5 '$m'"
    elif [ ! -s "$runs/p-nccl/predictions.png" ]; then result[p]="FAIL no predictions.png"
    elif [ "$x" != "$y" ]; then result[p]="FAIL the 2 workers' replicas differ ($x, $y)"
    else result[p]="PASS loss $f -> $l, mAP@0.5 $m, predictions.png; 2 workers identical ($x)"; fi
else result[p]="FAIL"; fi

echo
if ((dry)); then echo "DRY RUN on the CPU (ring for NCCL, a tenth of the steps): plumbing only, the figures mean nothing"; fi
echo "| part | result |"
echo "|---|---|"
status=0
for k in a b c d e f g h i j k l m n o p; do
    echo "| ($k) | ${result[$k]:-FAIL did not run} |"
    case "${result[$k]:-FAIL}" in FAIL*) status=1 ;; esac
done
echo "whole check: $(($(date +%s) - started)) s"
exit $status
