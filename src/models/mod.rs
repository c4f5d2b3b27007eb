//! Models, with parameters named and ordered as PyTorch names them in `state_dict()`, so
//! checkpoints load into the equivalent `nn.Module`.

mod batchnorm;
mod cnn;
pub mod generate;
pub mod gpt;
pub mod made;
pub mod max_pool;
mod mlp;
pub mod resnet;
pub mod simclr;
mod spec;
pub mod torchscript;
pub mod yolo;

pub use cnn::Cnn;
pub use gpt::{Gpt, GptConfig, GptSpec};
pub use mlp::Mlp;
pub use resnet::ResNet;
pub use spec::{needs_labelled, Inputs, ModelConfig, ModelKind, ModelSpec};
pub use torchscript::TorchScript;

use crate::registry::Registry;
pub use crate::units::{self, Units};
use tch::{Device, Kind, TchError, Tensor};

/// The built-in models. A new model is one file in this folder (its config keys, checks, builder
/// and task: a `ModelSpec`) and one entry here; a program using the library calls
/// `MODELS.register` instead.
fn builtin() -> Vec<ModelKind> {
    vec![
        mlp::KIND,
        cnn::KIND,
        gpt::KIND,
        resnet::RESNET18,
        resnet::RESNET34,
        resnet::RESNET50,
        simclr::KIND,
        made::KIND,
        torchscript::KIND,
        yolo::KIND,
    ]
}

/// Every model, by `model.name`.
pub static MODELS: Registry<ModelKind> = Registry::new("model", builtin);

/// The model seam: what the training loop needs from a model.
pub trait Model {
    /// The output for a batch's input. `train`: training mode (dropout on, BatchNorm updating
    /// its running statistics); false: evaluation mode.
    fn forward_t(&self, input: &Tensor, train: bool) -> Result<Tensor, TchError>;
    /// Trainable parameters in registration order, with PyTorch names (`state_dict` keys). A
    /// tied weight appears once.
    fn named_parameters(&self) -> &[(String, Tensor)];
    /// Buffers (no gradient; any dtype, e.g. BatchNorm's running statistics and its i64
    /// `num_batches_tracked`), PyTorch names. Broadcast from rank 0 and checkpointed with the
    /// parameters.
    fn named_buffers(&self) -> &[(String, Tensor)] {
        &[]
    }
    /// Tied weights as (alias, parameter) name pairs, e.g. GPT's `lm_head.weight` is
    /// `transformer.wte.weight`: one tensor in training and in files (under the parameter's
    /// name, as safetensors' `save_model` stores one name of a tied pair); a file holding the
    /// alias instead loads too.
    fn tied(&self) -> Vec<(String, String)> {
        vec![]
    }
    /// The representation a linear probe reads, in evaluation mode: an encoder's output before
    /// its projection head (SimCLR). `None`: the model has no such features.
    fn features(&self, _input: &Tensor) -> Option<Result<Tensor, TchError>> {
        None
    }
    /// Its units (GPT's blocks, ResNet's stages), by name; each parameter whose name a unit's
    /// prefixes belongs to it, the rest to the root (`units::unit_of`).
    fn unit_names(&self) -> Vec<String> {
        vec![]
    }
    /// How to run its units from now on: activation checkpointing, ZeRO-3's gathers. `Err`
    /// names why this model cannot.
    fn set_units(&mut self, _units: Units) -> Result<(), String> {
        Err("this model has no units (GPT's blocks and ResNet's stages are)".into())
    }
    /// A detector's anchor points for an input of `input_shape` (batch, channels, height,
    /// width): `[points, 3]` f32 rows (x, y, stride) in pixels, one per row of its output, in
    /// that order; the detection task assigns ground truth to them. `None`: not a detector.
    fn anchor_points(&self, _input_shape: &[i64]) -> Option<Result<Tensor, TchError>> {
        None
    }
    /// Training FLOPs per token (forward + backward), for the achieved-FLOP/s estimate.
    fn flops_per_token(&self) -> Option<f64> {
        None
    }
}

/// `loaded` with each tied pair under the parameter's name only: the alias is dropped, or
/// renamed when the file holds only the alias (safetensors' `save_model` keeps one name of a
/// tied pair, not necessarily ours).
pub fn without_aliases(mut loaded: Vec<(String, Tensor)>, tied: &[(String, String)]) -> Vec<(String, Tensor)> {
    for (alias, source) in tied {
        let has_source = loaded.iter().any(|(n, _)| n == source);
        if has_source {
            loaded.retain(|(n, _)| n != alias);
        } else if let Some(entry) = loaded.iter_mut().find(|(n, _)| n == alias) {
            entry.0 = source.clone();
        }
    }
    loaded
}

/// Creates a weight/bias pair with PyTorch's default init for a layer with `fan_in` inputs:
/// kaiming_uniform_(a=√5) for the weight and U(±1/√fan_in) for the bias — both U(±1/√fan_in).
/// Drawn on the CPU, so every device starts from the same values, then moved to `device`.
pub(crate) fn layer(
    params: &mut Vec<(String, Tensor)>,
    name: &str,
    weight_shape: &[i64],
    fan_in: i64,
    device: Device,
) -> Result<(Tensor, Tensor), TchError> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let init = |shape: &[i64]| -> Result<Tensor, TchError> {
        let t = tch::no_grad(|| Tensor::f_empty(shape, (Kind::Float, Device::Cpu))?.f_uniform_(-bound, bound)?.f_to_device(device))?;
        t.f_set_requires_grad(true)
    };
    let w = init(weight_shape)?;
    let b = init(&[weight_shape[0]])?;
    params.push((format!("{name}.weight"), w.shallow_clone()));
    params.push((format!("{name}.bias"), b.shallow_clone()));
    Ok((w, b))
}
