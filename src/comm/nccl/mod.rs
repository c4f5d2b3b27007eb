//! The NCCL backend, as PyTorch's ProcessGroupNCCL does it: collectives on CUDA tensors, on a
//! stream of the communicator's own, ordered with libtorch's compute stream (the legacy default
//! stream) by events — the host never waits for a tensor collective.
//!
//! Each tensor collective records a "ready" event on the compute stream, makes the NCCL stream
//! wait for it, launches, and records a "done" event on the NCCL stream (a pair per collective,
//! from a pool, so the watchdog can tell when it became free to run). The compute stream then
//! waits for "done" straight away (every caller stays correct as written), except for the
//! `_async` variants the reducer uses during backward: their waits are issued together by
//! `wait_pending`, after backward, as DDP's finalize_backward does — a wait issued mid-backward
//! would queue the rest of backward behind the collective. A watchdog thread (`watchdog`)
//! bounds every collective by the timeout, counted from when it could run, and watches NCCL's
//! async errors.
//!
//! NCCL is bound by hand through `libloading` (`api`): cudarc looks for `libnccl.so` but the PyPI
//! wheel ships only `libnccl.so.2`, and it panics when the library is absent. Here the search
//! order is explicit and a miss is an error listing what was tried: `RINGTRAIN_NCCL_LIB`,
//! `libnccl.so.2`/`libnccl.so` on the library path, then the `nvidia/nccl/lib` folder of the wheel
//! beside the libtorch in use. The CUDA runtime is the libcudart libtorch already loaded.

mod api;
#[cfg(test)]
mod tests;
mod watchdog;

pub(crate) use api::cudart;
use api::*;

/// The bound functions and constants described in C, for the ABI check (`tests/nccl_abi.rs`).
#[doc(hidden)]
pub mod abi {
    pub use super::api::{bindings, constants, type_layouts, Binding};
}

use super::{CommError, Communicator, Op};
use crate::rendezvous::Store;
use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use watchdog::{Outstanding, Watched, POLL};

pub use api::UNIQUE_ID_BYTES;
const UNIQUE_ID_KEY: &str = "nccl/unique_id";

/// Rank 0 makes the unique id and publishes it in the store; the others wait for it.
pub fn exchange_unique_id(
    store: &dyn Store,
    rank: usize,
    make: impl FnOnce() -> Result<[u8; UNIQUE_ID_BYTES], CommError>,
    timeout: Duration,
) -> Result<[u8; UNIQUE_ID_BYTES], CommError> {
    if rank == 0 {
        let id = make()?;
        store.set(UNIQUE_ID_KEY, &id).map_err(|source| CommError::Store { rank, source })?;
        return Ok(id);
    }
    let got = store.get(UNIQUE_ID_KEY, timeout).map_err(|source| CommError::Store { rank, source })?;
    got.try_into()
        .map_err(|v: Vec<u8>| CommError::Setup { rank, detail: format!("NCCL unique id of {} bytes, expected {UNIQUE_ID_BYTES}", v.len()) })
}

/// Where a communicator's collectives run.
pub(crate) struct Placement {
    pub rank: usize,
    pub world: usize,
    /// The CUDA device every thread that touches CUDA for this communicator selects.
    pub device_index: usize,
    /// Where tensors must be: `cuda:device_index`; unit tests with fake functions use the CPU.
    pub tensor_device: Device,
    pub timeout: Duration,
}

pub struct NcclComm {
    watched: Arc<Watched>,
    watchdog: Option<JoinHandle<()>>,
    /// The communicator's own stream (non-blocking: no implicit sync with the default stream).
    stream: Stream,
    rank: usize,
    world: usize,
    device: Device,
    timeout: Duration,
    seq: u64,
}

// SAFETY: the raw handles may be used from any thread that selects the device, which every
// method does first; the shared state is behind Watched's mutex.
unsafe impl Send for NcclComm {}

