//! MPI (Open MPI's mpirun, `comm.backend: mpi`): one process per rank. MPI cannot tell a
//! mismatched call or a lost peer; its watchdog ends the process at the timeout, naming the
//! collective, and mpirun ends the job.

use crate::conformance::{unlimited, Absent, Backend, Caps, Comm, Failures, Launch, HOST};
use ringtrain::comm::mpi::{MpiComm, MpiRuntime, BUILT};
use std::process::Command;
use std::time::Duration;

pub static BACKEND: Backend = Backend {
    name: "mpi",
    available,
    launch: Launch::Processes { launcher, join },
    worlds: &[2, 3],
    max_world: unlimited,
    caps: Caps { names_mismatches: false, failures: Failures::EndProcess, ..HOST },
};

fn available() -> Result<(), Absent> {
    if !BUILT {
        return Err(Absent::Tool("built without the `mpi` feature".into()));
    }
    match Command::new("mpirun").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err(Absent::Tool("mpirun not found (scripts/setup.sh installs Open MPI)".into())),
    }
}

fn launcher(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    // Root in CI; more ranks than cores here.
    c.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string()]).env("OMP_NUM_THREADS", "1");
    c
}

fn join(timeout: Duration) -> Result<Comm, String> {
    let rt = MpiRuntime::init().map_err(|e| e.to_string())?;
    Ok(Box::new(MpiComm::new(rt, timeout).map_err(|e| e.to_string())?))
}
