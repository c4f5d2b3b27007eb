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
    let Some(python) = python_with_torch_and("tensorboard_reads_the_scalars", "tensorboard") else { return };
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

#[test]
fn each_run_writes_a_plot_and_runs_compare_in_one_png() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "job.yaml",
        &mlp_config(10, "").replace("log_every_steps: 10}", "log_every_steps: 10, eval_every_steps: 20}"),
    );
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    run(ringrun(1, &cfg, &one, &[]), Duration::from_secs(120)).assert_success();
    run(ringrun(2, &cfg, &two, &[]), Duration::from_secs(120)).assert_success();
    let png = |p: &Path| -> (u32, u32) {
        let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", p.display());
        (u32::from_be_bytes(b[16..20].try_into().unwrap()), u32::from_be_bytes(b[20..24].try_into().unwrap()))
    };
    assert_eq!(png(&two.join("plot.png")), (1800, 1000));
    // Every rank's phases reached rank 0 for the bars.
    let b: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(two.join("breakdown.json")).unwrap()).unwrap();
    assert_eq!(b.as_array().unwrap().len(), 2);
    assert!(b[1]["step_ms"]["backward"].as_f64().unwrap() > 0.0, "{b}");
    let out_png = dir.path().join("compare.png");
    let mut c = Command::new(RINGTRAIN);
    c.arg("plot").arg(&one).arg(&two).arg("--out").arg(&out_png);
    let out = run(c, Duration::from_secs(60));
    out.assert_success();
    assert_eq!(png(&out_png), (1800, 1000));
    let mut c = Command::new(RINGTRAIN);
    c.arg("plot").arg(dir.path().join("missing"));
    let bad = run(c, Duration::from_secs(60));
    bad.assert_failure();
    assert!(bad.stderr.contains("missing") && bad.stderr.contains("metrics.jsonl"), "{}", bad.report());
    // Issue 27, item 11: a torn metrics line is said, not skipped in silence.
    let mut m = std::fs::OpenOptions::new().append(true).open(one.join("metrics.jsonl")).unwrap();
    std::io::Write::write_all(&mut m, b"{\"kind\": \"step\", \"glo").unwrap();
    let mut c = Command::new(RINGTRAIN);
    c.arg("plot").arg(&one);
    let torn = run(c, Duration::from_secs(60));
    torn.assert_success();
    assert!(torn.stderr.contains("skipped 1 unreadable line"), "{}", torn.report());
}

#[test]
fn the_merged_timeline_has_every_rank_on_one_clock() {
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        write_config(dir.path(), "job.yaml", &mlp_config(10, "").replace("log_every_steps: 10}", "log_every_steps: 10, trace: true}"));
    let run_dir = dir.path().join("run");
    run(ringrun(2, &cfg, &run_dir, &[]), Duration::from_secs(120)).assert_success();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("trace/merged.json")).unwrap()).unwrap();
    let events = v["traceEvents"].as_array().expect("Trace Event Format: an object with traceEvents");
    // The format's rules for the events used: every event has ph, pid, name; complete events (X)
    // have numeric ts and dur >= 0 and a tid; metadata (M) names processes and threads.
    for e in events {
        let ph = e["ph"].as_str().unwrap_or_else(|| panic!("no ph: {e}"));
        assert!(e["pid"].is_u64() && e["name"].is_string(), "{e}");
        match ph {
            "X" => assert!(e["ts"].is_number() && e["dur"].as_f64().unwrap() >= 0.0 && e["tid"].is_u64(), "{e}"),
            "M" => assert!(e["args"].is_object(), "{e}"),
            other => panic!("unexpected phase {other}: {e}"),
        }
    }
    let names: Vec<&str> = events.iter().filter(|e| e["name"] == "process_name").map(|e| e["args"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["rank 0", "rank 1"]);
    // One clock: rank 0's and rank 1's k-th all-reduce of bucket 0 are the same collective, so
    // they end together (within a few ms), which holds only if the timelines are aligned.
    let ends = |rank: u64| -> Vec<f64> {
        events
            .iter()
            .filter(|e| e["pid"] == rank && e["name"] == "bucket 0")
            .map(|e| e["ts"].as_f64().unwrap() + e["dur"].as_f64().unwrap())
            .collect()
    };
    let (e0, e1) = (ends(0), ends(1));
    assert!(e0.len() >= 50 && e0.len() == e1.len(), "{} vs {} bucket spans", e0.len(), e1.len());
    let mut diffs: Vec<f64> = e0.iter().zip(&e1).map(|(a, b)| (a - b).abs()).collect();
    diffs.sort_by(f64::total_cmp);
    let median_us = diffs[diffs.len() / 2];
    assert!(median_us < 5_000.0, "bucket all-reduces end {median_us} µs apart (median): clocks not aligned");
}

#[test]
fn on_a_terminal_ringrun_shows_one_live_status_line() {
    // `script` gives ringrun a pseudo-terminal, as a person's shell (or tmux) would.
    if Command::new("script").arg("--version").output().map_or(true, |o| !o.status.success()) {
        skip("on_a_terminal_ringrun_shows_one_live_status_line", "no `script` (util-linux)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, ""));
    let line =
        format!("{RINGRUN} --nproc-per-node 2 {RINGTRAIN} --config {} --run-dir {}", cfg.display(), dir.path().join("run").display());
    let mut c = Command::new("script");
    c.args(["-qec", &line, "/dev/null"]);
    let out = run(c, Duration::from_secs(120));
    out.assert_success();
    let screen = out.stdout.replace('\r', "\n");
    assert!(screen.contains("step 60/60 (100%)") && screen.contains("slowest rank") && screen.contains("ETA"), "{}", out.report());
    assert!(screen.contains("\x1b[2K"), "the line is redrawn in place");
    // Instead of rank 0's per-step log lines; the epoch's result and the final line still print.
    assert!(!screen.contains("epoch 0 step 10/60"), "{}", out.report());
    assert!(screen.contains("epoch 0 done: train_loss"), "{}", out.report());
    assert!(screen.contains("[rank0] final: test_acc"), "{}", out.report());
    // Piped, nothing changes: the per-step lines, no status records.
    let piped = run(ringrun(2, &cfg, &dir.path().join("piped"), &[]), Duration::from_secs(120));
    piped.assert_success();
    assert!(piped.stderr.contains("epoch 0 step 10/60") && !piped.stdout.contains("@ringtrain-status"), "{}", piped.report());
}
