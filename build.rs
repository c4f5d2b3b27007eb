// torch-sys's rpath flag does not reach our binaries; embed libtorch's lib folder so they run
// without LD_LIBRARY_PATH (which still overrides it when set, e.g. on another machine).
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
