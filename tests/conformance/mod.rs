//! The `Communicator` conformance suite's harness: one set of cases (`cases`) run against every
//! backend (`backends`, one file each, registered by one line in `backends/mod.rs`).
//!
//! A backend says how its ranks start (`Launch`: threads of this test process, or processes under
//! a launcher such as mpirun that run this test binary as each rank), the world sizes to run at,
//! and what it can do (`Caps`): where its tensors live, which dtypes it reduces, whether its
//! buffers come from `alloc_reduce_buffer`, how a failure shows. A case that a backend cannot do
//! is declared there, and the suite then asserts the backend refuses it with a clear error.
//!
//! For each world size the ordinary cases run one after another on one group (so state carried
//! from one collective to the next is exercised too); the 100 MB case runs once, at the smallest
//! world size of 2 or more; every failure case (mismatched calls, a peer that leaves) gets a group
//! of its own, since it breaks it.

pub mod backends;
pub mod cases;
pub mod failures;

use ringtrain::comm::{CommError, Communicator};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

pub type Comm = Box<dyn Communicator>;

/// How rank `r` of one prepared group joins it (on its own thread).
pub type Joiner = Arc<dyn Fn(usize) -> Result<Comm, String> + Send + Sync>;

/// The bound on every blocking call in the ordinary cases (a loaded 2-core machine runs two
/// backends' groups at once), and in the failure cases, which wait for it at worst.
pub const TIMEOUT: Duration = Duration::from_secs(20);
pub const FAILURE_TIMEOUT: Duration = Duration::from_secs(2);
/// How much later than its timeout a failure may be reported (stall reports wait up to half the
/// timeout for the other ranks' records; processes take a moment to be torn down).
pub const SLACK: Duration = Duration::from_secs(3);

pub enum Launch {
    /// One thread per rank in this process: `group(world, timeout)` prepares one group (its
    /// store, names) and returns how each rank joins it.
    Threads(fn(usize, Duration) -> Result<Joiner, String>),
    /// As `Threads`, in a fresh process of this test binary that runs `prepare` before anything
    /// else (NCCL: libtorch's CUDA backend must load before any other tch call).
    ThreadsInOwnProcess { group: fn(usize, Duration) -> Result<Joiner, String>, prepare: fn() -> Result<(), String> },
    /// One process per rank: `launcher(np)` starts np copies of the program that follows it
    /// (mpirun); each copy is this test binary, which joins with `join(timeout)`. One group per
    /// process, so every world size and failure case is a job of its own.
    Processes { launcher: fn(usize) -> Command, join: fn(Duration) -> Result<Comm, String> },
}

/// Why a backend cannot run here.
pub enum Absent {
    /// A tool the project's setup installs is missing: a skip, a failure under RINGTRAIN_NO_SKIP=1.
    Tool(String),
    /// Hardware this machine does not have (a GPU): a note, a failure only under
    /// RINGTRAIN_REQUIRE_GPU=1.
    Hardware(String),
}

/// How a failure (mismatched calls, a peer gone) shows.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Failures {
    /// The calls return an error within the timeout.
    Returned,
    /// The process ends within the timeout, with a line naming the collective (MPI's watchdog;
    /// mpirun then ends the job). Only the first case of each kind runs.
    EndProcess,
}

/// What a backend can do; the cases check the rest is refused clearly.
pub struct Caps {
    /// Where rank r's tensors live.
    pub device: fn(usize) -> Device,
    /// Buffers come from `alloc_reduce_buffer`, which must give f32 and bf16 ones.
    pub reduce_buffers: bool,
    /// What `all_reduce_tensor` sums; other dtypes must be refused with an error naming them.
    pub reduce_kinds: &'static [Kind],
    /// What `reduce_scatter_tensor` and `all_gather_shards_tensor` take.
    pub shard_kinds: &'static [Kind],
    /// `all_reduce_sum_bf16` on host slices.
    pub bf16_slices: bool,
    /// Non-contiguous tensors are staged (true) or refused with an error that says so (false).
    pub strided_tensors: bool,
    /// Ranks in different collectives get a `Mismatch` naming both (true), or an error naming
    /// their own collective at the timeout (false: nothing travels that could tell).
    pub names_mismatches: bool,
    pub failures: Failures,
}

