//! Seeing a run: TensorBoard event files read back by TensorBoard's own reader (where a Python
//! with `tensorboard` is found), plots, the merged timeline, ringrun's status line.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// TensorBoard's EventAccumulator over `<run>/tb`: `{tag: [(step, value), …]}`.
fn read_tensorboard(python: &str, run_dir: &Path) -> serde_json::Value {
    let script = format!(
        "import json\n\
         from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
         acc = EventAccumulator('{}', size_guidance={{'scalars': 0}})\n\
         acc.Reload()\n\
         print(json.dumps({{t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()['scalars']}}))",
        run_dir.join("tb").display()
    );
    let mut c = Command::new(python);
    c.args(["-c", &script]);
    let out = run(c, Duration::from_secs(120));
    out.assert_success();
    serde_json::from_str(out.stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn tensorboard_reads_the_scalars_of_a_run_and_of_its_resumption_once() {
    let Some(python) = python_with_torch("tensorboard_reads_the_scalars") else { return };
    if !Command::new(&python).args(["-c", "import tensorboard"]).output().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED tensorboard_reads_the_scalars: no tensorboard in {python} (scripts/setup.sh --python installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 1,200 samples, batch 10, 2 ranks: 60 steps per epoch; logs every 10; 2 epochs.
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, "checkpoint: {every_steps: 10}\n").replace("epochs: 1", "epochs: 2"));
    let whole = dir.path().join("whole");
    run(ringrun(2, &cfg, &whole, &[]), Duration::from_secs(120)).assert_success();
    let tb = read_tensorboard(&python, &whole);
    let steps = |tag: &str| -> Vec<u64> {
        tb[tag].as_array().unwrap_or_else(|| panic!("no {tag} in {tb}")).iter().map(|p| p[0].as_u64().unwrap()).collect()
    };
    assert_eq!(steps("train/loss"), (1..=12).map(|i| i * 10).collect::<Vec<_>>());
    for tag in [
        "train/lr",
        "train/samples_per_s",
        "step_ms/forward",
        "step_ms/backward",
        "step_ms/communication",
        "step_ms/optimizer",
        "step_ms/data_wait",
        "train/grad_norm",
    ] {
        assert_eq!(steps(tag).len(), 12, "{tag}");
    }
    assert_eq!(steps("eval/loss"), vec![60, 120]);
    assert_eq!(steps("eval/acc"), vec![60, 120]);
    // The values are the ones metrics.jsonl has.
    let first_loss = std::fs::read_to_string(whole.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .next()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .unwrap();
    assert!((tb["train/loss"][0][1].as_f64().unwrap() - first_loss).abs() < 1e-5 * first_loss.abs());

    // Stopped at step 70 after a checkpoint at 70 — and, to show the purge, after logging up to
    // 80 in a run whose checkpoint is 70: every step appears once.
    let resumed = dir.path().join("resumed");
    run(ringrun(2, &cfg, &resumed, &["--set", "train.max_steps=80", "--set", "checkpoint.every_steps=70"]), Duration::from_secs(120))
        .assert_success();
    // Remove the step-80 checkpoint so the resume starts from 70 and redoes 71..80.
    std::fs::remove_dir_all(resumed.join("checkpoints/step-000000080")).unwrap();
    std::fs::write(resumed.join("checkpoints/latest"), "step-000000070\n").unwrap();
    let out = run(ringrun(2, &cfg, &resumed, &["--resume", "auto"]), Duration::from_secs(120));
    out.assert_success();
    assert!(out.stderr.contains("global step 70"), "{}", out.report());
    assert_eq!(std::fs::read_dir(resumed.join("tb")).unwrap().count(), 2, "one event file per start");
    let tb2 = read_tensorboard(&python, &resumed);
    let got: Vec<u64> = tb2["train/loss"].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect();
    assert_eq!(got, (1..=12).map(|i| i * 10).collect::<Vec<_>>(), "each step once");
    // Resumed exactly: the same curve as the uninterrupted run.
    assert_eq!(tb2["train/loss"], tb["train/loss"]);
}
