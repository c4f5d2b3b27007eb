//! Models, with parameters named and ordered as PyTorch names them in `state_dict()`, so
//! checkpoints load into the equivalent `nn.Module`.

mod cnn;
mod mlp;

pub use cnn::Cnn;
pub use mlp::Mlp;

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
}

/// Builds the configured model for samples of `sample_shape` and `classes` outputs. Initialised
/// as PyTorch initialises Linear/Conv2d, from libtorch's default generator (seed it first).
pub fn build(cfg: &ModelConfig, sample_shape: &[i64], classes: usize, device: Device) -> Result<Box<dyn Model>, TchError> {
    Ok(match cfg.name {
        ModelName::Mlp => Box::new(Mlp::new(sample_shape.iter().product(), &cfg.hidden, classes as i64, device)?),
        ModelName::Cnn => Box::new(Cnn::new(classes as i64, device)?),
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
