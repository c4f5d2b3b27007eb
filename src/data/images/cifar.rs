//! The CIFAR-10 and CIFAR-100 binary versions: records of a label byte (CIFAR-100: a coarse then
//! a fine label byte) followed by 3072 bytes, the 32×32 red, green and blue planes.
//! CIFAR-10: `data_batch_1.bin` … `data_batch_5.bin` and `test_batch.bin`;
//! CIFAR-100: `train.bin` and `test.bin`.

use super::super::{DataError, DataKind, DataSpec, LoadContext, Splits};
use super::{Images, Source, TransformsConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const KIND: DataKind = DataKind::of::<CifarSpec>("cifar");

/// `data: {format: cifar, dir: …}`: the CIFAR-10 / CIFAR-100 binary files in `dir`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CifarSpec {
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// CIFAR-100: train on the 20 coarse labels instead of the 100 fine ones.
    #[serde(default)]
    pub cifar_coarse: bool,
    /// (mean, std) applied to every channel after scaling to [0, 1] (without `transforms`).
    #[serde(default)]
    pub normalize: Option<[f32; 2]>,
    /// Image transforms per split.
    #[serde(default)]
    pub transforms: Option<TransformsConfig>,
}

impl DataSpec for CifarSpec {
    fn validate(&self) -> Result<(), String> {
        if self.dir.is_none() {
            return Err("data.dir is required when data.format is cifar".into());
        }
        super::check_pipeline(self.transforms.as_ref(), self.normalize, 3)
    }

    fn load(&self, ctx: &LoadContext) -> Result<Splits, DataError> {
        let dir = self.dir.as_deref().expect("validated: cifar has a dir");
        let (train, test) = load(dir, self.cifar_coarse)?;
        let classes = train.classes;
        let arrays = |s: CifarSplit| (Source::Arrays { pixels: s.pixels, c: 3, h: 32, w: 32 }, s.labels);
        let (train, test) = (arrays(train), arrays(test));
        let (transforms, normalize) = (self.transforms.clone(), self.normalize);
        super::splits(Images { train, test, classes, transforms, normalize, corrupt: Default::default() }, ctx.seed)
    }
}

pub const PIXELS: usize = 3 * 32 * 32;

/// One split: pixels (N × 3 × 32 × 32 bytes) and labels.
pub struct CifarSplit {
    pub pixels: Vec<u8>,
    pub labels: Vec<i64>,
    pub classes: usize,
}

/// Which files make each split, and how many label bytes lead a record, found from what `dir`
/// holds.
fn layout(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>, usize, usize), DataError> {
    if dir.join("data_batch_1.bin").is_file() {
        let train = (1..=5).map(|i| dir.join(format!("data_batch_{i}.bin"))).collect();
        return Ok((train, vec![dir.join("test_batch.bin")], 1, 10));
    }
    if dir.join("train.bin").is_file() {
        return Ok((vec![dir.join("train.bin")], vec![dir.join("test.bin")], 2, 100));
    }
    Err(DataError::Invalid(format!(
        "{}: no CIFAR binary files (CIFAR-10: data_batch_1.bin … data_batch_5.bin and test_batch.bin; CIFAR-100: \
         train.bin and test.bin, from the \"binary version\" archives)",
        dir.display()
    )))
}

/// Reads both splits. `coarse`: CIFAR-100's 20 superclasses instead of its 100 classes.
pub fn load(dir: &Path, coarse: bool) -> Result<(CifarSplit, CifarSplit), DataError> {
    let (train, test, label_bytes, mut classes) = layout(dir)?;
    let label_at = if label_bytes == 2 && !coarse { 1 } else { 0 };
    if label_bytes == 2 && coarse {
        classes = 20;
    }
    let read = |files: &[PathBuf]| -> Result<CifarSplit, DataError> {
        let mut split = CifarSplit { pixels: vec![], labels: vec![], classes };
        for f in files {
            let err = |what: String| DataError::Idx { path: f.display().to_string(), what };
            let bytes = std::fs::read(f).map_err(|e| err(format!("cannot be read: {e}")))?;
            let record = label_bytes + PIXELS;
            if bytes.is_empty() || bytes.len() % record != 0 {
                return Err(err(format!(
                    "{} bytes is not a whole number of {record}-byte records (truncated, or not a CIFAR-{} file)",
                    bytes.len(),
                    if label_bytes == 1 { 10 } else { 100 }
                )));
            }
            for (n, r) in bytes.chunks(record).enumerate() {
                let label = r[label_at] as usize;
                if label >= classes {
                    return Err(err(format!("record {n} has label {label}, outside the {classes} classes")));
                }
                split.labels.push(label as i64);
                split.pixels.extend_from_slice(&r[label_bytes..]);
            }
        }
        Ok(split)
    };
    Ok((read(&train)?, read(&test)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(labels: &[u8], fill: u8) -> Vec<u8> {
        let mut r = labels.to_vec();
        r.extend((0..PIXELS).map(|i| fill.wrapping_add((i / 1024) as u8)));
        r
    }

    #[test]
    fn reads_cifar10_and_cifar100_and_names_bad_files() {
        let d = tempfile::tempdir().unwrap();
        for i in 1..=5 {
            std::fs::write(d.path().join(format!("data_batch_{i}.bin")), [record(&[i], 10), record(&[9], 20)].concat()).unwrap();
        }
        std::fs::write(d.path().join("test_batch.bin"), record(&[3], 30)).unwrap();
        let (train, test) = load(d.path(), false).unwrap();
        assert_eq!(train.labels, vec![1, 9, 2, 9, 3, 9, 4, 9, 5, 9]);
        assert_eq!((train.classes, test.labels.clone()), (10, vec![3]));
        // The red plane, then green (+1), then blue (+2).
        assert_eq!((test.pixels[0], test.pixels[1024], test.pixels[2048]), (30, 31, 32));

        std::fs::write(d.path().join("test_batch.bin"), &record(&[3], 30)[..100]).unwrap();
        let e = load(d.path(), false).err().unwrap().to_string();
        assert!(e.contains("test_batch.bin") && e.contains("100 bytes"), "{e}");
        std::fs::write(d.path().join("test_batch.bin"), record(&[12], 30)).unwrap();
        let e = load(d.path(), false).err().unwrap().to_string();
        assert!(e.contains("record 0 has label 12"), "{e}");

        let c = tempfile::tempdir().unwrap();
        std::fs::write(c.path().join("train.bin"), [record(&[4, 77], 0), record(&[19, 99], 0)].concat()).unwrap();
        std::fs::write(c.path().join("test.bin"), record(&[0, 5], 0)).unwrap();
        let (fine, _) = load(c.path(), false).unwrap();
        assert_eq!((fine.labels, fine.classes), (vec![77, 99], 100));
        let (coarse, _) = load(c.path(), true).unwrap();
        assert_eq!((coarse.labels, coarse.classes), (vec![4, 19], 20));
        let e = load(tempfile::tempdir().unwrap().path(), false).err().unwrap().to_string();
        assert!(e.contains("no CIFAR binary files"), "{e}");
    }
}
