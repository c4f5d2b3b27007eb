//! nanoGPT's GPT (model.py), with its parameter names, so a checkpoint loads into nanoGPT's `GPT`
//! with `load_state_dict(strict=True)`:
//!
//! ```text
//! transformer.wte (vocab × C), transformer.wpe (block × C)
//! transformer.h.N: ln_1 → attn.c_attn (C → 3C) → causal attention → attn.c_proj; ln_2 → mlp.c_fc
//!                  (C → 4C) → exact GELU → mlp.c_proj; both residual
//! transformer.ln_f → lm_head (tied: the same tensor as transformer.wte.weight)
//! ```
//!
//! LayerNorm eps 1e-5 with optional bias; attention through libtorch's
//! `scaled_dot_product_attention(is_causal=True)` (FlashAttention / memory-efficient kernels on
//! GPU); on the CPU under bf16/fp16 autocast, nanoGPT's own unfused attention, whose bf16 matmuls
//! are faster there than libtorch's bf16 CPU flash kernel (`manual_attention`). Initialisation as nanoGPT: every Linear and Embedding weight N(0, 0.02), `c_proj` weights
//! N(0, 0.02/√(2·n_layer)), biases 0, LayerNorm weight 1.
//!
//! The tied weight is one parameter (`transformer.wte.weight`): reduced once, stepped once, and
//! stored once, so files load into nanoGPT's `GPT` with `safetensors.torch.load_model(model,
//! path)` (strict), as files written by `save_model` do (which keeps `lm_head.weight`; both load
//! here). `model.load_state_dict(load_file(path), strict=False)` works too and reports only the
//! tied `lm_head.weight` as missing.

use super::{Inputs, Model, ModelKind, ModelSpec};
use crate::data::{DataConfig, Samples};
use crate::units::Units;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

pub const KIND: ModelKind = ModelKind::of::<GptSpec>("gpt");

/// `model: {name: gpt, n_layer: 4, …}`: nanoGPT's `GPTConfig` less the vocabulary, which comes
/// from the token data's `meta.json`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GptSpec {
    /// Transformer blocks.
    #[serde(default = "default_n_layer")]
    pub n_layer: usize,
    /// Attention heads (n_embd must be a multiple).
    #[serde(default = "default_n_head")]
    pub n_head: usize,
    /// Embedding width.
    #[serde(default = "default_n_embd")]
    pub n_embd: usize,
    /// Context length; training windows are this long.
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// Biases in Linear and LayerNorm layers (nanoGPT's `bias`).
    #[serde(default = "yes")]
    pub bias: bool,
    /// Dropout probability in training.
    #[serde(default)]
    pub dropout: f64,
}

fn default_n_layer() -> usize {
    4
}
fn default_n_head() -> usize {
    4
}
fn default_n_embd() -> usize {
    128
}
fn default_block_size() -> usize {
    128
}
fn yes() -> bool {
    true
}

impl GptSpec {
    /// The model's full config for a vocabulary of `vocab_size` tokens.
    pub fn with_vocab(&self, vocab_size: usize) -> GptConfig {
        let GptSpec { n_layer, n_head, n_embd, block_size, bias, dropout } = *self;
        GptConfig { vocab_size, block_size, n_layer, n_head, n_embd, bias, dropout }
    }
}

impl ModelSpec for GptSpec {
    fn validate(&self, data: &DataConfig) -> Result<(), String> {
        if self.n_layer == 0 || self.n_head == 0 || self.n_embd == 0 || self.block_size == 0 {
            return Err("model.n_layer, n_head, n_embd and block_size must be at least 1".into());
        }
        if self.n_embd % self.n_head != 0 {
            return Err(format!("model.n_embd ({}) must be a multiple of model.n_head ({})", self.n_embd, self.n_head));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("model.dropout must be in [0, 1), got {}", self.dropout));
        }
        if data.samples() != Samples::Tokens {
            return Err(format!("model gpt needs token data (data.format: tokens), not {}", data.format));
        }
        Ok(())
    }

    /// `inputs.classes` is the vocabulary.
    fn build(&self, inputs: &Inputs, device: Device) -> Result<Box<dyn Model>, TchError> {
        Ok(Box::new(Gpt::new(&self.with_vocab(inputs.classes), device)?))
    }

    fn task(&self, _samples: Samples) -> &'static str {
        "language_model"
    }

    fn context_length(&self) -> Option<usize> {
        Some(self.block_size)
    }

    fn random_in_training(&self) -> bool {
        self.dropout > 0.0
    }
}

