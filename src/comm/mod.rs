//! Collective communication: the `Communicator` trait and its backends.
//!
//! - `ring`: the built-in ring (reduce-scatter + all-gather between neighbours) over TCP, Unix
//!   sockets or shared memory.
//! - `hier`: two rings, within each node and across nodes, for the hierarchical all-reduce.
//! - `mpi`: MPI collectives (cargo feature `mpi`, on by default).
//! - `nccl`: NCCL on CUDA tensors, loaded at run time.
//! - Asking for a backend that is not built in is a `CommError::NotBuilt`, never a panic.

mod elem;
mod handle;
mod hier;
mod link;
pub mod mpi;
pub mod nccl;
pub mod ring;
mod ring_sender;
mod ring_setup;
mod rows;
mod segment;
mod shared_buf;
mod shm;
pub mod strict;
mod tensor;

pub use handle::{AsComm, CommGuard, CommHandle, CommJob, LentScope, Pending};
pub use hier::HierComm;
pub use ring::{RingComm, RingOptions};
pub use rows::all_gather_rows;
pub use strict::StrictDevice;

use std::time::Duration;

/// The collective operations, named as PyTorch names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    AllReduce,
    Broadcast,
    AllGather,
    Barrier,
    Setup,
    ReduceScatter,
    AllGatherShards,
    /// `alloc_reduce_buffer`: its agreement round has a code of its own, so a rank allocating
    /// while another gathers is a mismatch, not data.
    Alloc,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::Broadcast => "broadcast",
            Op::AllGather => "all_gather",
            Op::Barrier => "barrier",
            Op::Setup => "ring setup",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllGatherShards => "all_gather_into_tensor",
            Op::Alloc => "alloc_reduce_buffer",
        }
    }

    pub(crate) fn code(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_code(c: u8) -> Option<Op> {
        [Op::AllReduce, Op::Broadcast, Op::AllGather, Op::Barrier, Op::Setup, Op::ReduceScatter, Op::AllGatherShards, Op::Alloc]
            .into_iter()
            .find(|o| o.code() == c)
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: {op} #{seq} timed out after {secs:.0}s waiting for rank {peer}")]
    Timeout { rank: usize, op: Op, seq: u64, peer: usize, secs: f64 },
    #[error("rank {rank}: rank {peer} closed its connection during {op} #{seq} (it exited or crashed)")]
    PeerClosed { rank: usize, op: Op, seq: u64, peer: usize },
    #[error("rank {rank}: {op} #{seq} with rank {peer}: {source}")]
    Io { rank: usize, op: Op, seq: u64, peer: usize, source: std::io::Error },
    #[error("rank {rank}: collective mismatch with rank {peer}: {detail}")]
    Mismatch { rank: usize, peer: usize, detail: String },
    #[error(
        "rank {rank}: {op} #{seq} stalled: rank(s) {missing:?} did not arrive within {secs:.0}s (rank(s) {waiting:?} are waiting in it)"
    )]
    Stalled { rank: usize, op: Op, seq: u64, missing: Vec<usize>, waiting: Vec<usize>, secs: f64 },
    #[error("rank {rank}: ring setup: {detail}")]
    Setup { rank: usize, detail: String },
    #[error("rank {rank}: {source}")]
    Store {
        rank: usize,
        #[source]
        source: crate::rendezvous::StoreError,
    },
    #[error("rank {rank}: MPI {op}: {detail}")]
    Mpi { rank: usize, op: Op, detail: String },
    #[error("rank {rank}: NCCL {op} #{seq}: {detail}")]
    Nccl { rank: usize, op: Op, seq: u64, detail: String },
    #[error("backend `{backend}` is not available: {detail}")]
    NotAvailable { backend: &'static str, detail: String },
    #[error("backend `{backend}` is not built into this binary ({hint})")]
    NotBuilt { backend: &'static str, hint: &'static str },
    #[error("{op}: {detail}")]
    BadArgument { op: Op, detail: String },
    /// A collective handed to the thread holding the communicator (`CommHandle::run` during an
    /// overlapped backward) that it did not run.
    #[error("{0}")]
    Lent(String),
}

