//! Object detection's operations outside the model: non-maximum suppression (libtorch has none:
//! `torchvision::nms` lives in torchvision's own library) and COCO's mean average precision. Boxes are `[N, 4]` as (x1, y1, x2, y2).

pub mod draw;
pub mod eval;
pub mod loss;
pub mod map;
pub mod nms;
pub mod predict;

pub use eval::distributed_mean_ap;
pub use loss::{assign, detection_loss, giou, DetectionLoss};
pub use map::{iou, mean_ap, ImageBoxes, MeanAp};
pub use nms::{batched_nms, nms};
