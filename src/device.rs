//! Which device a worker computes on. CUDA support is loaded at run time — dlopen of
//! libtorch_cuda.so, which registers libtorch's CUDA backend — and only when a GPU is asked for,
//! so one binary serves CPU and GPU machines.
//!
//! Order matters: libtorch looks its CUDA support up once, at the first call that asks (even
//! `tch::manual_seed`), and keeps the answer. `load_cuda` must run before any other tch call;
//! `ringtrain::init` does it first, and a late load is reported, not silently run on the CPU.

use serde::{Deserialize, Serialize};
use tch::Device;

/// Where a rank computes (`device:` in the config): `cpu`, `cuda` (local rank r on cuda:r), or
/// `auto` (CUDA when a GPU is visible).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    Auto,
}

#[derive(Debug, thiserror::Error)]
#[error("device: {0}")]
pub struct DeviceError(pub String);

/// Loads libtorch's CUDA backend once; the error says what is missing. Call it before any other
/// tch call in a program that uses CUDA (see the module docs).
pub fn load_cuda() -> Result<(), DeviceError> {
    crate::cuda::load_torch_cuda().map_err(DeviceError)
}

/// Pure: libtorch's device count, checked against the CUDA runtime's. libtorch seeing none
/// while the runtime sees some means its CUDA support was looked up before `load_cuda` and is
/// off for the life of the process.
pub fn check_cuda_hooks(torch_count: usize, runtime_count: Option<usize>) -> Result<usize, String> {
    match runtime_count {
        Some(n) if torch_count == 0 && n > 0 => Err(format!(
            "libtorch sees no GPU but the CUDA runtime sees {n}: CUDA support was looked up (by a tch call such as \
             tch::manual_seed) before ringtrain loaded it, and libtorch keeps that answer. Call ringtrain::init (or \
             ringtrain::device::load_cuda()) before any tch call"
        )),
        _ => Ok(torch_count),
    }
}

/// The CUDA runtime's device count (`cudaGetDeviceCount`), `None` where it cannot be asked.
fn runtime_device_count() -> Option<usize> {
    let cuda = crate::comm::nccl::cudart().ok()?;
    let mut n = 0;
    // SAFETY: valid out-pointer.
    let code = unsafe { (cuda.get_device_count)(&mut n) };
    (code.0 == 0).then_some(n.max(0) as usize)
}

/// GPUs libtorch sees, after loading its CUDA backend.
fn cuda_device_count() -> Result<usize, DeviceError> {
    load_cuda()?;
    let torch = tch::Cuda::device_count().max(0) as usize;
    let runtime = if torch == 0 { runtime_device_count() } else { None };
    check_cuda_hooks(torch, runtime).map_err(DeviceError)
}

/// Pure: this local rank's GPU. Two layouts work: one GPU per local rank (each rank sees all
/// the node's GPUs and takes cuda:LOCAL_RANK), and one visible GPU per task (`srun
/// --gpus-per-task=1`, a Kubernetes pod with one GPU, CUDA_VISIBLE_DEVICES set per rank:
/// cuda:0).
pub fn check_gpus(local_rank: usize, local_world_size: usize, visible: usize) -> Result<usize, String> {
    if visible == 0 {
        return Err(
            "no CUDA device is visible (torch.cuda.device_count() == 0: is the NVIDIA driver loaded, CUDA_VISIBLE_DEVICES empty?)".into()
        );
    }
    if visible >= local_world_size {
        return Ok(local_rank);
    }
    if visible == 1 {
        return Ok(0);
    }
    Err(format!(
        "{local_world_size} workers on this node but {visible} GPUs visible to each: use one GPU per local rank \
         (--nproc-per-node {visible}) or one visible GPU per task (CUDA_VISIBLE_DEVICES per rank, srun --gpus-per-task=1)"
    ))
}

/// `check_gpus`, logging which layout it chose.
fn gpu_for(local_rank: usize, local_world_size: usize, visible: usize) -> Result<Device, DeviceError> {
    let i = check_gpus(local_rank, local_world_size, visible).map_err(DeviceError)?;
    if visible >= local_world_size {
        tracing::info!("device: cuda:{i} (one GPU per local rank: {visible} visible, {local_world_size} local rank(s))");
    } else {
        tracing::info!("device: cuda:0 (one visible GPU per task: local rank {local_rank} of {local_world_size})");
    }
    Ok(Device::Cuda(i))
}

/// Resolves the configured device for this local rank. RINGTRAIN_CUDA_DEVICE=N puts every local
/// rank on cuda:N instead (several ranks sharing one GPU, for testing with the ring or MPI;
/// NCCL refuses that).
pub fn select(choice: DeviceChoice, local_rank: usize, local_world_size: usize) -> Result<Device, DeviceError> {
    if choice != DeviceChoice::Cpu {
        if let Ok(n) = std::env::var("RINGTRAIN_CUDA_DEVICE") {
            let n: usize = n.parse().map_err(|_| DeviceError(format!("RINGTRAIN_CUDA_DEVICE={n:?} is not a device index")))?;
            let visible = cuda_device_count()?;
            if n >= visible {
                return Err(DeviceError(format!("RINGTRAIN_CUDA_DEVICE={n} but {visible} GPU(s) visible")));
            }
            return Ok(Device::Cuda(n));
        }
    }
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => gpu_for(local_rank, local_world_size, cuda_device_count()?),
        DeviceChoice::Auto => match load_cuda() {
            Ok(()) => match cuda_device_count()? {
                0 => {
                    tracing::info!("device auto: no GPU visible, using the CPU");
                    Ok(Device::Cpu)
                }
                n => gpu_for(local_rank, local_world_size, n),
            },
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
    fn device_for_each_gpu_layout() {
        // (local_rank, local_world_size, visible) → cuda index, or words the error must hold.
        let ok: &[((usize, usize, usize), usize)] = &[
            ((1, 2, 2), 1), // one GPU per local rank
            ((0, 1, 8), 0),
            ((3, 4, 8), 3),
            ((0, 4, 1), 0), // one visible GPU per task (srun --gpus-per-task=1, a one-GPU pod)
            ((3, 4, 1), 0),
            ((0, 1, 1), 0),
        ];
        for &((r, n, v), want) in ok {
            assert_eq!(check_gpus(r, n, v), Ok(want), "local rank {r} of {n}, {v} visible");
        }
        let bad: &[((usize, usize, usize), &[&str])] = &[
            ((0, 4, 2), &["4 workers", "2 GPUs visible", "--nproc-per-node 2", "--gpus-per-task=1", "CUDA_VISIBLE_DEVICES"]),
            ((2, 3, 2), &["3 workers", "--nproc-per-node 2"]),
            ((0, 1, 0), &["no CUDA device"]),
            ((1, 2, 0), &["no CUDA device"]),
        ];
        for &((r, n, v), words) in bad {
            let e = check_gpus(r, n, v).unwrap_err();
            for w in words {
                assert!(e.contains(w), "local rank {r} of {n}, {v} visible: {e:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn device_lookup_before_load_is_reported() {
        assert_eq!(check_cuda_hooks(2, None), Ok(2));
        assert_eq!(check_cuda_hooks(2, Some(2)), Ok(2));
        assert_eq!(check_cuda_hooks(0, Some(0)), Ok(0));
        assert_eq!(check_cuda_hooks(0, None), Ok(0)); // no runtime to ask: no GPU either
        let e = check_cuda_hooks(0, Some(4)).unwrap_err();
        assert!(e.contains("runtime sees 4") && e.contains("before any tch call") && e.contains("load_cuda"), "{e}");
    }
}
