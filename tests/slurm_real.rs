//! The worker under a real single-node Slurm: Debian's slurm-wlm and munge, with munged,
//! slurmctld and slurmd started for each test in a temp dir by scripts/slurm_local.sh (and stopped
//! when it ends, also on failure). srun starts the ranks with nothing faked; two job steps run side
//! by side in one allocation (the store collision the hardening fixed); and where srun has the
//! pmix plugin, the MPI backend under `srun --mpi=pmix`. Each trains to the same bits as ringrun.
//!
//! Skipped, with a SKIPPED line that says why, where the cluster cannot start: the daemons not
//! installed (scripts/setup.sh --python installs them), not root, or a daemon that does not come
//! up here (the line names it and shows its log). RINGTRAIN_REQUIRE_SLURM=1 makes those failures.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One cluster at a time: each is a full set of daemons on a 2-core runner, and all of them would
/// be the same node name.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/slurm_local.sh");

/// A skip for want of a cluster, or a failure where RINGTRAIN_REQUIRE_SLURM=1 (or
/// RINGTRAIN_NO_SKIP=1, as CI sets) demands one.
fn no_cluster(test: &str, why: &str) -> Option<Cluster> {
    if std::env::var("RINGTRAIN_REQUIRE_SLURM").is_ok_and(|v| v == "1") {
        panic!("RINGTRAIN_REQUIRE_SLURM=1 but {why}");
    }
    skip(test, why);
    None
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// A running cluster; dropping it stops the daemons (and then removes the temp dir).
struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl Cluster {
    /// Starts a cluster, or says why not (SKIPPED line) and returns `None`.
    fn start(test: &str) -> Option<Cluster> {
        let missing: Vec<&str> = ["munged", "slurmctld", "slurmd", "srun", "salloc", "sinfo"].into_iter().filter(|p| !on_path(p)).collect();
        if !missing.is_empty() {
            return no_cluster(
                test,
                &format!("{} not on PATH (scripts/setup.sh --python installs slurm-wlm and munge)", missing.join(", ")),
            );
        }
        if !Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0") {
            return no_cluster(test, "not root (slurmd runs job steps as their user)");
        }
        let lock = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("slurm.conf");
        // Built before the start, so that even a start that panics is stopped.
        let cluster = Cluster { dir, conf, _one_at_a_time: lock };
        let mut c = Command::new("bash");
        c.arg(SCRIPT).arg("start").arg(cluster.dir.path()).env("SLURM_LOCAL_TIMEOUT", "40");
        let out = run(c, Duration::from_secs(150));
        if !out.status.success() {
            // The script's message names the daemon that did not come up and shows its log.
            drop(cluster); // stopped (whatever did start) before the lock goes
            return no_cluster(test, &format!("the local Slurm cluster did not start:\n{}", out.stderr.trim_end()));
        }
        let line = format!("export SLURM_CONF={}", cluster.conf.display());
        assert!(out.stdout.lines().any(|l| l == line), "expected `{line}`\n{}", out.report());
        Some(cluster)
    }

    /// `program` as a client of this cluster: its slurm.conf, and none of the launch variables
    /// of whatever started the tests (srun passes its environment on to the tasks).
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if ["SLURM_", "OMPI_", "PMI_", "PMIX_"].iter().any(|p| k.starts_with(p)) {
                c.env_remove(k.as_ref());
            }
        }
        for v in
            ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RINGTRAIN_JOB_TOKEN", "RINGTRAIN_FAULT"]
        {
            c.env_remove(v);
        }
        c.env("SLURM_CONF", &self.conf).env("OMP_NUM_THREADS", "1").current_dir(self.dir.path());
        c
    }

    /// `srun -K -n N … ringtrain --config cfg --run-dir run_dir`.
    fn srun(&self, n: usize, srun_args: &[&str], cfg: &Path, run_dir: &Path) -> Command {
        let mut c = self.command("srun");
        // -K: a failed rank ends the step; -t: minutes, so a stuck step ends by itself.
        c.args(["-K", "-t", "5", "-n", &n.to_string()])
            .args(srun_args)
            .arg(RINGTRAIN)
            .arg("--config")
            .arg(cfg)
            .arg("--run-dir")
            .arg(run_dir);
        c
    }

    /// The daemons' last log lines, for a failure's message.
    fn logs(&self) -> String {
        ["slurmctld", "slurmd"]
            .iter()
            .map(|d| {
                let text = std::fs::read_to_string(self.dir.path().join(format!("log/{d}.log"))).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!("--- {d}.log (end) ---\n{}", lines[lines.len().saturating_sub(20)..].join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs `c`, failing with its output and the daemons' logs unless it succeeds.
    fn run_ok(&self, c: Command) -> Output {
        let out = run(c, Duration::from_secs(180));
        assert!(out.status.success(), "expected success\n{}\n{}", out.report(), self.logs());
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // No panics here (this may run while unwinding); a stop that hangs is killed.
        let Ok(mut child) =
            Command::new("bash").arg(SCRIPT).arg("stop").arg(self.dir.path()).stdin(Stdio::null()).stdout(Stdio::null()).spawn()
        else {
            return;
        };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(90) {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The common small MLP job, with `backend` and `epochs`.
fn cfg(dir: &Path, backend: &str, epochs: usize) -> PathBuf {
    write_config(
        dir,
        &format!("{backend}-{epochs}.yaml"),
        &mlp_config(10, "")
            .replace("epochs: 1", &format!("epochs: {epochs}"))
            .replace("timeout_secs: 20", &format!("timeout_secs: 30, backend: {backend}")),
    )
}

/// The parameter hashes of the same job under `ringrun --nproc-per-node 2`.
fn ringrun_reference(dir: &Path, cfg: &Path) -> Vec<String> {
    let ring_dir = dir.join("ringrun");
    run(ringrun(2, cfg, &ring_dir, &[]), Duration::from_secs(120)).assert_success();
    rank_hashes(&ring_dir, 2)
}

fn rank_log(run_dir: &Path, r: usize) -> String {
    let p = run_dir.join(format!("logs/rank{r}.log"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The line of rank 0's log that names the store the step derived from Slurm's variables.
fn store_line(run_dir: &Path) -> String {
    let log = rank_log(run_dir, 0);
    log.lines()
        .find(|l| l.contains("derived from Slurm's node list"))
        .map(|l| l.split("store at ").nth(1).unwrap_or(l).to_string())
        .unwrap_or_else(|| panic!("no store line in rank 0's log:\n{log}"))
}

/// Both ranks ran under Slurm, as rank r of 2.
fn assert_two_slurm_ranks(run_dir: &Path) {
    for r in 0..2 {
        let log = rank_log(run_dir, r);
        assert!(log.contains(&format!("rank {r} of 2")) && log.contains("Slurm environment"), "rank {r}:\n{log}");
    }
}

#[test]
fn srun_trains_to_the_same_result_as_ringrun() {
    let Some(cluster) = Cluster::start("srun_trains_to_the_same_result_as_ringrun") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = cfg(dir.path(), "auto", 1);
    let reference = ringrun_reference(dir.path(), &config);
    let run_dir = dir.path().join("srun");
    let out = cluster.run_ok(cluster.srun(2, &[], &config, &run_dir));
    assert_eq!(out.stdout.matches("final:").count(), 1, "only rank 0 prints the result\n{}", out.report());
    assert_two_slurm_ranks(&run_dir);
    assert!(rank_log(&run_dir, 0).contains("backend ring"), "{}", rank_log(&run_dir, 0));
    assert_eq!(rank_hashes(&run_dir, 2), reference, "srun vs ringrun");
    assert!(!metrics_lines(&run_dir, "epoch").is_empty(), "no epoch in metrics.jsonl");
}

#[test]
fn two_job_steps_side_by_side_in_one_allocation() {
    let Some(cluster) = Cluster::start("two_job_steps_side_by_side_in_one_allocation") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Six epochs (about a second a step here), so the steps surely overlap (checked below).
    let config = cfg(dir.path(), "auto", 6);
    let reference = ringrun_reference(dir.path(), &config);
    let (a, b) = (dir.path().join("step-a"), dir.path().join("step-b"));
    // --exact: each step takes only its own 2 of the allocation's 4 CPUs, so both start at once.
    let steps = r#"
        srun -K -n 2 --exact "$1" --config "$2" --run-dir "$3" & a=$!
        srun -K -n 2 --exact "$1" --config "$2" --run-dir "$4" & b=$!
        wait $a; sa=$?
        wait $b; sb=$?
        echo "step exit statuses: $sa $sb"
        [ $sa -eq 0 ] && [ $sb -eq 0 ]
    "#;
    let mut c = cluster.command("salloc");
    c.args(["-n", "4", "-t", "5", "bash", "-c", steps, "bash", RINGTRAIN]).arg(&config).arg(&a).arg(&b);
    let out = cluster.run_ok(c);
    for run_dir in [&a, &b] {
        assert_two_slurm_ranks(run_dir);
        assert_eq!(rank_hashes(run_dir, 2), reference, "{} vs ringrun\n{}", run_dir.display(), out.report());
    }
    // Each step found its own store (port from the job *and* step id).
    let (store_a, store_b) = (store_line(&a), store_line(&b));
    assert_ne!(store_a, store_b, "both steps used one store");
    // And they really ran at the same time: the logs' RFC 3339 timestamps compare as strings.
    let span = |d: &Path| {
        let log = rank_log(d, 0);
        let stamps: Vec<&str> =
            log.lines().filter_map(|l| l.split_whitespace().next()).filter(|t| t.starts_with("20") && t.contains('T')).collect();
        (stamps.first().unwrap().to_string(), stamps.last().unwrap().to_string())
    };
    let (sa, sb) = (span(&a), span(&b));
    assert!(sa.0 < sb.1 && sb.0 < sa.1, "the steps did not overlap: {sa:?} and {sb:?}");
}

#[test]
fn mpi_backend_under_srun_with_pmix() {
    let test = "mpi_backend_under_srun_with_pmix";
    if !ringtrain::comm::mpi::BUILT {
        skip(test, "built without the MPI backend");
        return;
    }
    let Some(cluster) = Cluster::start(test) else {
        return;
    };
    let mut list = cluster.command("srun");
    list.arg("--mpi=list");
    let plugins = run(list, Duration::from_secs(30));
    // srun prints the list on stderr.
    if !format!("{}{}", plugins.stdout, plugins.stderr).contains("pmix") {
        skip(test, &format!("this srun has no pmix plugin:\n{}", plugins.report()));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reference = ringrun_reference(dir.path(), &cfg(dir.path(), "ring", 1));
    let run_dir = dir.path().join("pmix");
    cluster.run_ok(cluster.srun(2, &["--mpi=pmix"], &cfg(dir.path(), "mpi", 1), &run_dir));
    assert_two_slurm_ranks(&run_dir);
    assert!(rank_log(&run_dir, 0).contains("backend mpi"), "{}", rank_log(&run_dir, 0));
    // Two ranks: one addition per element, so MPI's sum has the ring's bits.
    assert_eq!(rank_hashes(&run_dir, 2), reference, "srun --mpi=pmix vs ringrun");
}

/// Started the ways that used to go wrong under a real Slurm: `srun --mpi=pmi2` (its PMI_RANK made
/// the ring call MPI_Init, which Debian's Open MPI aborts) trains with the ring; an sbatch script
/// and a salloc shell that run the worker without srun stop at once, saying to use srun, instead
/// of waiting as rank 0 of 2 (sbatch) or training alone as world 1 (salloc).
#[test]
fn pmi2_and_a_missing_srun() {
    let test = "pmi2_and_a_missing_srun";
    let Some(cluster) = Cluster::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = cfg(dir.path(), "auto", 1);
    let reference = ringrun_reference(dir.path(), &config);
    let run_dir = dir.path().join("pmi2");
    cluster.run_ok(cluster.srun(2, &["--mpi=pmi2"], &config, &run_dir));
    for r in 0..2 {
        // pmi2 describes the ranks (PMI_RANK); the store still comes from Slurm's variables.
        let log = rank_log(&run_dir, r);
        assert!(log.contains(&format!("rank {r} of 2")) && log.contains("PMI_RANK"), "rank {r}:\n{log}");
    }
    let log = rank_log(&run_dir, 0);
    assert!(log.contains("backend ring") && log.contains("derived from Slurm"), "{log}");
    assert_eq!(rank_hashes(&run_dir, 2), reference, "srun --mpi=pmi2 vs ringrun");

    // sbatch --wait: the batch step runs the worker itself.
    let out_file = dir.path().join("batch.out");
    let mut c = cluster.command("sbatch");
    c.args(["--wait", "-n", "2", "-t", "2", "-o"]).arg(&out_file).arg("--wrap").arg(format!(
        "{RINGTRAIN} --config {} --run-dir {}",
        config.display(),
        dir.path().join("batch").display()
    ));
    let started = Instant::now();
    let out = run(c, Duration::from_secs(120));
    let batch_log = std::fs::read_to_string(&out_file).unwrap_or_default();
    assert!(!out.status.success(), "the batch job should fail\n{}\n{batch_log}", out.report());
    assert!(batch_log.contains("srun") && batch_log.contains("sbatch"), "{batch_log}\n{}", out.report());
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}: it waited instead of stopping", started.elapsed());

    // salloc running the worker in the allocation's shell.
    let mut c = cluster.command("salloc");
    c.args(["-n", "2", "-t", "2"]).arg(RINGTRAIN).arg("--config").arg(&config).arg("--run-dir").arg(dir.path().join("salloc"));
    let out = run(c, Duration::from_secs(120));
    assert!(!out.status.success(), "{}", out.report());
    assert!(out.stderr.contains("salloc") && out.stderr.contains("srun"), "{}", out.report());
    assert!(!dir.path().join("salloc/model.safetensors").exists(), "it trained alone");
}

/// `scontrol show job`'s JobState for `job`.
fn job_state(cluster: &Cluster, job: &str) -> String {
    let mut c = cluster.command("scontrol");
    c.args(["show", "job", job]);
    let out = run(c, Duration::from_secs(30));
    out.stdout.split_whitespace().find_map(|w| w.strip_prefix("JobState=")).unwrap_or("?").to_string()
}

#[test]
fn a_requeued_batch_job_checkpoints_on_sigterm_and_resumes() {
    let test = "a_requeued_batch_job_checkpoints_on_sigterm_and_resumes";
    let Some(cluster) = Cluster::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = cfg(dir.path(), "auto", 30);
    let reference = ringrun_reference(dir.path(), &config);
    let run_dir = dir.path().join("requeued");
    // deploy/slurm-requeue.sbatch's shape, without the time-limit trap: the test requeues itself.
    let script = dir.path().join("job.sh");
    std::fs::write(&script, format!("#!/bin/bash\nsrun -K {RINGTRAIN} --config {} --run-dir {}\n", config.display(), run_dir.display()))
        .unwrap();
    let out_file = dir.path().join("job.out");
    let mut c = cluster.command("sbatch");
    c.args(["--parsable", "--requeue", "--open-mode=append", "-n", "2", "-t", "5", "-o"]).arg(&out_file).arg(&script);
    let job = cluster.run_ok(c).stdout.trim().to_string();

    // Requeued once training is under way: Slurm sends SIGTERM to the step's tasks, then kills
    // them KillWait (5 s here) later.
    let metrics = run_dir.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(90);
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.matches("\"kind\":\"step\"").count()) < 5 {
        assert!(Instant::now() < deadline, "training did not start\n{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = cluster.command("scontrol");
    c.args(["requeue", &job]);
    cluster.run_ok(c);
    // A requeued job waits two minutes before it is eligible again; no need to here.
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let state = job_state(&cluster, &job);
        if state == "COMPLETED" {
            break;
        }
        assert!(!["FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"].contains(&state.as_str()), "job {job} {state}\n{}", cluster.logs());
        assert!(Instant::now() < deadline, "job {job} still {state}\n{}", cluster.logs());
        if state == "PENDING" {
            let mut c = cluster.command("scontrol");
            c.args(["update", &format!("JobId={job}"), "StartTime=now"]);
            let _ = run(c, Duration::from_secs(30));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let batch_log = std::fs::read_to_string(&out_file).unwrap_or_default();
    assert!(batch_log.contains("stopped after") && batch_log.contains("on request"), "the first run did not stop cleanly:\n{batch_log}");
    for r in 0..2 {
        let log = rank_log(&run_dir, r);
        assert!(log.contains("(requeued by Slurm): resuming") && log.contains("written at shutdown"), "rank {r}:\n{log}");
    }
    assert_eq!(rank_hashes(&run_dir, 2), reference, "requeued vs uninterrupted");
}
