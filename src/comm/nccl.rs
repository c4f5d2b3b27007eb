//! The NCCL backend: collectives on CUDA tensors in GPU memory, on libtorch's default stream (so
//! they are ordered with the kernels that produced the gradients and those that consume them).
//!
//! NCCL is bound by hand through `libloading` (twelve functions), not through cudarc: cudarc looks
//! for `libnccl.so` but the PyPI wheel ships only `libnccl.so.2`, and it panics when the library is
//! absent. Here the search order is explicit and a miss is an error listing what was tried:
//! `RINGTRAIN_NCCL_LIB`, `libnccl.so.2`/`libnccl.so` on the library path, then the
//! `nvidia/nccl/lib` folder of the wheel beside the libtorch in use. The CUDA runtime functions
//! (events, set device) come from the libcudart that libtorch already loaded.
//!
//! No hangs: after each collective the host polls a CUDA event and NCCL's async error; past the
//! timeout the communicator is aborted and the error names the operation.

use super::{CommError, Communicator, Op};
use crate::rendezvous::Store;
use libloading::Library;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

pub const UNIQUE_ID_BYTES: usize = 128;
const UNIQUE_ID_KEY: &str = "nccl/unique_id";

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId([u8; UNIQUE_ID_BYTES]);

type NcclCommT = *mut c_void;
type Stream = *mut c_void;
type Event = *mut c_void;

// ncclDataType_t / ncclRedOp_t / ncclResult_t values (stable since NCCL 2.10).
const NCCL_UINT8: c_int = 1;
const NCCL_FLOAT16: c_int = 6;
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_BFLOAT16: c_int = 9;
const NCCL_SUM: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;
const CUDA_ERROR_NOT_READY: c_int = 600;
const CUDA_EVENT_DISABLE_TIMING: c_uint = 2;

struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut NcclCommT, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, NcclCommT, Stream) -> c_int,
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, NcclCommT, Stream) -> c_int,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, NcclCommT, Stream) -> c_int,
    reduce_scatter: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, NcclCommT, Stream) -> c_int,
    get_async_error: unsafe extern "C" fn(NcclCommT, *mut c_int) -> c_int,
    comm_abort: unsafe extern "C" fn(NcclCommT) -> c_int,
    comm_destroy: unsafe extern "C" fn(NcclCommT) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    set_device: unsafe extern "C" fn(c_int) -> c_int,
    event_create: unsafe extern "C" fn(*mut Event, c_uint) -> c_int,
    event_record: unsafe extern "C" fn(Event, Stream) -> c_int,
    event_query: unsafe extern "C" fn(Event) -> c_int,
    event_destroy: unsafe extern "C" fn(Event) -> c_int,
    _libs: (Library, Library),
}

/// Where the wheel puts libnccl.so.2 relative to the libtorch this process loaded
/// (`site-packages/torch/lib` → `site-packages/nvidia/nccl/lib`).
fn beside_libtorch() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lib = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.ends_with("/libtorch_cpu.so"))?;
    Some(std::path::Path::new(lib).parent()?.join("../../nvidia/nccl/lib/libnccl.so.2"))
}

fn open_nccl() -> Result<Library, String> {
    let mut tried = Vec::new();
    let mut candidates: Vec<String> = Vec::new();
    match std::env::var("RINGTRAIN_NCCL_LIB") {
        Ok(p) => candidates.push(p),
        Err(_) => tried.push("$RINGTRAIN_NCCL_LIB (unset)".to_string()),
    }
    candidates.push("libnccl.so.2".into());
    candidates.push("libnccl.so".into());
    if let Some(p) = beside_libtorch() {
        candidates.push(p.display().to_string());
    }
    for c in candidates {
        // SAFETY: loading NCCL runs its initialisers, which are safe to run.
        match unsafe { Library::new(&c) } {
            Ok(lib) => return Ok(lib),
            Err(e) => tried.push(format!("{c} ({e})")),
        }
    }
    Err(format!(
        "NCCL not found; tried: {} (LD_LIBRARY_PATH={:?}). Install nvidia-nccl-cu13 beside torch, or set RINGTRAIN_NCCL_LIB to libnccl.so.2",
        tried.join("; "),
        std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
    ))
}

