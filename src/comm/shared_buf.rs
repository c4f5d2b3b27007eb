//! Buffers that every rank of a node-local ring maps, and the collectives that work on them in
//! place.
//!
//! The ring moves a buffer through byte streams: over shared memory each rank copies every chunk
//! into the link and the next rank reads it out again, about 4.5 passes over the buffer per rank
//! at two ranks (README, "Memory passes"). When the buffer itself is shared, a rank reads its
//! peers' copies where they lie: rank r sums chunk r + 1 of every rank's buffer and writes the
//! sum into each of them, one read and one write of the buffer's size per rank, what a memcpy
//! costs. The buffers come from `Communicator::alloc_reduce_buffer` (the DDP reducer's buckets,
//! ringbench's buffers): one memfd segment per rank and allocation, handed round the ring over
//! the Unix sockets beside the shared-memory links, so nothing is named in the file system.
//!
//! Every collective is two barriers. After the first, every rank's input is in place; between
//! them each rank touches only its own chunk of each buffer (no locks needed); after the second,
//! every rank's output is. Rank r adds chunk c = r + 1 in the order the ring adds it
//! (x_c, then x_{c+1}, ..., x_{c-1}, each addition as the ring's receiver makes it), so the
//! results are the ring's bits, and a run is bitwise the same with or without shared buffers.

use super::elem::Elem;
use super::segment::{futex_wake, map, memfd, peer_gone, recv_fd, send_fd, wait_readable, wait_until, Mapping};
use super::Op;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
/// Elements summed per pass over the sources: the partial sum stays in L1 between the additions
/// and the copies out.
const BLOCK: usize = 4096;

/// One allocation: every rank's segment mapped here, and whether this rank's tensor over its own
/// copy is still alive.
struct Alloc {
    maps: Vec<Mapping>,
    live: Arc<AtomicBool>,
}

/// What a shared tensor's storage releases when libtorch frees it.
struct Release {
    base: *mut u8,
    len: usize,
    live: Arc<AtomicBool>,
}

extern "C" {
    fn ringtrain_blob_with_release(
        data: *mut std::ffi::c_void,
        numel: i64,
        scalar_type: std::ffi::c_int,
        release: extern "C" fn(*mut std::ffi::c_void),
        ctx: *mut std::ffi::c_void,
    ) -> *mut std::ffi::c_void;
}

/// The storage's deleter: marks the allocation freed (so `locate` no longer matches its range),
/// then unmaps this rank's copy. Runs on whichever thread frees the last view.
extern "C" fn release_segment(ctx: *mut std::ffi::c_void) {
    // SAFETY: `ctx` is the Box `alloc` leaked for exactly this one call.
    let r = unsafe { Box::from_raw(ctx as *mut Release) };
    r.live.store(false, Ordering::Release);
    // SAFETY: the mapping nothing refers to any more (its last tensor view is gone).
    unsafe { libc::munmap(r.base as *mut libc::c_void, r.len) };
}

/// Each rank's control page: how many barriers it has reached, and what it entered last.
#[repr(C)]
struct Control {
    arrived: AtomicU64,
    /// Futex word, bumped on every arrival; peers that wait for this rank sleep on it.
    word: AtomicU32,
    sleepers: AtomicU32,
    /// Set when this rank's communicator failed or went away: waiters fail at once.
    closed: AtomicU32,
    tag: AtomicU32,
    op: AtomicU64,
    seq: AtomicU64,
    len: AtomicU64,
    alloc: AtomicU64,
    offset: AtomicU64,
}

/// What a rank announces when it enters a collective: every rank must agree on all of it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Entry {
    pub op: Op,
    pub seq: u64,
    /// Elements.
    pub len: u64,
    pub tag: u8,
    /// Which allocation, and the byte offset into it.
    pub alloc: usize,
    pub offset: usize,
}

/// A failure with the rank it concerns.
pub(super) enum Fail {
    Io(usize, io::Error),
    Mismatch(usize, String),
}