/// Longest context for which the CPU under bf16/fp16 autocast uses `manual_attention`: its T×T
/// matrices are kept for backward (B·H·T² elements per layer), fine up to here.
const MANUAL_ATTENTION_MAX_T: i64 = 512;

/// nanoGPT's own attention without flash (`att = softmax(mask(q @ kᵀ / √d)) @ v`), under the
/// caller's autocast: the two matmuls run in bf16 (AMX on CPUs that have it), softmax as autocast
/// says. On the CPU it beats libtorch's bf16 flash-attention kernel, whose backward is ~5× slower
/// than its f32 one (measured: bf16 training of the demo GPT went 1.8× faster with it, nanoGPT's
/// "baby GPT" 8% faster).
fn manual_attention(q: &Tensor, k: &Tensor, v: &Tensor, dropout: f64, train: bool) -> Result<Tensor, TchError> {
    let (t, hd) = (q.size()[2], q.size()[3]);
    let att = q.f_matmul(&k.f_transpose(-2, -1)?)?.f_mul_scalar(1.0 / (hd as f64).sqrt())?;
    let future = Tensor::f_ones([t, t], (Kind::Bool, q.device()))?.f_tril(0)?.f_logical_not()?;
    let att = att.f_masked_fill(&future, f64::NEG_INFINITY)?.f_softmax(-1, None::<Kind>)?;
    att.f_dropout(dropout, train)?.f_matmul(v)
}

/// What `model: {name: gpt, …}` sets.
#[derive(Clone, Debug)]
pub struct GptConfig {
    pub vocab_size: usize,
    pub block_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub bias: bool,
    pub dropout: f64,
}

struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
}

struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// Shallow copies (the same tensors): what a checkpointed block's recomputation holds.
impl Clone for Norm {
    fn clone(&self) -> Norm {
        Norm { weight: self.weight.shallow_clone(), bias: self.bias.as_ref().map(Tensor::shallow_clone) }
    }
}

impl Clone for Linear {
    fn clone(&self) -> Linear {
        Linear { weight: self.weight.shallow_clone(), bias: self.bias.as_ref().map(Tensor::shallow_clone) }
    }
}

#[derive(Clone)]
struct Block {
    ln_1: Norm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: Norm,
    c_fc: Linear,
    mlp_proj: Linear,
}

pub struct Gpt {
    cfg: GptConfig,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    params: Vec<(String, Tensor)>,
    /// How blocks and the root's segments run (checkpointed, ZeRO-3's gathers).
    units: Units,
}

/// Creates parameters on the CPU from libtorch's default generator (seed it first), so every
/// device starts from the same values, then moves them to `device`.
struct Builder<'a> {
    params: &'a mut Vec<(String, Tensor)>,
    device: Device,
}

impl Builder<'_> {
    fn tensor(&mut self, name: String, shape: &[i64], init: impl FnOnce(Tensor) -> Result<Tensor, TchError>) -> Result<Tensor, TchError> {
        let t = tch::no_grad(|| init(Tensor::f_empty(shape, (Kind::Float, Device::Cpu))?)?.f_to_device(self.device))?;
        let t = t.f_set_requires_grad(true)?;
        self.params.push((name, t.shallow_clone()));
        Ok(t)
    }

    fn normal(&mut self, name: String, shape: &[i64], std: f64) -> Result<Tensor, TchError> {
        self.tensor(name, shape, |mut t| t.f_normal_(0.0, std))
    }

    fn linear(&mut self, name: &str, inputs: i64, outputs: i64, bias: bool, std: f64) -> Result<Linear, TchError> {
        let weight = self.normal(format!("{name}.weight"), &[outputs, inputs], std)?;
        let bias = if bias { Some(self.tensor(format!("{name}.bias"), &[outputs], |mut t| t.f_zero_())?) } else { None };
        Ok(Linear { weight, bias })
    }

    fn norm(&mut self, name: &str, width: i64, bias: bool) -> Result<Norm, TchError> {
        let weight = self.tensor(format!("{name}.weight"), &[width], |mut t| t.f_fill_(1.0))?;
        let bias = if bias { Some(self.tensor(format!("{name}.bias"), &[width], |mut t| t.f_zero_())?) } else { None };
        Ok(Norm { weight, bias })
    }
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_layer_norm(self.weight.size(), Some(&self.weight), self.bias.as_ref(), 1e-5, true)
    }
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_linear(&self.weight, self.bias.as_ref())
    }
}

