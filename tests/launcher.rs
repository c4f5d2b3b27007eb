//! ringrun with real worker processes: replicas end bitwise identical, a failing worker stops the
//! group quickly with its rank named, bad input fails clearly.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn two_and_three_workers_end_with_identical_parameters() {
    for world in [2usize, 3] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(dir.path(), "job.yaml", &mlp_config(16, ""));
        let run_dir = dir.path().join("run");
        let out = run(ringrun(world, &cfg, &run_dir, &[]), Duration::from_secs(120));
        out.assert_success();
        let hashes = rank_hashes(&run_dir, world);
        assert!(hashes.iter().all(|h| h == &hashes[0]), "replicas differ: {hashes:?}\n{}", out.report());
        // Outputs people read: prefixed worker lines, final accuracy, metrics with epoch lines.
        assert!(out.stdout.contains("[rank0] final: test_acc"), "{}", out.report());
        let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
        let epoch: serde_json::Value =
            metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|v| v["kind"] == "epoch").unwrap();
        for key in ["epoch", "test_loss", "test_acc", "samples_per_s"] {
            assert!(epoch[key].is_number(), "epoch line lacks {key}: {epoch}");
        }
        assert!(epoch["test_acc"].as_f64().unwrap() > 0.6, "synthetic task not learned: {epoch}");
        assert!(run_dir.join("config.yaml").is_file() && run_dir.join("logs/rank0.log").is_file());
    }
}

#[test]
fn worker_may_be_omitted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(16, ""));
    let run_dir = dir.path().join("run");
    let mut c = Command::new(RINGRUN);
    c.args(["--nproc-per-node", "2", "--config"]).arg(&cfg).arg("--run-dir").arg(&run_dir).arg("--set").arg("train.max_steps=5");
    run(c, Duration::from_secs(120)).assert_success();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("ranks/rank1.json")).unwrap()).unwrap();
    assert_eq!(v["global_steps"], 5);
}

#[test]
fn a_failing_worker_stops_the_group_naming_its_rank() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough that the others would still be training when rank 1 fails.
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(4, "").replace("epochs: 1", "epochs: 50"));
    let run_dir = dir.path().join("run");
    let mut c = ringrun(3, &cfg, &run_dir, &[]);
    c.env("RINGTRAIN_FAULT", "rank=1,step=20,action=exit:3");
    let out = run(c, Duration::from_secs(60));
    out.assert_failure();
    assert!(out.stderr.contains("rank 1 exited with code 3"), "{}", out.report());
    // From the failure to ringrun's exit: within seconds, not the 20 s collective timeout.
    let log = std::fs::read_to_string(run_dir.join("logs/rank1.log")).unwrap();
    assert!(log.contains("fault injection"), "{log}");
    assert!(out.elapsed < Duration::from_secs(10) + startup_allowance(), "took {:?}\n{}", out.elapsed, out.report());
}

/// Process start-up and the first steps before the injected fault.
fn startup_allowance() -> Duration {
    Duration::from_secs(5)
}

#[test]
fn a_killed_worker_is_reported_with_its_signal() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(4, "").replace("epochs: 1", "epochs: 50"));
    let mut c = ringrun(2, &cfg, &dir.path().join("run"), &[]);
    c.env("RINGTRAIN_FAULT", "rank=0,step=10,action=abort");
    let out = run(c, Duration::from_secs(60));
    out.assert_failure();
    assert!(out.stderr.contains("rank 0 was killed by signal 6 (SIGABRT)"), "{}", out.report());
}

#[test]
fn bad_config_fails_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "bad.yaml", &mlp_config(16, "").replace("batch_size: 16", "batch_size: 16, epochz: 2"));
    let out = run(ringrun(2, &cfg, &dir.path().join("run"), &[]), Duration::from_secs(60));
    out.assert_failure();
    assert!(out.stderr.contains("bad.yaml") && out.stderr.contains("epochz"), "{}", out.report());
    assert!(out.stderr.contains("ringrun: error: rank"), "{}", out.report());

    // The same through the worker alone: one line, non-zero exit, nothing written.
    let mut c = Command::new(RINGTRAIN);
    c.arg("--config").arg(&cfg).arg("--run-dir").arg(dir.path().join("solo"));
    let out = run(c, Duration::from_secs(30));
    out.assert_failure();
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.report());
    assert!(!dir.path().join("solo").exists(), "a bad config must not create the run directory");

    let mut c = Command::new(RINGTRAIN);
    c.arg("--config").arg(&cfg).arg("--set").arg("train.batch_size=0");
    let out = run(c, Duration::from_secs(30));
    out.assert_failure();
    assert!(out.stderr.contains("epochz") || out.stderr.contains("train.batch_size"), "{}", out.report());

    let out = run(
        {
            let mut c = Command::new(RINGTRAIN);
            c.args(["--config", "/nonexistent.yaml"]);
            c
        },
        Duration::from_secs(30),
    );
    out.assert_failure();
    assert!(out.stderr.contains("/nonexistent.yaml"), "{}", out.report());
}

