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