fn api() -> Result<&'static Api, CommError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    let loaded = API.get_or_init(|| {
        let nccl = open_nccl()?;
        // SAFETY: libtorch_cpu already loaded this libcudart; opening it again only adds a handle.
        let cudart = unsafe { Library::new("libcudart.so.13") }.map_err(|e| format!("CUDA runtime libcudart.so.13: {e}"))?;
        macro_rules! sym {
            ($lib:expr, $name:literal) => {
                // SAFETY: the signature matches the C declaration in nccl.h / cuda_runtime_api.h.
                *unsafe { $lib.get(concat!($name, "\0").as_bytes()) }.map_err(|e| format!("{}: {e}", $name))?
            };
        }
        Ok(Api {
            get_unique_id: sym!(nccl, "ncclGetUniqueId"),
            comm_init_rank: sym!(nccl, "ncclCommInitRank"),
            all_reduce: sym!(nccl, "ncclAllReduce"),
            broadcast: sym!(nccl, "ncclBroadcast"),
            all_gather: sym!(nccl, "ncclAllGather"),
            reduce_scatter: sym!(nccl, "ncclReduceScatter"),
            get_async_error: sym!(nccl, "ncclCommGetAsyncError"),
            comm_abort: sym!(nccl, "ncclCommAbort"),
            comm_destroy: sym!(nccl, "ncclCommDestroy"),
            get_error_string: sym!(nccl, "ncclGetErrorString"),
            get_version: sym!(nccl, "ncclGetVersion"),
            set_device: sym!(cudart, "cudaSetDevice"),
            event_create: sym!(cudart, "cudaEventCreateWithFlags"),
            event_record: sym!(cudart, "cudaEventRecord"),
            event_query: sym!(cudart, "cudaEventQuery"),
            event_destroy: sym!(cudart, "cudaEventDestroy"),
            _libs: (nccl, cudart),
        })
    });
    loaded.as_ref().map_err(|e| CommError::NotAvailable { backend: "nccl", detail: e.clone() })
}

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

pub struct NcclComm {
    api: &'static Api,
    comm: NcclCommT,
    event: Event,
    rank: usize,
    world: usize,
    device: Device,
    timeout: Duration,
    seq: u64,
}

// SAFETY: the communicator is used from one thread at a time (Communicator is used by &mut).
unsafe impl Send for NcclComm {}

