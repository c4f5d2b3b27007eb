//! The IDX format of MNIST and Fashion-MNIST: a 4-byte magic (0, 0, type, ndim), ndim big-endian
//! u32 sizes, then the data. Gzip is detected by its magic bytes.

use super::images::{self, Source, TransformsConfig};
use super::{ArrayDataset, DataError, DataKind, DataSpec, LoadContext, Pixels, Splits};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const KIND: DataKind = DataKind::of::<IdxSpec>("idx");

/// `data: {format: idx, …}`: MNIST-style IDX files (`train-images-idx3-ubyte[.gz]` …) in `dir`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdxSpec {
    /// The folder holding the four files.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// The number of classes (default 10, the MNIST family); a label outside it is an error.
    #[serde(default)]
    pub classes: Option<usize>,
    /// Per-channel (mean, std) applied after scaling to [0, 1], as torchvision's Normalize.
    #[serde(default)]
    pub normalize: Option<[f32; 2]>,
    /// Image transforms per split; the samples then go through the image pipeline.
    #[serde(default)]
    pub transforms: Option<TransformsConfig>,
}

impl DataSpec for IdxSpec {
    fn validate(&self) -> Result<(), String> {
        if self.classes.is_some_and(|c| !(2..=65536).contains(&c)) {
            return Err("data.classes must be in 2..=65536".into());
        }
        if self.dir.is_none() {
            return Err("data.dir is required when data.format is idx".into());
        }
        images::check_pipeline(self.transforms.as_ref(), self.normalize, 1)
    }

    fn load(&self, ctx: &LoadContext) -> Result<Splits, DataError> {
        let dir = self.dir.as_deref().expect("validated: idx has a dir");
        let split = |images: &str, labels: &str| -> Result<ArrayDataset, DataError> {
            let mut d = load_pair(&find_file(dir, images)?, &find_file(dir, labels)?, self.classes.unwrap_or(10))?;
            d.normalize = self.normalize;
            Ok(d)
        };
        let train = split("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
        let test = split("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
        if self.transforms.is_none() {
            return Ok(Splits::arrays(train, test));
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
        let (train, test) = (source(train)?, source(test)?);
        let transforms = self.transforms.clone();
        images::splits(images::Images { train, test, classes, transforms, normalize: None, corrupt: Default::default() }, ctx.seed)
    }
}

const TYPE_U8: u8 = 0x08;

#[derive(Debug, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

pub fn read(path: &Path) -> Result<IdxArray, DataError> {
    let shown = path.display().to_string();
    let fail = |what: String| DataError::Idx { path: shown.clone(), what };
    let raw = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| fail(format!("corrupt gzip stream: {e}")))?;
        out
    } else {
        raw
    };
    parse(&bytes).map_err(fail)
}

/// Parses IDX bytes; the error says what is wrong.
pub fn parse(bytes: &[u8]) -> Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!("too short for an IDX header ({} bytes)", bytes.len()));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!("bad magic {:02x}{:02x}{:02x}{:02x}: not an IDX file", bytes[0], bytes[1], bytes[2], bytes[3]));
    }
    if bytes[2] != TYPE_U8 {
        return Err(format!("element type 0x{:02x} unsupported (only unsigned byte, 0x08)", bytes[2]));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 {
        return Err("zero dimensions".into());
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(format!("truncated header: {ndim} dimensions need {header} bytes, file has {}", bytes.len()));
    }
    let dims: Vec<usize> = (0..ndim).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let expected = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("dimensions overflow")?;
    let found = bytes.len() - header;
    if found != expected {
        return Err(format!(
            "dimensions {dims:?} need {expected} data bytes, file has {found} ({})",
            if found < expected { "truncated" } else { "trailing bytes" }
        ));
    }
    Ok(IdxArray { dims, data: bytes[header..].to_vec() })
}

