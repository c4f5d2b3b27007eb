//! `ringtrain::init`: from the launch environment to a joined process group — who this process
//! is (ringrun / torchrun, mpirun, srun, or a lone process), which device it computes on, and a
//! communicator every rank shares.

use crate::comm::{AsComm, CommGuard, CommHandle};
use crate::device::DeviceChoice;
use crate::group::Runtime;
use crate::launch::{LaunchError, LaunchInfo, LaunchSource};
use std::collections::HashMap;
use std::path::PathBuf;

pub use crate::group::{Backend, CommConfig, LocalTransport};

/// What `init` needs to know; the defaults suit a CPU job under ringrun or torchrun.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// `Auto`: NCCL on CUDA, MPI under mpirun (when built in), else the built-in ring.
    pub backend: Backend,
    /// `Cpu`, `Cuda` (local rank r on cuda:r), or `Auto` (CUDA when a GPU is visible).
    pub device: DeviceChoice,
    /// Bound on every rendezvous wait and collective.
    pub timeout_secs: u64,
    /// Ring links between ranks on one node.
    pub local_transport: LocalTransport,
    /// Ring backend across nodes: the hierarchical all-reduce (`comm.hierarchical`).
    pub hierarchical: bool,
    /// Install logging: rank 0 at INFO on stderr, other ranks WARN, the rank in every line the
    /// calling thread logs (off when the program sets up `tracing` itself).
    pub logging: bool,
    /// Also log this rank at INFO to this file.
    pub log_file: Option<PathBuf>,
}

impl Default for InitOptions {
    fn default() -> Self {
        let comm = CommConfig::default();
        Self {
            backend: comm.backend,
            device: DeviceChoice::Cpu,
            timeout_secs: comm.timeout_secs,
            local_transport: comm.local_transport,
            hierarchical: comm.hierarchical,
            logging: true,
            log_file: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error("rank {rank}: joining the group (backend {}): {detail}", format!("{backend:?}").to_lowercase())]
    Join { rank: usize, backend: Backend, detail: String },
    #[error("logging: {0}")]
    Logging(std::io::Error),
}

/// A joined group of ranks: the communicator, and where this rank computes.
pub struct ProcessGroup {
    launch: LaunchInfo,
    device: tch::Device,
    /// The communicator, shared with every `Ddp` built from this group.
    comm: CommHandle,
    runtime: Option<Runtime>,
}

/// Joins the group described by this process's environment (`RANK`, `WORLD_SIZE`,
/// `MASTER_ADDR`, … as ringrun and torchrun set them; Open MPI's, PMI's or Slurm's variables; or
/// none: a group of one).
///
/// With CUDA (`device: Cuda` or `Auto`), call this before any other `tch` function: libtorch
/// decides once, at the first call that asks (even `tch::manual_seed`), whether it has CUDA, and
/// ringtrain loads libtorch's CUDA backend here, first thing. Called too late, `init` fails and
/// says so rather than train on the CPU; `ringtrain::device::load_cuda()` can be called earlier.
pub fn init(opts: InitOptions) -> Result<ProcessGroup, InitError> {
    let env: HashMap<String, String> = std::env::vars().collect();
    init_from_env(&env, opts)
}

/// As `init`, from an explicit environment map.
pub fn init_from_env(env: &HashMap<String, String>, opts: InitOptions) -> Result<ProcessGroup, InitError> {
    if opts.device != DeviceChoice::Cpu {
        // Before anything else can touch tch (see `init`). A failure is reported, or for Auto
        // accepted, by device::select below.
        let _ = crate::device::load_cuda();
    }
    let mut launch = LaunchInfo::from_env(env)?;
    let rank = launch.rank;
    if opts.logging {
        crate::telemetry::init_tracing(rank, opts.log_file.as_deref()).map_err(InitError::Logging)?;
        // The rank in every line this thread logs, for the life of the process.
        std::mem::forget(tracing::info_span!("rank", rank).entered());
    }
    // Before joining anyone: a rank without its GPU stops here with the reason.
    let device = crate::device::select(opts.device, launch.local_rank, launch.local_world_size)?;
    let comm_cfg = CommConfig {
        backend: opts.backend,
        timeout_secs: opts.timeout_secs,
        local_transport: opts.local_transport,
        hierarchical: opts.hierarchical,
    };
    let group = crate::group::join(&comm_cfg, &mut launch, env, device).map_err(|e| InitError::Join {
        rank,
        backend: opts.backend,
        detail: crate::telemetry::error_text(&e),
    })?;
    Ok(ProcessGroup { launch, device, comm: CommHandle::new(group.comm), runtime: Some(group.runtime) })
}

impl ProcessGroup {
    pub fn rank(&self) -> usize {
        self.launch.rank
    }

    pub fn world_size(&self) -> usize {
        self.launch.world_size
    }

    pub fn local_rank(&self) -> usize {
        self.launch.local_rank
    }

    pub fn local_world_size(&self) -> usize {
        self.launch.local_world_size
    }

    /// Rank 0: the one that logs, writes metrics and checkpoints.
    pub fn is_main(&self) -> bool {
        self.launch.rank == 0
    }

    /// Where this rank computes: `Cpu`, or `Cuda(local_rank)`.
    pub fn device(&self) -> tch::Device {
        self.device
    }

    /// How this process was started (ringrun/torchrun, mpirun, srun, alone).
    pub fn launched_by(&self) -> LaunchSource {
        self.launch.source
    }

    /// Restarts of the group so far (ringrun --max-restarts): > 0 means resume.
    pub fn restart_count(&self) -> u32 {
        self.launch.restart_count
    }

    /// The collectives (all_reduce, broadcast, all_gather, barrier), borrowed for the calls that
    /// follow: `pg.comm().barrier()?`.
    pub fn comm(&self) -> CommGuard<'_> {
        self.comm.lock()
    }

    /// The shared handle on the communicator (what `Ddp` keeps).
    pub fn handle(&self) -> CommHandle {
        self.comm.clone()
    }

    /// Leaves cleanly after success (MPI_Finalize where MPI was used). A `Ddp` still holding
    /// the communicator can no longer use it.
    pub fn finish(mut self) {
        drop(self.comm.close());
        if let Some(r) = self.runtime.take() {
            r.finish();
        }
    }

    /// Leaves after a failure without waiting for ranks that may be gone (no MPI_Finalize).
    pub fn abandon(mut self) {
        std::mem::forget(self.comm.close());
        if let Some(r) = self.runtime.take() {
            r.abandon();
        }
    }
}

impl AsComm for ProcessGroup {
    fn comm_handle(&self) -> CommHandle {
        self.comm.clone()
    }
}

impl Drop for ProcessGroup {
    /// Dropped without `finish`: the communicator closes before MPI ends, whoever still holds it.
    fn drop(&mut self) {
        drop(self.comm.close());
        drop(self.runtime.take());
    }
}
