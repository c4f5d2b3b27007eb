//! Host memory for libtorch's large tensors: mapped once, kept for reuse, on huge pages.
//!
//! Training allocates the same large temporaries every step (a 4096 × 4096 layer's weight
//! gradient is a fresh 64 MiB tensor in every backward). glibc serves blocks over 32 MiB with
//! `mmap` and unmaps them when freed, so each step faults in and zeroes all of it again: in the
//! wide MLP that was 16,000 page faults and about a sixth of the step, in the kernel. With two
//! ranks in lock-step both fault at the same moment and contend for the same kernel locks.
//!
//! `install` makes libtorch's CPU allocator one that maps blocks of 2 MiB or more itself
//! (2 MiB-aligned, advised as transparent huge pages: fewer TLB misses in the optimizer's
//! streams; the shared all-reduce buckets are memfd memory, not these) and, when one is freed,
//! keeps it for the next allocation of the same page-rounded size, up to `idle_cap` bytes
//! waiting (the oldest are unmapped first). Smaller blocks go to libtorch's own allocator as
//! before. Contents are uninitialised either way.
//!
//! The worker installs it at start (`RINGTRAIN_HOST_ALLOCATOR=0` keeps libtorch's; a program of
//! its own calls `install`) keeping nothing, so that setting up (data, checkpoint reads) peaks
//! as before, and `keep_freed_blocks` once training starts. ZeRO-3 wants freed memory back in
//! the kernel's hands: `give_back` (from `ddp::give_back_freed_memory`) keeps nothing for good.

use std::sync::atomic::{AtomicBool, Ordering};

extern "C" {
    fn ringtrain_host_allocator_install(idle_cap_bytes: usize) -> i32;
    fn ringtrain_host_allocator_set_idle_cap(idle_cap_bytes: usize);
    fn ringtrain_host_allocator_stats(maps: *mut u64, reuses: *mut u64, idle_bytes: *mut u64);
}

/// Freed large blocks kept for reuse, at most: a step's temporaries of the largest models this
/// machine trains fit; more would only sit in the resident set.
pub const DEFAULT_IDLE_CAP: usize = 256 << 20;

/// `give_back` was called: nothing is kept from then on, whatever the cap asked.
static GIVE_BACK: AtomicBool = AtomicBool::new(false);

/// Makes the caching allocator libtorch's CPU allocator, keeping up to `idle_cap` bytes of freed
/// blocks (none after `give_back`). Tensors allocated before keep their own allocator's deleter.
/// Calling it again only changes the cap. Returns false if libtorch refused.
pub fn install(idle_cap: usize) -> bool {
    // SAFETY: the shim only sets allocator state behind its own lock.
    unsafe { ringtrain_host_allocator_install(cap(idle_cap)) == 0 }
}

/// `install(0)` unless `RINGTRAIN_HOST_ALLOCATOR=0`: large blocks are ours, none kept yet.
pub fn install_from_env() -> bool {
    match std::env::var("RINGTRAIN_HOST_ALLOCATOR").as_deref() {
        Ok("0") => false,
        _ => install(0),
    }
}

/// From now on freed large blocks wait for reuse (up to `DEFAULT_IDLE_CAP`), unless `give_back`
/// was called. The trainer calls it when setting up is done.
pub fn keep_freed_blocks() {
    set_idle_cap(DEFAULT_IDLE_CAP);
}

/// Nothing is kept for reuse from now on, whatever is asked later: every freed large block goes
/// back to the kernel at once (ZeRO-3's memory is the point of it).
pub fn give_back() {
    GIVE_BACK.store(true, Ordering::SeqCst);
    set_idle_cap(0);
}

fn cap(asked: usize) -> usize {
    if GIVE_BACK.load(Ordering::SeqCst) {
        0
    } else {
        asked
    }
}

/// Changes how many bytes of freed blocks wait for reuse (0: unmapped at once; always 0 after
/// `give_back`); unmaps the oldest beyond it now. Harmless before `install`.
pub fn set_idle_cap(idle_cap: usize) {
    // SAFETY: as in `install`.
    unsafe { ringtrain_host_allocator_set_idle_cap(cap(idle_cap)) }
}

/// What the allocator has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Large blocks mapped from the kernel.
    pub maps: u64,
    /// Large allocations served from freed blocks instead.
    pub reuses: u64,
    /// Bytes of freed blocks waiting for reuse now.
    pub idle_bytes: u64,
}

pub fn stats() -> Stats {
    let (mut maps, mut reuses, mut idle_bytes) = (0, 0, 0);
    // SAFETY: three valid out-pointers.
    unsafe { ringtrain_host_allocator_stats(&mut maps, &mut reuses, &mut idle_bytes) };
    Stats { maps, reuses, idle_bytes }
}
