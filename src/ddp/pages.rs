//! Giving part of a host buffer's memory back to the kernel while keeping it mapped (ZeRO-2's
//! gradient buckets). The pages read as zeros afterwards, so a gradient view into them starts
//! the next backward at zero, and only pages written since count in the resident set.
//!
//! Whole pages inside the range are released (`MADV_REMOVE` for memory shared between the
//! node's ranks, which frees its backing store; `MADV_DONTNEED` for private memory); the partial
//! pages at its edges, which the buffer shares with the kept range, are zeroed. Device tensors
//! are only zeroed.

use tch::{Device, TchError, Tensor};

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Sets elements [lo, hi) of the 1-D f32 tensor `flat` to zero, handing their whole pages back
/// to the kernel. `shared`: the memory is a shared mapping (the communicator's buffers).
pub fn zero_range(flat: &Tensor, lo: i64, hi: i64, shared: bool) -> Result<(), TchError> {
    if hi <= lo {
        return Ok(());
    }
    let elt = 4usize;
    let zero = |a: i64, b: i64| -> Result<(), TchError> {
        if b > a {
            let _ = flat.f_narrow(0, a, b - a)?.f_zero_()?;
        }
        Ok(())
    };
    if flat.device() != Device::Cpu {
        return zero(lo, hi);
    }
    let page = page_size();
    let base = flat.data_ptr() as usize;
    let (start, end) = (base + lo as usize * elt, base + hi as usize * elt);
    let (a, b) = (start.div_ceil(page) * page, end / page * page);
    // Element boundaries of the page-aligned interior: pages hold whole f32s (4 divides a page).
    let (ea, eb) = (((a - base) / elt) as i64, ((b - base) / elt) as i64);
    if b <= a || eb <= ea {
        return zero(lo, hi);
    }
    zero(lo, ea)?;
    zero(eb, hi)?;
    let advice = if shared { libc::MADV_REMOVE } else { libc::MADV_DONTNEED };
    if !shared {
        // A private bucket may lie on huge pages (`host_memory`): without this the kernel could
        // fill the released range again in 2 MiB pieces (a write nearby, or khugepaged).
        // SAFETY: advice on whole pages of this tensor's own mapping; a refusal changes nothing.
        let _ = unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_NOHUGEPAGE) };
    }
    // SAFETY: [a, b) lies inside this tensor's storage, whole pages no other allocation uses;
    // nothing reads it concurrently (the caller's collective on it has finished), and both
    // advices leave it mapped, reading as zeros.
    let rc = unsafe { libc::madvise(a as *mut libc::c_void, b - a, advice) };
    if rc != 0 {
        // Not releasable (an unusual mapping): zeroed all the same, only not given back.
        zero(ea, eb)?;
    }
    Ok(())
}

/// Zeroes everything of `flat` outside [lo, hi), releasing its pages.
pub fn zero_outside(flat: &Tensor, lo: i64, hi: i64, shared: bool) -> Result<(), TchError> {
    zero_range(flat, 0, lo, shared)?;
    zero_range(flat, hi, flat.numel() as i64, shared)
}

/// Makes the C allocator give freed blocks of 64 KiB or more back to the kernel at once. glibc
/// otherwise keeps them for reuse (and raises its threshold as large blocks are freed), so a
/// worker's resident memory stays at the high-water mark of its first backward — activations,
/// temporaries — and the memory ZeRO-2/3 hand back is taken up by that instead. Costs a page
/// fault per page of each new large block. Process-wide; a no-op off glibc. The host allocator's
/// idle list (`host_memory`) is emptied and kept empty too.
pub fn give_back_freed_memory() {
    crate::host_memory::give_back();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; any value is accepted or refused (0).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 10);
    }
}

/// Bytes of a host tensor's pages that are resident (`mincore`); `None` on a device or when the
/// kernel does not say.
pub fn resident_bytes(t: &Tensor) -> Option<usize> {
    if t.device() != Device::Cpu || t.numel() == 0 {
        return Some(0).filter(|_| t.device() == Device::Cpu);
    }
    let page = page_size();
    let start = t.data_ptr() as usize / page * page;
    let end = t.data_ptr() as usize + t.numel() * t.kind().elt_size_in_bytes();
    let pages = (end - start).div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: [start, start + pages·page) covers mapped memory of this tensor's storage (its
    // first and last pages are mapped since they hold its elements); `vec` has one byte per page.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, pages * page, vec.as_mut_ptr()) };
    (rc == 0).then(|| vec.iter().filter(|&&v| v & 1 == 1).count() * page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn released_pages_read_zero_and_leave_the_resident_set() {
        let n = 1 << 20; // 4 MiB
        let t = Tensor::ones([n], (Kind::Float, Device::Cpu));
        let full = resident_bytes(&t).unwrap();
        assert!(full >= n as usize * 4, "{full}");
        let (lo, hi) = (1001, 300_007);
        zero_outside(&t, lo, hi, false).unwrap();
        // Measured before anything reads the released pages (a read maps the zero page, which
        // mincore counts though it costs no memory).
        let kept = resident_bytes(&t).unwrap();
        // The kept range's pages (one more than it fills when it straddles), and at each end of
        // the tensor a partial page written with zeros rather than released (the tensor need
        // not start or end on a page boundary).
        assert!(kept <= (hi - lo) as usize * 4 + 5 * page_size(), "resident {kept} of {full}");
        let sum = t.sum(Kind::Double).double_value(&[]);
        assert_eq!(sum, (hi - lo) as f64, "only [lo, hi) keeps its ones");
        assert_eq!(t.double_value(&[lo]), 1.0);
        assert_eq!(t.double_value(&[hi - 1]), 1.0);
        assert_eq!(t.double_value(&[hi]), 0.0);
        // Written again, the pages come back.
        let _ = t.shallow_clone().fill_(2.0);
        assert_eq!(t.sum(Kind::Double).double_value(&[]), 2.0 * n as f64);
    }
}
