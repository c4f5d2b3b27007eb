//! Collectives on libtorch tensors for host backends: a contiguous CPU tensor is reduced in its
//! own storage (no copy); a tensor on another device (or non-contiguous) goes through a host copy.

use super::{CommError, Communicator, Op};
use tch::{Device, Kind, Tensor};

fn host_view(t: &Tensor) -> (Tensor, bool) {
    if t.device() == Device::Cpu && t.is_contiguous() {
        (t.shallow_clone(), false)
    } else {
        (t.to_device(Device::Cpu).contiguous(), true)
    }
}

pub fn all_reduce_staged<C: Communicator + ?Sized>(comm: &mut C, t: &mut Tensor) -> Result<(), CommError> {
    match t.kind() {
        Kind::Float => staged(comm, t, Op::AllReduce, |c, buf: &mut [f32]| c.all_reduce_sum(buf)),
        Kind::BFloat16 => staged(comm, t, Op::AllReduce, |c, buf: &mut [half::bf16]| c.all_reduce_sum_bf16(buf)),
        k => Err(CommError::BadArgument { op: Op::AllReduce, detail: format!("dtype {k:?}: host backends reduce f32 and bf16") }),
    }
}

/// `t /= divisor` in place, as DDP averages a bucket before its all-reduce.
pub fn divide(t: &mut Tensor, divisor: f64) -> Result<(), CommError> {
    tch::no_grad(|| t.f_div_scalar_(divisor)).map(|_| ()).map_err(|e| CommError::BadArgument { op: Op::AllReduce, detail: e.to_string() })
}

pub fn reduce_scatter_staged<C: Communicator + ?Sized>(comm: &mut C, t: &mut Tensor) -> Result<(), CommError> {
    expect_f32(t, Op::ReduceScatter)?;
    staged(comm, t, Op::ReduceScatter, |c, buf: &mut [f32]| c.reduce_scatter_sum(buf))
}

pub fn all_gather_shards_staged<C: Communicator + ?Sized>(comm: &mut C, t: &mut Tensor) -> Result<(), CommError> {
    expect_f32(t, Op::AllGatherShards)?;
    staged(comm, t, Op::AllGatherShards, |c, buf: &mut [f32]| c.all_gather_shards(buf))
}

fn expect_f32(t: &Tensor, op: Op) -> Result<(), CommError> {
    match t.kind() {
        Kind::Float => Ok(()),
        k => Err(CommError::BadArgument { op, detail: format!("dtype {k:?}: only f32 is sharded") }),
    }
}

/// Runs `f` on the tensor's elements as a host slice of `T` (the tensor's dtype), staging it
/// through host memory when it is elsewhere, and copies the result back.
fn staged<C: Communicator + ?Sized, T>(
    comm: &mut C,
    t: &mut Tensor,
    op: Op,
    f: impl FnOnce(&mut C, &mut [T]) -> Result<(), CommError>,
) -> Result<(), CommError> {
    let (host, staged) = host_view(t);
    let n = host.numel();
    if n == 0 {
        f(comm, &mut [])?;
    } else {
        // SAFETY: a contiguous CPU tensor of n elements of T (the caller matched T to its dtype);
        // we hold the only handle during the call.
        let buf = unsafe { std::slice::from_raw_parts_mut(host.data_ptr() as *mut T, n) };
        f(comm, buf)?;
    }
    if staged {
        tch::no_grad(|| t.f_copy_(&host)).map_err(|e| CommError::BadArgument { op, detail: e.to_string() })?;
    }
    Ok(())
}

pub fn broadcast_staged<C: Communicator + ?Sized>(comm: &mut C, t: &mut Tensor, root: usize) -> Result<(), CommError> {
    let (host, staged) = host_view(t);
    let bytes = host.numel() * host.kind().elt_size_in_bytes();
    if bytes == 0 {
        comm.broadcast(&mut [], root)?;
    } else {
        // SAFETY: contiguous CPU tensor of `bytes` bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(host.data_ptr() as *mut u8, bytes) };
        comm.broadcast(buf, root)?;
    }
    if staged {
        tch::no_grad(|| t.f_copy_(&host)).map_err(|e| CommError::BadArgument { op: Op::Broadcast, detail: e.to_string() })?;
    }
    Ok(())
}
