//! fc1 … fcN with ReLU between; the input is flattened first. The wide MLP of the benchmarks is
//! `hidden: [4096, 4096]` on 784 inputs.

use super::{layer, needs_labelled, Inputs, Model, ModelKind, ModelSpec};
use crate::data::DataConfig;
use serde::{Deserialize, Serialize};
use tch::{Device, TchError, Tensor};

pub const KIND: ModelKind = ModelKind::of::<MlpSpec>("mlp");

/// `model: {name: mlp, hidden: [64]}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MlpSpec {
    /// Hidden layer widths.
    #[serde(default)]
    pub hidden: Vec<usize>,
}

impl ModelSpec for MlpSpec {
    fn validate(&self, data: &DataConfig) -> Result<(), String> {
        if self.hidden.contains(&0) {
            return Err("model.hidden: layer widths must be at least 1".into());
        }
        needs_labelled("mlp", data)
    }

    fn build(&self, inputs: &Inputs, device: Device) -> Result<Box<dyn Model>, TchError> {
        Ok(Box::new(Mlp::new(inputs.sample_shape.iter().product(), &self.hidden, inputs.classes as i64, device)?))
    }
}

pub struct Mlp {
    layers: Vec<(Tensor, Tensor)>,
    params: Vec<(String, Tensor)>,
}

impl Mlp {
    pub fn new(inputs: i64, hidden: &[usize], classes: i64, device: Device) -> Result<Self, TchError> {
        let mut params = Vec::new();
        let mut layers = Vec::new();
        let mut fan_in = inputs;
        let widths: Vec<i64> = hidden.iter().map(|&h| h as i64).chain([classes]).collect();
        for (i, &out) in widths.iter().enumerate() {
            layers.push(layer(&mut params, &format!("fc{}", i + 1), &[out, fan_in], fan_in, device)?);
            fan_in = out;
        }
        Ok(Self { layers, params })
    }
}

impl Model for Mlp {
    fn forward_t(&self, input: &Tensor, _train: bool) -> Result<Tensor, TchError> {
        let mut x = input.f_flatten(1, -1)?;
        for (i, (w, b)) in self.layers.iter().enumerate() {
            x = x.f_linear(w, Some(b))?;
            if i + 1 < self.layers.len() {
                x = x.f_relu()?;
            }
        }
        Ok(x)
    }

    fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }
}
