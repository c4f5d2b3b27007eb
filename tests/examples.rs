//! The library's examples, run as a user runs them: under ringrun with 2 workers (and the smallest
//! one under torchrun too).
//! `cargo test` builds the examples beside the binaries (target/<profile>/examples/).

mod common;
use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn example(name: &str) -> PathBuf {
    let p = std::path::Path::new(RINGTRAIN).parent().unwrap().join("examples").join(name);
    assert!(p.exists(), "{} is missing: cargo build --release --examples", p.display());
    p
}

fn ringrun_example(name: &str, args: &[&str]) -> Command {
    let mut c = Command::new(RINGRUN);
    c.args(["--nproc-per-node", "2"]).arg(example(name)).args(args);
    c.env_remove("RINGTRAIN_FAULT");
    c
}

/// (rank, first loss, last loss, hash) from `rank R: loss A -> B, parameter hash H` lines.
fn summaries(stdout: &str) -> Vec<(usize, f64, f64, String)> {
    let mut v: Vec<_> = stdout
        .lines()
        .filter_map(|l| {
            let l = l.split_once("] ").map_or(l, |(_, r)| r);
            let rest = l.strip_prefix("rank ")?;
            let (rank, rest) = rest.split_once(": loss ")?;
            let (losses, hash) = rest.split_once(", parameter hash ")?;
            let (a, b) = losses.split_once(" -> ")?;
            Some((rank.parse().ok()?, a.parse().ok()?, b.parse().ok()?, hash.trim().to_string()))
        })
        .collect();
    v.sort_by_key(|s| s.0);
    v
}

#[test]
fn custom_model_trains_with_identical_replicas() {
    let out = run(ringrun_example("custom_model", &["--steps", "120"]), Duration::from_secs(180));
    out.assert_success();
    let s = summaries(&out.stdout);
    assert_eq!(s.len(), 2, "{}", out.report());
    assert_eq!(s[0].3, s[1].3, "replicas differ\n{}", out.report());
    for (rank, first, last, _) in &s {
        assert!(last < &(first * 0.5), "rank {rank}: loss {first} -> {last} did not fall\n{}", out.report());
    }
    assert!(!out.stdout.contains("re-attached"), "{}", out.report());
}

#[test]
fn tch_zero_grad_setting_gradients_to_none_is_caught_and_repaired_exactly() {
    let plain = run(ringrun_example("custom_model", &["--steps", "30"]), Duration::from_secs(180));
    plain.assert_success();
    let tch_zero = run(ringrun_example("custom_model", &["--steps", "30", "--tch-zero-grad"]), Duration::from_secs(180));
    tch_zero.assert_success();
    assert!(tch_zero.stderr.contains("were replaced since the last step"), "{}", tch_zero.report());
    assert!(tch_zero.stdout.contains("re-attached"), "{}", tch_zero.report());
    let (a, b) = (summaries(&plain.stdout), summaries(&tch_zero.stdout));
    // Repaired gradients behave as zeroed ones: the same weights, bit for bit, on every rank.
    assert_eq!(b.len(), 2);
    assert_eq!(a.iter().map(|s| &s.3).collect::<Vec<_>>(), b.iter().map(|s| &s.3).collect::<Vec<_>>(), "{}", tch_zero.report());
}

fn final_hashes(stdout: &str) -> Vec<String> {
    let mut v: Vec<(String, String)> = stdout
        .lines()
        .filter_map(|l| {
            let l = l.split_once("] ").map_or(l, |(_, r)| r);
            let (head, hash) = l.split_once(", parameter hash ")?;
            Some((head.split(':').next()?.to_string(), hash.trim().to_string()))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, h)| h).collect()
}

#[test]
fn grad_accum_example_resumes_from_its_checkpoint_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let ckpt = ckpt.to_str().unwrap();
    let whole = run(ringrun_example("grad_accum", &["--steps", "30"]), Duration::from_secs(180));
    whole.assert_success();
    let expected = final_hashes(&whole.stdout);
    assert_eq!(expected.len(), 2, "{}", whole.report());
    assert_eq!(expected[0], expected[1], "{}", whole.report());
    let first =
        run(ringrun_example("grad_accum", &["--steps", "30", "--checkpoints", ckpt, "--stop-after", "20"]), Duration::from_secs(180));
    first.assert_success();
    assert_ne!(final_hashes(&first.stdout), expected, "stopping early must leave other weights");
    let resumed = run(ringrun_example("grad_accum", &["--steps", "30", "--checkpoints", ckpt]), Duration::from_secs(180));
    resumed.assert_success();
    assert!(resumed.stdout.contains("resumed from") && resumed.stdout.contains("at step 20"), "{}", resumed.report());
    assert_eq!(final_hashes(&resumed.stdout), expected, "{}", resumed.report());
}

