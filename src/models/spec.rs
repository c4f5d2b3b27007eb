//! A model as the config names it: `model: {name: gpt, init_from: …, n_layer: 4, …}`. The name
//! picks a registered kind, whose own struct parses the rest of the keys (unknown ones are
//! errors), checks them against the data, builds the replica and says what training it means.

use super::{Model, MODELS};
use crate::data::{DataConfig, Samples};
use crate::registry::{self, Named, Spec};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::PathBuf;
use std::sync::Arc;
use tch::{Device, TchError};

/// What the data gives a model to fit.
pub struct Inputs<'a> {
    /// Shape of one input sample, e.g. [1, 28, 28], or [block] for token windows.
    pub sample_shape: &'a [i64],
    /// Classes of labelled data; the vocabulary of token data.
    pub classes: usize,
    /// The group's communicator, for layers that communicate (SyncBatchNorm); `None` outside a
    /// group (`ringtrain sample`).
    pub comm: Option<&'a crate::comm::CommHandle>,
}

/// A model's parsed keys: its checks, its builder, and the task it implies.
pub trait ModelSpec: Spec {
    /// Checks against the data section; the message names the key.
    fn validate(&self, _data: &DataConfig) -> Result<(), String> {
        Ok(())
    }
    /// A replica initialised as PyTorch initialises it, from libtorch's default generator (seed
    /// it first); weights that come with the model (TorchScript) are kept.
    fn build(&self, inputs: &Inputs, device: Device) -> Result<Box<dyn Model>, TchError>;
    /// The task training means, by its name in `train::tasks`: by default the data's own
    /// (`classification` of labelled samples, `language_model` on tokens).
    fn task(&self, samples: Samples) -> &'static str {
        match samples {
            Samples::Labelled => "classification",
            Samples::Tokens => "language_model",
            Samples::Boxes => "detection",
        }
    }
    /// Tokens per window, for models of token data.
    fn context_length(&self) -> Option<usize> {
        None
    }
    /// Whether training draws random numbers (dropout): the loop then seeds libtorch's generator
    /// per step, so a resumed run draws the same.
    fn random_in_training(&self) -> bool {
        false
    }
}

/// For models of labelled samples: the error when the data is something else.
pub fn needs_labelled(model: &str, data: &DataConfig) -> Result<(), String> {
    match data.samples() {
        Samples::Labelled => Ok(()),
        Samples::Tokens => Err(format!(
            "model {model} takes labelled samples; data.format {} gives token windows (language models: gpt, torchscript)",
            data.format
        )),
        Samples::Boxes => {
            Err(format!("model {model} takes labelled samples; data.format {} gives images with boxes, for a detection model", data.format))
        }
    }
}

/// A model the config can name: `model.name` and the parser of its keys.
#[derive(Clone, Copy)]
pub struct ModelKind {
    pub name: &'static str,
    pub parse: fn(serde_yaml::Mapping) -> Result<Box<dyn ModelSpec>, String>,
}

impl ModelKind {
    /// The model `name` whose keys deserialise into `T`.
    pub const fn of<T: ModelSpec + DeserializeOwned>(name: &'static str) -> ModelKind {
        ModelKind { name, parse: parse_as::<T> }
    }
}

fn parse_as<T: ModelSpec + DeserializeOwned>(keys: serde_yaml::Mapping) -> Result<Box<dyn ModelSpec>, String> {
    Ok(Box::new(registry::parse::<T>(keys)?))
}

impl Named for ModelKind {
    fn name(&self) -> &'static str {
        self.name
    }
}

/// The `model:` section: the model's name, the weights to start from, and the model's own keys.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub name: String,
    /// Start from these weights (safetensors with PyTorch names, e.g. from `model.state_dict()`).
    pub init_from: Option<PathBuf>,
    pub spec: Arc<dyn ModelSpec>,
}

impl ModelConfig {
    pub fn validate(&self, data: &DataConfig) -> Result<(), String> {
        self.spec.validate(data)
    }

    pub fn build(&self, inputs: &Inputs, device: Device) -> Result<Box<dyn Model>, TchError> {
        self.spec.build(inputs, device)
    }
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut keys = serde_yaml::Mapping::deserialize(d)?;
        let name: String = registry::take(&mut keys, "name").map_err(D::Error::custom)?.ok_or_else(|| D::Error::missing_field("name"))?;
        let kind = MODELS.get(&name).map_err(D::Error::custom)?;
        let init_from = registry::take(&mut keys, "init_from").map_err(D::Error::custom)?;
        let spec = (kind.parse)(keys).map_err(D::Error::custom)?;
        Ok(ModelConfig { name, init_from, spec: spec.into() })
    }
}

impl Serialize for ModelConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut shared = serde_yaml::Mapping::new();
        shared.insert("name".into(), self.name.clone().into());
        if let Some(p) = &self.init_from {
            shared.insert("init_from".into(), p.display().to_string().into());
        }
        registry::merged(shared, self.spec.to_value()).serialize(s)
    }
}
