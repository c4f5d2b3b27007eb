//! Starting state: fresh, from `model.init_from` weights, or from a checkpoint. Rank 0 reads the
//! files and shares what it read over the communicator, so other nodes need no shared disk, and
//! every rank fails with the same clear message when the files are bad.

use super::TrainError;
use crate::checkpoint::{self, Meta, OpenedCheckpoint, SafetensorsReader};
use crate::comm::{broadcast_blob, Communicator};
use crate::config::Config;
use crate::optim::Optimizer;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// What `--resume` asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum Resume {
    /// Start fresh.
    No,
    /// The newest usable checkpoint of the run directory, or fresh if it has none.
    Auto,
    /// This checkpoint folder (or a checkpoints folder, meaning its newest usable one).
    Path(PathBuf),
}

impl std::str::FromStr for Resume {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => Resume::Auto,
            "no" | "none" => Resume::No,
            p => Resume::Path(PathBuf::from(p)),
        })
    }
}

/// Runs `f` on rank 0 only and gives every rank its result (or its error message).
fn on_rank0<T: serde::Serialize + serde::de::DeserializeOwned>(
    comm: &mut dyn Communicator,
    f: impl FnOnce() -> Result<T, String>,
) -> Result<T, TrainError> {
    let mine = (comm.rank() == 0).then(|| serde_json::to_vec(&f().map_err(|e| e.to_string())).expect("serialisable"));
    let shared = broadcast_blob(comm, 0, mine.as_deref())?;
    let result: Result<T, String> =
        serde_json::from_slice(&shared).map_err(|e| TrainError::Disagree(format!("bad message from rank 0: {e}")))?;
    result.map_err(TrainError::Startup)
}

/// Loads `model.init_from` into rank 0's parameters (the replica broadcast then spreads them).
/// `tied`: the model's (alias, parameter) pairs; an alias in the file is the parameter again.
pub fn init_from(
    comm: &mut dyn Communicator,
    path: &Path,
    params: &[(String, Tensor)],
    tied: &[(String, String)],
) -> Result<(), TrainError> {
    on_rank0(comm, || {
        if !path.is_file() {
            return Err(format!("model.init_from {}: no such file", path.display()));
        }
        // libtorch's errors name Rust enum variants (MetadataIncompleteBuffer, …): say it in words.
        let loaded = Tensor::read_safetensors(path)
            .map_err(|_| format!("model.init_from {}: not a readable safetensors file (truncated, or another format)", path.display()))?;
        checkpoint::copy_into(params, &crate::models::without_aliases(loaded, tied), path).map_err(|e| format!("model.init_from: {e}"))
    })?;
    tracing::info!("initialised parameters from {}", path.display());
    Ok(())
}

/// The checkpoint to resume from, chosen and verified by rank 0; `None` to start fresh.
/// Restores rank 0's parameters; the optimizer state is handed out afterwards
/// (`PendingState::load_into`), once the optimizer has its final (possibly sharded) form.
pub fn restore(
    comm: &mut dyn Communicator,
    cfg: &Config,
    resume: &Resume,
    checkpoints: &Path,
    params: &[(String, Tensor)],
    tied: &[(String, String)],
    optimizer: &str,
) -> Result<Option<(Meta, PendingState)>, TrainError> {
    if *resume == Resume::No {
        return Ok(None);
    }
    let mut loaded: Option<OpenedCheckpoint> = None;
    // Rank 0 picks, verifies and applies; everyone learns the meta and the optimizer state names.
    let shared: Option<(Meta, Vec<String>, String)> = on_rank0(comm, || {
        let found = match resume {
            // A checkpoint folder is loaded as named, or not at all.
            Resume::Path(p) if p.join(checkpoint::CHECKSUMS_FILE).exists() || p.join(checkpoint::META_FILE).exists() => {
                Some(checkpoint::open(p).map_err(|e| format!("--resume {}: {e}", p.display()))?)
            }
            Resume::Path(p) if p.is_dir() => match find_newest(p)? {
                Some(c) => Some(c),
                None => return Err(format!("--resume {}: no checkpoint there", p.display())),
            },
            Resume::Path(p) => return Err(format!("--resume {}: no such checkpoint folder", p.display())),
            Resume::Auto => find_newest(checkpoints)?,
            Resume::No => unreachable!(),
        };
        let Some(c) = found else { return Ok(None) };
        same_run(&c, cfg)?;
        let model: Vec<(String, Tensor)> = c.model.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        checkpoint::copy_into(params, &crate::models::without_aliases(model, tied), &c.path.join(checkpoint::MODEL_FILE))?;
        if c.meta.optimizer != optimizer {
            return Err(format!("{}: written with optimizer {}, config asks for {optimizer}", c.path.display(), c.meta.optimizer));
        }
        let state_names = c.optimizer.names();
        let out = (c.meta.clone(), state_names, c.path.display().to_string());
        loaded = Some(c);
        Ok(Some(out))
    })?;
    let Some((meta, names, path)) = shared else {
        tracing::info!("no checkpoint to resume from: starting fresh");
        return Ok(None);
    };
    tracing::info!("resuming from {path} (global step {}, epoch {}, written at {})", meta.global_step, meta.epoch, meta.reason);
    let pending = PendingState { names, loaded: loaded.map(|c| c.optimizer), steps: meta.optimizer_steps, path };
    Ok(Some((meta, pending)))
}

