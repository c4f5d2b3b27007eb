//! The `ringtrain` binary's training loop, built from the library's public pieces (`Ddp`,
//! `Optimizer`, the model, task and data seams, checkpoints). Reads like DDP's pseudo-code:
//!
//! ```text
//! check every rank agrees on config and data; build model; restore or init; Ddp (broadcast)
//! for epoch: sampler.set_epoch(epoch)
//!   for step: lr = schedule(step)
//!     for micro-batch: broadcast buffers → forward → loss / accum → backward
//!                      (only the last micro-batch all-reduces, overlapped with backward)
//!     clip → optimizer step
//!   evaluate on the test set sharded across ranks; rank 0 writes the epoch's metrics
//! ```
//!
//! - `setup`: from config to a ready `Trainer` (data, model, optimizer, resume, Ddp).
//! - `step`: one optimizer step over its micro-batches.
//! - `epoch`: the steps of one epoch, logging and checkpoints between them.
//! - `position`: where training stands and where a resumed run starts (pure).
//! - `tasks`: what loss and evaluation mean (classification, …).

pub mod breakdown;
mod checkpointing;
mod epoch;
mod eval;
pub mod fault;
pub mod footprint;
mod peak;
pub mod position;
mod resume;
mod same_run;
mod setup;
mod step;
pub mod tasks;

pub use eval::{evaluate, EvalResult};
pub use resume::Resume;

use crate::checkpoint::StreamedFile;
use crate::comm::{CommError, CommGuard, CommHandle, Communicator};
use crate::config::Config;
use crate::data::{DataError, DistributedSampler, Splits};
use crate::ddp::{Ddp, DdpError};
use crate::models::Model;
use crate::optim::Optimizer;
use crate::telemetry::Metrics;
use breakdown::{peak_rss_mib, Breakdown};
use fault::Fault;
use position::Position;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tasks::Task;
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Amp(#[from] crate::amp::AmpError),
    #[error(transparent)]
    Ddp(#[from] DdpError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("ranks disagree: {0}")]
    Disagree(String),
    #[error("{0}")]
    Startup(String),
}

pub struct TrainContext<'a> {
    pub cfg: &'a Config,
    /// The group's communicator (the handle `Ddp` shares).
    pub comm: CommHandle,
    pub run_dir: &'a Path,
    pub fault: Option<Fault>,
    pub resume: Resume,
    /// Set by a signal handler: finish the step, checkpoint, stop.
    pub stop: Arc<AtomicBool>,
    /// Test aid: every rank appends "epoch sample step" lines (and a "# start after global step N (restart R)" line per start) to samples/rankN.txt.
    pub sample_log: bool,
    /// Where this rank computes (device::select).
    pub device: tch::Device,
}

#[derive(Clone, Debug)]
pub struct EpochSummary {
    pub epoch: usize,
    pub train_loss: f64,
    pub test: Option<EvalResult>,
    pub samples_per_s: f64,
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub global_steps: u64,
    pub epochs: Vec<EpochSummary>,
    /// FNV-1a of every parameter and buffer: equal on every rank = identical replicas.
    pub param_hash: u64,
    /// Ended early on a stop request (after writing a checkpoint).
    pub stopped: bool,
    pub rank: usize,
    /// Rank 0 of a language model with a `sample` section: the prompt and the generated text.
    pub sample: Option<String>,
}

/// Everything the loop holds between steps.
pub(crate) struct Trainer<'a> {
    cfg: &'a Config,
    comm: CommHandle,
    run_dir: &'a Path,
    checkpoints: PathBuf,
    fault: Option<Fault>,
    stop: Arc<AtomicBool>,
    device: tch::Device,
    /// Forward and backward under autocast at this precision.
    precision: crate::amp::Precision,
    /// fp16's dynamic loss scaling.
    scaler: Option<crate::amp::GradScaler>,
    /// fp16: optimizer steps skipped for non-finite gradients (this start of the run).
    skipped_steps: u64,
    /// MFU's denominator per rank (models that count their FLOPs).
    peak: Option<peak::Peak>,
    splits: Splits,
    task: Box<dyn Task>,
    model: Box<dyn Model>,
    ddp: Ddp,
    params: Vec<Tensor>,
    opt: Optimizer,
    /// ZeRO-1 (`optimizer.shard`): the shards this rank steps; `opt` holds only their state.
    zero: Option<crate::ddp::Zero>,
    pos: Position,
    metrics: Metrics,
    /// Rank 0's TensorBoard event file.
    tb: Option<crate::telemetry::tensorboard::EventWriter>,
    samples_file: Option<std::fs::File>,
    sampler: DistributedSampler,
    timing: Breakdown,
    /// ringrun shows a live status line: every rank emits status records.
    status_line: bool,
    last_saved: Option<u64>,
    /// The run the checkpoints belong to (see `resume::run_id`).
    run_id: String,
    stopped: bool,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TrainError {
    let what = what.into();
    move |source| TrainError::Io { what, source }
}

