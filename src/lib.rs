//! # ringtrain
//! Data-parallel training on libtorch: identical model replicas in separate processes, gradients
//! averaged across ranks after every backward pass — what `torchrun` + `DistributedDataParallel`
//! do, for Rust programs built on [`tch`]. The `ringtrain` binary trains from a YAML config with
//! the same pieces a program of your own uses.
//!
//! # Use it as a library
//! The five names a loop needs (examples/ddp_minimal.rs):
//! ```no_run
//! use ringtrain::data::DistributedSampler;
//! use ringtrain::{Ddp, DdpOptions, InitOptions};
//! use tch::nn::{self, Module, OptimizerConfig};
//! use tch::{Kind, Tensor};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // Rank, world size and rendezvous from ringrun, mpirun or srun (alone: a group of one).
//!     let pg = ringtrain::init(InitOptions::default())?;
//!     let dev = pg.device();
//!     tch::manual_seed(0); // the same 4096 points on every rank, labelled by a fixed linear rule
//!     let x = Tensor::randn([4096, 16], (Kind::Float, dev));
//!     let y = x.matmul(&Tensor::randn([16, 4], (Kind::Float, dev))).argmax(1, false);
//!     let vs = nn::VarStore::new(dev);
//!     let fc1 = nn::linear(vs.root() / "fc1", 16, 64, Default::default());
//!     let fc2 = nn::linear(vs.root() / "fc2", 64, 4, Default::default());
//!     let net = nn::seq().add(fc1).add_fn(|t| t.relu()).add(fc2);
//!     let mut ddp = Ddp::from_var_store(&pg, &vs, DdpOptions::default())?; // rank 0's weights everywhere
//!     let mut opt = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.05)?;
//!     let mut sampler = DistributedSampler::new(4096, pg.world_size(), pg.rank(), true, 0, false);
//!     for epoch in 0..5 {
//!         sampler.set_epoch(epoch); // this rank's share of a new shuffle
//!         for batch in sampler.indices().chunks(64) {
//!             let idx = Tensor::from_slice(&batch.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(dev);
//!             let loss = net.forward(&x.index_select(0, &idx)).cross_entropy_for_logits(&y.index_select(0, &idx));
//!             ddp.zero_grad()?;
//!             ddp.backward(&loss)?; // backward, gradients averaged across ranks as they are ready
//!             opt.step();
//!         }
//!     }
//!     let acc = net.forward(&x).accuracy_for_logits(&y).double_value(&[]);
//!     println!("rank {}: accuracy {:.1}%, parameter hash {:016x}", pg.rank(), 100.0 * acc, ddp.state_hash()?);
//!     pg.finish();
//!     Ok(())
//! }
//! ```
//! The pieces: [`init`] → [`ProcessGroup`]; [`Ddp`] (holds the group's communicator; `backward`,
//! `no_sync`, `zero_grad`, `sync_buffers`, `state_hash`); [`optim`] (SGD/Adam/AdamW with PyTorch's rules, schedules,
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
//! - [`autograd`] — collectives inside autograd (`all_gather`, `all_reduce`) and SyncBatchNorm.
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
//! - [`registry`] — kinds chosen by name in the config: models, data formats, tasks.
//! - [`worker`] — the `ringtrain` worker whole, for programs that register their own kinds.
//! - [`internal`] — what only the binaries use (launcher supervision, status line, benchmark,
//!   `sample`); not a stable API, and no library module imports it.
//! - `group` — joining: backend choice and rendezvous under ringrun, mpirun, srun.
//! - `wire` — little-endian framing shared by the store and the ring; `auth` — their
//!   challenge-response on the job token (HMAC-SHA256; the token never crosses the wire).
//!
//! The binaries are thin: `worker/main.rs` (`ringtrain`), `launcher/main.rs` (`ringrun`),
//! `bench/main.rs` (`ringbench`).
//!
//! # Features
//! - `trainer` (default) — the `ringtrain` trainer and the binaries: [`config`] (YAML),
//!   [`data`]'s formats and loader, [`models`], [`train`], [`registry`], [`worker`], plots and
//!   the progress bar in [`telemetry`]; with them serde_yaml, image, plotters, indicatif, clap and
//!   the rest of the binaries' dependencies.
//! - `mpi` (default) — the MPI backend; needs an MPI installation to build.
//!
//! `default-features = false` is the DDP core alone: [`init`], [`Ddp`], [`comm`], [`optim`],
//! [`checkpoint`], [`amp`], [`device`], [`launch`], [`rendezvous`], [`telemetry`]'s logging and
//! metrics, and [`data::DistributedSampler`]. The options the core takes live beside it
//! ([`process_group::Backend`], [`device::DeviceChoice`], [`optim::OptimizerConfig`]); [`config`]
//! re-exports them under their old paths.

// The DDP core (every build).
pub mod amp;
pub mod auth;
pub mod autograd;
pub mod checkpoint;
pub mod comm;
mod cuda;
pub mod ddp;
pub mod device;
mod group;
pub mod host_memory;
pub mod launch;
pub mod optim;
pub mod process_group;
pub mod rendezvous;
pub mod telemetry;
pub mod units;
mod wire;

// The trainer (feature `trainer`, on by default).
#[cfg(feature = "trainer")]
pub mod config;
#[cfg(feature = "trainer")]
pub mod data;
#[cfg(feature = "trainer")]
pub mod detect;
#[cfg(feature = "trainer")]
#[doc(hidden)]
pub mod internal;
#[cfg(feature = "trainer")]
pub mod models;
#[cfg(feature = "trainer")]
pub mod registry;
#[cfg(feature = "trainer")]
pub mod train;
#[cfg(feature = "trainer")]
pub mod worker;

/// Without the `trainer` feature: the distributed sampler alone (the data formats and the loader
/// come with `trainer`).
#[cfg(not(feature = "trainer"))]
pub mod data {
    #[path = "sampler.rs"]
    pub mod sampler;
    pub use sampler::DistributedSampler;
}

pub use ddp::{Ddp, DdpOptions};
pub use process_group::{init, init_from_env, InitError, InitOptions, ProcessGroup};