fn attention(cfg: &GptConfig, blk: &Block, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
    let (b, t, c) = x.size3()?;
    let nh = cfg.n_head as i64;
    let qkv = blk.c_attn.forward(x)?.f_split(c, 2)?;
    let heads = |m: &Tensor| m.f_view([b, t, nh, c / nh])?.f_transpose(1, 2);
    let (q, k, v) = (heads(&qkv[0])?, heads(&qkv[1])?, heads(&qkv[2])?);
    let p = if train { cfg.dropout } else { 0.0 };
    let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor| Tensor::f_scaled_dot_product_attention::<Tensor>(q, k, v, None, p, true, None, false);
    let low = matches!(q.kind(), Kind::BFloat16 | Kind::Half);
    let y = if q.device() == Device::Cpu && low && t <= MANUAL_ATTENTION_MAX_T {
        manual_attention(&q, &k, &v, p, train)?
    } else if q.device() == Device::Cpu && low {
        // Longer contexts: the fused kernel (no T×T matrix), in f32, where its backward is fast.
        let _f32 = crate::amp::AutocastGuard::disabled(Device::Cpu).map_err(|e| TchError::Torch(e.to_string()))?;
        let f = |t: &Tensor| t.f_to_kind(Kind::Float);
        sdpa(&f(&q)?, &f(&k)?, &f(&v)?)?.f_to_kind(q.kind())?
    } else {
        sdpa(&q, &k, &v)?
    };
    let y = y.f_transpose(1, 2)?.f_contiguous()?.f_view([b, t, c])?;
    blk.attn_proj.forward(&y)?.f_dropout(cfg.dropout, train)
}

fn mlp(cfg: &GptConfig, blk: &Block, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
    let h = blk.c_fc.forward(x)?.f_gelu("none")?;
    blk.mlp_proj.forward(&h)?.f_dropout(cfg.dropout, train)
}

/// One transformer block: x + attn(ln_1(x)), then + mlp(ln_2(·)).
fn block_forward(cfg: &GptConfig, blk: &Block, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
    let x = x + attention(cfg, blk, &blk.ln_1.forward(x)?, train)?;
    Ok(&x + mlp(cfg, blk, &blk.ln_2.forward(&x)?, train)?)
}

impl Gpt {
    pub fn new(cfg: &GptConfig, device: Device) -> Result<Gpt, TchError> {
        let (c, v) = (cfg.n_embd as i64, cfg.vocab_size as i64);
        let mut params = Vec::new();
        let mut b = Builder { params: &mut params, device };
        let wte = b.normal("transformer.wte.weight".into(), &[v, c], 0.02)?;
        let wpe = b.normal("transformer.wpe.weight".into(), &[cfg.block_size as i64, c], 0.02)?;
        let proj_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("transformer.h.{i}");
            blocks.push(Block {
                ln_1: b.norm(&format!("{p}.ln_1"), c, cfg.bias)?,
                c_attn: b.linear(&format!("{p}.attn.c_attn"), c, 3 * c, cfg.bias, 0.02)?,
                attn_proj: b.linear(&format!("{p}.attn.c_proj"), c, c, cfg.bias, proj_std)?,
                ln_2: b.norm(&format!("{p}.ln_2"), c, cfg.bias)?,
                c_fc: b.linear(&format!("{p}.mlp.c_fc"), c, 4 * c, cfg.bias, 0.02)?,
                mlp_proj: b.linear(&format!("{p}.mlp.c_proj"), 4 * c, c, cfg.bias, proj_std)?,
            });
        }
        let ln_f = b.norm("transformer.ln_f", c, cfg.bias)?;
        Ok(Gpt { cfg: cfg.clone(), wte, wpe, blocks, ln_f, params, units: Units::default() })
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Logits for token ids `[batch, t]` (t ≤ block_size).
    fn logits(&self, idx: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let t = idx.size().last().copied().unwrap_or(0);
        if t as usize > self.cfg.block_size {
            return Err(TchError::Shape(format!("cannot forward a sequence of {t} tokens: block_size is {}", self.cfg.block_size)));
        }
        // The root's first segment: token and position embeddings.
        let (wte, wpe, dropout) = (self.wte.shallow_clone(), self.wpe.shallow_clone(), self.cfg.dropout);
        let embed = Box::new(move |idx: &Tensor| {
            let pos = Tensor::f_arange(t, (Kind::Int64, idx.device()))?;
            let tok = Tensor::f_embedding(&wte, idx, -1, false, false)?;
            (tok + Tensor::f_embedding(&wpe, &pos, -1, false, false)?).f_dropout(dropout, train)
        });
        let mut x = self.units.run("", idx, embed)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let (cfg, blk) = (self.cfg.clone(), blk.clone());
            x = self.units.run(&format!("transformer.h.{i}"), &x, Box::new(move |x: &Tensor| block_forward(&cfg, &blk, x, train)))?;
        }
        // The root's second: ln_f and the head, tied to the token embedding.
        let (ln_f, wte) = (self.ln_f.clone(), self.wte.shallow_clone());
        self.units.run("", &x, Box::new(move |x: &Tensor| ln_f.forward(x)?.f_linear::<Tensor>(&wte, None)))
    }

    /// nanoGPT's `get_num_params()`: every parameter once, less the position embedding.
    pub fn num_params_non_embedding(&self) -> usize {
        self.params.iter().map(|(_, p)| p.numel()).sum::<usize>() - self.wpe.numel()
    }
}

