//! `model: {name: yolo}`: a one-stage, anchor-free detector in the YOLOX mould, small enough to
//! train on a CPU, with the module names of `scripts/reference/yolo_reference.py` (a checkpoint
//! loads into it strictly).
//!
//! ```text
//! image ─ stem(/2) ─ dark2(/4) ─ dark3(/8) ──────── C3 ─┐
//!                                dark4(/16) ─────── C4 ─┤ FPN top-down: lat5 → up + C4 → td4 → lat4 → up + C3 → td3 = P3
//!                                dark5(/32) ─ SPPF ─ C5 ─┘ PAN bottom-up: down3(P3) + lat4 → bu4 = P4, down4(P4) + lat5 → bu5 = P5
//! P3, P4, P5 ─ head.{0,1,2}: stem 1×1 → cls 3×3 → cls_pred (classes)
//!                                     → reg 3×3 → reg_pred (4 box offsets, 1 objectness)
//! ```
//!
//! Each dark stage is a stride-2 3×3 Conv then a stride-1 one; every Conv is Conv2d → BatchNorm →
//! SiLU. Without `fpn` the heads read C3, C4, C5; without `pan` they read td3, td4 and C5; without
//! `spp`, dark5's output is C5 as it is.
//!
//! The output is `[batch, points, 5 + classes]`: for every cell of the three maps (strides 8, 16,
//! 32; row-major, finest first; `Model::anchor_points` lists them) a decoded box (x1, y1, x2, y2)
//! in input pixels, its objectness logit and its class logits. The box is centred at the cell's
//! centre plus the predicted offset times the stride, with width and height exp(t)·stride.

mod layers;

use super::{Inputs, Model, ModelKind, ModelSpec};
use crate::data::{DataConfig, Samples};
use layers::{sequential, up, Builder, ConvBn, Pred, Sppf};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

pub const KIND: ModelKind = ModelKind::of::<YoloSpec>("yolo");

/// Largest log box size, in strides (see `decode`).
pub const MAX_LOG_SIZE: f64 = 10.0;

/// The strides of the three output maps.
pub const STRIDES: [i64; 3] = [8, 16, 32];

/// `model: {name: yolo, width: 16, spp: true, fpn: true, pan: true}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct YoloSpec {
    /// Channels of the stem; the dark stages have 2, 4, 8 and 16 times as many, the heads 4 times.
    #[serde(default = "default_width")]
    pub width: i64,
    /// SPPF on the deepest map.
    #[serde(default = "yes")]
    pub spp: bool,
    /// The FPN neck (top-down fusion of deep maps into shallow ones).
    #[serde(default = "yes")]
    pub fpn: bool,
    /// PAN's bottom-up path after the FPN.
    #[serde(default = "yes")]
    pub pan: bool,
    /// BatchNorm over every rank's batch (SyncBatchNorm).
    #[serde(default)]
    pub sync_batchnorm: bool,
}

fn default_width() -> i64 {
    16
}
fn yes() -> bool {
    true
}

impl ModelSpec for YoloSpec {
    fn validate(&self, data: &DataConfig) -> Result<(), String> {
        if self.width < 1 {
            return Err(format!("model.width: {} channels; at least 1", self.width));
        }
        if self.pan && !self.fpn {
            return Err("model.pan: PAN runs bottom-up over the FPN's maps; set model.pan: false with model.fpn: false".into());
        }
        if data.samples() != Samples::Boxes {
            return Err(format!(
                "model yolo is a detector: it needs images with boxes (data.format mosaic or yolo); data.format {} gives none",
                data.format
            ));
        }
        match data.spec.sample_shape() {
            Some(s) if s.len() == 3 && (s[1] % 32 != 0 || s[2] % 32 != 0) => Err(format!(
                "model yolo needs image sides that are multiples of 32 (its deepest stride); data.format {} gives {s:?}",
                data.format
            )),
            _ => Ok(()),
        }
    }

    fn build(&self, inputs: &Inputs, device: Device) -> Result<Box<dyn Model>, TchError> {
        let &[channels, h, w] = inputs.sample_shape else {
            return Err(TchError::Torch(format!(
                "model yolo needs images (channels, height, width); the data's samples are {:?}",
                inputs.sample_shape
            )));
        };
        if h % 32 != 0 || w % 32 != 0 {
            return Err(TchError::Torch(format!("model yolo needs image sides that are multiples of 32; the data's images are {h}x{w}")));
        }
        let sync = super::resnet::sync_group(self.sync_batchnorm, inputs)?;
        Ok(Box::new(Yolo::new(self, channels, inputs.classes as i64, sync, device)?))
    }
}

