//! A test backend as strict about devices as NCCL: the device contract made checkable.
//!
//! The contract every caller keeps: **a tensor handed to a communicator lies on the
//! communicator's device** — the model's device for a device-native backend (`device_native()`:
//! NCCL), any device for host backends, which stage what is not host memory through it. Byte
//! and float slices are host memory and always allowed. NCCL rejects a tensor elsewhere; the
//! host backends would silently accept it, so a caller that sends, say, optimizer state loaded
//! on the CPU would pass every CPU test and fail only under NCCL.
//!
//! `StrictDevice` wraps a host backend (the ring), declares itself device-native on `device`, and
//! rejects every tensor that is not there, with NCCL's words; what passes is staged through the
//! inner backend. With `device: cuda` and 2 ranks sharing one GPU it takes every path NCCL takes
//! (buckets on the GPU, broadcasts of parameters, buffers and optimizer state, checkpoints,
//! `init_from`, evaluation, the stop vote) where NCCL itself needs one GPU per rank. The GPU check
//! runs training under it (`RINGTRAIN_STRICT_DEVICE=1`); on a CPU-only machine every tensor is on
//! the one device, so only its rejection itself can be tested there.

use super::{CommError, Communicator, Op};
use std::time::Duration;
use tch::{Device, Tensor};

pub struct StrictDevice {
    inner: Box<dyn Communicator>,
    device: Device,
}

impl StrictDevice {
    pub fn new(inner: Box<dyn Communicator>, device: Device) -> StrictDevice {
        StrictDevice { inner, device }
    }

    fn check(&self, t: &Tensor, op: Op) -> Result<(), CommError> {
        if t.device() != self.device || !t.is_contiguous() {
            return Err(CommError::BadArgument {
                op,
                detail: format!(
                    "strict device check (as NCCL): needs a contiguous tensor on {:?}, got one on {:?}{}",
                    self.device,
                    t.device(),
                    if t.is_contiguous() { "" } else { " (not contiguous)" }
                ),
            });
        }
        Ok(())
    }
}

impl Communicator for StrictDevice {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }
    fn device_native(&self) -> bool {
        true
    }
    // Off: this wrapper checks where tensors live, not when they are ready; NCCL's overlapped
    // ordering (events on its own stream) is what the GPU check's NCCL parts run.
    fn supports_overlap(&self) -> bool {
        false
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.inner.all_reduce_sum(buf)
    }
    fn all_reduce_sum_bf16(&mut self, buf: &mut [half::bf16]) -> Result<(), CommError> {
        self.inner.all_reduce_sum_bf16(buf)
    }
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        self.inner.broadcast(buf, root)
    }
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        self.inner.all_gather(mine)
    }
    fn set_idle_waits(&mut self, idle: bool) {
        self.inner.set_idle_waits(idle)
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.inner.barrier()
    }
    fn shard_index(&self) -> usize {
        self.inner.shard_index()
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.inner.reduce_scatter_sum(buf)
    }
    fn all_gather_shards(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.inner.all_gather_shards(buf)
    }
    fn reduce_scatter_tensor(&mut self, t: &mut Tensor) -> Result<(), CommError> {
        self.check(t, Op::ReduceScatter)?;
        self.inner.reduce_scatter_tensor(t)
    }
    fn all_gather_shards_tensor(&mut self, t: &mut Tensor) -> Result<(), CommError> {
        self.check(t, Op::AllGatherShards)?;
        self.inner.all_gather_shards_tensor(t)
    }
    fn all_reduce_tensor(&mut self, t: &mut Tensor) -> Result<(), CommError> {
        self.check(t, Op::AllReduce)?;
        self.inner.all_reduce_tensor(t)
    }
    fn broadcast_tensor(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
        self.check(t, Op::Broadcast)?;
        self.inner.broadcast_tensor(t, root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::RingComm;

    /// Declared on a device no tensor here is on, every tensor collective refuses a CPU tensor
    /// (and names both devices) while slices go through: the check the GPU check relies on.
    #[test]
    fn tensors_off_the_device_are_refused_slices_are_not() {
        let store = crate::rendezvous::MemoryStore::default();
        let opts = crate::comm::RingOptions::new("t", std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), Duration::from_secs(5));
        let ring = RingComm::connect(&store, 0, 1, &opts).unwrap();
        let mut strict = StrictDevice::new(Box::new(ring), Device::Cuda(0));
        assert!(strict.device_native());
        let mut t = Tensor::from_slice(&[1f32, 2.0]);
        for (name, r) in [
            ("all_reduce", strict.all_reduce_tensor(&mut t)),
            ("broadcast", strict.broadcast_tensor(&mut t, 0)),
            ("reduce_scatter", strict.reduce_scatter_tensor(&mut t)),
            ("all_gather", strict.all_gather_shards_tensor(&mut t)),
        ] {
            let e = r.expect_err(name).to_string();
            assert!(e.contains("Cuda(0)") && e.contains("Cpu"), "{name}: {e}");
        }
        let mut s = [1f32, 2.0];
        strict.all_reduce_sum(&mut s).unwrap();
        // On its own device a contiguous tensor passes; a strided view does not.
        let mut cpu = StrictDevice::new(Box::new(RingComm::connect(&store, 0, 1, &opts).unwrap()), Device::Cpu);
        cpu.all_reduce_tensor(&mut t).unwrap();
        let mut view = Tensor::from_slice(&[1f32, 2.0, 3.0, 4.0]).view([2, 2]).tr();
        assert!(cpu.all_reduce_tensor(&mut view).unwrap_err().to_string().contains("not contiguous"));
    }
}
