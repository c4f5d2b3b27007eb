//! `ringtrain plot` and each run's `plot.png`: a run (or several, overlaid with a legend) as a
//! picture. Top: loss (train line, eval points), accuracy or perplexity, learning rate; bottom:
//! throughput, and the mean per-step phase breakdown of every rank as stacked bars, so a
//! straggler or a loader that cannot keep up shows at a glance.
//!
//! Reads `metrics.jsonl` (step, eval and epoch lines; a step logged twice — redone after a
//! restart — counts once, the later value) and `breakdown.json` (every rank's phases, written at
//! the end of a run; rank 0's epoch lines stand in for older runs).

use plotters::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: {what}")]
    Read { path: PathBuf, what: String },
    #[error("plot: {0}")]
    Draw(String),
}

/// What a plot shows of one run.
#[derive(Clone, Debug, Default)]
pub struct RunSeries {
    pub name: String,
    /// (global step, train loss, lr, throughput)
    pub steps: Vec<(f64, f64, f64, f64)>,
    /// "samples/s" or "tokens/s".
    pub rate_unit: &'static str,
    /// (global step, eval loss, accuracy or perplexity)
    pub evals: Vec<(f64, f64, Option<f64>)>,
    /// "accuracy" or "perplexity".
    pub metric: &'static str,
    /// Per rank: mean ms per step of each phase.
    pub breakdown: Vec<(usize, Vec<(String, f64)>)>,
}

pub const PHASES: [&str; 5] = ["data_wait", "forward", "backward", "communication", "optimizer"];

fn read_err(path: &Path, what: impl Into<String>) -> PlotError {
    PlotError::Read { path: path.to_path_buf(), what: what.into() }
}

/// Reads a run directory.
pub fn read_run(dir: &Path) -> Result<RunSeries, PlotError> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| read_err(&path, e.to_string()))?;
    let mut run = RunSeries {
        name: dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned()),
        rate_unit: "samples/s",
        metric: "accuracy",
        ..Default::default()
    };
    let mut steps = std::collections::BTreeMap::new();
    let mut evals = std::collections::BTreeMap::new();
    let mut last_epoch_ms = None;
    let mut torn = 0;
    for line in text.lines() {
        // A line cut short by a kill mid-write is skipped, not fatal: the rest still plots.
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            torn += 1;
            continue;
        };
        let step = v["global_step"].as_u64().unwrap_or(0);
        match v["kind"].as_str() {
            Some("step") => {
                let rate = match v["tokens_per_s"].as_f64() {
                    Some(t) => {
                        run.rate_unit = "tokens/s";
                        t
                    }
                    None => v["samples_per_s"].as_f64().unwrap_or(f64::NAN),
                };
                let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
                steps.insert(step, (step as f64, f("loss"), f("lr"), rate));
            }
            Some(kind @ ("eval" | "epoch")) => {
                // A linear probe (contrastive pretraining) reports its accuracy without a loss
                // comparable to the training loss: the point goes to the accuracy panel only.
                if v["test_probe_loss"].is_f64() {
                    run.metric = "linear-probe accuracy";
                }
                let loss = v["test_loss"].as_f64();
                if loss.is_some() || v["test_acc"].is_f64() {
                    let metric = match (v["test_perplexity"].as_f64(), v["test_map50"].as_f64()) {
                        (Some(p), _) => {
                            run.metric = "perplexity";
                            Some(p)
                        }
                        (None, Some(m)) => {
                            run.metric = "mAP@0.5";
                            Some(m)
                        }
                        (None, None) => v["test_acc"].as_f64(),
                    };
                    evals.insert(step, (step as f64, loss.unwrap_or(f64::NAN), metric));
                }
                if kind == "epoch" {
                    last_epoch_ms = v["step_ms"].as_object().cloned();
                }
            }
            _ => {}
        }
    }
    if torn > 0 {
        tracing::warn!("{}: skipped {torn} unreadable line(s)", path.display());
    }
    run.steps = steps.into_values().collect();
    run.evals = evals.into_values().collect();
    let bpath = dir.join("breakdown.json");
    if let Ok(b) = std::fs::read_to_string(&bpath) {
        let v: serde_json::Value = serde_json::from_str(&b).map_err(|e| read_err(&bpath, e.to_string()))?;
        for r in v.as_array().into_iter().flatten() {
            let ms = PHASES.iter().map(|p| (p.to_string(), r["step_ms"][p].as_f64().unwrap_or(0.0))).collect();
            run.breakdown.push((r["rank"].as_u64().unwrap_or(0) as usize, ms));
        }
    } else if let Some(m) = last_epoch_ms {
        run.breakdown.push((0, PHASES.iter().map(|p| (p.to_string(), m.get(*p).and_then(|x| x.as_f64()).unwrap_or(0.0))).collect()));
    }
    Ok(run)
}

