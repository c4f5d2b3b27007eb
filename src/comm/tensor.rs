//! Collectives on libtorch tensors: checks the tensor can be viewed as a flat host buffer, then
//! runs the byte/f32 collective on its storage without copies.

use super::{CommError, Communicator, Op};
use tch::{Device, Kind, Tensor};

fn check(t: &Tensor, op: Op) -> Result<(), CommError> {
    if t.device() != Device::Cpu {
        return Err(CommError::BadArgument { op, detail: format!("tensor on {:?}, host backends need CPU tensors", t.device()) });
    }
    if !t.is_contiguous() {
        return Err(CommError::BadArgument { op, detail: "tensor is not contiguous".into() });
    }
    Ok(())
}

/// Sums an f32 CPU tensor across ranks, in place.
pub fn all_reduce_tensor(comm: &mut dyn Communicator, t: &mut Tensor) -> Result<(), CommError> {
    check(t, Op::AllReduce)?;
    if t.kind() != Kind::Float {
        return Err(CommError::BadArgument { op: Op::AllReduce, detail: format!("dtype {:?}, expected f32", t.kind()) });
    }
    let n = t.numel();
    if n == 0 {
        return comm.all_reduce_sum(&mut []);
    }
    // SAFETY: contiguous CPU f32 tensor with n elements; we hold the only handle during the call.
    let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) };
    comm.all_reduce_sum(buf)
}

/// Broadcasts any contiguous CPU tensor's bytes from `root`.
pub fn broadcast_tensor(comm: &mut dyn Communicator, t: &mut Tensor, root: usize) -> Result<(), CommError> {
    check(t, Op::Broadcast)?;
    let bytes = t.numel() * t.kind().elt_size_in_bytes();
    if bytes == 0 {
        return comm.broadcast(&mut [], root);
    }
    // SAFETY: contiguous CPU tensor of `bytes` bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, bytes) };
    comm.broadcast(buf, root)
}
