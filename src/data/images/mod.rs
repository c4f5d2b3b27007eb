//! Image data: CIFAR binaries and ImageFolder trees (and IDX images when transforms are asked
//! for), decoded and transformed per sample as torchvision does, inside the loader's threads.

pub mod cifar;
pub mod folder;
pub mod transforms;

use super::{Batch, DataError, Dataset};
use crate::config::CorruptImages;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tch::Tensor;
use transforms::{Img, SampleRng, Transform};

/// Where the 8-bit images come from.
pub enum Source {
    /// Held in memory, all c × h × w (CIFAR, IDX).
    Arrays { pixels: Vec<u8>, c: usize, h: usize, w: usize },
    /// Files decoded when a batch needs them (ImageFolder).
    Files(Vec<PathBuf>),
}

/// A labelled image set with a transform pipeline.
pub struct ImageSet {
    pub source: Source,
    pub labels: Vec<i64>,
    pub classes: usize,
    pub pipeline: Vec<Transform>,
    pub seed: u64,
    pub corrupt: CorruptImages,
    skipped: AtomicU64,
    first_skipped: Mutex<Option<String>>,
}

impl ImageSet {
    pub fn new(source: Source, labels: Vec<i64>, classes: usize, pipeline: Vec<Transform>, seed: u64, corrupt: CorruptImages) -> Self {
        ImageSet { source, labels, classes, pipeline, seed, corrupt, skipped: AtomicU64::new(0), first_skipped: Mutex::new(None) }
    }

    /// The 8-bit image of sample `i`, or why it cannot be read (files only).
    fn image(&self, i: usize) -> Result<Img, (PathBuf, String)> {
        match &self.source {
            Source::Arrays { pixels, c, h, w } => {
                let n = c * h * w;
                Ok(Img { c: *c, h: *h, w: *w, data: pixels[i * n..(i + 1) * n].to_vec() })
            }
            Source::Files(paths) => folder::decode(&paths[i]).map_err(|e| (paths[i].clone(), e)),
        }
    }

    /// Sample `i` after the pipeline, for `epoch`: values and (c, h, w).
    pub fn sample(&self, i: usize, epoch: u64) -> Result<Option<(Vec<f32>, [usize; 3])>, DataError> {
        let img = match self.image(i) {
            Ok(img) => img,
            Err((path, why)) => {
                // One line: decoders' messages may span several.
                let why = why.split_whitespace().collect::<Vec<_>>().join(" ");
                let what = format!("{}: unreadable image (sample {i}): {why}", path.display());
                return match self.corrupt {
                    CorruptImages::Error => Err(DataError::Invalid(format!("{what} (data.corrupt_images: skip would skip it)"))),
                    CorruptImages::Skip => {
                        self.skipped.fetch_add(1, Ordering::Relaxed);
                        self.first_skipped.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(what);
                        Ok(None)
                    }
                };
            }
        };
        let mut rng = SampleRng::new(self.seed, epoch, i as u64);
        Ok(Some(transforms::apply(&self.pipeline, img, &mut rng)))
    }

    /// The shape of a transformed sample (from sample 0, evaluation of the pipeline draws no
    /// state), for the model. Errors when no sample can be read.
    pub fn sample_shape(&self) -> Result<Vec<i64>, DataError> {
        for i in 0..self.labels.len().min(16) {
            if let Some((_, [c, h, w])) = self.sample(i, 0)? {
                return Ok(vec![c as i64, h as i64, w as i64]);
            }
        }
        Err(DataError::Invalid("none of the first images could be read".into()))
    }
}

impl Dataset for ImageSet {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn batch(&self, indices: &[usize], epoch: u64) -> Result<Batch, DataError> {
        let mut x: Vec<f32> = vec![];
        let mut y = Vec::with_capacity(indices.len());
        let mut shape: Option<([usize; 3], usize)> = None;
        for &i in indices {
            if i >= self.labels.len() {
                return Err(DataError::Invalid(format!("sample index {i} is past the end ({} samples)", self.labels.len())));
            }
            // A skipped image drops its label with it: never a wrong pairing.
            let Some((values, s)) = self.sample(i, epoch)? else { continue };
            match shape {
                None => shape = Some((s, i)),
                Some((first, j)) if first != s => {
                    return Err(DataError::Invalid(format!(
                        "samples {j} and {i} have shapes {first:?} and {s:?} after the transforms: images of one batch must \
                         match (add resize and center_crop to data.transforms){}",
                        match &self.source {
                            Source::Files(p) => format!(" ({} and {})", p[j].display(), p[i].display()),
                            _ => String::new(),
                        }
                    )))
                }
                _ => {}
            }
            x.extend_from_slice(&values);
            y.push(self.labels[i]);
        }
        let Some(([c, h, w], _)) = shape else {
            return Err(DataError::Invalid(format!("every image of a batch was unreadable (samples {indices:?})")));
        };
        let input = Tensor::f_from_slice(&x)
            .and_then(|t| t.f_view([y.len() as i64, c as i64, h as i64, w as i64]))
            .map_err(|e| DataError::Invalid(e.to_string()))?;
        let target = Tensor::f_from_slice(&y).map_err(|e| DataError::Invalid(e.to_string()))?;
        Ok(Batch { input, target, len: y.len() })
    }

    fn skipped(&self) -> (u64, Option<String>) {
        (self.skipped.load(Ordering::Relaxed), self.first_skipped.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}
