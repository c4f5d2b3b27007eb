//! NcclComm against fake NCCL and CUDA functions (no GPU): the watchdog's abort-once, no destroy
//! after an abort, no abort while another thread is inside NCCL, async errors, timeouts counted
//! from when a collective can run, the compute stream ordered after every launched collective
//! whatever fails, the device selected on every thread that touches CUDA, no leak when setup
//! fails half-way. The fakes never touch memory, so CPU tensors stand in for CUDA ones.

use super::*;
use crate::ddp::{Ddp, DdpOptions};
use crate::rendezvous::{MemoryStore, TcpStore, TcpStoreServer};
use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::{c_char, c_uint};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};

/// Not 0: a thread that forgot to select it would be on device 0.
const DEVICE: c_int = 3;

static SERIAL: Mutex<()> = Mutex::new(());
/// Collectives never finish (their inputs are ready: the peer is missing).
static HANG: AtomicBool = AtomicBool::new(false);
/// The compute stream is busy: nothing recorded on either stream completes.
static COMPUTE_BUSY: AtomicBool = AtomicBool::new(false);
static ASYNC_ERROR: AtomicI32 = AtomicI32::new(0);
static FAIL_STREAM: AtomicBool = AtomicBool::new(false);
static FAIL_EVENT_CREATE: AtomicBool = AtomicBool::new(false);
/// cudaEventRecord fails on the NCCL stream (the done event).
static FAIL_DONE_RECORD: AtomicBool = AtomicBool::new(false);
/// ncclAllReduce call number n (from 1) fails; 0: none.
static FAIL_ALL_REDUCE_AT: AtomicUsize = AtomicUsize::new(0);
/// Launch number n (from 1) stays inside NCCL for STALL_MS (u64::MAX: for ever); 0: none.
static STALL_AT: AtomicUsize = AtomicUsize::new(0);
static STALL_MS: AtomicU64 = AtomicU64::new(0);
static ALL_REDUCES: AtomicUsize = AtomicUsize::new(0);
/// Threads inside a fake collective call right now.
static IN_NCCL: AtomicUsize = AtomicUsize::new(0);
/// NCCL calls on the communicator made while another was in progress or after it was aborted
/// (freed) or destroyed with work it would have waited for for ever.
static MISUSE: Mutex<Vec<String>> = Mutex::new(Vec::new());
static ABORTS: AtomicUsize = AtomicUsize::new(0);
static DESTROYS: AtomicUsize = AtomicUsize::new(0);
static LAUNCHES: AtomicUsize = AtomicUsize::new(0);
/// cudaStreamWaitEvent calls on the compute stream.
static COMPUTE_WAITS: AtomicUsize = AtomicUsize::new(0);
static EVENTS_CREATED: AtomicUsize = AtomicUsize::new(0);
static EVENTS_LIVE: AtomicI32 = AtomicI32::new(0);
/// Events last recorded on the compute stream (ready events); the others are done events.
static ON_COMPUTE: Mutex<Option<HashSet<usize>>> = Mutex::new(None);
/// CUDA calls made from a thread whose current device was not DEVICE.
static WRONG_DEVICE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The list, whatever a failed test left it in.
fn wrong_device() -> MutexGuard<'static, Vec<String>> {
    WRONG_DEVICE.lock().unwrap_or_else(|e| e.into_inner())
}

fn misuse() -> MutexGuard<'static, Vec<String>> {
    MISUSE.lock().unwrap_or_else(|e| e.into_inner())
}

fn on_compute() -> MutexGuard<'static, Option<HashSet<usize>>> {
    ON_COMPUTE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A call on the communicator: none may come after its abort.
fn nccl_call(what: &str) {
    if ABORTS.load(SeqCst) > 0 {
        misuse().push(format!("{what} after ncclCommAbort"));
    }
}

thread_local! {
    /// The fake runtime's current device, per thread as CUDA's is.
    static CURRENT: Cell<Option<c_int>> = const { Cell::new(None) };
}

fn on_device(what: &str) {
    let d = CURRENT.get();
    if d != Some(DEVICE) {
        let t = std::thread::current();
        wrong_device().push(format!("{what} on thread {:?} ({:?}) with device {d:?}", t.name(), t.id()));
    }
}

