//! `data.format: yolo`: a detection data set in the layout YOLO tools use, so a user's own data
//! trains — `images/train`, `images/val` (PNG, JPEG, …) and beside them `labels/train`,
//! `labels/val`, one `NAME.txt` per image holding a line `class cx cy w h` per object
//! (normalised to the image's size). An image without a label file has no objects. Every label
//! file is read and checked at load: a malformed line is an error naming the file and the line.
//!
//! Images are letterboxed into `imgsz` × `imgsz` (scaled by nearest neighbour to fit, keeping
//! their aspect, at the top left, the rest grey 114 as YOLO pads), and the boxes follow. A batch's
//! target is `data::mosaic`'s: `[batch, most, 5]` rows `(class, x1, y1, x2, y2)` in pixels, padded
//! with class -1, `most` the largest object count of any image in either split.

use super::boxes::BoxTarget;
use super::images::folder;
use super::{Batch, DataError, DataKind, DataSpec, Dataset, LoadContext, Samples, Splits};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Tensor;

pub const KIND: DataKind = DataKind::of::<YoloSpec>("yolo");

/// `data: {format: yolo, dir: …, classes: N, imgsz: 128}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct YoloSpec {
    /// The folder holding `images/` and `labels/`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// The number of classes; a label outside `0..classes` is an error.
    #[serde(default)]
    pub classes: Option<usize>,
    /// Side of the square every image is letterboxed into.
    #[serde(default = "default_imgsz")]
    pub imgsz: usize,
}

fn default_imgsz() -> usize {
    128
}

impl DataSpec for YoloSpec {
    fn samples(&self) -> Samples {
        Samples::Boxes
    }

    fn sample_shape(&self) -> Option<Vec<i64>> {
        Some(vec![3, self.imgsz as i64, self.imgsz as i64])
    }

    fn validate(&self) -> Result<(), String> {
        if self.dir.is_none() {
            return Err("data.dir is required when data.format is yolo: the folder holding images/ and labels/".into());
        }
        if self.classes.is_none_or(|c| c == 0) {
            return Err("data.classes is required when data.format is yolo (at least 1)".into());
        }
        if !(8..=4096).contains(&self.imgsz) {
            return Err(format!("data.imgsz must be in 8..=4096, got {}", self.imgsz));
        }
        Ok(())
    }

    fn load(&self, _ctx: &LoadContext) -> Result<Splits, DataError> {
        let dir = self.dir.as_deref().expect("validated: yolo has a dir");
        let classes = self.classes.expect("validated: yolo has classes");
        let train = read_split(dir, "train", classes)?;
        let test = read_split(dir, "val", classes)?;
        let most = train.iter().chain(&test).map(|(_, o)| o.len()).max().unwrap_or(0).max(1);
        let set = |items| Arc::new(YoloSet { items, imgsz: self.imgsz, most });
        Ok(Splits { sample_shape: self.sample_shape().expect("known"), classes, train: set(train), test: set(test), may_skip: false })
    }
}

/// An image's objects: (class, cx, cy, w, h) normalised, as the label file says.
type Labels = Vec<(i64, [f32; 4])>;

/// The images of `images/<split>` (sorted by name) with their labels.
fn read_split(dir: &Path, split: &str, classes: usize) -> Result<Vec<(PathBuf, Labels)>, DataError> {
    let images = dir.join("images").join(split);
    let listing = std::fs::read_dir(&images).map_err(|e| DataError::Invalid(format!("{}: cannot be listed: {e}", images.display())))?;
    let mut files = vec![];
    for e in listing {
        let p = e.map_err(|e| DataError::Invalid(format!("{}: {e}", images.display())))?.path();
        if p.is_file() && p.extension().is_some_and(|x| folder::EXTENSIONS.contains(&x.to_string_lossy().to_lowercase().as_str())) {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(DataError::Invalid(format!("{}: no images", images.display())));
    }
    let mut out = Vec::with_capacity(files.len());
    for path in files {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let label = dir.join("labels").join(split).join(format!("{stem}.txt"));
        let labels = match std::fs::read_to_string(&label) {
            Ok(text) => parse_labels(&text, classes)
                .map_err(|(line, what)| DataError::Idx { path: label.display().to_string(), what: format!("line {line}: {what}") })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => return Err(DataError::Idx { path: label.display().to_string(), what: e.to_string() }),
        };
        out.push((path, labels));
    }
    Ok(out)
}

/// A label file's objects; the error is (line number from 1, what is wrong).
pub fn parse_labels(text: &str, classes: usize) -> Result<Labels, (usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        if fields.len() != 5 {
            return Err((n + 1, format!("{} fields, expected 5 (class cx cy w h): {line:?}", fields.len())));
        }
        let class: i64 = fields[0].parse().map_err(|_| (n + 1, format!("class {:?} is not an integer", fields[0])))?;
        if class < 0 || class as usize >= classes {
            return Err((n + 1, format!("class {class} is outside 0..{classes} (data.classes: {classes})")));
        }
        let mut v = [0f32; 4];
        for (k, f) in fields[1..].iter().enumerate() {
            v[k] = f.parse().map_err(|_| (n + 1, format!("{:?} is not a number", f)))?;
            if !(0.0..=1.0).contains(&v[k]) {
                return Err((n + 1, format!("{} is outside [0, 1] (coordinates are normalised)", v[k])));
            }
        }
        if v[2] <= 0.0 || v[3] <= 0.0 {
            return Err((n + 1, "a box of zero width or height".into()));
        }
        out.push((class, v));
    }
    Ok(out)
}

