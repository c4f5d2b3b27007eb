//! Checkpoints, exact resume, restarts and no hangs, with real worker processes.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// 1,200 samples, batch 10: 60 steps per epoch at 2 ranks, 40 at 3.
fn job(extra: &str) -> String {
    format!(
        "model: {{name: mlp, hidden: [32, 16]}}
data: {{format: synthetic, synthetic: {{train_samples: 1200, test_samples: 300, shape: [12], classes: 3, seed: 5}}}}
train: {{epochs: 3, batch_size: 10, seed: 7, log_every_steps: 10}}
optimizer: {{name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0001}}
comm: {{timeout_secs: 20}}
checkpoint: {{every_steps: 7, keep: 3}}
{extra}"
    )
}

fn hash_of(run_dir: &Path) -> String {
    rank_hash(run_dir, 0)
}

/// An uninterrupted run of `cfg` at `world` ranks; returns its run directory.
fn reference(dir: &Path, cfg: &Path, world: usize, extra: &[&str]) -> std::path::PathBuf {
    let run_dir = dir.join(format!("reference-{world}"));
    run(ringrun(world, cfg, &run_dir, extra), Duration::from_secs(120)).assert_success();
    run_dir
}

#[test]
fn kill_9_mid_run_with_a_restart_ends_bitwise_equal() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &job(""));
    let expected = hash_of(&reference(dir.path(), &cfg, 2, &[]));
    // A different step each run (3 epochs × 60 steps); printed so a failure can be replayed.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    let step = 3 + nanos % 170;
    eprintln!("killing rank 1 with SIGKILL before global step {step}");
    let run_dir = dir.path().join("killed");
    let mut c = ringrun(2, &cfg, &run_dir, &[]);
    c.arg("--max-restarts").arg("1");
    // ringrun's own options go before the worker command.
    let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut c = Command::new(RINGRUN);
    c.args(["--max-restarts", "1"]).args(&args[..args.len() - 2]).env("RINGTRAIN_FAULT", format!("rank=1,step={step},action=kill"));
    let out = run(c, Duration::from_secs(120));
    out.assert_success();
    assert!(out.stderr.contains("rank 1 was killed by signal 9 (SIGKILL); restarting the group"), "{}", out.report());
    assert!(out.stderr.contains("finished after 1 restart(s)"), "{}", out.report());
    assert_eq!(rank_hashes(&run_dir, 2), vec![expected.clone(), expected], "step {step}\n{}", out.report());
}

#[test]
fn resume_mid_epoch_at_the_same_world_size_is_bitwise_equal() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &job(""));
    let expected = hash_of(&reference(dir.path(), &cfg, 2, &[]));
    for stop_at in [1u64, 23, 60, 61, 137] {
        let run_dir = dir.path().join(format!("stop-{stop_at}"));
        let max = format!("train.max_steps={stop_at}");
        run(ringrun(2, &cfg, &run_dir, &["--set", &max]), Duration::from_secs(120)).assert_success();
        let out = run(ringrun(2, &cfg, &run_dir, &["--resume", "auto"]), Duration::from_secs(120));
        out.assert_success();
        assert!(out.stderr.contains(&format!("global step {stop_at}")), "{}", out.report());
        assert_eq!(hash_of(&run_dir), expected, "stopped at {stop_at}\n{}", out.report());
    }
}

/// Reads samples/rankN.txt of every rank: (epoch, sample) of its "epoch sample step" lines.
fn seen(run_dir: &Path) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(run_dir.join("samples")).unwrap() {
        for line in std::fs::read_to_string(e.unwrap().path()).unwrap().lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<usize> = line.split(' ').map(|f| f.parse().unwrap()).collect();
            out.push((f[0], f[1]));
        }
    }
    out
}