/// The TTF used for text: DejaVu Sans (Debian's fonts-dejavu-core, which setup installs), or
/// RINGTRAIN_FONT.
pub(crate) fn load_font() -> Result<(), PlotError> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let candidates: Vec<PathBuf> = std::env::var_os("RINGTRAIN_FONT")
                .map(PathBuf::from)
                .into_iter()
                .chain(["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf"].map(PathBuf::from))
                .collect();
            let path = candidates.iter().find(|p| p.exists()).ok_or_else(|| {
                format!("no font for the plot's text: tried {candidates:?} (apt-get install fonts-dejavu-core, or set RINGTRAIN_FONT)")
            })?;
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
                .map_err(|_| format!("{}: not a usable TrueType font", path.display()))
        })
        .clone()
        .map_err(PlotError::Draw)
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 0.05).max(1e-12);
    (lo - pad, hi + pad)
}

fn draw_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::Draw(e.to_string())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// One line chart: `series(run)` gives (x, y) points per run; `points` draws eval-style markers.
/// A number for an axis label: short, whatever its scale.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        // Four significant digits, trailing zeros dropped.
        let decimals = (3 - a.log10().floor() as i32).clamp(0, 7) as usize;
        format!("{v:.decimals$}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// One line chart over the global-step range `xs`: `series(run)` gives the (x, y) points of its
/// line and of its markers.
fn line_chart(
    area: &Area<'_>,
    title: &str,
    runs: &[RunSeries],
    xs: (f64, f64),
    series: impl Fn(&RunSeries) -> (Vec<(f64, f64)>, Vec<(f64, f64)>),
) -> Result<(), PlotError> {
    let data: Vec<_> = runs.iter().map(&series).collect();
    let (x0, x1) = xs;
    let (y0, y1) = bounds(data.iter().flat_map(|(l, p)| l.iter().chain(p).map(|q| q.1)));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("global step")
        .light_line_style(WHITE.mix(0.0))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| tick(*y))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(draw_err)?;
    for (i, ((line, _), run)) in data.iter().zip(runs).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        if !line.is_empty() {
            chart
                .draw_series(LineSeries::new(line.iter().copied().filter(|p| p.1.is_finite()), color.stroke_width(2)))
                .map_err(draw_err)?
                .label(run.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
    }
    if runs.len() > 1 || data.iter().any(|(_, p)| !p.is_empty()) {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(draw_err)?;
    }
    // Markers after the legend, on top of it: a lone evaluation sits mid-height at the right
    // edge, where the legend goes, and was hidden under it.
    for (i, (_, points)) in data.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(draw_err)?;
    }
    Ok(())
}