struct YoloSet {
    items: Vec<(PathBuf, Labels)>,
    imgsz: usize,
    most: usize,
}

impl Dataset for YoloSet {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn batch(&self, indices: &[usize], _epoch: u64) -> Result<Batch, DataError> {
        let s = self.imgsz;
        let mut x = Vec::with_capacity(indices.len() * 3 * s * s);
        let mut target = BoxTarget::new(indices.len(), self.most);
        for (j, &i) in indices.iter().enumerate() {
            let (path, labels) =
                self.items.get(i).ok_or_else(|| DataError::Invalid(format!("image index {i} is past the end ({})", self.items.len())))?;
            let img = folder::decode(path).map_err(|e| DataError::Idx { path: path.display().to_string(), what: e })?;
            let (pixels, scale) = letterbox(&img, s);
            x.extend(pixels.iter().map(|&b| b as f32 / 255.0));
            let (iw, ih) = (img.w as f32 * scale, img.h as f32 * scale);
            for (k, (class, [cx, cy, w, h])) in labels.iter().enumerate() {
                target.set(j, k, *class, [(cx - w / 2.0) * iw, (cy - h / 2.0) * ih, (cx + w / 2.0) * iw, (cy + h / 2.0) * ih]);
            }
        }
        let n = indices.len() as i64;
        let input =
            Tensor::f_from_slice(&x).and_then(|t| t.f_view([n, 3, s as i64, s as i64])).map_err(|e| DataError::Invalid(e.to_string()))?;
        let target = target.tensor()?;
        Ok(Batch { input, target, len: indices.len() })
    }
}

/// `img` scaled by nearest neighbour to fit `side` × `side` keeping its aspect, at the top left,
/// the rest grey 114; returns the pixels (3 × side × side) and the scale.
fn letterbox(img: &super::images::transforms::Img, side: usize) -> (Vec<u8>, f32) {
    let scale = (side as f32 / img.w as f32).min(side as f32 / img.h as f32);
    let (w, h) = (((img.w as f32 * scale).round() as usize).clamp(1, side), ((img.h as f32 * scale).round() as usize).clamp(1, side));
    let mut out = vec![114u8; 3 * side * side];
    for c in 0..3 {
        let src = c.min(img.c - 1);
        for y in 0..h {
            let sy = (y * img.h / h).min(img.h - 1);
            for x in 0..w {
                let sx = (x * img.w / w).min(img.w - 1);
                out[c * side * side + y * side + x] = img.data[src * img.h * img.w + sy * img.w + sx];
            }
        }
    }
    (out, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(w, h, image::Rgb(rgb)).save(path).unwrap();
    }

    #[test]
    fn a_yolo_folder_loads_letterboxed_with_boxes_and_bad_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_png(&d.join("images/train/a.png"), 64, 32, [255, 0, 0]);
        write_png(&d.join("images/train/b.png"), 16, 16, [0, 255, 0]);
        write_png(&d.join("images/val/c.png"), 32, 32, [0, 0, 255]);
        std::fs::create_dir_all(d.join("labels/train")).unwrap();
        std::fs::create_dir_all(d.join("labels/val")).unwrap();
        std::fs::write(d.join("labels/train/a.txt"), "1 0.5 0.5 0.5 0.5\n\n0 0.25 0.25 0.1 0.2\n").unwrap();
        std::fs::write(d.join("labels/val/c.txt"), "2 0.5 0.5 1 1\n").unwrap();
        let spec = YoloSpec { dir: Some(d.to_path_buf()), classes: Some(3), imgsz: 32 };
        spec.validate().unwrap();
        let s = spec.load(&LoadContext { context_length: None, seed: 0 }).unwrap();
        assert_eq!((s.train.len(), s.test.len(), s.classes), (2, 1, 3));
        let b = s.train.batch(&[0, 1], 0).unwrap();
        assert_eq!(b.input.size(), [2, 3, 32, 32]);
        assert_eq!(b.target.size(), [2, 2, 5], "the most objects of any image: 2");
        let t = Vec::<f32>::try_from(b.target.view([-1])).unwrap();
        // a.png (64 × 32) scales by 0.5 into 32 × 16 at the top left: its first box is
        // (0.25..0.75) × (0.25..0.75) of that.
        assert_eq!(&t[0..5], &[1.0, 8.0, 4.0, 24.0, 12.0]);
        assert_eq!(t[5], 0.0);
        // b.png has no label file: no objects.
        assert_eq!((t[10], t[15]), (-1.0, -1.0));
        // Letterboxing: a's red fills the top 16 rows, grey below; in every channel.
        let px = |c: i64, y: i64, x: i64| b.input.double_value(&[0, c, y, x]);
        assert_eq!((px(0, 0, 0), px(1, 0, 0)), (1.0, 0.0));
        assert!((px(0, 20, 5) - 114.0 / 255.0).abs() < 1e-6);
        // A malformed line is named by file and line.
        std::fs::write(d.join("labels/val/c.txt"), "2 0.5 0.5 1 1\n1 0.5 0.5 nan?\n").unwrap();
        let e = spec.load(&LoadContext { context_length: None, seed: 0 }).err().unwrap().to_string();
        assert!(e.contains("labels/val/c.txt") && e.contains("line 2: 4 fields, expected 5"), "{e}");
        std::fs::write(d.join("labels/val/c.txt"), "3 0.5 0.5 1 1\n").unwrap();
        let e = spec.load(&LoadContext { context_length: None, seed: 0 }).err().unwrap().to_string();
        assert!(e.contains("line 1: class 3 is outside 0..3"), "{e}");
    }
}
