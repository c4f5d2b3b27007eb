//! Mean average precision as COCO computes it (pycocotools' `COCOeval` for boxes, area "all",
//! 100 detections per image and class): per class, detections over all images ranked by score,
//! each matched greedily to the unmatched ground truth it overlaps most at an IoU threshold,
//! precision made monotone and read at 101 recall points; mAP@0.5 is the mean over classes with
//! ground truth at IoU 0.5, mAP@[.5:.95] the mean over those classes and the ten thresholds
//! 0.50, 0.55, …, 0.95.

/// One image's detections or ground truths: boxes (x1, y1, x2, y2), class, and (detections) score.
#[derive(Clone, Debug, Default)]
pub struct ImageBoxes {
    pub boxes: Vec<[f64; 4]>,
    pub classes: Vec<i64>,
    pub scores: Vec<f64>,
}

/// COCO's two headline numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeanAp {
    /// mAP@[.5:.95].
    pub map: f64,
    /// mAP@0.5.
    pub map50: f64,
}

/// Intersection over union of two (x1, y1, x2, y2) boxes (0 for two empty ones).
pub fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// `detections[i]` against `truths[i]` for every image i; `None` when no class has ground truth.
pub fn mean_ap(detections: &[ImageBoxes], truths: &[ImageBoxes]) -> Option<MeanAp> {
    assert_eq!(detections.len(), truths.len(), "one detection list per image");
    let thresholds: Vec<f64> = (0..10).map(|k| 0.5 + 0.05 * k as f64).collect();
    let mut classes: Vec<i64> = truths.iter().flat_map(|t| t.classes.iter().copied()).collect();
    classes.sort_unstable();
    classes.dedup();
    // ap[t][class index]
    let mut ap = vec![Vec::new(); thresholds.len()];
    for &c in &classes {
        let mut total_truths = 0usize;
        // (score, matched per threshold) of every detection of class c, image by image.
        let mut ranked: Vec<(f64, Vec<bool>)> = Vec::new();
        for (det, truth) in detections.iter().zip(truths) {
            let gts: Vec<&[f64; 4]> = truth.boxes.iter().zip(&truth.classes).filter(|(_, &k)| k == c).map(|(b, _)| b).collect();
            total_truths += gts.len();
            ranked.extend(match_image(det, c, &gts, &thresholds));
        }
        if total_truths == 0 {
            continue;
        }
        // Across images: descending score, stable (image order, then rank in image).
        let mut order: Vec<usize> = (0..ranked.len()).collect();
        order.sort_by(|&a, &b| ranked[b].0.partial_cmp(&ranked[a].0).unwrap_or(std::cmp::Ordering::Equal));
        for (ti, list) in ap.iter_mut().enumerate() {
            let hits: Vec<bool> = order.iter().map(|&i| ranked[i].1[ti]).collect();
            list.push(average_precision(&hits, total_truths));
        }
    }
    if classes.is_empty() || ap[0].is_empty() {
        return None;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let map50 = mean(&ap[0]);
    let map = mean(&ap.iter().map(|v| mean(v)).collect::<Vec<_>>());
    Some(MeanAp { map, map50 })
}

/// One image's detections of class `c` against its ground truths `gts` of that class, as COCO
/// matches them: by descending score (stable), at most 100, each taking the unmatched truth of
/// highest IoU at or above the threshold (ties to the later one). (score, matched per threshold).
fn match_image(det: &ImageBoxes, c: i64, gts: &[&[f64; 4]], thresholds: &[f64]) -> Vec<(f64, Vec<bool>)> {
    let mut dts: Vec<usize> = (0..det.boxes.len()).filter(|&i| det.classes[i] == c).collect();
    dts.sort_by(|&a, &b| det.scores[b].partial_cmp(&det.scores[a]).unwrap_or(std::cmp::Ordering::Equal));
    dts.truncate(100);
    let mut matched = vec![Vec::with_capacity(thresholds.len()); dts.len()];
    for &t in thresholds {
        let mut taken = vec![false; gts.len()];
        for (di, &d) in dts.iter().enumerate() {
            let mut best = t.min(1.0 - 1e-10);
            let mut m = None;
            for (gi, g) in gts.iter().enumerate() {
                let v = iou(&det.boxes[d], g);
                if taken[gi] || v < best {
                    continue;
                }
                best = v;
                m = Some(gi);
            }
            if let Some(gi) = m {
                taken[gi] = true;
            }
            matched[di].push(m.is_some());
        }
    }
    dts.iter().zip(matched).map(|(&d, m)| (det.scores[d], m)).collect()
}

/// COCO's AP of a ranking (`hits[i]`: the i-th best detection matched a truth) of a class with
/// `total_truths`: precision made monotone from the right, read at 101 recall points 0, 0.01, …,
/// 1 (the first detection whose recall reaches each, as searchsorted left; 0 past the last).
fn average_precision(hits: &[bool], total_truths: usize) -> f64 {
    let (mut tp, mut fp) = (0f64, 0f64);
    let mut recall = Vec::with_capacity(hits.len());
    let mut precision = Vec::with_capacity(hits.len());
    for &hit in hits {
        if hit {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        recall.push(tp / total_truths as f64);
        precision.push(tp / (tp + fp + f64::EPSILON));
    }
    for i in (1..precision.len()).rev() {
        if precision[i] > precision[i - 1] {
            precision[i - 1] = precision[i];
        }
    }
    let sum: f64 = (0..=100).map(|r| recall.partition_point(|&x| x < r as f64 / 100.0)).filter_map(|at| precision.get(at)).sum();
    sum / 101.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_detections_score_one_and_misses_lower_it() {
        let truth = ImageBoxes { boxes: vec![[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 40.0]], classes: vec![0, 1], scores: vec![] };
        let perfect = ImageBoxes { scores: vec![0.9, 0.8], ..truth.clone() };
        let m = mean_ap(&[perfect], std::slice::from_ref(&truth)).unwrap();
        assert!((m.map - 1.0).abs() < 1e-12 && (m.map50 - 1.0).abs() < 1e-12, "{m:?}");
        // Class 1 missed: half the classes at AP 0.
        let half = ImageBoxes { boxes: vec![[0.0, 0.0, 10.0, 10.0]], classes: vec![0], scores: vec![0.9] };
        let m = mean_ap(&[half], std::slice::from_ref(&truth)).unwrap();
        assert!((m.map50 - 0.5).abs() < 1e-12, "{m:?}");
        assert!(mean_ap(&[ImageBoxes::default()], &[ImageBoxes::default()]).is_none());
    }
}
