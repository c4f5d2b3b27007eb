//! Data: datasets in memory, the distributed sampler, and the prefetching loader.

pub mod idx;
pub mod loader;
pub mod sampler;
pub mod synthetic;

pub use loader::{Batch, Loader};
pub use sampler::DistributedSampler;

use crate::config::{DataConfig, DataFormat};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {what}")]
    Idx { path: String, what: String },
    #[error("data: {0}")]
    Invalid(String),
}

/// Sample values: IDX images stay as bytes (scaled by 1/255 per batch, as torchvision's ToTensor
/// does) so a worker holds 47 MB for Fashion-MNIST rather than 188 MB.
pub enum Pixels {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

/// A labelled dataset held in memory, shared read-only with the loader thread.
pub struct Dataset {
    pub pixels: Pixels,
    pub labels: Vec<i64>,
    /// Shape of one sample, e.g. [1, 28, 28].
    pub sample_shape: Vec<i64>,
    pub classes: usize,
    /// (mean, std) applied to every value after scaling.
    pub normalize: Option<[f32; 2]>,
}

impl Dataset {
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

/// Train and test splits.
pub struct Splits {
    pub train: Arc<Dataset>,
    pub test: Arc<Dataset>,
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

pub fn load(cfg: &DataConfig) -> Result<Splits, DataError> {
    match cfg.format {
        DataFormat::Idx => {
            let dir = cfg.dir.as_deref().expect("validated: idx has a dir");
            let split = |images: &str, labels: &str| -> Result<Arc<Dataset>, DataError> {
                let mut d = idx::load_pair(&find_file(dir, images)?, &find_file(dir, labels)?)?;
                d.normalize = cfg.normalize;
                Ok(Arc::new(d))
            };
            Ok(Splits {
                train: split("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?,
                test: split("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?,
            })
        }
        DataFormat::Synthetic => {
            let s = cfg.synthetic.as_ref().expect("validated: synthetic has its section");
            let split = |which| {
                let mut d = synthetic::generate(s, which);
                d.normalize = cfg.normalize;
                Arc::new(d)
            };
            Ok(Splits { train: split(0), test: split(1) })
        }
    }
}
