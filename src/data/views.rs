//! Random views of a batch of images, for contrastive learning: SimCLR's random resized crop and
//! horizontal flip, and a brightness/contrast jitter. Fashion-MNIST is grayscale, so SimCLR's
//! colour distortion reduces to that jitter (no hue or saturation to change, and a grayscale
//! conversion would do nothing). Drawn from libtorch's generator on whole batches (one affine
//! sampling grid per image), which the loop seeds per (seed, rank, step): a resumed run draws the
//! same views.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

/// How views are drawn.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ViewOptions {
    /// The crop's area, as a fraction of the image, is drawn from [crop_min_scale, 1]
    /// (torchvision's RandomResizedCrop scale; its aspect ratio is drawn from [3/4, 4/3]).
    #[serde(default = "default_min_scale")]
    pub crop_min_scale: f64,
    /// Probability of a horizontal flip.
    #[serde(default = "default_flip")]
    pub flip: f64,
    /// Contrast is scaled by a factor from [1 − jitter, 1 + jitter] around each image's mean,
    /// and brightness shifted by up to ±jitter/2 (in the data's units after normalisation).
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

fn default_min_scale() -> f64 {
    0.2
}
fn default_flip() -> f64 {
    0.5
}
fn default_jitter() -> f64 {
    0.4
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions { crop_min_scale: default_min_scale(), flip: default_flip(), jitter: default_jitter() }
    }
}

impl ViewOptions {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.crop_min_scale > 0.0 && self.crop_min_scale <= 1.0) {
            return Err(format!("model.views.crop_min_scale: {} is not in (0, 1]", self.crop_min_scale));
        }
        if !(0.0..=1.0).contains(&self.flip) {
            return Err(format!("model.views.flip: {} is not a probability", self.flip));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(format!("model.views.jitter: {} is not in [0, 1)", self.jitter));
        }
        Ok(())
    }
}

/// One random view of every image of `x` ([N, C, H, W], float), from libtorch's generator.
pub fn random_view(x: &Tensor, o: &ViewOptions) -> Result<Tensor, TchError> {
    // Drawn on the CPU: the same numbers whatever the device.
    let draws = Tensor::f_rand([x.size()[0], DRAWS], (Kind::Float, Device::Cpu))?;
    view_from(x, o, &draws)
}

/// Uniform numbers one view takes per image.
pub const DRAWS: i64 = 7;

/// The view `draws` ([N, DRAWS] of U(0, 1)) select.
pub fn view_from(x: &Tensor, o: &ViewOptions, draws: &Tensor) -> Result<Tensor, TchError> {
    let u = |i: i64, lo: f64, hi: f64| -> Result<Tensor, TchError> { draws.f_select(1, i)?.f_mul_scalar(hi - lo)?.f_add_scalar(lo) };
    let size = x.size();
    let n = size[0];
    // Random resized crop: the crop's side lengths as fractions of the image's (clamped to the
    // image), its centre anywhere the crop stays inside.
    let area = u(0, o.crop_min_scale, 1.0)?;
    let log_ratio = u(1, (3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln())?;
    let ratio = log_ratio.f_exp()?;
    let w = (&area * &ratio).f_sqrt()?.f_clamp_max(1.0)?;
    let h = (&area / &ratio).f_sqrt()?.f_clamp_max(1.0)?;
    let cx = u(2, -1.0, 1.0)?.f_mul(&w.f_neg()?.f_add_scalar(1.0)?)?;
    let cy = u(3, -1.0, 1.0)?.f_mul(&h.f_neg()?.f_add_scalar(1.0)?)?;
    let flip = u(4, 0.0, 1.0)?.f_lt(o.flip)?.f_to_kind(Kind::Float)?;
    let sign = flip.f_mul_scalar(-2.0)?.f_add_scalar(1.0)?;
    let zero = Tensor::f_zeros([n], (Kind::Float, Device::Cpu))?;
    // Output coordinates in [-1, 1] map to the crop's region of the input; a negative x scale
    // mirrors it.
    let theta = Tensor::f_stack(&[&w * &sign, zero.shallow_clone(), cx, zero, h, cy], 1)?.f_view([n, 2, 3])?;
    let grid = Tensor::f_affine_grid_generator(&theta.f_to_device(x.device())?, size.as_slice(), false)?;
    // Bilinear; outside the image the border's value (the background of centred objects).
    let view = x.f_to_kind(Kind::Float)?.f_grid_sampler_2d(&grid, 0, 1, false)?;
    if o.jitter == 0.0 {
        return Ok(view);
    }
    let contrast = u(5, 1.0 - o.jitter, 1.0 + o.jitter)?.f_view([n, 1, 1, 1])?.f_to_device(x.device())?;
    let shift = u(6, -o.jitter / 2.0, o.jitter / 2.0)?.f_view([n, 1, 1, 1])?.f_to_device(x.device())?;
    let mean = view.f_mean_dim([1i64, 2, 3].as_slice(), true, Kind::Float)?;
    (view.f_sub(&mean)?.f_mul(&contrast)?.f_add(&mean)?.f_add(&shift)?).f_contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_view_is_the_same_crop_mirrored() {
        let x = Tensor::arange(2 * 16, (Kind::Float, Device::Cpu)).view([2, 1, 4, 4]);
        let draws = Tensor::from_slice(&[0.3f32, 0.6, 0.2, 0.9, 0.5, 0.5, 0.5, 0.8, 0.1, 0.7, 0.4, 0.5, 0.5, 0.5]).view([2, DRAWS]);
        let v = view_from(&x, &ViewOptions { crop_min_scale: 0.5, flip: 0.0, jitter: 0.0 }, &draws).unwrap();
        let f = view_from(&x, &ViewOptions { crop_min_scale: 0.5, flip: 1.0, jitter: 0.0 }, &draws).unwrap();
        assert_eq!(v.size(), x.size());
        assert!(f.allclose(&v.flip([3]), 1e-5, 1e-5, false), "{f:?} vs {v:?}");
        assert!(!v.allclose(&x, 1e-3, 1e-3, false), "a crop of half the area is not the image");
    }

    #[test]
    fn a_whole_square_centred_crop_is_the_image_and_jitter_keeps_the_mean_shifted() {
        let x = Tensor::rand([3, 1, 8, 8], (Kind::Float, Device::Cpu));
        // Area 1, ratio 1 (log-ratio at the middle of its range), centred, no flip.
        let mid = Tensor::from_slice(&[1.0f32, 0.5, 0.5, 0.5, 0.9, 0.5, 1.0]).view([1, DRAWS]).repeat([3, 1]);
        let v = view_from(&x, &ViewOptions { crop_min_scale: 1.0, flip: 0.5, jitter: 0.4 }, &mid).unwrap();
        // Contrast 1, brightness +0.2.
        assert!(v.allclose(&(&x + 0.2), 1e-4, 1e-4, false));
    }
}
