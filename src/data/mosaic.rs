//! `data.format: mosaic`: a detection data set with real images and exact boxes, made offline
//! from Fashion-MNIST. Each image is a canvas (128 × 128 by default) holding 1–6 items drawn from
//! the IDX split, each scaled (nearest neighbour) to a square of 14–56 pixels and placed at random,
//! its class its own label and its box the tight box of its non-zero pixels. Everything is drawn
//! from (seed, split, image index), so every rank, every epoch and every resume sees the same
//! images. A placement whose box overlaps an earlier one's by more than IoU 0.5 is drawn again (up
//! to 20 times, then left out), so a box never hides behind another.
//!
//! A batch's target is `[batch, max_objects, 5]` f32 rows `(class, x1, y1, x2, y2)` in canvas
//! pixels (x2, y2 exclusive), padded with rows of class -1: a fixed shape the loader, the sampler
//! and the collectives already carry.

use super::boxes::BoxTarget;
use super::splitmix::SplitMix;
use super::{idx, ArrayDataset, Batch, DataError, DataKind, DataSpec, Dataset, LoadContext, Pixels, Samples, Splits};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use tch::Tensor;

pub const KIND: DataKind = DataKind::of::<MosaicSpec>("mosaic");

/// `data: {format: mosaic, dir: …, mosaic: {…}}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MosaicSpec {
    /// The folder of the Fashion-MNIST (or MNIST) IDX files the items come from.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    #[serde(default)]
    pub mosaic: MosaicConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MosaicConfig {
    /// Canvas side in pixels.
    #[serde(default = "default_canvas")]
    pub canvas: usize,
    /// Items per image, [least, most].
    #[serde(default = "default_objects")]
    pub objects: [usize; 2],
    /// Item side after scaling, [least, most] pixels.
    #[serde(default = "default_scale")]
    pub scale: [usize; 2],
    #[serde(default = "default_train_images")]
    pub train_images: usize,
    #[serde(default = "default_test_images")]
    pub test_images: usize,
    #[serde(default)]
    pub seed: u64,
}

fn default_canvas() -> usize {
    128
}
fn default_objects() -> [usize; 2] {
    [1, 6]
}
fn default_scale() -> [usize; 2] {
    [14, 56]
}
fn default_train_images() -> usize {
    20_000
}
fn default_test_images() -> usize {
    2_000
}

impl Default for MosaicConfig {
    fn default() -> Self {
        MosaicConfig {
            canvas: default_canvas(),
            objects: default_objects(),
            scale: default_scale(),
            train_images: default_train_images(),
            test_images: default_test_images(),
            seed: 0,
        }
    }
}

impl DataSpec for MosaicSpec {
    fn samples(&self) -> Samples {
        Samples::Boxes
    }

    fn sample_shape(&self) -> Option<Vec<i64>> {
        Some(vec![1, self.mosaic.canvas as i64, self.mosaic.canvas as i64])
    }

    fn validate(&self) -> Result<(), String> {
        let m = &self.mosaic;
        if self.dir.is_none() {
            return Err("data.dir is required when data.format is mosaic: the folder of the Fashion-MNIST IDX files".into());
        }
        if m.objects[0] == 0 || m.objects[0] > m.objects[1] {
            return Err(format!("data.mosaic.objects must be [least, most] with 1 ≤ least ≤ most, got {:?}", m.objects));
        }
        if m.scale[0] == 0 || m.scale[0] > m.scale[1] || m.scale[1] > m.canvas {
            return Err(format!(
                "data.mosaic.scale must be [least, most] pixels with 1 ≤ least ≤ most ≤ canvas ({}), got {:?}",
                m.canvas, m.scale
            ));
        }
        if m.train_images == 0 || m.test_images == 0 {
            return Err("data.mosaic.train_images and test_images must be at least 1".into());
        }
        Ok(())
    }

