//! `default-features = false` is the DDP core alone: it builds, and without the trainer's or MPI's
//! dependencies (YAML, image decoding, plotting, the progress bar, clap, MPI).
//!
//! The build shares the test run's build directory: cargo holds no lock on it while tests run,
//! and a build with other features keeps its artifacts beside the default ones (their hashes
//! differ), so tch and libtorch's bindings are reused and only ringtrain and a few small crates
//! are compiled again.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `cargo ARGS --manifest-path <this package>`, run from the package root (so .cargo/config.toml's
/// LIBTORCH applies as to any build here).
fn cargo(args: &[&str]) -> Output {
    let manifest = Path::new(ROOT).join("Cargo.toml");
    let out =
        Command::new(env!("CARGO")).args(args).arg("--manifest-path").arg(&manifest).current_dir(ROOT).output().expect("running cargo");
    assert!(
        out.status.success(),
        "cargo {} failed ({:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Dependencies of the trainer and of MPI, none of which the core may pull in (flate2, the
/// trainer's too, is not here: tch brings it for its zip files).
const NOT_IN_CORE: &[&str] = &[
    "serde_yaml",
    "serde_path_to_error",
    "plotters",
    "image",
    "fast_image_resize",
    "indicatif",
    "clap",
    "memmap2",
    "signal-hook",
    "mpi",
    "build-probe-mpi",
];

#[test]
fn the_core_depends_on_no_trainer_or_mpi_crate() {
    let out = cargo(&["tree", "--offline", "--no-default-features", "--edges", "normal,build", "--prefix", "none", "--format", "{p}"]);
    let text = String::from_utf8_lossy(&out.stdout);
    // `name vX.Y.Z (…)` per line.
    let names: BTreeSet<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(names.contains("tch") && names.contains("ringtrain"), "unexpected `cargo tree` output:\n{text}");
    let found: Vec<&str> = NOT_IN_CORE.iter().copied().filter(|n| names.contains(n)).collect();
    assert!(found.is_empty(), "the core (default-features = false) depends on {found:?}:\n{text}");
    // The default build still has them all (the features switch them, not their removal).
    let out = cargo(&["tree", "--offline", "--edges", "normal,build", "--prefix", "none", "--format", "{p}"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let names: BTreeSet<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
    let missing: Vec<&str> = NOT_IN_CORE.iter().copied().filter(|n| !names.contains(n)).collect();
    assert!(missing.is_empty(), "the default build lacks {missing:?}:\n{text}");
}

#[test]
fn the_core_builds_without_default_features() {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| Path::new(ROOT).join("target"));
    // The library, and the README's example, which needs nothing else.
    cargo(&[
        "build",
        "--release",
        "--no-default-features",
        "--lib",
        "--example",
        "ddp_minimal",
        "--target-dir",
        target.to_str().expect("a UTF-8 path"),
    ]);
    assert!(target.join("release/examples/ddp_minimal").exists(), "no ddp_minimal in {}", target.display());
}
