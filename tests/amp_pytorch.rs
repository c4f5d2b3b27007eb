//! `train.precision: bf16 | fp16` against PyTorch DDP with CPU autocast (torchrun + gloo,
//! scripts/reference/amp_ddp.py): the reference CNN from the same weights, data, sampler, batch
//! and optimizer; the same weights after N steps, and for fp16 the same sequence of loss scales
//! and skipped steps as torch.amp.GradScaler on a run that overflows on purpose.
//! Runs where a Python with torch is found (`scripts/setup.sh --python` provides one).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";
const STEPS: usize = 12;

fn python(py: &str, args: &[&str]) -> Output {
    let mut c = Command::new(py);
    c.args(args).env("OMP_NUM_THREADS", "1");
    run(c, Duration::from_secs(300))
}

/// The reference CNN's initial weights, drawn by PyTorch (seed 0), for both sides.
fn initial_weights(py: &str, dir: &Path) -> PathBuf {
    let init = dir.join("init.safetensors");
    let s = script("reference/amp_ddp.py");
    python(py, &[s.to_str().unwrap(), init.to_str().unwrap(), "-", "-", "--precision", "bf16", "--write-init"]).assert_success();
    init
}

/// (final parameters, per-step metrics) of ringtrain and of PyTorch for one setting.
fn both(py: &str, dir: &Path, precision: &str, scaler: &[(&str, &str)]) -> (f64, Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let init = initial_weights(py, dir);
    let scaler_yaml: Vec<String> = scaler.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let cfg = write_config(
        dir,
        &format!("{precision}.yaml"),
        &format!(
            "model: {{name: cnn, init_from: {}}}
data: {{format: idx, dir: {FASHION_MNIST}}}
train: {{max_steps: {STEPS}, batch_size: 16, seed: 0, log_every_steps: 1, eval: false, plot: false, tensorboard: false,
        precision: {precision}, grad_scaler: {{{}}}}}
optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}
comm: {{timeout_secs: 120}}
",
            init.display(),
            scaler_yaml.join(", ")
        ),
    );
    let run_dir = dir.join(format!("run-{precision}"));
    let mut c = ringrun(2, &cfg, &run_dir, &[]);
    c.env("OMP_NUM_THREADS", "1");
    let out = run(c, Duration::from_secs(300));
    out.assert_success();
    let hashes = rank_hashes(&run_dir, 2);
    assert_eq!(hashes[0], hashes[1], "{precision}: replicas differ");

    let reference = dir.join(format!("reference-{precision}.safetensors"));
    let trace = dir.join(format!("trace-{precision}.jsonl"));
    let port = free_port().to_string();
    let s = script("reference/amp_ddp.py");
    let mut args: Vec<String> =
        ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", &port].iter().map(|s| s.to_string()).collect();
    args.extend([s.display().to_string(), init.display().to_string(), FASHION_MNIST.into(), reference.display().to_string()]);
    args.extend([
        "--precision".into(),
        precision.into(),
        "--steps".into(),
        STEPS.to_string(),
        "--trace".into(),
        trace.display().to_string(),
    ]);
    for (k, v) in scaler {
        args.push(format!("--{}", k.replace('_', "-")));
        args.push(v.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    python(py, &args).assert_success();

    let ours = load_params(&run_dir);
    let mut theirs = tch::Tensor::read_safetensors(&reference).unwrap();
    theirs.sort_by(|a, b| a.0.cmp(&b.0));
    let diff = max_relative_difference(&ours, &theirs);
    let theirs_steps: Vec<serde_json::Value> =
        std::fs::read_to_string(&trace).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (diff, metrics_lines(&run_dir, "step"), theirs_steps)
}

/// Loss of step i (1-based) in both traces, within `tol` relative.
fn assert_losses_match(precision: &str, ours: &[serde_json::Value], theirs: &[serde_json::Value], tol: f64) {
    assert_eq!(ours.len(), STEPS, "{precision}: one step line per step");
    for (o, t) in ours.iter().zip(theirs) {
        let (a, b) = (o["loss"].as_f64().unwrap(), t["loss"].as_f64().unwrap());
        assert!((a - b).abs() <= tol * b.abs(), "{precision} step {}: loss {a} here, {b} in PyTorch", t["step"]);
    }
}

/// bf16 autocast on the CPU, against `torch.autocast("cpu", dtype=torch.bfloat16)`: both sides run
/// libtorch's CPU kernels on the same bf16 casts (autocast's op lists are libtorch's own), and a
/// two-rank sum is the same in any order, so the weights agree to f32 rounding.
#[test]
fn bf16_autocast_trains_as_pytorch_cpu_autocast() {
    let Some(py) = python_with_torch("bf16_autocast_trains_as_pytorch_cpu_autocast") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (diff, ours, theirs) = both(&py, dir.path(), "bf16", &[]);
    eprintln!("bf16 vs PyTorch CPU autocast: max relative difference {diff:e} after {STEPS} steps");
    assert!(diff <= 1e-6, "{diff}");
    assert_losses_match("bf16", &ours, &theirs, 1e-6);
}

/// fp16 with the scaler started too high (2^20) and a growth interval of 3: the first steps
/// overflow and are skipped while the scale backs off, then it grows after 3 clean steps and
/// overflows again (PyTorch: skips at steps 1, 2, 7, 11 on this data). The scales and skips must be GradScaler's, step for step, and the weights equal.
#[test]
fn fp16_with_loss_scaling_overflows_backs_off_and_grows_as_gradscaler() {
    let Some(py) = python_with_torch("fp16_with_loss_scaling_overflows_backs_off_and_grows_as_gradscaler") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (diff, ours, theirs) = both(&py, dir.path(), "fp16", &[("init_scale", "1048576"), ("growth_interval", "3")]);
    eprintln!("fp16 vs PyTorch CPU autocast + GradScaler: max relative difference {diff:e} after {STEPS} steps");
    let scales = |v: &[serde_json::Value]| v.iter().map(|s| s["loss_scale"].as_f64().unwrap()).collect::<Vec<_>>();
    assert_eq!(scales(&ours), scales(&theirs), "loss scale after each step");
    let mut skipped = 0u64;
    let theirs_skipped: Vec<u64> = theirs
        .iter()
        .map(|t| {
            skipped += u64::from(t["skipped"].as_bool().unwrap());
            skipped
        })
        .collect();
    let ours_skipped: Vec<u64> = ours.iter().map(|s| s["skipped_steps"].as_u64().unwrap()).collect();
    assert_eq!(ours_skipped, theirs_skipped, "skipped steps so far, after each step");
    assert!(skipped >= 2 && skipped < STEPS as u64, "the run must overflow and recover: {skipped} skipped");
    assert!(diff <= 1e-6, "{diff}");
    assert_losses_match("fp16", &ours, &theirs, 1e-6);
}