impl CommError {
    /// The same error with its ranks renumbered by `map` (a sub-ring's numbering → the job's),
    /// so a message names the job's ranks.
    pub(crate) fn renumber(self, map: &[usize]) -> CommError {
        let m = |r: usize| map.get(r).copied().unwrap_or(r);
        match self {
            CommError::Timeout { rank, op, seq, peer, secs } => CommError::Timeout { rank: m(rank), op, seq, peer: m(peer), secs },
            CommError::PeerClosed { rank, op, seq, peer } => CommError::PeerClosed { rank: m(rank), op, seq, peer: m(peer) },
            CommError::Io { rank, op, seq, peer, source } => CommError::Io { rank: m(rank), op, seq, peer: m(peer), source },
            CommError::Mismatch { rank, peer, detail } => {
                CommError::Mismatch { rank: m(rank), peer: m(peer), detail: format!("{detail} (ranks numbered within the sub-ring)") }
            }
            CommError::Stalled { rank, op, seq, missing, waiting, secs } => CommError::Stalled {
                rank: m(rank),
                op,
                seq,
                missing: missing.into_iter().map(m).collect(),
                waiting: waiting.into_iter().map(m).collect(),
                secs,
            },
            CommError::Setup { rank, detail } => CommError::Setup { rank: m(rank), detail },
            CommError::Store { rank, source } => CommError::Store { rank: m(rank), source },
            other => other,
        }
    }
}

