//! The detection loss: ground truth assigned to anchor points by centre and size, then a GIoU
//! loss on the assigned points' boxes and binary cross-entropy for objectness (every point) and
//! classes (assigned points), each summed and divided by the number of assigned points.
//! `scripts/reference/yolo_reference.py` computes the same in PyTorch.
//!
//! Assignment (FCOS's centre sampling with its size ranges, YOLOX's single best match): a point
//! (x, y, stride s) takes a box when its centre lies within `RADIUS`·s of the box's centre in both
//! axes and the box's longer side suits the map (at least 1.5·s, under 5·s; the finest map has
//! no lower bound and the coarsest no upper one, so every size has a map). A point that several
//! boxes claim takes the one of least area (the first of equal ones).

use tch::{Kind, Reduction, TchError, Tensor};

/// Centre sampling radius, in strides.
pub const RADIUS: f64 = 1.0;
/// The weight of the box loss against objectness and classes (YOLOX's).
pub const BOX_WEIGHT: f64 = 5.0;

/// The loss and its parts (each already divided by the assigned points).
pub struct DetectionLoss {
    pub total: Tensor,
    /// The divisor: the number of assigned points, at least 1 (f32, 0-dim).
    pub assigned: Tensor,
    pub giou: Tensor,
    pub objectness: Tensor,
    pub classes: Tensor,
}

/// For every image and point: the assigned box (index into the targets' rows) and whether there
/// is one. `targets` `[batch, most, 5]` rows (class, x1, y1, x2, y2), class -1 for padding;
/// `points` `[points, 3]` (x, y, stride).
pub fn assign(points: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor), TchError> {
    let (b, n) = (targets.size()[0], points.size()[0]);
    let points = points.f_to_device(targets.device())?;
    if targets.size()[1] == 0 {
        let none = Tensor::f_zeros([b, n], (Kind::Int64, targets.device()))?;
        return Ok((none.shallow_clone(), none.f_to_kind(Kind::Bool)?));
    }
    let col = |t: &Tensor, i: i64| t.f_select(2, i);
    let (x1, y1, x2, y2) = (col(targets, 1)?, col(targets, 2)?, col(targets, 3)?, col(targets, 4)?);
    let valid = col(targets, 0)?.f_ge(0.0)?.f_unsqueeze(1)?; // [b, 1, m]
    let (w, h) = (x2.f_sub(&x1)?, y2.f_sub(&y1)?);
    let cx = x1.f_add(&x2)?.f_mul_scalar(0.5)?.f_unsqueeze(1)?;
    let cy = y1.f_add(&y2)?.f_mul_scalar(0.5)?.f_unsqueeze(1)?;
    let size = w.f_maximum(&h)?.f_unsqueeze(1)?;
    let area = w.f_mul(&h)?.f_unsqueeze(1)?;
    let p = |i: i64| points.f_select(1, i)?.f_view([1, n, 1]);
    let (px, py, ps) = (p(0)?, p(1)?, p(2)?);
    let (finest, coarsest) = (ps.f_min()?.f_double_value(&[])?, ps.f_max()?.f_double_value(&[])?);
    let lo = ps.f_mul_scalar(1.5)?.f_masked_fill(&ps.f_eq(finest)?, 0.0)?;
    let hi = ps.f_mul_scalar(5.0)?.f_masked_fill(&ps.f_eq(coarsest)?, f64::INFINITY)?;
    let reach = ps.f_mul_scalar(RADIUS)?;
    let near = px.f_sub(&cx)?.f_abs()?.f_lt_tensor(&reach)?.f_logical_and(&py.f_sub(&cy)?.f_abs()?.f_lt_tensor(&reach)?)?;
    let suits = size.f_ge_tensor(&lo)?.f_logical_and(&size.f_lt_tensor(&hi)?)?;
    let claims = near.f_logical_and(&suits)?.f_logical_and(&valid)?; // [b, n, m]
    let cost = area.f_expand([b, n, -1], false)?.f_masked_fill(&claims.f_logical_not()?, f64::INFINITY)?;
    let (_, best) = cost.f_min_dim(2, false)?;
    Ok((best, claims.f_any_dim(2, false)?))
}

