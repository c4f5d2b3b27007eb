//! Language modelling: next-token cross-entropy, the mean over every position of the batch
//! (nanoGPT's loss); evaluation gives the mean loss per token and the perplexity, exp(loss).

use super::Task;
use crate::data::Batch;
use crate::models::Model;
use tch::{Kind, Reduction, TchError, Tensor};

pub const KIND: super::TaskKind = super::TaskKind {
    name: "language_model",
    build: |ctx| {
        let model = ctx.model;
        let block_size =
            model.spec.context_length().ok_or_else(|| format!("model {} has no context length for language modelling", model.name))?;
        Ok(Box::new(LanguageModel { block_size }))
    },
};

pub struct LanguageModel {
    /// Tokens in one sample (the context length), for tokens/s.
    pub block_size: usize,
}

fn flat_loss(model: &dyn Model, batch: &Batch, train: bool, reduction: Reduction) -> Result<Tensor, TchError> {
    let logits = model.forward_t(&batch.input, train)?;
    let vocab = logits.size().last().copied().unwrap_or(1);
    logits.f_to_kind(Kind::Float)?.f_view([-1, vocab])?.f_cross_entropy_loss::<Tensor>(
        &batch.target.f_view([-1])?,
        None,
        reduction,
        -1,
        0.0,
    )
}

impl Task for LanguageModel {
    fn loss(&self, model: &dyn Model, batch: &Batch) -> Result<Tensor, TchError> {
        flat_loss(model, batch, true, Reduction::Mean)
    }

    fn eval_sums(&self, model: &dyn Model, batch: &Batch) -> Result<Vec<f64>, TchError> {
        let loss = flat_loss(model, batch, false, Reduction::Sum)?;
        Ok(vec![loss.f_double_value(&[])?, batch.target.numel() as f64])
    }

    fn check_output(&self, logits: &Tensor, batch: &Batch, classes: usize) -> Result<(), String> {
        let mut want = batch.target.size();
        want.push(classes as i64);
        match logits.size() == want && logits.is_floating_point() {
            true => Ok(()),
            false => Err(format!(
                "the model's output for a batch of {} windows is {:?} {:?}; language modelling over a \
                 vocabulary of {classes} needs floating-point logits of shape {want:?} (batch, tokens, vocabulary)",
                batch.len,
                logits.kind(),
                logits.size()
            )),
        }
    }

    fn metrics(&self, sums: &[f64]) -> Vec<(&'static str, f64)> {
        let loss = sums[0] / sums[1].max(1.0);
        vec![("loss", loss), ("perplexity", loss.exp())]
    }

    fn tokens_per_sample(&self) -> Option<usize> {
        Some(self.block_size)
    }
}
