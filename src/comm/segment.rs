//! What the node-local transports share: memfd segments mapped by several processes, futex
//! waits on words inside them, and descriptors passed over Unix sockets. The shared-memory links
//! (`shm`) and the shared buffers (`shared_buf`) both build on these; neither depends on the other.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a waiter spins before sleeping: the peer usually answers within microseconds when it
/// has a core, and a futex sleep and wake-up cost ~10 µs of latency.
pub(super) const SPIN: Duration = Duration::from_micros(30);

/// How long a waiter spins when its caller has nothing else to run (`Communicator::set_idle_waits`:
/// backward has finished and the step waits for the last bucket) and every rank of the node has a
/// core of its own. The wait is then for a peer still computing, often milliseconds, and spinning
/// through it measured ~5% faster training than sleeping (README, "Where a DDP worker's time
/// goes"; likely because a sleeping vCPU is handed back to the host). Past this the waiter sleeps
/// as usual: a peer that is checkpointing or evaluating is not worth a busy core.
pub(super) const IDLE_SPIN: Duration = Duration::from_millis(20);

/// Waits until `ready()`: spinning for `spin`, then sleeping on the futex `word` (its publisher
/// bumps it and wakes sleepers it counts in `sleepers`). `failed(spinning)` is asked on every turn
/// (while spinning, it should only look at shared memory: a syscall per turn would defeat the
/// spin) and ends the wait with its error, unless a last look finds `ready()` after all: a peer
/// that published and then left, or a deadline met just as the answer came.
pub(super) fn wait_until<E>(
    word: &AtomicU32,
    sleepers: &AtomicU32,
    ready: impl Fn() -> bool,
    started: Instant,
    spin: Duration,
    mut failed: impl FnMut(bool) -> Option<E>,
) -> Result<(), E> {
    loop {
        let seq = word.load(Ordering::Acquire);
        if ready() {
            return Ok(());
        }
        let spinning = started.elapsed() < spin;
        if let Some(e) = failed(spinning) {
            return if ready() { Ok(()) } else { Err(e) };
        }
        if spinning {
            std::hint::spin_loop();
            continue;
        }
        // Announce the sleep before the last look: a publisher that bumps `word` after our look
        // sees the count (SeqCst on both sides) and wakes us; one that bumped it before changed
        // `seq`, so FUTEX_WAIT returns at once.
        sleepers.fetch_add(1, Ordering::SeqCst);
        if !ready() {
            futex_wait(word, seq, Duration::from_millis(50));
        }
        sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A shared mapping (also each shared-memory link's ring). `keep` mappings are not unmapped on
/// drop: a rank's own copy of an allocation backs a tensor libtorch may still hold (gradient views
/// into a bucket) after the communicator is gone, and that tensor's storage unmaps it when freed.
pub(super) struct Mapping {
    pub(super) base: *mut u8,
    pub(super) len: usize,
    keep: bool,
}

// SAFETY: shared memory touched through atomics (control pages, link headers) and protocols that
// give each byte one writer at a time: the collectives' (between the barriers each rank writes
// only its own chunk) and the links' (the writer touches free space, the reader published bytes).
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(super) fn base(&self) -> *mut u8 {
        self.base
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if !self.keep {
            // SAFETY: unmapping our own mapping, which nothing else refers to.
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
        }
    }
}

/// A memfd of `len` zero bytes named `name` (close-on-exec); the shared-memory links use it too.
pub(super) fn memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::Error::other("bad segment name"))?;
    // SAFETY: memfd_create with a valid name.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Reserved now, not at first touch: under a memory limit a sparse segment (ftruncate) would
    // kill the process mid-collective when a page is first written; fallocate fails here, with a
    // reason. SAFETY: sizing our own memfd; the new bytes read as zeros.
    let r = unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("reserving {len} bytes of shared memory: {e} (a memory limit, or /dev/shm full?)")));
    }
    Ok(fd)
}

/// Maps a memfd of at least `len` bytes, shared.
pub(super) fn map(fd: &OwnedFd, len: usize, keep: bool) -> io::Result<Mapping> {
    // A segment shorter than expected (ranks out of step in their allocations) would map, then
    // fault (SIGBUS) on the first touch past its end: refuse it here.
    // SAFETY: fstat into a zeroed struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if (st.st_size as u64) < len as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a shared segment of {} bytes where {len} were expected (ranks allocating out of step?)", st.st_size),
        ));
    }
    // SAFETY: mapping `len` bytes of a memfd of at least that size, shared.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(Mapping { base: base as *mut u8, len, keep })
}

pub(super) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: a shared (not private) futex wait on a word in our mapping.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, &ts as *const libc::timespec) };
}

pub(super) fn futex_wake(word: &AtomicU32) {
    // SAFETY: waking waiters on a word in our mapping.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

/// True when the peer has closed its end of the Unix socket (it exited or crashed).
pub(super) fn peer_gone(sock: &UnixStream) -> bool {
    let mut p = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: polling one valid descriptor without waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// A one-byte message with room for one SCM_RIGHTS descriptor; `iov` and `control` must outlive it.
fn fd_message(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: an all-zero msghdr is valid; the pointers set below stay valid while it is used.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = control.len();
    msg
}

fn fd_control_space() -> usize {
    // SAFETY: pure size computation.
    unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize }
}

pub(super) fn send_fd(sock: &UnixStream, fd: RawFd) -> io::Result<()> {
    let mut byte = [1u8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr() as *mut libc::c_void, iov_len: 1 };
    let mut control = vec![0u8; fd_control_space()];
    let msg = fd_message(&mut iov, &mut control);
    // SAFETY: filling the one control message the buffer was sized for, then sending it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd);
        loop {
            if libc::sendmsg(sock.as_raw_fd(), &msg, 0) == 1 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    Ok(())
}

pub(super) fn recv_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr() as *mut libc::c_void, iov_len: 1 };
    let mut control = vec![0u8; fd_control_space()];
    let mut msg = fd_message(&mut iov, &mut control);
    // SAFETY: receiving into the sized control buffer, then reading one descriptor from it.
    unsafe {
        let mut n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        // A signal before anything arrived: try again (nothing was consumed).
        while n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        }
        if n != 1 {
            return Err(if n < 0 {
                io::Error::last_os_error()
            } else {
                io::Error::new(io::ErrorKind::UnexpectedEof, "no segment received")
            });
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "peer sent no shared-memory segment"));
        }
        Ok(OwnedFd::from_raw_fd(std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const RawFd)))
    }
}

/// Waits up to `timeout` for `sock` to have something to read.
pub(super) fn wait_readable(sock: &UnixStream, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut p = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: polling one valid descriptor.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        match n {
            0 => return Err(io::Error::from(io::ErrorKind::TimedOut)),
            // A signal (a profiler's, a child's exit) is no failure: wait on.
            n if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            n if n < 0 => return Err(io::Error::last_os_error()),
            _ => return Ok(()),
        }
    }
}
