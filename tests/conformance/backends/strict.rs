//! The strict device wrapper (`comm/strict.rs`) around the ring: tensors must be contiguous and
//! on its device, as NCCL wants them; a strided view is refused, not staged.

use crate::conformance::{always, unlimited, Backend, Caps, Comm, Joiner, Launch, HOST};
use ringtrain::comm::{RingComm, StrictDevice};
use std::time::Duration;

pub static BACKEND: Backend = Backend {
    name: "strict",
    available: always,
    launch: Launch::Threads(group),
    worlds: &[2],
    max_world: unlimited,
    caps: Caps { strided_tensors: false, ..HOST },
};

fn group(world: usize, timeout: Duration) -> Result<Joiner, String> {
    super::ring_group(world, timeout, super::unix, strict)
}

fn strict(ring: RingComm) -> Comm {
    Box::new(StrictDevice::new(Box::new(ring), tch::Device::Cpu))
}
