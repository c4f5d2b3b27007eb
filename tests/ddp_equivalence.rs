//! DDP semantics: 2 workers × batch B take the same steps as 1 worker × batch 2B on the same
//! samples (the sampler interleaves ranks, so the union of the two ranks' k-th batches is the
//! single worker's k-th batch), up to float summation order.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn two_workers_batch_b_equal_one_worker_batch_2b() {
    for (optimizer, shuffle) in [("{name: sgd, lr: 0.1, momentum: 0.9}", true), ("{name: sgd, lr: 0.05}", false)] {
        let dir = tempfile::tempdir().unwrap();
        let base = mlp_config(0, "").replace("optimizer: {name: sgd, lr: 0.1, momentum: 0.9}", &format!("optimizer: {optimizer}"));
        let job = |b: usize| base.replace("batch_size: 0", &format!("batch_size: {b}, max_steps: 20, shuffle: {shuffle}"));
        let two = dir.path().join("two");
        run(ringrun(2, &write_config(dir.path(), "b8.yaml", &job(8)), &two, &[]), Duration::from_secs(120)).assert_success();
        let one = dir.path().join("one");
        let mut c = Command::new(RINGTRAIN);
        c.arg("--config").arg(write_config(dir.path(), "b16.yaml", &job(16))).arg("--run-dir").arg(&one);
        run(c, Duration::from_secs(120)).assert_success();

        let (p2, p1) = (load_params(&two), load_params(&one));
        let rel = max_relative_difference(&p2, &p1);
        assert!(rel <= 1e-5, "optimizer {optimizer}: relative difference {rel:e}");
        // And training did move the parameters (the comparison is not vacuous).
        let dir0 = tempfile::tempdir().unwrap();
        let mut c = Command::new(RINGTRAIN);
        c.arg("--config")
            .arg(write_config(dir0.path(), "b16.yaml", &job(16).replace("max_steps: 20", "max_steps: 1")))
            .arg("--run-dir")
            .arg(dir0.path());
        run(c, Duration::from_secs(120)).assert_success();
        assert!(max_relative_difference(&load_params(dir0.path()), &p1) > 1e-3);
    }
}

#[test]
fn overlapping_communication_with_backward_changes_no_bits() {
    let dir = tempfile::tempdir().unwrap();
    // Small buckets, so several all-reduces run while backward is still going.
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(8, "ddp: {bucket_cap_mb: 0.0005, first_bucket_cap_mb: 0.0001}"));
    let mut hashes = Vec::new();
    for overlap in [false, true] {
        let run_dir = dir.path().join(format!("overlap-{overlap}"));
        let set = format!("ddp.overlap={overlap}");
        let out = run(ringrun(2, &cfg, &run_dir, &["--set", &set, "--set", "train.trace=true"]), Duration::from_secs(120));
        out.assert_success();
        assert!(out.stderr.contains("3 bucket(s)"), "{}", out.report());
        hashes.push(rank_hashes(&run_dir, 2));
        // The timeline shows each bucket's all-reduce.
        let trace = std::fs::read_to_string(run_dir.join("trace/rank0.json")).unwrap();
        assert!(trace.contains("\"bucket 2\""), "no bucket events in the trace");
    }
    assert_eq!(hashes[0], hashes[1]);
}

/// (start, end) of every event called `name` in a rank's timeline.
fn spans(run_dir: &std::path::Path, name: &str) -> Vec<(f64, f64)> {
    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("trace/rank0.json")).unwrap()).unwrap();
    trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == name)
        .map(|e| (e["ts"].as_f64().unwrap(), e["ts"].as_f64().unwrap() + e["dur"].as_f64().unwrap()))
        .collect()
}

#[test]
fn with_overlap_the_first_bucket_is_reduced_while_backward_still_runs() {
    // The reference CNN (backward takes milliseconds) with small buckets: the last layers'
    // gradients (bucket 0) are ready long before backward ends.
    let dir = tempfile::tempdir().unwrap();
    let job = "model: {name: cnn}
data: {format: synthetic, synthetic: {train_samples: 640, test_samples: 64, shape: [1, 28, 28], classes: 10, seed: 1}}
train: {max_steps: 30, batch_size: 16, eval: false, trace: true}
optimizer: {name: sgd, lr: 0.01}
ddp: {bucket_cap_mb: 0.5, first_bucket_cap_mb: 0.1}
comm: {timeout_secs: 30}
";
    let cfg = write_config(dir.path(), "job.yaml", job);
    for overlap in [true, false] {
        let run_dir = dir.path().join(format!("overlap-{overlap}"));
        let out = run(ringrun(2, &cfg, &run_dir, &["--set", &format!("ddp.overlap={overlap}")]), Duration::from_secs(120));
        out.assert_success();
        let (backward, bucket0) = (spans(&run_dir, "backward"), spans(&run_dir, "bucket 0"));
        assert_eq!(bucket0.len(), 30, "{}", out.report());
        let during = bucket0.iter().filter(|(start, _)| backward.iter().any(|(b0, b1)| start > b0 && start < b1)).count();
        if overlap {
            assert!(during >= 24, "overlap did not engage: {during} of 30 bucket-0 all-reduces began during backward");
        } else {
            assert_eq!(during, 0, "without overlap no all-reduce may begin during backward");
        }
    }
}