/// Fails unless every rank contributed the same bytes; names the first rank that differs.
fn agree(comm: &mut dyn Communicator, what: &str, mine: &[u8]) -> Result<(), TrainError> {
    let all = comm.all_gather(mine)?;
    if let Some(r) = all.iter().position(|v| v != &all[0]) {
        return Err(TrainError::Disagree(format!(
            "rank {r}'s {what} differs from rank 0's: {} vs {}",
            String::from_utf8_lossy(&all[r]),
            String::from_utf8_lossy(&all[0])
        )));
    }
    Ok(())
}

pub fn run(ctx: TrainContext<'_>) -> Result<Summary, TrainError> {
    let mut t = Trainer::setup(ctx)?;
    if t.cfg.train.eval && t.cfg.train.eval_at_start && t.pos.global_step == 0 {
        t.evaluate_now(0)?;
    }
    let mut epochs = Vec::new();
    while !t.done() {
        epochs.push(t.run_epoch()?);
        if t.stopped {
            break;
        }
    }
    t.finish(epochs)
}

impl Trainer<'_> {
    /// The communicator for the calls that follow (not held across a `Ddp` call, which borrows
    /// it itself).
    fn comm(&self) -> CommGuard<'_> {
        self.comm.lock()
    }

    fn rank(&self) -> usize {
        self.comm().rank()
    }

    fn done(&self) -> bool {
        match self.cfg.train.max_steps {
            Some(m) => self.pos.global_step >= m,
            None => self.pos.epoch >= self.cfg.train.epochs,
        }
    }

    /// Scalars to TensorBoard (rank 0; a failed write is reported once and turns it off, since
    /// losing a plot must not stop training).
    fn tb_scalars(&mut self, values: &[(String, f64)]) {
        if let Some(w) = &mut self.tb {
            if let Err(e) = w.scalars(self.pos.global_step, values) {
                tracing::warn!("TensorBoard event file {}: {e}; no more events this run", w.path().display());
                self.tb = None;
            }
        }
    }

    /// Rank 0 collects what every rank saw: each rank's phase breakdown (`breakdown.json`, the
    /// plot's bars) and, with `train.trace`, each rank's timeline merged into one file
    /// (`trace/merged.json`: one process row per rank). Through the communicator, so ranks on
    /// other nodes need no shared disk. Every rank takes part in the same collectives; the files
    /// are best effort (a warning, never a failed run: the weights are already written).
    fn gather_views(&mut self) -> Result<(), TrainError> {
        let rank = self.rank();
        if self.cfg.train.trace {
            let path = self.run_dir.join("trace").join(format!("rank{rank}.json"));
            if let Err(e) = self.timing.write_trace(&path) {
                tracing::warn!("no timeline: {}: {e}", path.display());
            }
        }
        let mine = serde_json::to_vec(&self.timing.run_means()).expect("json");
        let all = self.comm().all_gather(&mine)?;
        if rank == 0 {
            let ranks: Vec<serde_json::Value> = all
                .iter()
                .enumerate()
                .map(|(r, b)| json!({"rank": r, "step_ms": serde_json::from_slice::<serde_json::Value>(b).unwrap_or_default()}))
                .collect();
            let path = self.run_dir.join("breakdown.json");
            if let Err(e) = std::fs::write(&path, format!("{}\n", serde_json::Value::Array(ranks))) {
                tracing::warn!("{}: {e}", path.display());
            }
        }
        if !self.cfg.train.trace {
            return Ok(());
        }
        let mut merged = Vec::new();
        // Not in the loop's head: a guard there would live through the loop.
        let world = self.comm().world_size();
        for r in 0..world {
            let blob = (r == rank).then(|| serde_json::to_vec(self.timing.trace_events()).expect("json"));
            let got = crate::comm::broadcast_blob(&mut *self.comm(), r, blob.as_deref())?;
            if rank == 0 {
                merged.push(json!({"name": "process_name", "ph": "M", "pid": r, "args": {"name": format!("rank {r}")}}));
                merged.push(json!({"name": "process_sort_index", "ph": "M", "pid": r, "args": {"sort_index": r}}));
                merged.push(json!({"name": "thread_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": "step phases"}}));
                merged.push(json!({"name": "thread_name", "ph": "M", "pid": r, "tid": 1, "args": {"name": "all_reduce buckets"}}));
                let events: Vec<serde_json::Value> = serde_json::from_slice(&got).unwrap_or_default();
                merged.extend(events);
            }
        }
        if rank == 0 {
            let path = self.run_dir.join("trace").join("merged.json");
            let body = serde_json::to_vec(&json!({"traceEvents": merged, "displayTimeUnit": "ms"})).expect("json");
            match std::fs::create_dir_all(self.run_dir.join("trace")).and_then(|_| std::fs::write(&path, body)) {
                Ok(()) => tracing::info!("timeline of every rank: {} (open in Perfetto or chrome://tracing)", path.display()),
                Err(e) => tracing::warn!("no merged timeline: {}: {e}", path.display()),
            }
        }
        Ok(())
    }

    fn checkpoint(&mut self, reason: &str) -> Result<(), TrainError> {
        // What is saved is what was (or will be) evaluated: one set of buffers on every rank.
        self.ddp.unify_buffers(self.cfg.ddp.eval_buffers)?;
        let scaler = self.scaler.as_ref().map(|s| s.state()).transpose()?;
        checkpointing::save(
            &self.comm,
            self.cfg,
            &self.checkpoints,
            &self.ddp,
            &self.opt,
            self.zero.as_ref(),
            &self.pos,
            scaler,
            &self.run_id,
            reason,
        )?;
        self.last_saved = Some(self.pos.global_step);
        Ok(())
    }

    /// The last checkpoint, the timeline, the replica hash and the final weights.
    fn finish(mut self, epochs: Vec<EpochSummary>) -> Result<Summary, TrainError> {
        if self.last_saved != Some(self.pos.global_step) {
            self.checkpoint("end")?;
        }
        self.comm().barrier()?;
        let rank = self.rank();
        // One set of buffers everywhere (rank 0's since the last backward, unless
        // broadcast_buffers is off): the run's result on every rank.
        self.ddp.unify_buffers(self.cfg.ddp.eval_buffers)?;
        if self.ddp.parameter_gathers() > 0 {
            let (g, p) = (self.ddp.parameter_gathers(), self.ddp.parameter_prefetches());
            tracing::info!("ZeRO-3: {g} parameter all-gathers, {p} of them prefetched (run while the unit before computed)");
            // What a released unit gives back (host pages, or device memory freed).
            if let (Some(held), Some(grads)) = (self.ddp.parameter_bytes_resident(), self.ddp.gradient_bytes_resident()) {
                let all: usize = self.ddp.named_parameters().iter().map(|(_, p)| p.numel() * 4).sum();
                let mib = |b: usize| b as f64 / 1048576.0;
                tracing::info!(
                    "ZeRO-3: between steps this rank holds {:.2} MiB of the parameters' {:.2} MiB, and {:.2} MiB of gradients",
                    mib(held),
                    mib(all),
                    mib(grads)
                );
            }
        }
        let param_hash = self.ddp.state_hash()?;
        write_model_file(self.run_dir, &self.ddp, rank)?;
        finish_outputs(self.run_dir, rank, param_hash, self.pos.global_step)?;
        // Rank 0 alone samples through the model: under ZeRO-3 every rank gathers the whole
        // model for it first (no unit can be gathered by rank 0 alone). The task's outputs below
        // need no gather: the one task that runs the model there (the density model's samples)
        // belongs to a model without units, which ZeRO-3 refuses.
        let samples = !self.stopped && self.cfg.sample.as_ref().is_some_and(|s| s.max_new_tokens > 0);
        let whole = if samples { Some(self.ddp.full_state()?) } else { None };
        self.gather_views()?;
        tracing::info!(
            "{} {} steps; parameter hash {param_hash:016x}",
            if self.stopped { "stopped after" } else { "finished" },
            self.pos.global_step
        );
        let sample = match (&self.cfg.sample, rank == 0 && !self.stopped) {
            (Some(s), true) if self.task.tokens_per_sample().is_some() => Some(self.sample_text(s)?),
            _ => None,
        };
        // Not after a stop request: the grace period is for the checkpoint.
        if rank == 0 && !self.stopped {
            match self.task.finish(self.model.as_ref(), &self.splits.sample_shape, self.run_dir, self.device) {
                Ok(files) => files.iter().for_each(|f| tracing::info!("wrote {}", f.display())),
                Err(e) => tracing::warn!("the task's end-of-training output: {e}"),
            }
        }
        if rank == 0 && self.cfg.train.plot {
            let out = self.run_dir.join("plot.png");
            match crate::telemetry::plot::plot_dirs(&[self.run_dir.to_path_buf()], &out) {
                Ok(()) => tracing::info!("plot: {}", out.display()),
                Err(e) => tracing::warn!("no plot.png: {e}"),
            }
        }
        drop(whole);
        if self.ddp.reattached_grads() > 0 {
            tracing::warn!("{} gradient(s) were found replaced and re-attached during training", self.ddp.reattached_grads());
        }
        Ok(Summary { global_steps: self.pos.global_step, epochs, param_hash, stopped: self.stopped, rank, sample })
    }

    /// Text from the trained model (byte-level tokens): the prompt and its continuation.
    fn sample_text(&self, s: &crate::config::SampleConfig) -> Result<String, TrainError> {
        let opts = crate::models::generate::SampleOptions {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature,
            top_k: s.top_k,
            seed: s.seed,
        };
        let prompt: Vec<i64> = s.prompt.bytes().map(i64::from).collect();
        let block =
            self.cfg.model.spec.context_length().ok_or_else(|| TrainError::Startup("sample: the model has no context length".into()))?;
        let new = crate::models::generate::generate(self.model.as_ref(), &prompt, block, self.device, &opts)?;
        Ok(decode_bytes(&prompt, &new))
    }
}