pub(super) struct SharedBuffers {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Every rank's control page, by rank.
    controls: Vec<Mapping>,
    /// Every allocation, each mapped for every rank (by rank); indices are never reused, so an
    /// index names the same allocation on every rank.
    allocs: Vec<Alloc>,
    /// Barriers passed so far; the same count on every rank.
    barriers: u64,
    /// The Unix sockets to the ring neighbours: they carry the segments' descriptors and tell
    /// when a neighbour has gone.
    to_next: UnixStream,
    from_prev: UnixStream,
    /// Memfd names carry it, to tell jobs and rings apart in /proc.
    label: String,
}

/// The three collectives, as the ring's steps split them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    AllReduce,
    ReduceScatter,
    AllGather,
}

impl SharedBuffers {
    /// Sets up the control pages (collective over the ring). `to_next`/`from_prev` are the Unix
    /// sockets beside the shared-memory links.
    pub fn new(
        rank: usize,
        world: usize,
        timeout: Duration,
        to_next: &UnixStream,
        from_prev: &UnixStream,
        label: &str,
    ) -> Result<SharedBuffers, Fail> {
        let next = (rank + 1) % world;
        let mut s = SharedBuffers {
            rank,
            world,
            timeout,
            controls: Vec::new(),
            allocs: Vec::new(),
            barriers: 0,
            to_next: to_next.try_clone().map_err(|e| Fail::Io(next, e))?,
            from_prev: from_prev.try_clone().map_err(|e| Fail::Io(rank, e))?,
            label: label.to_string(),
        };
        s.controls = s.share(PAGE, false)?;
        Ok(s)
    }

    /// Allocates `numel` elements of `kind` (`elt` bytes each; rounded up to pages, zeroed) in
    /// every rank's memory, mapped by all (collective); returns this rank's copy as a tensor whose
    /// storage unmaps it when libtorch frees it. Peers' copies of freed allocations are unmapped
    /// here, at the next allocation.
    pub fn alloc(&mut self, numel: usize, elt: usize, kind: tch::Kind) -> Result<tch::Tensor, Fail> {
        self.sweep();
        let len = (numel * elt).div_ceil(PAGE).max(1) * PAGE;
        let maps = self.share(len, true)?;
        let live = Arc::new(AtomicBool::new(true));
        let base = maps[self.rank].base;
        self.allocs.push(Alloc { maps, live: live.clone() });
        self.tensor_over(base, len, numel, kind, live)
    }

    /// One segment of `numel` elements of `kind` that every rank maps, rather than one per rank
    /// (collective): rank 0 makes it and the descriptor goes down the ring. Every rank's tensor
    /// is the same memory. No collective runs on it (it is not one of `locate`'s allocations):
    /// what ranks write into it is ordered by the collectives around the writes.
    pub fn alloc_common(&mut self, numel: usize, elt: usize, kind: tch::Kind) -> Result<tch::Tensor, Fail> {
        self.sweep();
        let (r, w) = (self.rank, self.world);
        let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
        let len = (numel * elt).div_ceil(PAGE).max(1) * PAGE;
        let fd = match r {
            0 => memfd(&format!("ringtrain-{}-common{}", self.label, self.allocs.len()), len).map_err(|e| Fail::Io(r, e))?,
            _ => {
                wait_readable(&self.from_prev, self.timeout).map_err(|e| Fail::Io(prev, e))?;
                recv_fd(&self.from_prev).map_err(|e| Fail::Io(prev, e))?
            }
        };
        if next != 0 {
            send_fd(&self.to_next, fd.as_raw_fd()).map_err(|e| Fail::Io(next, e))?;
        }
        // Kept: the tensor's storage unmaps it when libtorch frees it.
        let m = map(&fd, len, true).map_err(|e| Fail::Io(r, e))?;
        self.tensor_over(m.base, len, numel, kind, Arc::new(AtomicBool::new(true)))
    }

