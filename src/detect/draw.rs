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
/// The side each image is drawn at, whatever its own (128-px mosaics at 3×, 640-px photos at 0.6×).
const SHOWN_SIDE: f64 = 384.0;
const COLUMNS: usize = 4;

/// Draws `images` (input `[channels, h, w]`, detections, truths) in a grid into `path` (PNG).
pub fn predictions(images: &[(Tensor, ImageBoxes, ImageBoxes)], path: &Path) -> Result<(), String> {
    load_font().map_err(|e| e.to_string())?;
    let Some((first, _, _)) = images.first() else { return Ok(()) };
    let (h, w) = (first.size()[1], first.size()[2]);
    let zoom = SHOWN_SIDE / h.max(w) as f64;
    let (dw, dh) = ((w as f64 * zoom).round() as i32, (h as f64 * zoom).round() as i32);
    let (cw, ch) = (dw + 8, dh + 8);
    let rows = images.len().div_ceil(COLUMNS) as i32;
    let cols = images.len().min(COLUMNS) as i32;
    let root = BitMapBackend::new(path, ((cols * cw) as u32, (rows * ch) as u32)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    for (i, (input, dets, truths)) in images.iter().enumerate() {
        let (ox, oy) = ((i % COLUMNS) as i32 * cw + 4, (i / COLUMNS) as i32 * ch + 4);
        let pixels = display_pixels(input, dw, dh)?;
        for (k, color) in pixels.iter().enumerate() {
            root.draw_pixel((ox + k as i32 % dw, oy + k as i32 / dw), color).map_err(err)?;
        }
        let rect = |b: &[f64; 4]| {
            let p = |v: f64, o: i32| o + (v * zoom).round() as i32;
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

/// The image `[channels, h, w]` (scaled to 0–255 from its own range) resampled to `dw` × `dh` by
/// nearest neighbour, row by row.
fn display_pixels(input: &Tensor, dw: i32, dh: i32) -> Result<Vec<RGBColor>, String> {
    let x = input.to_kind(Kind::Float);
    let (lo, hi) = (x.min().double_value(&[]), x.max().double_value(&[]));
    let x = ((x - lo) * (255.0 / (hi - lo).max(1e-6))).clamp(0.0, 255.0).to_kind(Kind::Uint8).contiguous();
    let (c, h, w) = (x.size()[0] as usize, x.size()[1] as usize, x.size()[2] as usize);
    let px = Vec::<u8>::try_from(x.view([-1])).map_err(|e| e.to_string())?;
    let at = |k: usize, y: usize, xx: usize| px[k * h * w + y * w + xx];
    let mut out = Vec::with_capacity((dw * dh) as usize);
    for dy in 0..dh as usize {
        let y = (dy * h / dh as usize).min(h - 1);
        for dx in 0..dw as usize {
            let xx = (dx * w / dw as usize).min(w - 1);
            out.push(if c >= 3 {
                RGBColor(at(0, y, xx), at(1, y, xx), at(2, y, xx))
            } else {
                RGBColor(at(0, y, xx), at(0, y, xx), at(0, y, xx))
            });
        }
    }
    Ok(out)
}
