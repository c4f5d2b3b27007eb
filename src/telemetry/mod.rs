//! What people read: log lines carrying the rank, metrics.jsonl, rank 0's progress, TensorBoard
//! event files (`tensorboard`).
//!
//! Rank 0 logs at INFO on stderr; the other ranks stay quiet (WARN) unless something is wrong.
//! Every rank also writes INFO to its own file in the run directory. RUST_LOG overrides the
//! stderr level.

#[cfg(feature = "trainer")]
pub mod grid;
#[cfg(feature = "trainer")]
pub mod plot;
pub mod tensorboard;

#[cfg(feature = "trainer")]
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::prelude::*;

/// Installs the global subscriber. Call once, before any logging.
pub fn init_tracing(rank: usize, log_file: Option<&Path>) -> std::io::Result<()> {
    let default = if rank == 0 { "info" } else { "warn" };
    let stderr_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(stderr_filter);
    let file = match log_file {
        Some(p) => {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            // Appended, never truncated: the log of a start that failed is what says why.
            let f = Arc::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?);
            Some(tracing_subscriber::fmt::layer().with_writer(f).with_target(false).with_ansi(false).with_filter(LevelFilter::INFO))
        }
        None => None,
    };
    // Ignore "already set" so tests that run several workers in-process can call this.
    let _ = tracing_subscriber::registry().with(stderr).with(file).try_init();
    Ok(())
}

/// Appends a header line to a log file, so each start of a run (resume, restart) is findable in
/// one appended log: `==== <what> at <UTC time> (pid P) ====`.
pub fn append_log_header(path: &Path, what: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "==== {what} at {} (pid {}) ====", utc_now(), std::process::id())
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ` (no date crate for one line).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// Appends one JSON object per line to metrics.jsonl (rank 0 only; others hold `None`).
pub struct Metrics {
    file: Option<File>,
}

impl Metrics {
    /// Rank 0 appends to `path`; every other rank gets a writer that writes nothing, so the same
    /// code runs on every rank.
    pub fn for_rank(rank: usize, path: &Path) -> std::io::Result<Self> {
        Self::open((rank == 0).then_some(path))
    }

    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let file = match path {
            Some(p) => Some(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
            None => None,
        };
        Ok(Self { file })
    }

    pub fn write(&mut self, value: serde_json::Value) -> std::io::Result<()> {
        if let Some(f) = &mut self.file {
            writeln!(f, "{value}")?;
            f.flush()?;
        }
        Ok(())
    }
}

/// Rank 0's progress: a bar on a terminal; under a launcher (output piped) the periodic log
/// lines carry the same figures.
#[cfg(feature = "trainer")]
pub struct Progress {
    bar: Option<ProgressBar>,
}

#[cfg(feature = "trainer")]
impl Progress {
    pub fn new(show: bool, epoch: usize, steps: u64) -> Self {
        if !show || !std::io::stderr().is_terminal() {
            return Self { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(epoch.to_string());
        Self { bar: Some(bar) }
    }

    /// True when a bar is shown (so periodic log lines would be noise).
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    pub fn update(&self, step: u64, loss: f64, samples_per_s: f64) {
        if let Some(b) = &self.bar {
            b.set_position(step);
            b.set_message(format!("loss {loss:.4} {samples_per_s:.0} samples/s"));
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The marker a worker's status record for ringrun's live status line starts with (one line of
/// JSON after it).
pub const STATUS_MARKER: &str = "@ringtrain-status ";

/// An error and its causes on one line, as anyhow's `{:#}`, but a cause whose text the previous
/// message already ends with is not repeated (typed errors often print their source too:
/// "cannot serve on …: Address already in use" would otherwise say it twice).
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        // A cause already quoted by its context (thiserror's "{source}") is not repeated.
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// A panic (a bug, or a libtorch error inside a tch call that panics, such as CUDA running out
/// of memory) prints one line naming the program, the rank and where, instead of Rust's
/// multi-line report; `RUST_BACKTRACE=1` adds the usual report with the backtrace.
pub fn one_line_panics(program: &'static str) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned());
        // libtorch's messages carry a C++ backtrace after the first line; tch's panics quote them
        // with Debug, so that line break is a literal \n.
        let first = msg.as_deref().and_then(|m| m.lines().find(|l| !l.trim().is_empty())).unwrap_or("(no message)");
        let first = first.split("\\n").next().unwrap_or(first);
        let first = first.strip_prefix("called `Result::unwrap()` on an `Err` value: ").unwrap_or(first);
        let rank = std::env::var("RANK").or_else(|_| std::env::var("OMPI_COMM_WORLD_RANK")).or_else(|_| std::env::var("SLURM_PROCID"));
        let thread = std::thread::current().name().map(|n| format!(" (thread {n})")).unwrap_or_default();
        let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        // The launcher has no rank of its own.
        let who = rank.map(|r| format!("rank {r}: ")).unwrap_or_default();
        eprintln!(
            "{program}: error: {who}internal error{place}{thread}: {first} (a bug or an unhandled libtorch error; \
             RUST_BACKTRACE=1 for the backtrace)"
        );
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            default(info);
        }
    }));
}

#[cfg(test)]
mod tests {
    #[test]
    fn causes_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let e = anyhow::Error::new(crate::rendezvous::StoreError::Bind { addr: "0.0.0.0:1".into(), source: io })
            .context("rank 0 serving the store");
        let text = super::error_text(&e);
        assert_eq!(text.matches("Address already in use").count(), 1, "{text}");
        assert!(text.starts_with("rank 0 serving the store: store: cannot serve on 0.0.0.0:1"), "{text}");
    }
}