unsafe extern "C" fn set_device(d: c_int) -> CudaError {
    CURRENT.set(Some(d));
    CUDA_SUCCESS
}
unsafe extern "C" fn get_device_count(n: *mut c_int) -> CudaError {
    *n = 1;
    CUDA_SUCCESS
}
unsafe extern "C" fn cuda_error_string(_: CudaError) -> *const c_char {
    c"fake CUDA error".as_ptr()
}
unsafe extern "C" fn stream_create(s: *mut Stream, _: c_uint) -> CudaError {
    on_device("cudaStreamCreateWithFlags");
    if FAIL_STREAM.load(SeqCst) {
        return CudaError(2);
    }
    *s = Stream(0x5 as *mut c_void);
    CUDA_SUCCESS
}
unsafe extern "C" fn stream_destroy(_: Stream) -> CudaError {
    CUDA_SUCCESS
}
unsafe extern "C" fn stream_wait_event(s: Stream, _: Event, _: c_uint) -> CudaError {
    on_device("cudaStreamWaitEvent");
    if s == Stream::LEGACY {
        COMPUTE_WAITS.fetch_add(1, SeqCst);
    }
    CUDA_SUCCESS
}
unsafe extern "C" fn event_create(e: *mut Event, _: c_uint) -> CudaError {
    on_device("cudaEventCreateWithFlags");
    if FAIL_EVENT_CREATE.load(SeqCst) {
        return CudaError(2);
    }
    let n = EVENTS_CREATED.fetch_add(1, SeqCst) + 1;
    EVENTS_LIVE.fetch_add(1, SeqCst);
    *e = Event((0x1000 + n) as *mut c_void);
    CUDA_SUCCESS
}
unsafe extern "C" fn event_record(e: Event, s: Stream) -> CudaError {
    on_device("cudaEventRecord");
    if s != Stream::LEGACY && FAIL_DONE_RECORD.load(SeqCst) {
        return CudaError(2);
    }
    let mut ready = on_compute();
    let ready = ready.get_or_insert_with(HashSet::new);
    if s == Stream::LEGACY {
        ready.insert(e.0 as usize);
    } else {
        ready.remove(&(e.0 as usize));
    }
    CUDA_SUCCESS
}
unsafe extern "C" fn event_query(e: Event) -> CudaError {
    on_device("cudaEventQuery");
    let ready = on_compute().as_ref().is_some_and(|r| r.contains(&(e.0 as usize)));
    if COMPUTE_BUSY.load(SeqCst) || (HANG.load(SeqCst) && !ready) {
        CUDA_ERROR_NOT_READY
    } else {
        CUDA_SUCCESS
    }
}
unsafe extern "C" fn event_destroy(_: Event) -> CudaError {
    EVENTS_LIVE.fetch_sub(1, SeqCst);
    CUDA_SUCCESS
}

