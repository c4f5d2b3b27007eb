//! The worker under `mpirun` (Open MPI) and under a simulated `srun`, unchanged: the MPI backend
//! and the ring with its rendezvous found through MPI or Slurm's variables.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn mpirun_available() -> bool {
    let ok = Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        skip("mpi_launch", "mpirun not found (scripts/setup.sh installs Open MPI)");
    }
    ok && ringtrain::comm::mpi::BUILT
}

fn mpirun(np: usize, cfg: &Path, run_dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    // Root in CI; more ranks than the 2 cores here.
    c.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string(), RINGTRAIN, "--config"])
        .arg(cfg)
        .arg("--run-dir")
        .arg(run_dir)
        .args(extra)
        .env_remove("RINGTRAIN_FAULT")
        .env("OMP_NUM_THREADS", "1");
    c
}

fn cfg(dir: &Path, backend: &str) -> std::path::PathBuf {
    write_config(
        dir,
        &format!("{backend}.yaml"),
        &mlp_config(10, "").replace("timeout_secs: 20", &format!("timeout_secs: 20, backend: {backend}")),
    )
}

#[test]
fn mpi_backend_matches_the_ring() {
    if !mpirun_available() {
        return;
    }
    for np in [2usize, 3] {
        let dir = tempfile::tempdir().unwrap();
        let ring_dir = dir.path().join("ring");
        run(ringrun(np, &cfg(dir.path(), "ring"), &ring_dir, &[]), Duration::from_secs(120)).assert_success();
        let mpi_dir = dir.path().join("mpi");
        let out = run(mpirun(np, &cfg(dir.path(), "mpi"), &mpi_dir, &[]), Duration::from_secs(120));
        out.assert_success();
        assert!(out.stderr.contains("backend mpi") && out.stderr.contains("Open MPI environment"), "{}", out.report());
        let (ring, mpi) = (rank_hashes(&ring_dir, np), rank_hashes(&mpi_dir, np));
        assert!(mpi.iter().all(|h| h == &mpi[0]), "MPI replicas differ: {mpi:?}");
        if np == 2 {
            // One addition per element (a + b = b + a): the same bits whatever the algorithm.
            assert_eq!(mpi, ring, "np 2 must be bitwise equal");
        } else {
            // Three addends are summed in a different order by Open MPI's algorithm than by the
            // ring; float rounding then differs in the last bits.
            let rel = max_relative_difference(&load_params(&mpi_dir), &load_params(&ring_dir));
            assert!(rel < 1e-5, "np 3: relative difference {rel:e}");
        }
    }
}

#[test]
fn ring_backend_under_mpirun_finds_the_store_through_mpi() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ring_dir = dir.path().join("ringrun");
    run(ringrun(2, &cfg(dir.path(), "ring"), &ring_dir, &[]), Duration::from_secs(120)).assert_success();
    let under = dir.path().join("mpirun");
    let out = run(mpirun(2, &cfg(dir.path(), "ring"), &under, &[]), Duration::from_secs(120));
    out.assert_success();
    assert!(out.stderr.contains("shared over MPI") && out.stderr.contains("backend ring"), "{}", out.report());
    assert_eq!(rank_hashes(&under, 2), rank_hashes(&ring_dir, 2));
    assert_eq!(out.stdout.matches("final:").count(), 1, "only rank 0 prints the result\n{}", out.report());
}

#[test]
fn simulated_srun_trains_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let config = cfg(dir.path(), "auto");
    let ring_dir = dir.path().join("ringrun");
    run(ringrun(2, &config, &ring_dir, &[]), Duration::from_secs(120)).assert_success();
    let run_dir = dir.path().join("srun");
    // As srun would start them: one process per task, Slurm's variables, no MASTER_*.
    let job_id = 100_000 + std::process::id() % 20_000;
    let children = srun_step(&config, &run_dir, job_id, Some(0), 2);
    for child in children {
        let out = child.join().unwrap();
        out.assert_success();
    }
    assert_eq!(rank_hashes(&run_dir, 2), rank_hashes(&ring_dir, 2));
    let log = std::fs::read_to_string(run_dir.join("logs/rank0.log")).unwrap();
    assert!(
        log.contains("Slurm environment") && log.contains(&format!("localhost:{}", ringtrain::launch::slurm_port(job_id as u64, 0))),
        "{log}"
    );
}