impl NcclComm {
    pub fn new(store: &dyn Store, rank: usize, world: usize, device_index: usize, timeout: Duration) -> Result<NcclComm, CommError> {
        let api = api::api().map_err(|detail| CommError::NotAvailable { backend: "nccl", detail })?;
        let mut version = 0;
        // SAFETY: valid out-pointer.
        unsafe { (api.nccl.get_version)(&mut version) };
        tracing::info!("NCCL {version} on cuda:{device_index}");
        let id = exchange_unique_id(
            store,
            rank,
            || {
                let mut id = UniqueId([0; UNIQUE_ID_BYTES]);
                // SAFETY: valid out-pointer.
                match unsafe { (api.nccl.get_unique_id)(&mut id) } {
                    NCCL_SUCCESS => Ok(id.0),
                    code => {
                        Err(CommError::Nccl { rank, op: Op::Setup, seq: 0, detail: format!("ncclGetUniqueId: {}", api.nccl_error(code)) })
                    }
                }
            },
            timeout,
        )?;
        let placement = Placement { rank, world, device_index, tensor_device: Device::Cuda(device_index), timeout };
        NcclComm::with_api(api, UniqueId(id), placement)
    }

    /// Joins the communicator through `api` (the loaded libraries, or fakes in unit tests).
    pub(crate) fn with_api(api: &'static Api, id: UniqueId, at: Placement) -> Result<NcclComm, CommError> {
        let rank = at.rank;
        let setup = |detail: String| CommError::Nccl { rank, op: Op::Setup, seq: 0, detail };
        let device = at.device_index as c_int;
        // SAFETY: plain C call.
        let code = unsafe { (api.cuda.set_device)(device) };
        if code != CUDA_SUCCESS {
            return Err(setup(format!("cudaSetDevice({device}): {}", api.cuda_error(code))));
        }
        let comm = init_rank(api, id, &at)?;
        // From here on a failure must not leak the communicator.
        let mut stream = Stream(std::ptr::null_mut());
        // SAFETY: valid out-pointer.
        let code = unsafe { (api.cuda.stream_create)(&mut stream, CUDA_STREAM_NON_BLOCKING) };
        if code != CUDA_SUCCESS {
            // SAFETY: initialised above, never used.
            unsafe { (api.nccl.comm_destroy)(comm) };
            return Err(setup(format!("cudaStreamCreateWithFlags: {}", api.cuda_error(code))));
        }
        let watched = Arc::new(Watched::new(api, comm, rank, device, at.timeout));
        let mut me = NcclComm {
            watched: watched.clone(),
            watchdog: None,
            stream,
            rank,
            world: at.world,
            device: at.tensor_device,
            timeout: at.timeout,
            seq: 0,
        };
        // On failure `me` drops: destroys the communicator and the stream.
        me.watchdog = Some(watched.spawn().map_err(|e| setup(format!("starting the watchdog thread: {e}")))?);
        Ok(me)
    }

    /// Makes the calling thread's CUDA calls go to this communicator's device. CUDA's current
    /// device is per thread, and the reducer's communication thread is not the one that made
    /// the communicator; the call is cheap.
    fn select_device(&self, op: Op, seq: u64) -> Result<(), CommError> {
        let api = self.watched.api;
        // SAFETY: plain C call.
        match unsafe { (api.cuda.set_device)(self.watched.device) } {
            CUDA_SUCCESS => Ok(()),
            code => Err(self.error(op, seq, format!("cudaSetDevice({}): {}", self.watched.device, api.cuda_error(code)))),
        }
    }

    fn error(&self, op: Op, seq: u64, detail: String) -> CommError {
        CommError::Nccl { rank: self.rank, op, seq, detail }
    }

