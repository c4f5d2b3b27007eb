//! The main job's config on the real Fashion-MNIST files (Debian's dataset-fashion-mnist, which
//! scripts/setup.sh installs), shortened to 100 steps: the data path, the CNN and the ring work
//! together and learn.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

#[test]
fn reference_cnn_learns_fashion_mnist_with_two_workers() {
    let data = Path::new("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz");
    assert!(data.is_file(), "{} missing: run scripts/setup.sh", data.display());
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/fashion_mnist_cnn.yaml");
    let out = run(ringrun(2, &cfg, &run_dir, &["--set", "train.max_steps=100"]), Duration::from_secs(300));
    out.assert_success();
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let epoch: serde_json::Value =
        metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|v| v["kind"] == "epoch").unwrap();
    let acc = epoch["test_acc"].as_f64().unwrap();
    // 100 steps of 2×64 samples reach ~80% here; chance is 10%.
    assert!(acc > 0.70, "test accuracy {acc} after 100 steps\n{}", out.report());
    assert_eq!(epoch["steps"], 100);
    let hashes = rank_hashes(&run_dir, 2);
    assert_eq!(hashes[0], hashes[1]);
}
