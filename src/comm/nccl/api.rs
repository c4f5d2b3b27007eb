//! The C functions and constants ringtrain binds by hand, each described once: the `bind!` and
//! `constants!` tables below make the function-pointer structs, load them, and describe them in C
//! for `tests/nccl_abi.rs`, which compiles those descriptions against `nccl.h` and
//! `cuda_runtime_api.h`. A signature or value typed wrong here fails that test, not a GPU run.
//!
//! Types the headers name (`ncclResult_t`, `cudaStream_t`, …) are newtypes here, not `c_int` or
//! `*mut c_void`, so each one's C name can be derived from its Rust type and checked.

use libloading::Library;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

/// A Rust type's spelling in C, for the ABI check.
pub trait CType {
    fn c() -> String;
}

macro_rules! c_scalars {
    ($($t:ty = $c:literal;)*) => {
        $(impl CType for $t {
            fn c() -> String {
                $c.into()
            }
        })*
    };
}
c_scalars! {
    c_void = "void";
    c_char = "char";
    c_int = "int";
    c_uint = "unsigned int";
    usize = "size_t";
}

impl<T: CType> CType for *mut T {
    fn c() -> String {
        format!("{} *", T::c())
    }
}

impl<T: CType> CType for *const T {
    fn c() -> String {
        format!("const {} *", T::c())
    }
}

/// A constant's value as the C compiler sees it.
pub trait Raw {
    fn raw(self) -> i64;
}

impl Raw for c_uint {
    fn raw(self) -> i64 {
        self as i64
    }
}

impl Raw for usize {
    fn raw(self) -> i64 {
        self as i64
    }
}

