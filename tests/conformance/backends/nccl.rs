//! NCCL, one GPU per rank, where GPUs are present: world 1 on one GPU, 2 on two (NCCL cannot
//! put two ranks on one GPU). Its own process loads libtorch's CUDA backend before any tch call.
//! NCCL sends no headers, so a mismatched call or a lost peer shows as its watchdog's timeout.

use crate::conformance::{Absent, Backend, Caps, Failures, Joiner, Launch};
use ringtrain::comm::nccl::NcclComm;
use ringtrain::rendezvous::{MemoryStore, Store};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Kind};

const KINDS: &[Kind] = &[Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double, Kind::Uint8];

pub static BACKEND: Backend = Backend {
    name: "nccl",
    available,
    launch: Launch::ThreadsInOwnProcess { group, prepare },
    worlds: &[1, 2],
    max_world: gpus,
    caps: Caps {
        device: cuda,
        reduce_buffers: false,
        reduce_kinds: KINDS,
        shard_kinds: KINDS,
        bf16_slices: false,
        strided_tensors: false,
        names_mismatches: false,
        failures: Failures::Returned,
    },
};

/// GPUs nvidia-smi lists (0 without a driver).
fn gpus() -> usize {
    Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .map_or(0, |o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("GPU ")).count())
}

fn available() -> Result<(), Absent> {
    match gpus() {
        0 => Err(Absent::Hardware("no GPU (nvidia-smi lists none)".into())),
        _ => Ok(()),
    }
}

fn cuda(rank: usize) -> Device {
    Device::Cuda(rank)
}

fn prepare() -> Result<(), String> {
    ringtrain::device::load_cuda().map_err(|e| e.to_string())
}

fn group(world: usize, timeout: Duration) -> Result<Joiner, String> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    Ok(Arc::new(move |rank| Ok(Box::new(NcclComm::new(store.as_ref(), rank, world, rank, timeout).map_err(|e| e.to_string())?) as _)))
}