#[test]
fn a_missing_worker_program_is_an_error() {
    let out = run(
        {
            let mut c = Command::new(RINGRUN);
            c.args(["--nproc-per-node", "2", "/no/such/worker"]);
            c
        },
        Duration::from_secs(30),
    );
    out.assert_failure();
    assert!(out.stderr.contains("/no/such/worker"), "{}", out.report());
}

/// ringrun as one node of an elastic job whose store is on this host's loopback `port`.
fn elastic_ringrun(nnodes: &str, port: u16, cfg: &std::path::Path, run_dir: &std::path::Path, extra: &[&str]) -> Command {
    let mut c = Command::new(RINGRUN);
    c.args(["--nnodes", nnodes, "--rdzv-backend", "c10d", "--rdzv-endpoint", &format!("127.0.0.1:{port}")]).args(extra);
    c.arg(RINGTRAIN).arg("--config").arg(cfg).arg("--run-dir").arg(run_dir);
    c.env_remove("RINGTRAIN_FAULT");
    c
}

#[test]
fn an_elastic_job_that_never_reaches_its_minimum_says_how_many_came() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(16, ""));
    let out =
        run(elastic_ringrun("2:3", free_port(), &cfg, &dir.path().join("run"), &["--join-timeout-secs", "2"]), Duration::from_secs(60));
    out.assert_failure();
    assert!(out.stderr.contains("ringrun: error: only 1 node(s) of at least 2 joined generation 0 within 2s"), "{}", out.report());
}

#[test]
fn a_node_that_arrives_when_no_restarts_are_left_waits_and_leaves_when_the_job_ends() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(16, ""));
    let port = free_port();
    // The first ringrun binds the port and serves the store, and starts alone after the settle
    // time; admitting the second would take a restart, and none are allowed (--max-restarts 0).
    let mut first = elastic_ringrun("1:2", port, &cfg, &dir.path().join("run"), &["--nproc-per-node", "2", "--rdzv-settle-secs", "1"]);
    first.env("RINGTRAIN_TEST_STEP_MS", "50");
    let first = std::thread::spawn(move || run(first, Duration::from_secs(120)));
    let metrics = dir.path().join("run").join("metrics.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 1 {
        assert!(std::time::Instant::now() < deadline, "training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = run(elastic_ringrun("1:2", port, &cfg, &dir.path().join("second"), &[]), Duration::from_secs(120));
    let first = first.join().unwrap();
    first.assert_success();
    second.assert_success();
    assert!(second.stderr.contains("generation 0 runs with 1 node(s); this node waits to join the next"), "{}", second.report());
    assert!(second.stderr.contains("the job finished while this node waited to join it"), "{}", second.report());
    assert!(!dir.path().join("second").exists(), "the waiting node started workers");
    let last = metrics_lines(&dir.path().join("run"), "step").pop().unwrap();
    assert_eq!(last["world_size"], 2, "{last}");
}

#[test]
fn a_job_whose_training_state_cannot_fit_is_refused_up_front_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    // About 1.06 M parameters: per rank 4 MiB of gradients and 12 MiB of AdamW state and scratch.
    let yaml = mlp_config(16, "")
        .replace("hidden: [32, 16]", "hidden: [1024, 1024]")
        .replace("optimizer: {name: sgd, lr: 0.1, momentum: 0.9}", "optimizer: {name: adamw, lr: 0.001}");
    let cfg = write_config(dir.path(), "job.yaml", &yaml);
    let attempt = |mib: &str, run: &str| {
        let mut c = ringrun(2, &cfg, &dir.path().join(run), &["--set", "train.max_steps=2"]);
        c.env("RINGTRAIN_TEST_MEM_AVAILABLE_MIB", mib);
        common::run(c, Duration::from_secs(120))
    };
    let out = attempt("20", "small");
    out.assert_failure();
    assert!(
        out.stderr.contains("the training state does not fit this machine's memory: its 2 rank(s) need at least 32.5 MiB")
            && out.stderr.contains(
                "(per rank: gradients 4.1 MiB, optimizer state 12.2 MiB for adamw; ddp.shard: optimizer divides the optimizer state"
            )
            && out.stderr.contains("but 20.0 MiB is available"),
        "{}",
        out.report()
    );
    assert!(!dir.path().join("small").join("checkpoints").exists(), "a refused job wrote checkpoints");
    // With room (the need is about 32 MiB for both ranks), it trains.
    attempt("64", "roomy").assert_success();
}