/// Generalised IoU of box pairs `[k, 4]` (x1, y1, x2, y2), as torchvision's
/// `generalized_box_iou_loss` computes it (eps 1e-7).
pub fn giou(a: &Tensor, b: &Tensor) -> Result<Tensor, TchError> {
    const EPS: f64 = 1e-7;
    let c = |t: &Tensor, i: i64| t.f_select(1, i);
    let (ax1, ay1, ax2, ay2) = (c(a, 0)?, c(a, 1)?, c(a, 2)?, c(a, 3)?);
    let (bx1, by1, bx2, by2) = (c(b, 0)?, c(b, 1)?, c(b, 2)?, c(b, 3)?);
    let iw = ax2.f_minimum(&bx2)?.f_sub(&ax1.f_maximum(&bx1)?)?.f_clamp_min(0.0)?;
    let ih = ay2.f_minimum(&by2)?.f_sub(&ay1.f_maximum(&by1)?)?.f_clamp_min(0.0)?;
    let inter = iw.f_mul(&ih)?;
    let union = ax2.f_sub(&ax1)?.f_mul(&ay2.f_sub(&ay1)?)?.f_add(&bx2.f_sub(&bx1)?.f_mul(&by2.f_sub(&by1)?)?)?.f_sub(&inter)?;
    let iou = inter.f_div(&union.f_add_scalar(EPS)?)?;
    let cw = ax2.f_maximum(&bx2)?.f_sub(&ax1.f_minimum(&bx1)?)?;
    let ch = ay2.f_maximum(&by2)?.f_sub(&ay1.f_minimum(&by1)?)?;
    let enclosing = cw.f_mul(&ch)?;
    iou.f_sub(&enclosing.f_sub(&union)?.f_div(&enclosing.f_add_scalar(EPS)?)?)
}

