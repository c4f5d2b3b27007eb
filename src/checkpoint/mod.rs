//! Checkpoints: one folder per checkpoint under `<run dir>/checkpoints/`, e.g. `step-000000120/`:
//!
//! | file | holds |
//! |---|---|
//! | `model.safetensors` | parameters and buffers, PyTorch names (loads with `safetensors.torch` + `load_state_dict`) |
//! | `optimizer.safetensors` | `<param>.momentum_buffer` (SGD) or `<param>.exp_avg`, `<param>.exp_avg_sq` (Adam) |
//! | `meta.json` | epoch, position in the epoch, global step, optimizer step count, RNG rule, config, world size |
//! | `checksums.sha256` | SHA-256 of the three files above, in `sha256sum -c` format |
//!
//! A checkpoint is written into a temporary folder, every file flushed to disk, then renamed into
//! place; `latest` (a one-line file naming the folder) is replaced last. A folder whose checksums
//! do not verify is never loaded.

mod read;
mod shared;
pub mod stream;
mod write;

pub use read::{copy_into, find_resumable, find_resumable_opened, load, newest_folder, open, LoadedCheckpoint, OpenedCheckpoint};
pub use shared::{load_shared, save_shared, save_streamed, Sink};
pub use stream::{Entry, SafetensorsReader, StreamedFile};
pub use write::{begin, write, CheckpointData, Pending};

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub const FORMAT_VERSION: u32 = 1;
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const META_FILE: &str = "meta.json";
pub const CHECKSUMS_FILE: &str = "checksums.sha256";
pub const LATEST_FILE: &str = "latest";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("checkpoint {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path}: libtorch: {source}")]
    Torch { path: PathBuf, source: tch::TchError },
    #[error("no usable checkpoint in {dir}: {reasons}")]
    NoneUsable { dir: PathBuf, reasons: String },
    #[error("{0}")]
    Rank0(String),
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
}

/// Where training stands, enough to continue exactly.
///
/// Position in an epoch: the epoch's order is `randperm(n)` seeded with seed + epoch. The current
/// sharding started at position `epoch_base` of that order with `epoch_world_size` ranks, and has
/// taken `steps_in_shard` steps since; so positions `[0, epoch_base + steps·batch·world)` of the
/// order have been consumed (DistributedSampler's rank r takes positions r, r+w, …, so k steps
/// of every rank cover a prefix).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub format_version: u32,
    pub global_step: u64,
    pub epoch: usize,
    pub epoch_base: u64,
    pub epoch_world_size: usize,
    pub steps_in_shard: u64,
    pub world_size: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub optimizer: String,
    pub optimizer_steps: u64,
    /// How random state is reproduced (it is a function of the seed, not a saved generator).
    pub rng: String,
    /// Why it was written: `every_steps`, `epoch_end`, `shutdown`, `end`.
    pub reason: String,
    /// The resolved config of the run that wrote it, as YAML.
    pub config: String,
    /// The run it belongs to: drawn when a run starts fresh, kept by every resume and restart
    /// of that run (empty in checkpoints written before run ids existed, and by programs).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub run_id: String,
    /// The program's own metadata (library use), saved and restored as is.
    #[serde(default)]
    pub user: serde_json::Value,
    /// fp16's loss scale and growth tracker (GradScaler's state), when training in fp16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_scaler: Option<crate::amp::ScalerState>,
}

impl Meta {
    /// The meta of a checkpoint a program of its own writes at optimizer step `step`: the
    /// training-loop position fields stay zero; `user` holds whatever it needs to resume.
    pub fn for_program(step: u64, world_size: usize, optimizer: &str, optimizer_steps: u64, user: serde_json::Value) -> Meta {
        Meta {
            format_version: FORMAT_VERSION,
            global_step: step,
            epoch: 0,
            epoch_base: 0,
            epoch_world_size: world_size,
            steps_in_shard: 0,
            world_size,
            batch_size: 0,
            seed: 0,
            optimizer: optimizer.to_string(),
            optimizer_steps,
            rng: "the program's own".into(),
            reason: "program".into(),
            config: String::new(),
            run_id: String::new(),
            user,
            grad_scaler: None,
        }
    }
}

impl Meta {
    /// Folder name, ordered by global step.
    pub fn dir_name(&self) -> String {
        format!("step-{:09}", self.global_step)
    }
}

/// The global step a folder name stands for (`step-000000120` → 120).
pub fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
