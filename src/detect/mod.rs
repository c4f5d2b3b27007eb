//! Object detection's operations outside the model: non-maximum suppression (libtorch has none:
//! `torchvision::nms` lives in torchvision's own library). Boxes are `[N, 4]` as (x1, y1, x2, y2).

pub mod nms;

pub use nms::{batched_nms, nms};
