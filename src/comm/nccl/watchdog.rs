//! What NcclComm shares with its watchdog thread: the collectives still running on the NCCL
//! stream, the first failure, and the abort that happens once.
//!
//! As in PyTorch's ProcessGroupNCCL, the host does not wait for tensor collectives; this thread
//! polls their events and NCCL's async error every few milliseconds. A collective running longer
//! than the timeout, or an async error, records an error naming the operation and its sequence
//! number, which the communicator's next call returns, and then aborts the communicator.
//!
//! Two locks. `state` guards the bookkeeping and is only ever held briefly. `enqueue` is held by
//! the thread launching a collective from its failure check until NCCL has returned, and by
//! `abort`: ncclCommAbort frees the communicator, and NCCL forbids two threads calling on one
//! communicator, so an abort must never overlap an enqueue. Recording the failure first (under
//! `state`) stops any new enqueue; the abort then waits for the one in progress, if any. Neither
//! lock is ever waited for while holding `state`.

use super::api::{Api, CommHandle, CudaError, Event, CUDA_ERROR_NOT_READY, CUDA_EVENT_DISABLE_TIMING, CUDA_SUCCESS};
use super::api::{NCCL_IN_PROGRESS, NCCL_SUCCESS};
use crate::comm::{CommError, Op};
use std::collections::VecDeque;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the watchdog looks.
pub(super) const POLL: Duration = Duration::from_millis(2);

/// A collective launched on the NCCL stream and not yet seen complete.
pub(super) struct Outstanding {
    /// Recorded on the compute stream just before the launch: the NCCL stream waits for it.
    pub ready: Event,
    /// Recorded on the NCCL stream just after the launch.
    pub done: Event,
    pub op: Op,
    pub seq: u64,
    /// When the watchdog first saw the collective free to run: first in the NCCL stream's queue
    /// and its ready event complete. The timeout counts from here, not from the launch: a
    /// deferred collective is launched early in backward and may wait behind the rest of it, or
    /// behind a long forward, which is no sign of a missing rank.
    pub started: Option<Instant>,
    /// The compute stream has not been made to wait for it yet (`wait_pending` will).
    pub deferred: bool,
}

struct Failure {
    op: Op,
    seq: u64,
    detail: String,
}

#[derive(Default)]
pub(super) struct State {
    pub outstanding: VecDeque<Outstanding>,
    /// Events of finished collectives, for reuse.
    pub pool: Vec<Event>,
    failure: Option<Failure>,
    aborted: bool,
    /// The last collective launched: what an async error names when nothing is outstanding.
    pub last: Option<(Op, u64)>,
    /// The collective whose launch holds the enqueue lock: what an abort that cannot get the
    /// lock names.
    pub enqueuing: Option<(Op, u64)>,
}

impl State {
    /// True once a failure is recorded: the communicator is aborted, or about to be.
    pub fn failed(&self) -> bool {
        self.failure.is_some()
    }
}

/// The communicator's handle and state, shared with the watchdog.
pub(super) struct Watched {
    pub api: &'static Api,
    pub comm: CommHandle,
    pub rank: usize,
    pub device: c_int,
    pub timeout: Duration,
    state: Mutex<State>,
    enqueue: Mutex<()>,
    stop: AtomicBool,
}

// SAFETY: the handles are plain pointers NCCL and CUDA allow to be used from any thread; the
// state that changes is behind the mutex, and NCCL calls on the communicator are serialised by
// the enqueue lock (ncclCommGetAsyncError is allowed concurrently, as ProcessGroupNCCL relies on).
unsafe impl Send for Watched {}
unsafe impl Sync for Watched {}

/// A mutex whose holder panicked is still usable here: each holder's changes are single steps.
fn unpoisoned<'a, T>(r: std::sync::LockResult<MutexGuard<'a, T>>) -> MutexGuard<'a, T> {
    r.unwrap_or_else(|e| e.into_inner())
}

