//! Contrastive learning (SimCLR): two random views of each image go through the model; NT-Xent
//! asks each view's projection to pick its partner among the views of the whole global batch.
//! The negatives come from every rank through the differentiable all-gather, so the gradient of a
//! rank's embeddings includes what the other ranks' losses ask of them (summed back by the
//! gather's backward) and the averaged step equals one process on the global batch. Labels are
//! not used in training; evaluation is a linear probe on the encoder's features.
//!
//! The keys (`temperature`, `views`, `probe_*`) are the model's (`model: {name: simclr, …}`), so
//! any model that names this task with them can use it; such a model must also say
//! `random_in_training` (as simclr does), so the loop seeds the views per (seed, rank, step) and a
//! resumed run draws the same ones.

use super::probe::{linear_probe, ProbeOptions};
use super::{EvalContext, Task, TaskContext};
use crate::comm::CommHandle;
use crate::data::views::{random_view, ViewOptions};
use crate::data::Batch;
use crate::models::Model;
use crate::train::{EvalResult, TrainError};
use serde::Deserialize;
use tch::{Device, Kind, Reduction, TchError, Tensor};

pub const KIND: super::TaskKind = super::TaskKind { name: "contrastive", build };

/// The model keys this task reads.
#[derive(Deserialize)]
struct Keys {
    temperature: f64,
    views: ViewOptions,
    probe_train_samples: usize,
    probe_steps: usize,
    probe_lr: f64,
}

fn build(ctx: &TaskContext) -> Result<Box<dyn Task>, String> {
    let k: Keys = serde_yaml::from_value(ctx.model.spec.to_value()).map_err(|e| {
        format!("task contrastive reads model.temperature, views and probe_* (as model simclr has them): model {}: {e}", ctx.model.name)
    })?;
    let probe = ProbeOptions { train_samples: k.probe_train_samples, steps: k.probe_steps, lr: k.probe_lr };
    Ok(Box::new(Contrastive { temperature: k.temperature, views: k.views, probe, group: ctx.comm.clone() }))
}

pub struct Contrastive {
    pub temperature: f64,
    pub views: ViewOptions,
    pub probe: ProbeOptions,
    pub group: CommHandle,
}

impl Task for Contrastive {
    fn loss(&self, model: &dyn Model, batch: &Batch) -> Result<Tensor, TchError> {
        let x = &batch.input;
        // Both views in one forward, as SimCLR does: BatchNorm sees both.
        let views = Tensor::f_cat(&[random_view(x, &self.views)?, random_view(x, &self.views)?], 0)?;
        let z = model.forward_t(&views, true)?;
        nt_xent(&z, self.temperature, &self.group)
    }

    fn eval_sums(&self, _model: &dyn Model, _batch: &Batch) -> Result<Vec<f64>, TchError> {
        Err(TchError::Torch("task contrastive evaluates with a linear probe, not per test batch".into()))
    }

    fn metrics(&self, sums: &[f64]) -> Vec<(&'static str, f64)> {
        vec![("loss", sums.first().copied().unwrap_or(f64::NAN))]
    }

    fn check_output(&self, z: &Tensor, batch: &Batch, _classes: usize) -> Result<(), String> {
        match z.dim() == 2 && z.size()[0] == batch.len as i64 && z.is_floating_point() {
            true => Ok(()),
            false => Err(format!(
                "the model's output for a batch of {} is {:?} {:?}; contrastive learning needs floating-point \
                 projections of shape [batch, width]",
                batch.len,
                z.kind(),
                z.size()
            )),
        }
    }

    fn evaluate(&self, model: &dyn Model, ctx: &mut EvalContext) -> Option<Result<EvalResult, TrainError>> {
        Some(linear_probe(model, ctx, &self.probe))
    }
}

/// NT-Xent (SimCLR's loss) of this rank's projections `z` = [view 1 of its B images; view 2 of
/// them], with the views of every rank's images as candidates: the mean over this rank's 2B
/// anchors of the cross-entropy of picking the anchor's partner among the 2N − 1 other views of
/// the global batch (N images over all ranks), similarities cosine / `temperature`.
pub fn nt_xent(z: &Tensor, temperature: f64, group: &CommHandle) -> Result<Tensor, TchError> {
    let rows = z.size()[0];
    if rows % 2 != 0 {
        return Err(TchError::Torch(format!("nt_xent: {rows} projections is not two views of each image")));
    }
    let (b, d) = (rows / 2, z.size()[1]);
    let z = z.f_to_kind(Kind::Float)?;
    let z = z.f_div(&z.f_norm_scalaropt_dim(2, [1i64].as_slice(), true)?.f_clamp_min(1e-12)?)?;
    // One gather of [view 1 | view 2] per image keeps each image's views together, so this
    // rank's rows sit at the same offset in both halves of the global batch.
    let local = Tensor::f_cat(&[z.f_narrow(0, 0, b)?, z.f_narrow(0, b, b)?], 1)?;
    let (all, offset) = crate::autograd::all_gather_at(&local, group)?;
    let n = all.size()[0];
    let keys = Tensor::f_cat(&[all.f_narrow(1, 0, d)?, all.f_narrow(1, d, d)?], 0)?; // [2N, d]
    let logits = z.f_matmul(&keys.f_tr()?)?.f_div_scalar(temperature)?; // [2B, 2N]
    let i = Tensor::f_arange(b, (Kind::Int64, Device::Cpu))?.f_add_scalar(offset)?;
    // Anchor i of view 1 is column offset+i, its partner N+offset+i; view 2 the other way.
    let own = Tensor::f_cat(&[i.shallow_clone(), i.f_add_scalar(n)?], 0)?.f_to_device(z.device())?;
    let partner = Tensor::f_cat(&[i.f_add_scalar(n)?, i], 0)?.f_to_device(z.device())?;
    let logits = logits.f_scatter_value(1, &own.f_unsqueeze(1)?, f64::NEG_INFINITY)?;
    logits.f_cross_entropy_loss::<Tensor>(&partner, None, Reduction::Mean, -100, 0.0)
}
