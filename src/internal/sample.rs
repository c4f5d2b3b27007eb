//! `ringtrain sample`: text from a trained GPT's checkpoint (byte-level tokens), on the CPU.

use crate::checkpoint;
use crate::config::Config;
use crate::models::generate::{generate, SampleOptions};
use crate::models::{self, Gpt, GptConfig, GptSpec, Model};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::Tensor;

pub struct SampleArgs {
    pub run_dir: PathBuf,
    /// A checkpoint folder, or a safetensors file; default: the run's newest usable checkpoint,
    /// else its model.safetensors.
    pub checkpoint: Option<PathBuf>,
    pub prompt: String,
    pub options: SampleOptions,
}

/// The weights to sample from, and where they came from.
fn weights(run_dir: &Path, chosen: Option<&Path>) -> Result<(Vec<(String, Tensor)>, PathBuf)> {
    if let Some(p) = chosen {
        if p.is_dir() {
            let c = checkpoint::load(p).with_context(|| format!("--checkpoint {}", p.display()))?;
            return Ok((c.model, c.path));
        }
        let t = Tensor::read_safetensors(p).map_err(|e| anyhow::anyhow!("--checkpoint {}: {e}", p.display()))?;
        return Ok((t, p.to_path_buf()));
    }
    let (found, skipped) = checkpoint::find_resumable(&run_dir.join("checkpoints"))?;
    for s in skipped {
        tracing::warn!("skipping unusable checkpoint: {s}");
    }
    if let Some(c) = found {
        return Ok((c.model, c.path));
    }
    let p = run_dir.join("model.safetensors");
    if !p.exists() {
        bail!("{}: no checkpoint and no model.safetensors (has it trained?)", run_dir.display());
    }
    let t = Tensor::read_safetensors(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    Ok((t, p))
}

/// The prompt and its continuation.
pub fn run(args: SampleArgs) -> Result<String> {
    let cfg_path = args.run_dir.join("config.yaml");
    let cfg = Config::load(&cfg_path, &[]).with_context(|| format!("reading the run's config ({})", cfg_path.display()))?;
    let Some(m) = cfg.model.spec.as_any().downcast_ref::<GptSpec>() else {
        bail!("{}: model {} is not a language model (sample needs model.name: gpt)", cfg_path.display(), cfg.model.name);
    };
    let (loaded, source) = weights(&args.run_dir, args.checkpoint.as_deref())?;
    let vocab = loaded
        .iter()
        .find(|(n, _)| n == "transformer.wte.weight")
        .map(|(_, t)| t.size()[0] as usize)
        .with_context(|| format!("{}: no transformer.wte.weight", source.display()))?;
    if vocab != 256 {
        bail!("{}: vocabulary of {vocab} tokens; sample reads and writes byte-level tokens (256)", source.display());
    }
    let gpt_cfg = GptConfig { dropout: 0.0, ..m.with_vocab(vocab) };
    let model = Gpt::new(&gpt_cfg, tch::Device::Cpu)?;
    let tied = model.tied();
    checkpoint::copy_into(model.named_parameters(), &models::without_aliases(loaded, &tied), &source).map_err(anyhow::Error::msg)?;
    tracing::info!("sampling from {}", source.display());
    let prompt: Vec<i64> = args.prompt.bytes().map(i64::from).collect();
    let new = generate(&model, &prompt, m.block_size, tch::Device::Cpu, &args.options)?;
    Ok(crate::train::decode_bytes(&prompt, &new))
}
