//! The YAML config: the only place that touches YAML. Unknown keys are rejected, values are
//! validated, and `--set a.b=value` overrides are applied before either, so an error always names
//! the file and the field.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config {path}: {msg}")]
    Invalid { path: String, msg: String },
    #[error("override `{arg}`: {msg}")]
    Override { arg: String, msg: String },
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub ddp: DdpConfig,
    #[serde(default)]
    pub comm: CommConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// `cpu`, `cuda` (local rank r uses cuda:r), or `auto` (cuda when a GPU is visible).
    #[serde(default = "default_device")]
    pub device: DeviceChoice,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    Auto,
}

fn default_device() -> DeviceChoice {
    DeviceChoice::Cpu
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    /// bf16 autocast for forward and backward, fp32 master parameters (CUDA only).
    Bf16,
}

fn default_precision() -> Precision {
    Precision::Fp32
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReduceDtype {
    Fp32,
    /// Gradients travel as bf16 (NCCL only): half the bytes, less precision.
    Bf16,
}

fn default_reduce_dtype() -> ReduceDtype {
    ReduceDtype::Fp32
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Also write a checkpoint every this many optimizer steps (0: only at epoch ends, at the end
    /// of training and on shutdown).
    #[serde(default)]
    pub every_steps: u64,
    /// Newest checkpoints kept; older ones are deleted.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Write checkpoints at all (off: none, not even at shutdown).
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every_steps: 0, keep: default_keep(), enabled: true }
    }
}

fn default_keep() -> usize {
    3
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelName {
    /// fc1..fcN with ReLU between; input flattened.
    Mlp,
    /// The reference CNN (two 5x5 conv + pool blocks, two linear layers) for 1x28x28 input.
    Cnn,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: ModelName,
    /// Hidden layer widths of the MLP.
    #[serde(default)]
    pub hidden: Vec<usize>,
    /// Start from these weights (safetensors with PyTorch names, e.g. from `model.state_dict()`).
    #[serde(default)]
    pub init_from: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// MNIST-style IDX files (`train-images-idx3-ubyte[.gz]` …) in `dir`.
    Idx,
    /// Generated in memory from `synthetic`; for tests and benchmarks.
    Synthetic,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub format: DataFormat,
    /// Folder holding the four IDX files (format: idx).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    #[serde(default)]
    pub synthetic: Option<SyntheticConfig>,
    /// Per-channel (mean, std) applied after scaling to [0, 1], as torchvision's Normalize.
    #[serde(default)]
    pub normalize: Option<[f32; 2]>,
    /// Batches the loader prepares ahead of the training step.
    #[serde(default = "default_prefetch")]
    pub prefetch_batches: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    pub train_samples: usize,
    pub test_samples: usize,
    /// Sample shape, e.g. [16] for vectors or [1, 28, 28] for images.
    pub shape: Vec<usize>,
    pub classes: usize,
    #[serde(default)]
    pub seed: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "one")]
    pub epochs: usize,
    /// Train for exactly this many optimizer steps in total, running as many epochs as that
    /// takes (overrides `epochs`, as in Hugging Face's Trainer).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Samples per worker per step (as DataLoader's batch_size under DDP).
    pub batch_size: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "yes")]
    pub shuffle: bool,
    #[serde(default)]
    pub drop_last: bool,
    #[serde(default = "default_log_every")]
    pub log_every_steps: u64,
    /// Intra-op threads per worker; default: OMP_NUM_THREADS, else cores / local workers.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Evaluate on the test set at the end of each epoch.
    #[serde(default = "yes")]
    pub eval: bool,
    /// `fp32`, or `bf16` autocast on CUDA.
    #[serde(default = "default_precision")]
    pub precision: Precision,
    /// Write a Chrome-trace timeline per rank to trace/rankN.json.
    #[serde(default)]
    pub trace: bool,
    /// Micro-batches per optimizer step: gradients accumulate locally and only the last
    /// micro-batch's backward communicates (DDP's `no_sync()`); the loss is scaled by 1/N.
    #[serde(default = "one_u64")]
    pub grad_accum_steps: u64,
    /// Clip gradients to this global L2 norm after the all-reduce (`clip_grad_norm_` under DDP).
    #[serde(default)]
    pub clip_grad_norm: Option<f64>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerName {
    Sgd,
    Adam,
    /// Adam with decoupled weight decay (torch.optim.AdamW).
    Adamw,
}

