//! Non-maximum suppression as `torchvision.ops.nms` computes it on the CPU, so the same boxes
//! are kept in the same order: candidates in descending score order, ties in index order (a
//! stable sort, as torchvision's kernel sorts; measured against torchvision 0.26); each kept box suppresses every later
//! one whose IoU with it exceeds the threshold, with the IoU in the boxes' precision (areas
//! `(x2 − x1)·(y2 − y1)`, overlap clamped at zero, no +1) and compared in f64.

use tch::{Kind, TchError, Tensor};

fn check(boxes: &Tensor, scores: &Tensor) -> Result<(), TchError> {
    let (b, s) = (boxes.size(), scores.size());
    if b.len() != 2 || b[1] != 4 {
        return Err(TchError::Torch(format!("nms: boxes must be [N, 4] (x1, y1, x2, y2), got {b:?}")));
    }
    if s.len() != 1 || s[0] != b[0] {
        return Err(TchError::Torch(format!("nms: scores must be [N] for {} boxes, got {s:?}", b[0])));
    }
    Ok(())
}

/// The indices (int64, into `boxes`) of the boxes kept, highest score first. `boxes` `[N, 4]` and
/// `scores` `[N]`, floating point; computed in f32 for f32 and f16/bf16 input, else in f64.
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f64) -> Result<Tensor, TchError> {
    check(boxes, scores)?;
    let n = boxes.size()[0] as usize;
    if n == 0 {
        return Ok(Tensor::empty([0], (Kind::Int64, boxes.device())));
    }
    let order: Vec<i64> = Vec::try_from(scores.f_sort_stable(true, 0, true)?.1.f_to_device(tch::Device::Cpu)?)?;
    let kept = match boxes.kind() {
        Kind::Double => {
            keep::<f64>(&Vec::try_from(boxes.f_to_device(tch::Device::Cpu)?.f_contiguous()?.f_view([-1])?)?, &order, iou_threshold)
        }
        _ => {
            let b = boxes.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?;
            keep::<f32>(&Vec::try_from(b)?, &order, iou_threshold)
        }
    };
    Tensor::f_from_slice(&kept)?.f_to_device(boxes.device())
}

/// What one box type needs for the IoU.
trait Coord: Copy + PartialOrd + std::ops::Sub<Output = Self> + std::ops::Mul<Output = Self> + std::ops::Add<Output = Self> {
    const ZERO: Self;
    fn div_f64(self, d: Self) -> f64;
}

impl Coord for f32 {
    const ZERO: f32 = 0.0;
    fn div_f64(self, d: f32) -> f64 {
        // The quotient in f32, as the kernel's `scalar_t`, then widened for the comparison.
        f64::from(self / d)
    }
}

impl Coord for f64 {
    const ZERO: f64 = 0.0;
    fn div_f64(self, d: f64) -> f64 {
        self / d
    }
}

fn max<T: Coord>(a: T, b: T) -> T {
    // std::max(a, b): a unless b is greater.
    if a < b {
        b
    } else {
        a
    }
}

fn min<T: Coord>(a: T, b: T) -> T {
    // std::min(a, b): a unless b is smaller.
    if b < a {
        b
    } else {
        a
    }
}

/// The kernel's loop over boxes `b` (x1, y1, x2, y2 flattened) in score order `order`.
fn keep<T: Coord>(b: &[T], order: &[i64], iou_threshold: f64) -> Vec<i64> {
    let n = b.len() / 4;
    let at = |i: usize, k: usize| b[4 * i + k];
    let areas: Vec<T> = (0..n).map(|i| (at(i, 2) - at(i, 0)) * (at(i, 3) - at(i, 1))).collect();
    let mut suppressed = vec![false; n];
    let mut kept = Vec::new();
    for (pos, &i) in order.iter().enumerate() {
        let i = i as usize;
        if suppressed[i] {
            continue;
        }
        kept.push(i as i64);
        for &j in &order[pos + 1..] {
            let j = j as usize;
            if suppressed[j] {
                continue;
            }
            let w = max(T::ZERO, min(at(i, 2), at(j, 2)) - max(at(i, 0), at(j, 0)));
            let h = max(T::ZERO, min(at(i, 3), at(j, 3)) - max(at(i, 1), at(j, 1)));
            let inter = w * h;
            if inter.div_f64(areas[i] + areas[j] - inter) > iou_threshold {
                suppressed[j] = true;
            }
        }
    }
    kept
}

/// NMS within each class (`classes` `[N]`, integers): boxes of different classes never suppress
/// each other. The kept indices come highest score first, as torchvision's `batched_nms`
/// (its per-class path, which its coordinate-offset path equals up to the offsets' rounding).
pub fn batched_nms(boxes: &Tensor, scores: &Tensor, classes: &Tensor, iou_threshold: f64) -> Result<Tensor, TchError> {
    check(boxes, scores)?;
    let n = boxes.size()[0];
    if classes.size() != [n] {
        return Err(TchError::Torch(format!("batched_nms: classes must be [N] for {n} boxes, got {:?}", classes.size())));
    }
    if n == 0 {
        return Ok(Tensor::empty([0], (Kind::Int64, boxes.device())));
    }
    let mut keep_mask = Tensor::f_zeros([n], (Kind::Bool, boxes.device()))?;
    for class in Vec::<i64>::try_from(classes.f_unique_dim(0, true, false, false)?.0.f_to_kind(Kind::Int64)?)? {
        let members = classes.f_eq(class)?.f_nonzero()?.f_view([-1])?;
        let kept = nms(&boxes.f_index_select(0, &members)?, &scores.f_index_select(0, &members)?, iou_threshold)?;
        let _ = keep_mask.f_index_fill_(0, &members.f_index_select(0, &kept)?, 1)?;
    }
    let kept = keep_mask.f_nonzero()?.f_view([-1])?;
    // torchvision orders these with the default (unstable) sort: libtorch's same call breaks
    // ties the same way.
    let by_score = scores.f_index_select(0, &kept)?.f_sort(0, true)?.1;
    kept.f_index_select(0, &by_score)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxes(v: &[[f32; 4]]) -> Tensor {
        Tensor::from_slice(&v.concat()).view([-1, 4])
    }

    #[test]
    fn overlapping_boxes_are_suppressed_by_the_higher_score_only_past_the_threshold() {
        // IoU(a, b) = 81 / 119 ≈ 0.68; c is apart.
        let b = boxes(&[[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0]]);
        let s = Tensor::from_slice(&[0.8f32, 0.9, 0.1]);
        assert_eq!(Vec::<i64>::try_from(nms(&b, &s, 0.5).unwrap()).unwrap(), vec![1, 2]);
        assert_eq!(Vec::<i64>::try_from(nms(&b, &s, 0.7).unwrap()).unwrap(), vec![1, 0, 2]);
        // Another class: no suppression across classes.
        let c = Tensor::from_slice(&[0i64, 1, 0]);
        assert_eq!(Vec::<i64>::try_from(batched_nms(&b, &s, &c, 0.5).unwrap()).unwrap(), vec![1, 0, 2]);
        assert_eq!(nms(&b.narrow(0, 0, 0), &s.narrow(0, 0, 0), 0.5).unwrap().size(), vec![0]);
        assert!(nms(&b, &s.narrow(0, 0, 2), 0.5).unwrap_err().to_string().contains("scores must be [N] for 3 boxes"));
    }
}