#[test]
fn resume_at_another_world_size_sees_every_sample_of_the_epoch_once() {
    for (before, after, steps) in [(2usize, 3usize, 30u64), (3, 2, 20)] {
        let dir = tempfile::tempdir().unwrap();
        // Checkpoint only at the end of the first part, so nothing is recomputed.
        let cfg =
            write_config(dir.path(), "job.yaml", &job("").replace("epochs: 3", "epochs: 2").replace("every_steps: 7", "every_steps: 0"));
        let run_dir = dir.path().join("run");
        let mut c = ringrun(before, &cfg, &run_dir, &["--set", &format!("train.max_steps={steps}")]);
        c.env("RINGTRAIN_SAMPLE_LOG", "1");
        run(c, Duration::from_secs(120)).assert_success();
        let mut c = ringrun(after, &cfg, &run_dir, &["--resume", "auto"]);
        c.env("RINGTRAIN_SAMPLE_LOG", "1");
        let out = run(c, Duration::from_secs(120));
        out.assert_success();
        assert!(out.stderr.contains("re-sharded"), "{}", out.report());
        let all = seen(&run_dir);
        for epoch in 0..2 {
            let mut ids: Vec<usize> = all.iter().filter(|(e, _)| *e == epoch).map(|(_, s)| *s).collect();
            ids.sort();
            assert_eq!(ids, (0..1200).collect::<Vec<_>>(), "{before}→{after} ranks: epoch {epoch} must see each sample once");
        }
        let hashes = rank_hashes(&run_dir, after);
        assert!(hashes.iter().all(|h| h == &hashes[0]));
        // metrics.jsonl says which world size took each logged step.
        for line in metrics_lines(&run_dir, "step") {
            let expected = if line["global_step"].as_u64().unwrap() <= steps { before } else { after };
            assert_eq!(line["world_size"].as_u64(), Some(expected as u64), "{line}");
        }
    }
}

#[test]
fn truncated_and_bit_flipped_checkpoints_are_skipped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &job(""));
    let expected = hash_of(&reference(dir.path(), &cfg, 2, &[]));
    let run_dir = dir.path().join("run");
    run(ringrun(2, &cfg, &run_dir, &["--set", "train.max_steps=30"]), Duration::from_secs(120)).assert_success();
    let ckpts = run_dir.join("checkpoints");
    // Kept: steps 21, 28, 30. Truncate 30's model; flip a bit in 28's optimizer state.
    let model = ckpts.join("step-000000030/model.safetensors");
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&model).unwrap().set_len(len - 100).unwrap();
    let opt = ckpts.join("step-000000028/optimizer.safetensors");
    let mut bytes = std::fs::read(&opt).unwrap();
    let at = bytes.len() - 7;
    bytes[at] ^= 0x10;
    std::fs::write(&opt, bytes).unwrap();

    let out = run(ringrun(2, &cfg, &run_dir, &["--resume", "auto"]), Duration::from_secs(120));
    out.assert_success();
    assert!(out.stderr.contains("skipping unusable checkpoint") && out.stderr.contains("step-000000030"), "{}", out.report());
    assert!(out.stderr.contains("step-000000028/optimizer.safetensors") || out.stderr.contains("step-000000028"), "{}", out.report());
    assert!(out.stderr.contains("resuming from") && out.stderr.contains("step-000000021"), "{}", out.report());
    // Resuming from an older checkpoint still ends exactly where the uninterrupted run does.
    assert_eq!(hash_of(&run_dir), expected);

    // None usable: a clear error, not a fresh start.
    for e in std::fs::read_dir(&ckpts).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::write(p.join("meta.json"), b"{").unwrap();
        }
    }
    let out = run(ringrun(2, &cfg, &run_dir, &["--resume", "auto"]), Duration::from_secs(120));
    out.assert_failure();
    assert!(out.stderr.contains("no usable checkpoint"), "{}", out.report());
}

#[test]
fn a_hung_worker_is_named_by_every_other_rank_within_twice_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = 4u64;
    let cfg = write_config(dir.path(), "job.yaml", &job("").replace("timeout_secs: 20", &format!("timeout_secs: {timeout}")));
    let mut c = ringrun(3, &cfg, &dir.path().join("run"), &[]);
    c.env("RINGTRAIN_FAULT", "rank=1,step=15,action=hang");
    let out = run(c, Duration::from_secs(60));
    out.assert_failure();
    for rank in [0, 2] {
        let line = out
            .stderr
            .lines()
            .find(|l| l.starts_with(&format!("[rank{rank}] ringtrain: error")))
            .unwrap_or_else(|| panic!("rank {rank} reported no error\n{}", out.report()));
        assert!(line.contains("rank(s) [1] did not arrive"), "rank {rank}: {line}\n{}", out.report());
    }
    // The survivors give up 1.5× the timeout after the hang; ringrun then SIGKILLs the hung
    // worker after its 2 s teardown grace. Start-up and 15 steps take well under 3 s.
    assert!(out.elapsed < Duration::from_secs(2 * timeout + 2 + 3), "took {:?}\n{}", out.elapsed, out.report());
}

