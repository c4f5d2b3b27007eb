//! `predictions.png`: test images with their true boxes (green) and predicted ones (red, with
//! class and score), so a person can see what the detector finds. Predictions scoring under
//! `SHOWN` are left out (evaluation keeps them all for mAP).

use super::map::ImageBoxes;
use crate::telemetry::plot::load_font;
use plotters::prelude::*;
use std::path::Path;
use tch::{Kind, Tensor};

/// Least score of a drawn prediction.
pub const SHOWN: f64 = 0.3;
/// Pixels per image pixel.
const ZOOM: i32 = 3;
const COLUMNS: usize = 4;

/// Draws `images` (input `[channels, h, w]`, detections, truths) in a grid into `path` (PNG).
pub fn predictions(images: &[(Tensor, ImageBoxes, ImageBoxes)], path: &Path) -> Result<(), String> {
    load_font().map_err(|e| e.to_string())?;
    let Some((first, _, _)) = images.first() else { return Ok(()) };
    let (h, w) = (first.size()[1] as i32, first.size()[2] as i32);
    let (cw, ch) = (w * ZOOM + 8, h * ZOOM + 8);
    let rows = images.len().div_ceil(COLUMNS) as i32;
    let cols = images.len().min(COLUMNS) as i32;
    let root = BitMapBackend::new(path, ((cols * cw) as u32, (rows * ch) as u32)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    for (i, (input, dets, truths)) in images.iter().enumerate() {
        let (ox, oy) = ((i % COLUMNS) as i32 * cw + 4, (i / COLUMNS) as i32 * ch + 4);
        draw_pixels(&root, input, (ox, oy)).map_err(err)?;
        let rect = |b: &[f64; 4]| {
            let p = |v: f64, o: i32| o + (v * ZOOM as f64).round() as i32;
            [(p(b[0], ox), p(b[1], oy)), (p(b[2], ox), p(b[3], oy))]
        };
        for b in &truths.boxes {
            root.draw(&Rectangle::new(rect(b), GREEN.stroke_width(2))).map_err(err)?;
        }
        for ((b, c), s) in dets.boxes.iter().zip(&dets.classes).zip(&dets.scores).filter(|(_, s)| **s >= SHOWN) {
            let r = rect(b);
            root.draw(&Rectangle::new(r, RED.stroke_width(2))).map_err(err)?;
            let label = format!("{c} {:.0}%", s * 100.0);
            root.draw(&Text::new(label, (r[0].0 + 2, r[0].1 + 2), ("sans-serif", 13).into_font().color(&RED))).map_err(err)?;
        }
    }
    root.present().map_err(err)
}

/// The image (scaled to 0–255 from its own range) at `origin`, `ZOOM` times its size.
fn draw_pixels<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    input: &Tensor,
    origin: (i32, i32),
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let x = input.to_kind(Kind::Float);
    let (lo, hi) = (x.min().double_value(&[]), x.max().double_value(&[]));
    let x = ((x - lo) * (255.0 / (hi - lo).max(1e-6))).clamp(0.0, 255.0).to_kind(Kind::Uint8).contiguous();
    let (c, h, w) = (x.size()[0], x.size()[1] as i32, x.size()[2] as i32);
    let px = Vec::<u8>::try_from(x.view([-1])).unwrap_or_default();
    let at = |k: i64, y: i32, xx: i32| px[(k * (h * w) as i64 + (y * w + xx) as i64) as usize];
    for y in 0..h {
        for xx in 0..w {
            let color = if c >= 3 {
                RGBColor(at(0, y, xx), at(1, y, xx), at(2, y, xx))
            } else {
                RGBColor(at(0, y, xx), at(0, y, xx), at(0, y, xx))
            };
            let (x0, y0) = (origin.0 + xx * ZOOM, origin.1 + y * ZOOM);
            area.draw(&Rectangle::new([(x0, y0), (x0 + ZOOM, y0 + ZOOM)], color.filled()))?;
        }
    }
    Ok(())
}
