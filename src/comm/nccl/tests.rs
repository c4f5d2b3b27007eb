//! NcclComm against fake NCCL and CUDA functions (no GPU): the watchdog's abort-once, no destroy
//! after an abort, async errors, the device selected on every thread that touches CUDA, no leak
//! when setup fails half-way. The fakes never touch memory, so CPU tensors stand in for CUDA ones.

use super::*;
use crate::rendezvous::{MemoryStore, TcpStore, TcpStoreServer};
use std::cell::Cell;
use std::ffi::{c_char, c_uint};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};

/// Not 0: a thread that forgot to select it would be on device 0.
const DEVICE: c_int = 3;

static SERIAL: Mutex<()> = Mutex::new(());
static HANG: AtomicBool = AtomicBool::new(false);
static ASYNC_ERROR: AtomicI32 = AtomicI32::new(0);
static FAIL_STREAM: AtomicBool = AtomicBool::new(false);
static ABORTS: AtomicUsize = AtomicUsize::new(0);
static DESTROYS: AtomicUsize = AtomicUsize::new(0);
static LAUNCHES: AtomicUsize = AtomicUsize::new(0);
static EVENTS_CREATED: AtomicUsize = AtomicUsize::new(0);
static EVENTS_LIVE: AtomicI32 = AtomicI32::new(0);
/// CUDA calls made from a thread whose current device was not DEVICE.
static WRONG_DEVICE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The list, whatever a failed test left it in.
fn wrong_device() -> MutexGuard<'static, Vec<String>> {
    WRONG_DEVICE.lock().unwrap_or_else(|e| e.into_inner())
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
unsafe extern "C" fn stream_wait_event(_: Stream, _: Event, _: c_uint) -> CudaError {
    on_device("cudaStreamWaitEvent");
    CUDA_SUCCESS
}
unsafe extern "C" fn event_create(e: *mut Event, _: c_uint) -> CudaError {
    on_device("cudaEventCreateWithFlags");
    let n = EVENTS_CREATED.fetch_add(1, SeqCst) + 1;
    EVENTS_LIVE.fetch_add(1, SeqCst);
    *e = Event((0x1000 + n) as *mut c_void);
    CUDA_SUCCESS
}
unsafe extern "C" fn event_record(_: Event, _: Stream) -> CudaError {
    on_device("cudaEventRecord");
    CUDA_SUCCESS
}
unsafe extern "C" fn event_query(_: Event) -> CudaError {
    on_device("cudaEventQuery");
    if HANG.load(SeqCst) {
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
    LAUNCHES.fetch_add(1, SeqCst);
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
    *e = NcclResult(ASYNC_ERROR.load(SeqCst));
    NCCL_SUCCESS
}
unsafe extern "C" fn comm_abort(_: CommHandle) -> NcclResult {
    ABORTS.fetch_add(1, SeqCst);
    NCCL_SUCCESS
}
unsafe extern "C" fn comm_destroy(_: CommHandle) -> NcclResult {
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
    HANG.store(false, SeqCst);
    ASYNC_ERROR.store(0, SeqCst);
    FAIL_STREAM.store(false, SeqCst);
    for c in [&ABORTS, &DESTROYS, &LAUNCHES, &EVENTS_CREATED] {
        c.store(0, SeqCst);
    }
    EVENTS_LIVE.store(0, SeqCst);
    wrong_device().clear();
    guard
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