    fn load(&self, _ctx: &LoadContext) -> Result<Splits, DataError> {
        let dir = self.dir.as_deref().expect("validated: mosaic has a dir");
        let items = |images: &str, labels: &str| -> Result<ArrayDataset, DataError> {
            idx::load_pair(&idx::find_file(dir, images)?, &idx::find_file(dir, labels)?, 10)
        };
        let train = items("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
        let test = items("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
        let m = &self.mosaic;
        let make = |items: ArrayDataset, split: u64, images: usize| Mosaic::new(items, m.clone(), split, images);
        Ok(Splits {
            sample_shape: self.sample_shape().expect("known from the keys"),
            classes: 10,
            train: Arc::new(make(train, 0, m.train_images)?),
            test: Arc::new(make(test, 1, m.test_images)?),
            may_skip: false,
        })
    }
}

/// One object on a canvas: its class and tight box (x1, y1, x2, y2), x2 and y2 exclusive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Object {
    pub class: i64,
    pub bbox: [f32; 4],
}

/// The mosaic images of one split.
pub struct Mosaic {
    items: Vec<u8>,
    labels: Vec<i64>,
    side: usize,
    cfg: MosaicConfig,
    split: u64,
    images: usize,
}

impl Mosaic {
    /// Images made from `items` (28 × 28 byte images with labels).
    pub fn new(items: ArrayDataset, cfg: MosaicConfig, split: u64, images: usize) -> Result<Mosaic, DataError> {
        let [1, h, w] = items.sample_shape[..] else {
            return Err(DataError::Invalid(format!("data.format mosaic needs single-channel items, got {:?}", items.sample_shape)));
        };
        if h != w || items.labels.is_empty() {
            return Err(DataError::Invalid(format!("data.format mosaic needs square items, got {h}x{w} ({} of them)", items.labels.len())));
        }
        let Pixels::U8(pixels) = items.pixels else { return Err(DataError::Invalid("mosaic items must be IDX bytes".into())) };
        Ok(Mosaic { items: pixels, labels: items.labels, side: h as usize, cfg, split, images })
    }

    /// Image `index`: its pixels (canvas × canvas, values in [0, 1]) and its objects.
    pub fn image(&self, index: usize) -> (Vec<f32>, Vec<Object>) {
        let c = self.cfg.canvas;
        // The key hashed once: a generator started at the key itself would give image i the
        // stream of image i - 1 shifted by one draw (splitmix steps its state by the same
        // constant), and neighbouring images would repeat each other's items.
        let key = self.cfg.seed ^ (self.split << 62) ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut rng = SplitMix(SplitMix(key).next_u64());
        let range = |rng: &mut SplitMix, [lo, hi]: [usize; 2]| lo + (rng.next_u64() % (hi - lo + 1) as u64) as usize;
        let count = range(&mut rng, self.cfg.objects);
        let mut canvas = vec![0u8; c * c];
        let mut objects: Vec<Object> = Vec::with_capacity(count);
        for _ in 0..count {
            let item = (rng.next_u64() % self.labels.len() as u64) as usize;
            for _attempt in 0..20 {
                let size = range(&mut rng, self.cfg.scale);
                let (x0, y0) = (range(&mut rng, [0, c - size]), range(&mut rng, [0, c - size]));
                let Some(bbox) = self.tight_box(item, size, x0, y0) else { break };
                if objects.iter().any(|o| iou(&o.bbox, &bbox) > 0.5) {
                    continue;
                }
                self.paste(&mut canvas, item, size, x0, y0);
                objects.push(Object { class: self.labels[item], bbox });
                break;
            }
        }
        (canvas.iter().map(|&b| b as f32 / 255.0).collect(), objects)
    }

    /// Pixel (x, y) of `item` scaled to `size` (nearest neighbour).
    fn scaled(&self, item: usize, size: usize, x: usize, y: usize) -> u8 {
        let s = self.side;
        self.items[item * s * s + (y * s / size) * s + x * s / size]
    }

    fn tight_box(&self, item: usize, size: usize, x0: usize, y0: usize) -> Option<[f32; 4]> {
        let (mut x1, mut y1, mut x2, mut y2) = (usize::MAX, usize::MAX, 0, 0);
        for y in 0..size {
            for x in 0..size {
                if self.scaled(item, size, x, y) > 0 {
                    (x1, y1, x2, y2) = (x1.min(x), y1.min(y), x2.max(x + 1), y2.max(y + 1));
                }
            }
        }
        (x2 > 0).then(|| [(x0 + x1) as f32, (y0 + y1) as f32, (x0 + x2) as f32, (y0 + y2) as f32])
    }

    /// Draws the item over the canvas (the brighter pixel wins where items meet).
    fn paste(&self, canvas: &mut [u8], item: usize, size: usize, x0: usize, y0: usize) {
        let c = self.cfg.canvas;
        for y in 0..size {
            for x in 0..size {
                let p = &mut canvas[(y0 + y) * c + x0 + x];
                *p = (*p).max(self.scaled(item, size, x, y));
            }
        }
    }
}

/// Intersection over union of two boxes (`detect::iou`, in f64).
fn iou(a: &[f32; 4], b: &[f32; 4]) -> f64 {
    crate::detect::iou(&a.map(f64::from), &b.map(f64::from))
}

impl Dataset for Mosaic {
    fn len(&self) -> usize {
        self.images
    }

