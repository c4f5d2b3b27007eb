//! The task seam: what "loss" and "evaluation" mean for a kind of work. The loop, the loader and
//! evaluation call only this trait. A model names its task (`ModelSpec::task`); a new kind of work
//! is one new file here plus a line in `builtin`, or `TASKS.register` from a program.

mod classification;
mod language_model;

pub use classification::Classification;
pub use language_model::LanguageModel;

use crate::config::Config;
use crate::data::Batch;
use crate::models::{Model, ModelConfig};
use crate::registry::{Named, Registry};
use tch::{TchError, Tensor};

fn builtin() -> Vec<TaskKind> {
    vec![classification::KIND, language_model::KIND]
}

/// Every task, by the name a model gives.
pub static TASKS: Registry<TaskKind> = Registry::new("task", builtin);

/// A task by name, and how to make it for a model.
#[derive(Clone, Copy)]
pub struct TaskKind {
    pub name: &'static str,
    pub build: fn(&ModelConfig) -> Result<Box<dyn Task>, String>,
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
}

/// The task the model names for the configured data.
pub fn build(cfg: &Config) -> Result<Box<dyn Task>, String> {
    let name = cfg.model.spec.task(cfg.data.samples());
    let kind = TASKS.get(name).map_err(|e| format!("model {}: {e}", cfg.model.name))?;
    (kind.build)(&cfg.model)
}