/// A model and a data format added as one file each (examples/own_model/), registered by one
/// line each, and trained by ringtrain's own worker under ringrun: their keys parse, check, reach
/// the resolved config, and the replicas learn the blobs identically.
#[test]
fn a_model_and_a_data_format_added_as_one_file_each_train_under_ringrun() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/own_model/blobs.yaml");
    let run_dir = dir.path().join("run");
    let mut c = ringrun_example("own_model", &["--config"]);
    c.arg(&cfg).arg("--run-dir").arg(&run_dir);
    let out = run(c, Duration::from_secs(180));
    out.assert_success();
    let acc: f64 = out
        .stdout
        .split("test_acc ")
        .nth(1)
        .and_then(|s| s.split('%').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no test_acc\n{}", out.report()));
    assert!(acc > 90.0, "4 well-separated blobs: test_acc {acc}%\n{}", out.report());
    let h = rank_hashes(&run_dir, 2);
    assert_eq!(h[0], h[1], "replicas differ");
    let resolved = std::fs::read_to_string(run_dir.join("config.yaml")).unwrap();
    assert!(resolved.contains("name: wide_relu") && resolved.contains("width: 32"), "{resolved}");
    assert!(resolved.contains("format: blobs") && resolved.contains("spread: 0.5"), "defaults are filled in: {resolved}");

    // Its keys are checked as a built-in model's are: by its own struct, named in the error.
    let mut c = ringrun_example("own_model", &["--config"]);
    c.arg(&cfg).arg("--run-dir").arg(dir.path().join("bad")).args(["--set", "model.widht=3"]);
    let bad = run(c, Duration::from_secs(60));
    bad.assert_failure();
    assert!(bad.stderr.contains("model.widht: unknown field `widht`, expected `width`"), "{}", bad.report());
    // And the stock worker, which has not registered it, says what it knows.
    let mut c = Command::new(RINGTRAIN);
    c.arg("--config").arg(&cfg).arg("--run-dir").arg(dir.path().join("stock"));
    let stock = run(c, Duration::from_secs(60));
    stock.assert_failure();
    assert!(stock.stderr.contains("unknown model `wide_relu` (known: mlp, cnn, gpt"), "{}", stock.report());
}

/// The README's smallest program is examples/ddp_minimal.rs, word for word, under 40 lines and
/// five ringtrain names; under ringrun both ranks learn the rule and end with one set of weights.
#[test]
fn the_readmes_five_name_program_runs_under_ringrun() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let file = std::fs::read_to_string(root.join("examples/ddp_minimal.rs")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains(&format!("```rust\n{file}```")), "README's library example differs from examples/ddp_minimal.rs");
    assert!(file.lines().count() < 40, "{} lines", file.lines().count());
    let names: std::collections::BTreeSet<&str> =
        ["ringtrain::init", "InitOptions", "Ddp", "DdpOptions", "DistributedSampler"].into_iter().collect();
    let imported: Vec<&str> = file.lines().filter(|l| l.starts_with("use ringtrain")).collect();
    assert_eq!(imported, ["use ringtrain::data::DistributedSampler;", "use ringtrain::{Ddp, DdpOptions, InitOptions};"]);
    assert_eq!(file.matches("ringtrain::").count(), 3, "only init beyond the imports");
    assert_eq!(names.len(), 5);

    let out = run(ringrun_example("ddp_minimal", &[]), Duration::from_secs(120));
    out.assert_success();
    let lines: Vec<&str> = out.stdout.lines().filter(|l| l.contains("accuracy ")).collect();
    assert_eq!(lines.len(), 2, "{}", out.report());
    let hashes: Vec<&str> = lines.iter().map(|l| l.rsplit("parameter hash ").next().unwrap().trim()).collect();
    assert_eq!(hashes[0], hashes[1], "replicas differ\n{}", out.report());
    for l in &lines {
        let acc: f64 = l.split("accuracy ").nth(1).and_then(|s| s.split('%').next()).and_then(|s| s.parse().ok()).unwrap();
        assert!(acc > 85.0, "{l}\n{}", out.report());
    }
}

/// The same program started by torchrun (`--no-python`): `ringtrain::init` joins through
/// torchrun's agent store and the ranks end with the weights they end with under ringrun.
#[test]
fn the_five_name_program_runs_under_torchrun_as_under_ringrun() {
    let Some(py) = python_with_torch("the_five_name_program_runs_under_torchrun_as_under_ringrun") else { return };
    let hashes = |out: &Output| -> Vec<String> {
        let mut v: Vec<String> = out
            .stdout
            .lines()
            .filter(|l| l.contains("parameter hash "))
            .map(|l| l.rsplit("parameter hash ").next().unwrap().trim().to_string())
            .collect();
        v.sort();
        v
    };
    let by_ringrun = run(ringrun_example("ddp_minimal", &[]), Duration::from_secs(120));
    by_ringrun.assert_success();
    let mut c = Command::new(py);
    c.args(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", &free_port().to_string(), "--no-python"]);
    c.arg(example("ddp_minimal"));
    c.env_remove("RINGTRAIN_FAULT").env_remove("RINGTRAIN_JOB_TOKEN");
    let out = run(c, Duration::from_secs(120));
    out.assert_success();
    assert!(out.stderr.contains("rendezvous through torchrun's agent store"), "{}", out.report());
    let (theirs, ours) = (hashes(&out), hashes(&by_ringrun));
    assert_eq!(theirs.len(), 2, "{}", out.report());
    assert_eq!(theirs, ours, "torchrun's ranks end elsewhere than ringrun's\n{}", out.report());
}
