//! Mixed precision, as `torch.amp` does it: autocast regions with an explicit dtype on the CUDA
//! or the CPU device (`autocast`), and dynamic loss scaling for fp16 (`GradScaler`).
//!
//! Autocast goes through libtorch's device-aware API (the C++ shim beside this file), not tch's
//! `autocast`, which only ever enables CUDA at fp16 — so `bf16` really is bf16, on the CPU too,
//! where this machine's AMX makes a bf16 matmul several times an fp32 one.

mod scaler;

pub use scaler::{GradScaler, GradScalerConfig, ScalerState};

use serde::{Deserialize, Serialize};
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::{Device, Kind};

/// The dtype forward and backward compute in; parameters, gradients and optimizer state stay
/// fp32 (PyTorch's autocast recipe).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    Fp32,
    /// bf16 autocast: fp32's range, so no loss scaling.
    Bf16,
    /// fp16 autocast with dynamic loss scaling (`GradScaler`).
    Fp16,
}

impl Precision {
    /// The autocast dtype; `None` for fp32 (no autocast).
    pub fn autocast_kind(self) -> Option<Kind> {
        match self {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(Kind::BFloat16),
            Precision::Fp16 => Some(Kind::Half),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }
}

extern "C" {
    fn ringtrain_autocast_enter(
        device_type: c_int,
        enabled: c_int,
        dtype: c_int,
        prev_enabled: *mut c_int,
        prev_dtype: *mut c_int,
        prev_cache: *mut c_int,
    ) -> c_int;
    fn ringtrain_autocast_exit(device_type: c_int, prev_enabled: c_int, prev_dtype: c_int, prev_cache: c_int) -> c_int;
    fn ringtrain_autocast_state(device_type: c_int, enabled: *mut c_int, dtype: *mut c_int) -> c_int;
    fn ringtrain_amp_unscale(grads: *mut *mut c_void, n: c_int, found_inf: *mut c_void, inv_scale: *mut c_void) -> c_int;
    fn ringtrain_amp_last_error() -> *const c_char;
}

#[derive(Debug, thiserror::Error)]
#[error("autocast: {0}")]
pub struct AmpError(pub String);

fn last_error(what: &str) -> AmpError {
    // SAFETY: the shim returns a NUL-terminated string owned by this thread, valid until its next call.
    let msg = unsafe { CStr::from_ptr(ringtrain_amp_last_error()) }.to_string_lossy().into_owned();
    AmpError(format!("{what}: {msg}"))
}

/// c10::DeviceType of a tch device (autocast state is per device type, not per index).
fn device_type(device: Device) -> c_int {
    match device {
        Device::Cpu => 0,
        Device::Cuda(_) => 1,
        Device::Mps => 13,
        Device::Vulkan => 10,
    }
}

/// The calling thread's autocast state for `device`'s type: enabled, and the dtype it casts to.
pub fn autocast_state(device: Device) -> Result<(bool, Kind), AmpError> {
    let (mut enabled, mut dtype) = (0, 0);
    // SAFETY: valid out-pointers.
    if unsafe { ringtrain_autocast_state(device_type(device), &mut enabled, &mut dtype) } != 0 {
        return Err(last_error("reading the autocast state"));
    }
    Ok((enabled != 0, kind_of(dtype)?))
}

/// c10::ScalarType codes of the dtypes autocast can take (tch keeps its mapping private).
fn scalar_type(kind: Kind) -> Result<c_int, AmpError> {
    Ok(match kind {
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::BFloat16 => 15,
        other => return Err(AmpError(format!("{other:?} is not an autocast dtype"))),
    })
}

fn kind_of(scalar_type: c_int) -> Result<Kind, AmpError> {
    Ok(match scalar_type {
        5 => Kind::Half,
        6 => Kind::Float,
        15 => Kind::BFloat16,
        7 => Kind::Double,
        other => return Err(AmpError(format!("unexpected autocast dtype code {other}"))),
    })
}

/// An autocast region on the calling thread; the previous state comes back when it drops
/// (also on unwind). Regions nest as Python's `with torch.autocast(...)` do.
pub struct AutocastGuard {
    device_type: c_int,
    prev: (c_int, c_int, c_int),
    /// Autocast state is per thread: the guard must drop on the thread that entered (not Send).
    _thread: std::marker::PhantomData<*const ()>,
}

impl AutocastGuard {
    pub fn enter(device: Device, dtype: Kind) -> Result<AutocastGuard, AmpError> {
        Self::set(device, true, dtype)
    }

    /// A region with autocast off on `device` (`torch.autocast(device_type, enabled=False)`):
    /// an op that must run in the dtype of its inputs inside an autocast region.
    pub fn disabled(device: Device) -> Result<AutocastGuard, AmpError> {
        let (_, dtype) = autocast_state(device)?;
        Self::set(device, false, dtype)
    }