/// The learning rate as a function of the optimizer step (0-based, as nanoGPT's `iter_num`), so a
/// resumed run continues the same curve.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleConfig {
    /// `optimizer.lr` throughout.
    Constant,
    /// torch.optim.lr_scheduler.StepLR: lr · gamma^⌊step / step_size⌋.
    Step { step_size: u64, gamma: f64 },
    /// nanoGPT's `get_lr`: linear warmup over `warmup_steps`, cosine decay to `min_lr` at
    /// `decay_steps`, `min_lr` after.
    WarmupCosine { warmup_steps: u64, decay_steps: u64, min_lr: f64 },
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig::Constant
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    pub name: OptimizerName,
    pub lr: f64,
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub dampening: f64,
    #[serde(default)]
    pub nesterov: bool,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Apply `weight_decay` to 1-d parameters too (biases, norm weights), as PyTorch does for
    /// `model.parameters()`. `false`: only tensors of 2+ dimensions decay, nanoGPT's
    /// `configure_optimizers` groups.
    #[serde(default = "yes")]
    pub weight_decay_1d: bool,
    #[serde(default)]
    pub schedule: ScheduleConfig,
}

impl OptimizerConfig {
    /// PyTorch's defaults for `name` with learning rate `lr` (AdamW: weight_decay 0.01, as
    /// torch.optim.AdamW).
    pub fn new(name: OptimizerName, lr: f64) -> Self {
        OptimizerConfig {
            name,
            lr,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: if name == OptimizerName::Adamw { 0.01 } else { 0.0 },
            betas: default_betas(),
            eps: default_eps(),
            weight_decay_1d: true,
            schedule: ScheduleConfig::Constant,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DdpConfig {
    /// Bucket size cap in MiB (PyTorch's bucket_cap_mb).
    #[serde(default = "default_bucket_cap")]
    pub bucket_cap_mb: f64,
    /// Cap of the first bucket (the last layers' gradients, ready first), as PyTorch does.
    #[serde(default = "default_first_bucket_cap")]
    pub first_bucket_cap_mb: f64,
    /// Dtype gradients are all-reduced in: fp32, or bf16 (NCCL only).
    #[serde(default = "default_reduce_dtype")]
    pub reduce_dtype: ReduceDtype,
    /// All-reduce each bucket during backward, as soon as its gradients are ready (ring backend).
    #[serde(default = "yes")]
    pub overlap: bool,
    /// Broadcast rank 0's buffers (e.g. BatchNorm running statistics) before every forward, as
    /// DDP's `broadcast_buffers=True`.
    #[serde(default = "yes")]
    pub broadcast_buffers: bool,
}

impl Default for DdpConfig {
    fn default() -> Self {
        Self {
            bucket_cap_mb: default_bucket_cap(),
            first_bucket_cap_mb: default_first_bucket_cap(),
            reduce_dtype: default_reduce_dtype(),
            overlap: true,
            broadcast_buffers: true,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// MPI when started by mpirun (and built with MPI), else the ring.
    Auto,
    /// Built-in TCP ring.
    Ring,
    /// MPI collectives (needs an MPI launcher and the `mpi` feature).
    Mpi,
    /// NCCL on CUDA devices (`auto` picks it when the device is cuda).
    Nccl,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommConfig {
    #[serde(default = "default_backend")]
    pub backend: Backend,
    /// Bound on every store wait and collective; a rank that does not answer within it is named
    /// in the error.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Ring links between ranks on the same node: `shm`, `unix` sockets, or `tcp` like links
    /// between nodes.
    #[serde(default = "default_local_transport")]
    pub local_transport: LocalTransport,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LocalTransport {
    /// Shared-memory rings (set up over Unix sockets).
    Shm,
    Unix,
    Tcp,
}

fn default_local_transport() -> LocalTransport {
    LocalTransport::Shm
}

impl Default for CommConfig {
    fn default() -> Self {
        Self { backend: default_backend(), timeout_secs: default_timeout(), local_transport: default_local_transport() }
    }
}

fn one() -> usize {
    1
}
fn one_u64() -> u64 {
    1
}
fn yes() -> bool {
    true
}
fn default_prefetch() -> usize {
    4
}
fn default_log_every() -> u64 {
    50
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_bucket_cap() -> f64 {
    25.0
}
fn default_first_bucket_cap() -> f64 {
    1.0
}
fn default_backend() -> Backend {
    Backend::Auto
}
fn default_timeout() -> u64 {
    300
}

impl Config {
    /// Reads `path`, applies `overrides` (`a.b.c=value`, value parsed as YAML), parses and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
        Self::parse(&text, &shown, overrides)
    }

    /// As `load`, from text; `name` is what errors call the file.
    pub fn parse(text: &str, name: &str, overrides: &[String]) -> Result<Config, ConfigError> {
        let invalid = |msg: String| ConfigError::Invalid { path: name.to_string(), msg };
        let mut value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            invalid(if path == "." { inner } else { format!("{path}: {inner}") })
        })?;
        cfg.validate().map_err(invalid)?;
        Ok(cfg)
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("config serialises")
    }

    /// Checks what serde cannot; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let t = &self.train;
        if t.batch_size == 0 {
            return Err("train.batch_size must be at least 1".into());
        }
        if t.epochs == 0 && t.max_steps.is_none() {
            return Err("train.epochs must be at least 1 (or set train.max_steps)".into());
        }
        if t.max_steps == Some(0) {
            return Err("train.max_steps must be at least 1".into());
        }
        if t.log_every_steps == 0 {
            return Err("train.log_every_steps must be at least 1".into());
        }
        if t.grad_accum_steps == 0 {
            return Err("train.grad_accum_steps must be at least 1".into());
        }
        if let Some(c) = t.clip_grad_norm {
            if !(c > 0.0 && c.is_finite()) {
                return Err(format!("train.clip_grad_norm must be a positive number, got {c}"));
            }
        }
        if t.threads == Some(0) {
            return Err("train.threads must be at least 1".into());
        }
        let o = &self.optimizer;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return Err(format!("optimizer.lr must be a positive number, got {}", o.lr));
        }
        if !(0.0..1.0).contains(&o.momentum) && o.momentum != 0.0 {
            return Err(format!("optimizer.momentum must be in [0, 1), got {}", o.momentum));
        }
        if o.weight_decay < 0.0 {
            return Err(format!("optimizer.weight_decay must be >= 0, got {}", o.weight_decay));
        }
        if o.nesterov && (o.momentum == 0.0 || o.dampening != 0.0) {
            return Err("optimizer.nesterov needs momentum > 0 and dampening = 0".into());
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(format!("optimizer.betas must be in [0, 1), got {:?}", o.betas));
        }
        match o.schedule {
            ScheduleConfig::Constant => {}
            ScheduleConfig::Step { step_size, gamma } => {
                if step_size == 0 {
                    return Err("optimizer.schedule.step_size must be at least 1".into());
                }
                if !(gamma > 0.0 && gamma.is_finite()) {
                    return Err(format!("optimizer.schedule.gamma must be a positive number, got {gamma}"));
                }
            }
            ScheduleConfig::WarmupCosine { warmup_steps, decay_steps, min_lr } => {
                if decay_steps <= warmup_steps {
                    return Err(format!(
                        "optimizer.schedule.decay_steps ({decay_steps}) must be greater than warmup_steps ({warmup_steps})"
                    ));
                }
                if !(min_lr >= 0.0 && min_lr <= o.lr) {
                    return Err(format!("optimizer.schedule.min_lr must be in [0, optimizer.lr], got {min_lr}"));
                }
            }
        }
        if !(self.ddp.bucket_cap_mb > 0.0 && self.ddp.first_bucket_cap_mb > 0.0) {
            return Err("ddp.bucket_cap_mb and ddp.first_bucket_cap_mb must be positive".into());
        }
        if self.train.precision == Precision::Bf16 && self.device == DeviceChoice::Cpu {
            return Err("train.precision bf16 needs device cuda (or auto): autocast here is CUDA-only".into());
        }
        if self.comm.backend == Backend::Nccl && self.device == DeviceChoice::Cpu {
            return Err("comm.backend nccl needs device cuda (or auto)".into());
        }
        if self.ddp.reduce_dtype == ReduceDtype::Bf16 && !matches!(self.comm.backend, Backend::Nccl | Backend::Auto) {
            return Err("ddp.reduce_dtype bf16 needs comm.backend nccl".into());
        }
        if self.checkpoint.keep == 0 {
            return Err("checkpoint.keep must be at least 1".into());
        }
        if self.comm.timeout_secs == 0 {
            return Err("comm.timeout_secs must be at least 1".into());
        }
        match self.model.name {
            ModelName::Mlp if self.model.hidden.contains(&0) => return Err("model.hidden: layer widths must be at least 1".into()),
            ModelName::Cnn if !self.model.hidden.is_empty() => {
                return Err("model.hidden applies to the mlp only; the cnn's layers are fixed".into())
            }
            _ => {}
        }
        match self.data.format {
            DataFormat::Idx => {
                if self.data.dir.is_none() {
                    return Err("data.dir is required when data.format is idx".into());
                }
            }
            DataFormat::Synthetic => {
                let Some(s) = &self.data.synthetic else {
                    return Err("data.synthetic is required when data.format is synthetic".into());
                };
                if s.train_samples == 0 {
                    return Err("data.synthetic.train_samples must be at least 1".into());
                }
                if s.classes < 2 {
                    return Err("data.synthetic.classes must be at least 2".into());
                }
                if s.shape.is_empty() || s.shape.contains(&0) {
                    return Err("data.synthetic.shape must be non-empty with positive sizes".into());
                }
            }
        }
        if self.model.name == ModelName::Cnn {
            let shape_ok = match self.data.format {
                DataFormat::Idx => true,
                DataFormat::Synthetic => self.data.synthetic.as_ref().is_some_and(|s| s.shape == [1, 28, 28]),
            };
            if !shape_ok {
                return Err("model cnn needs 1x28x28 samples (data.synthetic.shape: [1, 28, 28])".into());
            }
        }
        if let Some([_, std]) = self.data.normalize {
            if !(std > 0.0 && std.is_finite()) {
                return Err(format!("data.normalize: std must be positive, got {std}"));
            }
        }
        if self.data.prefetch_batches == 0 {
            return Err("data.prefetch_batches must be at least 1".into());
        }
        Ok(())
    }
}

/// Applies `a.b.c=value` to a YAML tree, creating missing mappings on the way.
fn apply_override(root: &mut serde_yaml::Value, arg: &str) -> Result<(), ConfigError> {
    let err = |msg: &str| ConfigError::Override { arg: arg.to_string(), msg: msg.to_string() };
    let (path, raw) = arg.split_once('=').ok_or_else(|| err("expected KEY=VALUE, e.g. train.epochs=2"))?;
    let value: serde_yaml::Value = serde_yaml::from_str(raw).map_err(|e| err(&format!("value: {e}")))?;
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(err("empty key segment"));
    }
    let mut node = root;
    for (i, k) in keys.iter().enumerate() {
        if node.is_null() {
            *node = serde_yaml::Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().ok_or_else(|| err(&format!("`{}` is not a section", keys[..i].join("."))))?;
        let key = serde_yaml::Value::String(k.to_string());
        if i + 1 == keys.len() {
            map.insert(key, value);
            return Ok(());
        }
        node = map.entry(key).or_insert(serde_yaml::Value::Null);
    }
    unreachable!("loop returns at the last key")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "
model: {name: mlp, hidden: [8]}
data: {format: synthetic, synthetic: {train_samples: 10, test_samples: 4, shape: [4], classes: 3}}
train: {batch_size: 2}
optimizer: {name: sgd, lr: 0.1}
";

    fn parse(text: &str, over: &[&str]) -> Result<Config, ConfigError> {
        Config::parse(text, "x.yaml", &over.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn defaults_fill_in() {
        let c = parse(BASE, &[]).unwrap();
        assert_eq!(c.train.epochs, 1);
        assert!(c.train.shuffle);
        assert_eq!(c.ddp.bucket_cap_mb, 25.0);
        assert_eq!(c.comm.timeout_secs, 300);
    }

    #[test]
    fn unknown_key_names_file_and_field() {
        let e = parse(&BASE.replace("batch_size: 2", "batch_size: 2, epochz: 3"), &[]).unwrap_err().to_string();
        assert!(e.contains("x.yaml") && e.contains("epochz"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        for (over, field) in [
            ("train.batch_size=0", "train.batch_size"),
            ("optimizer.lr=-1", "optimizer.lr"),
            ("optimizer.momentum=1.5", "optimizer.momentum"),
            ("data.format=idx", "data.dir"),
            ("comm.timeout_secs=0", "comm.timeout_secs"),
            ("model={name: cnn}", "1x28x28"),
        ] {
            let e = parse(BASE, &[over]).unwrap_err().to_string();
            assert!(e.contains(field), "{over}: {e}");
        }
        let e = parse(BASE, &["train.batch_size=many"]).unwrap_err().to_string();
        assert!(e.contains("batch_size"), "{e}");
    }

    #[test]
    fn overrides_apply_and_create_sections() {
        let c = parse(BASE, &["train.epochs=3", "ddp.bucket_cap_mb=0.5", "optimizer.name=adam"]).unwrap();
        assert_eq!(c.train.epochs, 3);
        assert_eq!(c.ddp.bucket_cap_mb, 0.5);
        assert_eq!(c.optimizer.name, OptimizerName::Adam);
        assert!(parse(BASE, &["nonsense"]).is_err());
        assert!(parse(BASE, &["train.batch_size.x=1"]).is_err());
    }

    #[test]
    fn resolved_config_roundtrips() {
        let c = parse(BASE, &[]).unwrap();
        let again = Config::parse(&c.to_yaml(), "resolved", &[]).unwrap();
        assert_eq!(again.to_yaml(), c.to_yaml());
    }
}
