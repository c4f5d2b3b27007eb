//! # ringtrain
//! Data-parallel training on libtorch: identical model replicas in separate processes, gradients
//! averaged across ranks after every backward pass — what `torchrun` + `DistributedDataParallel`
//! do, for Rust programs built on [`tch`]. The `ringtrain` binary trains from a YAML config with
//! the same pieces a program of your own uses.
//!
//! # Use it as a library
//! ```no_run
//! use ringtrain::{Ddp, DdpOptions, InitOptions};
//! use tch::nn::{self, Module, OptimizerConfig};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // Rank, world size and rendezvous from ringrun / torchrun / mpirun / srun (or a lone process).
//!     let mut pg = ringtrain::init(InitOptions::default())?;
//!     tch::manual_seed(0);
//!     let vs = nn::VarStore::new(pg.device());
//!     let net = nn::seq().add(nn::linear(vs.root() / "fc1", 784, 128, Default::default()))
//!         .add_fn(|x| x.relu()).add(nn::linear(vs.root() / "fc2", 128, 10, Default::default()));
//!     // Checks every rank built the same model, broadcasts rank 0's weights, sets up buckets.
//!     let mut ddp = Ddp::from_var_store(&mut *pg, &vs, DdpOptions::default())?;
//!     let mut opt = nn::Adam::default().build(&vs, 1e-3)?;
//!     let sampler = ringtrain::data::DistributedSampler::new(60_000, pg.world_size(), pg.rank(), true, 0, false);
//!     # let (x, y) = (tch::Tensor::zeros([64, 784], tch::kind::FLOAT_CPU), tch::Tensor::zeros([64], tch::kind::INT64_CPU));
//!     for _step in 0..100 {
//!         // ... this rank's batch from sampler.indices() ...
//!         let loss = net.forward(&x).cross_entropy_for_logits(&y);
//!         ddp.zero_grad()?;
//!         ddp.backward(&mut *pg, &loss)?; // backward + bucketed all-reduce, overlapped
//!         opt.step();
//!     }
//!     pg.finish();
//!     Ok(())
//! }
//! ```
//! The pieces: [`init`] → [`ProcessGroup`]; [`Ddp`] (`backward`, `no_sync`, `zero_grad`,
//! `sync_buffers`, `state_hash`); [`optim`] (SGD/Adam/AdamW with PyTorch's rules, schedules,
//! `clip_grad_norm`); [`data::DistributedSampler`]; [`checkpoint::save_shared`] /
//! [`checkpoint::load_shared`]; [`telemetry::Metrics`] (rank 0's metrics.jsonl).
//!
//! # Layout
//! - [`process_group`] — `init`: launch environment → device → joined group.
//! - [`launch`] — who am I: rank, world size, master address from the launch environment (pure).
//! - [`rendezvous`] — the c10d-style key-value `Store` (TCP server on rank 0, client, prefixes).
//! - [`comm`] — the `Communicator` trait; backends: the built-in ring (shared memory, Unix, TCP),
//!   MPI, NCCL.
//! - [`ddp`] — `Ddp`: replica check + broadcast, gradient buckets, the overlapped reducer.
//! - [`amp`] — mixed precision: autocast at bf16 or fp16 on CUDA and the CPU, `GradScaler`.
//! - [`optim`] — optimizers, learning-rate schedules, gradient clipping.
//! - [`checkpoint`] — checkpoint folders: atomic writes, checksums, `latest`, verified loading,
//!   written and read collectively.
//! - [`device`] — cpu / cuda:local_rank; loads libtorch's CUDA backend only when asked for.
//! - [`data`] — the `Dataset` seam, IDX and synthetic data, `DistributedSampler`, the loader.
//! - [`models`] — the `Model` seam; MLP and reference CNN with PyTorch parameter names.
//! - [`train`] — the `ringtrain` binary's loop on the pieces above; the `Task` seam.
//! - [`config`] — the YAML config: serde structs, validation, `--set` overrides.
//! - [`telemetry`] — logging with the rank in every line, metrics.jsonl, progress.
//! - [`internal`] — what only the binaries use (worker job, launcher supervision, benchmark,
//!   fault injection); not a stable API.
//! - `group` — joining: backend choice and rendezvous under ringrun, mpirun, srun.
//! - `wire` — little-endian framing shared by the store and the ring; `auth` — their
//!   challenge-response on the job token (HMAC-SHA256; the token never crosses the wire).
//!
//! The binaries are thin: `worker/main.rs` (`ringtrain`), `launcher/main.rs` (`ringrun`),
//! `bench/main.rs` (`ringbench`).

pub mod amp;
pub mod auth;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod data;
pub mod ddp;
pub mod device;
mod group;
#[doc(hidden)]
pub mod internal;
pub mod launch;
pub mod models;
pub mod optim;
pub mod process_group;
pub mod registry;
pub mod rendezvous;
pub mod telemetry;
pub mod train;
mod wire;
pub mod worker;

pub use ddp::{Ddp, DdpOptions};
pub use process_group::{init, init_from_env, InitError, InitOptions, ProcessGroup};
