//! Where a step's time goes — data wait, forward, backward, exposed communication, optimizer —
//! summed per epoch, and optionally a Chrome-trace timeline per rank (open it in Perfetto or
//! chrome://tracing) with every bucket's all-reduce beside the phases.
//! Times are host-side: on CUDA they include the launch, not the kernels' completion.

use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    DataWait,
    Forward,
    Backward,
    Communication,
    Optimizer,
}

impl Phase {
    const ALL: [Phase; 5] = [Phase::DataWait, Phase::Forward, Phase::Backward, Phase::Communication, Phase::Optimizer];

    pub fn name(self) -> &'static str {
        match self {
            Phase::DataWait => "data_wait",
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Communication => "communication",
            Phase::Optimizer => "optimizer",
        }
    }
}

pub struct Breakdown {
    totals: [Duration; 5],
    steps: u64,
    /// Since the last `take_window` (the logging window).
    window: [Duration; 5],
    window_steps: u64,
    /// Since the start (for every rank's bars in the plot).
    run: [Duration; 5],
    run_steps: u64,
    trace: Option<Vec<serde_json::Value>>,
    origin: Instant,
    rank: usize,
}

impl Breakdown {
    pub fn new(rank: usize, trace: bool) -> Self {
        Self {
            totals: [Duration::ZERO; 5],
            steps: 0,
            window: [Duration::ZERO; 5],
            window_steps: 0,
            run: [Duration::ZERO; 5],
            run_steps: 0,
            trace: trace.then(Vec::new),
            origin: Instant::now(),
            rank,
        }
    }

    /// Records `phase` as having run from `start` until now.
    pub fn record(&mut self, phase: Phase, start: Instant) {
        self.record_span(phase, start, Instant::now());
    }

    pub fn record_span(&mut self, phase: Phase, start: Instant, end: Instant) {
        self.totals[phase as usize] += end.saturating_duration_since(start);
        self.window[phase as usize] += end.saturating_duration_since(start);
        self.run[phase as usize] += end.saturating_duration_since(start);
        self.event(phase.name(), "step", start, end);
    }

    /// Whether a timeline is being recorded (callers skip building event names otherwise).
    pub fn tracing(&self) -> bool {
        self.trace.is_some()
    }

    /// A timeline-only event (e.g. one bucket's all-reduce).
    pub fn event(&mut self, name: &str, category: &str, start: Instant, end: Instant) {
        if let Some(t) = &mut self.trace {
            t.push(json!({
                "name": name, "cat": category, "ph": "X", "pid": self.rank, "tid": if category == "step" { 0 } else { 1 },
                "ts": (start - self.origin).as_secs_f64() * 1e6, "dur": (end - start).as_secs_f64() * 1e6,
            }));
        }
    }

    pub fn step_done(&mut self) {
        self.steps += 1;
        self.window_steps += 1;
        self.run_steps += 1;
    }

    /// Mean milliseconds per step for each phase over the whole run so far.
    pub fn run_means(&self) -> serde_json::Map<String, serde_json::Value> {
        let steps = self.run_steps.max(1) as f64;
        Phase::ALL.iter().map(|p| (p.name().to_string(), json!(self.run[*p as usize].as_secs_f64() * 1e3 / steps))).collect()
    }

    /// This rank's timeline events (empty unless tracing), for merging.
    pub fn trace_events(&self) -> &[serde_json::Value] {
        self.trace.as_deref().unwrap_or(&[])
    }

    /// Mean milliseconds per step for each phase since the last call (the logging window).
    pub fn take_window(&mut self) -> Vec<(&'static str, f64)> {
        let steps = self.window_steps.max(1) as f64;
        let out = Phase::ALL.iter().map(|p| (p.name(), self.window[*p as usize].as_secs_f64() * 1e3 / steps)).collect();
        self.window = [Duration::ZERO; 5];
        self.window_steps = 0;
        out
    }

    /// Mean milliseconds per step for each phase since the last `take`, then resets.
    pub fn take(&mut self) -> serde_json::Map<String, serde_json::Value> {
        let steps = self.steps.max(1) as f64;
        let out = Phase::ALL.iter().map(|p| (p.name().to_string(), json!(self.totals[*p as usize].as_secs_f64() * 1e3 / steps))).collect();
        self.totals = [Duration::ZERO; 5];
        self.steps = 0;
        out
    }

    /// Writes the Chrome trace (when enabled).
    pub fn write_trace(&self, path: &Path) -> std::io::Result<()> {
        let Some(events) = &self.trace else { return Ok(()) };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let names = json!({"name": "thread_name", "ph": "M", "pid": self.rank, "tid": 1, "args": {"name": "all_reduce buckets"}});
        let mut all = vec![names];
        all.extend(events.iter().cloned());
        std::fs::write(path, serde_json::to_vec(&json!({ "traceEvents": all, "displayTimeUnit": "ms" }))?)
    }
}

/// Peak resident memory of this process in MiB (getrusage's ru_maxrss).
pub fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage fills the struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_per_step_and_resets() {
        let mut b = Breakdown::new(0, true);
        let t = Instant::now() - Duration::from_millis(10);
        b.record(Phase::Forward, t);
        b.step_done();
        b.step_done();
        let m = b.take();
        let fwd = m["forward"].as_f64().unwrap();
        assert!((4.5..50.0).contains(&fwd), "{fwd}");
        assert_eq!(m["backward"].as_f64().unwrap(), 0.0);
        assert_eq!(b.take()["forward"].as_f64().unwrap(), 0.0);
        let dir = tempfile::tempdir().unwrap();
        b.write_trace(&dir.path().join("t/rank0.json")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("t/rank0.json")).unwrap()).unwrap();
        assert_eq!(v["traceEvents"][1]["name"], "forward");
    }
}