unsafe extern "C" fn get_version(v: *mut c_int) -> NcclResult {
    *v = 22809;
    NCCL_SUCCESS
}
unsafe extern "C" fn get_unique_id(_: *mut UniqueId) -> NcclResult {
    NCCL_SUCCESS
}
unsafe extern "C" fn comm_init_rank(c: *mut CommHandle, _: c_int, _: UniqueId, _: c_int) -> NcclResult {
    *c = CommHandle(0xc0 as *mut c_void);
    NCCL_SUCCESS
}
fn launched(what: &str) -> NcclResult {
    on_device(what);
    nccl_call(what);
    if IN_NCCL.fetch_add(1, SeqCst) > 0 {
        misuse().push(format!("{what} while another thread was inside NCCL"));
    }
    let n = LAUNCHES.fetch_add(1, SeqCst) + 1;
    if STALL_AT.load(SeqCst) == n {
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(STALL_MS.load(SeqCst)) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    IN_NCCL.fetch_sub(1, SeqCst);
    NCCL_SUCCESS
}
unsafe extern "C" fn all_reduce(
    _: *const c_void,
    _: *mut c_void,
    _: usize,
    _: NcclDataType,
    _: NcclRedOp,
    _: CommHandle,
    _: Stream,
) -> NcclResult {
    if ALL_REDUCES.fetch_add(1, SeqCst) + 1 == FAIL_ALL_REDUCE_AT.load(SeqCst) {
        return NcclResult(3); // ncclInternalError
    }
    launched("ncclAllReduce")
}
unsafe extern "C" fn broadcast(
    _: *const c_void,
    _: *mut c_void,
    _: usize,
    _: NcclDataType,
    _: c_int,
    _: CommHandle,
    _: Stream,
) -> NcclResult {
    launched("ncclBroadcast")
}
unsafe extern "C" fn all_gather(_: *const c_void, _: *mut c_void, _: usize, _: NcclDataType, _: CommHandle, _: Stream) -> NcclResult {
    launched("ncclAllGather")
}
unsafe extern "C" fn reduce_scatter(
    _: *const c_void,
    _: *mut c_void,
    _: usize,
    _: NcclDataType,
    _: NcclRedOp,
    _: CommHandle,
    _: Stream,
) -> NcclResult {
    launched("ncclReduceScatter")
}
unsafe extern "C" fn get_async_error(_: CommHandle, e: *mut NcclResult) -> NcclResult {
    nccl_call("ncclCommGetAsyncError");
    *e = NcclResult(ASYNC_ERROR.load(SeqCst));
    NCCL_SUCCESS
}
unsafe extern "C" fn comm_abort(_: CommHandle) -> NcclResult {
    if IN_NCCL.load(SeqCst) > 0 {
        misuse().push("ncclCommAbort while another thread was inside NCCL".into());
    }
    ABORTS.fetch_add(1, SeqCst);
    NCCL_SUCCESS
}
unsafe extern "C" fn comm_destroy(_: CommHandle) -> NcclResult {
    nccl_call("ncclCommDestroy");
    if HANG.load(SeqCst) || COMPUTE_BUSY.load(SeqCst) {
        misuse().push("ncclCommDestroy with a collective that never finishes (it would wait for ever)".into());
    }
    DESTROYS.fetch_add(1, SeqCst);
    NCCL_SUCCESS
}
unsafe extern "C" fn nccl_error_string(_: NcclResult) -> *const c_char {
    c"fake NCCL error".as_ptr()
}

static FAKE: Api = Api {
    nccl: NcclFns {
        get_version,
        get_unique_id,
        comm_init_rank,
        all_reduce,
        broadcast,
        all_gather,
        reduce_scatter,
        get_async_error,
        comm_abort,
        comm_destroy,
        get_error_string: nccl_error_string,
    },
    cuda: CudartFns {
        set_device,
        get_device_count,
        get_error_string: cuda_error_string,
        stream_create,
        stream_destroy,
        stream_wait_event,
        event_create,
        event_record,
        event_query,
        event_destroy,
    },
};

/// The fakes' state is global: one test at a time, each from a clean slate.
fn fresh() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for f in [&HANG, &COMPUTE_BUSY, &FAIL_STREAM, &FAIL_EVENT_CREATE, &FAIL_DONE_RECORD] {
        f.store(false, SeqCst);
    }
    ASYNC_ERROR.store(0, SeqCst);
    STALL_MS.store(0, SeqCst);
    for c in [&ABORTS, &DESTROYS, &LAUNCHES, &ALL_REDUCES, &COMPUTE_WAITS, &EVENTS_CREATED, &FAIL_ALL_REDUCE_AT, &STALL_AT, &IN_NCCL] {
        c.store(0, SeqCst);
    }
    EVENTS_LIVE.store(0, SeqCst);
    wrong_device().clear();
    misuse().clear();
    *on_compute() = None;
    guard
}

/// What every test ends with: no NCCL call on a freed, busy or forever-waiting communicator.
fn assert_no_misuse() {
    let m = misuse();
    assert!(m.is_empty(), "the communicator was misused:\n{}", m.join("\n"));
}

fn comm(timeout: Duration) -> Result<NcclComm, CommError> {
    let at = Placement { rank: 0, world: 2, device_index: DEVICE as usize, tensor_device: Device::Cpu, timeout };
    NcclComm::with_api(&FAKE, UniqueId([0; UNIQUE_ID_BYTES]), at)
}

