//! The `ringtrain` loop's training kit with real worker processes: gradient accumulation,
//! AdamW with parameter groups, the warmup-cosine schedule, clipping, and exact resume of all
//! of them together.

mod common;
use common::*;
use std::time::Duration;

/// 1,200 samples: batch 10 at 2 ranks is 60 batches per rank per epoch.
fn job(train: &str, optimizer: &str) -> String {
    format!(
        "model: {{name: mlp, hidden: [32, 16]}}
data: {{format: synthetic, synthetic: {{train_samples: 1200, test_samples: 300, shape: [12], classes: 3, seed: 5}}}}
train: {{seed: 7, log_every_steps: 5, {train}}}
optimizer: {optimizer}
comm: {{timeout_secs: 20}}
"
    )
}

#[test]
fn two_workers_accumulating_two_micro_batches_equal_one_worker_with_four_times_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let sgd = "{name: sgd, lr: 0.05, momentum: 0.9}";
    let accum = write_config(dir.path(), "accum.yaml", &job("epochs: 1, batch_size: 10, grad_accum_steps: 2", sgd));
    let big = write_config(dir.path(), "big.yaml", &job("epochs: 1, batch_size: 40", sgd));
    let (a, b) = (dir.path().join("accum"), dir.path().join("big"));
    let out = run(ringrun(2, &accum, &a, &[]), Duration::from_secs(120));
    out.assert_success();
    run(ringrun(1, &big, &b, &[]), Duration::from_secs(120)).assert_success();
    assert_eq!(rank_hashes(&a, 2)[0], rank_hashes(&a, 2)[1], "replicas differ");
    let diff = max_relative_difference(&load_params(&a), &load_params(&b));
    assert!(diff <= 1e-5, "2 workers × 2 micro-batches × 10 vs 1 worker × 40: relative difference {diff:e}\n{}", out.report());
    // 30 optimizer steps of 2 micro-batches each, in both.
    let steps = |d: &std::path::Path| -> u64 {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("ranks/rank0.json")).unwrap()).unwrap();
        v["global_steps"].as_u64().unwrap()
    };
    assert_eq!((steps(&a), steps(&b)), (30, 30));
    // Without the accumulation the same data gives different weights: the comparison can fail.
    let single = write_config(dir.path(), "single.yaml", &job("epochs: 1, batch_size: 10", sgd));
    let c = dir.path().join("single");
    run(ringrun(2, &single, &c, &[]), Duration::from_secs(120)).assert_success();
    assert!(max_relative_difference(&load_params(&c), &load_params(&b)) > 1e-3);
}

const FULL_KIT: &str = "{name: adamw, lr: 0.01, betas: [0.9, 0.95], weight_decay: 0.1, weight_decay_1d: false, \
                        schedule: {name: warmup_cosine, warmup_steps: 5, decay_steps: 40, min_lr: 0.001}}";

#[test]
fn resume_with_adamw_schedule_accumulation_and_clipping_is_bitwise_exact() {
    let dir = tempfile::tempdir().unwrap();
    // 60 batches per rank per epoch in steps of 3: 20 optimizer steps per epoch, 40 in all.
    let train = "epochs: 2, batch_size: 10, grad_accum_steps: 3, clip_grad_norm: 0.5";
    let cfg = write_config(dir.path(), "job.yaml", &format!("{}checkpoint: {{every_steps: 4}}\n", job(train, FULL_KIT)));
    let reference = dir.path().join("reference");
    let out = run(ringrun(2, &cfg, &reference, &[]), Duration::from_secs(120));
    out.assert_success();
    let expected = rank_hash(&reference, 0);
    assert_eq!(rank_hash(&reference, 1), expected);
    // The metrics carry the schedule's learning rate and the clipped gradient norm.
    let metrics = std::fs::read_to_string(reference.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> =
        metrics.lines().map(|l| serde_json::from_str(l).unwrap()).filter(|v: &serde_json::Value| v["kind"] == "step").collect();
    let at = |g: u64| steps.iter().find(|v| v["global_step"] == g).unwrap_or_else(|| panic!("no step line for {g}\n{metrics}"));
    // lr of optimizer step 4 (0-based; logged after it as global_step 5): nanoGPT's warmup 0.01·5/6.
    assert!((at(5)["lr"].as_f64().unwrap() - 0.01 * 5.0 / 6.0).abs() < 1e-12, "{metrics}");
    assert!(at(5)["grad_norm"].as_f64().unwrap() > 0.0, "{metrics}");
    for stop_at in [3u64, 20, 27] {
        let run_dir = dir.path().join(format!("stop-{stop_at}"));
        let max = format!("train.max_steps={stop_at}");
        run(ringrun(2, &cfg, &run_dir, &["--set", &max]), Duration::from_secs(120)).assert_success();
        let out = run(ringrun(2, &cfg, &run_dir, &["--resume", "auto"]), Duration::from_secs(120));
        out.assert_success();
        assert!(out.stderr.contains(&format!("global step {stop_at}")), "{}", out.report());
        assert_eq!(rank_hashes(&run_dir, 2), vec![expected.clone(), expected.clone()], "stopped at {stop_at}\n{}", out.report());
    }
}