impl Watched {
    pub fn new(api: &'static Api, comm: CommHandle, rank: usize, device: c_int, timeout: Duration) -> Watched {
        Watched {
            api,
            comm,
            rank,
            device,
            timeout,
            state: Mutex::new(State::default()),
            enqueue: Mutex::new(()),
            stop: AtomicBool::new(false),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        unpoisoned(self.state.lock())
    }

    /// Held by a launch from its failure check until NCCL has returned (see the module docs).
    pub fn enqueue_lock(&self) -> MutexGuard<'_, ()> {
        unpoisoned(self.enqueue.lock())
    }

    /// The recorded failure, as the error every later call returns.
    pub fn error(&self, st: &State) -> Option<CommError> {
        st.failure.as_ref().map(|f| CommError::Nccl { rank: self.rank, op: f.op, seq: f.seq, detail: f.detail.clone() })
    }

    /// Records the first failure: from then on no collective is launched, and NCCL is not asked
    /// anything more (the caller aborts once it holds no lock).
    pub fn record(&self, st: &mut State, op: Op, seq: u64, detail: String) {
        if st.failure.is_none() {
            tracing::error!("NCCL {op} #{seq}: {detail}");
            st.failure = Some(Failure { op, seq, detail });
        }
    }

    /// Aborts the communicator, once, after a failure was recorded. It first waits, up to the
    /// timeout, for a collective another thread is enqueuing (see the module docs). A thread
    /// stuck inside NCCL that long cannot be recovered, and aborting under it would free the
    /// communicator it is using, so the process ends with one line naming both operations.
    pub fn abort(&self) {
        let asked = Instant::now();
        let _enqueue = loop {
            match self.enqueue.try_lock() {
                Ok(g) => break g,
                Err(TryLockError::Poisoned(e)) => break e.into_inner(),
                Err(TryLockError::WouldBlock) if asked.elapsed() < self.timeout => std::thread::sleep(Duration::from_millis(1)),
                Err(TryLockError::WouldBlock) => self.exit_stuck(),
            }
        };
        if self.lock().aborted {
            return;
        }
        // SAFETY: valid communicator, not yet aborted or destroyed, and no other thread is
        // calling NCCL on it (the enqueue lock).
        unsafe { (self.api.nccl.comm_abort)(self.comm) };
        self.lock().aborted = true;
    }

    fn exit_stuck(&self) -> ! {
        let st = self.lock();
        let failed = st.failure.as_ref().map_or("a failure".to_string(), |f| format!("{} #{} failed ({})", f.op, f.seq, f.detail));
        let holder =
            st.enqueuing.map_or("another thread is aborting it".to_string(), |(op, seq)| format!("{op} #{seq} is still being enqueued"));
        eprintln!(
            "ringtrain: error: rank {}: NCCL {failed}, and the communicator cannot be aborted: {holder} after {:?}; exiting",
            self.rank, self.timeout
        );
        // SAFETY: ends the process; a thread stuck inside NCCL has nothing to unwind to.
        unsafe { libc::_exit(1) }
    }

