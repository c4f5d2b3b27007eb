//! From a detector's output to detections: each point's score is objectness × its best class's
//! probability (YOLOX's), points under `CONFIDENCE` are dropped, boxes are clipped to the image,
//! per-class NMS keeps the best of overlapping boxes, and at most `MAX_PER_IMAGE` remain over all
//! classes (YOLO's convention; COCO's evaluation itself caps 100 per image and class).

use super::map::ImageBoxes;
use super::nms::batched_nms;
use tch::{Device, Kind, TchError, Tensor};

/// Scores below this are not detections (low, as mAP rewards recall at any precision).
pub const CONFIDENCE: f64 = 0.01;
/// NMS threshold within a class.
pub const NMS_IOU: f64 = 0.6;
pub const MAX_PER_IMAGE: usize = 100;

/// The detections in each image of `out` `[batch, points, 5 + classes]` (boxes in pixels,
/// objectness and class logits) for images `width` × `height`.
pub fn detections(out: &Tensor, width: f64, height: f64) -> Result<Vec<ImageBoxes>, TchError> {
    let out = out.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?;
    let classes = out.size()[2] - 5;
    let mut images = vec![];
    for i in 0..out.size()[0] {
        let o = out.f_get(i)?;
        let probs = o.f_narrow(1, 5, classes)?.f_sigmoid()?.f_mul(&o.f_narrow(1, 4, 1)?.f_sigmoid()?)?;
        let (score, class) = probs.f_max_dim(1, false)?;
        let keep = score.f_gt(CONFIDENCE)?.f_nonzero()?.f_view([-1])?;
        let boxes = o.f_narrow(1, 0, 4)?.f_index_select(0, &keep)?;
        let limits = Tensor::from_slice(&[width as f32, height as f32, width as f32, height as f32]);
        let boxes = boxes.f_clamp_min(0.0)?.f_minimum(&limits)?;
        let (score, class) = (score.f_index_select(0, &keep)?, class.f_index_select(0, &keep)?);
        let mut kept = batched_nms(&boxes, &score, &class, NMS_IOU)?;
        if kept.size()[0] as usize > MAX_PER_IMAGE {
            kept = kept.f_narrow(0, 0, MAX_PER_IMAGE as i64)?;
        }
        let b = Vec::<f32>::try_from(boxes.f_index_select(0, &kept)?.f_contiguous()?.f_view([-1])?)?;
        images.push(ImageBoxes {
            boxes: b.chunks_exact(4).map(|c| [c[0] as f64, c[1] as f64, c[2] as f64, c[3] as f64]).collect(),
            classes: Vec::<i64>::try_from(class.f_index_select(0, &kept)?)?,
            scores: Vec::<f32>::try_from(score.f_index_select(0, &kept)?)?.into_iter().map(f64::from).collect(),
        });
    }
    Ok(images)
}

/// The ground truth in each image of a `[batch, most, 5]` target (rows of class -1 are padding).
pub fn truths(targets: &Tensor) -> Result<Vec<ImageBoxes>, TchError> {
    let t = targets.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
    let (b, m) = (t.size()[0] as usize, t.size()[1] as usize);
    let v = Vec::<f32>::try_from(t.f_view([-1])?)?;
    Ok((0..b)
        .map(|i| {
            let mut img = ImageBoxes::default();
            for r in v[i * m * 5..(i + 1) * m * 5].chunks_exact(5).filter(|r| r[0] >= 0.0) {
                img.classes.push(r[0] as i64);
                img.boxes.push([r[1] as f64, r[2] as f64, r[3] as f64, r[4] as f64]);
            }
            img
        })
        .collect())
}
