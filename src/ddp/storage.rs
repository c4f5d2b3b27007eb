//! Giving a buffer's memory back by freeing its storage, and allocating it again before the next
//! use (the shim beside this file): how ZeRO-2/3 release device memory, where pages cannot be
//! handed back one by one as host memory is (`pages`). The buffer and every view into it (a
//! parameter, a `.grad`) stay valid handles: they read the storage's address each time, so after
//! `allocate` they see the new memory. While it is freed nothing may read them: libtorch's
//! kernels do not check (a read is a use of freed memory), so the owners of such views hide them
//! meanwhile (ZeRO-3's parameters are empty, the gradients undefined).
//!
//! What must survive a release lives outside the buffer: this rank's shard is copied into a
//! tensor of its own first (the optimizer steps that copy), and copied back after allocating.

use std::ffi::c_void;
use tch::{TchError, Tensor};

extern "C" {
    fn ringtrain_storage_free(tensor: *mut c_void) -> i32;
    fn ringtrain_storage_alloc(tensor: *mut c_void, nbytes: usize) -> i32;
    fn ringtrain_storage_nbytes(tensor: *mut c_void) -> i64;
}

fn handle(t: &Tensor) -> *mut c_void {
    // tch's handle is an at::Tensor*; the shim reads it and changes only the shared storage.
    t.as_ptr() as *mut c_void
}

/// Frees `t`'s storage (memory shared with all its views). Nothing may be reading or writing
/// it, on any stream: the caller has waited for its collectives.
pub fn free(t: &Tensor) -> Result<(), TchError> {
    // SAFETY: a live tensor handle; the caller vouches that nothing uses the memory.
    match unsafe { ringtrain_storage_free(handle(t)) } {
        0 => Ok(()),
        _ => Err(TchError::Torch("freeing a buffer's storage failed".into())),
    }
}

/// Gives `t`'s storage new, uninitialised memory of `nbytes` (its size before `free`).
pub fn allocate(t: &Tensor, nbytes: usize) -> Result<(), TchError> {
    // SAFETY: a live tensor handle; the old memory (if any) is released by its own deleter.
    match unsafe { ringtrain_storage_alloc(handle(t), nbytes) } {
        0 => Ok(()),
        2 => Err(TchError::Torch("a buffer's storage has no allocator to allocate it again".into())),
        _ => Err(TchError::Torch(format!("allocating {nbytes} bytes for a buffer failed"))),
    }
}

/// The bytes `t`'s storage holds now (0 while freed).
pub fn nbytes(t: &Tensor) -> usize {
    // SAFETY: a live tensor handle, only read.
    unsafe { ringtrain_storage_nbytes(handle(t)) }.max(0) as usize
}

/// Whether `t`'s storage is allocated (a tensor of no elements always is).
pub fn is_allocated(t: &Tensor) -> bool {
    t.numel() == 0 || nbytes(t) > 0
}

/// Frees a gradient bucket `flat` whose views are the `.grad`s of `params`: the gradients are set
/// undefined first, so nothing reads the freed memory through them, then the storage goes.
pub fn free_gradients<'a>(flat: &Tensor, params: impl IntoIterator<Item = &'a Tensor>) -> Result<(), super::DdpError> {
    for p in params {
        super::hooks::set_grad(p, &Tensor::new()).map_err(super::DdpError::Unsupported)?;
    }
    if is_allocated(flat) && flat.numel() > 0 {
        free(flat)?;
    }
    Ok(())
}

/// A flat buffer freed between uses, with this rank's shard `own` kept in a tensor of its own.
pub struct Released {
    /// The shard's copy (the optimizer's memory for it).
    pub shard: Tensor,
    pub own: (i64, i64),
    bytes: usize,
}

impl Released {
    /// `flat` (allocated, holding the current values) gets a separate copy of `own`.
    pub fn new(flat: &Tensor, own: (i64, i64)) -> Result<Released, TchError> {
        let shard = flat.f_narrow(0, own.0, own.1 - own.0)?.f_detach_copy()?;
        Ok(Released { shard, own, bytes: flat.numel() * flat.kind().elt_size_in_bytes() })
    }

    /// Another handle on the same kept shard.
    pub fn shallow_clone(&self) -> Released {
        Released { shard: self.shard.shallow_clone(), own: self.own, bytes: self.bytes }
    }

    /// Frees `flat` (after `keep` if its shard changed there).
    pub fn release(&self, flat: &Tensor) -> Result<(), TchError> {
        if is_allocated(flat) && flat.numel() > 0 {
            free(flat)?;
        }
        Ok(())
    }

    /// Copies the shard out of `flat` into the kept copy.
    pub fn keep(&self, flat: &Tensor) -> Result<(), TchError> {
        let mut shard = self.shard.shallow_clone();
        shard.f_copy_(&flat.f_narrow(0, self.own.0, self.own.1 - self.own.0)?)
    }

    /// Allocates `flat` again if freed, with the shard copied back into it and the rest zeroed
    /// (`zero_rest`) or left for the caller to write. Returns whether it allocated.
    pub fn restore(&self, flat: &Tensor, zero_rest: bool) -> Result<bool, TchError> {
        if is_allocated(flat) {
            return Ok(false);
        }
        allocate(flat, self.bytes)?;
        let _guard = tch::no_grad_guard();
        if zero_rest {
            let _ = flat.f_narrow(0, 0, self.own.0)?.f_zero_()?;
            let _ = flat.f_narrow(0, self.own.1, flat.numel() as i64 - self.own.1)?.f_zero_()?;
        }
        flat.f_narrow(0, self.own.0, self.own.1 - self.own.0)?.f_copy_(&self.shard)?;
        Ok(true)
    }

    /// Bytes resident: the kept shard, and the buffer while allocated.
    pub fn resident_bytes(&self, flat: &Tensor) -> usize {
        self.shard.numel() * self.shard.kind().elt_size_in_bytes() + nbytes(flat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn a_freed_buffer_keeps_its_views_and_sees_its_shard_again_once_allocated() {
        let flat = Tensor::arange(10, (Kind::Float, Device::Cpu));
        let view = flat.narrow(0, 6, 3);
        let r = Released::new(&flat, (4, 8)).unwrap();
        assert_eq!(nbytes(&flat), 40);
        r.release(&flat).unwrap();
        assert_eq!(nbytes(&flat), 0);
        assert!(!is_allocated(&view), "a view shares the storage");
        assert_eq!(r.resident_bytes(&flat), 16, "only the kept shard");
        assert!(r.restore(&flat, false).unwrap());
        assert!(!r.restore(&flat, false).unwrap(), "allocated once");
        assert_eq!(Vec::<f32>::try_from(&view.narrow(0, 0, 2)).unwrap(), vec![6.0, 7.0], "the shard came back");
        // The shard's copy is the authority: a change there shows after the next restore.
        let _ = r.shard.shallow_clone().fill_(-1.0);
        r.release(&flat).unwrap();
        r.restore(&flat, false).unwrap();
        assert_eq!(Vec::<f32>::try_from(&flat.narrow(0, 4, 4)).unwrap(), vec![-1.0; 4]);
        r.release(&flat).unwrap();
        r.restore(&flat, true).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&flat).unwrap(),
            [[0.0; 4], [-1.0; 4]].concat().into_iter().chain([0.0; 2]).collect::<Vec<_>>(),
            "the rest zeroed"
        );
        // keep copies the buffer's shard into the kept copy.
        let _ = flat.shallow_clone().fill_(3.0);
        r.keep(&flat).unwrap();
        assert_eq!(Vec::<f32>::try_from(&r.shard).unwrap(), vec![3.0; 4]);
    }
}