    /// A tensor of `numel` elements of `kind` over this rank's mapping at `base` (`len` bytes),
    /// whose storage unmaps it when libtorch frees it.
    fn tensor_over(&self, base: *mut u8, len: usize, numel: usize, kind: tch::Kind, live: Arc<AtomicBool>) -> Result<tch::Tensor, Fail> {
        let release = Box::into_raw(Box::new(Release { base, len, live }));
        let code = match kind {
            tch::Kind::BFloat16 => 15,
            _ => 6, // c10::ScalarType::Float
        };
        // SAFETY: `numel` elements at `base`, zeroed and mapped until `release_segment` runs,
        // which the storage calls once, when it is freed.
        let t = unsafe { ringtrain_blob_with_release(base.cast(), numel as i64, code, release_segment, release.cast()) };
        if t.is_null() {
            release_segment(release.cast());
            return Err(Fail::Io(self.rank, io::Error::other("libtorch refused a tensor over a shared segment")));
        }
        // SAFETY: a fresh at::Tensor the shim allocated; tch takes ownership.
        Ok(unsafe { tch::Tensor::from_ptr(t.cast()) })
    }

    /// Drops peers' mappings of allocations whose tensor libtorch has freed.
    fn sweep(&mut self) {
        for a in &mut self.allocs {
            if !a.live.load(Ordering::Acquire) {
                a.maps.clear();
            }
        }
    }

    /// Makes a segment of `len` bytes, hands it round the ring and maps every rank's.
    fn share(&self, len: usize, keep_own: bool) -> Result<Vec<Mapping>, Fail> {
        let r = self.rank;
        let name = format!("ringtrain-{}-shared{}-r{r}", self.label, self.allocs.len());
        let own = memfd(&name, len).map_err(|e| Fail::Io(r, e))?;
        let fds = self.exchange(own)?;
        fds.iter().enumerate().map(|(p, fd)| map(fd, len, keep_own && p == r).map_err(|e| Fail::Io(p, e))).collect::<Result<_, _>>()
    }

    /// A ring all-gather of descriptors: step t sends rank r - t's and receives rank r - t - 1's.
    /// A one-byte message never fills a socket, so sending before receiving cannot block.
    fn exchange(&self, own: OwnedFd) -> Result<Vec<OwnedFd>, Fail> {
        let (r, w) = (self.rank, self.world);
        let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
        let mut fds: Vec<Option<OwnedFd>> = (0..w).map(|_| None).collect();
        let mut last = own;
        for t in 0..w - 1 {
            send_fd(&self.to_next, last.as_raw_fd()).map_err(|e| Fail::Io(next, e))?;
            wait_readable(&self.from_prev, self.timeout).map_err(|e| Fail::Io(prev, e))?;
            let got = recv_fd(&self.from_prev).map_err(|e| Fail::Io(prev, e))?;
            fds[(r + w - t) % w] = Some(last);
            last = got;
        }
        fds[(r + 1) % w] = Some(last);
        Ok(fds.into_iter().map(|f| f.expect("every rank's descriptor arrived")).collect())
    }

    /// The allocation and byte offset holding `[ptr, ptr + bytes)`, when one does. A freed
    /// allocation holds nothing (its address range may already be reused by another mapping).
    pub fn locate(&self, ptr: *const u8, bytes: usize) -> Option<(usize, usize)> {
        self.allocs.iter().enumerate().filter(|(_, a)| a.live.load(Ordering::Acquire)).find_map(|(i, a)| {
            let m = a.maps.get(self.rank)?;
            let (start, p) = (m.base as usize, ptr as usize);
            (p >= start && p + bytes <= start + m.len).then(|| (i, p - start))
        })
    }

    /// Marks this rank gone, so peers waiting for it fail at once instead of timing out.
    pub fn close(&self) {
        if let Some(c) = self.controls.get(self.rank) {
            let c = control(c);
            c.closed.store(1, Ordering::Release);
            c.word.fetch_add(1, Ordering::SeqCst);
            futex_wake(&c.word);
        }
    }

