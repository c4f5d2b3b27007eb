//! Data: the `Dataset` seam (a length and a way to make a batch from sample indices), the
//! in-memory labelled arrays behind IDX and synthetic data, the distributed sampler, and the
//! prefetching loader. A new format is one file here implementing `Dataset`.

pub mod boxes;
pub mod idx;
pub mod images;
pub mod loader;
pub mod mosaic;
pub mod prepare;
pub mod sampler;
pub mod splitmix;
pub mod synthetic;
pub mod tokens;
pub mod views;
pub mod yolo;

/// The built-in data formats. A new format is one file in this folder (its config keys, checks and
/// loader: a `DataSpec`) and one entry here; a program using the library calls
/// `FORMATS.register` instead.
fn builtin() -> Vec<DataKind> {
    vec![idx::KIND, synthetic::KIND, tokens::KIND, images::cifar::KIND, images::folder::KIND, mosaic::KIND, yolo::KIND]
}

pub use loader::{Batch, Loader};
pub use sampler::DistributedSampler;

use crate::registry::{self, Named, Registry, Spec};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::sync::Arc;
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {what}")]
    Idx { path: String, what: String },
    #[error("data: {0}")]
    Invalid(String),
    #[error("data: the loader thread: {0}")]
    Loader(String),
}

/// Sample values: IDX images stay as bytes (scaled by 1/255 per batch, as torchvision's ToTensor
/// does) so a worker holds 47 MB for Fashion-MNIST rather than 188 MB.
pub enum Pixels {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

/// What the training loop needs from a data set: its size, and a batch made from any sample
/// indices. Shared read-only with the loader thread.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The samples `indices`, in that order, as one batch. `epoch` is there for random
    /// transforms, which must draw from (seed, epoch, sample index) so a resumed run sees the
    /// same samples.
    fn batch(&self, indices: &[usize], epoch: u64) -> Result<Batch, DataError>;
    /// Samples left out because they could not be read (`data.corrupt_images: skip`) so far, and
    /// the first one's description.
    fn skipped(&self) -> (u64, Option<String>) {
        (0, None)
    }
}

/// A labelled dataset held in memory: IDX and synthetic data.
pub struct ArrayDataset {
    pub pixels: Pixels,
    pub labels: Vec<i64>,
    /// Shape of one sample, e.g. [1, 28, 28].
    pub sample_shape: Vec<i64>,
    pub classes: usize,
    /// (mean, std) applied to every value after scaling.
    pub normalize: Option<[f32; 2]>,
}

impl Dataset for ArrayDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn batch(&self, indices: &[usize], _epoch: u64) -> Result<Batch, DataError> {
        let k = self.sample_numel();
        let mut x = vec![0f32; indices.len() * k];
        let mut y = Vec::with_capacity(indices.len());
        for (j, &i) in indices.iter().enumerate() {
            if i >= self.labels.len() {
                return Err(DataError::Invalid(format!("sample index {i} is past the end ({} samples)", self.labels.len())));
            }
            self.write_sample(i, &mut x[j * k..(j + 1) * k]);
            y.push(self.labels[i]);
        }
        let mut shape = vec![indices.len() as i64];
        shape.extend_from_slice(&self.sample_shape);
        let input = Tensor::f_from_slice(&x).and_then(|t| t.f_view(shape.as_slice())).map_err(|e| DataError::Invalid(e.to_string()))?;
        let target = Tensor::f_from_slice(&y).map_err(|e| DataError::Invalid(e.to_string()))?;
        Ok(Batch { input, target, len: indices.len() })
    }
}

impl ArrayDataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn sample_numel(&self) -> usize {
        self.sample_shape.iter().product::<i64>() as usize
    }

    /// Writes sample `i` as f32 into `out` (length `sample_numel`).
    pub fn write_sample(&self, i: usize, out: &mut [f32]) {
        let k = self.sample_numel();
        match &self.pixels {
            Pixels::U8(v) => {
                for (o, &b) in out.iter_mut().zip(&v[i * k..(i + 1) * k]) {
                    *o = b as f32 / 255.0;
                }
            }
            Pixels::F32(v) => out.copy_from_slice(&v[i * k..(i + 1) * k]),
        }
        if let Some([mean, std]) = self.normalize {
            for o in out.iter_mut() {
                *o = (*o - mean) / std;
            }
        }
    }
}

/// Train and test splits, and what the model must fit.
pub struct Splits {
    pub train: Arc<dyn Dataset>,
    pub test: Arc<dyn Dataset>,
    /// Shape of one input sample, e.g. [1, 28, 28].
    pub sample_shape: Vec<i64>,
    /// Classes of a classification data set (the vocabulary of token data).
    pub classes: usize,
    /// Whether unreadable samples may be left out (`corrupt_images: skip`): every rank then
    /// counts them at each epoch's end, so the count is never silent.
    pub may_skip: bool,
}