/// The resumed checkpoint's optimizer state, still in rank 0's file.
pub struct PendingState {
    names: Vec<String>,
    /// Rank 0's open file (none elsewhere), read one tensor at a time.
    loaded: Option<SafetensorsReader>,
    steps: u64,
    path: String,
}

impl PendingState {
    /// Hands the state out one tensor at a time from rank 0, which reads each from the file as it
    /// goes; each rank loads it as it arrives: a sharded optimizer keeps its slice and lets the
    /// rest go, so no rank, rank 0 included, holds the whole state beyond one parameter's. Every
    /// rank checks every tensor the same way, so a bad one stops every rank with the same message.
    pub fn load_into(self, comm: &mut dyn Communicator, params: &[(String, Tensor)], opt: &mut Optimizer) -> Result<(), TrainError> {
        // On the model's device for a backend that reduces device memory (NCCL), else the host.
        let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
        let wire = if comm.device_native() { device } else { tch::Device::Cpu };
        // The step count even where there is no state (SGD without momentum).
        opt.load_state(&[], self.steps).map_err(TrainError::Startup)?;
        for n in &self.names {
            let t = match &self.loaded {
                // (A read failing here stops rank 0; its peers' broadcast then times out naming it.)
                Some(file) => file.read(n).map_err(|e| TrainError::Startup(format!("resuming: {e}")))?,
                None => {
                    let param = n.rsplit_once('.').map(|(p, _)| p).unwrap_or(n);
                    let shape = params.iter().find(|(m, _)| m == param).map(|(_, t)| t.size()).unwrap_or_default();
                    Tensor::f_zeros(shape.as_slice(), (tch::Kind::Float, wire))?
                }
            };
            let mut c = t.f_to_device(wire)?.f_contiguous()?;
            comm.broadcast_tensor(&mut c, 0)?;
            opt.load_state(&[(n.clone(), c)], self.steps).map_err(|e| TrainError::Startup(format!("{}: {e}", self.path)))?;
        }
        Ok(())
    }
}

/// A fresh start where another run has checkpoints would mix the two: its restarts and
/// `--resume auto` would pick the other run's checkpoints, and pruning would delete them. Refused
/// first, before the data is read or anything written (the run directory is left as it was).
pub fn refuse_a_used_directory(comm: &mut dyn Communicator, checkpoints: &Path) -> Result<(), TrainError> {
    on_rank0(comm, || match checkpoint::newest_folder(checkpoints) {
        Some(newest) => Err(format!(
            "{} already holds another run's checkpoints (newest {newest}): continue that run with --resume auto, or start \
             this one in another --run-dir (nothing was changed)",
            checkpoints.display()
        )),
        None => Ok(()),
    })
}

/// Refuses a checkpoint whose run was configured differently in what decides its course.
fn same_run(c: &OpenedCheckpoint, cfg: &Config) -> Result<(), String> {
    if c.meta.config.is_empty() {
        return Ok(()); // written by a program of its own, which keeps its own config
    }
    let diffs = super::same_run::differences(&c.meta.config, cfg).map_err(|e| format!("{}: {e}", c.path.display()))?;
    if diffs.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} belongs to a run configured differently ({}): resume it with the config it was written with (its meta.json \
         holds it), or start a new run in another --run-dir",
        c.path.display(),
        diffs.join("; ")
    ))
}

/// The run id: the resumed checkpoint's, or one rank 0 draws for a fresh run.
pub fn run_id(comm: &mut dyn Communicator, resumed: Option<&Meta>) -> Result<String, TrainError> {
    if let Some(id) = resumed.map(|m| m.run_id.clone()).filter(|id| !id.is_empty()) {
        return Ok(id);
    }
    on_rank0(comm, || {
        let n = crate::auth::nonce().map_err(|e| format!("drawing a run id from /dev/urandom: {e}"))?;
        Ok(n[..6].iter().map(|b| format!("{b:02x}")).collect::<String>())
    })
}

fn find_newest(dir: &Path) -> Result<Option<OpenedCheckpoint>, String> {
    let (found, skipped) = checkpoint::find_resumable_opened(dir).map_err(|e| e.to_string())?;
    for reason in skipped {
        tracing::warn!("skipping unusable checkpoint: {reason}");
    }
    Ok(found)
}
