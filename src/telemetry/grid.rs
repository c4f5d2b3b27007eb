//! Images as one PNG: a grid of grayscale tiles (samples of a generative model).

use std::path::Path;
use tch::{Kind, Tensor};

/// `images` ([n, h, w], values in [0, 1]) as a grid `cols` tiles wide with a 2-pixel gray gutter,
/// written to `out` through a temporary file (no half-written PNG).
pub fn save_grid(images: &Tensor, cols: usize, out: &Path) -> Result<(), String> {
    let [n, h, w] = images.size()[..] else {
        return Err(format!("save_grid: images of shape {:?}; [n, height, width] needed", images.size()));
    };
    let (n, h, w, cols) = (n as usize, h as usize, w as usize, cols.max(1));
    let rows = n.div_ceil(cols);
    let gap = 2;
    let (width, height) = (cols * (w + gap) + gap, rows * (h + gap) + gap);
    let pixels: Vec<f32> =
        Vec::<f32>::try_from(images.to_kind(Kind::Float).clamp(0.0, 1.0).contiguous().view(-1)).map_err(|e| e.to_string())?;
    let mut img = image::GrayImage::from_pixel(width as u32, height as u32, image::Luma([128]));
    for (k, tile) in pixels.chunks_exact(h * w).enumerate() {
        let (x0, y0) = (gap + (k % cols) * (w + gap), gap + (k / cols) * (h + gap));
        for (i, v) in tile.iter().enumerate() {
            img.put_pixel((x0 + i % w) as u32, (y0 + i / w) as u32, image::Luma([(v * 255.0).round() as u8]));
        }
    }
    let tmp = out.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))
}
