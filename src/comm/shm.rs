//! Shared-memory ring links between ranks on the same node: a single-producer single-consumer
//! byte ring in a memfd segment named `ringtrain-<job token>-<from>to<to>`, handed from the
//! sending rank to the receiving one over their Unix socket (SCM_RIGHTS). Nothing is ever named in
//! the file system, so nothing outlives the job, even after a crash: the kernel frees the segment
//! when both processes have gone. Waiting uses futexes on the shared counters (no busy loops on a
//! machine where every core computes); the Unix socket stays open only to notice a dead peer.

use super::segment::{futex_wake, map, memfd, peer_gone, recv_fd, send_fd, wait_until, Mapping, SPIN};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Data bytes in each ring (power of two).
const CAPACITY: usize = 4 << 20;
const HEADER: usize = 4096;

#[repr(C)]
struct Header {
    /// Total bytes written / read; the ring holds head - tail bytes.
    head: AtomicU64,
    _pad1: [u8; 56],
    tail: AtomicU64,
    _pad2: [u8; 56],
    /// Futex words: bumped on every publish; the other side waits on them.
    head_seq: AtomicU32,
    tail_seq: AtomicU32,
    closed: AtomicU32,
    /// Sleepers on head_seq / tail_seq: a publish makes the futex_wake syscall only when the
    /// other side is asleep, not on every write and read.
    head_sleepers: AtomicU32,
    tail_sleepers: AtomicU32,
}

/// One ring's mapping; the descriptor stays open so it can be handed over again if needed.
struct Segment {
    map: Mapping,
    _fd: OwnedFd,
}

impl Segment {
    fn create(name: &str) -> io::Result<Segment> {
        Segment::map(memfd(name, HEADER + CAPACITY)?)
    }

    fn map(fd: OwnedFd) -> io::Result<Segment> {
        Ok(Segment { map: map(&fd, HEADER + CAPACITY, false)?, _fd: fd })
    }

    fn header(&self) -> &Header {
        // SAFETY: the header sits at the start of the mapping, zero-initialised by ftruncate.
        unsafe { &*(self.map.base() as *const Header) }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: within the mapping.
        unsafe { self.map.base().add(HEADER) }
    }
}

/// One direction of a link: this side either writes or reads.
pub struct ShmLink {
    seg: Arc<Segment>,
    sock: Arc<UnixStream>,
    timeout: Duration,
    writer: bool,
}

impl ShmLink {
    /// Creates the ring for sending to the peer at the other end of `sock` and hands it over.
    pub fn offer(sock: &UnixStream, name: &str, timeout: Duration) -> io::Result<ShmLink> {
        let seg = Segment::create(name)?;
        send_fd(sock, seg._fd.as_raw_fd())?;
        Ok(ShmLink { seg: Arc::new(seg), sock: Arc::new(sock.try_clone()?), timeout, writer: true })
    }

    /// Receives the ring the peer at the other end of `sock` made for sending to us.
    pub fn accept(sock: &UnixStream, timeout: Duration) -> io::Result<ShmLink> {
        let fd = recv_fd(sock)?;
        Ok(ShmLink { seg: Arc::new(Segment::map(fd)?), sock: Arc::new(sock.try_clone()?), timeout, writer: false })
    }

    /// The Unix socket beside the ring: it tells when the peer has gone, and carries the
    /// descriptors of shared buffers (`shared_buf`).
    pub(super) fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// How many bytes the peer has published that this (reading) side has not consumed.
    pub(super) fn unread(&self) -> u64 {
        let h = self.seg.header();
        h.head.load(Ordering::Acquire) - h.tail.load(Ordering::Acquire)
    }

    pub fn try_clone(&self) -> ShmLink {
        ShmLink { seg: self.seg.clone(), sock: self.sock.clone(), timeout: self.timeout, writer: self.writer }
    }

