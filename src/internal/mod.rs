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
