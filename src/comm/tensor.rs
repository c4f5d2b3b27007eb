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
    if t.kind() != Kind::Float {
        return Err(CommError::BadArgument { op: Op::AllReduce, detail: format!("dtype {:?}: host backends reduce f32", t.kind()) });
    }
    let (host, staged) = host_view(t);
    let n = host.numel();
    if n == 0 {
        comm.all_reduce_sum(&mut [])?;
    } else {
        // SAFETY: contiguous CPU f32 tensor with n elements; we hold the only handle during the call.
        let buf = unsafe { std::slice::from_raw_parts_mut(host.data_ptr() as *mut f32, n) };
        comm.all_reduce_sum(buf)?;
    }
    if staged {
        t.f_copy_(&host).map_err(|e| CommError::BadArgument { op: Op::AllReduce, detail: e.to_string() })?;
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
