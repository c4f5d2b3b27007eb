//! SimCLR's network: a ResNet encoder without its classifier (torchvision's `resnet18` with
//! `fc = nn.Identity()`, under `encoder.`) and a two-layer projection head
//! `projector = nn.Sequential(nn.Linear(f, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, d))`
//! (SimCLR v2's head), so `projector.0`, `projector.1`, `projector.3` are the checkpoint's names.
//! Its output is the projection the contrastive loss compares; a linear probe reads the
//! encoder's features (`Model::features`). Training means `task: contrastive`.

use super::batchnorm::BatchNorm;
use super::resnet::{sync_group, Depth, ResNet, ResNetOptions};
use super::{layer, needs_labelled, Inputs, Model, ModelKind, ModelSpec};
use crate::data::views::ViewOptions;
use crate::data::{DataConfig, Samples};
use serde::{Deserialize, Serialize};
use tch::{Device, TchError, Tensor};

pub const KIND: ModelKind = ModelKind::of::<SimClrSpec>("simclr");

/// `model: {name: simclr, encoder: resnet18, width: 32, temperature: 0.2, …}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimClrSpec {
    /// resnet18, resnet34 or resnet50, as torchvision builds them.
    #[serde(default = "default_encoder")]
    pub encoder: String,
    /// The small-image stem (3×3 stride-1 `conv1`, no max-pool), for 28–32 px images.
    #[serde(default = "yes")]
    pub small_stem: bool,
    /// Channels of the encoder's first stage (torchvision: 64).
    #[serde(default = "default_width")]
    pub width: i64,
    /// Every BatchNorm (encoder and head) normalises over all ranks' batches, as SimCLR trains:
    /// with per-rank statistics the loss can be lowered through them instead of through the
    /// representation.
    #[serde(default = "yes")]
    pub sync_batchnorm: bool,
    /// The head's hidden width (default: the encoder's feature width, as SimCLR).
    #[serde(default)]
    pub proj_hidden: Option<i64>,
    /// The projection's width, what the loss compares.
    #[serde(default = "default_proj_dim")]
    pub proj_dim: i64,
    /// NT-Xent's temperature.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// How the two views of each image are drawn.
    #[serde(default)]
    pub views: ViewOptions,
    /// Training images whose features train the linear probe at each evaluation (evenly spaced
    /// over the training split; 0: all of it).
    #[serde(default = "default_probe_train_samples")]
    pub probe_train_samples: usize,
    /// Full-batch Adam steps of the probe's classifier.
    #[serde(default = "default_probe_steps")]
    pub probe_steps: usize,
    /// The probe's learning rate.
    #[serde(default = "default_probe_lr")]
    pub probe_lr: f64,
}

fn yes() -> bool {
    true
}
fn default_encoder() -> String {
    "resnet18".into()
}
fn default_width() -> i64 {
    64
}
fn default_proj_dim() -> i64 {
    128
}
fn default_temperature() -> f64 {
    0.5
}
fn default_probe_train_samples() -> usize {
    10_000
}
fn default_probe_steps() -> usize {
    300
}
fn default_probe_lr() -> f64 {
    0.05
}

impl SimClrSpec {
    fn depth(&self) -> Result<Depth, String> {
        match self.encoder.as_str() {
            "resnet18" => Ok(Depth::R18),
            "resnet34" => Ok(Depth::R34),
            "resnet50" => Ok(Depth::R50),
            other => Err(format!("model.encoder: {other:?} is not one of resnet18, resnet34, resnet50")),
        }
    }
}

impl ModelSpec for SimClrSpec {
    fn validate(&self, data: &DataConfig) -> Result<(), String> {
        self.depth()?;
        if self.width < 1 {
            return Err(format!("model.width: {} channels; at least 1", self.width));
        }
        if self.proj_dim < 1 || self.proj_hidden.is_some_and(|h| h < 1) {
            return Err("model.proj_dim and model.proj_hidden: widths must be at least 1".into());
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(format!("model.temperature: {} is not a positive number", self.temperature));
        }
        if !(self.probe_lr > 0.0 && self.probe_lr.is_finite()) || self.probe_steps == 0 {
            return Err("model.probe_lr must be positive and model.probe_steps at least 1".into());
        }
        self.views.validate()?;
        // The probe needs labels; the pretraining ignores them.
        needs_labelled("simclr", data)
    }

    fn build(&self, inputs: &Inputs, device: Device) -> Result<Box<dyn Model>, TchError> {
        let [channels, _, _] = inputs.sample_shape else {
            return Err(TchError::Torch(format!(
                "model simclr needs images (channels, height, width); the data's samples have shape {:?}",
                inputs.sample_shape
            )));
        };
        let sync = sync_group(self.sync_batchnorm, inputs)?;
        let depth = self.depth().map_err(TchError::Torch)?;
        let opts = ResNetOptions { depth, in_channels: *channels, classes: 0, small_stem: self.small_stem, width: self.width, sync };
        Ok(Box::new(SimClr::new(&opts, self.proj_hidden, self.proj_dim, device)?))
    }

    fn task(&self, _samples: Samples) -> &'static str {
        "contrastive"
    }

    /// The views are random: the loop seeds libtorch's generator per (seed, rank, step).
    fn random_in_training(&self) -> bool {
        true
    }
}

pub struct SimClr {
    encoder: ResNet,
    proj1: (Tensor, Tensor),
    proj_bn: BatchNorm,
    proj2: (Tensor, Tensor),
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
}

impl SimClr {
    /// The encoder `encoder` describes (its `classes` is ignored: no classifier) and a head of
    /// `hidden` (default: the feature width) and `out` units.
    pub fn new(encoder: &ResNetOptions, hidden: Option<i64>, out: i64, device: Device) -> Result<SimClr, TchError> {
        let encoder = ResNet::with(&ResNetOptions { classes: 0, ..encoder.clone() }, device)?;
        // The encoder's tensors themselves (shallow clones share storage and gradients), renamed.
        let prefixed =
            |list: &[(String, Tensor)]| list.iter().map(|(n, t)| (format!("encoder.{n}"), t.shallow_clone())).collect::<Vec<_>>();
        let mut params = prefixed(encoder.named_parameters());
        let mut buffers = prefixed(encoder.named_buffers());
        let features = encoder.feature_width();
        let hidden = hidden.unwrap_or(features);
        let proj1 = layer(&mut params, "projector.0", &[hidden, features], features, device)?;
        let proj_bn = BatchNorm::new("projector.1", hidden, device, encoder.sync().cloned(), &mut params, &mut buffers)?;
        let proj2 = layer(&mut params, "projector.3", &[out, hidden], hidden, device)?;
        Ok(SimClr { encoder, proj1, proj_bn, proj2, params, buffers })
    }
}

impl Model for SimClr {
    fn forward_t(&self, input: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let h = self.encoder.forward_t(input, train)?;
        let h = self.proj_bn.forward(&h.f_linear(&self.proj1.0, Some(&self.proj1.1))?, train)?.f_relu()?;
        h.f_linear(&self.proj2.0, Some(&self.proj2.1))
    }

    fn features(&self, input: &Tensor) -> Option<Result<Tensor, TchError>> {
        Some(self.encoder.forward_t(input, false))
    }

    fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    fn named_buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }
}