/// Each rank records its parameter hash (equal on all ranks = bitwise-equal replicas); rank 0
/// writes the final weights (parameters and buffers) as safetensors with PyTorch names, atomically.
/// The run's weights as `model.safetensors` (PyTorch names), written by rank 0 as `state_each`
/// streams them (under ZeRO-3 one gathered bucket at a time; every rank takes part).
fn write_model_file(run_dir: &Path, ddp: &Ddp, rank: usize) -> Result<(), TrainError> {
    let tmp = run_dir.join("model.safetensors.tmp");
    let mut file = match rank {
        0 => Some(StreamedFile::create(&tmp, &ddp.state_entries())),
        _ => None,
    };
    // A failed write is kept and the walk goes on: the other ranks are gathering with rank 0.
    let mut failed = None;
    ddp.state_each(0, |n, t| {
        if let Some(Ok(f)) = file.as_mut() {
            if failed.is_none() {
                failed = f.put(n, t).err();
            }
        }
        Ok(())
    })?;
    let written = match (file, failed) {
        (None, _) => return Ok(()),
        (Some(Err(e)), _) | (_, Some(e)) => Err(e),
        (Some(Ok(f)), None) => f.finish().map(|_| ()),
    };
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    std::fs::rename(&tmp, run_dir.join("model.safetensors")).map_err(io_err("model.safetensors"))
}

fn finish_outputs(run_dir: &Path, rank: usize, hash: u64, steps: u64) -> Result<(), TrainError> {
    let ranks_dir = run_dir.join("ranks");
    std::fs::create_dir_all(&ranks_dir).map_err(io_err(ranks_dir.display().to_string()))?;
    let report = json!({"rank": rank, "param_hash": format!("{hash:016x}"), "global_steps": steps, "peak_rss_mib": peak_rss_mib()});
    let path = ranks_dir.join(format!("rank{rank}.json"));
    std::fs::write(&path, format!("{report}\n")).map_err(io_err(path.display().to_string()))
}

/// Byte-level tokens back to text (invalid UTF-8 shown as U+FFFD).
pub fn decode_bytes(prompt: &[i64], new: &[i64]) -> String {
    let bytes: Vec<u8> = prompt.iter().chain(new).map(|&t| t.clamp(0, 255) as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