impl NcclComm {
    pub fn new(store: &dyn Store, rank: usize, world: usize, device_index: usize, timeout: Duration) -> Result<NcclComm, CommError> {
        let api = api()?;
        let fail = |what: &str, code: c_int| CommError::Nccl {
            rank,
            op: Op::Setup,
            seq: 0,
            detail: format!("{what}: {}", error_string(api, code)),
        };
        // SAFETY: plain C calls with valid out-pointers.
        unsafe {
            let code = (api.set_device)(device_index as c_int);
            if code != 0 {
                return Err(CommError::Nccl {
                    rank,
                    op: Op::Setup,
                    seq: 0,
                    detail: format!("cudaSetDevice({device_index}) failed with CUDA error {code}"),
                });
            }
            let mut version = 0;
            (api.get_version)(&mut version);
            tracing::info!("NCCL {version} on cuda:{device_index}");
        }
        let id = exchange_unique_id(
            store,
            rank,
            || {
                let mut id = UniqueId([0; UNIQUE_ID_BYTES]);
                // SAFETY: valid out-pointer.
                let code = unsafe { (api.get_unique_id)(&mut id) };
                if code != 0 {
                    return Err(fail("ncclGetUniqueId", code));
                }
                Ok(id.0)
            },
            timeout,
        )?;
        // ncclCommInitRank blocks until every rank has called it; a watchdog bounds that wait.
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
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
            unsafe { libc::_exit(1) };
        });
        let mut comm: NcclCommT = std::ptr::null_mut();
        // SAFETY: valid out-pointer and unique id.
        let code = unsafe { (api.comm_init_rank)(&mut comm, world as c_int, UniqueId(id), rank as c_int) };
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        if code != 0 {
            return Err(fail("ncclCommInitRank", code));
        }
        let mut event: Event = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        let code = unsafe { (api.event_create)(&mut event, CUDA_EVENT_DISABLE_TIMING) };
        if code != 0 {
            return Err(CommError::Nccl { rank, op: Op::Setup, seq: 0, detail: format!("cudaEventCreate failed with CUDA error {code}") });
        }
        Ok(NcclComm { api, comm, event, rank, world, device: Device::Cuda(device_index), timeout, seq: 0 })
    }

    /// Waits for the collective just issued on the default stream, polling NCCL's async error;
    /// aborts the communicator past the timeout.
    fn wait(&mut self, op: Op, launched: c_int) -> Result<(), CommError> {
        let (api, seq, rank) = (self.api, self.seq, self.rank);
        if launched != 0 && launched != NCCL_IN_PROGRESS {
            return Err(CommError::Nccl { rank, op, seq, detail: error_string(api, launched) });
        }
        // SAFETY: event and communicator are valid for self's lifetime.
        unsafe {
            let code = (api.event_record)(self.event, std::ptr::null_mut());
            if code != 0 {
                return Err(CommError::Nccl { rank, op, seq, detail: format!("cudaEventRecord failed with CUDA error {code}") });
            }
            let started = Instant::now();
            loop {
                match (api.event_query)(self.event) {
                    0 => return Ok(()),
                    CUDA_ERROR_NOT_READY => {}
                    code => return Err(CommError::Nccl { rank, op, seq, detail: format!("CUDA error {code} while waiting") }),
                }
                let mut async_err = 0;
                (api.get_async_error)(self.comm, &mut async_err);
                if async_err != 0 && async_err != NCCL_IN_PROGRESS {
                    (api.comm_abort)(self.comm);
                    return Err(CommError::Nccl {
                        rank,
                        op,
                        seq,
                        detail: format!("{} (communicator aborted)", error_string(api, async_err)),
                    });
                }
                if started.elapsed() > self.timeout {
                    (api.comm_abort)(self.comm);
                    return Err(CommError::Nccl {
                        rank,
                        op,
                        seq,
                        detail: format!(
                            "did not complete within {:.0}s: a rank did not arrive (communicator aborted)",
                            self.timeout.as_secs_f64()
                        ),
                    });
                }
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    fn nccl_type(&self, t: &Tensor, op: Op) -> Result<c_int, CommError> {
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
}

fn error_string(api: &Api, code: c_int) -> String {
    // SAFETY: NCCL returns a static string.
    let s = unsafe { std::ffi::CStr::from_ptr((api.get_error_string)(code)) };
    format!("{} (NCCL error {code})", s.to_string_lossy())
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: valid handles, destroyed once.
        unsafe {
            (self.api.event_destroy)(self.event);
            (self.api.comm_destroy)(self.comm);
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

    fn all_reduce_tensor(&mut self, t: &mut Tensor) -> Result<(), CommError> {
        self.check_tensor(t, Op::AllReduce)?;
        let dtype = self.nccl_type(t, Op::AllReduce)?;
        self.seq += 1;
        let ptr = t.data_ptr();
        // SAFETY: in-place all-reduce over the tensor's device memory, on the default stream.
        let code = unsafe { (self.api.all_reduce)(ptr, ptr, t.numel(), dtype, NCCL_SUM, self.comm, std::ptr::null_mut()) };
        self.wait(Op::AllReduce, code)
    }

    fn broadcast_tensor(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
        self.check_tensor(t, Op::Broadcast)?;
        self.seq += 1;
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        let ptr = t.data_ptr();
        // SAFETY: in-place broadcast of the tensor's bytes.
        let code = unsafe { (self.api.broadcast)(ptr, ptr, bytes, NCCL_UINT8, root as c_int, self.comm, std::ptr::null_mut()) };
        self.wait(Op::Broadcast, code)
    }

    /// In place: rank r's block of `numel / world` elements is at offset r × that (NCCL's
    /// in-place convention). A length the world size does not divide takes the all-reduce.
    fn reduce_scatter_tensor(&mut self, t: &mut Tensor) -> Result<(), CommError> {
        self.check_tensor(t, Op::ReduceScatter)?;
        if t.numel() % self.world != 0 {
            return self.all_reduce_tensor(t);
        }
        let dtype = self.nccl_type(t, Op::ReduceScatter)?;
        let (base, mine, block) = self.own_block(t);
        self.seq += 1;
        // SAFETY: in-place reduce-scatter: the receive block lies inside the send buffer at this
        // rank's offset, as NCCL requires.
        let code = unsafe { (self.api.reduce_scatter)(base, mine, block, dtype, NCCL_SUM, self.comm, std::ptr::null_mut()) };
        self.wait(Op::ReduceScatter, code)
    }

    fn all_gather_shards_tensor(&mut self, t: &mut Tensor) -> Result<(), CommError> {
        self.check_tensor(t, Op::AllGatherShards)?;
        if t.numel() % self.world != 0 {
            let (a, b) = super::shard_bounds(t.numel(), self.world, self.rank);
            let flat = t.view([-1]);
            let _ = flat.narrow(0, 0, a as i64).zero_();
            let _ = flat.narrow(0, b as i64, (t.numel() - b) as i64).zero_();
            return self.all_reduce_tensor(t);
        }
        let dtype = self.nccl_type(t, Op::AllGatherShards)?;
        let (base, mine, block) = self.own_block(t);
        self.seq += 1;
        // SAFETY: in-place all-gather: this rank's block is the send buffer, at its offset.
        let code = unsafe { (self.api.all_gather)(mine, base, block, dtype, self.comm, std::ptr::null_mut()) };
        self.wait(Op::AllGatherShards, code)
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        let mut t = self.to_device(&Tensor::from_slice(buf));
        self.all_reduce_tensor(&mut t)?;
        t.to_device(Device::Cpu).copy_data(buf, buf.len());
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        let mut t = self.to_device(&Tensor::from_slice(buf));
        self.broadcast_tensor(&mut t, root)?;
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

impl NcclComm {
    /// ncclAllGather of equal-sized byte strings.
    fn gather_fixed(&mut self, mine: &[u8]) -> Result<Vec<u8>, CommError> {
        let n = mine.len();
        let send = self.to_device(&Tensor::from_slice(if n == 0 { &[0u8][..] } else { mine }));
        let recv = Tensor::zeros([(n.max(1) * self.world) as i64], (Kind::Uint8, self.device));
        self.seq += 1;
        // SAFETY: send holds n.max(1) bytes, recv world times that.
        let code =
            unsafe { (self.api.all_gather)(send.data_ptr(), recv.data_ptr(), n.max(1), NCCL_UINT8, self.comm, std::ptr::null_mut()) };
        self.wait(Op::AllGather, code)?;
        let host = Vec::<u8>::try_from(&recv.to_device(Device::Cpu))
            .map_err(|e| CommError::BadArgument { op: Op::AllGather, detail: e.to_string() })?;
        Ok(if n == 0 { vec![] } else { host })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::{MemoryStore, TcpStore, TcpStoreServer};
    use std::sync::Arc;

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
        let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
        let err = exchange_unique_id(store.as_ref(), 1, || unreachable!(), Duration::from_millis(100)).err().unwrap();
        assert!(err.to_string().contains("nccl/unique_id"), "{err}");
    }

    #[test]
    fn nccl_absent_is_an_error_naming_what_was_searched() {
        // This machine has no NCCL (CI): the error lists the candidates instead of panicking.
        if std::env::var("RINGTRAIN_NCCL_LIB").is_ok() || unsafe { Library::new("libnccl.so.2") }.is_ok() {
            return;
        }
        let err = api().err().expect("no NCCL here").to_string();
        assert!(err.contains("NCCL not found") && err.contains("libnccl.so.2") && err.contains("RINGTRAIN_NCCL_LIB"), "{err}");
    }
}
