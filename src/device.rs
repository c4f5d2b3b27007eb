//! Which device a worker computes on. CUDA support is loaded at run time — dlopen of
//! libtorch_cuda.so, which registers libtorch's CUDA backend — and only when a GPU is asked for,
//! so one binary serves CPU and GPU machines.

use crate::config::DeviceChoice;
use std::sync::OnceLock;
use tch::Device;

#[derive(Debug, thiserror::Error)]
#[error("device: {0}")]
pub struct DeviceError(pub String);

/// Loads libtorch's CUDA backend once; the error says what is missing.
pub fn load_cuda() -> Result<(), DeviceError> {
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
        .map_err(DeviceError)
}

/// Pure check: local rank r uses cuda:r, so there must be at least as many visible GPUs as
/// local ranks.
pub fn check_gpus(local_rank: usize, local_world_size: usize, visible: usize) -> Result<usize, String> {
    if visible == 0 {
        return Err(
            "no CUDA device is visible (torch.cuda.device_count() == 0: is the NVIDIA driver loaded, CUDA_VISIBLE_DEVICES empty?)".into()
        );
    }
    if local_world_size > visible {
        return Err(format!(
            "{local_world_size} workers on this node but only {visible} GPU(s) visible: one GPU per local rank (use --nproc-per-node {visible})"
        ));
    }
    Ok(local_rank)
}

/// Resolves the configured device for this local rank. RINGTRAIN_CUDA_DEVICE=N puts every local
/// rank on cuda:N instead (several ranks sharing one GPU, for testing with the ring or MPI;
/// NCCL refuses that).
pub fn select(choice: DeviceChoice, local_rank: usize, local_world_size: usize) -> Result<Device, DeviceError> {
    if choice != DeviceChoice::Cpu {
        if let Ok(n) = std::env::var("RINGTRAIN_CUDA_DEVICE") {
            let n: usize = n.parse().map_err(|_| DeviceError(format!("RINGTRAIN_CUDA_DEVICE={n:?} is not a device index")))?;
            load_cuda()?;
            let visible = tch::Cuda::device_count() as usize;
            if n >= visible {
                return Err(DeviceError(format!("RINGTRAIN_CUDA_DEVICE={n} but {visible} GPU(s) visible")));
            }
            return Ok(Device::Cuda(n));
        }
    }
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => {
            load_cuda()?;
            let i = check_gpus(local_rank, local_world_size, tch::Cuda::device_count() as usize).map_err(DeviceError)?;
            Ok(Device::Cuda(i))
        }
        DeviceChoice::Auto => match load_cuda().map(|_| tch::Cuda::device_count() as usize) {
            Ok(n) if n > 0 => Ok(Device::Cuda(check_gpus(local_rank, local_world_size, n).map_err(DeviceError)?)),
            Ok(_) => {
                tracing::info!("device auto: no GPU visible, using the CPU");
                Ok(Device::Cpu)
            }
            Err(e) => {
                tracing::info!("device auto: using the CPU ({e})");
                Ok(Device::Cpu)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_gpu_per_local_rank() {
        assert_eq!(check_gpus(1, 2, 2), Ok(1));
        assert_eq!(check_gpus(0, 1, 8), Ok(0));
        let e = check_gpus(0, 2, 1).unwrap_err();
        assert!(e.contains("2 workers") && e.contains("only 1 GPU"), "{e}");
        assert!(check_gpus(0, 1, 0).unwrap_err().contains("no CUDA device"));
    }
}
