// torch-sys's rpath flag does not reach our binaries; embed libtorch's lib folder so they run
// without LD_LIBRARY_PATH (which still overrides it when set, e.g. on another machine).
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    ready_hook_shim();
    #[cfg(feature = "mpi")]
    mpi_shim();
}

/// Compiles the C++ shims (the gradient-ready hook, freeing storage, TorchScript modules) against the libtorch headers torch-sys uses.
fn ready_hook_shim() {
    println!("cargo:rerun-if-changed=src/ddp/hooks/ready_hook.cpp");
    println!("cargo:rerun-if-changed=src/ddp/storage.cpp");
    println!("cargo:rerun-if-changed=src/models/torchscript/module.cpp");
    println!("cargo:rerun-if-changed=src/models/torchscript/units.cpp");
    println!("cargo:rerun-if-changed=src/amp/autocast.cpp");
    println!("cargo:rerun-if-changed=src/comm/blob.cpp");
    println!("cargo:rerun-if-changed=src/autograd/function.cpp");
    println!("cargo:rerun-if-changed=src/host_memory.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    // LIBTORCH (this repo's .cargo/config.toml sets it), else the libtorch torch-sys found (a
    // crate depending on ringtrain: torch-sys exports its lib folder; the headers sit beside it).
    let libtorch = match std::env::var("LIBTORCH") {
        Ok(p) if std::path::Path::new(&p).is_relative() => std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join(p),
        Ok(p) => std::path::PathBuf::from(p),
        Err(_) => match std::env::var("DEP_TCH_LIBTORCH_LIB") {
            Ok(lib) => std::path::PathBuf::from(lib).join(".."),
            Err(_) => panic!("neither LIBTORCH nor torch-sys's libtorch location is known: set LIBTORCH as for tch"),
        },
    };
    cc::Build::new()
        .cpp(true)
        .file("src/ddp/hooks/ready_hook.cpp")
        .file("src/ddp/storage.cpp")
        // TorchScript models belong to the trainer (`models`); the DDP core alone does not build them.
        .files(cfg!(feature = "trainer").then_some("src/models/torchscript/module.cpp"))
        .files(cfg!(feature = "trainer").then_some("src/models/torchscript/units.cpp"))
        .file("src/amp/autocast.cpp")
        .file("src/comm/blob.cpp")
        .file("src/autograd/function.cpp")
        .file("src/host_memory.cpp")
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-w")
        .opt_level(2)
        .compile("ringtrain_ready_hook");
}

/// Compiles src/comm/mpi/in_place.c against the MPI that rsmpi links.
#[cfg(feature = "mpi")]
fn mpi_shim() {
    println!("cargo:rerun-if-changed=src/comm/mpi/in_place.c");
    let lib = match build_probe_mpi::probe() {
        Ok(lib) => lib,
        Err(errs) => panic!(
            "the `mpi` feature needs an MPI installation (Debian: apt-get install libopenmpi-dev openmpi-bin, \
             or run scripts/setup.sh); build without it: cargo build --no-default-features --features trainer. Probe errors: {errs:?}"
        ),
    };
    let mut build = cc::Build::new();
    build.file("src/comm/mpi/in_place.c");
    for inc in &lib.include_paths {
        build.include(inc);
    }
    build.compile("ringtrain_mpi_shim");
}
