//! The ring over TCP (`comm.local_transport: tcp`, and every link between nodes).

use crate::conformance::{always, unlimited, Backend, Joiner, Launch, HOST};
use std::time::Duration;

pub static BACKEND: Backend =
    Backend { name: "ring_tcp", available: always, launch: Launch::Threads(group), worlds: &[1, 2, 3], max_world: unlimited, caps: HOST };

fn group(world: usize, timeout: Duration) -> Result<Joiner, String> {
    super::ring_group(world, timeout, super::tcp, super::plain)
}