#[test]
fn sigterm_checkpoints_exits_0_and_resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &job("").replace("epochs: 3", "epochs: 30").replace("batch_size: 10", "batch_size: 2"));
    let expected = hash_of(&reference(dir.path(), &cfg, 2, &[]));
    let run_dir = dir.path().join("run");
    let mut child =
        ringrun(2, &cfg, &run_dir, &[]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    // Wait until training is under way, then send SIGTERM as a preempting scheduler would.
    let metrics = run_dir.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 5 {
        assert!(Instant::now() < deadline, "training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let signalled = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(signalled.elapsed() < Duration::from_secs(30), "ringrun did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let latest = std::fs::read_to_string(run_dir.join("checkpoints/latest")).unwrap();
    let meta = std::fs::read_to_string(run_dir.join("checkpoints").join(latest.trim()).join("meta.json")).unwrap();
    assert!(meta.contains("\"shutdown\"") || meta.contains("\"epoch_end\""), "{meta}");
    let out = run(ringrun(2, &cfg, &run_dir, &["--resume", "auto"]), Duration::from_secs(120));
    out.assert_success();
    assert_eq!(hash_of(&run_dir), expected, "{}", out.report());
}

#[test]
fn init_from_loads_weights_and_lists_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &job(""));
    let first = reference(dir.path(), &cfg, 2, &[]);
    let weights = first.join("model.safetensors");
    // Starting from trained weights with lr 0 keeps them exactly.
    let run_dir = dir.path().join("init");
    let init = format!("model.init_from={}", weights.display());
    run(
        ringrun(2, &cfg, &run_dir, &["--set", &init, "--set", "optimizer.lr=1e-30", "--set", "train.max_steps=1"]),
        Duration::from_secs(120),
    )
    .assert_success();
    let (a, b) = (load_params(&first), load_params(&run_dir));
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{n} changed");
    }
    // A file for another model: the error lists missing, unexpected and mis-shaped tensors.
    let other = write_config(dir.path(), "other.yaml", &job("").replace("hidden: [32, 16]", "hidden: [32, 8, 4]"));
    let out = run(ringrun(2, &other, &dir.path().join("bad"), &["--set", &init]), Duration::from_secs(120));
    out.assert_failure();
    let line = out.stderr.lines().find(|l| l.contains("model.init_from")).unwrap_or_else(|| panic!("{}", out.report()));
    assert!(line.contains("missing [\"fc4.weight\", \"fc4.bias\"]"), "{line}");
    assert!(line.contains("mis-shaped [\"fc2.weight"), "{line}");
    assert!(line.contains("unexpected []"), "{line}");
}

/// The checkpoint loads in Python: `safetensors.torch.load_file` + `load_state_dict` into the
/// reference PyTorch module. Runs where a Python with torch is found (RINGTRAIN_PYTHON, or the
/// benchmark venv scripts/bench_setup.sh makes); says so when skipped.
#[test]
fn checkpoint_loads_in_python_safetensors_and_pytorch() {
    let Some(python) = python_with_torch("checkpoint_loads_in_python_safetensors_and_pytorch") else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/fashion_mnist_cnn.yaml");
    let run_dir = dir.path().join("run");
    run(ringrun(2, &cfg, &run_dir, &["--set", "train.max_steps=3", "--set", "train.eval=false"]), Duration::from_secs(120))
        .assert_success();
    let ckpt = run_dir.join("checkpoints/step-000000003");
    let script = format!(
        "import sys; sys.path.insert(0, '{}/scripts/reference')\n\
         from ddp_train import Cnn\n\
         from safetensors.torch import load_file\n\
         m = Cnn(); m.load_state_dict(load_file('{}/model.safetensors'), strict=True)\n\
         o = load_file('{}/optimizer.safetensors')\n\
         assert sorted(o) == sorted(k + '.momentum_buffer' for k in m.state_dict()), sorted(o)\n\
         print('ok', len(m.state_dict()))",
        env!("CARGO_MANIFEST_DIR"),
        ckpt.display(),
        ckpt.display()
    );
    let out = run(
        {
            let mut c = Command::new(&python);
            c.args(["-c", &script]);
            c
        },
        Duration::from_secs(120),
    );
    out.assert_success();
    assert!(out.stdout.contains("ok 8"), "{}", out.report());
}

