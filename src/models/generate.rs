//! Autoregressive sampling from a language model (nanoGPT's `generate`): crop the context to the
//! block size, take the last position's logits, divide by the temperature, keep the top k, sample.
//! No KV cache: every new token runs the whole (at most block_size) context again, which for the
//! small models trained here is milliseconds per token.

use super::Model;
use tch::{Kind, TchError, Tensor};

pub struct SampleOptions {
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// The same seed gives the same text.
    pub seed: u64,
}

/// Continues `prompt` (token ids) by `max_new_tokens` tokens; returns only the new ones.
pub fn generate(
    model: &dyn Model,
    prompt: &[i64],
    block_size: usize,
    device: tch::Device,
    o: &SampleOptions,
) -> Result<Vec<i64>, TchError> {
    let _guard = tch::no_grad_guard();
    tch::manual_seed((o.seed >> 1) as i64);
    let mut tokens: Vec<i64> = if prompt.is_empty() { vec![0] } else { prompt.to_vec() };
    let start = tokens.len();
    for _ in 0..o.max_new_tokens {
        let context = &tokens[tokens.len().saturating_sub(block_size)..];
        let idx = Tensor::f_from_slice(context)?.f_view([1, context.len() as i64])?.f_to_device(device)?;
        let logits = model.forward_t(&idx, false)?.f_select(1, context.len() as i64 - 1)?.f_to_kind(Kind::Float)?;
        let mut logits = logits.f_div_scalar(o.temperature)?;
        let vocab = logits.size().last().copied().unwrap_or(1);
        if o.top_k > 0 && (o.top_k as i64) < vocab {
            let (top, _) = logits.f_topk(o.top_k as i64, -1, true, true)?;
            let kth = top.f_select(1, o.top_k as i64 - 1)?.f_unsqueeze(1)?;
            logits = logits.f_masked_fill(&logits.f_lt_tensor(&kth)?, f64::NEG_INFINITY)?;
        }
        let probs = logits.f_softmax(-1, Kind::Float)?.f_to_device(tch::Device::Cpu)?;
        tokens.push(probs.f_multinomial(1, false)?.f_int64_value(&[0, 0])?);
    }
    Ok(tokens.split_off(start))
}

/// `n` images from a binary autoregressive model in natural order (MADE): pixel d is drawn from
/// Bernoulli(sigmoid(logit d)) given the pixels already drawn, one forward pass per pixel.
/// Returns [n, pixels] of 0/1 floats on the CPU; the same seed gives the same images.
pub fn binary_images(model: &dyn Model, n: i64, pixels: i64, device: tch::Device, seed: u64) -> Result<Tensor, TchError> {
    let _guard = tch::no_grad_guard();
    // Every u64 seed distinct (the top bit cleared, not shifted out).
    tch::manual_seed((seed & i64::MAX as u64) as i64);
    let x = Tensor::f_zeros([n, pixels], (Kind::Float, device))?;
    for d in 0..pixels {
        let p = model.forward_t(&x, false)?.f_select(1, d)?.f_to_kind(Kind::Float)?.f_sigmoid()?;
        let drawn = p.f_to_device(tch::Device::Cpu)?.f_bernoulli()?.f_to_device(device)?;
        x.f_select(1, d)?.f_copy_(&drawn)?;
    }
    x.f_to_device(tch::Device::Cpu)
}
