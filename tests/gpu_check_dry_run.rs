//! `scripts/gpu_check.sh --dry-run`: the GPU check's every part on the CPU (the ring where NCCL
//! would run, a tenth of the steps), from the folder `scripts/gpu_pack.sh` makes, so a broken
//! script, a missing file in the pack or a reference that no longer runs shows here, not on the
//! few minutes of a lent GPU.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[test]
fn the_gpu_check_runs_every_part_on_the_cpu() {
    let Some(py) = python_with_torch("the_gpu_check_runs_every_part_on_the_cpu") else { return };
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("pack");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bins = Path::new(env!("CARGO_BIN_EXE_ringtrain")).parent().unwrap();
    let mut c = Command::new(root.join("scripts/gpu_pack.sh"));
    c.arg(&pack).env("RINGTRAIN_BIN_DIR", bins);
    run(c, Duration::from_secs(120)).assert_success();

    // The GPU machine's Python may have no safetensors package: hide this one's.
    let shim = dir.path().join("no-safetensors/safetensors");
    std::fs::create_dir_all(&shim).unwrap();
    std::fs::write(shim.join("__init__.py"), "raise ImportError('no safetensors here: the GPU check must not need it')\n").unwrap();
    let mut c = Command::new(pack.join("gpu_check.sh"));
    c.arg("--dry-run").env("RINGTRAIN_PYTHON", &py).env("PYTHONPATH", shim.parent().unwrap());
    let out = run(c, Duration::from_secs(900));
    out.assert_success();
    let rows: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("| (")).collect();
    assert_eq!(rows.len(), 16, "one row per part (a)–(p):\n{}", out.report());
    assert!(rows.iter().all(|r| r.contains("| PASS")), "{}", rows.join("\n"));
    // The parts compare what they should: overlap in the trace, the autocast dtype read back,
    // GradScaler's scales.
    assert!(rows[0].contains("buckets issued during backward in"), "{}", rows[0]);
    assert!(rows[2].contains("dtype BFloat16"), "{}", rows[2]);
    assert!(rows[3].contains("dtype Half") && rows[3].contains("scales equal: True"), "{}", rows[3]);
    // On the CPU the sharded runs are DDP's bits.
    assert!(rows[14].contains("ZeRO-2 equal, ZeRO-3 equal") && rows[14].contains("2 workers ZeRO-3 equal"), "{}", rows[14]);
    // ZeRO-3 held no gathered copy between steps (on a GPU: its storage freed).
    assert!(rows[14].contains("MiB held between steps"), "{}", rows[14]);
    // The detector ran, evaluated and drew its predictions; 2 workers stayed identical.
    assert!(rows[15].contains("predictions.png; 2 workers identical"), "{}", rows[15]);
}
