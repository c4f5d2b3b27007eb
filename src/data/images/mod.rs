//! Image data: CIFAR binaries and ImageFolder trees (and IDX images when transforms are asked
//! for), decoded and transformed per sample as torchvision does, inside the loader's threads.

pub mod cifar;
pub mod folder;
pub mod transforms;

use super::{Batch, DataError, Dataset, Splits};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tch::Tensor;
use transforms::{Img, SampleRng, Transform};

/// What an image that cannot be decoded does.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CorruptImages {
    /// Stop with an error naming the file.
    #[default]
    Error,
    /// Leave it (and its label) out of its batch, count it, and report the count.
    Skip,
}

/// Transform pipelines, per split (torchvision's `transforms.Compose` lists).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransformsConfig {
    #[serde(default)]
    pub train: Vec<Transform>,
    #[serde(default)]
    pub test: Vec<Transform>,
}

/// Checks an image format's `transforms` and `normalize` keys for images of `channels`.
pub fn check_pipeline(transforms: Option<&TransformsConfig>, normalize: Option<[f32; 2]>, channels: usize) -> Result<(), String> {
    if let Some([_, std]) = normalize {
        if !(std > 0.0 && std.is_finite()) {
            return Err(format!("data.normalize: std must be positive, got {std}"));
        }
    }
    let Some(t) = transforms else { return Ok(()) };
    if normalize.is_some() {
        return Err("data.normalize and data.transforms both given: put normalize in the transforms".into());
    }
    for (split, p) in [("train", &t.train), ("test", &t.test)] {
        transforms::validate(p, Some(channels)).map_err(|e| format!("data.transforms.{split}: {e}"))?;
    }
    Ok(())
}

/// The transform pipelines for (train, test): the configured ones, else only `normalize`.
fn pipelines(transforms: Option<&TransformsConfig>, normalize: Option<[f32; 2]>) -> (Vec<Transform>, Vec<Transform>) {
    match transforms {
        Some(t) => (t.train.clone(), t.test.clone()),
        None => {
            let p: Vec<Transform> = normalize.iter().map(|[m, s]| Transform::Normalize { mean: vec![*m], std: vec![*s] }).collect();
            (p.clone(), p)
        }
    }
}

/// An image format's splits as they come from the files: sources, labels and how to treat them.
pub struct Images {
    pub train: (Source, Vec<i64>),
    pub test: (Source, Vec<i64>),
    pub classes: usize,
    pub transforms: Option<TransformsConfig>,
    pub normalize: Option<[f32; 2]>,
    pub corrupt: CorruptImages,
}

/// Image splits with their pipelines; the sample shape from the test pipeline (deterministic).
/// `seed`: random transforms draw from (seed, epoch, sample index).
pub fn splits(images: Images, seed: u64) -> Result<Splits, DataError> {
    let Images { train, test, classes, transforms, normalize, corrupt } = images;
    let (train_p, test_p) = pipelines(transforms.as_ref(), normalize);
    let train = ImageSet::new(train.0, train.1, classes, train_p, seed, corrupt);
    let test = ImageSet::new(test.0, test.1, classes, test_p, seed, corrupt);
    let (a, b) = (train.sample_shape()?, test.sample_shape()?);
    if a != b {
        return Err(DataError::Invalid(format!(
            "data.transforms: train samples come out {a:?} but test samples {b:?}; the model needs one shape (crop both to one size)"
        )));
    }
    Ok(Splits { train: Arc::new(train), test: Arc::new(test), sample_shape: a, classes, may_skip: corrupt == CorruptImages::Skip })
}

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
