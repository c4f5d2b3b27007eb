//! torchrun as the launcher: its agent serves a c10d TCPStore on MASTER_PORT and tells the
//! workers to use it (TORCHELASTIC_USE_AGENT_STORE=True). The store client against PyTorch's own
//! TCPStore, and `torchrun --no-python ringtrain …` bitwise equal to ringrun. The multi-node form
//! (c10d rendezvous across emulated nodes) is in multinode.rs. Needs the test venv's torch.

mod common;
use common::*;
use ringtrain::rendezvous::{C10dStore, Store, StoreError};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A PyTorch TCPStore server (libuv, torch's default) that sets `from_py`, answers `from_rust`
/// with `echo`, checks what Rust's `add`s left, and exits when Rust sets `done`.
const SERVER: &str = r#"
import datetime, sys, torch.distributed as dist
s = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30))
print(s.port, flush=True)
s.set("from_py", b"hello")
s.set("echo", s.get("from_rust") + b"!")
s.wait(["done"])
print("counter", s.get("counter").decode(), flush=True)
"#;

#[test]
fn the_c10d_client_speaks_pytorchs_tcpstore_protocol() {
    let Some(py) = python_with_torch("torchrun") else { return };
    let mut server = Command::new(py).args(["-c", SERVER]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = format!("127.0.0.1:{}", line.trim());

    let store = C10dStore::connect(&addr, Duration::from_secs(10)).unwrap();
    assert_eq!(store.get("from_py", Duration::from_secs(10)).unwrap(), b"hello");
    assert_eq!(store.add("counter", 2).unwrap(), 2);
    assert_eq!(store.add("counter", 3).unwrap(), 5);
    // A wait that times out names what is missing and leaves the connection usable.
    let err = store.wait(&["from_py".into(), "never".into()], Duration::from_millis(200)).unwrap_err();
    assert!(matches!(&err, StoreError::Timeout { keys, .. } if keys == &["never".to_string()]), "{err}");
    store.set("from_rust", b"ping").unwrap();
    assert_eq!(store.get("echo", Duration::from_secs(10)).unwrap(), b"ping!");
    store.set("done", b"").unwrap();

    line.clear();
    out.read_line(&mut line).unwrap();
    // Python reads Rust's counter as c10d's own clients write it (decimal text).
    assert_eq!(line.trim(), "counter 5");
    assert!(server.wait().unwrap().success());
}

#[test]
fn torchrun_no_python_trains_bitwise_equal_to_ringrun() {
    let Some(py) = python_with_torch("torchrun") else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, ""));
    let by_ringrun = dir.path().join("ringrun");
    run(ringrun(2, &cfg, &by_ringrun, &[]), Duration::from_secs(120)).assert_success();

    let by_torchrun = dir.path().join("torchrun");
    let mut c = Command::new(py);
    c.args(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", &free_port().to_string(), "--no-python", RINGTRAIN]);
    c.arg("--config").arg(&cfg).arg("--run-dir").arg(&by_torchrun);
    c.env_remove("RINGTRAIN_FAULT").env_remove("RINGTRAIN_JOB_TOKEN");
    let out = run(c, Duration::from_secs(120));
    out.assert_success();
    assert!(out.stderr.contains("rendezvous through torchrun's agent store"), "{}", out.report());
    assert_eq!(rank_hashes(&by_torchrun, 2), rank_hashes(&by_ringrun, 2));
    assert_eq!(
        std::fs::read(by_torchrun.join("model.safetensors")).unwrap(),
        std::fs::read(by_ringrun.join("model.safetensors")).unwrap(),
        "the final models differ"
    );
}

#[test]
fn a_worker_told_to_use_an_agent_store_that_is_not_there_says_so() {
    // TORCHELASTIC_USE_AGENT_STORE=True but MASTER_PORT holds a ringtrain store, not c10d's:
    // the worker names the address and what it expected instead of misreading the bytes.
    let server = ringtrain::rendezvous::TcpStoreServer::start("127.0.0.1:0", "tok").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, ""));
    let mut c = Command::new(RINGTRAIN);
    c.arg("--config").arg(&cfg).arg("--run-dir").arg(dir.path().join("run"));
    c.envs([("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("TORCHELASTIC_USE_AGENT_STORE", "True")]);
    c.env("MASTER_PORT", server.local_addr().port().to_string());
    let out = run(c, Duration::from_secs(60));
    out.assert_failure();
    assert!(out.stderr.contains("no c10d TCPStore answers") && out.stderr.contains(&server.local_addr().to_string()), "{}", out.report());
}

#[test]
fn torchruns_failure_summary_shows_the_workers_error() {
    let Some(py) = python_with_torch("torchrun") else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, ""));
    let mut c = Command::new(py);
    c.args(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", &free_port().to_string(), "--no-python", RINGTRAIN]);
    c.arg("--config").arg(&cfg).arg("--run-dir").arg(dir.path().join("run")).args(["--set", "train.nonsense=3"]);
    let out = run(c, Duration::from_secs(60));
    out.assert_failure();
    // Written to TORCHELASTIC_ERROR_FILE, so torchrun's summary has the cause, not "<N/A>".
    assert!(out.stderr.contains("traceback : ringtrain: error: override `train.nonsense=3`"), "{}", out.report());
}

#[test]
fn a_torchrun_restart_resumes_from_the_checkpoint_and_ends_as_an_uninterrupted_run() {
    let Some(py) = python_with_torch("torchrun") else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, "checkpoint: {every_steps: 4}"));
    let uninterrupted = dir.path().join("ringrun");
    run(ringrun(2, &cfg, &uninterrupted, &[]), Duration::from_secs(120)).assert_success();

    let restarted = dir.path().join("torchrun");
    let mut c = Command::new(py);
    c.args(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1"]);
    c.args(["--master-port", &free_port().to_string(), "--no-python", RINGTRAIN]);
    c.arg("--config").arg(&cfg).arg("--run-dir").arg(&restarted);
    // Rank 1 is killed before step 10 of the first attempt; torchrun starts the group again.
    c.env("RINGTRAIN_FAULT", "rank=1,step=10,action=kill").env_remove("RINGTRAIN_JOB_TOKEN");
    let out = run(c, Duration::from_secs(180));
    out.assert_success();
    let resumed = std::fs::read_to_string(restarted.join("logs").join("rank0.log")).unwrap_or_default() + &out.stderr;
    assert!(
        resumed.contains("restart 1 of the group") && resumed.contains("resuming from"),
        "no resume in the second attempt\n{}",
        out.report()
    );
    assert_eq!(rank_hashes(&restarted, 2), rank_hashes(&uninterrupted, 2));
}
