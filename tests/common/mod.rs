//! Helpers for tests that spawn the real binaries: a command with a timeout whose failure report
//! shows the command line, its exit status, stdout and stderr (in the spirit of ripgrep's
//! TestCommand).
#![allow(dead_code)]

use ringtrain::comm::{RingComm, RingOptions};
use ringtrain::rendezvous::{Store, TcpStore, TcpStoreServer};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const RINGRUN: &str = env!("CARGO_BIN_EXE_ringrun");
pub const RINGTRAIN: &str = env!("CARGO_BIN_EXE_ringtrain");

pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub shown: String,
}

impl Output {
    pub fn report(&self) -> String {
        format!(
            "command: {}\nstatus: {:?} after {:.1}s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.shown,
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }

    pub fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "expected success\n{}", self.report());
        self
    }

    pub fn assert_failure(&self) -> &Self {
        assert!(!self.status.success(), "expected failure\n{}", self.report());
        self
    }
}

/// Runs `cmd` to completion, killing it after `timeout` (a hang is a test failure, not a stuck CI).
pub fn run(mut cmd: Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Its own process group, so a timeout ends what it started too (a script's workers would
    // otherwise hold the output pipes open, and the test would wait on them past its timeout).
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {shown}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > timeout {
            // SAFETY: signalling the process group the child leads.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.kill();
            let status = child.wait().unwrap();
            let o = Output { status, stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap(), elapsed: started.elapsed(), shown };
            panic!("timed out after {timeout:?}\n{}", o.report());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap(), elapsed: started.elapsed(), shown }
}

/// Writes a config file into `dir` and returns its path.
pub fn write_config(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, yaml).unwrap();
    p
}

/// A small MLP job on synthetic data; `extra` is appended (YAML).
pub fn mlp_config(batch_size: usize, extra: &str) -> String {
    format!(
        "model: {{name: mlp, hidden: [32, 16]}}
data: {{format: synthetic, synthetic: {{train_samples: 1200, test_samples: 300, shape: [12], classes: 3, seed: 5}}}}
train: {{epochs: 1, batch_size: {batch_size}, seed: 7, log_every_steps: 10}}
optimizer: {{name: sgd, lr: 0.1, momentum: 0.9}}
comm: {{timeout_secs: 20}}
{extra}"
    )
}

/// ringrun with `n` workers running `ringtrain --config cfg --run-dir run_dir`.
pub fn ringrun(n: usize, cfg: &Path, run_dir: &Path, extra_args: &[&str]) -> Command {
    let mut c = Command::new(RINGRUN);
    c.arg("--nproc-per-node").arg(n.to_string()).arg(RINGTRAIN).arg("--config").arg(cfg).arg("--run-dir").arg(run_dir);
    c.args(extra_args);
    c.env_remove("RINGTRAIN_FAULT");
    c
}

