//! A shared handle on one communicator. The process group and every `Ddp` built from it hold the
//! same handle, so a `Ddp` always talks through the communicator it was built with and a loop
//! passes no communicator around. One caller at a time: a collective is a sequence every rank
//! must run in the same order, so calls never interleave.
//!
//! While a `Ddp`'s backward overlaps its all-reduces with the autograd engine, the communicator
//! is lent to its communication thread. A collective called meanwhile (the backward of a
//! differentiable all-gather, SyncBatchNorm's) goes through `run`, which then hands it to that
//! thread as a job: it runs between bucket all-reduces, in the order the engine reached it,
//! which is the same on every rank.

use super::{CommError, Communicator};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Work for the communicator, run by whoever holds it.
pub type CommJob = Box<dyn FnOnce(&mut dyn Communicator) + Send>;

/// Where jobs go while the communicator is lent: a sender that returns false once its thread
/// stopped taking them, and how long a job may take there.
struct Lent {
    send: Box<dyn Fn(CommJob) -> bool + Send>,
    timeout: Duration,
}

#[derive(Clone)]
pub struct CommHandle {
    inner: Arc<Mutex<Option<Box<dyn Communicator>>>>,
    lent: Arc<Mutex<Option<Lent>>>,
}

/// The communicator, borrowed for one or more calls.
pub struct CommGuard<'a> {
    guard: MutexGuard<'a, Option<Box<dyn Communicator>>>,
}

impl CommHandle {
    pub fn new(comm: Box<dyn Communicator>) -> CommHandle {
        CommHandle { inner: Arc::new(Mutex::new(Some(comm))), lent: Arc::new(Mutex::new(None)) }
    }

    /// Runs `f` on the communicator: here, or, while it is lent (`lend`), on the thread holding
    /// it, waiting for the result. `what` names the call in errors.
    pub fn run<R: Send + 'static>(&self, what: &str, f: impl FnOnce(&mut dyn Communicator) -> R + Send + 'static) -> Result<R, CommError> {
        self.submit(what, f)?.wait()
    }

    /// As `run`, but without waiting while the communicator is lent: the call is queued on the
    /// thread holding it, in order with everything sent there, and the caller computes on until
    /// it waits on the returned `Pending` (ZeRO-3's prefetch of the next unit's parameters).
    /// Not lent, `f` runs here and now.
    pub fn submit<R: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&mut dyn Communicator) -> R + Send + 'static,
    ) -> Result<Pending<R>, CommError> {
        let lent = self.lent.lock().unwrap_or_else(|e| e.into_inner());
        let Some(l) = lent.as_ref() else {
            drop(lent);
            return Ok(Pending(Waiting::Done(f(&mut *self.lock()))));
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let job: CommJob = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        // Sent under the lock: `stop_lending` takes the same lock before it drops what is
        // queued, so a job is either run, or dropped (closing `rx`), never stranded.
        if !(l.send)(job) {
            return Err(lent_stopped(what));
        }
        // The job's own collective times out after `timeout`; behind the bucket all-reduces
        // queued before it, it may wait for a few of those first.
        Ok(Pending(Waiting::Queued { rx, what: what.to_string(), timeout: 3 * l.timeout }))
    }

    /// Whether the communicator is lent to another thread now (`submit` then queues).
    pub fn is_lent(&self) -> bool {
        self.lent.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Lends the communicator to a thread of its own until the returned scope is dropped, so
    /// that what is `submit`ted meanwhile runs there while this thread computes (ZeRO-3's
    /// forward prefetches). Inside the scope the communicator is reached through `run` and
    /// `submit` only, as during an overlapped backward. Everything submitted before the drop
    /// runs before it returns.
    pub fn lend_to_thread(&self) -> LentScope {
        let timeout = self.lock().timeout();
        let (tx, rx) = crossbeam_channel::unbounded::<Option<CommJob>>();
        let jobs = tx.clone();
        self.lend(Box::new(move |job| jobs.send(Some(job)).is_ok()), timeout);
        let handle = self.clone();
        let thread = std::thread::Builder::new().name("comm-prefetch".into()).spawn(move || {
            let mut comm = handle.lock();
            // `None` ends the scope; jobs sent before it are run first.
            while let Ok(Some(job)) = rx.recv() {
                job(&mut *comm);
            }
        });
        match thread {
            Ok(t) => LentScope { handle: self.clone(), stop: tx, thread: Some(t) },
            Err(e) => {
                // No thread: still lent (so every decision that depends on it is the same as on
                // the other ranks), but each job runs here as it is sent, in the same order.
                tracing::warn!("no thread to run prefetches on ({e}): they run in line");
                let inline = self.clone();
                self.lend(
                    Box::new(move |job| {
                        job(&mut *inline.lock());
                        true
                    }),
                    timeout,
                );
                LentScope { handle: self.clone(), stop: tx, thread: None }
            }
        }
    }

    /// Lends the communicator to a thread that runs jobs sent through `send` (false: it has
    /// stopped). Until `reclaim`, `run` hands its work there.
    pub fn lend(&self, send: Box<dyn Fn(CommJob) -> bool + Send>, timeout: Duration) {
        *self.lent.lock().unwrap_or_else(|e| e.into_inner()) = Some(Lent { send, timeout });
    }

    /// Called by the borrowing thread as it stops taking jobs: later ones are refused (an error
    /// for their caller: the communicator is still borrowed), and `drain` drops those queued but
    /// not run (their callers get an error instead of waiting), under the lock `run` sends under.
    pub fn stop_lending(&self, drain: impl FnOnce()) {
        let mut lent = self.lent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = lent.as_mut() {
            l.send = Box::new(|_| false);
        }
        drain();
    }

    /// Ends a `lend`: `run` uses the communicator directly again.
    pub fn reclaim(&self) {
        *self.lent.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The communicator for the calls that follow. Panics when it is already borrowed on this
    /// path (a guard held across a call that borrows it again would otherwise deadlock) or when
    /// the group has finished: both are mistakes in the calling code, not run-time conditions.
    pub fn lock(&self) -> CommGuard<'_> {
        let guard = match self.inner.try_lock() {
            Ok(g) => g,
            // A panic while it was borrowed leaves it usable: collectives keep their own state.
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                panic!("the communicator is already borrowed: drop the earlier CommGuard before this call")
            }
        };
        assert!(guard.is_some(), "the process group has finished: its communicator is closed");
        CommGuard { guard }
    }

    /// True when both handles share one communicator.
    pub fn same(&self, other: &CommHandle) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Takes the communicator out (the group's end): later calls through any handle panic with
    /// the reason instead of using a closed communicator.
    pub fn close(&self) -> Option<Box<dyn Communicator>> {
        match self.inner.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        }
    }
}

