//! Object detection: a detector's output (`[batch, points, 5 + classes]`, see `models::yolo`)
//! against `[batch, most, 5]` box targets, with `detect::detection_loss`. Evaluation runs every
//! rank over its shard of the test images, gathers every rank's detections and ground truth
//! (`detect::distributed_mean_ap`) and reports COCO's mAP@0.5 and mAP@[.5:.95] of the whole set,
//! with the loss over the whole set (every batch's sums over the points assigned in all of them);
//! rank 0 draws the first images of its shard (test images 0, w, 2w, … at w ranks) with their
//! predicted and true boxes into `predictions.png`.

use super::{EvalContext, Task};
use crate::data::{Batch, Loader};
use crate::detect::{self, distributed_mean_ap, ImageBoxes};
use crate::models::Model;
use crate::train::{EvalResult, TrainError};
use tch::{TchError, Tensor};

pub struct Detection;

pub const KIND: super::TaskKind = super::TaskKind { name: "detection", build: |_| Ok(Box::new(Detection)) };

/// Images per evaluation batch.
const EVAL_BATCH: usize = 64;
/// Test images drawn into predictions.png.
const DRAWN: usize = 8;

fn points(model: &dyn Model, input: &Tensor) -> Result<Tensor, TchError> {
    model.anchor_points(&input.size()).unwrap_or_else(|| {
        Err(TchError::Torch("the detection task needs a detector: the model gives no anchor points (Model::anchor_points)".into()))
    })
}

impl Task for Detection {
    fn loss(&self, model: &dyn Model, batch: &Batch) -> Result<Tensor, TchError> {
        let out = model.forward_t(&batch.input, true)?;
        Ok(detect::detection_loss(&out, &points(model, &batch.input)?, &batch.target)?.total)
    }

    fn eval_sums(&self, model: &dyn Model, batch: &Batch) -> Result<Vec<f64>, TchError> {
        let out = model.forward_t(&batch.input, false)?;
        let loss = detect::detection_loss(&out, &points(model, &batch.input)?, &batch.target)?.total;
        Ok(vec![loss.f_double_value(&[])? * batch.len as f64, batch.len as f64])
    }

    fn metrics(&self, sums: &[f64]) -> Vec<(&'static str, f64)> {
        vec![("loss", sums[0] / sums[1].max(1.0))]
    }

    fn check_output(&self, out: &Tensor, batch: &Batch, classes: usize) -> Result<(), String> {
        let s = out.size();
        match s.len() == 3 && s[0] == batch.len as i64 && s[2] == 5 + classes as i64 && out.is_floating_point() {
            true => Ok(()),
            false => Err(format!(
                "the model's output for a batch of {} is {:?} {s:?}; detection into {classes} classes needs floating-point \
                 [batch, points, 5 + {classes}] (box x1 y1 x2 y2, objectness, classes)",
                batch.len,
                out.kind()
            )),
        }
    }

    fn evaluate(&self, model: &dyn Model, ctx: &mut EvalContext) -> Option<Result<EvalResult, TrainError>> {
        Some(evaluate(model, ctx))
    }
}

/// This rank's test images: the loss's numerator (summed before dividing by assigned points) and
/// the points assigned, their detections and truths by global index, and the images to draw
/// (rank 0's first few: input, detections, truths).
struct Shard {
    loss_sum: f64,
    assigned: f64,
    images: Vec<usize>,
    detections: detect::eval::Shard,
    truths: detect::eval::Shard,
    drawn: Vec<(Tensor, ImageBoxes, ImageBoxes)>,
}

fn predict_shard(model: &dyn Model, ctx: &EvalContext, images: Vec<usize>) -> Result<Shard, TrainError> {
    let mut shard = Shard { loss_sum: 0.0, assigned: 0.0, images: images.clone(), detections: vec![], truths: vec![], drawn: vec![] };
    let _guard = tch::no_grad_guard();
    let mut next = 0;
    for batch in Loader::spawn_workers(ctx.test.clone(), images.clone(), EVAL_BATCH, 2 * ctx.workers, 0, ctx.workers)? {
        let batch = batch?.to_device(ctx.device)?;
        let out = crate::amp::autocast(ctx.device, ctx.precision, || model.forward_t(&batch.input, false))??;
        let loss = detect::detection_loss(&out, &points(model, &batch.input)?, &batch.target)?;
        let assigned = loss.assigned.f_double_value(&[])?;
        shard.loss_sum += loss.total.f_double_value(&[])? * assigned;
        shard.assigned += assigned;
        let s = batch.input.size();
        let dets = detect::predict::detections(&out, s[3] as f64, s[2] as f64)?;
        let gts = detect::predict::truths(&batch.target)?;
        for (k, (d, t)) in dets.into_iter().zip(gts).enumerate() {
            if ctx.comm.rank() == 0 && shard.drawn.len() < DRAWN {
                // Best effort: a failure here must not take rank 0 out of the gathers below.
                if let Ok(image) = batch.input.f_get(k as i64).and_then(|i| i.f_to_device(tch::Device::Cpu)) {
                    shard.drawn.push((image, d.clone(), t.clone()));
                }
            }
            shard.detections.push((images[next], d));
            shard.truths.push((images[next], t));
            next += 1;
        }
    }
    Ok(shard)
}

fn evaluate(model: &dyn Model, ctx: &mut EvalContext) -> Result<EvalResult, TrainError> {
    let (rank, world) = (ctx.comm.rank(), ctx.comm.world_size());
    let shard = predict_shard(model, ctx, (rank..ctx.test.len()).step_by(world).collect())?;
    // The loss: every rank's numerator and assigned points, added in rank order in f64, divided
    // once (so it does not depend on how the images were split into ranks and batches).
    let mine: Vec<u8> = [shard.loss_sum, shard.assigned, shard.images.len() as f64].iter().flat_map(|v| v.to_le_bytes()).collect();
    let (mut loss, mut assigned, mut samples) = (0.0f64, 0.0f64, 0usize);
    for blob in ctx.comm.all_gather(&mine)? {
        let v: Vec<f64> = blob.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        loss += v[0];
        assigned += v[1];
        samples += v[2] as usize;
    }
    let map = distributed_mean_ap(ctx.comm, &shard.images, &shard.detections, &shard.truths)?;
    if let (Some(dir), false) = (ctx.run_dir, shard.drawn.is_empty()) {
        let path = dir.join("predictions.png");
        if let Err(e) = detect::draw::predictions(&shard.drawn, &path) {
            tracing::warn!("{}: {e}", path.display());
        }
    }
    let (map50, map) = map.map(|m| (m.map50, m.map)).unwrap_or((f64::NAN, f64::NAN));
    Ok(EvalResult { metrics: vec![("loss", loss / assigned.max(1.0)), ("map50", map50), ("map", map)], samples })
}
