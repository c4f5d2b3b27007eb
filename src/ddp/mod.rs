//! DistributedDataParallel semantics: the only module that knows about gradients and buckets.
//!
//! - `buckets`: which parameters share a flat buffer (pure; PyTorch's
//!   `compute_bucket_assignment_by_size`).
//! - `reducer`: copies gradients into the buckets, all-reduces, averages, copies back.
//! - `replica`: at start, checks every rank built the same model, then broadcasts rank 0's state.

pub mod buckets;
mod hooks;
mod reducer;
mod replica;

pub use buckets::compute_bucket_assignment_by_size;
pub use reducer::{zero_grads, Reducer};
pub use replica::{fnv1a, parameter_hash, sync_replicas, DdpError, FNV_OFFSET};
