//! The detector end to end: `model: {name: yolo}` on `data.format: mosaic` (Debian's
//! Fashion-MNIST files) trains with identical replicas, resumes mid-epoch bitwise, reports mAP
//! and draws its predictions; its forward pass and loss equal the same architecture in PyTorch
//! (scripts/reference/yolo_reference.py) loaded strictly from its checkpoint.

mod common;
use common::*;
use ringtrain::detect::detection_loss;
use ringtrain::models::yolo::{anchor_points, Yolo, YoloSpec};
use ringtrain::models::Model;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tch::{Kind, Tensor};

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

/// 64 × 64 mosaics, a narrow model: 6 steps an epoch at 2 ranks of 8.
fn job(extra: &str) -> String {
    format!(
        "model: {{name: yolo, width: 4}}
data: {{format: mosaic, dir: {FASHION}, mosaic: {{canvas: 64, scale: [10, 40], train_images: 96, test_images: 24}}}}
train: {{epochs: 2, batch_size: 8, seed: 3, shuffle: true, log_every_steps: 2}}
optimizer: {{name: adamw, lr: 0.003}}
checkpoint: {{every_steps: 5}}
comm: {{timeout_secs: 60}}
{extra}"
    )
}

#[test]
fn a_detector_trains_with_identical_replicas_reports_map_and_resumes_mid_epoch_bitwise() {
    assert!(Path::new(FASHION).join("train-images-idx3-ubyte.gz").is_file(), "{FASHION} missing: run scripts/setup.sh");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &job(""));
    let straight = dir.path().join("straight");
    let out = run(ringrun(2, &cfg, &straight, &[]), Duration::from_secs(300));
    out.assert_success();
    let expected = rank_hashes(&straight, 2);
    assert_eq!(expected[0], expected[1], "the replicas differ\n{}", out.report());
    let epochs = metrics_lines(&straight, "epoch");
    assert_eq!(epochs.len(), 2);
    for e in &epochs {
        let (m50, m) = (e["test_map50"].as_f64().unwrap(), e["test_map"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&m50) && (0.0..=m50).contains(&m), "mAP@0.5 {m50}, mAP {m}: {e}");
        assert!(e["test_loss"].as_f64().unwrap().is_finite(), "{e}");
    }
    assert!(out.stderr.contains("test_map50"), "{}", out.report());
    let png = std::fs::read(straight.join("predictions.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG", "predictions.png is a PNG");
    assert!(straight.join("plot.png").is_file());

    // Stopped mid-epoch (step 4 of 6) and at the second epoch's step 3, then resumed.
    for stop_at in [4u64, 9] {
        let run_dir = dir.path().join(format!("stop-{stop_at}"));
        let max = format!("train.max_steps={stop_at}");
        run(ringrun(2, &cfg, &run_dir, &["--set", &max]), Duration::from_secs(300)).assert_success();
        let out = run(ringrun(2, &cfg, &run_dir, &["--resume", "auto"]), Duration::from_secs(300));
        out.assert_success();
        assert!(out.stderr.contains(&format!("global step {stop_at}")), "{}", out.report());
        assert_eq!(rank_hashes(&run_dir, 2), expected, "stopped at {stop_at}\n{}", out.report());
    }
}

/// A batch of 3 images of 64 × 64 whose boxes fall on every map (sides 10 and 30 on stride 8,
/// 30 and 50 on 16, 50 on 32), one image without boxes; `most` 3 with padding rows.
fn fixed_batch() -> (Tensor, Tensor) {
    tch::manual_seed(11);
    let x = Tensor::rand([3, 1, 64, 64], (Kind::Float, tch::Device::Cpu));
    let pad = [-1.0f32, 0.0, 0.0, 0.0, 0.0];
    let rows: Vec<[f32; 5]> = vec![
        [3.0, 4.0, 6.0, 14.0, 16.0],
        [7.0, 20.0, 25.0, 50.0, 45.0],
        [1.0, 8.0, 10.0, 58.0, 54.0],
        [9.0, 30.0, 2.0, 40.0, 12.0],
        pad,
        pad,
        pad,
        pad,
        pad,
    ];
    let flat: Vec<f32> = rows.concat();
    (x, Tensor::from_slice(&flat).view([3, 3, 5]))
}