    fn batch(&self, indices: &[usize], _epoch: u64) -> Result<Batch, DataError> {
        let (c, most) = (self.cfg.canvas, self.cfg.objects[1]);
        let mut x = Vec::with_capacity(indices.len() * c * c);
        let mut target = BoxTarget::new(indices.len(), most);
        for (j, &i) in indices.iter().enumerate() {
            if i >= self.images {
                return Err(DataError::Invalid(format!("image index {i} is past the end ({} images)", self.images)));
            }
            let (pixels, objects) = self.image(i);
            x.extend_from_slice(&pixels);
            for (k, o) in objects.iter().enumerate() {
                target.set(j, k, o.class, o.bbox);
            }
        }
        let n = indices.len() as i64;
        let input =
            Tensor::f_from_slice(&x).and_then(|t| t.f_view([n, 1, c as i64, c as i64])).map_err(|e| DataError::Invalid(e.to_string()))?;
        let target = target.tensor()?;
        Ok(Batch { input, target, len: indices.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items of 28 × 28 whose non-zero pixels are a known rectangle: item k is lit at rows and
    /// columns [4 + k, 20 + k).
    fn items() -> ArrayDataset {
        let mut pixels = vec![0u8; 4 * 28 * 28];
        for k in 0..4 {
            for y in 4 + k..20 + k {
                for x in 4 + k..20 + k {
                    pixels[k * 784 + y * 28 + x] = 200;
                }
            }
        }
        ArrayDataset { pixels: Pixels::U8(pixels), labels: vec![3, 1, 4, 1], sample_shape: vec![1, 28, 28], classes: 10, normalize: None }
    }

    #[test]
    fn images_are_deterministic_with_tight_boxes_and_padded_targets() {
        let m = Mosaic::new(items(), MosaicConfig::default(), 0, 50).unwrap();
        let again = Mosaic::new(items(), MosaicConfig::default(), 0, 50).unwrap();
        let mut counts = [0usize; 7];
        for i in 0..50 {
            let (pixels, objects) = m.image(i);
            assert_eq!((pixels.clone(), objects.clone()), again.image(i), "image {i} differs between two builds");
            assert!((1..=6).contains(&objects.len()), "image {i}: {} objects", objects.len());
            counts[objects.len()] += 1;
            for o in &objects {
                let [x1, y1, x2, y2] = o.bbox;
                assert!(x1 >= 0.0 && y1 >= 0.0 && x2 <= 128.0 && y2 <= 128.0 && x2 > x1 && y2 > y1, "{o:?}");
                // Tight: the box's edge rows and columns hold a lit pixel, the ones outside none
                // of this item's (other items may overlap, so check the lit edges only).
                let lit = |x: f32, y: f32| pixels[y as usize * 128 + x as usize] > 0.0;
                assert!((x1 as usize..x2 as usize).any(|x| lit(x as f32, y1)), "{o:?}: top row unlit");
                assert!((y1 as usize..y2 as usize).any(|y| lit(x2 - 1.0, y as f32)), "{o:?}: right column unlit");
                assert!([3, 1, 4].contains(&o.class), "{o:?}");
            }
            for (a, b) in objects.iter().zip(objects.iter().skip(1)) {
                assert!(iou(&a.bbox, &b.bbox) <= 0.5, "{a:?} {b:?}");
            }
        }
        assert!(counts[1] > 0 && counts[6] > 0, "every count from 1 to 6 occurs: {counts:?}");
        // Neighbouring images are independent draws: no box of image i recurs in image i + 1
        // (a generator seeded with the bare index repeated them).
        for i in 0..49 {
            let (a, b) = (m.image(i).1, m.image(i + 1).1);
            assert!(!b.iter().any(|o| a.iter().any(|p| p.bbox == o.bbox)), "images {i} and {} share a box: {a:?} {b:?}", i + 1);
        }
        // An item of 16 lit pixels scaled to s spans about 16·s/28 pixels.
        let b = m.batch(&[0, 7], 0).unwrap();
        assert_eq!(b.input.size(), [2, 1, 128, 128]);
        assert_eq!(b.target.size(), [2, 6, 5]);
        let rows = Vec::<f32>::try_from(b.target.view([-1])).unwrap();
        let n0 = m.image(0).1.len();
        for k in 0..6 {
            assert_eq!(rows[k * 5] >= 0.0, k < n0, "row {k} of image 0 ({n0} objects)");
        }
        // The test split draws other images.
        let test = Mosaic::new(items(), MosaicConfig::default(), 1, 50).unwrap();
        assert_ne!(test.image(0), m.image(0));
    }
}