/// The FPN (and optionally PAN) neck.
struct Neck {
    lat5: ConvBn,
    td4: ConvBn,
    lat4: ConvBn,
    td3: ConvBn,
    /// down3, bu4, down4, bu5.
    pan: Option<[ConvBn; 4]>,
}

impl Neck {
    fn new(b: &mut Builder, w: i64, pan: bool) -> Result<Neck, TchError> {
        let lat5 = b.conv("neck.lat5", 16 * w, 8 * w, 1, 1)?;
        let td4 = b.conv("neck.td4", 16 * w, 8 * w, 3, 1)?;
        let lat4 = b.conv("neck.lat4", 8 * w, 4 * w, 1, 1)?;
        let td3 = b.conv("neck.td3", 8 * w, 4 * w, 3, 1)?;
        let pan = match pan {
            true => Some([
                b.conv("neck.down3", 4 * w, 4 * w, 3, 2)?,
                b.conv("neck.bu4", 8 * w, 8 * w, 3, 1)?,
                b.conv("neck.down4", 8 * w, 8 * w, 3, 2)?,
                b.conv("neck.bu5", 16 * w, 16 * w, 3, 1)?,
            ]),
            false => None,
        };
        Ok(Neck { lat5, td4, lat4, td3, pan })
    }

    fn forward(&self, c3: &Tensor, c4: &Tensor, c5: &Tensor, train: bool) -> Result<[Tensor; 3], TchError> {
        let l5 = self.lat5.forward(c5, train)?;
        let t4 = self.td4.forward(&Tensor::f_cat(&[up(&l5)?, c4.shallow_clone()], 1)?, train)?;
        let l4 = self.lat4.forward(&t4, train)?;
        let p3 = self.td3.forward(&Tensor::f_cat(&[up(&l4)?, c3.shallow_clone()], 1)?, train)?;
        let Some([down3, bu4, down4, bu5]) = &self.pan else {
            return Ok([p3, t4, c5.shallow_clone()]);
        };
        let p4 = bu4.forward(&Tensor::f_cat(&[down3.forward(&p3, train)?, l4], 1)?, train)?;
        let p5 = bu5.forward(&Tensor::f_cat(&[down4.forward(&p4, train)?, l5], 1)?, train)?;
        Ok([p3, p4, p5])
    }
}

/// One scale's decoupled head.
struct Head {
    stem: ConvBn,
    cls: ConvBn,
    cls_pred: Pred,
    reg: ConvBn,
    reg_pred: Pred,
}

/// The initial objectness and class probability (RetinaNet's prior): most cells hold nothing, and
/// starting at 0.5 would swamp the first steps with their loss.
const PRIOR: f64 = 0.01;

impl Head {
    fn new(b: &mut Builder, i: usize, c: i64, h: i64, classes: i64) -> Result<Head, TchError> {
        let prior = -((1.0 - PRIOR) / PRIOR).ln();
        let stem = b.conv(&format!("head.{i}.stem"), c, h, 1, 1)?;
        let cls = b.conv(&format!("head.{i}.cls"), h, h, 3, 1)?;
        let cls_pred = b.pred(&format!("head.{i}.cls_pred"), h, classes, Some(prior))?;
        let reg = b.conv(&format!("head.{i}.reg"), h, h, 3, 1)?;
        let reg_pred = b.pred(&format!("head.{i}.reg_pred"), h, 5, None)?;
        // The objectness channel starts at the prior too; the box offsets keep PyTorch's default.
        let _ = tch::no_grad(|| reg_pred.bias_slot(4).f_fill_(prior))?;
        Ok(Head { stem, cls, cls_pred, reg, reg_pred })
    }

    /// `[batch, 5 + classes, h·w]`: box offsets, objectness, classes.
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let x = self.stem.forward(x, train)?;
        let cls = self.cls_pred.forward(&self.cls.forward(&x, train)?)?;
        let reg = self.reg_pred.forward(&self.reg.forward(&x, train)?)?;
        Tensor::f_cat(&[reg, cls], 1)?.f_flatten(2, 3)
    }
}

pub struct Yolo {
    /// stem, dark2 … dark5.
    backbone: Vec<Vec<ConvBn>>,
    spp: Option<Sppf>,
    neck: Option<Neck>,
    heads: Vec<Head>,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
}