fn bucket() -> Tensor {
    Tensor::zeros([8], (Kind::Float, Device::Cpu))
}

/// Waits up to 5 s for `cond`; returns how long it took.
fn within_5s(cond: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < Duration::from_secs(5), "condition not met within 5 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    started.elapsed()
}

/// Defect 2: a collective that never finishes is aborted once, its error names it, and the
/// aborted communicator is not destroyed.
#[test]
fn hung_collective_aborts_once_and_is_never_destroyed() {
    let _g = fresh();
    HANG.store(true, SeqCst);
    let mut c = comm(Duration::from_millis(200)).unwrap();
    let started = Instant::now();
    c.all_reduce_tensor_async(&mut bucket()).unwrap();
    assert!(started.elapsed() < Duration::from_millis(100), "the host waited for a tensor collective");
    let took = within_5s(|| ABORTS.load(SeqCst) > 0);
    assert!(took >= Duration::from_millis(150), "aborted after {took:?}, before the 200 ms timeout");
    std::thread::sleep(Duration::from_millis(50));
    let err = c.wait_pending().unwrap_err().to_string();
    assert!(err.contains("NCCL all_reduce #1") && err.contains("did not complete within"), "{err}");
    // The next call of any kind returns the same error, without touching the communicator.
    let launches = LAUNCHES.load(SeqCst);
    let err = c.broadcast_tensor(&mut bucket(), 0).unwrap_err().to_string();
    assert!(err.contains("NCCL all_reduce #1"), "{err}");
    assert_eq!(LAUNCHES.load(SeqCst), launches);
    drop(c);
    assert_eq!(ABORTS.load(SeqCst), 1, "aborted once");
    assert_eq!(DESTROYS.load(SeqCst), 0, "an aborted communicator must not be destroyed");
    assert_eq!(EVENTS_LIVE.load(SeqCst), 0, "events leaked");
    assert_no_misuse();
}

/// Host-memory collectives block the host, but only up to the timeout, with the same abort.
#[test]
fn blocking_host_collective_is_bounded_by_the_timeout() {
    let _g = fresh();
    HANG.store(true, SeqCst);
    let mut c = comm(Duration::from_millis(200)).unwrap();
    let started = Instant::now();
    let err = c.all_reduce_sum(&mut [1.0, 2.0]).unwrap_err().to_string();
    let took = started.elapsed();
    assert!(err.contains("NCCL all_reduce #1") && err.contains("did not complete within 200ms"), "{err}");
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(3), "{took:?}");
    drop(c);
    assert_eq!((ABORTS.load(SeqCst), DESTROYS.load(SeqCst)), (1, 0));
    assert_no_misuse();
}

/// The host's wait is bounded too when the collective never becomes free to run (the work
/// ahead of it on the compute stream never finishes), which no collective timeout would catch.
#[test]
fn blocking_host_collective_is_bounded_when_its_inputs_never_become_ready() {
    let _g = fresh();
    COMPUTE_BUSY.store(true, SeqCst);
    let mut c = comm(Duration::from_millis(200)).unwrap();
    let started = Instant::now();
    let err = c.all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
    let took = started.elapsed();
    assert!(err.contains("NCCL all_reduce #1") && err.contains("was not free to run within 200ms"), "{err}");
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(3), "{took:?}");
    drop(c);
    assert_eq!((ABORTS.load(SeqCst), DESTROYS.load(SeqCst)), (1, 0));
    assert_no_misuse();
}

