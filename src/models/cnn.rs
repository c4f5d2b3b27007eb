//! The reference CNN for 1×28×28 images, as this PyTorch module:
//! conv1 = Conv2d(1, 32, 5, padding=2) → ReLU → MaxPool2d(2); conv2 = Conv2d(32, 64, 5,
//! padding=2) → ReLU → MaxPool2d(2); flatten; fc1 = Linear(3136, 128) → ReLU; fc2 = Linear(128, 10).

use super::{layer, needs_labelled, Inputs, Model, ModelKind, ModelSpec};
use crate::data::DataConfig;
use serde::{Deserialize, Serialize};
use tch::{Device, TchError, Tensor};

pub const KIND: ModelKind = ModelKind::of::<CnnSpec>("cnn");

/// `model: {name: cnn}`: no keys of its own; the layers are fixed.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CnnSpec {}

const NEEDS: &str = "model cnn needs 1x28x28 samples (IDX without resizing transforms, or data.synthetic.shape: [1, 28, 28])";

impl ModelSpec for CnnSpec {
    fn validate(&self, data: &DataConfig) -> Result<(), String> {
        needs_labelled("cnn", data)?;
        match data.spec.sample_shape() {
            Some(shape) if shape != [1, 28, 28] => Err(format!("{NEEDS}; data.format {} gives {shape:?}", data.format)),
            _ => Ok(()),
        }
    }

    fn build(&self, inputs: &Inputs, device: Device) -> Result<Box<dyn Model>, TchError> {
        if inputs.sample_shape != [1, 28, 28] {
            return Err(TchError::Torch(format!("{NEEDS}; the data's samples are {:?}", inputs.sample_shape)));
        }
        Ok(Box::new(Cnn::new(inputs.classes as i64, device)?))
    }
}

pub struct Cnn {
    conv1: (Tensor, Tensor),
    conv2: (Tensor, Tensor),
    fc1: (Tensor, Tensor),
    fc2: (Tensor, Tensor),
    params: Vec<(String, Tensor)>,
}

impl Cnn {
    pub fn new(classes: i64, device: Device) -> Result<Self, TchError> {
        let mut p = Vec::new();
        let conv1 = layer(&mut p, "conv1", &[32, 1, 5, 5], 25, device)?;
        let conv2 = layer(&mut p, "conv2", &[64, 32, 5, 5], 32 * 25, device)?;
        let fc1 = layer(&mut p, "fc1", &[128, 3136], 3136, device)?;
        let fc2 = layer(&mut p, "fc2", &[classes, 128], 128, device)?;
        Ok(Self { conv1, conv2, fc1, fc2, params: p })
    }
}

fn conv_block(x: &Tensor, (w, b): &(Tensor, Tensor)) -> Result<Tensor, TchError> {
    super::max_pool::max_pool_2x2(&x.f_conv2d(w, Some(b), [1, 1], [2, 2], [1, 1], 1)?.f_relu()?)
}

impl Model for Cnn {
    fn forward_t(&self, input: &Tensor, _train: bool) -> Result<Tensor, TchError> {
        let x = conv_block(input, &self.conv1)?;
        let x = conv_block(&x, &self.conv2)?.f_flatten(1, -1)?;
        let x = x.f_linear(&self.fc1.0, Some(&self.fc1.1))?.f_relu()?;
        x.f_linear(&self.fc2.0, Some(&self.fc2.1))
    }

    fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }
}