    /// Launches one collective on the NCCL stream, ordered after the work already queued on the
    /// compute stream; unless `deferred`, the compute stream then waits for it. The host does
    /// not wait. Returns the collective's sequence number.
    fn launch(&mut self, op: Op, deferred: bool, call: impl FnOnce(&NcclFns, CommHandle, Stream) -> NcclResult) -> Result<u64, CommError> {
        let w = self.watched.clone();
        let launched = {
            // From the failure check until NCCL has returned: an abort waits for it (see watchdog).
            let _enqueue = w.enqueue_lock();
            let launched = self.enqueue(&w, op, deferred, call);
            w.lock().enqueuing = None;
            launched
        };
        if launched.is_err() && w.lock().failed() {
            // Recorded by this launch or meanwhile: abort now that the enqueue lock is free.
            w.abort();
        }
        launched
    }

    /// `launch`'s body, under the enqueue lock.
    fn enqueue(
        &mut self,
        w: &Watched,
        op: Op,
        deferred: bool,
        call: impl FnOnce(&NcclFns, CommHandle, Stream) -> NcclResult,
    ) -> Result<u64, CommError> {
        if let Some(e) = w.error(&w.lock()) {
            return Err(e);
        }
        self.seq += 1;
        let seq = self.seq;
        w.lock().enqueuing = Some((op, seq));
        self.select_device(op, seq)?;
        let api = w.api;
        let cuda = |what: &str, code: CudaError| match code {
            CUDA_SUCCESS => Ok(()),
            code => Err(format!("{what}: {}", api.cuda_error(code))),
        };
        let recycle = |events: [Event; 2]| w.lock().pool.extend(events);
        // Both events before the call: once NCCL has the collective, nothing but recording its
        // done event may stand between the call and the watchdog tracking it.
        let ready = w.take_event().map_err(|code| self.error(op, seq, format!("cudaEventCreateWithFlags: {}", api.cuda_error(code))))?;
        let done = w.take_event().map_err(|code| {
            w.lock().pool.push(ready);
            self.error(op, seq, format!("cudaEventCreateWithFlags: {}", api.cuda_error(code)))
        })?;
        // SAFETY: valid stream and events; the call's buffers are the caller's to vouch for.
        unsafe {
            let ordered = cuda("cudaEventRecord(compute stream)", (api.cuda.event_record)(ready, Stream::LEGACY))
                .and_then(|()| cuda("cudaStreamWaitEvent(NCCL stream)", (api.cuda.stream_wait_event)(self.stream, ready, 0)));
            if let Err(detail) = ordered {
                recycle([ready, done]);
                return Err(self.error(op, seq, detail));
            }
            let code = call(&api.nccl, w.comm, self.stream);
            if code != NCCL_SUCCESS && code != NCCL_IN_PROGRESS {
                recycle([ready, done]);
                return Err(self.error(op, seq, api.nccl_error(code)));
            }
            // NCCL has the collective. Unless the compute stream is ordered after it, the caller
            // may free or reuse memory NCCL still reads and writes: any failure from here on
            // aborts the communicator, which ends the collective.
            if let Err(detail) = cuda("cudaEventRecord(NCCL stream)", (api.cuda.event_record)(done, self.stream)) {
                recycle([ready, done]);
                return Err(self.unordered(w, op, seq, detail));
            }
            {
                let mut st = w.lock();
                st.outstanding.push_back(Outstanding { ready, done, op, seq, started: None, deferred });
                st.last = Some((op, seq));
            }
            if !deferred {
                if let Err(detail) = cuda("cudaStreamWaitEvent(compute stream)", (api.cuda.stream_wait_event)(Stream::LEGACY, done, 0)) {
                    return Err(self.unordered(w, op, seq, detail));
                }
            }
        }
        Ok(seq)
    }

    /// Records that collective `seq` was launched but cannot be ordered before the compute
    /// stream's next work; the caller aborts. Returns the error later calls return too.
    fn unordered(&self, w: &Watched, op: Op, seq: u64, detail: String) -> CommError {
        let mut st = w.lock();
        w.record(
            &mut st,
            op,
            seq,
            format!("{detail}, after it was launched: the compute stream cannot wait for it (communicator aborted)"),
        );
        w.error(&st).expect("just recorded")
    }

