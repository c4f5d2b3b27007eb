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
