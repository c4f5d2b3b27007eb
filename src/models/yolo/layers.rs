//! The YOLO model's building blocks, each a PyTorch module of the same names
//! (`scripts/reference/yolo_reference.py`): `Conv` (Conv2d without bias → BatchNorm2d → SiLU,
//! named `conv` and `bn`), `SPPF`, and the prediction layers (Conv2d 1×1 with bias).

use crate::models::batchnorm::BatchNorm;
use tch::{Device, Kind, TchError, Tensor};

/// Registers parameters and buffers in `state_dict` order while building.
pub(super) struct Builder {
    pub device: Device,
    pub params: Vec<(String, Tensor)>,
    pub buffers: Vec<(String, Tensor)>,
    pub sync: Option<crate::comm::CommHandle>,
}

impl Builder {
    /// nn.Conv2d's default init, U(±1/√fan_in) (kaiming_uniform with a = √5), drawn on the CPU
    /// so every device starts from the same values.
    fn uniform(&mut self, name: String, shape: &[i64], fan_in: i64) -> Result<Tensor, TchError> {
        let bound = 1.0 / (fan_in as f64).sqrt();
        let t = Tensor::f_empty(shape, (Kind::Float, Device::Cpu))?.f_uniform_(-bound, bound)?;
        let t = t.f_to_device(self.device)?.f_set_requires_grad(true)?;
        self.params.push((name, t.shallow_clone()));
        Ok(t)
    }

    /// `Conv(cin, cout, k, stride)` named `name`.
    pub fn conv(&mut self, name: &str, cin: i64, cout: i64, k: i64, stride: i64) -> Result<ConvBn, TchError> {
        let weight = self.uniform(format!("{name}.conv.weight"), &[cout, cin, k, k], cin * k * k)?;
        let bn = BatchNorm::new(&format!("{name}.bn"), cout, self.device, self.sync.clone(), &mut self.params, &mut self.buffers)?;
        Ok(ConvBn { weight, stride, bn })
    }

    /// `nn.Conv2d(cin, cout, 1)` named `name`, its bias set to `bias` when given (the prior of a
    /// logit), else PyTorch's default.
    pub fn pred(&mut self, name: &str, cin: i64, cout: i64, bias: Option<f64>) -> Result<Pred, TchError> {
        let weight = self.uniform(format!("{name}.weight"), &[cout, cin, 1, 1], cin)?;
        let b = self.uniform(format!("{name}.bias"), &[cout], cin)?;
        if let Some(v) = bias {
            let _ = tch::no_grad(|| b.shallow_clone().f_fill_(v))?;
        }
        Ok(Pred { weight, bias: b })
    }
}

/// Conv2d (no bias, padding k/2) → BatchNorm → SiLU.
pub(super) struct ConvBn {
    weight: Tensor,
    stride: i64,
    bn: BatchNorm,
}

impl ConvBn {
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let pad = self.weight.size()[2] / 2;
        let y = x.f_conv2d(&self.weight, None::<&Tensor>, [self.stride; 2], [pad; 2], [1, 1], 1)?;
        self.bn.forward(&y, train)?.f_silu()
    }
}

/// Runs `layers` one after the other (nn.Sequential).
pub(super) fn sequential(layers: &[ConvBn], x: &Tensor, train: bool) -> Result<Tensor, TchError> {
    layers.iter().try_fold(x.shallow_clone(), |x, l| l.forward(&x, train))
}

/// A 1×1 prediction layer.
pub(super) struct Pred {
    weight: Tensor,
    bias: Tensor,
}

impl Pred {
    /// Output channel `i`'s bias (to set its prior).
    pub fn bias_slot(&self, i: i64) -> Tensor {
        self.bias.narrow(0, i, 1)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_conv2d(&self.weight, Some(&self.bias), [1, 1], [0, 0], [1, 1], 1)
    }
}

/// Spatial pyramid pooling, fast (YOLOv5's SPPF): a 1×1 conv halves the channels, three 5×5
/// stride-1 max-pools in a row see windows of 5, 9 and 13, and the four maps concatenated go
/// through a 1×1 conv back to `c` channels.
pub(super) struct Sppf {
    cv1: ConvBn,
    cv2: ConvBn,
}

impl Sppf {
    pub fn new(b: &mut Builder, name: &str, c: i64) -> Result<Sppf, TchError> {
        Ok(Sppf { cv1: b.conv(&format!("{name}.cv1"), c, c / 2, 1, 1)?, cv2: b.conv(&format!("{name}.cv2"), c / 2 * 4, c, 1, 1)? })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let x = self.cv1.forward(x, train)?;
        let pool = |t: &Tensor| t.f_max_pool2d([5, 5], [1, 1], [2, 2], [1, 1], false);
        let y1 = pool(&x)?;
        let y2 = pool(&y1)?;
        let y3 = pool(&y2)?;
        self.cv2.forward(&Tensor::f_cat(&[x, y1, y2, y3], 1)?, train)
    }
}

/// Nearest-neighbour ×2 (`F.interpolate(scale_factor=2)`).
pub(super) fn up(x: &Tensor) -> Result<Tensor, TchError> {
    let s = x.size();
    x.f_upsample_nearest2d([s[2] * 2, s[3] * 2], None, None)
}