    fn nccl_type(&self, t: &Tensor, op: Op) -> Result<NcclDataType, CommError> {
        Ok(match t.kind() {
            Kind::Float => NCCL_FLOAT32,
            Kind::BFloat16 => NCCL_BFLOAT16,
            Kind::Half => NCCL_FLOAT16,
            Kind::Double => NCCL_FLOAT64,
            Kind::Uint8 => NCCL_UINT8,
            k => return Err(CommError::BadArgument { op, detail: format!("dtype {k:?} not supported by the NCCL backend") }),
        })
    }

    fn check_tensor(&self, t: &Tensor, op: Op) -> Result<(), CommError> {
        if t.device() != self.device || !t.is_contiguous() {
            return Err(CommError::BadArgument {
                op,
                detail: format!("NCCL needs a contiguous tensor on {:?}, got {:?}", self.device, t.device()),
            });
        }
        Ok(())
    }

    /// The tensor's start, this rank's block within it (NCCL's in-place layout: block r at
    /// r × numel / world) and the block's length, for a numel the world size divides.
    fn own_block(&self, t: &Tensor) -> (*mut c_void, *mut c_void, usize) {
        let block = t.numel() / self.world;
        let base = t.data_ptr();
        // The offset stays inside the tensor: rank < world and block × world = numel.
        let mine = (base as *mut u8).wrapping_add(self.rank * block * t.kind().elt_size_in_bytes()) as *mut c_void;
        (base, mine, block)
    }

    fn to_device(&self, t: &Tensor) -> Tensor {
        t.to_device(self.device).contiguous()
    }

    fn all_reduce(&mut self, t: &mut Tensor, deferred: bool) -> Result<(), CommError> {
        self.check_tensor(t, Op::AllReduce)?;
        let dtype = self.nccl_type(t, Op::AllReduce)?;
        let (ptr, n) = (t.data_ptr(), t.numel());
        // SAFETY: in-place all-reduce over the tensor's memory.
        self.launch(Op::AllReduce, deferred, |f, comm, s| unsafe { (f.all_reduce)(ptr, ptr, n, dtype, NCCL_SUM, comm, s) })?;
        Ok(())
    }

    /// In place: rank r's block of `numel / world` elements is at offset r × that (NCCL's
    /// in-place convention). A length the world size does not divide takes the all-reduce.
    fn reduce_scatter(&mut self, t: &mut Tensor, deferred: bool) -> Result<(), CommError> {
        self.check_tensor(t, Op::ReduceScatter)?;
        if t.numel() % self.world != 0 {
            return self.all_reduce(t, deferred);
        }
        let dtype = self.nccl_type(t, Op::ReduceScatter)?;
        let (base, mine, block) = self.own_block(t);
        // SAFETY: in-place reduce-scatter: the receive block lies inside the send buffer at this
        // rank's offset, as NCCL requires.
        self.launch(Op::ReduceScatter, deferred, |f, comm, s| unsafe { (f.reduce_scatter)(base, mine, block, dtype, NCCL_SUM, comm, s) })?;
        Ok(())
    }

    /// ncclAllGather of equal-sized byte strings.
    fn gather_fixed(&mut self, mine: &[u8]) -> Result<Vec<u8>, CommError> {
        let n = mine.len();
        let send = self.to_device(&Tensor::from_slice(if n == 0 { &[0u8][..] } else { mine }));
        let recv = Tensor::zeros([(n.max(1) * self.world) as i64], (Kind::Uint8, self.device));
        let (sp, rp) = (send.data_ptr(), recv.data_ptr());
        // SAFETY: send holds n.max(1) bytes, recv world times that.
        let seq = self.launch(Op::AllGather, false, |f, comm, s| unsafe { (f.all_gather)(sp, rp, n.max(1), NCCL_UINT8, comm, s) })?;
        self.watched.wait_host(seq)?;
        let host = Vec::<u8>::try_from(&recv.to_device(Device::Cpu))
            .map_err(|e| CommError::BadArgument { op: Op::AllGather, detail: e.to_string() })?;
        Ok(if n == 0 { vec![] } else { host })
    }
}