    /// A region in the given state (what `autocast_state` read earlier, e.g. to run a
    /// checkpointed forward again as it first ran).
    pub fn set(device: Device, enabled: bool, dtype: Kind) -> Result<AutocastGuard, AmpError> {
        let t = device_type(device);
        let code = scalar_type(dtype)?;
        let mut prev = (0, 0, 0);
        // SAFETY: valid out-pointers; the shim only touches libtorch's thread-local state.
        if unsafe { ringtrain_autocast_enter(t, c_int::from(enabled), code, &mut prev.0, &mut prev.1, &mut prev.2) } != 0 {
            let what = if enabled { "enabling" } else { "disabling" };
            return Err(last_error(&format!("{what} autocast ({dtype:?}) on {device:?}")));
        }
        Ok(AutocastGuard { device_type: t, prev, _thread: std::marker::PhantomData })
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: restores the values enter saved; cannot fail for a device type enter accepted.
        unsafe { ringtrain_autocast_exit(self.device_type, self.prev.0, self.prev.1, self.prev.2) };
    }
}

/// Runs `f` under autocast on `device` at `precision`'s dtype (`f` alone for fp32): what
/// `with torch.autocast(device.type, dtype=...)` does in PyTorch.
pub fn autocast<T>(device: Device, precision: Precision, f: impl FnOnce() -> T) -> Result<T, AmpError> {
    let _guard = match precision.autocast_kind() {
        Some(kind) => Some(AutocastGuard::enter(device, kind)?),
        None => None,
    };
    Ok(f())
}

/// Multiplies every gradient by `inv_scale` in place and sets `found_inf` (a one-element f32
/// tensor) to 1 if any gradient holds an inf or a NaN: libtorch's
/// `_amp_foreach_non_finite_check_and_unscale_`, what `GradScaler.unscale_` calls.
pub(crate) fn unscale_(grads: &[tch::Tensor], found_inf: &tch::Tensor, inv_scale: &tch::Tensor) -> Result<(), AmpError> {
    if grads.is_empty() {
        return Ok(());
    }
    let mut handles: Vec<tch::Tensor> = grads.iter().map(|g| g.shallow_clone()).collect();
    let mut ptrs: Vec<*mut c_void> = handles.iter_mut().map(|g| g.as_mut_ptr() as *mut c_void).collect();
    let (mut f, mut s) = (found_inf.shallow_clone(), inv_scale.shallow_clone());
    // SAFETY: every pointer is a live tch handle for the duration of the call.
    let code = unsafe {
        ringtrain_amp_unscale(ptrs.as_mut_ptr(), ptrs.len() as c_int, f.as_mut_ptr() as *mut c_void, s.as_mut_ptr() as *mut c_void)
    };
    if code != 0 {
        return Err(last_error("unscaling gradients"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn bf16_means_bf16_on_the_device_asked_for() {
        // tch::autocast(true) enabled CUDA at fp16: "bf16" was fp16, and the CPU never autocast.
        for (device, precision, kind) in [
            (Device::Cuda(0), Precision::Bf16, Kind::BFloat16),
            (Device::Cuda(0), Precision::Fp16, Kind::Half),
            (Device::Cpu, Precision::Bf16, Kind::BFloat16),
            (Device::Cpu, Precision::Fp16, Kind::Half),
        ] {
            let inside = autocast(device, precision, || autocast_state(device).unwrap()).unwrap();
            assert_eq!(inside, (true, kind), "{device:?} {precision:?}");
            assert!(!autocast_state(device).unwrap().0, "autocast left on after the region");
        }
        // fp32: no autocast at all.
        assert!(!autocast(Device::Cpu, Precision::Fp32, || autocast_state(Device::Cpu).unwrap().0).unwrap());
    }

    #[test]
    fn cpu_matmuls_run_in_the_autocast_dtype_and_regions_nest() {
        let a = Tensor::ones([4, 4], tch::kind::FLOAT_CPU);
        let out = autocast(Device::Cpu, Precision::Bf16, || {
            let inner = autocast(Device::Cpu, Precision::Fp16, || a.matmul(&a).kind()).unwrap();
            (a.matmul(&a).kind(), inner)
        })
        .unwrap();
        assert_eq!(out, (Kind::BFloat16, Kind::Half));
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
        // CPU autocast must not turn CUDA's on (the old wrapper's mistake, in reverse).
        assert!(!autocast(Device::Cpu, Precision::Bf16, || autocast_state(Device::Cuda(0)).unwrap().0).unwrap());
    }

    #[test]
    fn unscale_multiplies_and_flags_non_finite_values() {
        let g = Tensor::from_slice(&[2.0f32, 4.0]);
        let found = Tensor::zeros([1], tch::kind::FLOAT_CPU);
        let inv = Tensor::from_slice(&[0.5f32]);
        unscale_(&[g.shallow_clone()], &found, &inv).unwrap();
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![1.0, 2.0]);
        assert_eq!(found.double_value(&[0]), 0.0);
        let bad = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
        unscale_(&[g.shallow_clone(), bad], &found, &inv).unwrap();
        assert_eq!(found.double_value(&[0]), 1.0);
    }
}