/// A healthy communicator: destroyed exactly once, and its events are reused, not leaked.
#[test]
fn healthy_comm_is_destroyed_once_and_recycles_events() {
    let _g = fresh();
    let mut c = comm(Duration::from_secs(10)).unwrap();
    for _ in 0..50 {
        c.all_reduce_sum(&mut [1.0]).unwrap();
    }
    for _ in 0..5 {
        c.all_reduce_tensor_async(&mut bucket()).unwrap();
        c.reduce_scatter_tensor_async(&mut bucket()).unwrap();
        c.wait_pending().unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(c.all_gather(b"abc").unwrap().len(), 2);
    assert!(EVENTS_CREATED.load(SeqCst) <= 4, "{} events created for 62 collectives", EVENTS_CREATED.load(SeqCst));
    drop(c);
    assert_eq!((ABORTS.load(SeqCst), DESTROYS.load(SeqCst)), (0, 1));
    assert_eq!(EVENTS_LIVE.load(SeqCst), 0, "events leaked");
    assert_no_misuse();
}

/// Defect 4: collectives issued from a thread other than the one that built the communicator
/// (the reducer's ddp-comm thread) and the watchdog select the device before any CUDA call.
#[test]
fn every_thread_selects_the_device_before_cuda_calls() {
    let _g = fresh();
    // The check itself can fail: a fresh thread that records an event without selecting.
    std::thread::spawn(|| unsafe { event_record(Event(std::ptr::null_mut()), Stream::LEGACY) }).join().unwrap();
    assert_eq!(wrong_device().len(), 1);
    wrong_device().clear();

    let mut c = comm(Duration::from_secs(10)).unwrap();
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("ddp-comm".into())
            .spawn_scoped(s, || {
                c.all_reduce_tensor_async(&mut bucket()).unwrap();
                c.reduce_scatter_tensor_async(&mut bucket()).unwrap();
                c.wait_pending().unwrap();
            })
            .unwrap();
    });
    c.all_reduce_sum(&mut [1.0]).unwrap();
    std::thread::sleep(Duration::from_millis(20)); // the watchdog polls meanwhile
    drop(c);
    assert_eq!(LAUNCHES.load(SeqCst), 3);
    let wrong = wrong_device();
    assert!(wrong.is_empty(), "CUDA calls without the device selected:\n{}", wrong.join("\n"));
}

/// An error NCCL reports asynchronously (a peer failed) aborts the communicator and is returned
/// by the next call, naming the collective in flight.
#[test]
fn async_error_is_reported_and_aborts() {
    let _g = fresh();
    HANG.store(true, SeqCst);
    let mut c = comm(Duration::from_secs(60)).unwrap();
    c.all_reduce_tensor_async(&mut bucket()).unwrap();
    c.reduce_scatter_tensor_async(&mut bucket()).unwrap();
    ASYNC_ERROR.store(6, SeqCst); // ncclRemoteError
    let took = within_5s(|| ABORTS.load(SeqCst) > 0);
    assert!(took < Duration::from_secs(1), "{took:?}");
    let err = c.wait_pending().unwrap_err().to_string();
    assert!(err.contains("NCCL all_reduce #1") && err.contains("NCCL error 6") && err.contains("asynchronous"), "{err}");
    drop(c);
    assert_eq!((ABORTS.load(SeqCst), DESTROYS.load(SeqCst)), (1, 0));
    assert_no_misuse();
}

/// Defect 8: a failure after ncclCommInitRank destroys the communicator instead of leaking it.
#[test]
fn setup_failure_after_init_destroys_the_communicator() {
    let _g = fresh();
    FAIL_STREAM.store(true, SeqCst);
    let err = comm(Duration::from_secs(10)).err().expect("stream creation fails").to_string();
    assert!(err.contains("cudaStreamCreateWithFlags") && err.contains("fake CUDA error"), "{err}");
    assert_eq!((DESTROYS.load(SeqCst), ABORTS.load(SeqCst)), (1, 0));
}

/// The watchdog never aborts (frees) the communicator while another thread is inside NCCL
/// enqueuing on it: it records the failure, so no new collective starts, and aborts once the
/// enqueue has returned.
#[test]
fn abort_waits_for_a_collective_being_enqueued() {
    let _g = fresh();
    HANG.store(true, SeqCst);
    let timeout = Duration::from_millis(600);
    let mut c = comm(timeout).unwrap();
    c.all_reduce_tensor_async(&mut bucket()).unwrap();
    // #2 stays inside ncclAllReduce past #1's timeout (600 ms), but less than the abort's wait
    // for it (another 600 ms).
    STALL_AT.store(2, SeqCst);
    STALL_MS.store(900, SeqCst);
    let started = Instant::now();
    c.all_reduce_tensor_async(&mut bucket()).unwrap();
    let returned = started.elapsed();
    let aborted = within_5s(|| ABORTS.load(SeqCst) > 0) + returned;
    assert!(aborted >= Duration::from_millis(900), "aborted after {aborted:?}, while #2 was inside NCCL until {returned:?}");
    let err = c.wait_pending().unwrap_err().to_string();
    assert!(err.contains("NCCL all_reduce #1") && err.contains("did not complete within"), "{err}");
    drop(c);
    assert_eq!((ABORTS.load(SeqCst), DESTROYS.load(SeqCst)), (1, 0));
    assert_no_misuse();
}