/// Collectives over a fixed group of ranks. Every rank must call the same operations in the same
/// order with the same sizes; backends check this where they can and report a `Mismatch`.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn backend_name(&self) -> &'static str;
    /// Sums `buf` across ranks, in place; every rank ends with the same bits.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Copies `root`'s bytes into every other rank's `buf`.
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError>;
    /// Gathers a small value from every rank; result indexed by rank.
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), CommError>;
    /// The timeout every blocking call uses.
    fn timeout(&self) -> Duration;
    /// True when collectives may be issued from a thread other than the one that created the
    /// communicator (needed to overlap them with backward). MPI initialised without thread
    /// support says no; NCCL selects its device on every call and says yes.
    fn supports_overlap(&self) -> bool {
        false
    }
    /// True when the backend works on device memory itself (NCCL): buffers should then live on
    /// the model's device. Host backends stage device tensors through host memory.
    fn device_native(&self) -> bool {
        false
    }
    /// Sums bf16 values across ranks, in place, each addition rounded to bf16 as libtorch rounds
    /// it (DDP's `bf16_compress_hook` on a CPU backend).
    fn all_reduce_sum_bf16(&mut self, buf: &mut [half::bf16]) -> Result<(), CommError> {
        let _ = buf;
        Err(CommError::BadArgument { op: Op::AllReduce, detail: format!("the {} backend does not reduce bf16", self.backend_name()) })
    }
    /// Which shard (`shard_bounds(len, world, i)`) of a reduce-scatter this rank holds. The ring
    /// keeps its all-reduce's schedule, which leaves rank r with shard r + 1, so a reduce-scatter
    /// adds in the same order as an all-reduce and ZeRO-1 stays bitwise equal to plain DDP.
    fn shard_index(&self) -> usize {
        self.rank()
    }
    /// Sums `buf` across ranks; afterwards this rank's shard (`shard_index`) holds the sum and
    /// the rest of `buf` is undefined. This fallback all-reduces everything.
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce_sum(buf)
    }
    /// Gives every rank every rank's shard of `buf`, in place. This fallback zeroes the other
    /// shards and all-reduces (exact: x + 0 = x, but -0.0 becomes +0.0).
    fn all_gather_shards(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        let (a, b) = shard_bounds(buf.len(), self.world_size(), self.shard_index());
        buf[..a].fill(0.0);
        buf[b..].fill(0.0);
        self.all_reduce_sum(buf)
    }
    /// `reduce_scatter_sum` on a tensor (host backends stage non-CPU tensors through host memory).
    fn reduce_scatter_tensor(&mut self, t: &mut tch::Tensor) -> Result<(), CommError> {
        tensor::reduce_scatter_staged(self, t)
    }
    /// `all_gather_shards` on a tensor.
    fn all_gather_shards_tensor(&mut self, t: &mut tch::Tensor) -> Result<(), CommError> {
        tensor::all_gather_shards_staged(self, t)
    }
    /// A zeroed 1-D CPU tensor of `numel` elements of `kind` that this backend reduces without
    /// moving it through a link: shared memory every rank of a node-local ring maps, so the
    /// collectives on it read the peers' copies in place (`shared_buf`). Collective: every rank
    /// asks for the same size, in the same order. `None` (on every rank alike) when the backend
    /// has no such memory; then any tensor does. The memory stays mapped until the process exits,
    /// since views into it (gradients) may outlive the communicator.
    fn alloc_reduce_buffer(&mut self, numel: usize, kind: tch::Kind) -> Result<Option<tch::Tensor>, CommError> {
        let _ = (numel, kind);
        Ok(None)
    }
    /// A zeroed 1-D CPU tensor of `numel` elements of `kind` that is the same memory on every
    /// rank (`alloc_reduce_buffer`'s are a copy per rank), when the whole group is one
    /// node-local ring with shared memory: what one rank writes, every rank reads. Collective,
    /// as `alloc_reduce_buffer`; `None` on every rank alike otherwise. The caller orders the
    /// writes and reads with collectives.
    fn alloc_node_shared(&mut self, numel: usize, kind: tch::Kind) -> Result<Option<tch::Tensor>, CommError> {
        let _ = (numel, kind);
        Ok(None)
    }
    /// Sums a tensor across ranks in place (host backends stage non-CPU tensors through host memory).
    fn all_reduce_tensor(&mut self, t: &mut tch::Tensor) -> Result<(), CommError> {
        tensor::all_reduce_staged(self, t)
    }
    /// `all_reduce_tensor` whose result may still be in flight when it returns: a backend with a
    /// stream of its own (NCCL) launches it without making the compute stream wait, so backward
    /// kernels queued meanwhile do not wait behind it. The tensor must stay alive and untouched
    /// until `wait_pending`. Host backends finish it here.
    fn all_reduce_tensor_async(&mut self, t: &mut tch::Tensor) -> Result<(), CommError> {
        self.all_reduce_tensor(t)
    }
    /// DDP's average: `t` divided by `divisor` on this rank, then `all_reduce_tensor_async`, with
    /// exactly those bits (each rank's share is divided before the sum, as PyTorch's reducer
    /// does). The ring on a shared buffer divides as it reads the ranks' buffers, which saves a
    /// whole pass over the bucket.
    fn all_reduce_divided_tensor_async(&mut self, t: &mut tch::Tensor, divisor: f64) -> Result<(), CommError> {
        tensor::divide(t, divisor)?;
        self.all_reduce_tensor_async(t)
    }
    /// A hint, until reset: this rank has nothing else to run while it waits in the coming
    /// collectives (its backward has finished; the step waits for the last bucket), so a backend
    /// may keep the core busy-waiting for the peers instead of sleeping. Backends that always
    /// block ignore it.
    fn set_idle_waits(&mut self, idle: bool) {
        let _ = idle;
    }
    /// `reduce_scatter_tensor`, in flight as `all_reduce_tensor_async`.
    fn reduce_scatter_tensor_async(&mut self, t: &mut tch::Tensor) -> Result<(), CommError> {
        self.reduce_scatter_tensor(t)
    }
    /// ZeRO's average: `t` divided by `divisor`, then `reduce_scatter_tensor_async`, with
    /// exactly those bits in this rank's shard. Only the shard is defined afterwards: the ring on
    /// a shared buffer divides as it reads (a whole pass over the bucket saved, as for
    /// `all_reduce_divided_tensor_async`) and leaves the rest of `t` undivided.
    fn reduce_scatter_divided_tensor_async(&mut self, t: &mut tch::Tensor, divisor: f64) -> Result<(), CommError> {
        tensor::divide(t, divisor)?;
        self.reduce_scatter_tensor_async(t)
    }
    /// Orders every result the `_async` calls left in flight before any work queued after this
    /// call (NCCL: the compute stream waits for them; the host does not), and returns an error
    /// a background check found meanwhile (NCCL's watchdog: a timeout, an async error).
    fn wait_pending(&mut self) -> Result<(), CommError> {
        Ok(())
    }
    /// Broadcasts a tensor's bytes from `root` in place.
    fn broadcast_tensor(&mut self, t: &mut tch::Tensor, root: usize) -> Result<(), CommError> {
        tensor::broadcast_staged(self, t, root)
    }
}

/// Shard `i` of `n` elements split among `world` ranks: `[start, end)`, balanced (equal when
/// `world` divides `n`).
pub fn shard_bounds(n: usize, world: usize, i: usize) -> (usize, usize) {
    let at = |c: usize| (n as u128 * c as u128 / world.max(1) as u128) as usize;
    (at(i), at(i + 1))
}

/// Broadcasts a byte string of any length from `root` (others pass `None`).
pub fn broadcast_blob(comm: &mut dyn Communicator, root: usize, mine: Option<&[u8]>) -> Result<Vec<u8>, CommError> {
    let mut len = (mine.map_or(0, |b| b.len()) as u64).to_le_bytes();
    comm.broadcast(&mut len, root)?;
    let mut buf = match mine {
        Some(b) if comm.rank() == root => b.to_vec(),
        _ => vec![0u8; u64::from_le_bytes(len) as usize],
    };
    comm.broadcast(&mut buf, root)?;
    Ok(buf)
}
