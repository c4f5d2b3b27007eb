//! A batch's detection target, shared by the detection formats: `[batch, most, 5]` f32 rows
//! `(class, x1, y1, x2, y2)` in pixels, image by image, the rows past an image's own objects padded
//! with class -1 — a fixed shape the loader, the sampler and the collectives already carry.

use super::DataError;
use tch::Tensor;

pub struct BoxTarget {
    rows: Vec<f32>,
    images: usize,
    most: usize,
}

impl BoxTarget {
    /// `images` images of at most `most` objects each, all padding for now.
    pub fn new(images: usize, most: usize) -> BoxTarget {
        BoxTarget { rows: [-1.0, 0.0, 0.0, 0.0, 0.0].repeat(images * most), images, most }
    }

    /// Object `k` of image `image`. `k` must be under `most`: the format counted its objects.
    pub fn set(&mut self, image: usize, k: usize, class: i64, [x1, y1, x2, y2]: [f32; 4]) {
        assert!(k < self.most, "object {k} of an image past the {} a target holds", self.most);
        let at = (image * self.most + k) * 5;
        self.rows[at..at + 5].copy_from_slice(&[class as f32, x1, y1, x2, y2]);
    }

    pub fn tensor(self) -> Result<Tensor, DataError> {
        Tensor::f_from_slice(&self.rows)
            .and_then(|t| t.f_view([self.images as i64, self.most as i64, 5]))
            .map_err(|e| DataError::Invalid(e.to_string()))
    }
}