/// Handles and enums the headers name: transparent wrappers, so they cross the C boundary as
/// what they wrap.
macro_rules! c_types {
    ($($(#[$m:meta])* $name:ident($inner:ty) = $c:literal;)*) => {
        $(
            $(#[$m])*
            #[repr(transparent)]
            #[derive(Clone, Copy, Debug, PartialEq, Eq)]
            pub struct $name(pub $inner);
            impl CType for $name {
                fn c() -> String {
                    $c.into()
                }
            }
        )*
        /// (C name, size, alignment) of each type above as Rust lays it out.
        pub fn type_layouts() -> Vec<(&'static str, usize, usize)> {
            vec![
                $(($c, std::mem::size_of::<$name>(), std::mem::align_of::<$name>()),)*
                ("ncclUniqueId", std::mem::size_of::<UniqueId>(), std::mem::align_of::<UniqueId>()),
            ]
        }
    };
}
c_types! {
    NcclResult(c_int) = "ncclResult_t";
    NcclDataType(c_int) = "ncclDataType_t";
    NcclRedOp(c_int) = "ncclRedOp_t";
    CudaError(c_int) = "cudaError_t";
    /// An NCCL communicator.
    CommHandle(*mut c_void) = "ncclComm_t";
    Stream(*mut c_void) = "cudaStream_t";
    Event(*mut c_void) = "cudaEvent_t";
}

macro_rules! raw_int {
    ($($t:ident),*) => {
        $(impl Raw for $t {
            fn raw(self) -> i64 {
                self.0 as i64
            }
        })*
    };
}
raw_int!(NcclResult, NcclDataType, NcclRedOp, CudaError);

impl Stream {
    /// The legacy default stream: libtorch's default (compute) stream.
    pub const LEGACY: Stream = Stream(std::ptr::null_mut());
}

/// NCCL's unique id, a 128-byte struct passed by value (as C passes a struct, hence repr(C)).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId(pub [u8; UNIQUE_ID_BYTES]);

impl CType for UniqueId {
    fn c() -> String {
        "ncclUniqueId".into()
    }
}

/// Defines `const NAME: Type = value;` for each entry and `constants()`, the (C name, value) table.
macro_rules! constants {
    ($($name:ident: $t:ty = $v:expr => $c:literal;)*) => {
        $(pub const $name: $t = $v;)*
        /// (C name, value) of every constant ringtrain passes to or compares with NCCL and CUDA.
        pub fn constants() -> Vec<(&'static str, i64)> {
            vec![$(($c, Raw::raw($name)),)*]
        }
    };
}
constants! {
    UNIQUE_ID_BYTES: usize = 128 => "NCCL_UNIQUE_ID_BYTES";
    NCCL_SUCCESS: NcclResult = NcclResult(0) => "ncclSuccess";
    NCCL_IN_PROGRESS: NcclResult = NcclResult(7) => "ncclInProgress";
    NCCL_UINT8: NcclDataType = NcclDataType(1) => "ncclUint8";
    NCCL_FLOAT16: NcclDataType = NcclDataType(6) => "ncclFloat16";
    NCCL_FLOAT32: NcclDataType = NcclDataType(7) => "ncclFloat32";
    NCCL_FLOAT64: NcclDataType = NcclDataType(8) => "ncclFloat64";
    NCCL_BFLOAT16: NcclDataType = NcclDataType(9) => "ncclBfloat16";
    NCCL_SUM: NcclRedOp = NcclRedOp(0) => "ncclSum";
    CUDA_SUCCESS: CudaError = CudaError(0) => "cudaSuccess";
    CUDA_ERROR_NOT_READY: CudaError = CudaError(600) => "cudaErrorNotReady";
    CUDA_EVENT_DISABLE_TIMING: c_uint = 2 => "cudaEventDisableTiming";
    CUDA_STREAM_NON_BLOCKING: c_uint = 1 => "cudaStreamNonBlocking";
}

/// One bound function: its C symbol, the library it comes from, and the Rust-side
/// function-pointer type spelled in C.
#[derive(Clone, Debug)]
pub struct Binding {
    pub symbol: &'static str,
    pub library: &'static str,
    pub c_type: String,
}

/// `ret (*)(args)`: a C function-pointer type.
fn c_fn_type(ret: &str, args: &[String]) -> String {
    format!("{ret} (*)({})", if args.is_empty() { "void".to_string() } else { args.join(", ") })
}

/// A struct of function pointers from one library; `load` resolves them all, `bindings`
/// describes them in C.
macro_rules! bind {
    ($(#[$m:meta])* struct $name:ident from $lib:literal {
        $($field:ident = $sym:literal fn($($arg:ident: $t:ty),*) -> $ret:ty;)*
    }) => {
        $(#[$m])*
        #[derive(Clone, Copy)]
        pub(crate) struct $name {
            $(pub(crate) $field: unsafe extern "C" fn($($arg: $t),*) -> $ret,)*
        }

        impl $name {
            /// Resolves every function in `lib`; the error names the first one missing.
            pub(crate) fn load(lib: &Library) -> Result<$name, String> {
                Ok($name {
                    $($field: {
                        // SAFETY: the type is the C declaration's; tests/nccl_abi.rs checks it
                        // against the header.
                        let f: libloading::Symbol<unsafe extern "C" fn($($t),*) -> $ret> =
                            unsafe { lib.get(concat!($sym, "\0").as_bytes()) }
                                .map_err(|e| format!("{} not found in {}: {e}", $sym, $lib))?;
                        *f
                    },)*
                })
            }

            pub fn bindings() -> Vec<Binding> {
                vec![$(Binding {
                    symbol: $sym,
                    library: $lib,
                    c_type: c_fn_type(&<$ret as CType>::c(), &[$(<$t as CType>::c()),*]),
                },)*]
            }
        }
    };
}

bind! {
    /// The NCCL functions ringtrain calls.
    struct NcclFns from "libnccl" {
        get_version = "ncclGetVersion" fn(version: *mut c_int) -> NcclResult;
        get_unique_id = "ncclGetUniqueId" fn(id: *mut UniqueId) -> NcclResult;
        comm_init_rank = "ncclCommInitRank" fn(comm: *mut CommHandle, nranks: c_int, id: UniqueId, rank: c_int) -> NcclResult;
        all_reduce = "ncclAllReduce" fn(
            send: *const c_void, recv: *mut c_void, count: usize, dtype: NcclDataType, op: NcclRedOp, comm: CommHandle, stream: Stream
        ) -> NcclResult;
        broadcast = "ncclBroadcast" fn(
            send: *const c_void, recv: *mut c_void, count: usize, dtype: NcclDataType, root: c_int, comm: CommHandle, stream: Stream
        ) -> NcclResult;
        all_gather = "ncclAllGather" fn(
            send: *const c_void, recv: *mut c_void, send_count: usize, dtype: NcclDataType, comm: CommHandle, stream: Stream
        ) -> NcclResult;
        reduce_scatter = "ncclReduceScatter" fn(
            send: *const c_void, recv: *mut c_void, recv_count: usize, dtype: NcclDataType, op: NcclRedOp, comm: CommHandle, stream: Stream
        ) -> NcclResult;
        get_async_error = "ncclCommGetAsyncError" fn(comm: CommHandle, error: *mut NcclResult) -> NcclResult;
        comm_abort = "ncclCommAbort" fn(comm: CommHandle) -> NcclResult;
        comm_destroy = "ncclCommDestroy" fn(comm: CommHandle) -> NcclResult;
        get_error_string = "ncclGetErrorString" fn(result: NcclResult) -> *const c_char;
    }
}

bind! {
    /// The CUDA runtime functions ringtrain calls (from the libcudart libtorch loaded).
    struct CudartFns from "libcudart" {
        set_device = "cudaSetDevice" fn(device: c_int) -> CudaError;
        get_device_count = "cudaGetDeviceCount" fn(count: *mut c_int) -> CudaError;
        get_error_string = "cudaGetErrorString" fn(error: CudaError) -> *const c_char;
        stream_create = "cudaStreamCreateWithFlags" fn(stream: *mut Stream, flags: c_uint) -> CudaError;
        stream_destroy = "cudaStreamDestroy" fn(stream: Stream) -> CudaError;
        stream_wait_event = "cudaStreamWaitEvent" fn(stream: Stream, event: Event, flags: c_uint) -> CudaError;
        event_create = "cudaEventCreateWithFlags" fn(event: *mut Event, flags: c_uint) -> CudaError;
        event_record = "cudaEventRecord" fn(event: Event, stream: Stream) -> CudaError;
        event_query = "cudaEventQuery" fn(event: Event) -> CudaError;
        event_destroy = "cudaEventDestroy" fn(event: Event) -> CudaError;
    }
}

/// Every function NcclComm calls: NCCL's and the CUDA runtime's. Unit tests build one from fake
/// `extern "C"` functions.
pub(crate) struct Api {
    pub nccl: NcclFns,
    pub cuda: CudartFns,
}

impl Api {
    pub fn nccl_error(&self, code: NcclResult) -> String {
        // SAFETY: NCCL returns a static string for any code.
        let s = unsafe { std::ffi::CStr::from_ptr((self.nccl.get_error_string)(code)) };
        format!("{} (NCCL error {})", s.to_string_lossy(), code.0)
    }

    pub fn cuda_error(&self, code: CudaError) -> String {
        cuda_error(&self.cuda, code)
    }
}

pub(crate) fn cuda_error(cuda: &CudartFns, code: CudaError) -> String {
    // SAFETY: the runtime returns a static string for any code.
    let s = unsafe { std::ffi::CStr::from_ptr((cuda.get_error_string)(code)) };
    format!("{} (CUDA error {})", s.to_string_lossy(), code.0)
}

/// Candidates for the CUDA runtime, best first: the libcudart this process already mapped
/// (libtorch_cuda's, whatever its version, including the renamed copies wheels repaired by
/// auditwheel bundle, `libcudart-<hash>.so.12`), then the sonames of the CUDA majors torch ships for.
pub(crate) fn cudart_candidates(maps: &str) -> Vec<String> {
    let mut found: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.rsplit('/').next().is_some_and(|f| f.starts_with("libcudart") && f.contains(".so")))
        .map(str::to_string)
        .collect();
    found.dedup();
    found.extend(["libcudart.so.13", "libcudart.so.12", "libcudart.so"].map(String::from));
    found
}

/// The CUDA runtime: its library (kept for the process) and functions.
pub(crate) fn cudart() -> Result<&'static CudartFns, String> {
    static CUDART: OnceLock<Result<(Library, CudartFns), String>> = OnceLock::new();
    CUDART
        .get_or_init(|| {
            // The answer is kept for the process: look only once libtorch_cuda, and the libcudart
            // it brings, is mapped, or a different runtime from the library path would be kept.
            // Where it cannot be loaded there is no libtorch runtime to find, and any will do.
            let _ = crate::cuda::load_torch_cuda();
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
            let mut tried = Vec::new();
            for c in cudart_candidates(&maps) {
                // SAFETY: opening a library libtorch already loaded only adds a handle; a fresh
                // libcudart's initialisers are safe to run.
                match unsafe { Library::new(&c) } {
                    Ok(lib) => {
                        let fns = CudartFns::load(&lib)?;
                        return Ok((lib, fns));
                    }
                    Err(e) => tried.push(format!("{c} ({e})")),
                }
            }
            Err(format!("CUDA runtime not found; tried: {}", tried.join("; ")))
        })
        .as_ref()
        .map(|(_, fns)| fns)
        .map_err(Clone::clone)
}

/// Where the wheel puts libnccl.so.2 relative to the libtorch this process loaded
/// (`site-packages/torch/lib` → `site-packages/nvidia/nccl/lib`).
fn beside_libtorch() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lib = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.ends_with("/libtorch_cpu.so"))?;
    Some(std::path::Path::new(lib).parent()?.join("../../nvidia/nccl/lib/libnccl.so.2"))
}

