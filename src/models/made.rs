//! MADE (Germain et al. 2015), an autoregressive density model of binary vectors: an MLP whose
//! weights are masked so that output d sees only inputs 1…d−1, making p(x) = Π_d p(x_d | x_<d)
//! in one pass. Laid out as Karpathy's `pytorch-made` (`net` = MaskedLinear, ReLU, …, each with
//! its `mask` buffer: `net.0.weight`, `net.0.bias`, `net.0.mask`, `net.2.…`), natural ordering,
//! one mask; a checkpoint loads into that module strictly, masks included. The hidden units'
//! degrees come from `mask_seed` through a fixed generator (splitmix64), so every rank and every
//! rebuild has the same masks without drawing from libtorch's generator.

use super::{layer, needs_labelled, Inputs, Model, ModelKind, ModelSpec};
use crate::data::splitmix::SplitMix;
use crate::data::{DataConfig, Samples};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

pub const KIND: ModelKind = ModelKind::of::<MadeSpec>("made");

/// `model: {name: made, hidden: [500]}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MadeSpec {
    /// Hidden layer widths.
    #[serde(default = "default_hidden")]
    pub hidden: Vec<usize>,
    /// Seeds the hidden units' degrees (which inputs each may see).
    #[serde(default)]
    pub mask_seed: u64,
}

fn default_hidden() -> Vec<usize> {
    vec![500]
}

impl ModelSpec for MadeSpec {
    fn validate(&self, data: &DataConfig) -> Result<(), String> {
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            return Err("model.hidden: at least one hidden layer, each at least 1 wide".into());
        }
        needs_labelled("made", data)
    }

    fn build(&self, inputs: &Inputs, device: Device) -> Result<Box<dyn Model>, TchError> {
        let pixels: i64 = inputs.sample_shape.iter().product();
        Ok(Box::new(Made::new(pixels, &self.hidden, self.mask_seed, device)?))
    }

    fn task(&self, _samples: Samples) -> &'static str {
        "binary_density"
    }
}

pub struct Made {
    /// (weight, bias, mask) per layer.
    layers: Vec<(Tensor, Tensor, Tensor)>,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
}

impl Made {
    /// `d` binary inputs (and `d` logits out), hidden layers of `hidden` units.
    pub fn new(d: i64, hidden: &[usize], mask_seed: u64, device: Device) -> Result<Made, TchError> {
        let masks = masks(d, hidden, mask_seed);
        let widths: Vec<i64> = std::iter::once(d).chain(hidden.iter().map(|&h| h as i64)).chain([d]).collect();
        let (mut params, mut buffers, mut layers) = (vec![], vec![], vec![]);
        for (i, (pair, mask)) in widths.windows(2).zip(masks).enumerate() {
            // Sequential indices: MaskedLinear at 0, 2, 4, … with ReLUs between.
            let name = format!("net.{}", 2 * i);
            let (w, b) = layer(&mut params, &name, &[pair[1], pair[0]], pair[0], device)?;
            let mask = Tensor::f_from_slice(&mask)?.f_view([pair[1], pair[0]])?.f_to_device(device)?;
            buffers.push((format!("{name}.mask"), mask.shallow_clone()));
            layers.push((w, b, mask));
        }
        Ok(Made { layers, params, buffers })
    }
}

/// The masks, [out, in] row-major as 0/1 floats, as `pytorch-made`'s `update_masks` builds them
/// with natural ordering: inputs have degrees 0…d−1; each hidden unit a degree drawn uniformly
/// from [min degree of the layer below, d − 2]; a hidden unit sees units below of degree ≤ its
/// own; output d sees the last hidden layer's units of degree < d.
fn masks(d: i64, hidden: &[usize], seed: u64) -> Vec<Vec<f32>> {
    let mut rng = SplitMix(seed);
    let mut below: Vec<i64> = (0..d).collect();
    let mut out = vec![];
    for &h in hidden {
        let lo = below.iter().copied().min().unwrap_or(0);
        let span = (d - 1 - lo).max(1) as u64;
        let degrees: Vec<i64> = (0..h).map(|_| lo + (rng.next_u64() % span) as i64).collect();
        out.push(mask(&below, &degrees, |b, u| b <= u));
        below = degrees;
    }
    let outputs: Vec<i64> = (0..d).collect();
    out.push(mask(&below, &outputs, |b, u| b < u));
    out
}

fn mask(below: &[i64], units: &[i64], sees: impl Fn(i64, i64) -> bool) -> Vec<f32> {
    let sees = &sees;
    units.iter().flat_map(|&u| below.iter().map(move |&b| if sees(b, u) { 1.0 } else { 0.0 })).collect()
}

impl Model for Made {
    /// Logits of p(x_d = 1 | x_<d) for every pixel d of the (binary) input, flattened.
    fn forward_t(&self, input: &Tensor, _train: bool) -> Result<Tensor, TchError> {
        let mut x = input.f_flatten(1, -1)?.f_to_kind(Kind::Float)?;
        for (i, (w, b, m)) in self.layers.iter().enumerate() {
            x = x.f_linear(&w.f_mul(m)?, Some(b))?;
            if i + 1 < self.layers.len() {
                x = x.f_relu()?;
            }
        }
        Ok(x)
    }

    fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    fn named_buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_d_depends_only_on_inputs_before_d() {
        let d = 12;
        let m = Made::new(d, &[20, 16], 3, Device::Cpu).unwrap();
        // Jacobian of each output w.r.t. the input, at a random input: zero on and above the
        // diagonal (output d never sees input d or later), nonzero somewhere below it.
        let x = Tensor::rand([1, d], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = m.forward_t(&x, false).unwrap();
        let mut below = 0;
        for out in 0..d {
            let g = Tensor::run_backward(&[y.select(1, out)], &[&x], true, false).remove(0).abs().view(-1);
            for inp in 0..d {
                let v = g.double_value(&[inp]);
                if inp >= out {
                    assert_eq!(v, 0.0, "output {out} depends on input {inp}");
                } else if v > 0.0 {
                    below += 1;
                }
            }
        }
        assert!(below > d, "the network should see the past: {below} nonzero entries below the diagonal");
        assert_eq!(m.buffers[0].0, "net.0.mask");
        assert_eq!(m.params.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()[4], "net.4.weight");
    }
}
