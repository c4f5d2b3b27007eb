//! What NcclComm shares with its watchdog thread: the collectives still running on the NCCL
//! stream (each a "done" event), the first failure, and the abort that happens once.
//!
//! As in PyTorch's ProcessGroupNCCL, the host does not wait for tensor collectives; this thread
//! polls their events and NCCL's async error every few milliseconds. A collective older than the
//! timeout, or an async error, aborts the communicator (once: an aborted communicator is freed by
//! NCCL and must not be destroyed or aborted again) and records an error naming the operation
//! and its sequence number, which the communicator's next call returns.

use super::api::{Api, CommHandle, CudaError, Event, CUDA_ERROR_NOT_READY, CUDA_EVENT_DISABLE_TIMING, CUDA_SUCCESS};
use super::api::{NCCL_IN_PROGRESS, NCCL_SUCCESS};
use crate::comm::{CommError, Op};
use std::collections::VecDeque;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the watchdog looks.
const POLL: Duration = Duration::from_millis(2);

/// A collective launched on the NCCL stream and not yet seen complete.
pub(super) struct Outstanding {
    pub event: Event,
    pub op: Op,
    pub seq: u64,
    pub launched: Instant,
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
    /// Done events of finished collectives, for reuse.
    pub pool: Vec<Event>,
    failure: Option<Failure>,
    aborted: bool,
    /// The last collective launched: what an async error names when nothing is outstanding.
    pub last: Option<(Op, u64)>,
}

impl State {
    /// True once ncclCommAbort ran (the communicator is then freed).
    pub fn aborted(&self) -> bool {
        self.aborted
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
    stop: AtomicBool,
}

// SAFETY: the handles are plain pointers NCCL and CUDA allow to be used from any thread; the
// state that changes is behind the mutex.
unsafe impl Send for Watched {}
unsafe impl Sync for Watched {}

impl Watched {
    pub fn new(api: &'static Api, comm: CommHandle, rank: usize, device: c_int, timeout: Duration) -> Watched {
        Watched { api, comm, rank, device, timeout, state: Mutex::new(State::default()), stop: AtomicBool::new(false) }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves the state usable: every change is one push or pop.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The recorded failure, as the error every later call returns.
    pub fn error(&self, st: &State) -> Option<CommError> {
        st.failure.as_ref().map(|f| CommError::Nccl { rank: self.rank, op: f.op, seq: f.seq, detail: f.detail.clone() })
    }

    /// Records the first failure and aborts the communicator, both once.
    fn fail(&self, st: &mut State, op: Op, seq: u64, detail: String) {
        if st.failure.is_none() {
            tracing::error!("NCCL {op} #{seq}: {detail}");
            st.failure = Some(Failure { op, seq, detail });
        }
        if !st.aborted {
            st.aborted = true;
            // SAFETY: the communicator is valid and not yet aborted or destroyed. Under the lock,
            // so once `aborted` reads true the abort has finished.
            unsafe { (self.api.nccl.comm_abort)(self.comm) };
        }
    }

    /// One look: retires finished collectives (their events go back to the pool) and fails on
    /// a collective past the timeout, a CUDA error, or NCCL's async error. The caller's thread
    /// has set the device.
    pub fn poll(&self, st: &mut State) {
        if st.aborted {
            return;
        }
        while let Some(o) = st.outstanding.front() {
            // SAFETY: the event is alive while it is outstanding.
            match unsafe { (self.api.cuda.event_query)(o.event) } {
                CUDA_SUCCESS => {
                    let o = st.outstanding.pop_front().expect("front exists");
                    st.pool.push(o.event);
                }
                CUDA_ERROR_NOT_READY if o.launched.elapsed() > self.timeout => {
                    let (op, seq) = (o.op, o.seq);
                    let detail = format!(
                        "did not complete within {:?}: a rank did not arrive or the GPU is stuck (communicator aborted)",
                        self.timeout
                    );
                    return self.fail(st, op, seq, detail);
                }
                // The stream runs in order: nothing after an unfinished collective is finished.
                CUDA_ERROR_NOT_READY => break,
                code => {
                    let (op, seq) = (o.op, o.seq);
                    let detail = format!("waiting for it: {} (communicator aborted)", self.api.cuda_error(code));
                    return self.fail(st, op, seq, detail);
                }
            }
        }
        let mut async_err = NCCL_SUCCESS;
        // SAFETY: valid communicator, valid out-pointer.
        let code = unsafe { (self.api.nccl.get_async_error)(self.comm, &mut async_err) };
        let err = if code != NCCL_SUCCESS { code } else { async_err };
        if err != NCCL_SUCCESS && err != NCCL_IN_PROGRESS {
            let (op, seq) = st.outstanding.front().map(|o| (o.op, o.seq)).or(st.last).unwrap_or((Op::Setup, 0));
            let detail = format!("{} (asynchronous error; communicator aborted)", self.api.nccl_error(err));
            self.fail(st, op, seq, detail);
        }
    }

    /// A done event: one from the pool, else a new one.
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
    /// host-memory collectives' bounded wait.
    pub fn wait_host(&self, seq: u64) -> Result<(), CommError> {
        loop {
            {
                let mut st = self.lock();
                self.poll(&mut st);
                if let Some(e) = self.error(&st) {
                    return Err(e);
                }
                if st.outstanding.front().is_none_or(|o| o.seq > seq) {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// Starts the watchdog thread; `stop_and_join` ends it.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new().name(format!("nccl-watchdog-{}", self.rank)).spawn(move || {
            // CUDA's current device is per thread: without this, event queries go to device 0.
            // SAFETY: plain C call.
            let code = unsafe { (me.api.cuda.set_device)(me.device) };
            if code != CUDA_SUCCESS {
                let detail = format!("watchdog: cudaSetDevice({}): {}", me.device, me.api.cuda_error(code));
                let mut st = me.lock();
                return me.fail(&mut st, Op::Setup, 0, detail);
            }
            while !me.stop.load(Ordering::Relaxed) {
                me.poll(&mut me.lock());
                std::thread::sleep(POLL);
            }
        })
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
