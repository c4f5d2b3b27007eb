//! The peak FLOP/s that MFU divides by: `train.peak_tflops` when given, else measured at start
//! with a short square matmul in the dtype the precision in use computes in. A constant measured
//! on another machine says little (this CPU runs bf16 matmuls ~3.7× faster than fp32 per core,
//! with AMX), so the log says which figure it is and where it came from.

use crate::amp::Precision;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// A rank's peak, in FLOP/s, and how it was found (for the log).
#[derive(Clone, Debug)]
pub struct Peak {
    pub flops: f64,
    pub source: String,
}

/// The dtype autocast runs matmuls in under `precision`.
fn matmul_kind(precision: Precision) -> Kind {
    match precision {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
        Precision::Fp16 => Kind::Half,
    }
}

/// `configured` (TFLOP/s per rank) if given, else a measurement on `device`.
pub fn peak(configured: Option<f64>, device: Device, precision: Precision) -> Result<Peak, tch::TchError> {
    if let Some(t) = configured {
        return Ok(Peak { flops: t * 1e12, source: "train.peak_tflops".into() });
    }
    let (n, budget) = if device.is_cuda() { (4096, Duration::from_millis(200)) } else { (512, Duration::from_millis(150)) };
    let flops = measure(device, matmul_kind(precision), n, budget)?;
    let threads = if device.is_cuda() { String::new() } else { format!(", {} thread(s)", tch::get_num_threads()) };
    Ok(Peak { flops, source: format!("measured: {n}×{n} {precision:?} matmul on {device:?}{threads}") })
}

/// FLOP/s of repeated `n`×`n` matmuls in `kind`, timed for about `budget` after one warm-up.
fn measure(device: Device, kind: Kind, n: i64, budget: Duration) -> Result<f64, tch::TchError> {
    tch::no_grad(|| {
        let a = Tensor::f_randn([n, n], (Kind::Float, device))?.f_to_kind(kind)?;
        let b = Tensor::f_randn([n, n], (Kind::Float, device))?.f_to_kind(kind)?;
        let sync = || {
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
        };
        let _ = a.f_matmul(&b)?;
        sync();
        let start = Instant::now();
        let mut iters = 0u32;
        while start.elapsed() < budget || iters < 3 {
            let _ = a.f_matmul(&b)?;
            iters += 1;
            if iters % 8 == 0 {
                sync();
            }
        }
        sync();
        Ok(2.0 * (n as f64).powi(3) * iters as f64 / start.elapsed().as_secs_f64())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_wins_and_measurement_is_plausible() {
        let p = peak(Some(2.5), Device::Cpu, Precision::Bf16).unwrap();
        assert_eq!((p.flops, p.source.as_str()), (2.5e12, "train.peak_tflops"));
        let m = peak(None, Device::Cpu, Precision::Fp32).unwrap();
        // Anything from a slow emulator to a large server: 1 GFLOP/s .. 100 TFLOP/s.
        assert!(m.flops > 1e9 && m.flops < 1e14, "{m:?}");
        assert!(m.source.contains("512×512 Fp32 matmul on Cpu"), "{m:?}");
    }
}