fn cpu(_: usize) -> Device {
    Device::Cpu
}

/// The built-in host backends' abilities.
pub const HOST: Caps = Caps {
    device: cpu,
    reduce_buffers: false,
    reduce_kinds: &[Kind::Float, Kind::BFloat16],
    shard_kinds: &[Kind::Float],
    bf16_slices: true,
    strided_tensors: true,
    names_mismatches: true,
    failures: Failures::Returned,
};

pub struct Backend {
    pub name: &'static str,
    pub available: fn() -> Result<(), Absent>,
    pub launch: Launch,
    pub worlds: &'static [usize],
    /// The most ranks this machine can give it (GPUs for NCCL); larger worlds are left out.
    pub max_world: fn() -> usize,
    pub caps: Caps,
}

pub fn unlimited() -> usize {
    usize::MAX
}

pub fn always() -> Result<(), Absent> {
    Ok(())
}

/// One rank's view of a case: its communicator and the backend's abilities.
pub struct Ctx {
    pub rank: usize,
    pub world: usize,
    comm: Option<Comm>,
    pub caps: &'static Caps,
}

impl Ctx {
    pub fn new(comm: Comm, caps: &'static Caps) -> Ctx {
        Ctx { rank: comm.rank(), world: comm.world_size(), comm: Some(comm), caps }
    }

    pub fn comm(&mut self) -> &mut dyn Communicator {
        self.comm.as_deref_mut().expect("the communicator was dropped (Ctx::leave)")
    }

    /// Drops the communicator, as a process that exits does.
    pub fn leave(&mut self) {
        self.comm = None;
    }

    pub fn device(&self) -> Device {
        (self.caps.device)(self.rank)
    }

    /// A zeroed 1-D tensor of `numel` elements of `kind` on the backend's device; from
    /// `alloc_reduce_buffer` (collective: every rank asks alike) where the backend declares
    /// reduce buffers, which it must give for f32 and bf16.
    pub fn tensor(&mut self, numel: usize, kind: Kind) -> Result<Tensor, String> {
        if self.caps.reduce_buffers {
            let shared =
                self.comm().alloc_reduce_buffer(numel, kind).map_err(|e| format!("alloc_reduce_buffer({numel}, {kind:?}): {e}"))?;
            match shared {
                Some(t) => return Ok(t),
                None if matches!(kind, Kind::Float | Kind::BFloat16) => {
                    return Err(format!("alloc_reduce_buffer({numel}, {kind:?}) gave no buffer, though the backend declares them"))
                }
                None => {}
            }
        }
        Ok(Tensor::zeros([numel as i64], (kind, self.device())))
    }

    /// `tensor` holding `values` converted to `kind`.
    pub fn tensor_from(&mut self, values: &[f64], kind: Kind) -> Result<Tensor, String> {
        let mut t = self.tensor(values.len(), kind)?;
        if !values.is_empty() {
            t.copy_(&Tensor::from_slice(values).to_kind(kind).to_device(t.device()));
        }
        Ok(t)
    }

    /// A host buffer of `n` elements of `T` (f32 or bf16) for the slice collectives, in a reduce
    /// buffer where the backend has them.
    pub fn host<T: HostElem>(&mut self, n: usize) -> Result<HostBuf<T>, String> {
        let t = if self.caps.reduce_buffers { self.tensor(n, T::KIND)? } else { Tensor::zeros([n as i64], (T::KIND, Device::Cpu)) };
        if t.device() != Device::Cpu {
            return Err(format!("a host buffer on {:?}", t.device()));
        }
        Ok(HostBuf { t, n, _t: std::marker::PhantomData })
    }
}