/// ncclCommInitRank, which blocks until every rank has called it: a guard thread bounds that
/// wait (NCCL's blocking init cannot be interrupted) by ending the process with the reason.
fn init_rank(api: &Api, id: UniqueId, at: &Placement) -> Result<CommHandle, CommError> {
    let (rank, timeout) = (at.rank, at.timeout);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watched = done.clone();
    std::thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if watched.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "ringtrain: error: rank {rank}: NCCL communicator setup did not complete within {:.0}s: not every rank joined",
            timeout.as_secs_f64()
        );
        // SAFETY: ends the process; nothing to unwind to that could repair a hung init.
        unsafe { libc::_exit(1) };
    });
    let mut comm = CommHandle(std::ptr::null_mut());
    // SAFETY: valid out-pointer and unique id.
    let code = unsafe { (api.nccl.comm_init_rank)(&mut comm, at.world as c_int, id, rank as c_int) };
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    if code != NCCL_SUCCESS {
        return Err(CommError::Nccl { rank, op: Op::Setup, seq: 0, detail: format!("ncclCommInitRank: {}", api.nccl_error(code)) });
    }
    Ok(comm)
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let w = self.watched.clone();
        let api = w.api;
        // ncclCommDestroy waits, with no bound, for every collective still queued, and a peer
        // that never arrives would hang it: let them finish first, still watched, within the
        // timeout, and abort whatever is left.
        let deadline = Instant::now() + self.timeout;
        loop {
            let st = w.lock();
            if st.failed() || st.outstanding.is_empty() || Instant::now() >= deadline {
                break;
            }
            drop(st);
            std::thread::sleep(POLL);
        }
        w.stop();
        if let Some(h) = self.watchdog.take() {
            let _ = h.join();
        }
        // SAFETY: plain C call; this thread's CUDA calls below go to the communicator's device.
        unsafe { (api.cuda.set_device)(w.device) };
        let failed = {
            let mut st = w.lock();
            w.poll(&mut st);
            if let Some(o) = st.outstanding.front() {
                let (op, seq) = (o.op, o.seq);
                let detail = format!("still unfinished {:?} after the communicator was dropped (communicator aborted)", self.timeout);
                w.record(&mut st, op, seq, detail);
            }
            st.failed()
        };
        if failed {
            // Once; an aborted communicator is freed, so it is never destroyed as well.
            w.abort();
        } else {
            // SAFETY: valid communicator with nothing queued, used by no other thread now.
            unsafe { (api.nccl.comm_destroy)(w.comm) };
        }
        let mut st = w.lock();
        // SAFETY: the handles are valid and, with the communicator gone, used by nothing.
        unsafe {
            for o in st.outstanding.drain(..) {
                (api.cuda.event_destroy)(o.ready);
                (api.cuda.event_destroy)(o.done);
            }
            for e in st.pool.drain(..) {
                (api.cuda.event_destroy)(e);
            }
            (api.cuda.stream_destroy)(self.stream);
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend_name(&self) -> &'static str {
        "nccl"
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn device_native(&self) -> bool {
        true
    }
    /// Every call selects the device first, so any thread may issue collectives.
    fn supports_overlap(&self) -> bool {
        true
    }

    fn all_reduce_tensor(&mut self, t: &mut Tensor) -> Result<(), CommError> {
        self.all_reduce(t, false)
    }

    fn all_reduce_tensor_async(&mut self, t: &mut Tensor) -> Result<(), CommError> {
        self.all_reduce(t, true)
    }

    fn reduce_scatter_tensor(&mut self, t: &mut Tensor) -> Result<(), CommError> {
        self.reduce_scatter(t, false)
    }

    fn reduce_scatter_tensor_async(&mut self, t: &mut Tensor) -> Result<(), CommError> {
        self.reduce_scatter(t, true)
    }

    /// The compute stream waits for every deferred collective; the host does not. The waits are
    /// issued even after a failure: the compute stream must not run on into buckets a collective
    /// may still be writing (an aborted one ends, and its done event with it).
    fn wait_pending(&mut self) -> Result<(), CommError> {
        let w = self.watched.clone();
        let selected = self.select_device(Op::AllReduce, self.seq);
        let failed = {
            let mut st = w.lock();
            let mut unordered = None;
            for o in st.outstanding.iter_mut().filter(|o| o.deferred) {
                let waited = match &selected {
                    Err(e) => Err(e.to_string()),
                    // SAFETY: valid events (outstanding ones are not recycled).
                    Ok(()) => match unsafe { (w.api.cuda.stream_wait_event)(Stream::LEGACY, o.done, 0) } {
                        CUDA_SUCCESS => Ok(()),
                        code => Err(format!("cudaStreamWaitEvent(compute stream): {}", w.api.cuda_error(code))),
                    },
                };
                match waited {
                    Ok(()) => o.deferred = false,
                    Err(detail) => _ = unordered.get_or_insert((o.op, o.seq, detail)),
                }
            }
            if let Some((op, seq, detail)) = unordered {
                // As in `launch`: a collective the compute stream cannot wait for is aborted.
                w.record(&mut st, op, seq, format!("{detail}: the compute stream cannot wait for it (communicator aborted)"));
            }
            st.failed()
        };
        if failed {
            w.abort();
            return Err(w.error(&w.lock()).expect("recorded"));
        }
        selected
    }

    fn broadcast_tensor(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
        self.check_tensor(t, Op::Broadcast)?;
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        let ptr = t.data_ptr();
        // SAFETY: in-place broadcast of the tensor's bytes.
        self.launch(Op::Broadcast, false, |f, comm, s| unsafe { (f.broadcast)(ptr, ptr, bytes, NCCL_UINT8, root as c_int, comm, s) })?;
        Ok(())
    }

    fn all_gather_shards_tensor(&mut self, t: &mut Tensor) -> Result<(), CommError> {
        self.check_tensor(t, Op::AllGatherShards)?;
        if t.numel() % self.world != 0 {
            let (a, b) = super::shard_bounds(t.numel(), self.world, self.rank);
            let flat = t.view([-1]);
            let _ = flat.narrow(0, 0, a as i64).zero_();
            let _ = flat.narrow(0, b as i64, (t.numel() - b) as i64).zero_();
            return self.all_reduce(t, false);
        }
        let dtype = self.nccl_type(t, Op::AllGatherShards)?;
        let (base, mine, block) = self.own_block(t);
        // SAFETY: in-place all-gather: this rank's block is the send buffer, at its offset.
        self.launch(Op::AllGatherShards, false, |f, comm, s| unsafe { (f.all_gather)(mine, base, block, dtype, comm, s) })?;
        Ok(())
    }

    // The host-memory collectives block the host (the caller reads the result), through the
    // watchdog's bounded wait.

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        let mut t = self.to_device(&Tensor::from_slice(buf));
        self.all_reduce(&mut t, false)?;
        self.watched.wait_host(self.seq)?;
        t.to_device(Device::Cpu).copy_data(buf, buf.len());
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        let mut t = self.to_device(&Tensor::from_slice(buf));
        self.broadcast_tensor(&mut t, root)?;
        self.watched.wait_host(self.seq)?;
        t.to_device(Device::Cpu).copy_data(buf, buf.len());
        Ok(())
    }

    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        // Lengths first, then every blob padded to the longest.
        let lens = self.gather_fixed(&(mine.len() as u64).to_le_bytes())?;
        let lens: Vec<usize> =
            lens.chunks_exact(8).map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as usize).collect();
        let longest = lens.iter().copied().max().unwrap_or(0);
        let mut padded = mine.to_vec();
        padded.resize(longest, 0);
        let all = self.gather_fixed(&padded)?;
        Ok(lens.iter().enumerate().map(|(r, &n)| all[r * longest..r * longest + n].to_vec()).collect())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.all_reduce_sum(&mut [0.0])
    }
}
