//! Evaluation on the test set, sharded across ranks without padding (rank r takes r, r+w, …, so
//! every test sample counts exactly once), with loss and accuracy summed across ranks.

use super::TrainError;
use crate::comm::Communicator;
use crate::data::{Dataset, Loader};
use crate::models::Model;
use std::sync::Arc;
use tch::{Kind, Tensor};

#[derive(Clone, Debug)]
pub struct EvalResult {
    pub loss: f64,
    pub accuracy: f64,
    pub samples: usize,
}

const EVAL_BATCH: usize = 1000;

pub fn evaluate(
    model: &dyn Model,
    test: &Arc<Dataset>,
    comm: &mut dyn Communicator,
    device: tch::Device,
    bf16: bool,
) -> Result<EvalResult, TrainError> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let indices: Vec<usize> = (rank..test.len()).step_by(world).collect();
    let (mut loss_sum, mut correct, mut count) = (0f64, 0i64, 0usize);
    let _guard = tch::no_grad_guard();
    for batch in Loader::spawn(test.clone(), indices, EVAL_BATCH, 2) {
        let (input, target) = (batch.input.f_to_device(device)?, batch.target.f_to_device(device)?);
        let logits = tch::autocast(bf16, || model.forward(&input))?.f_to_kind(Kind::Float)?;
        let loss = logits.f_cross_entropy_loss::<Tensor>(&target, None, tch::Reduction::Sum, -100, 0.0)?;
        loss_sum += loss.f_double_value(&[])?;
        correct += logits.f_argmax(-1, false)?.f_eq_tensor(&target)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        count += batch.len;
    }
    // f32 holds these sums exactly enough: counts below 2^24, losses summed per rank first.
    let mut sums = [loss_sum as f32, correct as f32, count as f32];
    comm.all_reduce_sum(&mut sums)?;
    let n = sums[2].max(1.0) as f64;
    Ok(EvalResult { loss: sums[0] as f64 / n, accuracy: sums[1] as f64 / n, samples: sums[2] as usize })
}
