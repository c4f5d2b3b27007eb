//! The ring over shared-memory links (`comm.local_transport: shm`, the default), on ordinary
//! buffers: every byte goes through the links.

use crate::conformance::{always, unlimited, Backend, Joiner, Launch, HOST};
use std::time::Duration;

pub static BACKEND: Backend =
    Backend { name: "ring_shm", available: always, launch: Launch::Threads(group), worlds: &[2, 3], max_world: unlimited, caps: HOST };

fn group(world: usize, timeout: Duration) -> Result<Joiner, String> {
    super::ring_group(world, timeout, super::shm, super::plain)
}
