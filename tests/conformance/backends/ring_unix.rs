//! The ring over Unix sockets (`comm.local_transport: unix`).

use crate::conformance::{always, unlimited, Backend, Joiner, Launch, HOST};
use std::time::Duration;

pub static BACKEND: Backend =
    Backend { name: "ring_unix", available: always, launch: Launch::Threads(group), worlds: &[2, 3], max_world: unlimited, caps: HOST };

fn group(world: usize, timeout: Duration) -> Result<Joiner, String> {
    super::ring_group(world, timeout, super::unix, super::plain)
}