/// The parameter hash rank `r` reported in `run_dir`.
pub fn rank_hash(run_dir: &Path, r: usize) -> String {
    let p = run_dir.join("ranks").join(format!("rank{r}.json"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap();
    v["param_hash"].as_str().unwrap().to_string()
}

/// The parameter hash each rank reported, indexed by rank.
pub fn rank_hashes(run_dir: &Path, world: usize) -> Vec<String> {
    (0..world).map(|r| rank_hash(run_dir, r)).collect()
}

/// The largest ‖a − b‖ / ‖b‖ over same-named tensors.
pub fn max_relative_difference(a: &[(String, tch::Tensor)], b: &[(String, tch::Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            // In f64, so integer buffers (BatchNorm's num_batches_tracked) compare too.
            let (ta, tb) = (ta.to_kind(tch::Kind::Double), tb.to_kind(tch::Kind::Double));
            (&ta - &tb).norm().double_value(&[]) / tb.norm().double_value(&[]).max(1e-12)
        })
        .fold(0.0, f64::max)
}

/// Final parameters written by rank 0.
pub fn load_params(run_dir: &Path) -> Vec<(String, tch::Tensor)> {
    let mut v = tch::Tensor::read_safetensors(run_dir.join("model.safetensors")).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `scripts/<name>` in this repository.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name)
}

/// A Python with torch and safetensors for the tests that compare with PyTorch: RINGTRAIN_PYTHON,
/// else the venv `scripts/setup.sh --python` makes in $RINGTRAIN_CACHE (default ~/.cache/ringtrain).
/// `None` (with a SKIPPED line past libtest's capture) when there is none.
pub fn python_with_torch(test: &str) -> Option<String> {
    let cache = std::env::var("RINGTRAIN_CACHE").ok().or_else(|| std::env::var("HOME").ok().map(|h| format!("{h}/.cache/ringtrain")));
    let candidates = std::env::var("RINGTRAIN_PYTHON").ok().into_iter().chain(cache.map(|c| format!("{c}/pytorch-venv/bin/python")));
    for p in candidates {
        if Command::new(&p).args(["-c", "import torch, safetensors"]).output().is_ok_and(|o| o.status.success()) {
            return Some(p);
        }
    }
    skip(test, "no Python with torch and safetensors (scripts/setup.sh --python, or set RINGTRAIN_PYTHON)");
    None
}

/// Says a test is skipped because `why` (a tool or file missing), past libtest's capture; under
/// `RINGTRAIN_NO_SKIP=1` (what `.ci/run` sets) a skip is a failure instead, so CI cannot pass
/// quietly without the comparison it was meant to make.
pub fn skip(test: &str, why: &str) {
    if std::env::var("RINGTRAIN_NO_SKIP").is_ok_and(|v| v == "1") {
        panic!("{test} cannot run: {why} (RINGTRAIN_NO_SKIP=1 makes that a failure)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// A Python with torch (as `python_with_torch`) that also imports `module` (torchvision,
/// tensorboard); `None` with a SKIPPED line otherwise.
pub fn python_with_torch_and(test: &str, module: &str) -> Option<String> {
    let python = python_with_torch(test)?;
    if Command::new(&python).args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success()) {
        return Some(python);
    }
    skip(test, &format!("no {module} in {python} (scripts/setup.sh --python installs it)"));
    None
}

/// The `kind` records ("step", "eval", "epoch") of a run's metrics.jsonl, in order.
pub fn metrics_lines(run_dir: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == kind)
        .collect()
}

/// One simulated srun job step of `world` tasks (Slurm's variables, no launcher): the workers'
/// outputs.
pub fn srun_step(cfg: &Path, run_dir: &Path, job: u32, step: Option<u32>, world: usize) -> Vec<std::thread::JoinHandle<Output>> {
    srun_step_with(cfg, run_dir, job, step, world, false)
}

/// As `srun_step`; `pmi2`: also the variables srun's pmi2 plugin sets (PMI_RANK, PMI_SIZE).
pub fn srun_step_with(
    cfg: &Path,
    run_dir: &Path,
    job: u32,
    step: Option<u32>,
    world: usize,
    pmi2: bool,
) -> Vec<std::thread::JoinHandle<Output>> {
    (0..world)
        .map(|rank| {
            let mut c = Command::new(RINGTRAIN);
            c.arg("--config").arg(cfg).arg("--run-dir").arg(run_dir);
            for v in [
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "MASTER_ADDR",
                "MASTER_PORT",
                "RINGTRAIN_JOB_TOKEN",
                "RINGTRAIN_FAULT",
            ] {
                c.env_remove(v);
            }
            c.envs([
                ("SLURM_PROCID", rank.to_string()),
                ("SLURM_LOCALID", rank.to_string()),
                ("SLURM_NTASKS", world.to_string()),
                ("SLURM_NTASKS_PER_NODE", world.to_string()),
                ("SLURM_JOB_NODELIST", "localhost".to_string()),
                ("SLURM_JOB_ID", job.to_string()),
                ("OMP_NUM_THREADS", "1".to_string()),
            ]);
            if let Some(s) = step {
                c.env("SLURM_STEP_ID", s.to_string());
            }
            if pmi2 {
                c.env("PMI_RANK", rank.to_string()).env("PMI_SIZE", world.to_string());
            }
            std::thread::spawn(move || run(c, Duration::from_secs(120)))
        })
        .collect()
}

/// Runs `f(rank, comm)` on `world` threads joined in one ring; returns each rank's result.
pub fn with_ring<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, &mut RingComm) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let server = TcpStoreServer::start("127.0.0.1:0", "tok").unwrap();
    let addr = server.local_addr().to_string();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (addr, f) = (addr.clone(), f.clone());
            std::thread::spawn(move || {
                let store = TcpStore::connect(&addr, "tok", Duration::from_secs(10)).unwrap();
                let mut opts = RingOptions::new("tok", IpAddr::V4(Ipv4Addr::LOCALHOST), timeout);
                opts.segment_bytes = 4096; // many segments even for modest lengths
                let mut comm = RingComm::connect(&store as &dyn Store, rank, world, &opts).unwrap();
                f(rank, &mut comm)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// As `with_ring`, each rank's ring behind a shared handle (what `ringtrain::init` gives a
/// program and a `Ddp` keeps).
#[allow(dead_code)]
pub fn with_group<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, ringtrain::comm::CommHandle) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    with_group_over(world, timeout, false, f)
}

/// `with_group` whose ranks, one node's, link over shared memory (`shm`), where buckets become
/// segments every rank maps; else over TCP.
#[allow(dead_code)]
pub fn with_group_over<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    shm: bool,
    f: impl Fn(usize, ringtrain::comm::CommHandle) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let server = TcpStoreServer::start("127.0.0.1:0", "tok").unwrap();
    let addr = server.local_addr().to_string();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (addr, f) = (addr.clone(), f.clone());
            std::thread::spawn(move || {
                let store = TcpStore::connect(&addr, "tok", Duration::from_secs(10)).unwrap();
                let mut opts = RingOptions::new("tok", IpAddr::V4(Ipv4Addr::LOCALHOST), timeout);
                if shm {
                    (opts.node_id, opts.shm) = (Some("this-node".into()), true);
                    // Socket names carry the pid: groups of one test binary running at once
                    // need a label of their own (the store's port).
                    opts.label = format!("-g{}", addr.rsplit(':').next().unwrap_or(""));
                }
                let comm = RingComm::connect(&store as &dyn Store, rank, world, &opts).unwrap();
                f(rank, ringtrain::comm::CommHandle::new(Box::new(comm)))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// A TCP port free on 127.0.0.1 a moment ago, for a launcher that binds it itself (torchrun's
/// --master-port): two tests of one binary run at once, so a port from the process id collides.
#[allow(dead_code)]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// About 60 KB of simple, learnable English-like text.
pub fn write_text(dir: &Path) -> PathBuf {
    let src = dir.join("text");
    std::fs::create_dir_all(&src).unwrap();
    let (subjects, verbs, objects) = (
        ["the cat", "a dog", "my friend", "the old man"],
        ["sees", "likes", "finds", "eats"],
        ["the fish.", "a red ball.", "the moon.", "some bread."],
    );
    let mut x: u64 = 7;
    for f in 0..3 {
        let mut text = String::new();
        for _ in 0..1000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let r = (x >> 33) as usize;
            text.push_str(&format!("{} {} {}\n", subjects[r % 4], verbs[(r / 4) % 4], objects[(r / 16) % 4]));
        }
        std::fs::write(src.join(format!("part{f}")), text).unwrap();
    }
    src
}

/// Token files (`ringtrain prepare-text`) of `write_text`'s text in `dir/tokens`.
pub fn prepare_tokens(dir: &Path) -> PathBuf {
    let out = dir.join("tokens");
    let mut c = Command::new(RINGTRAIN);
    c.args(["prepare-text", "--input"]).arg(write_text(dir)).arg("--out").arg(&out);
    let o = run(c, Duration::from_secs(60));
    o.assert_success();
    assert!(o.stdout.contains("3 file(s)"), "{}", o.report());
    out
}

#[allow(dead_code)]
/// CIFAR-10 files with `per_file` records each: the label is which colour plane is brightest
/// (0–2, of 10 classes), so a model can learn something in a few steps.
pub fn write_cifar(dir: &Path, per_file: usize) -> PathBuf {
    let d = dir.join("cifar");
    std::fs::create_dir_all(&d).unwrap();
    let mut x: u64 = 11;
    let mut file = |name: &str| {
        let mut bytes = vec![];
        for _ in 0..per_file {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let label = ((x >> 33) % 3) as u8;
            bytes.push(label);
            for plane in 0..3u8 {
                for i in 0..1024u64 {
                    let noise = ((x >> 20).wrapping_add(i * 2654435761) % 64) as u8;
                    bytes.push(if plane == label { 150 + noise } else { 40 + noise });
                }
            }
        }
        std::fs::write(d.join(name), bytes).unwrap();
    };
    for i in 1..=5 {
        file(&format!("data_batch_{i}.bin"));
    }
    file("test_batch.bin");
    d
}