pub(crate) fn open_nccl() -> Result<Library, String> {
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

/// NCCL and the CUDA runtime, loaded once for the process.
pub(crate) fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<(Library, Api), String>> = OnceLock::new();
    API.get_or_init(|| {
        let lib = open_nccl()?;
        let nccl = NcclFns::load(&lib)?;
        let cuda = *cudart()?;
        Ok((lib, Api { nccl, cuda }))
    })
    .as_ref()
    .map(|(_, api)| api)
    .map_err(Clone::clone)
}

/// Everything `tests/nccl_abi.rs` checks against the headers.
pub fn bindings() -> Vec<Binding> {
    let mut all = NcclFns::bindings();
    all.extend(CudartFns::bindings());
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapped_cudart_comes_first_whatever_its_version() {
        let maps = "7f00-7f01 r-xp 0 08:01 1 /opt/venv/nvidia/cuda_runtime/lib/libcudart.so.12\n\
                    7f01-7f02 r--p 0 08:01 1 /opt/venv/nvidia/cuda_runtime/lib/libcudart.so.12\n\
                    7f02-7f03 r-xp 0 08:01 2 /opt/venv/torch/lib/libtorch_cuda.so\n\
                    7f03-7f04 rw-p 0 00:00 0\n";
        assert_eq!(
            cudart_candidates(maps),
            ["/opt/venv/nvidia/cuda_runtime/lib/libcudart.so.12", "libcudart.so.13", "libcudart.so.12", "libcudart.so"]
        );
        assert_eq!(cudart_candidates(""), ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]);
    }

    #[test]
    fn a_renamed_mapped_cudart_is_found() {
        // A wheel repaired by auditwheel bundles it renamed; a static archive is no candidate.
        let maps = "7f00-7f01 r-xp 0 08:01 1 /opt/venv/torch/lib/libcudart-9335f6a2.so.12\n\
                    7f01-7f02 r--p 0 08:01 3 /opt/venv/lib/libcudart_static.a\n";
        assert_eq!(cudart_candidates(maps)[0], "/opt/venv/torch/lib/libcudart-9335f6a2.so.12");
        assert_eq!(cudart_candidates(maps).len(), 4);
    }

    #[test]
    fn bindings_describe_each_function_in_c() {
        let b = bindings();
        let all_reduce = b.iter().find(|b| b.symbol == "ncclAllReduce").unwrap();
        assert_eq!(
            all_reduce.c_type,
            "ncclResult_t (*)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t)"
        );
        let init = b.iter().find(|b| b.symbol == "ncclCommInitRank").unwrap();
        assert_eq!(init.c_type, "ncclResult_t (*)(ncclComm_t *, int, ncclUniqueId, int)");
        assert!(constants().contains(&("ncclFloat32", 7)));
    }
}