/// When an enqueue stays inside NCCL past the timeout as well, the communicator can be neither
/// aborted safely nor recovered: the process ends with one line naming the failed collective and
/// the stuck one. Run in a child process (this test's binary, this test alone).
#[test]
fn enqueue_stuck_past_the_timeout_ends_the_process_naming_both() {
    const CHILD: &str = "RINGTRAIN_TEST_NCCL_STUCK_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let _g = fresh();
        HANG.store(true, SeqCst);
        let mut c = comm(Duration::from_millis(300)).unwrap();
        c.all_reduce_tensor_async(&mut bucket()).unwrap();
        STALL_AT.store(2, SeqCst);
        STALL_MS.store(u64::MAX, SeqCst);
        let _ = c.reduce_scatter_tensor_async(&mut bucket());
        panic!("the stuck enqueue returned");
    }
    let module = module_path!().split_once("::").expect("crate::path").1;
    let name = format!("{module}::enqueue_stuck_past_the_timeout_ends_the_process_naming_both");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            panic!("the child still runs after 30 s: a stuck enqueue hangs the process");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}\nstdout:\n{}", String::from_utf8_lossy(&out.stdout));
    let line = stderr.lines().find(|l| l.starts_with("ringtrain: error:")).unwrap_or_else(|| panic!("no error line in:\n{stderr}"));
    assert!(
        line.contains("rank 0")
            && line.contains("all_reduce #1 failed")
            && line.contains("did not complete within")
            && line.contains("reduce_scatter #2 is still being enqueued"),
        "{line}"
    );
}

/// Dropping a communicator whose collectives never finish aborts it instead of calling
/// ncclCommDestroy, which would wait for them for ever: whether the watchdog finds the timeout
/// during the drop's wait, or the collective never even becomes free to run (the drop's own bound).
#[test]
fn drop_with_unfinished_collectives_aborts_instead_of_destroying() {
    for stuck in [&HANG, &COMPUTE_BUSY] {
        let _g = fresh();
        stuck.store(true, SeqCst);
        let mut c = comm(Duration::from_millis(300)).unwrap();
        c.all_reduce_tensor_async(&mut bucket()).unwrap();
        let started = Instant::now();
        drop(c);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3), "drop took {took:?}");
        assert_eq!((ABORTS.load(SeqCst), DESTROYS.load(SeqCst)), (1, 0));
        assert_eq!(EVENTS_LIVE.load(SeqCst), 0, "events leaked");
        assert_no_misuse();
    }
}

/// A drop waits for collectives still finishing, then destroys the communicator (no abort).
#[test]
fn drop_lets_running_collectives_finish_then_destroys() {
    let _g = fresh();
    HANG.store(true, SeqCst);
    let mut c = comm(Duration::from_secs(5)).unwrap();
    c.all_reduce_tensor_async(&mut bucket()).unwrap();
    let finish = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(100));
        HANG.store(false, SeqCst);
    });
    drop(c);
    finish.join().unwrap();
    assert_eq!((ABORTS.load(SeqCst), DESTROYS.load(SeqCst)), (0, 1));
    assert_no_misuse();
}

/// The timeout counts from when a collective can run (its inputs ready on the compute stream),
/// not from its launch: a bucket launched early in backward waits for the rest of backward.
#[test]
fn timeout_counts_from_when_the_collective_can_run() {
    let _g = fresh();
    COMPUTE_BUSY.store(true, SeqCst);
    let mut c = comm(Duration::from_millis(200)).unwrap();
    c.all_reduce_tensor_async(&mut bucket()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ABORTS.load(SeqCst), 0, "timed out while backward still ran ahead of it");
    // Backward ends; the collective can run, but the peer never arrives.
    HANG.store(true, SeqCst);
    COMPUTE_BUSY.store(false, SeqCst);
    let took = within_5s(|| ABORTS.load(SeqCst) > 0);
    assert!(took >= Duration::from_millis(150), "aborted {took:?} after it could run, before the 200 ms timeout");
    let err = c.wait_pending().unwrap_err().to_string();
    assert!(err.contains("NCCL all_reduce #1") && err.contains("did not complete within 200ms"), "{err}");
    drop(c);
    assert_eq!((ABORTS.load(SeqCst), DESTROYS.load(SeqCst)), (1, 0));
    assert_no_misuse();
}

