//! Collectives inside autograd, as `torch.distributed.nn.functional` offers them, and
//! SyncBatchNorm built on them.
//!
//! - [`all_gather`]: every rank's rows, concatenated in rank order (ranks may hold different
//!   numbers of rows). Backward: each rank receives the sum over ranks of the gradient of its
//!   own rows — what contrastive losses with negatives from the whole global batch need.
//! - [`all_reduce`]: the sum over ranks. Backward: the sum over ranks of the gradient.
//! - [`sync_batch_norm`] / [`SyncBatchNorm`]: batch statistics over every rank's batch.
//! - [`checkpoint`]: activation checkpointing of a unit (recomputed in backward).
//!
//! They run on any backend and world size, through the group's [`CommHandle`]. Inside a `Ddp`
//! backward that overlaps its all-reduces, the communicator belongs to DDP's communication
//! thread; a collective reached by the autograd engine is then handed to that thread through
//! the same channel that tells it which gradients are ready, so it runs between the bucket
//! all-reduces at the point the engine reached it. The engine visits a graph in the same order
//! on every rank (by node sequence number), so every rank issues the same collectives in the
//! same order. A rank that fails a collective there gets an error from `backward`, not a hang.
//!
//! The sums are exact on every rank alike: all_gather places each rank's rows in a zeroed
//! buffer and all-reduces it (adding zeros changes no bits, except −0.0 → +0.0), so the
//! gathered values are bitwise every rank's own. Values travel as f32 whatever the dtype.

pub mod checkpoint;
mod collectives;
mod function;
mod sync_batchnorm;

pub use checkpoint::{checkpoint, recomputing};
pub use collectives::{all_gather, all_gather_at, all_reduce};
pub use function::{apply, Differentiable};
pub use sync_batchnorm::{sync_batch_norm, SyncBatchNorm};

pub use crate::comm::CommHandle;
