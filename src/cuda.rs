//! libtorch's CUDA backend, loaded at run time (dlopen of libtorch_cuda.so, which registers it),
//! once per process. Its own module, below both `device` (which picks a GPU) and the NCCL
//! backend (which finds the CUDA runtime libtorch brought), so neither imports the other's.

use std::sync::OnceLock;

/// Loads libtorch_cuda.so once; the error says what is missing. The answer is kept.
pub fn load_torch_cuda() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let name = std::ffi::CString::new("libtorch_cuda.so").unwrap();
            // SAFETY: dlopen/dlerror with a valid C string; the handle is kept for the process.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if handle.is_null() {
                let why = unsafe { std::ffi::CStr::from_ptr(libc::dlerror()) }.to_string_lossy().into_owned();
                return Err(format!(
                    "CUDA was asked for but libtorch's CUDA backend could not be loaded ({why}); it needs the NVIDIA driver and \
                     the CUDA libraries of the torch wheel (nvidia-* packages) on the library path — see the README's GPU section"
                ));
            }
            Ok(())
        })
        .clone()
}