/// Both events are taken before NCCL is called: when that fails, nothing was launched.
#[test]
fn no_launch_without_its_events() {
    let _g = fresh();
    let mut c = comm(Duration::from_secs(10)).unwrap();
    FAIL_EVENT_CREATE.store(true, SeqCst);
    let err = c.all_reduce_tensor(&mut bucket()).unwrap_err().to_string();
    assert!(err.contains("cudaEventCreateWithFlags"), "{err}");
    assert_eq!(LAUNCHES.load(SeqCst), 0, "launched a collective nothing tracks");
    // Nothing was launched, so nothing is broken: the communicator carries on.
    FAIL_EVENT_CREATE.store(false, SeqCst);
    c.all_reduce_sum(&mut [1.0]).unwrap();
    drop(c);
    assert_eq!((ABORTS.load(SeqCst), DESTROYS.load(SeqCst)), (0, 1));
    assert_no_misuse();
}

/// A collective launched but not tracked (its done event could not be recorded) would leave the
/// caller free to reuse memory NCCL still uses: the communicator is aborted, and stays failed.
#[test]
fn launched_collective_that_cannot_be_tracked_aborts() {
    let _g = fresh();
    let mut c = comm(Duration::from_secs(10)).unwrap();
    FAIL_DONE_RECORD.store(true, SeqCst);
    let err = c.all_reduce_tensor(&mut bucket()).unwrap_err().to_string();
    assert!(err.contains("NCCL all_reduce #1") && err.contains("cudaEventRecord(NCCL stream)") && err.contains("aborted"), "{err}");
    assert_eq!(ABORTS.load(SeqCst), 1);
    FAIL_DONE_RECORD.store(false, SeqCst);
    let launches = LAUNCHES.load(SeqCst);
    let again = c.all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
    assert!(again.contains("NCCL all_reduce #1"), "{again}");
    assert_eq!(LAUNCHES.load(SeqCst), launches);
    drop(c);
    assert_eq!((ABORTS.load(SeqCst), DESTROYS.load(SeqCst)), (1, 0));
    assert_eq!(EVENTS_LIVE.load(SeqCst), 0, "events leaked");
    assert_no_misuse();
}

/// After a failure, `wait_pending` still makes the compute stream wait for every deferred
/// collective (an aborted one ends), so the next backward cannot write into buckets NCCL holds.
#[test]
fn wait_pending_orders_the_compute_stream_even_after_a_failure() {
    let _g = fresh();
    HANG.store(true, SeqCst);
    let mut c = comm(Duration::from_millis(100)).unwrap();
    c.all_reduce_tensor_async(&mut bucket()).unwrap();
    c.reduce_scatter_tensor_async(&mut bucket()).unwrap();
    within_5s(|| ABORTS.load(SeqCst) > 0);
    assert_eq!(COMPUTE_WAITS.load(SeqCst), 0);
    let err = c.wait_pending().unwrap_err().to_string();
    assert!(err.contains("NCCL all_reduce #1"), "{err}");
    assert_eq!(COMPUTE_WAITS.load(SeqCst), 2, "the compute stream was not made to wait for the deferred collectives");
    drop(c);
    assert_no_misuse();
}

/// Three parameters, one bucket each (caps of one byte), reduced without overlap.
fn ddp_of_three(comm: &crate::comm::CommHandle) -> Ddp {
    let params = (0..3).map(|i| (format!("p{i}"), Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true))).collect();
    let opts = DdpOptions {
        bucket_cap_bytes: 1,
        first_bucket_cap_bytes: 1,
        overlap: false,
        broadcast_buffers: false,
        force_collectives: false,
        ..DdpOptions::default()
    };
    Ddp::new(comm, params, vec![], opts).unwrap()
}

