//! ringrun's live status line. When ringrun's stderr is a terminal it asks the workers
//! (`RINGTRAIN_STATUS=1`) for a status record at every logging step instead of rank 0's INFO
//! lines, and keeps one line at the bottom of the terminal up to date:
//!
//! ```text
//! step 340/938 (36%) | loss 0.4127 | 3,870 samples/s | slowest rank 1: 31.2 ms/step | ETA 0:21
//! ```
//!
//! Anything else a worker prints (warnings, errors, the final lines) appears above it, prefixed
//! as always. Piped (a file, CI, `| tee`), nothing changes: no records are asked for.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

pub use crate::telemetry::STATUS_MARKER as MARKER;

#[derive(Default)]
struct Board {
    /// Latest record per rank.
    ranks: BTreeMap<u64, serde_json::Value>,
    /// When the first record arrived, and at which step: the ETA is measured from there.
    first: Option<(Instant, u64)>,
    shown: bool,
}

static BOARD: Mutex<Option<Board>> = Mutex::new(None);

/// Turns the status line on (ringrun on a terminal).
pub fn enable() {
    *BOARD.lock().unwrap_or_else(|p| p.into_inner()) = Some(Board::default());
}

pub fn enabled() -> bool {
    BOARD.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

fn fmt_thousands(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_eta(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

impl Board {
    /// The one line: rank 0's step, loss and rate; the slowest rank; the time left.
    fn line(&self) -> String {
        let Some(r0) = self.ranks.get(&0).or_else(|| self.ranks.values().next()) else { return String::new() };
        let step = r0["step"].as_u64().unwrap_or(0);
        let total = r0["total"].as_u64().unwrap_or(0);
        let mut parts = vec![if total > 0 {
            format!("step {step}/{total} ({:.0}%)", 100.0 * step as f64 / total as f64)
        } else {
            format!("step {step}")
        }];
        if let Some(l) = r0["loss"].as_f64() {
            parts.push(format!("loss {l:.4}"));
        }
        if let Some(r) = r0["rate"].as_f64() {
            parts.push(format!("{} {}", fmt_thousands(r), r0["unit"].as_str().unwrap_or("samples/s")));
        }
        let slowest = self.ranks.iter().filter_map(|(k, v)| v["step_ms"].as_f64().map(|ms| (*k, ms))).max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((rank, ms)) = slowest {
            parts.push(format!("slowest rank {rank}: {ms:.1} ms/step"));
        }
        if let (Some((t0, s0)), true) = (self.first, total > step) {
            if step > s0 {
                let per_step = t0.elapsed().as_secs_f64() / (step - s0) as f64;
                parts.push(format!("ETA {}", fmt_eta(per_step * (total - step) as f64)));
            }
        }
        parts.join(" | ")
    }

    fn draw(&mut self, err: &mut impl Write) {
        let _ = write!(err, "\r\x1b[2K{}", self.line());
        let _ = err.flush();
        self.shown = true;
    }
}

/// Takes a worker's stdout line: a status record is absorbed (true), anything else is left to
/// the caller (false).
pub fn absorb(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(MARKER.as_bytes()) else { return false };
    let mut guard = BOARD.lock().unwrap_or_else(|p| p.into_inner());
    let Some(board) = guard.as_mut() else { return true };
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(rest) {
        let rank = v["rank"].as_u64().unwrap_or(0);
        let step = v["step"].as_u64().unwrap_or(0);
        if board.first.is_none() && rank == 0 {
            board.first = Some((Instant::now(), step));
        }
        board.ranks.insert(rank, v);
        board.draw(&mut std::io::stderr().lock());
    }
    true
}

/// Writes a worker's ordinary line above the status line (or just writes it, without one).
pub fn print(to_stderr: bool, prefix: &[u8], line: &[u8]) {
    let mut guard = BOARD.lock().unwrap_or_else(|p| p.into_inner());
    let board = guard.as_mut().filter(|b| b.shown);
    let mut err = std::io::stderr().lock();
    if board.is_some() {
        let _ = err.write_all(b"\r\x1b[2K");
    }
    if to_stderr {
        let _ = err.write_all(prefix).and_then(|_| err.write_all(line));
    } else {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(prefix).and_then(|_| o.write_all(line)).and_then(|_| o.flush());
    }
    if let Some(b) = board {
        b.draw(&mut err);
    }
}

/// Forgets the ranks' records (a restarted group starts its own line and ETA).
pub fn reset() {
    let mut guard = BOARD.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = guard.as_mut() {
        let shown = b.shown;
        *b = Board { shown, ..Board::default() };
    }
}

/// One of ringrun's own messages, printed above the status line.
pub fn message(text: &str) {
    print(true, b"", format!("{text}\n").as_bytes());
}

/// Leaves the last status on its own line when the group ends.
pub fn finish() {
    let mut guard = BOARD.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = guard.as_mut().filter(|b| b.shown) {
        let mut err = std::io::stderr().lock();
        b.draw(&mut err);
        let _ = err.write_all(b"\n");
        b.shown = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_slowest_rank_and_the_time_left() {
        let mut b = Board::default();
        b.first = Some((Instant::now() - std::time::Duration::from_secs(10), 100));
        b.ranks.insert(
            0,
            serde_json::json!({"rank": 0, "step": 200, "total": 1200, "loss": 0.5, "rate": 12345.6, "unit": "samples/s", "step_ms": 30.0}),
        );
        b.ranks.insert(1, serde_json::json!({"rank": 1, "step": 200, "total": 1200, "step_ms": 41.5}));
        let line = b.line();
        assert!(
            line.starts_with("step 200/1200 (17%) | loss 0.5000 | 12,346 samples/s | slowest rank 1: 41.5 ms/step | ETA 1:40"),
            "{line}"
        );
        assert_eq!(fmt_eta(3725.0), "1:02:05");
        assert_eq!(fmt_thousands(999.0), "999");
    }
}
