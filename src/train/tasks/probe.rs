//! The linear probe, self-supervised learning's evaluation: the frozen encoder's features of
//! training images train a linear classifier, whose test accuracy measures the representation.
//! Distributed as everything else: each rank extracts the features of its share of the images,
//! the standardisation statistics and every step's gradient are summed over ranks, so every rank
//! holds the same classifier; test counts are summed as the usual evaluation sums them.

use super::EvalContext;
use crate::comm::Communicator;
use crate::data::{Dataset, Loader};
use crate::models::Model;
use crate::train::{EvalResult, TrainError};
use std::sync::Arc;
use tch::{Device, Kind, Reduction, TchError, Tensor};

/// How the probe is trained.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Training images (evenly spaced over the split); 0: all.
    pub train_samples: usize,
    /// Full-batch Adam steps.
    pub steps: usize,
    pub lr: f64,
}

const BATCH: usize = 500;

/// The probe's test loss and accuracy (`probe_loss`, `acc`: not `loss`, which would read as the
/// training loss's counterpart), and the probe's accuracy on its own training
/// features (`probe_train_acc`).
pub fn linear_probe(model: &dyn Model, ctx: &mut EvalContext, o: &ProbeOptions) -> Result<EvalResult, TrainError> {
    let (rank, world) = (ctx.comm.rank(), ctx.comm.world_size());
    let n = ctx.train.len();
    let take = if o.train_samples == 0 { n } else { o.train_samples.min(n) };
    let chosen: Vec<usize> = (0..take).map(|i| i * n / take.max(1)).collect();
    let mine: Vec<usize> = chosen.into_iter().skip(rank).step_by(world).collect();
    let (train_x, train_y) = features(model, ctx.train, mine, ctx)?;
    let test_mine: Vec<usize> = (rank..ctx.test.len()).step_by(world).collect();
    let (test_x, test_y) = features(model, ctx.test, test_mine, ctx)?;
    let width = train_x.size()[1];

    // Standardise every feature with its mean and deviation over all ranks' training features.
    let stats = Tensor::f_cat(
        &[train_x.f_sum_dim_intlist(0, false, Kind::Double)?, train_x.f_square()?.f_sum_dim_intlist(0, false, Kind::Double)?],
        0,
    )?;
    let mut local = to_f64(&stats)?;
    local.push(train_x.size()[0] as f64);
    let total = sum_over_ranks(ctx.comm, &local)?;
    let count = total[2 * width as usize].max(1.0);
    let mean = Tensor::from_slice(&total[..width as usize]).f_div_scalar(count)?;
    let var = Tensor::from_slice(&total[width as usize..2 * width as usize]).f_div_scalar(count)?.f_sub(&mean.f_square()?)?;
    let std = var.f_clamp_min(0.0)?.f_add_scalar(1e-6)?.f_sqrt()?;
    let standardise =
        |x: &Tensor| -> Result<Tensor, TchError> { x.f_to_kind(Kind::Double)?.f_sub(&mean)?.f_div(&std)?.f_to_kind(Kind::Float) };
    let (train_x, test_x) = (standardise(&train_x)?, standardise(&test_x)?);

    // The classifier, from zeros (the same on every rank), in f32 on the CPU: it is tiny.
    let classes = ctx.classes as i64;
    let w = Tensor::f_zeros([classes, width], (Kind::Float, Device::Cpu))?.f_set_requires_grad(true)?;
    let b = Tensor::f_zeros([classes], (Kind::Float, Device::Cpu))?.f_set_requires_grad(true)?;
    let mut adam = Adam::new(&[&w, &b], o.lr)?;
    for _ in 0..o.steps {
        // The mean loss over every rank's samples: each rank's sum over its own, / the total.
        let loss = train_x
            .f_linear(&w, Some(&b))?
            .f_cross_entropy_loss::<Tensor>(&train_y, None, Reduction::Sum, -100, 0.0)?
            .f_div_scalar(count)?;
        let (gw, gb) = match Tensor::f_run_backward(&[&loss], &[&w, &b], false, false)?.as_slice() {
            [gw, gb] => (gw.shallow_clone(), gb.shallow_clone()),
            _ => unreachable!("two inputs, two gradients"),
        };
        let flat = Tensor::f_cat(&[gw.f_view([-1])?, gb], 0)?;
        let summed = Tensor::from_slice(&sum_over_ranks(ctx.comm, &to_f64(&flat)?)?).f_to_kind(Kind::Float)?;
        adam.step(
            &[&w, &b],
            &[summed.f_narrow(0, 0, classes * width)?.f_view([classes, width])?, summed.f_narrow(0, classes * width, classes)?],
        )?;
    }

    let _guard = tch::no_grad_guard();
    let sums = |x: &Tensor, y: &Tensor| -> Result<[f64; 3], TchError> {
        let logits = x.f_linear(&w, Some(&b))?;
        let loss = logits.f_cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0)?.f_double_value(&[])?;
        let correct = logits.f_argmax(-1, false)?.f_eq_tensor(y)?.f_sum(Kind::Int64)?.f_int64_value(&[])? as f64;
        Ok([loss, correct, y.size()[0] as f64])
    };
    let mut local = sums(&test_x, &test_y)?.to_vec();
    local.extend(sums(&train_x, &train_y)?);
    let t = sum_over_ranks(ctx.comm, &local)?;
    let test_n = t[2].max(1.0);
    Ok(EvalResult {
        metrics: vec![("probe_loss", t[0] / test_n), ("acc", t[1] / test_n), ("probe_train_acc", t[4] / t[5].max(1.0))],
        samples: t[2] as usize,
    })
}