#[test]
fn a_rank_killed_under_mpirun_ends_the_job() {
    if !mpirun_available() {
        return;
    }
    for backend in ["mpi", "ring"] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            dir.path(),
            "job.yaml",
            &mlp_config(4, "")
                .replace("epochs: 1", "epochs: 50")
                .replace("timeout_secs: 20", &format!("timeout_secs: 10, backend: {backend}")),
        );
        let mut c = mpirun(3, &config, &dir.path().join("run"), &[]);
        c.env("RINGTRAIN_FAULT", "rank=1,step=10,action=kill");
        let out = run(c, Duration::from_secs(60));
        out.assert_failure();
        assert!(out.elapsed < Duration::from_secs(10 + 5), "backend {backend}: took {:?}\n{}", out.elapsed, out.report());
    }
}

#[test]
fn sharded_optimizer_and_bf16_gradients_under_mpi() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let adam = |backend: &str, extra: &str| {
        write_config(
            dir.path(),
            &format!("{backend}_{}.yaml", extra.len()),
            &mlp_config(10, extra)
                .replace("timeout_secs: 20", &format!("timeout_secs: 20, backend: {backend}"))
                .replace("{name: sgd, lr: 0.1, momentum: 0.9}", "{name: adam, lr: 0.01}"),
        )
    };
    // ZeRO-1 over MPI_Reduce_scatter / MPI_Allgatherv: at 2 ranks one addition per element, so
    // the same bits as the unsharded MPI run.
    let plain = dir.path().join("plain");
    run(mpirun(2, &adam("mpi", ""), &plain, &[]), Duration::from_secs(120)).assert_success();
    let sharded = dir.path().join("sharded");
    let out = run(
        mpirun(2, &adam("mpi", "ddp: {bucket_cap_mb: 0.001, first_bucket_cap_mb: 0.001}"), &sharded, &["--set", "optimizer.shard=true"]),
        Duration::from_secs(120),
    );
    out.assert_success();
    assert!(out.stderr.contains("ZeRO-1"), "{}", out.report());
    assert_eq!(rank_hashes(&sharded, 2), rank_hashes(&plain, 2), "sharded under MPI");

    // bf16 gradients: MPI's user-defined bf16 sum and the ring's give the same bits at 2 ranks
    // (one rounded addition per element), and differ from fp32 (the compression is real).
    let bf16 = "ddp: {reduce_dtype: bf16}";
    let mpi_bf16 = dir.path().join("mpi_bf16");
    run(mpirun(2, &adam("mpi", bf16), &mpi_bf16, &[]), Duration::from_secs(120)).assert_success();
    let ring_bf16 = dir.path().join("ring_bf16");
    run(ringrun(2, &adam("ring", bf16), &ring_bf16, &[]), Duration::from_secs(120)).assert_success();
    let h = rank_hashes(&mpi_bf16, 2);
    assert!(h[0] == h[1], "bf16 replicas differ: {h:?}");
    assert_eq!(h, rank_hashes(&ring_bf16, 2), "MPI and ring bf16 sums");
    assert_ne!(h, rank_hashes(&plain, 2), "bf16 gradients changed nothing");
    let acc = |d: &Path| metrics_lines(d, "epoch").last().unwrap()["test_acc"].as_f64().unwrap();
    assert!((acc(&mpi_bf16) - acc(&plain)).abs() <= 0.03, "accuracy bf16 {} vs fp32 {}", acc(&mpi_bf16), acc(&plain));
}