pub trait HostElem: Copy {
    const KIND: Kind;
}
impl HostElem for f32 {
    const KIND: Kind = Kind::Float;
}
impl HostElem for half::bf16 {
    const KIND: Kind = Kind::BFloat16;
}

/// A contiguous CPU tensor seen as a slice.
pub struct HostBuf<T> {
    t: Tensor,
    n: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: HostElem> HostBuf<T> {
    pub fn slice(&mut self) -> &mut [T] {
        if self.n == 0 {
            return &mut [];
        }
        // SAFETY: a contiguous CPU tensor of n elements of T's dtype, owned by self, which the
        // returned borrow keeps alive and unshared.
        unsafe { std::slice::from_raw_parts_mut(self.t.data_ptr() as *mut T, self.n) }
    }
}

/// Says `what` past libtest's capture (it shows with or without --nocapture).
pub fn note(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{what}");
}

/// Runs `body` on every rank of one group, one thread each; each rank's result, or why it has
/// none (joining failed, it panicked, it did not finish by `limit`).
pub fn on_threads<T: Send + 'static>(
    group: fn(usize, Duration) -> Result<Joiner, String>,
    caps: &'static Caps,
    world: usize,
    timeout: Duration,
    limit: Duration,
    body: Arc<dyn Fn(&mut Ctx) -> T + Send + Sync>,
) -> Vec<Result<T, String>> {
    let joiner = match group(world, timeout) {
        Ok(j) => j,
        Err(e) => return (0..world).map(|_| Err(format!("preparing the group: {e}"))).collect(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    for rank in 0..world {
        let (joiner, body, tx) = (joiner.clone(), body.clone(), tx.clone());
        std::thread::Builder::new()
            .name(format!("rank{rank}"))
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let comm = joiner(rank).map_err(|e| format!("joining: {e}"))?;
                    let mut ctx = Ctx::new(comm, caps);
                    Ok(body(&mut ctx))
                }))
                .unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(&p))));
                let _ = tx.send((rank, result));
            })
            .expect("spawning a rank thread");
    }
    drop(tx);
    let deadline = Instant::now() + limit;
    let mut results: Vec<Option<Result<T, String>>> = (0..world).map(|_| None).collect();
    while results.iter().any(Option::is_none) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((rank, r)) => results[rank] = Some(r),
            Err(_) => break,
        }
    }
    results.into_iter().map(|r| r.unwrap_or_else(|| Err(format!("did not finish within {limit:?} (hung)")))).collect()
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "?".into())
}

/// What one rank saw in a failure case.
#[derive(Clone, Debug)]
pub struct Seen {
    pub rank: usize,
    /// The collective this rank called (the op its error must name).
    pub op: &'static str,
    /// The error's text, and whether it is a `Mismatch`; `None`: the calls succeeded.
    pub error: Option<(String, bool)>,
    pub elapsed: Duration,
    /// This rank dropped its communicator.
    pub left: bool,
}

impl Seen {
    pub fn of(rank: usize, op: &'static str, started: Instant, r: Result<(), CommError>) -> Seen {
        let error = r.err().map(|e| (e.to_string(), matches!(e, CommError::Mismatch { .. })));
        Seen { rank, op, error, elapsed: started.elapsed(), left: false }
    }

    pub fn left(rank: usize) -> Seen {
        Seen { rank, op: "", error: None, elapsed: Duration::ZERO, left: true }
    }

    /// One line, for processes to report to the test that started them.
    pub fn encode(&self) -> String {
        let (msg, mismatch) = self.error.clone().unwrap_or_default();
        format!(
            "SEEN rank={} op={} left={} mismatch={} ms={} error={}",
            self.rank,
            self.op,
            self.left,
            mismatch,
            self.elapsed.as_millis(),
            msg.replace('\n', " ")
        )
    }
}

mod run;
pub use run::run;
