//! Density estimation of binary images with an autoregressive model (MADE): pixels scaled to
//! [0, 1] are binarised at 0.5 (the fixed-threshold binarised Fashion-MNIST), the model gives the
//! logit of p(x_d = 1 | x_<d) for every pixel, and the loss is the negative log-likelihood in
//! nats per image: the sum over pixels of the binary cross-entropy, averaged over images.
//! Evaluation reports the test NLL (`loss`, nats per image) and bits per pixel.

use super::Task;
use crate::data::Batch;
use crate::models::Model;
use std::path::{Path, PathBuf};
use tch::{Kind, Reduction, TchError, Tensor};

pub const KIND: super::TaskKind = super::TaskKind { name: "binary_density", build: |_| Ok(Box::new(BinaryDensity)) };

pub struct BinaryDensity;

/// The pixel threshold.
pub const THRESHOLD: f64 = 0.5;

/// `input` ([N, …] in [0, 1]) as 0/1 floats, one row per image.
pub fn binarise(input: &Tensor) -> Result<Tensor, TchError> {
    input.f_flatten(1, -1)?.f_gt(THRESHOLD)?.f_to_kind(Kind::Float)
}

/// Σ over images and pixels of −log p(x): the model's logits against the binary image itself.
fn nll_sum(model: &dyn Model, batch: &Batch, train: bool) -> Result<Tensor, TchError> {
    let x = binarise(&batch.input)?;
    let logits = model.forward_t(&x, train)?.f_to_kind(Kind::Float)?;
    logits.f_binary_cross_entropy_with_logits(&x, None::<&Tensor>, None::<&Tensor>, Reduction::Sum)
}

impl Task for BinaryDensity {
    fn loss(&self, model: &dyn Model, batch: &Batch) -> Result<Tensor, TchError> {
        nll_sum(model, batch, true)?.f_div_scalar(batch.len.max(1) as f64)
    }

    fn eval_sums(&self, model: &dyn Model, batch: &Batch) -> Result<Vec<f64>, TchError> {
        let pixels = batch.input.numel() as f64;
        Ok(vec![nll_sum(model, batch, false)?.f_double_value(&[])?, batch.len as f64, pixels])
    }

    fn metrics(&self, sums: &[f64]) -> Vec<(&'static str, f64)> {
        let nats = sums[0] / sums[1].max(1.0);
        vec![("loss", nats), ("bits_per_pixel", sums[0] / sums[2].max(1.0) / std::f64::consts::LN_2)]
    }

    /// 64 samples as `samples.png` (8 × 8, seed 0), for images of one channel.
    fn finish(&self, model: &dyn Model, sample_shape: &[i64], run_dir: &Path, device: tch::Device) -> Result<Vec<PathBuf>, String> {
        let out = run_dir.join("samples.png");
        write_samples(model, sample_shape, 64, 0, device, &out)?;
        Ok(vec![out])
    }

    fn check_output(&self, logits: &Tensor, batch: &Batch, _classes: usize) -> Result<(), String> {
        // Binarising normalised pixels at 0.5 would silently model another image.
        let (lo, hi) = (batch.input.min().double_value(&[]), batch.input.max().double_value(&[]));
        if lo < 0.0 || hi > 1.0 {
            return Err(format!(
                "binary density models binarise pixels in [0, 1] at {THRESHOLD}; the data's values run from {lo:.3} to {hi:.3}: \
                 remove data.normalize (and any normalize transform)"
            ));
        }
        let want = [batch.len as i64, batch.input.numel() as i64 / batch.len.max(1) as i64];
        match logits.size() == want && logits.is_floating_point() {
            true => Ok(()),
            false => Err(format!(
                "the model's output for a batch of {} is {:?} {:?}; a binary density model gives one logit per pixel, {want:?}",
                batch.len,
                logits.kind(),
                logits.size()
            )),
        }
    }
}

/// `count` samples of images shaped `sample_shape` ([1, h, w] or [h, w]) as a PNG grid.
pub fn write_samples(
    model: &dyn Model,
    sample_shape: &[i64],
    count: i64,
    seed: u64,
    device: tch::Device,
    out: &Path,
) -> Result<(), String> {
    let (h, w) = match sample_shape {
        [1, h, w] | [h, w] => (*h, *w),
        other => return Err(format!("samples: images of shape {other:?}; a grid takes one channel")),
    };
    let x = crate::models::generate::binary_images(model, count, h * w, device, seed).map_err(|e| e.to_string())?;
    let cols = (count as f64).sqrt().ceil() as usize;
    crate::telemetry::grid::save_grid(&x.view([count, h, w]), cols, out)
}
