//! Inputs and faults a hostile user tried (issue "Hardening"), each with a test that failed
//! before its fix.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn a_non_ascii_job_token_works() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, ""));
    let run_dir = dir.path().join("run");
    let mut c = ringrun(2, &cfg, &run_dir, &["--set", "train.max_steps=5"]);
    c.env("RINGTRAIN_JOB_TOKEN", "abcdefghiééééééééééé");
    let out = run(c, Duration::from_secs(60));
    out.assert_success();
    assert!(!out.stderr.contains("panicked"), "{}", out.report());
    assert_eq!(rank_hash(&run_dir, 0), rank_hash(&run_dir, 1));
}

#[test]
fn logs_are_appended_with_a_header_per_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, ""));
    let run_dir = dir.path().join("run");
    let logs = dir.path().join("ringrun-logs");
    let first = ringrun(2, &cfg, &run_dir, &["--set", "train.max_steps=5"]);
    let mut c = Command::new(RINGRUN);
    c.arg("--log-dir").arg(&logs).args(first.get_args());
    run(c, Duration::from_secs(60)).assert_success();
    let second = ringrun(2, &cfg, &run_dir, &["--resume", "auto"]);
    let mut c = Command::new(RINGRUN);
    c.arg("--log-dir").arg(&logs).args(second.get_args());
    run(c, Duration::from_secs(60)).assert_success();
    for log in [run_dir.join("logs/rank1.log"), logs.join("rank0.log")] {
        let text = std::fs::read_to_string(&log).unwrap();
        let headers: Vec<&str> = text.lines().filter(|l| l.starts_with("==== ")).collect();
        assert_eq!(headers.len(), 2, "{}:\n{text}", log.display());
        // The first start's lines are still there.
        assert!(text.contains("finished 5 steps"), "{}:\n{text}", log.display());
    }
    let worker_log = std::fs::read_to_string(run_dir.join("logs/rank0.log")).unwrap();
    assert!(worker_log.contains("resume no)") && worker_log.contains("resume auto)"), "{worker_log}");
}

#[test]
fn messages_name_what_was_wrong_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, ""));
    let worker = |sets: &[&str]| {
        let mut c = Command::new(RINGTRAIN);
        c.arg("--config").arg(&cfg).arg("--run-dir").arg(dir.path().join("run"));
        for s in sets {
            c.args(["--set", s]);
        }
        let out = run(c, Duration::from_secs(60));
        out.assert_failure();
        out.stderr.lines().last().unwrap_or_default().to_string()
    };
    // A bad --set key is the override's fault, not the file's.
    let e = worker(&["train.epochz=3"]);
    assert!(e.contains("override `train.epochz=3`") && !e.contains("job.yaml"), "{e}");
    // init_from: prose, not Rust debug names.
    let truncated = dir.path().join("w.safetensors");
    std::fs::write(&truncated, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    let e = worker(&[&format!("model.init_from={}", truncated.display())]);
    assert!(e.contains("not a readable safetensors file") && !e.contains("Metadata") && !e.contains("Os {"), "{e}");
    let e = worker(&[&format!("model.init_from={}", dir.path().join("nope.safetensors").display())]);
    assert!(e.contains("nope.safetensors: no such file") && !e.contains("Os {"), "{e}");
}

#[test]
fn a_log_dir_that_cannot_be_made_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, ""));
    let mut c = Command::new(RINGRUN);
    c.arg("--log-dir").arg(file.join("logs")).args(ringrun(1, &cfg, &dir.path().join("run"), &[]).get_args());
    let out = run(c, Duration::from_secs(60));
    out.assert_failure();
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("--log-dir") && last.contains("a-file/logs") && !last.contains("starting"), "{}", out.report());
}

#[test]
fn two_srun_steps_of_one_job_train_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "job.yaml",
        &mlp_config(10, "comm: {timeout_secs: 20, backend: ring}\n").replace("comm: {timeout_secs: 20}\n", ""),
    );
    let job = 200_000 + std::process::id() % 20_000;
    let (a, b) = (dir.path().join("step0"), dir.path().join("step1"));
    let mut handles = srun_step(&cfg, &a, job, Some(0), 2);
    handles.extend(srun_step(&cfg, &b, job, Some(1), 2));
    for h in handles {
        h.join().unwrap().assert_success();
    }
    // Each step trained with its own two ranks (the same job, so the same bits).
    assert_eq!(rank_hashes(&a, 2), rank_hashes(&b, 2));
    let log = std::fs::read_to_string(b.join("logs/rank0.log")).unwrap();
    assert!(log.contains(&format!("localhost:{}", ringtrain::launch::slurm_port(job as u64, 1))), "{log}");
}

#[test]
fn an_sbatch_script_without_srun_says_so_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, ""));
    let out = srun_step(&cfg, &dir.path().join("run"), 42, None, 2).remove(0).join().unwrap();
    out.assert_failure();
    assert!(out.elapsed < Duration::from_secs(10), "{}", out.report());
    assert!(out.stderr.contains("sbatch") && out.stderr.contains("srun"), "{}", out.report());
}

