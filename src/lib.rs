//! # ringtrain
//! Data-parallel training on libtorch: identical model replicas in separate processes, gradients
//! averaged with a ring all-reduce after every backward pass.
//!
//! # Layout
//! - [`launch`] — who am I: rank, world size, master address from the launch environment.
//! - [`rendezvous`] — the c10d-style key-value `Store` (TCP server on rank 0, client, prefixes).
//! - [`comm`] — the `Communicator` trait; backends: the built-in TCP ring, MPI.
//! - [`group`] — joining the group: backend choice, rendezvous under ringrun, mpirun, srun.
//! - [`checkpoint`] — checkpoint folders: atomic writes, checksums, `latest`, verified loading.
//! - [`ddp`] — gradient buckets, the reducer that averages them, the replica check + broadcast.
//! - [`device`] — cpu / cuda:local_rank; loads libtorch's CUDA backend only when asked for.
//! - [`data`] — IDX reader, synthetic data, `DistributedSampler`, the prefetching loader.
//! - [`models`] — MLP and reference CNN with PyTorch parameter names.
//! - [`train`] — the training loop, optimizers (SGD, Adam), evaluation.
//! - [`config`] — the YAML config: serde structs, validation, `--set` overrides.
//! - [`telemetry`] — logging with the rank in every line, metrics.jsonl, progress.
//! - [`supervise`] — the launcher's process group: spawn, prefix output, stop on failure, restart.
//! - [`nodes`] — launchers on several nodes acting as one job (join, failure, restart together).
//! - [`fault`] — test-only fault injection (a worker that exits or hangs at a given step).
//! - [`worker`] — the worker's job: config and environment to a finished run.
//! - [`bench`] — the all-reduce benchmark behind `ringbench`.
//! - `wire` — little-endian framing shared by the store and the ring.
//!
//! The binaries are thin: `worker/main.rs` (`ringtrain`) and `launcher/main.rs` (`ringrun`).

pub mod bench;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod data;
pub mod ddp;
pub mod device;
pub mod fault;
pub mod group;
pub mod launch;
pub mod models;
pub mod nodes;
pub mod rendezvous;
pub mod supervise;
pub mod telemetry;
pub mod train;
mod wire;
pub mod worker;
