//! The self-supervised and generative workloads on the real Fashion-MNIST files: SimCLR
//! (contrastive pretraining with negatives from every rank, SyncBatchNorm, a linear probe) and
//! MADE (binary autoregressive density), each through ringrun with two workers, from the configs
//! users run, shortened.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const FMNIST: &str = "/usr/share/datasets/fashion-mnist";

fn config(name: &str) -> PathBuf {
    let data = Path::new(FMNIST).join("train-images-idx3-ubyte.gz");
    assert!(data.is_file(), "{} missing: run scripts/setup.sh", data.display());
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs").join(name)
}

fn last_epoch(run_dir: &Path) -> serde_json::Value {
    metrics_lines(run_dir, "epoch").pop().expect("an epoch line in metrics.jsonl")
}

#[test]
fn simclr_pretrains_with_two_workers_and_a_linear_probe_reports_accuracy_before_and_after() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    // A narrow encoder, few steps and a small probe: the pieces together, not the accuracy
    // (the config's own figures are in the README).
    let sets = [
        "model.width=4",
        "model.proj_dim=16",
        "train.max_steps=4",
        "train.batch_size=16",
        "model.probe_train_samples=600",
        "model.probe_steps=30",
        "checkpoint.every_steps=0",
        "train.log_every_steps=1",
    ];
    let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", *s]).collect();
    let out = run(ringrun(2, &config("simclr_fashion_mnist.yaml"), &run_dir, &args), Duration::from_secs(600));
    out.assert_success();
    let start = metrics_lines(&run_dir, "eval");
    assert_eq!(start.len(), 1, "eval_at_start: one evaluation before training\n{}", out.report());
    assert_eq!(start[0]["global_step"], 0);
    let end = last_epoch(&run_dir);
    for (what, v) in [("at start", &start[0]), ("at the end", &end)] {
        let acc = v["test_acc"].as_f64().unwrap();
        // Ten classes: chance is 10%; even four steps' features probe far above it.
        assert!(acc > 0.3 && acc <= 1.0, "probe accuracy {what} {acc}\n{}", out.report());
        assert!(v["test_probe_loss"].as_f64().unwrap().is_finite());
    }
    // Every test image is scored once.
    assert_eq!(start[0]["samples"], 10_000);
    // The training loss is NT-Xent over 2·32 views: it starts near ln(63).
    let first = metrics_lines(&run_dir, "step")[0]["loss"].as_f64().unwrap();
    assert!((first - 63f64.ln()).abs() < 1.0, "first NT-Xent loss {first}");
    let hashes = rank_hashes(&run_dir, 2);
    assert_eq!(hashes[0], hashes[1], "replicas diverged");
    let names: Vec<String> = load_params(&run_dir).into_iter().map(|(n, _)| n).collect();
    for want in
        ["encoder.conv1.weight", "encoder.layer4.1.bn2.running_var", "projector.0.weight", "projector.1.running_mean", "projector.3.bias"]
    {
        assert!(names.iter().any(|n| n == want), "{want} missing from model.safetensors: {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("encoder.fc")), "the encoder has no classifier");
    assert!(run_dir.join("plot.png").is_file());
}

/// pytorch-made's module on the saved weights: (mean test NLL in nats, images).
fn pytorch_nll(py: &str, weights: &Path, hidden: &str) -> (f64, usize) {
    let mut c = Command::new(py);
    c.arg(script("reference/made_reference.py")).arg(weights).arg(FMNIST).arg("--hidden").arg(hidden);
    let o = run(c, Duration::from_secs(120));
    o.assert_success();
    let words: Vec<&str> = o.stdout.split_whitespace().collect();
    assert_eq!((words[0], words[2]), ("nll", "images"), "{}", o.report());
    (words[1].parse().unwrap(), words[3].parse().unwrap())
}

#[test]
fn made_reports_the_test_nll_pytorch_computes_on_its_checkpoint_and_writes_samples() {
    let Some(py) = python_with_torch("made_reports_the_test_nll_pytorch_computes_on_its_checkpoint_and_writes_samples") else { return };
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let sets = ["--set", "model.hidden=[64]", "--set", "train.max_steps=150", "--set", "train.epochs=1"];
    let out = run(ringrun(2, &config("made_fashion_mnist.yaml"), &run_dir, &sets), Duration::from_secs(300));
    out.assert_success();
    let end = last_epoch(&run_dir);
    let ours = end["test_loss"].as_f64().unwrap();
    let (theirs, images) = pytorch_nll(&py, &run_dir.join("model.safetensors"), "64");
    assert_eq!(images, 10_000);
    assert!((ours - theirs).abs() <= 1e-5 * theirs, "ringtrain's test NLL {ours} nats, PyTorch's on the saved model {theirs}");
    // Uniform pixels cost 784·ln 2 ≈ 543 nats; 150 steps learn far better than that.
    assert!(ours < 350.0, "test NLL {ours} nats after 150 steps");
    let bpp = end["test_bits_per_pixel"].as_f64().unwrap();
    assert!((bpp - ours / 784.0 / std::f64::consts::LN_2).abs() < 1e-9);
    // 64 samples, 8 × 8 tiles of 28 px with 2 px gutters; not blank.
    let img = image::open(run_dir.join("samples.png")).expect("samples.png").to_luma8();
    assert_eq!(img.dimensions(), (8 * 30 + 2, 8 * 30 + 2));
    let white = img.pixels().filter(|p| p.0[0] == 255).count();
    assert!(white > 64 * 20, "samples have only {white} white pixels");
    assert!(out.stdout.contains("test_loss"), "the final line shows the NLL:\n{}", out.stdout);
}

#[test]
fn made_on_normalised_pixels_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let sets = ["--set", "data.normalize=[0.286, 0.353]", "--set", "train.max_steps=5"];
    let out = run(ringrun(2, &config("made_fashion_mnist.yaml"), &run_dir, &sets), Duration::from_secs(120));
    out.assert_failure();
    assert!(out.stderr.contains("remove data.normalize"), "{}", out.report());
    assert!(!run_dir.join("model.safetensors").exists());
}
