//! What the binaries need and library users do not: not a stable API.
//!
//! - `supervise` — `ringrun`'s process group: spawn, prefix output, stop on failure, restart.
//! - `nodes` — launchers on several nodes acting as one job (join, failure, restart together).
//! - `elastic` — `--nnodes MIN:MAX`: which nodes form each generation (arrivals, heartbeats).
//! - `bench` — the all-reduce benchmark behind `ringbench`.
//! - `status` — ringrun's live status line on a terminal.
//! - `sample` — `ringtrain sample`: text from a trained GPT.
//! - `pet` — ringrun's reading of torchrun's `PET_*` variables (Kubernetes' training operator).

pub mod bench;
pub mod elastic;
pub mod nodes;
pub mod pet;
pub mod sample;
pub mod status;
pub mod supervise;