/// The loss of a detector's output `[batch, points, 5 + classes]` (boxes in pixels, objectness
/// and class logits; see `models::yolo`) against `targets`, for its `points`.
pub fn detection_loss(out: &Tensor, points: &Tensor, targets: &Tensor) -> Result<DetectionLoss, TchError> {
    let out = out.f_to_kind(Kind::Float)?;
    let (b, n, width) = (out.size()[0], out.size()[1], out.size()[2]);
    let classes = width - 5;
    let mut targets = targets.f_to_device(out.device())?;
    if targets.size()[1] == 0 {
        // No image has a box: one padding row each, so the gathers below have a row to point at.
        targets = Tensor::f_cat(
            &[Tensor::f_full([b, 1, 1], -1.0, (Kind::Float, out.device()))?, Tensor::f_zeros([b, 1, 4], (Kind::Float, out.device()))?],
            2,
        )?;
    }
    let targets = &targets;
    let (best, positive) = tch::no_grad(|| assign(points, targets))?;
    let count = positive.f_sum(Kind::Float)?.f_clamp_min(1.0)?;
    // The assigned points, flattened over (image, point) in row-major order.
    let at = positive.f_view([-1])?.f_nonzero()?.f_view([-1])?;
    let gathered = |col: i64, k: i64| -> Result<Tensor, TchError> {
        let index = best.f_unsqueeze(2)?.f_expand([b, n, k], false)?;
        targets.f_narrow(2, col, k)?.f_gather(1, &index, false)?.f_reshape([-1, k])?.f_index_select(0, &at)
    };
    let boxes = out.f_narrow(2, 0, 4)?.f_reshape([-1, 4])?.f_index_select(0, &at)?;
    let giou_sum = giou(&boxes, &gathered(1, 4)?)?.f_neg()?.f_add_scalar(1.0)?.f_sum(Kind::Float)?;
    let objectness = out.f_select(2, 4)?.f_binary_cross_entropy_with_logits(
        &positive.f_to_kind(Kind::Float)?,
        None::<&Tensor>,
        None::<&Tensor>,
        Reduction::Sum,
    )?;
    let wanted = gathered(0, 1)?.f_view([-1])?.f_to_kind(Kind::Int64)?.f_one_hot(classes)?.f_to_kind(Kind::Float)?;
    let logits = out.f_narrow(2, 5, classes)?.f_reshape([-1, classes])?.f_index_select(0, &at)?;
    let class_sum = logits.f_binary_cross_entropy_with_logits(&wanted, None::<&Tensor>, None::<&Tensor>, Reduction::Sum)?;
    let (giou, objectness, classes) = (giou_sum.f_div(&count)?, objectness.f_div(&count)?, class_sum.f_div(&count)?);
    let total = giou.f_mul_scalar(BOX_WEIGHT)?.f_add(&objectness)?.f_add(&classes)?;
    Ok(DetectionLoss { total, assigned: count, giou, objectness, classes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn points() -> Tensor {
        Tensor::from_slice(&[4.0f32, 4.0, 8.0, 12.0, 4.0, 8.0, 8.0, 8.0, 16.0]).view([3, 3])
    }

    #[test]
    fn a_batch_without_boxes_costs_objectness_only_whatever_its_padding() {
        tch::manual_seed(1);
        let out = Tensor::randn([2, 3, 5 + 4], (Kind::Float, Device::Cpu));
        let none = detection_loss(&out, &points(), &Tensor::zeros([2, 0, 5], (Kind::Float, Device::Cpu))).unwrap();
        let padded = Tensor::cat(
            &[Tensor::full([2, 2, 1], -1.0, (Kind::Float, Device::Cpu)), Tensor::zeros([2, 2, 4], (Kind::Float, Device::Cpu))],
            2,
        );
        let pad = detection_loss(&out, &points(), &padded).unwrap();
        assert_eq!(none.total.double_value(&[]), pad.total.double_value(&[]));
        assert_eq!(none.giou.double_value(&[]), 0.0);
        assert_eq!(none.classes.double_value(&[]), 0.0);
        assert_eq!(none.assigned.double_value(&[]), 1.0, "the divisor is at least 1");
        assert!(none.objectness.double_value(&[]) > 0.0);
    }

    #[test]
    fn a_box_goes_to_the_near_points_of_the_map_that_suits_its_size_and_the_smaller_box_wins() {
        // Points at (4, 4) and (12, 4) on stride 8, (8, 8) on stride 16 (the coarsest: no upper bound).
        let t = |rows: &[[f32; 5]]| Tensor::from_slice(&rows.concat()).view([1, rows.len() as i64, 5]);
        // A 6-px box centred at (5, 5): within one stride of (4, 4) and of (12, 4), too small for stride 16.
        let (best, pos) = assign(&points(), &t(&[[2.0, 2.0, 2.0, 8.0, 8.0]])).unwrap();
        assert_eq!(Vec::<bool>::try_from(pos.view([-1])).unwrap(), [true, true, false]);
        assert_eq!(Vec::<i64>::try_from(best.view([-1])).unwrap()[..2], [0, 0]);
        // A 40-px box: past 5 strides of 8, so only the stride-16 point takes it.
        let (_, pos) = assign(&points(), &t(&[[1.0, 0.0, 0.0, 40.0, 16.0]])).unwrap();
        assert_eq!(Vec::<bool>::try_from(pos.view([-1])).unwrap(), [false, false, true]);
        // Two boxes claiming (4, 4): the smaller (row 1) wins.
        let (best, _) = assign(&points(), &t(&[[0.0, 0.0, 0.0, 10.0, 10.0], [3.0, 1.0, 1.0, 7.0, 7.0]])).unwrap();
        assert_eq!(Vec::<i64>::try_from(best.view([-1])).unwrap()[0], 1);
        // Padding claims nothing.
        let (_, pos) = assign(&points(), &t(&[[-1.0, 2.0, 2.0, 8.0, 8.0]])).unwrap();
        assert!(!bool::try_from(pos.any()).unwrap());
    }
}