fn breakdown_chart(area: &Area<'_>, runs: &[RunSeries]) -> Result<(), PlotError> {
    let bars: Vec<(String, &Vec<(String, f64)>)> =
        runs.iter().flat_map(|r| r.breakdown.iter().map(move |(rank, ms)| (format!("{} r{rank}", r.name), ms))).collect();
    let top = bars.iter().map(|(_, ms)| ms.iter().map(|(_, v)| v).sum::<f64>()).fold(0.0, f64::max).max(1e-3) * 1.15;
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption("time per step by phase, every rank (ms)", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n as f64, 0.0..top)
        .map_err(draw_err)?;
    let labels: Vec<String> = bars.iter().map(|(l, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE.mix(0.0))
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (*x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(draw_err)?;
    let colors = [RGBColor(150, 150, 150), RGBColor(66, 133, 244), RGBColor(219, 68, 55), RGBColor(244, 180, 0), RGBColor(15, 157, 88)];
    for (k, phase) in PHASES.iter().enumerate() {
        let color = colors[k];
        let rects: Vec<Rectangle<(f64, f64)>> = bars
            .iter()
            .enumerate()
            .map(|(i, (_, ms))| {
                let below: f64 = ms.iter().take(k).map(|(_, v)| v).sum();
                let v = ms.get(k).map_or(0.0, |(_, v)| *v);
                Rectangle::new([(i as f64 + 0.15, below), (i as f64 + 0.85, below + v)], color.filled())
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(draw_err)?
            .label(*phase)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// Draws `runs` into a PNG at `out`.
pub fn plot(runs: &[RunSeries], out: &Path) -> Result<(), PlotError> {
    load_font()?;
    let root = BitMapBackend::new(out, (1800, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let (top, bottom) = root.split_vertically(500);
    let upper = top.split_evenly((1, 3));
    let (left, right) = bottom.split_horizontally(600);
    let xs = bounds(runs.iter().flat_map(|r| r.steps.iter().map(|s| s.0).chain(r.evals.iter().map(|e| e.0))));
    line_chart(&upper[0], "loss (line: train, points: eval)", runs, xs, |r| {
        (r.steps.iter().map(|s| (s.0, s.1)).collect(), r.evals.iter().filter(|e| e.1.is_finite()).map(|e| (e.0, e.1)).collect())
    })?;
    let metric = runs.first().map_or("accuracy", |r| r.metric);
    line_chart(&upper[1], &format!("eval {metric}"), runs, xs, |r| {
        let pts: Vec<(f64, f64)> = r.evals.iter().filter_map(|e| e.2.map(|m| (e.0, m))).collect();
        (pts.clone(), pts)
    })?;
    line_chart(&upper[2], "learning rate", runs, xs, |r| (r.steps.iter().map(|s| (s.0, s.2)).collect(), vec![]))?;
    let unit = runs.first().map_or("samples/s", |r| r.rate_unit);
    line_chart(&left, &format!("throughput ({unit}, all ranks)"), runs, xs, |r| (r.steps.iter().map(|s| (s.0, s.3)).collect(), vec![]))?;
    breakdown_chart(&right, runs)?;
    root.present().map_err(|e| PlotError::Draw(format!("{}: {e}", out.display())))
}

/// Reads the runs in `dirs` and plots them to `out`.
pub fn plot_dirs(dirs: &[PathBuf], out: &Path) -> Result<(), PlotError> {
    let runs = dirs.iter().map(|d| read_run(d)).collect::<Result<Vec<_>, _>>()?;
    plot(&runs, out)
}

#[cfg(test)]
mod marker_tests {
    use super::*;

    /// Issue 27, item 6: one evaluation (the one-epoch demo) still shows in the accuracy panel.
    #[test]
    fn a_lone_evaluation_is_drawn_above_the_legend() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunSeries {
            name: "run".into(),
            steps: (1..=12).map(|i| (10.0 * i as f64, 1.0 / i as f64, 0.1, 1000.0)).collect(),
            rate_unit: "samples/s",
            evals: vec![(120.0, 0.4, Some(0.85))],
            metric: "accuracy",
            breakdown: vec![(0, PHASES.iter().map(|p| (p.to_string(), 1.0)).collect())],
        };
        let out = dir.path().join("p.png");
        plot(&[run], &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        let c = Palette99::pick(0).to_rgba();
        let want = image::Rgb([c.0, c.1, c.2]);
        // A 5×5 block of the series' colour in the accuracy panel (x 600..1200, y 0..500): only a
        // marker is that solid (the legend's sample line is 2 px high).
        let solid = |x: u32, y: u32| (0..5).all(|dx| (0..5).all(|dy| *img.get_pixel(x + dx, y + dy) == want));
        assert!((600..1195).any(|x| (0..495).any(|y| solid(x, y))), "no eval marker in the accuracy panel");
    }
}