/// ringtrain's forward pass and loss for `weights`, and PyTorch's from the same file.
fn compare(py: &str, spec: &YoloSpec, weights: &Path, dir: &Path, flags: &[&str]) {
    let (x, target) = fixed_batch();
    let batch = dir.join("batch.safetensors");
    Tensor::write_safetensors(&[("x", &x), ("target", &target)], &batch).unwrap();
    let out = dir.join("reference.safetensors");
    let mut c = Command::new(py);
    c.arg(script("reference/yolo_reference.py")).arg("check").arg(weights).arg(&batch).arg(&out);
    c.args(["--width", &spec.width.to_string(), "--classes", "10", "--channels", "1"]).args(flags);
    let o = run(c, Duration::from_secs(120));
    o.assert_success();
    assert!(o.stdout.starts_with("ok "), "{}", o.report());
    let reference = Tensor::read_safetensors(&out).unwrap();
    let get = |n: &str| reference.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();

    let m = Yolo::new(spec, 1, 10, None, tch::Device::Cpu).unwrap();
    let state: Vec<(String, Tensor)> =
        m.named_parameters().iter().chain(m.named_buffers()).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let loaded = Tensor::read_safetensors(weights).unwrap();
    assert_eq!(state.len(), loaded.len(), "the file holds exactly the model's tensors");
    tch::no_grad(|| ringtrain::checkpoint::copy_into(&state, &loaded, weights)).unwrap();
    let rel = |a: &Tensor, b: &Tensor| (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-12);
    let eval = tch::no_grad(|| m.forward_t(&x, false)).unwrap();
    assert!(rel(&eval, &get("eval")) < 1e-5, "{flags:?}: eval output differs by {}", rel(&eval, &get("eval")));
    let train = m.forward_t(&x, true).unwrap();
    assert!(rel(&train, &get("train")) < 1e-5, "{flags:?}: train output differs by {}", rel(&train, &get("train")));
    let loss = detection_loss(&train, &anchor_points(64, 64, tch::Device::Cpu).unwrap(), &target).unwrap();
    for (name, t) in [("loss", &loss.total), ("giou", &loss.giou), ("objectness", &loss.objectness), ("classes", &loss.classes)] {
        let (mine, theirs) = (t.double_value(&[]), get(name).double_value(&[]));
        assert!((mine - theirs).abs() <= 1e-5 * theirs.abs().max(1e-3), "{flags:?}: {name} {mine} vs PyTorch {theirs}");
        assert!(mine > 0.0, "{name} is {mine}");
    }
    let stats = m.named_buffers().iter().find(|(n, _)| n == "backbone.stem.bn.running_var").unwrap().1.shallow_clone();
    assert!(rel(&stats, &get("stem.running_var")) < 1e-5, "{flags:?}: BatchNorm's running statistics differ");
}

#[test]
fn the_detector_and_its_loss_equal_pytorch_loaded_strictly_from_the_checkpoint() {
    let Some(py) = python_with_torch_and("the_detector_and_its_loss_equal_pytorch_loaded_strictly_from_the_checkpoint", "torchvision")
    else {
        return;
    };
    assert!(Path::new(FASHION).join("train-images-idx3-ubyte.gz").is_file(), "{FASHION} missing: run scripts/setup.sh");
    let dir = tempfile::tempdir().unwrap();
    // Trained weights (BatchNorm statistics moved off their start) from a 2-rank run.
    let cfg = write_config(dir.path(), "job.yaml", &job("").replace("epochs: 2", "max_steps: 3"));
    let run_dir = dir.path().join("run");
    run(ringrun(2, &cfg, &run_dir, &[]), Duration::from_secs(300)).assert_success();
    let spec = YoloSpec { width: 4, spp: true, fpn: true, pan: true, sync_batchnorm: false };
    compare(&py, &spec, &run_dir.join("model.safetensors"), dir.path(), &[]);

    // The ablations' architectures too, from freshly built weights.
    for (spec, flags) in [
        (YoloSpec { width: 4, spp: false, fpn: true, pan: false, sync_batchnorm: false }, vec!["--no-spp", "--no-pan"]),
        (YoloSpec { width: 4, spp: true, fpn: false, pan: false, sync_batchnorm: false }, vec!["--no-fpn", "--no-pan"]),
    ] {
        tch::manual_seed(5);
        let m = Yolo::new(&spec, 1, 10, None, tch::Device::Cpu).unwrap();
        let weights = dir.path().join("fresh.safetensors");
        let all: Vec<(String, Tensor)> =
            m.named_parameters().iter().chain(m.named_buffers()).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        Tensor::write_safetensors(&all, &weights).unwrap();
        compare(&py, &spec, &weights, dir.path(), &flags);
    }
}
