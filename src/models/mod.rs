//! Models, with parameters named and ordered as PyTorch names them in `state_dict()`, so
//! checkpoints load into the equivalent `nn.Module`.

mod cnn;
pub mod generate;
pub mod gpt;
mod mlp;
pub mod resnet;
pub mod torchscript;

pub use cnn::Cnn;
pub use gpt::{Gpt, GptConfig};
pub use mlp::Mlp;
pub use resnet::ResNet;
pub use torchscript::TorchScript;

use crate::config::{ModelConfig, ModelName};
use tch::{Device, Kind, TchError, Tensor};

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

/// Builds the configured model for samples of `sample_shape` and `classes` outputs. Initialised
/// as PyTorch initialises Linear/Conv2d, from libtorch's default generator (seed it first); a
/// TorchScript module keeps the weights saved with it.
pub fn build(cfg: &ModelConfig, sample_shape: &[i64], classes: usize, device: Device) -> Result<Box<dyn Model>, TchError> {
    Ok(match cfg.name {
        ModelName::Mlp => Box::new(Mlp::new(sample_shape.iter().product(), &cfg.hidden, classes as i64, device)?),
        ModelName::Cnn => Box::new(Cnn::new(classes as i64, device)?),
        // `classes` is the vocabulary for token data.
        ModelName::Gpt => Box::new(Gpt::new(
            &GptConfig {
                vocab_size: classes,
                block_size: cfg.block_size,
                n_layer: cfg.n_layer,
                n_head: cfg.n_head,
                n_embd: cfg.n_embd,
                bias: cfg.bias,
                dropout: cfg.dropout,
            },
            device,
        )?),
        ModelName::Resnet18 | ModelName::Resnet34 | ModelName::Resnet50 => {
            let depth = match cfg.name {
                ModelName::Resnet18 => resnet::Depth::R18,
                ModelName::Resnet34 => resnet::Depth::R34,
                _ => resnet::Depth::R50,
            };
            let [channels, _, _] = sample_shape else {
                return Err(TchError::Torch(format!(
                    "model {:?} needs images (channels, height, width); the data's samples have shape {sample_shape:?}",
                    cfg.name
                )));
            };
            Box::new(ResNet::new(depth, *channels, classes as i64, cfg.small_stem, device)?)
        }
        ModelName::Torchscript => {
            let path = cfg.path.as_deref().ok_or_else(|| TchError::Torch("model torchscript needs model.path".into()))?;
            Box::new(TorchScript::load(path, cfg.output, device)?)
        }
    })
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