#[test]
fn under_srun_with_pmi2_the_ring_needs_no_mpi() {
    // srun --mpi=pmi2 sets PMI_RANK: the worker used to call MPI_Init just to find rank 0, which
    // Debian's Open MPI cannot do there (here, without a PMI server, it fails the same way).
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, ""));
    let run_dir = dir.path().join("run");
    let job = 300_007 + std::process::id() % 20_000; // a port apart from the other srun test's
    for h in srun_step_with(&cfg, &run_dir, job, Some(0), 2, true) {
        h.join().unwrap().assert_success();
    }
    assert_eq!(rank_hash(&run_dir, 0), rank_hash(&run_dir, 1));
    let log = std::fs::read_to_string(run_dir.join("logs/rank0.log")).unwrap();
    assert!(log.contains("backend ring") && log.contains("derived from Slurm"), "{log}");
}

#[test]
fn a_rank_that_never_starts_is_named_by_the_one_that_did() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, ""));
    // Rank 0 of 2 alone, as torchrun's environment would start it; rank 1 never comes.
    let port = free_port().to_string();
    let mut c = Command::new(RINGTRAIN);
    c.args(["--config"]).arg(&cfg).arg("--run-dir").arg(dir.path().join("run")).args(["--set", "comm.timeout_secs=2"]);
    for (k, v) in [("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")] {
        c.env(k, v);
    }
    c.env("MASTER_PORT", &port).env_remove("RINGTRAIN_FAULT");
    let out = run(c, Duration::from_secs(60));
    out.assert_failure();
    let line = out.stderr.lines().find(|l| l.contains("error:")).unwrap_or_else(|| panic!("{}", out.report()));
    assert!(line.contains("rank(s) [1] of 2 did not join within 2s"), "{line}");
    assert!(!line.contains("ring/addr"), "a store key instead of the rank: {line}");
    assert_eq!(line.matches("did not join").count(), 1, "{line}");
}

#[test]
fn a_libtorch_error_inside_a_panicking_call_is_one_line_naming_the_rank() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, ""));
    let mut c = ringrun(2, &cfg, &dir.path().join("run"), &["--set", "train.max_steps=5"]);
    c.env("RINGTRAIN_FAULT", "rank=1,step=2,action=panic").env_remove("RUST_BACKTRACE");
    let out = run(c, Duration::from_secs(60));
    out.assert_failure();
    let line = out.stderr.lines().find(|l| l.contains("internal error")).unwrap_or_else(|| panic!("{}", out.report()));
    assert!(line.contains("ringtrain: error: rank 1: internal error at src/train/fault.rs"), "{line}");
    assert!(line.contains("CUDA out of memory. Tried to allocate 2.00 GiB") && !line.contains("Exception raised"), "{line}");
    assert!(!out.stderr.contains("frame #0") && !out.stderr.contains("note: run with `RUST_BACKTRACE=1`"), "{}", out.report());
}

/// The device contract's paths under the strict wrapper (RINGTRAIN_STRICT_DEVICE=1): the ring
/// declared device-native, as NCCL is, refusing any tensor that is not a contiguous tensor on the
/// model's device. On this CPU-only machine the device always matches (the GPU check runs the same
/// on cuda, part (l)); what this catches here is a path that breaks once the backend is
/// device-native (buckets beside the parameters, state broadcast as device tensors) or hands over
/// a strided view. Adam, checkpoints, evaluation, 20 + resume to 40 and init_from: bitwise the
/// plain ring's 40 straight.
#[test]
fn device_native_paths_under_the_strict_wrapper_match_the_plain_ring() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "adam.yaml",
        &mlp_config(16, "checkpoint: {every_steps: 10}\n").replace("{name: sgd, lr: 0.1, momentum: 0.9}", "{name: adam, lr: 0.01}"),
    );
    let strict = |run_dir: &std::path::Path, args: &[&str]| {
        let mut c = ringrun(2, &cfg, run_dir, args);
        c.env("RINGTRAIN_STRICT_DEVICE", "1");
        let out = run(c, Duration::from_secs(120));
        out.assert_success();
        out
    };
    let plain = dir.path().join("plain");
    run(ringrun(2, &cfg, &plain, &["--set", "train.max_steps=40"]), Duration::from_secs(120)).assert_success();
    let whole = dir.path().join("whole");
    strict(&whole, &["--set", "train.max_steps=40"]);
    let log = std::fs::read_to_string(whole.join("logs/rank0.log")).unwrap();
    assert!(log.contains("strict device check") && log.contains("test_acc"), "strict check on, evaluation ran:\n{log}");
    let resumed = dir.path().join("resumed");
    strict(&resumed, &["--set", "train.max_steps=20"]);
    let out = strict(&resumed, &["--set", "train.max_steps=40", "--resume", "auto"]);
    assert!(out.stderr.contains("global step 20"), "{}", out.report());
    let init = format!("model.init_from={}", whole.join("model.safetensors").display());
    strict(&dir.path().join("init"), &["--set", "train.max_steps=5", "--set", &init]);
    assert_eq!(rank_hashes(&whole, 2), rank_hashes(&plain, 2), "strict wrapper vs plain ring");
    assert_eq!(rank_hashes(&resumed, 2), rank_hashes(&plain, 2), "resumed under the strict wrapper vs plain ring");
}
