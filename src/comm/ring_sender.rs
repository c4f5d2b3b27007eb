//! The ring's sender: one long-lived thread per communicator that writes to the next rank while
//! the calling thread receives from the previous one. A collective queues its header and then
//! segments as they become ready, and ends with `finish`, which returns once every queued byte
//! is written (or the first error). Spawning a thread and duplicating the descriptor for every
//! collective cost ~170 µs, as much as a 64 KB all-reduce over Unix sockets.

use super::link::Link;
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::io::{self, Write};

enum Job {
    Bytes(Vec<u8>),
    /// Bytes the caller keeps alive and unchanged until its `finish` returns.
    Raw(*const u8, usize),
    Done,
}

// SAFETY: a Raw job's memory outlives the job (see `SendEngine::send_raw`).
unsafe impl Send for Job {}

pub(super) struct SendEngine {
    jobs: Sender<Job>,
    done: Receiver<io::Result<()>>,
}

impl SendEngine {
    /// Starts the thread; it owns `link` (a clone of the link to the next rank) and ends when
    /// the engine is dropped.
    pub fn start(mut link: Link) -> io::Result<SendEngine> {
        let (jobs, rx) = unbounded::<Job>();
        let (done_tx, done) = unbounded();
        std::thread::Builder::new().name("ring-sender".into()).spawn(move || {
            // After a failed write the rest of the collective's jobs are skipped, not written:
            // the error is reported at its `Done`.
            let mut result = Ok(());
            for job in rx.iter() {
                match job {
                    Job::Bytes(b) if result.is_ok() => result = link.write_all(&b),
                    // SAFETY: the caller keeps [p, p + n) alive and unchanged until `finish`.
                    Job::Raw(p, n) if result.is_ok() => result = link.write_all(unsafe { std::slice::from_raw_parts(p, n) }),
                    Job::Done => {
                        if done_tx.send(std::mem::replace(&mut result, Ok(()))).is_err() {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        })?;
        Ok(SendEngine { jobs, done })
    }

    pub fn send_bytes(&self, b: Vec<u8>) {
        let _ = self.jobs.send(Job::Bytes(b));
    }

    /// Queues `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The bytes must stay alive and unmodified until the next `finish` returns.
    pub unsafe fn send_raw(&self, ptr: *const u8, len: usize) {
        let _ = self.jobs.send(Job::Raw(ptr, len));
    }

    /// Waits until everything queued is written; the first error if a write failed. The writes
    /// themselves are bounded by the link's timeout, so this returns.
    pub fn finish(&self) -> io::Result<()> {
        if self.jobs.send(Job::Done).is_err() {
            return Err(io::Error::other("the ring's sender thread is gone (it panicked)"));
        }
        self.done.recv().unwrap_or_else(|_| Err(io::Error::other("the ring's sender thread panicked")))
    }
}

/// Waits for queued writes before the memory they read can go away, also when a collective
/// unwinds from a panic.
impl Drop for SendEngine {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