impl Yolo {
    pub fn new(
        spec: &YoloSpec,
        channels: i64,
        classes: i64,
        sync: Option<crate::comm::CommHandle>,
        device: Device,
    ) -> Result<Yolo, TchError> {
        let w = spec.width;
        let mut b = Builder { device, params: vec![], buffers: vec![], sync };
        let mut backbone = vec![vec![b.conv("backbone.stem", channels, w, 3, 2)?]];
        for (s, (cin, cout)) in [(w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w), (8 * w, 16 * w)].into_iter().enumerate() {
            let name = format!("backbone.dark{}", s + 2);
            backbone.push(vec![b.conv(&format!("{name}.0"), cin, cout, 3, 2)?, b.conv(&format!("{name}.1"), cout, cout, 3, 1)?]);
        }
        let spp = if spec.spp { Some(Sppf::new(&mut b, "spp", 16 * w)?) } else { None };
        let neck = if spec.fpn { Some(Neck::new(&mut b, w, spec.pan)?) } else { None };
        let mut heads = vec![];
        for (i, c) in [4 * w, 8 * w, 16 * w].into_iter().enumerate() {
            heads.push(Head::new(&mut b, i, c, 4 * w, classes)?);
        }
        Ok(Yolo { backbone, spp, neck, heads, params: b.params, buffers: b.buffers })
    }
}

impl Model for Yolo {
    fn forward_t(&self, input: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let mut x = input.shallow_clone();
        let mut maps = vec![];
        for stage in &self.backbone {
            x = sequential(stage, &x, train)?;
            maps.push(x.shallow_clone());
        }
        let c5 = match &self.spp {
            Some(spp) => spp.forward(&maps[4], train)?,
            None => maps[4].shallow_clone(),
        };
        let levels = match &self.neck {
            Some(neck) => neck.forward(&maps[2], &maps[3], &c5, train)?,
            None => [maps[2].shallow_clone(), maps[3].shallow_clone(), c5],
        };
        let raw: Vec<Tensor> = self.heads.iter().zip(&levels).map(|(h, l)| h.forward(l, train)).collect::<Result<_, _>>()?;
        let raw = Tensor::f_cat(&raw, 2)?.f_permute([0, 2, 1])?; // [batch, points, 5 + classes]
        let s = input.size();
        let points = anchor_points(s[2], s[3], raw.device())?;
        decode(&raw, &points)
    }

    fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    fn named_buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }

    fn anchor_points(&self, input_shape: &[i64]) -> Option<Result<Tensor, TchError>> {
        Some(anchor_points(input_shape[2], input_shape[3], Device::Cpu))
    }
}

/// `[points, 3]` rows (x, y, stride): the centre of every cell of the stride-8, 16 and 32 maps of
/// an `h` × `w` input, row-major within a map, finest map first (the output's row order).
pub fn anchor_points(h: i64, w: i64, device: Device) -> Result<Tensor, TchError> {
    let mut rows = vec![];
    for s in STRIDES {
        let (gh, gw) = (h / s, w / s);
        let ys = Tensor::f_arange(gh, (Kind::Float, device))?.f_add_scalar(0.5)?.f_mul_scalar(s as f64)?;
        let xs = Tensor::f_arange(gw, (Kind::Float, device))?.f_add_scalar(0.5)?.f_mul_scalar(s as f64)?;
        let y = ys.f_view([gh, 1])?.f_expand([gh, gw], false)?.f_reshape([-1, 1])?;
        let x = xs.f_view([1, gw])?.f_expand([gh, gw], false)?.f_reshape([-1, 1])?;
        let stride = Tensor::f_full([gh * gw, 1], s as f64, (Kind::Float, device))?;
        rows.push(Tensor::f_cat(&[x, y, stride], 1)?);
    }
    Tensor::f_cat(&rows, 0)
}

/// Raw head outputs `[batch, points, 5 + classes]` (dx, dy, log w, log h in strides, then logits)
/// to boxes (x1, y1, x2, y2) in pixels followed by the logits as they are. In f32 whatever the
/// autocast: exp of a bf16 offset loses the box.
pub fn decode(raw: &Tensor, points: &Tensor) -> Result<Tensor, TchError> {
    let raw = raw.f_to_kind(Kind::Float)?;
    let stride = points.f_narrow(1, 2, 1)?;
    let centre = points.f_narrow(1, 0, 2)?.f_add(&raw.f_narrow(2, 0, 2)?.f_mul(&stride)?)?;
    // The log size clamped at 10 (22,000 strides): past it exp overflows f32 on a diverging
    // step, and an infinite box's GIoU is inf − inf.
    let half = raw.f_narrow(2, 2, 2)?.f_clamp_max(MAX_LOG_SIZE)?.f_exp()?.f_mul(&stride)?.f_mul_scalar(0.5)?;
    Tensor::f_cat(&[centre.f_sub(&half)?, centre.f_add(&half)?, raw.f_narrow(2, 4, raw.size()[2] - 4)?], 2)
}