/// When a bucket's launch fails, the buckets launched before it are still waited for before
/// the reducer returns the error.
#[test]
fn reduce_waits_for_launched_buckets_when_a_later_one_fails() {
    let _g = fresh();
    let c = crate::comm::CommHandle::new(Box::new(comm(Duration::from_secs(10)).unwrap()));
    let mut ddp = ddp_of_three(&c);
    assert_eq!(ddp.bucket_layout().len(), 3);
    FAIL_ALL_REDUCE_AT.store(2, SeqCst);
    COMPUTE_WAITS.store(0, SeqCst);
    let err = ddp.backward_with(0.0, || Ok(())).unwrap_err().to_string();
    assert!(err.contains("all_reduce #") && err.contains("fake NCCL error"), "{err}");
    assert_eq!(COMPUTE_WAITS.load(SeqCst), 1, "bucket 0 was launched but the compute stream never waited for it");
    // The failed collective poisons the Ddp: nothing more is computed or saved from it.
    let again = ddp.backward_with(0.0, || Ok(())).unwrap_err().to_string();
    assert!(again.contains("an earlier collective failed") && again.contains("fake NCCL error"), "{again}");
    assert!(ddp.state().is_err() && ddp.zero_grad().is_err());
    drop(ddp);
    drop(c);
    assert_no_misuse();
}

/// As NCCL behaves when the watchdog aborts while the host reads the control value: the read
/// waited on done events that the abort completed, and `wait_pending` reports the failure only
/// from then on. The reducer must return that error, not the partial sums.
struct AbortedDuringRead {
    waits: usize,
}

impl Communicator for AbortedDuringRead {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        2
    }
    fn backend_name(&self) -> &'static str {
        "aborted-during-read"
    }
    fn all_reduce_sum(&mut self, _: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn broadcast(&mut self, _: &mut [u8], _: usize) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        Ok(vec![mine.to_vec(); 2])
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        Ok(())
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(10)
    }
    fn wait_pending(&mut self) -> Result<(), CommError> {
        self.waits += 1;
        if self.waits == 1 {
            return Ok(());
        }
        Err(CommError::Nccl { rank: 0, op: Op::AllReduce, seq: 3, detail: "did not complete (communicator aborted)".into() })
    }
}

#[test]
fn control_value_read_during_an_abort_is_an_error() {
    let c = crate::comm::CommHandle::new(Box::new(AbortedDuringRead { waits: 0 }));
    let mut ddp = ddp_of_three(&c);
    let err = ddp.backward_with(1.0, || Ok(())).unwrap_err().to_string();
    assert!(err.contains("all_reduce #3") && err.contains("aborted"), "{err}");
}

#[test]
fn unique_id_travels_through_the_store() {
    let server = TcpStoreServer::start("127.0.0.1:0", "t").unwrap();
    let addr = server.local_addr().to_string();
    let handles: Vec<_> = (0..3)
        .map(|rank| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let store = TcpStore::connect(&addr, "t", Duration::from_secs(5)).unwrap();
                exchange_unique_id(&store, rank, || Ok([7u8; UNIQUE_ID_BYTES]), Duration::from_secs(5)).unwrap()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), [7u8; UNIQUE_ID_BYTES]);
    }
}

#[test]
fn missing_unique_id_times_out_naming_the_key() {
    let store = MemoryStore::new();
    let err = exchange_unique_id(&store, 1, || unreachable!(), Duration::from_millis(100)).err().unwrap();
    assert!(err.to_string().contains("nccl/unique_id"), "{err}");
}

#[test]
fn nccl_absent_is_an_error_naming_what_was_searched() {
    // Where there is no NCCL (CI): the error lists the candidates instead of panicking.
    if std::env::var("RINGTRAIN_NCCL_LIB").is_ok() || api::open_nccl().is_ok() {
        return;
    }
    let err = api::api().err().expect("no NCCL here");
    assert!(err.contains("NCCL not found") && err.contains("libnccl.so.2") && err.contains("RINGTRAIN_NCCL_LIB"), "{err}");
}