    /// One look: retires finished collectives (their events go back to the pool) and records a
    /// failure on a collective past the timeout, a CUDA error, or NCCL's async error. Nothing
    /// once a failure is recorded: the communicator may be freed. The caller's thread has set
    /// the device.
    pub fn poll(&self, st: &mut State) {
        if st.failure.is_some() {
            return;
        }
        let api = self.api;
        let mut fault = None;
        while let Some(o) = st.outstanding.front_mut() {
            // SAFETY: the events are alive while the collective is outstanding.
            match unsafe { (api.cuda.event_query)(o.done) } {
                CUDA_SUCCESS => {
                    let o = st.outstanding.pop_front().expect("front exists");
                    st.pool.extend([o.ready, o.done]);
                    continue;
                }
                CUDA_ERROR_NOT_READY => match o.started {
                    // The NCCL stream runs in order: the front collective is the only one that
                    // may be running, so it alone is timed.
                    // SAFETY: as above.
                    None => match unsafe { (api.cuda.event_query)(o.ready) } {
                        CUDA_SUCCESS => o.started = Some(Instant::now()),
                        CUDA_ERROR_NOT_READY => {}
                        code => {
                            fault = Some((o.op, o.seq, format!("waiting for its inputs: {} (communicator aborted)", api.cuda_error(code))))
                        }
                    },
                    Some(t) if t.elapsed() > self.timeout => {
                        let detail = format!(
                            "did not complete within {:?} of being free to run: a rank did not arrive or the GPU is stuck (communicator aborted)",
                            self.timeout
                        );
                        fault = Some((o.op, o.seq, detail));
                    }
                    Some(_) => {}
                },
                code => fault = Some((o.op, o.seq, format!("waiting for it: {} (communicator aborted)", api.cuda_error(code)))),
            }
            break;
        }
        if let Some((op, seq, detail)) = fault {
            return self.record(st, op, seq, detail);
        }
        let mut async_err = NCCL_SUCCESS;
        // SAFETY: valid communicator (no failure recorded, so not aborted), valid out-pointer.
        let code = unsafe { (api.nccl.get_async_error)(self.comm, &mut async_err) };
        let err = if code != NCCL_SUCCESS { code } else { async_err };
        if err != NCCL_SUCCESS && err != NCCL_IN_PROGRESS {
            let (op, seq) = st.outstanding.front().map(|o| (o.op, o.seq)).or(st.last).unwrap_or((Op::Setup, 0));
            let detail = format!("{} (asynchronous error; communicator aborted)", api.nccl_error(err));
            self.record(st, op, seq, detail);
        }
    }

    /// An event: one from the pool, else a new one.
    pub fn take_event(&self) -> Result<Event, CudaError> {
        if let Some(e) = self.lock().pool.pop() {
            return Ok(e);
        }
        let mut e = Event(std::ptr::null_mut());
        // SAFETY: valid out-pointer; the caller's thread has set the device.
        match unsafe { (self.api.cuda.event_create)(&mut e, CUDA_EVENT_DISABLE_TIMING) } {
            CUDA_SUCCESS => Ok(e),
            code => Err(code),
        }
    }

    /// Blocks the host until collective `seq` has finished, or fails as the watchdog would: the
    /// host-memory collectives' bounded wait. The timeout counts from when the collective could
    /// run (see `Outstanding::started`); the host also gives up when one it waits for has not even
    /// become free to run within the timeout of the wait starting (the compute stream is stuck).
    pub fn wait_host(&self, seq: u64) -> Result<(), CommError> {
        let asked = Instant::now();
        loop {
            {
                let mut st = self.lock();
                self.poll(&mut st);
                if let Some(o) = st.outstanding.front().filter(|o| o.seq <= seq && o.started.is_none()) {
                    if asked.elapsed() > self.timeout {
                        let (op, seq) = (o.op, o.seq);
                        let detail = format!(
                            "was not free to run within {:?}: the work queued before it on the compute stream did not finish (communicator aborted)",
                            self.timeout
                        );
                        self.record(&mut st, op, seq, detail);
                    }
                }
                if let Some(e) = self.error(&st) {
                    drop(st);
                    self.abort();
                    return Err(e);
                }
                if st.outstanding.front().is_none_or(|o| o.seq > seq) {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// Starts the watchdog thread; `stop` ends it.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new().name(format!("nccl-watchdog-{}", self.rank)).spawn(move || {
            // CUDA's current device is per thread: without this, event queries go to device 0.
            // SAFETY: plain C call.
            let code = unsafe { (me.api.cuda.set_device)(me.device) };
            if code != CUDA_SUCCESS {
                let detail = format!("watchdog: cudaSetDevice({}): {}", me.device, me.api.cuda_error(code));
                me.record(&mut me.lock(), Op::Setup, 0, detail);
                return me.abort();
            }
            while !me.stop.load(Ordering::Relaxed) {
                let failed = {
                    let mut st = me.lock();
                    me.poll(&mut st);
                    st.failed()
                };
                if failed {
                    // Nothing left to watch once aborted.
                    return me.abort();
                }
                std::thread::sleep(POLL);
            }
        })
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
