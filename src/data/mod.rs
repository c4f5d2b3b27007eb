//! Data: the `Dataset` seam (a length and a way to make a batch from sample indices), the
//! in-memory labelled arrays behind IDX and synthetic data, the distributed sampler, and the
//! prefetching loader. A new format is one file here implementing `Dataset`.

pub mod idx;
pub mod images;
pub mod loader;
pub mod prepare;
pub mod sampler;
pub mod synthetic;
pub mod tokens;

pub use loader::{Batch, Loader};
pub use sampler::DistributedSampler;

use crate::config::{DataConfig, DataFormat};
use images::transforms::Transform;
use images::{ImageSet, Source};
use std::path::{Path, PathBuf};
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
    /// Classes of a classification data set.
    pub classes: usize,
}

/// Finds `name` or `name.gz` in `dir`.
fn find_file(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    for candidate in [dir.join(format!("{name}.gz")), dir.join(name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(DataError::Invalid(format!(
        "{}: neither {name} nor {name}.gz found (Fashion-MNIST on Debian: apt-get install dataset-fashion-mnist)",
        dir.display()
    )))
}

fn arrays(train: ArrayDataset, test: ArrayDataset) -> Splits {
    Splits {
        sample_shape: train.sample_shape.clone(),
        classes: train.classes.max(test.classes),
        train: Arc::new(train),
        test: Arc::new(test),
    }
}

/// The transform pipelines for (train, test): the configured ones, else only `data.normalize`.
fn pipelines(cfg: &DataConfig) -> (Vec<Transform>, Vec<Transform>) {
    match &cfg.transforms {
        Some(t) => (t.train.clone(), t.test.clone()),
        None => {
            let p: Vec<Transform> = cfg.normalize.iter().map(|[m, s]| Transform::Normalize { mean: vec![*m], std: vec![*s] }).collect();
            (p.clone(), p)
        }
    }
}

/// Image splits with their pipelines; the sample shape from the test pipeline (deterministic).
fn image_splits(
    cfg: &DataConfig,
    seed: u64,
    train: (Source, Vec<i64>),
    test: (Source, Vec<i64>),
    classes: usize,
) -> Result<Splits, DataError> {
    let (train_p, test_p) = pipelines(cfg);
    let train = ImageSet::new(train.0, train.1, classes, train_p, seed, cfg.corrupt_images);
    let test = ImageSet::new(test.0, test.1, classes, test_p, seed, cfg.corrupt_images);
    let (a, b) = (train.sample_shape()?, test.sample_shape()?);
    if a != b {
        return Err(DataError::Invalid(format!(
            "data.transforms: train samples come out {a:?} but test samples {b:?}; the model needs one shape (crop both to one size)"
        )));
    }
    Ok(Splits { train: Arc::new(train), test: Arc::new(test), sample_shape: a, classes })
}

/// Loads the configured data. `block`: the model's context length (windows of token data);
/// `seed`: random transforms draw from (seed, epoch, sample index).
pub fn load(cfg: &DataConfig, block: usize, seed: u64) -> Result<Splits, DataError> {
    match cfg.format {
        DataFormat::Tokens => {
            let dir = cfg.dir.as_deref().expect("validated: tokens has a dir");
            if !dir.join("train.bin").exists() && !cfg.prepare_from.is_empty() {
                let p = prepare::prepare_text(&cfg.prepare_from, dir)?;
                tracing::info!(
                    "prepared {} from {} text file(s): {} train, {} val tokens",
                    dir.display(),
                    p.files.len(),
                    p.train_tokens,
                    p.val_tokens
                );
            }
            let file = |name: &str| -> Result<tokens::TokenFile, DataError> {
                let p = dir.join(name);
                if !p.exists() {
                    return Err(DataError::Invalid(format!(
                        "{}: no {name} (make it with `ringtrain prepare-text --input TEXT --out {}`, or set data.prepare_from)",
                        dir.display(),
                        dir.display()
                    )));
                }
                tokens::TokenFile::open(&p)
            };
            // The token files first: a folder with none is told how to make them.
            let train = file("train.bin")?;
            let vocab = tokens::vocab_size(dir)?;
            Ok(Splits {
                train: Arc::new(tokens::TokenWindows::all(train, block, vocab)?),
                test: Arc::new(tokens::TokenWindows::spread(file("val.bin")?, block, vocab, cfg.eval_windows)?),
                sample_shape: vec![block as i64],
                classes: vocab,
            })
        }
        DataFormat::Idx => {
            let dir = cfg.dir.as_deref().expect("validated: idx has a dir");
            let split = |images: &str, labels: &str| -> Result<ArrayDataset, DataError> {
                let mut d = idx::load_pair(&find_file(dir, images)?, &find_file(dir, labels)?, cfg.classes.unwrap_or(10))?;
                d.normalize = cfg.normalize;
                Ok(d)
            };
            let train = split("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
            let test = split("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
            if cfg.transforms.is_none() {
                return Ok(arrays(train, test));
            }
            // With transforms: the same bytes through the image pipeline.
            let source = |d: ArrayDataset| -> Result<(Source, Vec<i64>), DataError> {
                let [c, h, w] = d.sample_shape[..] else {
                    return Err(DataError::Invalid(format!("data.transforms need images; the IDX samples are {:?}", d.sample_shape)));
                };
                let Pixels::U8(pixels) = d.pixels else { unreachable!("IDX images are bytes") };
                Ok((Source::Arrays { pixels, c: c as usize, h: h as usize, w: w as usize }, d.labels))
            };
            let classes = train.classes.max(test.classes);
            image_splits(cfg, seed, source(train)?, source(test)?, classes)
        }
        DataFormat::Cifar => {
            let dir = cfg.dir.as_deref().expect("validated: cifar has a dir");
            let (train, test) = images::cifar::load(dir, cfg.cifar_coarse)?;
            let classes = train.classes;
            let arrays = |s: images::cifar::CifarSplit| (Source::Arrays { pixels: s.pixels, c: 3, h: 32, w: 32 }, s.labels);
            image_splits(cfg, seed, arrays(train), arrays(test), classes)
        }
        DataFormat::ImageFolder => image_folder(cfg, seed),
        DataFormat::Synthetic => {
            let s = cfg.synthetic.as_ref().expect("validated: synthetic has its section");
            let split = |which| {
                let mut d = synthetic::generate(s, which);
                d.normalize = cfg.normalize;
                d
            };
            Ok(arrays(split(0), split(1)))
        }
    }
}

/// ImageFolder's `train/` and `val/` (or `test/`) trees, with the same class folders.
fn image_folder(cfg: &DataConfig, seed: u64) -> Result<Splits, DataError> {
    let dir = cfg.dir.as_deref().expect("validated: image_folder has a dir");
    let (train_classes, train) = images::folder::scan(&dir.join("train"))?;
    let test_dir = ["val", "test"]
        .iter()
        .map(|s| dir.join(s))
        .find(|p| p.is_dir())
        .ok_or_else(|| DataError::Invalid(format!("{}: no val/ or test/ folder beside train/ for evaluation", dir.display())))?;
    let (test_classes, test) = images::folder::scan(&test_dir)?;
    // ImageFolder numbers each split's folders on its own: the same names or the labels differ.
    if test_classes != train_classes {
        return Err(DataError::Invalid(format!(
            "{}: class folders differ from train/'s ({} vs {}): the class numbers would not match",
            test_dir.display(),
            test_classes.len(),
            train_classes.len()
        )));
    }
    tracing::info!("image folder {}: {} classes, {} train and {} test images", dir.display(), train_classes.len(), train.len(), test.len());
    let files = |v: Vec<(PathBuf, i64)>| {
        let (paths, labels): (Vec<PathBuf>, Vec<i64>) = v.into_iter().unzip();
        (Source::Files(paths), labels)
    };
    image_splits(cfg, seed, files(train), files(test), train_classes.len())
}