    /// Runs one collective on `entry.len` elements at `entry.offset` of allocation `entry.alloc`.
    /// `bounds(c)` is chunk c's element range (the ring's chunks); `stray()` says the previous rank
    /// has sent a ring message instead (its buffer was not a shared one). `divide` (not for the
    /// all-gather) divides every rank's element by it as it is read, before the additions: the
    /// bits of dividing each buffer first (DDP's and ZeRO's average) without that extra pass over
    /// it; a reduce-scatter leaves the chunks a rank does not own undivided. Waits spin for
    /// `spin` before they sleep.
    pub fn run<T: Elem>(
        &mut self,
        phase: Phase,
        entry: Entry,
        bounds: &dyn Fn(usize) -> (usize, usize),
        stray: &dyn Fn() -> bool,
        divide: Option<f32>,
        spin: Duration,
    ) -> Result<(), Fail> {
        let (r, w) = (self.rank, self.world);
        assert!(divide.is_none() || phase != Phase::AllGather, "an all-gather has nothing to divide");
        self.announce(&entry);
        self.barrier(&entry, true, stray, spin)?;
        let ptr = |p: usize| -> *mut T {
            // SAFETY: every rank checked (first barrier) that the same range lies in the same
            // allocation, so it lies in rank p's mapping too.
            unsafe { self.allocs[entry.alloc].maps[p].base.add(entry.offset) as *mut T }
        };
        let c = (r + 1) % w;
        let (a, b) = bounds(c);
        let mut acc: Vec<T> = Vec::with_capacity(BLOCK);
        for start in (a..b).step_by(BLOCK) {
            let len = BLOCK.min(b - start);
            // SAFETY (all slices): [start, start + len) lies in chunk c, which only this rank
            // touches between the barriers, in every rank's buffer.
            let slice = |p: usize| unsafe { std::slice::from_raw_parts_mut(ptr(p).add(start), len) };
            let own = slice(r);
            if phase != Phase::AllGather {
                // x_c, then each next rank's value added as the ring's receiver adds it:
                // add(own value, partial sum). The last is this rank's own (c + w - 1 = r).
                acc.clear();
                match divide {
                    None => {
                        acc.extend_from_slice(slice(c));
                        for k in 1..w - 1 {
                            for (s, x) in acc.iter_mut().zip(slice((c + k) % w).iter()) {
                                *s = T::add(*x, *s);
                            }
                        }
                        for (o, s) in own.iter_mut().zip(&acc) {
                            *o = T::add(*o, *s);
                        }
                    }
                    Some(d) => {
                        acc.extend(slice(c).iter().map(|&x| T::div(x, d)));
                        for k in 1..w - 1 {
                            for (s, x) in acc.iter_mut().zip(slice((c + k) % w).iter()) {
                                *s = T::add(T::div(*x, d), *s);
                            }
                        }
                        for (o, s) in own.iter_mut().zip(&acc) {
                            *o = T::add(T::div(*o, d), *s);
                        }
                    }
                }
            }
            if phase != Phase::ReduceScatter {
                for p in (0..w).filter(|&p| p != r) {
                    slice(p).copy_from_slice(own);
                }
            }
        }
        // Peers may still be reading our buffer (reduce-scatter) or writing into it: nobody
        // leaves before everybody is done.
        self.barrier(&entry, false, stray, spin)
    }

    fn announce(&self, e: &Entry) {
        let c = control(&self.controls[self.rank]);
        c.op.store(e.op.code() as u64, Ordering::Relaxed);
        c.seq.store(e.seq, Ordering::Relaxed);
        c.len.store(e.len, Ordering::Relaxed);
        c.tag.store(e.tag as u32, Ordering::Relaxed);
        c.alloc.store(e.alloc as u64, Ordering::Relaxed);
        c.offset.store(e.offset as u64, Ordering::Relaxed);
    }

