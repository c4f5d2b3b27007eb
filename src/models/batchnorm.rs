//! BatchNorm as PyTorch's `nn.BatchNorm1d/2d` (weight 1, bias 0, running mean 0 and variance 1,
//! momentum 0.1, eps 1e-5), or SyncBatchNorm over a group: the layer ResNet and SimCLR's
//! projection head share. Registered under PyTorch's names (`weight`, `bias`, `running_mean`,
//! `running_var`, `num_batches_tracked`).

use crate::comm::CommHandle;
use tch::{Device, Kind, TchError, Tensor};

/// BatchNorm's defaults in PyTorch.
const MOMENTUM: f64 = 0.1;
const EPS: f64 = 1e-5;

pub(crate) struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    /// SyncBatchNorm over this group.
    sync: Option<CommHandle>,
}

/// Shallow: the same tensors (a checkpointed unit's recomputation holds a copy).
impl Clone for BatchNorm {
    fn clone(&self) -> BatchNorm {
        BatchNorm {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            running_mean: self.running_mean.shallow_clone(),
            running_var: self.running_var.shallow_clone(),
            num_batches_tracked: self.num_batches_tracked.shallow_clone(),
            sync: self.sync.clone(),
        }
    }
}

impl BatchNorm {
    /// `c` channels named `name.*`, appended to `params` and `buffers` in `state_dict` order.
    pub(crate) fn new(
        name: &str,
        c: i64,
        device: Device,
        sync: Option<CommHandle>,
        params: &mut Vec<(String, Tensor)>,
        buffers: &mut Vec<(String, Tensor)>,
    ) -> Result<BatchNorm, TchError> {
        let full = |v: f64| Tensor::f_full([c], v, (Kind::Float, device));
        let weight = full(1.0)?.f_set_requires_grad(true)?;
        let bias = full(0.0)?.f_set_requires_grad(true)?;
        params.push((format!("{name}.weight"), weight.shallow_clone()));
        params.push((format!("{name}.bias"), bias.shallow_clone()));
        let (running_mean, running_var) = (full(0.0)?, full(1.0)?);
        let num_batches_tracked = Tensor::f_zeros([], (Kind::Int64, device))?;
        for (n, t) in [("running_mean", &running_mean), ("running_var", &running_var), ("num_batches_tracked", &num_batches_tracked)] {
            buffers.push((format!("{name}.{n}"), t.shallow_clone()));
        }
        Ok(BatchNorm { weight, bias, running_mean, running_var, num_batches_tracked, sync })
    }

    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        if train && crate::autograd::recomputing() {
            // A checkpointed unit running again in backward: normalised by the same batch
            // statistics, but the running ones and the count were updated the first time.
            return x.f_batch_norm(Some(&self.weight), Some(&self.bias), None::<&Tensor>, None::<&Tensor>, true, MOMENTUM, EPS, true);
        }
        if train {
            // PyTorch's BatchNorm counts batches in training mode (momentum is fixed, so the count
            // only travels in checkpoints).
            let _ = tch::no_grad(|| self.num_batches_tracked.shallow_clone().f_add_scalar_(1))?;
        }
        if let Some(comm) = &self.sync {
            let running = Some((&self.running_mean, &self.running_var));
            return crate::autograd::sync_batch_norm(x, Some(&self.weight), Some(&self.bias), running, train, MOMENTUM, EPS, comm);
        }
        // In training mode libtorch updates the running statistics in place (momentum 0.1,
        // unbiased batch variance), as PyTorch does.
        x.f_batch_norm(Some(&self.weight), Some(&self.bias), Some(&self.running_mean), Some(&self.running_var), train, MOMENTUM, EPS, true)
    }
}
