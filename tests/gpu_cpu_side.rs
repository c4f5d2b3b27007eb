//! The GPU paths that can run without a GPU: device selection and its errors, and the clear
//! errors when CUDA or NCCL is asked for on a machine without them. On a machine with GPUs the
//! children run with `CUDA_VISIBLE_DEVICES=` (none visible), so every test runs everywhere instead
//! of returning early. (The GPU itself is exercised by scripts/gpu_check.sh on a GPU machine.)

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

fn solo(dir: &std::path::Path, sets: &[&str]) -> Output {
    let cfg = write_config(dir, "job.yaml", &mlp_config(10, ""));
    let mut c = Command::new(RINGTRAIN);
    c.env("CUDA_VISIBLE_DEVICES", "");
    c.arg("--config").arg(&cfg).arg("--run-dir").arg(dir.join("run"));
    for s in sets {
        c.args(["--set", s]);
    }
    run(c, Duration::from_secs(60))
}

/// Without a driver libtorch's CUDA backend does not load; with one and no GPU visible it loads
/// and counts none. Either way one line says why.
const NO_CUDA: [&str; 2] = ["libtorch's CUDA backend could not be loaded", "no CUDA device is visible"];

#[test]
fn cuda_without_a_gpu_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = solo(dir.path(), &["device=cuda"]);
    out.assert_failure();
    // Progress logs may come first; the error is one line, last, and no panic.
    let err = out.stderr.trim().lines().last().unwrap_or_default();
    assert!(err.starts_with("ringtrain: error: device: ") && NO_CUDA.iter().any(|n| err.contains(n)), "{}", out.report());
    assert!(!out.stderr.contains("panicked"), "{}", out.report());
    assert!(!dir.path().join("run/model.safetensors").exists());
}

#[test]
fn auto_device_falls_back_to_the_cpu_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let out = solo(dir.path(), &["device=auto", "train.max_steps=3"]);
    out.assert_success();
    let fell_back = out.stderr.contains("device auto: using the CPU") || out.stderr.contains("device auto: no GPU visible, using the CPU");
    assert!(fell_back && out.stderr.contains("device Cpu"), "{}", out.report());
}

#[test]
fn nccl_needs_a_cuda_device_sharding_needs_fp32_gradients_and_the_scaler_sane_factors() {
    let dir = tempfile::tempdir().unwrap();
    for (set, needle) in [
        ("comm.backend=nccl", "comm.backend nccl needs device cuda"),
        ("ddp.reduce_dtype=bf16", "use ddp.reduce_dtype fp32 with it"),
        ("train.grad_scaler.growth_factor=0.5", "train.grad_scaler.growth_factor must be greater than 1, got 0.5"),
    ] {
        let sets: Vec<&str> = if set.starts_with("ddp") { vec![set, "optimizer.shard=true"] } else { vec![set] };
        let out = solo(dir.path(), &sets);
        out.assert_failure();
        assert!(out.stderr.contains(needle), "{set}\n{}", out.report());
    }
}

/// Autocast is not a CUDA feature: bf16 runs on the CPU too (and trains in bf16, which
/// amp's unit tests check op by op).
#[test]
fn bf16_trains_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let out = solo(dir.path(), &["train.precision=bf16", "train.max_steps=20"]);
    out.assert_success();
    assert!(out.stdout.contains("final: test_acc"), "{}", out.report());
}

#[test]
fn nccl_benchmark_without_cuda_fails_clearly() {
    let out = run(
        {
            let mut c = Command::new(env!("CARGO_BIN_EXE_ringbench"));
            c.args(["allreduce", "--backend", "nccl", "--device", "cuda", "--sizes", "1M"]).env("CUDA_VISIBLE_DEVICES", "");
            c
        },
        Duration::from_secs(60),
    );
    out.assert_failure();
    assert!(out.stderr.contains("ringbench: error: device: ") && NO_CUDA.iter().any(|n| out.stderr.contains(n)), "{}", out.report());
}
