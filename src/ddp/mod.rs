//! DistributedDataParallel semantics: the only module that knows about gradients and buckets.
//!
//! - [`Ddp`]: the wrapper a training loop holds (replica check + broadcast, buffers, backward
//!   with bucketed all-reduce, `no_sync`, in-place `zero_grad`).
//! - `buckets`: which parameters share a flat buffer (pure; PyTorch's
//!   `compute_bucket_assignment_by_size`).
//! - `reducer`: gradients living in the buckets, averaged across ranks, overlapped with backward.
//! - `replica`: at start, checks every rank built the same model, then broadcasts rank 0's state.
//! - `zero`: ZeRO-1/2, each rank stepping its shard of the parameters and gathering the rest.
//! - `params`: ZeRO-3's parameters, sharded in flat buffers and gathered unit by unit.
//! - [`Fsdp`]: ZeRO-3 for a program's own model (a `Ddp`, its `Zero` and the model's `Units`).

pub mod buckets;
mod fsdp;
mod hooks;
mod pages;
mod params;
mod reducer;
mod replica;
mod storage;
mod wrapper;
pub mod zero;

pub use crate::wire::{fnv1a, FNV_OFFSET};
pub use buckets::compute_bucket_assignment_by_size;
pub use fsdp::Fsdp;
pub use pages::give_back_freed_memory;
pub use replica::{hash_tensor, parameter_hash, sync_replicas, DdpError};
pub use wrapper::{BufferSync, Ddp, DdpOptions, FullState, Shard};
pub use zero::Zero;