    fn entry_of(&self, p: usize) -> (u64, u64, u64, u32, u64, u64) {
        let c = control(&self.controls[p]);
        (
            c.op.load(Ordering::Relaxed),
            c.seq.load(Ordering::Relaxed),
            c.len.load(Ordering::Relaxed),
            c.tag.load(Ordering::Relaxed),
            c.alloc.load(Ordering::Relaxed),
            c.offset.load(Ordering::Relaxed),
        )
    }

    /// Arrives, then waits for every other rank; after the first barrier of a collective
    /// (`check`), checks each one entered the same collective, `e` (its entry cannot change
    /// before the second barrier).
    fn barrier(&mut self, e: &Entry, check: bool, stray: &dyn Fn() -> bool, spin: Duration) -> Result<(), Fail> {
        self.barriers += 1;
        let target = self.barriers;
        let me = control(&self.controls[self.rank]);
        // Release: our writes to the buffers happen before any peer sees the arrival.
        me.arrived.store(target, Ordering::Release);
        me.word.fetch_add(1, Ordering::SeqCst);
        if me.sleepers.load(Ordering::SeqCst) > 0 {
            futex_wake(&me.word);
        }
        let deadline = Instant::now() + self.timeout;
        for k in 1..self.world {
            let p = (self.rank + k) % self.world;
            self.wait_for(p, target, deadline, e, stray, spin)?;
            if check {
                let mine = (e.op.code() as u64, e.seq, e.len, e.tag as u32, e.alloc as u64, e.offset as u64);
                let theirs = self.entry_of(p);
                if theirs != mine {
                    let op = Op::from_code(theirs.0 as u8).map_or("an unknown op", |o| o.name());
                    return Err(Fail::Mismatch(
                        p,
                        format!(
                            "rank {p} is in {op} #{} of {} elements (shared buffer {} at byte {}), rank {} in {} #{} of {} \
                             elements (shared buffer {} at byte {})",
                            theirs.1, theirs.2, theirs.4, theirs.5, self.rank, e.op, e.seq, e.len, e.alloc, e.offset
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Waits until rank `p` has arrived at barrier `target` (by `deadline`, the barrier's):
    /// spinning for `spin`, then sleeping on its futex word. Whatever else is noticed (any rank's
    /// communicator failed or closed, a neighbour's socket closed, a ring message arrived instead,
    /// the deadline) is checked against a last look at the arrival, which may have happened just
    /// before it.
    fn wait_for(&self, p: usize, target: u64, deadline: Instant, e: &Entry, stray: &dyn Fn() -> bool, spin: Duration) -> Result<(), Fail> {
        let ctl = control(&self.controls[p]);
        let arrived = || ctl.arrived.load(Ordering::Acquire) >= target;
        let (next, prev) = ((self.rank + 1) % self.world, (self.rank + self.world - 1) % self.world);
        let closed = || (0..self.world).find(|&q| q != self.rank && control(&self.controls[q]).closed.load(Ordering::Acquire) != 0);
        wait_until(&ctl.word, &ctl.sleepers, arrived, Instant::now(), spin, |spinning| {
            if let Some(q) = closed() {
                Some(Fail::Io(q, io::Error::new(io::ErrorKind::BrokenPipe, format!("rank {q} left the collective"))))
            } else if spinning {
                None
            } else if stray() {
                Some(Fail::Mismatch(
                    prev,
                    format!(
                        "rank {prev} sent a ring message while rank {} waits in {} #{} on a shared buffer (a buffer from \
                         alloc_reduce_buffer on some ranks only?)",
                        self.rank, e.op, e.seq
                    ),
                ))
            } else if peer_gone(&self.from_prev) {
                Some(Fail::Io(prev, io::Error::from(io::ErrorKind::UnexpectedEof)))
            } else if peer_gone(&self.to_next) {
                Some(Fail::Io(next, io::Error::from(io::ErrorKind::UnexpectedEof)))
            } else if Instant::now() > deadline {
                Some(Fail::Io(p, io::Error::from(io::ErrorKind::TimedOut)))
            } else {
                None
            }
        })
    }
}

impl Drop for SharedBuffers {
    fn drop(&mut self) {
        self.close();
    }
}

fn control(m: &Mapping) -> &Control {
    // SAFETY: a control page is a zero-initialised page, large enough for `Control`, whose
    // fields are all atomics (any bits valid).
    unsafe { &*(m.base as *const Control) }
}

#[cfg(test)]
mod tests {
    use super::super::segment::{IDLE_SPIN, SPIN};
    use super::*;

    #[test]
    fn a_segment_is_reserved_when_made_not_at_first_touch() {
        // ftruncate made sparse segments: no blocks until written, so a size no memory could back
        // was accepted and the first touch under a memory limit killed the process mid-collective.
        // (No test of the refusal itself: memfd has no size limit of its own, so only a cgroup
        // limit refuses, and without one the kernel would try.)
        let fd = memfd("reserve-test", 1 << 20).unwrap();
        // SAFETY: fstat into a zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        assert_eq!(st.st_size, 1 << 20);
        assert!(st.st_blocks * 512 >= 1 << 20, "{} bytes reserved of 1 MiB", st.st_blocks * 512);
    }

    fn x(rank: usize, i: usize, round: usize) -> f32 {
        0.1f32 * (i % 7) as f32 + rank as f32 * 1e-3 + (i as f32).sqrt() + round as f32 * 0.37
    }

    /// `w` ranks as threads over socket pairs, on `n` elements at element `off` of one allocation,
    /// three rounds on the same buffer with new inputs: all-reduce sums in the ring's order and
    /// leaves every rank the same bits; reduce-scatter leaves each rank its own chunk's sum and
    /// the rest (and every peer's buffer outside the peer's chunk) as it was; all-gather then
    /// spreads the chunks; a rank entering another collective is named.
    fn run_ranks(w: usize, n: usize, off: usize) {
        let pairs: Vec<(UnixStream, UnixStream)> = (0..w).map(|_| UnixStream::pair().unwrap()).collect();
        // pairs[r] links r (.0) to r + 1 (.1).
        let socks: Vec<(UnixStream, UnixStream)> =
            (0..w).map(|r| (pairs[r].0.try_clone().unwrap(), pairs[(r + w - 1) % w].1.try_clone().unwrap())).collect();
        let handles: Vec<_> = socks
            .into_iter()
            .enumerate()
            .map(|(r, (to_next, from_prev))| {
                std::thread::spawn(move || {
                    let t = Duration::from_secs(10);
                    let mut s = SharedBuffers::new(r, w, t, &to_next, &from_prev, "test").unwrap_or_else(|_| panic!("setup"));
                    let tensor = s.alloc(off + n + 3, 4, tch::Kind::Float).unwrap_or_else(|_| panic!("alloc"));
                    let base = tensor.data_ptr() as *mut f32;
                    // SAFETY: off + n + 3 floats were allocated.
                    let whole = unsafe { std::slice::from_raw_parts_mut(base, off + n + 3) };
                    whole.fill(-1.0);
                    let bounds = |c: usize| (n * c / w, n * (c + 1) / w);
                    let entry = |op, seq| Entry { op, seq, len: n as u64, tag: 0, alloc: 0, offset: off * 4 };
                    let mut seq = 0;
                    for round in 0..3 {
                        let buf = &mut whole[off..off + n];
                        for (i, v) in buf.iter_mut().enumerate() {
                            *v = x(r, i, round);
                        }
                        seq += 1;
                        // The last round averages as DDP does: each rank's value divided by w
                        // (as read), then the same sum; the bits of dividing every buffer first.
                        let divide = (round == 2).then_some(w as f32);
                        let spin = if round == 1 { IDLE_SPIN } else { SPIN };
                        s.run::<f32>(Phase::AllReduce, entry(Op::AllReduce, seq), &bounds, &|| false, divide, spin)
                            .unwrap_or_else(|_| panic!("all_reduce"));
                        let term = |q: usize, i: usize| divide.map_or(x(q, i, round), |d| x(q, i, round) / d);
                        for (i, v) in buf.iter().enumerate() {
                            let c = (0..w).find(|&c| bounds(c).0 <= i && i < bounds(c).1).unwrap();
                            // The ring's order: x_c, then add(x_{c+1}, partial), ...
                            let mut sum = term(c, i);
                            for k in 1..w {
                                sum = term((c + k) % w, i) + sum;
                            }
                            assert_eq!(v.to_bits(), sum.to_bits(), "w {w} rank {r} round {round} element {i}");
                        }
                    }
                    let buf = &mut whole[off..off + n];
                    for (i, v) in buf.iter_mut().enumerate() {
                        *v = (i * w + r) as f32;
                    }
                    seq += 1;
                    s.run::<f32>(Phase::ReduceScatter, entry(Op::ReduceScatter, seq), &bounds, &|| false, None, SPIN)
                        .unwrap_or_else(|_| panic!("rs"));
                    let (a, b) = bounds((r + 1) % w);
                    for (i, v) in buf.iter().enumerate() {
                        let want = if (a..b).contains(&i) { (0..w).map(|q| (i * w + q) as f32).sum::<f32>() } else { (i * w + r) as f32 };
                        assert_eq!(*v, want, "w {w} rank {r}: element {i} after reduce-scatter");
                    }
                    seq += 1;
                    s.run::<f32>(Phase::AllGather, entry(Op::AllGatherShards, seq), &bounds, &|| false, None, SPIN)
                        .unwrap_or_else(|_| panic!("ag"));
                    for (i, v) in buf.iter().enumerate() {
                        assert_eq!(*v, (0..w).map(|q| (i * w + q) as f32).sum::<f32>(), "w {w} rank {r}: element {i} gathered");
                    }
                    // ZeRO's average: divided as read, in the ring's order; the rest left as it was.
                    for (i, v) in buf.iter_mut().enumerate() {
                        *v = x(r, i, 3);
                    }
                    seq += 1;
                    s.run::<f32>(Phase::ReduceScatter, entry(Op::ReduceScatter, seq), &bounds, &|| false, Some(w as f32), SPIN)
                        .unwrap_or_else(|_| panic!("rs divided"));
                    for (i, v) in buf.iter().enumerate() {
                        let c = (0..w).find(|&c| bounds(c).0 <= i && i < bounds(c).1).unwrap();
                        let want = match c == (r + 1) % w {
                            true => (1..w).fold(x(c, i, 3) / w as f32, |sum, k| x((c + k) % w, i, 3) / w as f32 + sum),
                            false => x(r, i, 3),
                        };
                        assert_eq!(v.to_bits(), want.to_bits(), "w {w} rank {r}: element {i} after the divided reduce-scatter");
                    }
                    assert!(whole[..off].iter().chain(&whole[off + n..]).all(|&v| v == -1.0), "w {w} rank {r}: outside the range");
                    // The last rank enters a different collective. Rank w - 2, whose first look
                    // is at it, names it; the others fail too, naming it or a rank that already
                    // failed and left.
                    let other = if r == w - 1 { seq + 2 } else { seq + 1 };
                    match s.run::<f32>(Phase::AllReduce, entry(Op::AllReduce, other), &bounds, &|| false, None, SPIN) {
                        Err(Fail::Mismatch(p, d)) => {
                            assert!(r == w - 1 || (p == w - 1 && d.contains(&format!("#{}", seq + 2))), "rank {r}: {d}");
                        }
                        Err(Fail::Io(p, e)) => assert!(r != w - 2, "w {w} rank {r}: {e} (rank {p}) instead of the mismatch"),
                        Ok(()) => panic!("rank {r}: a mismatch goes unnoticed"),
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn collectives_on_shared_buffers() {
        for w in [2, 3, 4] {
            for (n, off) in [(10_007, 0), (5, 16), (2, 3), (70_001, 1001)] {
                run_ranks(w, n, off);
            }
        }
    }
}