/// Loads an images file (n × rows × cols) and its labels file (n) into a dataset of 1×rows×cols
/// with `classes` classes (10 for the MNIST family). A label outside `0..classes` is an error
/// naming the file and the sample: one bad byte must not silently widen the model.
pub fn load_pair(images: &Path, labels: &Path, classes: usize) -> Result<ArrayDataset, DataError> {
    let img = read(images)?;
    let lab = read(labels)?;
    let fail = |p: &Path, what: String| DataError::Idx { path: p.display().to_string(), what };
    if img.dims.len() != 3 {
        return Err(fail(images, format!("expected 3 dimensions (n, rows, cols), found {:?}", img.dims)));
    }
    if lab.dims.len() != 1 {
        return Err(fail(labels, format!("expected 1 dimension (n), found {:?}", lab.dims)));
    }
    if img.dims[0] != lab.dims[0] {
        return Err(fail(labels, format!("{} labels for {} images in {}", lab.dims[0], img.dims[0], images.display())));
    }
    if let Some((i, &l)) = lab.data.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
        return Err(fail(labels, format!("sample {i} has label {l}, outside 0..{classes} (data.classes: {classes})")));
    }
    Ok(ArrayDataset {
        pixels: Pixels::U8(img.data),
        labels: lab.data.iter().map(|&l| l as i64).collect(),
        sample_shape: vec![1, img.dims[1] as i64, img.dims[2] as i64],
        classes,
        normalize: None,
    })
}

/// Finds `name` or `name.gz` in `dir`.
pub(crate) fn find_file(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, TYPE_U8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_valid() {
        let a = parse(&idx(&[2, 3], &[1, 2, 3, 4, 5, 6])).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn rejects_corrupt_inputs_with_reasons() {
        let good = idx(&[2, 3], &[0; 6]);
        let mut bad_magic = good.clone();
        bad_magic[0] = 7;
        let mut bad_type = good.clone();
        bad_type[2] = 0x0d;
        let mut zero_dims = good.clone();
        zero_dims[3] = 0;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0, 0], "too short"),
            (bad_magic, "bad magic"),
            (bad_type, "unsupported"),
            (zero_dims, "zero dimensions"),
            (good[..9].to_vec(), "truncated header"),
            (good[..good.len() - 1].to_vec(), "truncated"),
            ([good.clone(), vec![0]].concat(), "trailing"),
        ];
        for (bytes, needle) in cases {
            let e = parse(&bytes).unwrap_err();
            assert!(e.contains(needle), "expected {needle:?} in {e:?}");
        }
    }

    #[test]
    fn file_errors_name_the_file_and_gzip_works() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &idx(&[1, 2, 2], &[9, 8, 7, 6])).unwrap();
        std::fs::write(&p, enc.finish().unwrap()).unwrap();
        assert_eq!(read(&p).unwrap().data, vec![9, 8, 7, 6]);

        let truncated = dir.path().join("t.gz");
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
        let e = read(&truncated).unwrap_err().to_string();
        assert!(e.contains("t.gz") && e.contains("gzip"), "{e}");

        let labels = dir.path().join("l");
        std::fs::write(&labels, idx(&[2], &[1, 2])).unwrap();
        let e = load_pair(&p, &labels, 10).err().expect("mismatched counts must fail").to_string();
        assert!(e.contains("2 labels for 1 images"), "{e}");

        // One label out of range: an error naming the file and the sample, not a wider model.
        let bad = dir.path().join("bad-labels");
        std::fs::write(&bad, idx(&[1], &[200])).unwrap();
        let e = load_pair(&p, &bad, 10).err().expect("label 200 of 10 classes must fail").to_string();
        assert!(e.contains("bad-labels") && e.contains("sample 0 has label 200") && e.contains("0..10"), "{e}");
        let ok = dir.path().join("ok-labels");
        std::fs::write(&ok, idx(&[1], &[9])).unwrap();
        assert_eq!(load_pair(&p, &ok, 10).unwrap().classes, 10, "the class count is the configured one, not max label + 1");
    }
}