/// Names and bytes of every file under `dir`, to show a refused start changed nothing.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.starts_with(dir.join("logs")) {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn run_id_of(checkpoint: &Path) -> String {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(checkpoint.join("meta.json")).unwrap()).unwrap();
    meta["run_id"].as_str().unwrap_or_else(|| panic!("no run_id in {}", checkpoint.display())).to_string()
}

#[test]
fn a_fresh_start_in_another_runs_directory_is_refused_and_resume_refuses_another_seed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &job(""));
    let run_dir = dir.path().join("run");
    run(ringrun(2, &cfg, &run_dir, &["--set", "train.epochs=1"]), Duration::from_secs(120)).assert_success();
    let before = snapshot(&run_dir);
    let first = run_id_of(&run_dir.join("checkpoints/step-000000060"));
    assert_eq!(first.len(), 12, "{first}");

    // Another seed, fresh, with restarts allowed: refused before anything is written (it used to
    // restart from the first run's checkpoint and finish with a model mixed from both).
    let c = ringrun(2, &cfg, &run_dir, &["--set", "train.epochs=1", "--set", "train.seed=8"]);
    let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut c = Command::new(RINGRUN);
    c.args(["--max-restarts", "1"]).args(&args).env("RINGTRAIN_FAULT", "rank=1,step=3,action=kill");
    let out = run(c, Duration::from_secs(120));
    out.assert_failure();
    assert!(out.stderr.contains("already holds another run's checkpoints (newest step-000000060)"), "{}", out.report());
    assert!(out.stderr.contains("--resume auto"), "{}", out.report());
    assert_eq!(snapshot(&run_dir), before, "a refused start changed the run directory");

    // Resuming under another seed would continue a different experiment: refused, naming it.
    let out = run(
        ringrun(2, &cfg, &run_dir, &["--resume", "auto", "--set", "train.epochs=2", "--set", "train.seed=8"]),
        Duration::from_secs(120),
    );
    out.assert_failure();
    assert!(out.stderr.contains("configured differently (train.seed: 7 → 8)"), "{}", out.report());
    assert_eq!(snapshot(&run_dir), before, "a refused resume changed the run directory");

    // More epochs is the same run: it continues, under the same run id.
    run(ringrun(2, &cfg, &run_dir, &["--resume", "auto", "--set", "train.epochs=2"]), Duration::from_secs(120)).assert_success();
    assert_eq!(run_id_of(&run_dir.join("checkpoints/step-000000120")), first);
}

#[test]
fn rerunning_a_config_without_run_dir_starts_a_numbered_directory_and_resume_finds_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &job(""));
    let default = |extra: &[&str]| {
        let mut c = Command::new(RINGRUN);
        c.args(["--nproc-per-node", "2", RINGTRAIN, "--config"]).arg(&cfg).args(["--set", "train.epochs=1"]).args(extra);
        c.current_dir(dir.path()).env_remove("RINGTRAIN_FAULT");
        run(c, Duration::from_secs(120))
    };
    default(&[]).assert_success();
    let first = dir.path().join("runs/job");
    let before = snapshot(&first);
    // The same command again is a new run in runs/job-2; the first is untouched.
    let out = default(&["--set", "train.seed=8"]);
    out.assert_success();
    assert!(out.stderr.contains("run directory runs/job-2"), "{}", out.report());
    assert_eq!(snapshot(&first), before);
    let second = dir.path().join("runs/job-2");
    assert_ne!(run_id_of(&second.join("checkpoints/step-000000060")), run_id_of(&first.join("checkpoints/step-000000060")));
    // --resume auto continues the newest.
    let out = default(&["--set", "train.seed=8", "--set", "train.epochs=2", "--resume", "auto"]);
    out.assert_success();
    assert!(out.stderr.contains("run directory runs/job-2"), "{}", out.report());
    assert!(second.join("checkpoints/step-000000120").is_dir());
    assert!(!dir.path().join("runs/job-3").exists());
}
