// torch-sys's rpath flag does not reach our binaries; embed libtorch's lib folder so they run
// without LD_LIBRARY_PATH (which still overrides it when set, e.g. on another machine).
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    #[cfg(feature = "mpi")]
    mpi_shim();
}

/// Compiles src/comm/mpi/in_place.c against the MPI that rsmpi links.
#[cfg(feature = "mpi")]
fn mpi_shim() {
    println!("cargo:rerun-if-changed=src/comm/mpi/in_place.c");
    let lib = match build_probe_mpi::probe() {
        Ok(lib) => lib,
        Err(errs) => panic!(
            "the `mpi` feature needs an MPI installation (Debian: apt-get install libopenmpi-dev openmpi-bin, \
             or run scripts/setup.sh); build without it: cargo build --no-default-features. Probe errors: {errs:?}"
        ),
    };
    let mut build = cc::Build::new();
    build.file("src/comm/mpi/in_place.c");
    for inc in &lib.include_paths {
        build.include(inc);
    }
    build.compile("ringtrain_mpi_shim");
}
