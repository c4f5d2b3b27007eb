//! What the binaries need and library users do not: not a stable API.
//!
//! - `worker` — the `ringtrain` binary's job: config and environment to a finished run.
//! - `supervise` — `ringrun`'s process group: spawn, prefix output, stop on failure, restart.
//! - `nodes` — launchers on several nodes acting as one job (join, failure, restart together).
//! - `bench` — the all-reduce benchmark behind `ringbench`.
//! - `status` — ringrun's live status line on a terminal.
//! - `sample` — `ringtrain sample`: text from a trained GPT.
//! - `fault` — test-only fault injection (a worker that exits or hangs at a given step).

pub mod bench;
pub mod fault;
pub mod nodes;
pub mod sample;
pub mod status;
pub mod supervise;
pub mod worker;

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
