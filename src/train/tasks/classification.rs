//! Classification: cross-entropy over `[batch, classes]` logits and i64 labels; evaluation gives
//! the mean loss and the accuracy.

use super::Task;
use crate::data::Batch;
use crate::models::Model;
use tch::{Kind, Reduction, TchError, Tensor};

pub struct Classification;

pub const KIND: super::TaskKind = super::TaskKind { name: "classification", build: |_| Ok(Box::new(Classification)) };

impl Task for Classification {
    fn loss(&self, model: &dyn Model, batch: &Batch) -> Result<Tensor, TchError> {
        let logits = model.forward_t(&batch.input, true)?;
        logits.f_cross_entropy_loss::<Tensor>(&batch.target, None, Reduction::Mean, -100, 0.0)
    }

    fn eval_sums(&self, model: &dyn Model, batch: &Batch) -> Result<Vec<f64>, TchError> {
        let logits = model.forward_t(&batch.input, false)?.f_to_kind(Kind::Float)?;
        let loss = logits.f_cross_entropy_loss::<Tensor>(&batch.target, None, Reduction::Sum, -100, 0.0)?;
        let correct = logits.f_argmax(-1, false)?.f_eq_tensor(&batch.target)?.f_sum(Kind::Int64)?;
        Ok(vec![loss.f_double_value(&[])?, correct.f_int64_value(&[])? as f64, batch.len as f64])
    }

    fn check_output(&self, logits: &Tensor, batch: &Batch, classes: usize) -> Result<(), String> {
        let want = [batch.len as i64, classes as i64];
        match logits.size() == want && logits.is_floating_point() {
            true => Ok(()),
            false => Err(format!(
                "the model's output for a batch of {} is {:?} {:?}; classification into {classes} classes needs \
                 floating-point logits of shape {want:?} (batch, classes)",
                batch.len,
                logits.kind(),
                logits.size()
            )),
        }
    }

    fn metrics(&self, sums: &[f64]) -> Vec<(&'static str, f64)> {
        let n = sums[2].max(1.0);
        vec![("loss", sums[0] / n), ("acc", sums[1] / n)]
    }
}