/// The model's features (evaluation mode, no gradients) and labels of `indices`, on the CPU.
fn features(model: &dyn Model, data: &Arc<dyn Dataset>, indices: Vec<usize>, ctx: &EvalContext) -> Result<(Tensor, Tensor), TrainError> {
    let _guard = tch::no_grad_guard();
    let (mut xs, mut ys) = (vec![], vec![]);
    for batch in Loader::spawn_workers(data.clone(), indices, BATCH, 2 * ctx.workers, 0, ctx.workers)? {
        let batch = batch?.to_device(ctx.device)?;
        let f = crate::amp::autocast(ctx.device, ctx.precision, || model.features(&batch.input))?
            .ok_or_else(|| TrainError::Startup("a linear probe needs a model with encoder features (simclr)".into()))??;
        xs.push(f.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?);
        ys.push(batch.target.f_to_device(Device::Cpu)?);
    }
    if xs.is_empty() {
        // A rank with no samples (more ranks than images) still takes part with none: the
        // feature width comes from one image.
        let one = data.batch(&[0], 0)?.to_device(ctx.device)?;
        let f = crate::amp::autocast(ctx.device, ctx.precision, || model.features(&one.input))?
            .ok_or_else(|| TrainError::Startup("a linear probe needs a model with encoder features (simclr)".into()))??;
        let width = f.size()[1];
        return Ok((Tensor::f_zeros([0, width], (Kind::Float, Device::Cpu))?, Tensor::f_zeros([0], (Kind::Int64, Device::Cpu))?));
    }
    Ok((Tensor::f_cat(&xs, 0)?, Tensor::f_cat(&ys, 0)?))
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>, TchError> {
    Vec::<f64>::try_from(t.f_to_kind(Kind::Double)?.f_contiguous()?.f_view([-1])?)
}

/// The element-wise sum of every rank's `mine`, added in rank order in f64: the same on every
/// rank, so every rank's classifier stays the same.
fn sum_over_ranks(comm: &mut dyn Communicator, mine: &[f64]) -> Result<Vec<f64>, TrainError> {
    let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut total = vec![0.0; mine.len()];
    for blob in comm.all_gather(&bytes)? {
        if blob.len() != bytes.len() {
            return Err(TrainError::Disagree(format!("linear probe: a rank sent {} values, this one {}", blob.len() / 8, mine.len())));
        }
        for (t, c) in total.iter_mut().zip(blob.chunks_exact(8)) {
            *t += f64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
    }
    Ok(total)
}

/// Adam (PyTorch's defaults: betas 0.9, 0.999, eps 1e-8) on the probe's two tensors.
struct Adam {
    lr: f64,
    t: i32,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl Adam {
    fn new(params: &[&Tensor], lr: f64) -> Result<Adam, TchError> {
        let zeros = || params.iter().map(|p| p.f_zeros_like()).collect::<Result<Vec<_>, _>>();
        Ok(Adam { lr, t: 0, m: zeros()?, v: zeros()? })
    }

    fn step(&mut self, params: &[&Tensor], grads: &[Tensor]) -> Result<(), TchError> {
        let (b1, b2) = (0.9f64, 0.999f64);
        self.t += 1;
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        tch::no_grad(|| {
            for ((p, g), (m, v)) in params.iter().zip(grads).zip(self.m.iter_mut().zip(self.v.iter_mut())) {
                *m = m.f_mul_scalar(b1)?.f_add(&g.f_mul_scalar(1.0 - b1)?)?;
                *v = v.f_mul_scalar(b2)?.f_add(&g.f_square()?.f_mul_scalar(1.0 - b2)?)?;
                let update = m.f_div_scalar(c1)?.f_div(&v.f_div_scalar(c2)?.f_sqrt()?.f_add_scalar(1e-8)?)?.f_mul_scalar(self.lr)?;
                let _ = p.shallow_clone().f_sub_(&update)?;
            }
            Ok(())
        })
    }
}