/// A call `submit`ted to the communicator: done, or queued where it is lent.
pub struct Pending<R>(Waiting<R>);

enum Waiting<R> {
    Done(R),
    Queued { rx: crossbeam_channel::Receiver<R>, what: String, timeout: Duration },
}

impl<R> Pending<R> {
    /// Its result, once the thread holding the communicator has run it.
    pub fn wait(self) -> Result<R, CommError> {
        match self.0 {
            Waiting::Done(r) => Ok(r),
            Waiting::Queued { rx, what, timeout } => match rx.recv_timeout(timeout) {
                Ok(r) => Ok(r),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(lent_stopped(&what)),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    Err(CommError::Lent(format!("{what}: waited {:.0}s for the communication thread to run it", timeout.as_secs_f64())))
                }
            },
        }
    }
}

/// `CommHandle::lend_to_thread`'s scope: dropping it runs what was queued, stops the thread
/// and gives the communicator back.
pub struct LentScope {
    handle: CommHandle,
    stop: crossbeam_channel::Sender<Option<CommJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LentScope {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            // Later submissions are refused (their callers get an error); queued ones still run.
            self.handle.stop_lending(|| {});
            let _ = self.stop.send(None);
            if thread.join().is_err() {
                tracing::warn!("the prefetch thread panicked");
            }
        }
        self.handle.reclaim();
    }
}

fn lent_stopped(what: &str) -> CommError {
    CommError::Lent(format!("{what}: DDP's communication thread stopped before running it (an earlier collective of this backward failed)"))
}

impl std::ops::Deref for CommGuard<'_> {
    type Target = dyn Communicator;
    fn deref(&self) -> &Self::Target {
        self.guard.as_deref().expect("checked at lock")
    }
}

impl std::ops::DerefMut for CommGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.guard.as_deref_mut().expect("checked at lock")
    }
}

/// What a `Ddp` can be built from: the process group, or a handle.
pub trait AsComm {
    fn comm_handle(&self) -> CommHandle;
}

impl AsComm for CommHandle {
    fn comm_handle(&self) -> CommHandle {
        self.clone()
    }
}