impl Splits {
    /// Two in-memory splits (IDX, synthetic).
    pub fn arrays(train: ArrayDataset, test: ArrayDataset) -> Splits {
        Splits {
            sample_shape: train.sample_shape.clone(),
            classes: train.classes.max(test.classes),
            train: Arc::new(train),
            test: Arc::new(test),
            may_skip: false,
        }
    }
}

/// What a data format's samples are, which decides what a model can do with them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Samples {
    /// Inputs with a class label each.
    Labelled,
    /// Windows of token ids, each position's target the next token.
    Tokens,
    /// Images with a variable number of boxes each (`[batch, most, 5]` rows of class and box,
    /// padded with class -1): detection.
    Boxes,
}

/// What loading needs from outside the data section.
pub struct LoadContext {
    /// The model's context length: the window of token data (`None` for models without one).
    pub context_length: Option<usize>,
    /// Random transforms draw from (seed, epoch, sample index).
    pub seed: u64,
}

/// A data format's parsed keys: its checks and its loader.
pub trait DataSpec: Spec {
    fn samples(&self) -> Samples {
        Samples::Labelled
    }
    /// The shape of one sample where the keys alone tell (synthetic data), so a model can refuse
    /// the config before anything loads.
    fn sample_shape(&self) -> Option<Vec<i64>> {
        None
    }
    /// Checks what serde cannot; the message names the key (`data.dir is required …`).
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
    fn load(&self, ctx: &LoadContext) -> Result<Splits, DataError>;
}

/// A data format the config can name: `data.format` and the parser of its keys.
#[derive(Clone, Copy)]
pub struct DataKind {
    pub name: &'static str,
    pub parse: fn(serde_yaml::Mapping) -> Result<Box<dyn DataSpec>, String>,
}

impl DataKind {
    /// The format `name` whose keys deserialise into `T`.
    pub const fn of<T: DataSpec + DeserializeOwned>(name: &'static str) -> DataKind {
        DataKind { name, parse: parse_as::<T> }
    }
}

fn parse_as<T: DataSpec + DeserializeOwned>(keys: serde_yaml::Mapping) -> Result<Box<dyn DataSpec>, String> {
    Ok(Box::new(registry::parse::<T>(keys)?))
}

impl Named for DataKind {
    fn name(&self) -> &'static str {
        self.name
    }
}

/// Every data format, by `data.format`.
pub static FORMATS: Registry<DataKind> = Registry::new("data format", builtin);

/// The `data:` section: the format, the loader's keys every format shares, and the format's own.
#[derive(Clone, Debug)]
pub struct DataConfig {
    pub format: String,
    /// Batches the loader prepares ahead of the training step.
    pub prefetch_batches: usize,
    /// Loader threads decoding and transforming batches (DataLoader's `num_workers`); batches
    /// still arrive in sampler order.
    pub workers: usize,
    pub spec: Arc<dyn DataSpec>,
}

impl DataConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.prefetch_batches == 0 {
            return Err("data.prefetch_batches must be at least 1".into());
        }
        if self.workers == 0 {
            return Err("data.workers must be at least 1 (loader threads)".into());
        }
        self.spec.validate()
    }

    pub fn samples(&self) -> Samples {
        self.spec.samples()
    }
}

impl<'de> Deserialize<'de> for DataConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut keys = serde_yaml::Mapping::deserialize(d)?;
        let format: String =
            registry::take(&mut keys, "format").map_err(D::Error::custom)?.ok_or_else(|| D::Error::missing_field("format"))?;
        let kind = FORMATS.get(&format).map_err(D::Error::custom)?;
        let prefetch_batches = registry::take(&mut keys, "prefetch_batches").map_err(D::Error::custom)?.unwrap_or(4);
        let workers = registry::take(&mut keys, "workers").map_err(D::Error::custom)?.unwrap_or(1);
        let spec = (kind.parse)(keys).map_err(D::Error::custom)?;
        Ok(DataConfig { format, prefetch_batches, workers, spec: spec.into() })
    }
}

impl Serialize for DataConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut shared = serde_yaml::Mapping::new();
        shared.insert("format".into(), self.format.clone().into());
        shared.insert("prefetch_batches".into(), (self.prefetch_batches as u64).into());
        shared.insert("workers".into(), (self.workers as u64).into());
        registry::merged(shared, self.spec.to_value()).serialize(s)
    }
}

/// Loads the configured data.
pub fn load(cfg: &DataConfig, ctx: &LoadContext) -> Result<Splits, DataError> {
    cfg.spec.load(ctx)
}
