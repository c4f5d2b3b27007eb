//! Distributed detection evaluation: each rank predicts on its shard of the test images; every
//! rank's detections and ground truths (variable in number, none on some ranks) are gathered
//! through the communicator (`comm::all_gather_rows`) and mAP is computed over all of them at
//! once — COCO's mAP of the whole set, not an average of per-rank numbers.

use super::map::{mean_ap, ImageBoxes, MeanAp};
use crate::comm::{all_gather_rows, CommError, Communicator};
use std::collections::BTreeMap;
use tch::Tensor;

/// `(image, boxes)` pairs of one rank, `image` a global image index (the sampler's).
pub type Shard = Vec<(usize, ImageBoxes)>;

/// Rows `(image, x1, y1, x2, y2, score, class)`, one per box (score 0 for ground truth).
fn rows(shard: &Shard) -> Tensor {
    let mut v: Vec<f32> = Vec::new();
    for (image, b) in shard {
        for (k, bx) in b.boxes.iter().enumerate() {
            let score = b.scores.get(k).copied().unwrap_or(0.0);
            v.extend([*image as f32, bx[0] as f32, bx[1] as f32, bx[2] as f32, bx[3] as f32, score as f32, b.classes[k] as f32]);
        }
    }
    let n = (v.len() / 7) as i64;
    Tensor::from_slice(&v).view([n, 7])
}

/// Every rank's boxes by image; `images` lists every image (those without boxes too).
fn by_image(all: &[Tensor], images: &[usize], scored: bool) -> BTreeMap<usize, ImageBoxes> {
    let mut out: BTreeMap<usize, ImageBoxes> = images.iter().map(|&i| (i, ImageBoxes::default())).collect();
    for t in all {
        let v = Vec::<f32>::try_from(t.view([-1])).unwrap_or_default();
        for r in v.chunks_exact(7) {
            let e = out.entry(r[0] as usize).or_default();
            e.boxes.push([r[1] as f64, r[2] as f64, r[3] as f64, r[4] as f64]);
            if scored {
                e.scores.push(r[5] as f64);
            }
            e.classes.push(r[6] as i64);
        }
    }
    out
}

/// COCO's mAP over every rank's images (a collective: every rank calls it and gets the result).
/// `images`: this rank's image indices (each evaluated on exactly one rank); `detections` and
/// `truths`: this rank's, by image. `None` when no image anywhere has ground truth.
pub fn distributed_mean_ap(
    comm: &mut dyn Communicator,
    images: &[usize],
    detections: &Shard,
    truths: &Shard,
) -> Result<Option<MeanAp>, CommError> {
    let listed: Vec<f32> = images.iter().map(|&i| i as f32).collect();
    let all_images = all_gather_rows(comm, &Tensor::from_slice(&listed).view([images.len() as i64, 1]))?;
    let every: Vec<usize> =
        all_images.iter().flat_map(|t| Vec::<f32>::try_from(t.view([-1])).unwrap_or_default()).map(|i| i as usize).collect();
    let dets = by_image(&all_gather_rows(comm, &rows(detections))?, &every, true);
    let gts = by_image(&all_gather_rows(comm, &rows(truths))?, &every, false);
    // In image order, whichever rank had them: the same ranking as one process evaluating all.
    let d: Vec<ImageBoxes> = gts.keys().map(|i| dets.get(i).cloned().unwrap_or_default()).collect();
    let t: Vec<ImageBoxes> = gts.into_values().collect();
    Ok(mean_ap(&d, &t))
}