impl Model for Gpt {
    /// Logits `[batch, t, vocab]` for token ids `[batch, t]`.
    fn forward_t(&self, idx: &Tensor, train: bool) -> Result<Tensor, TchError> {
        self.logits(idx, train)
    }

    fn unit_names(&self) -> Vec<String> {
        (0..self.blocks.len()).map(|i| format!("transformer.h.{i}")).collect()
    }

    fn set_units(&mut self, units: Units) -> Result<(), String> {
        self.units = units;
        Ok(())
    }

    fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    fn tied(&self) -> Vec<(String, String)> {
        vec![("lm_head.weight".into(), "transformer.wte.weight".into())]
    }

    /// nanoGPT's `estimate_mfu`: 6N + 12·L·H·Q·T per token, N without the position embedding.
    fn flops_per_token(&self) -> Option<f64> {
        let c = &self.cfg;
        let (l, h, q, t) = (c.n_layer as f64, c.n_head as f64, (c.n_embd / c.n_head) as f64, c.block_size as f64);
        Some(6.0 * self.num_params_non_embedding() as f64 + 12.0 * l * h * q * t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(bias: bool) -> GptConfig {
        GptConfig { vocab_size: 11, block_size: 8, n_layer: 2, n_head: 2, n_embd: 8, bias, dropout: 0.0 }
    }

    #[test]
    fn names_shapes_and_init_follow_nanogpt() {
        tch::manual_seed(0);
        let m = Gpt::new(&tiny(true), Device::Cpu).unwrap();
        let names: Vec<&str> = m.named_parameters().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            &names[..4],
            &["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias"]
        );
        assert_eq!(names.last(), Some(&"transformer.ln_f.bias"));
        assert_eq!(names.len(), 2 + 2 * 12 + 2);
        assert!(!names.contains(&"lm_head.weight"), "the tied weight is one parameter");
        let get = |n: &str| m.named_parameters().iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        assert_eq!(get("transformer.h.1.attn.c_attn.weight").size(), vec![24, 8]);
        assert_eq!(get("transformer.h.1.mlp.c_proj.weight").size(), vec![8, 32]);
        let std = |t: Tensor| t.std(true).double_value(&[]);
        assert!((std(get("transformer.wte.weight")) - 0.02).abs() < 0.006);
        assert!(std(get("transformer.h.0.mlp.c_proj.weight")) < 0.014, "c_proj scaled by 1/sqrt(2·n_layer)");
        assert_eq!(get("transformer.h.0.ln_1.weight").sum(Kind::Float).double_value(&[]), 8.0);
        let nobias = Gpt::new(&tiny(false), Device::Cpu).unwrap();
        assert!(nobias.named_parameters().iter().all(|(n, _)| !n.ends_with(".bias")));
    }

    #[test]
    fn attention_is_causal_and_logits_have_the_vocabulary() {
        tch::manual_seed(1);
        let m = Gpt::new(&tiny(true), Device::Cpu).unwrap();
        let a = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([1, 6]);
        let b = Tensor::from_slice(&[1i64, 2, 3, 9, 9, 9]).view([1, 6]);
        let (la, lb) = (m.forward_t(&a, false).unwrap(), m.forward_t(&b, false).unwrap());
        assert_eq!(la.size(), vec![1, 6, 11]);
        // The first three positions cannot see the tokens after them.
        let diff = (la.narrow(1, 0, 3) - lb.narrow(1, 0, 3)).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
        assert!((la.narrow(1, 3, 1) - lb.narrow(1, 3, 1)).abs().max().double_value(&[]) > 1e-6);
        assert!(m.forward_t(&Tensor::zeros([1, 9], tch::kind::INT64_CPU), false).is_err(), "longer than block_size");
    }
}
