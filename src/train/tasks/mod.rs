//! The task seam: what "loss" and "evaluation" mean for a kind of work. The loop, the loader and
//! evaluation call only this trait, so a new kind of work (language modelling, …) is one new
//! file here plus a line in `build`.

mod classification;
mod language_model;

pub use classification::Classification;
pub use language_model::LanguageModel;

use crate::config::Config;
use crate::data::Batch;
use crate::models::Model;
use tch::{TchError, Tensor};

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

/// The task the config describes: language modelling on token data, else classification.
pub fn build(cfg: &Config) -> Box<dyn Task> {
    match cfg.data.format {
        crate::config::DataFormat::Tokens => Box::new(LanguageModel { block_size: cfg.model.block_size }),
        _ => Box::new(Classification),
    }
}
