//! The shared-memory ring with every f32 and bf16 buffer from `alloc_reduce_buffer`: the
//! collectives read the peers' buffers in place (`comm/shared_buf.rs`), as DDP's buckets do.

use crate::conformance::{always, unlimited, Backend, Caps, Joiner, Launch, HOST};
use std::time::Duration;

pub static BACKEND: Backend = Backend {
    name: "shared_buffers",
    available: always,
    launch: Launch::Threads(group),
    worlds: &[2, 3],
    max_world: unlimited,
    caps: Caps { reduce_buffers: true, ..HOST },
};

fn group(world: usize, timeout: Duration) -> Result<Joiner, String> {
    super::ring_group(world, timeout, super::shm, super::plain)
}
