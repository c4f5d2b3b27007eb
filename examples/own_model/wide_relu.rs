//! `model: {name: wide_relu, width: 64}`: one hidden ReLU layer of `width` units. Everything the
//! model is lives here: its keys, what it accepts, how it is built.

use ringtrain::data::DataConfig;
use ringtrain::models::{needs_labelled, Inputs, Model, ModelKind, ModelSpec};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

pub const KIND: ModelKind = ModelKind::of::<WideRelu>("wide_relu");

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WideRelu {
    /// Hidden units.
    #[serde(default = "default_width")]
    pub width: usize,
}

fn default_width() -> usize {
    64
}

impl ModelSpec for WideRelu {
    fn validate(&self, data: &DataConfig) -> Result<(), String> {
        if self.width == 0 {
            return Err("model.width must be at least 1".into());
        }
        needs_labelled("wide_relu", data)
    }

    fn build(&self, inputs: &Inputs, device: Device) -> Result<Box<dyn Model>, TchError> {
        let n_in: i64 = inputs.sample_shape.iter().product();
        // PyTorch's Linear init, U(±1/√fan_in), from libtorch's generator (seeded by the loop).
        let init = |shape: &[i64], fan_in: i64| -> Result<Tensor, TchError> {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Tensor::f_empty(shape, (Kind::Float, device))?.f_uniform_(-bound, bound)?.f_set_requires_grad(true)
        };
        let w = self.width as i64;
        let params = vec![
            ("hidden.weight".to_string(), init(&[w, n_in], n_in)?),
            ("hidden.bias".to_string(), init(&[w], n_in)?),
            ("out.weight".to_string(), init(&[inputs.classes as i64, w], w)?),
            ("out.bias".to_string(), init(&[inputs.classes as i64], w)?),
        ];
        Ok(Box::new(Net { params }))
    }
}

struct Net {
    params: Vec<(String, Tensor)>,
}

impl Model for Net {
    fn forward_t(&self, input: &Tensor, _train: bool) -> Result<Tensor, TchError> {
        let p = |i: usize| &self.params[i].1;
        input.f_flatten(1, -1)?.f_linear(p(0), Some(p(1)))?.f_relu()?.f_linear(p(2), Some(p(3)))
    }

    fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }
}