    pub fn shutdown(&self) {
        self.seg.header().closed.store(1, Ordering::Release);
        self.seg.header().head_seq.fetch_add(1, Ordering::Release);
        self.seg.header().tail_seq.fetch_add(1, Ordering::Release);
        futex_wake(&self.seg.header().head_seq);
        futex_wake(&self.seg.header().tail_seq);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Waits until `ready()` holds: spinning for up to `SPIN`, then sleeping on `word` (counted
    /// in `sleepers`) between checks.
    fn wait(&self, word: &AtomicU32, sleepers: &AtomicU32, ready: impl Fn() -> bool, started: Instant) -> io::Result<()> {
        let h = self.seg.header();
        wait_until(word, sleepers, ready, started, SPIN, |spinning| {
            // A peer that published its last bytes and then left: those bytes still count (its
            // writes happen before its close, so the last look after seeing the close finds them).
            if h.closed.load(Ordering::Acquire) != 0 {
                Some(io::Error::new(io::ErrorKind::BrokenPipe, "shared-memory link closed"))
            } else if spinning {
                None
            } else if peer_gone(&self.sock) {
                Some(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed its connection"))
            } else if started.elapsed() > self.timeout {
                Some(io::Error::new(io::ErrorKind::TimedOut, "shared-memory link timed out"))
            } else {
                None
            }
        })
    }
}

impl Write for ShmLink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        debug_assert!(self.writer);
        let h = self.seg.header();
        let started = Instant::now();
        let head = h.head.load(Ordering::Relaxed);
        self.wait(&h.tail_seq, &h.tail_sleepers, || head - h.tail.load(Ordering::Acquire) < CAPACITY as u64, started)?;
        let free = CAPACITY - (head - h.tail.load(Ordering::Acquire)) as usize;
        let n = buf.len().min(free);
        let at = head as usize % CAPACITY;
        let first = n.min(CAPACITY - at);
        // SAFETY: [at, at+first) and [0, n-first) are free space the reader does not touch.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), self.seg.data().add(at), first);
            std::ptr::copy_nonoverlapping(buf.as_ptr().add(first), self.seg.data(), n - first);
        }
        h.head.store(head + n as u64, Ordering::Release);
        h.head_seq.fetch_add(1, Ordering::SeqCst);
        if h.head_sleepers.load(Ordering::SeqCst) > 0 {
            futex_wake(&h.head_seq);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ShmLink {
    /// Consumes exactly `len` bytes, handing each published span to `f` in order while it is
    /// still in the ring: the reduce-scatter adds straight from shared memory instead of copying
    /// into a scratch buffer first (one pass over the chunk fewer). Spans are at most `SPAN` bytes,
    /// so the writer gets space back while the rest is being added.
    pub fn read_with(&mut self, mut len: usize, mut f: impl FnMut(&[u8])) -> io::Result<()> {
        const SPAN: usize = 256 << 10;
        debug_assert!(!self.writer);
        let h = self.seg.header();
        while len > 0 {
            let started = Instant::now();
            let tail = h.tail.load(Ordering::Relaxed);
            self.wait(&h.head_seq, &h.head_sleepers, || h.head.load(Ordering::Acquire) > tail, started)?;
            let n = ((h.head.load(Ordering::Acquire) - tail) as usize).min(len).min(SPAN);
            let at = tail as usize % CAPACITY;
            let first = n.min(CAPACITY - at);
            // SAFETY: [at, at+first) and [0, n-first) hold published bytes the writer does not
            // touch until `tail` moves past them below.
            unsafe {
                f(std::slice::from_raw_parts(self.seg.data().add(at), first));
                if n > first {
                    f(std::slice::from_raw_parts(self.seg.data(), n - first));
                }
            }
            h.tail.store(tail + n as u64, Ordering::Release);
            h.tail_seq.fetch_add(1, Ordering::SeqCst);
            if h.tail_sleepers.load(Ordering::SeqCst) > 0 {
                futex_wake(&h.tail_seq);
            }
            len -= n;
        }
        Ok(())
    }
}

impl Read for ShmLink {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        debug_assert!(!self.writer);
        if buf.is_empty() {
            return Ok(0);
        }
        let h = self.seg.header();
        let started = Instant::now();
        let tail = h.tail.load(Ordering::Relaxed);
        self.wait(&h.head_seq, &h.head_sleepers, || h.head.load(Ordering::Acquire) > tail, started)?;
        let avail = (h.head.load(Ordering::Acquire) - tail) as usize;
        let n = buf.len().min(avail);
        let at = tail as usize % CAPACITY;
        let first = n.min(CAPACITY - at);
        // SAFETY: [at, at+first) and [0, n-first) hold published bytes the writer does not touch.
        unsafe {
            std::ptr::copy_nonoverlapping(self.seg.data().add(at), buf.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(self.seg.data(), buf.as_mut_ptr().add(first), n - first);
        }
        h.tail.store(tail + n as u64, Ordering::Release);
        h.tail_seq.fetch_add(1, Ordering::SeqCst);
        if h.tail_sleepers.load(Ordering::SeqCst) > 0 {
            futex_wake(&h.tail_seq);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_cross_in_order_with_wraparound_and_close_is_noticed() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut w = ShmLink::offer(&a, "ringtrain-test", Duration::from_secs(5)).unwrap();
        let mut r = ShmLink::accept(&b, Duration::from_secs(5)).unwrap();
        let data: Vec<u8> = (0..(3 * CAPACITY + 12345)).map(|i| (i * 7 % 251) as u8).collect();
        let expected = data.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&data).unwrap();
            w
        });
        let mut got = vec![0u8; expected.len()];
        r.read_exact(&mut got).unwrap();
        assert!(got == expected);
        let w = writer.join().unwrap();
        drop(a);
        drop(w);
        let mut one = [0u8];
        let err = r.read(&mut one).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }
}
