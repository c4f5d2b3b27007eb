//! The task seam: what "loss" and "evaluation" mean for a kind of work. The loop, the loader and
//! evaluation call only this trait. A model names its task (`ModelSpec::task`); a new kind of work
//! is one new file here plus a line in `builtin`, or `TASKS.register` from a program.

pub mod binary_density;
mod classification;
pub mod contrastive;
mod detection;
mod language_model;
pub mod probe;

pub use classification::Classification;
pub use contrastive::Contrastive;
pub use language_model::LanguageModel;

use super::{EvalResult, TrainError};
use crate::comm::{CommHandle, Communicator};
use crate::config::Config;
use crate::data::{Batch, Dataset};
use crate::models::{Model, ModelConfig};
use crate::registry::{Named, Registry};
use std::sync::Arc;
use tch::{TchError, Tensor};

fn builtin() -> Vec<TaskKind> {
    vec![classification::KIND, language_model::KIND, contrastive::KIND, binary_density::KIND, detection::KIND]
}

/// Every task, by the name a model gives.
pub static TASKS: Registry<TaskKind> = Registry::new("task", builtin);

/// A task by name, and how to make it for a model.
#[derive(Clone, Copy)]
pub struct TaskKind {
    pub name: &'static str,
    pub build: fn(&TaskContext) -> Result<Box<dyn Task>, String>,
}

/// What a task is made from: the model's config and the group (for a loss that communicates,
/// e.g. one comparing with every rank's samples).
pub struct TaskContext<'a> {
    pub model: &'a ModelConfig,
    pub comm: &'a CommHandle,
}

/// What a task's own evaluation (`Task::evaluate`) works with.
pub struct EvalContext<'a> {
    pub train: &'a Arc<dyn Dataset>,
    pub test: &'a Arc<dyn Dataset>,
    /// The group's communicator, borrowed for the evaluation.
    pub comm: &'a mut dyn Communicator,
    pub device: tch::Device,
    pub precision: crate::amp::Precision,
    /// Classes of the labelled data.
    pub classes: usize,
    /// Loader threads.
    pub workers: usize,
    /// Where the run's files go (a task's pictures of its evaluation); `None` on ranks other
    /// than 0 and where nothing is written.
    pub run_dir: Option<&'a std::path::Path>,
}

impl Named for TaskKind {
    fn name(&self) -> &'static str {
        self.name
    }
}

pub trait Task {
    /// Mean training loss over a batch (already on the model's device), forward in training mode.
    fn loss(&self, model: &dyn Model, batch: &Batch) -> Result<Tensor, TchError>;
    /// Sums over one evaluation batch, forward in evaluation mode (no gradients are recorded):
    /// e.g. [loss sum, correct, samples]. Summed over every batch and rank, then `metrics`.
    fn eval_sums(&self, model: &dyn Model, batch: &Batch) -> Result<Vec<f64>, TchError>;
    /// Named metrics from the sums over the whole evaluation split, `loss` first.
    fn metrics(&self, sums: &[f64]) -> Vec<(&'static str, f64)>;
    /// Whether `logits`, the model's evaluation-mode output for `batch`, has the shape this task
    /// needs for `classes` classes (the vocabulary for language modelling); the reason if not.
    fn check_output(&self, logits: &Tensor, batch: &Batch, classes: usize) -> Result<(), String>;
    /// Tokens per sample, for tasks measured in tokens/s.
    fn tokens_per_sample(&self) -> Option<usize> {
        None
    }
    /// The whole evaluation, when it is more than sums over test batches (a linear probe trains
    /// a classifier on features of the training set first). `None`: the usual per-batch
    /// evaluation with `eval_sums`. Every rank calls it; it may communicate through `ctx.comm`.
    fn evaluate(&self, _model: &dyn Model, _ctx: &mut EvalContext) -> Option<Result<EvalResult, TrainError>> {
        None
    }
    /// What the task leaves in the run directory at the end of training, on rank 0 (a generative
    /// model's samples); the files written. A failure is a warning: the weights are saved.
    fn finish(
        &self,
        _model: &dyn Model,
        _sample_shape: &[i64],
        _run_dir: &std::path::Path,
        _device: tch::Device,
    ) -> Result<Vec<std::path::PathBuf>, String> {
        Ok(vec![])
    }
}

/// The task the model names for the configured data.
pub fn build(cfg: &Config, comm: &CommHandle) -> Result<Box<dyn Task>, String> {
    let name = cfg.model.spec.task(cfg.data.samples());
    let kind = TASKS.get(name).map_err(|e| format!("model {}: {e}", cfg.model.name))?;
    (kind.build)(&TaskContext { model: &cfg.model, comm })
}
