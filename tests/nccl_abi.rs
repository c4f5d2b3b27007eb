//! The NCCL and CUDA runtime functions ringtrain binds by hand, checked on the CPU against the
//! headers of the NVIDIA wheels the test venv has (nvidia-nccl, the CUDA runtime): each bound
//! function's Rust-side type, spelled in C, must be the type of the header's declaration, every
//! constant ringtrain passes must have the header's value, and every handle and enum the layout
//! the header gives it. A mistake there would otherwise show only on a GPU, as a crash or a wrong
//! sum. Then the wheel's libnccl is loaded and asked for its version.
//!
//! Skipped (failing under RINGTRAIN_NO_SKIP=1) where there is no such venv or no C compiler.

mod common;

use ringtrain::comm::nccl::abi::{self, Binding};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The wheels' folders: nccl.h, cuda_runtime_api.h, libnccl.so.2.
struct Wheels {
    nccl_include: PathBuf,
    cuda_include: PathBuf,
    nccl_lib: PathBuf,
}

/// The venv's `nvidia` package folder, holding `nccl/` and the CUDA runtime (`cu13/` since CUDA
/// 13's wheels, `cuda_runtime/` before).
fn wheels(test: &str) -> Option<Wheels> {
    let python = common::python_with_torch(test)?;
    let out = Command::new(&python).args(["-c", "import nvidia; print(list(nvidia.__path__)[0])"]).output().ok()?;
    let nvidia = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let nccl_include = nvidia.join("nccl/include");
    let cuda_include =
        ["cu13/include", "cuda_runtime/include"].iter().map(|d| nvidia.join(d)).find(|d| d.join("cuda_runtime_api.h").exists());
    let nccl_lib = nvidia.join("nccl/lib/libnccl.so.2");
    match cuda_include {
        Some(cuda_include) if nccl_include.join("nccl.h").exists() && nccl_lib.exists() => {
            Some(Wheels { nccl_include, cuda_include, nccl_lib })
        }
        _ => {
            let why =
                format!("no nccl.h, libnccl.so.2 and cuda_runtime_api.h under {} (the NVIDIA wheels torch installs)", nvidia.display());
            common::skip(test, &why);
            None
        }
    }
}

fn have_cc(test: &str) -> bool {
    let ok = Command::new("cc").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        common::skip(test, "no C compiler (cc)");
    }
    ok
}

/// The C the check compiles: a typedef of each binding's Rust-side type and a static assertion
/// that the header's declaration has that type; one per constant's value and per type's layout.
fn check_source(bindings: &[Binding], constants: &[(&str, i64)], layouts: &[(&str, usize, usize)]) -> String {
    let mut c = String::from("#include <nccl.h>\n#include <cuda_runtime_api.h>\n\n");
    for b in bindings {
        let typedef = b.c_type.replacen("(*)", &format!("(*ringtrain_{})", b.symbol), 1);
        c += &format!(
            "typedef {typedef};\n_Static_assert(__builtin_types_compatible_p(__typeof__(&{s}), ringtrain_{s}), \
             \"{s}: ringtrain binds it as {t}\");\n",
            s = b.symbol,
            t = b.c_type
        );
    }
    for (name, value) in constants {
        c += &format!("_Static_assert({name} == {value}, \"{name}: ringtrain uses {value}\");\n");
    }
    for (name, size, align) in layouts {
        c += &format!(
            "_Static_assert(sizeof({name}) == {size} && _Alignof({name}) == {align}, \
             \"{name}: ringtrain lays it out as {size} bytes aligned to {align}\");\n"
        );
    }
    c
}

/// Compiles `source` against the wheels' headers; the compiler's messages on failure.
///
/// The wheels carry the runtime API headers but not nvcc's `crt/` folder, and nccl.h includes
/// `cuda_runtime.h`, `cuda_fp16.h` and `cuda_bf16.h`, which need it (and lean on C++). Stand-ins
/// that come first on the include path keep only what nccl.h uses from them — cudaStream_t, from
/// cuda_runtime_api.h — and empty attribute macros for `crt/host_defines.h`: nothing that
/// changes a type the check compares.
fn compile(source: &str, w: &Wheels) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let shims = dir.path().join("shims");
    std::fs::create_dir_all(shims.join("crt")).unwrap();
    std::fs::write(shims.join("cuda_runtime.h"), "#include <cuda_runtime_api.h>\n").unwrap();
    std::fs::write(shims.join("cuda_fp16.h"), "").unwrap();
    std::fs::write(shims.join("cuda_bf16.h"), "").unwrap();
    if !w.cuda_include.join("crt/host_defines.h").exists() {
        let empty = [
            "__host__",
            "__device__",
            "__cudart_builtin__",
            "__device_builtin__",
            "__device_builtin_surface_type__",
            "__device_builtin_texture_type__",
            "CUDARTAPI",
            "CUDARTAPI_CDECL",
            "CUDART_CB",
            "__dv(v)",
        ];
        let defines = empty.map(|m| format!("#define {m}\n")).concat()
            + "#define __align__(n) __attribute__((aligned(n)))\n#define __builtin_align__(n) __align__(n)\n";
        std::fs::write(shims.join("crt/host_defines.h"), defines).unwrap();
    }
    let file = dir.path().join("abi_check.c");
    std::fs::write(&file, source).unwrap();
    let out = Command::new("cc")
        .args(["-std=gnu11", "-fsyntax-only"])
        .arg("-I")
        .arg(&shims)
        .arg("-I")
        .arg(&w.nccl_include)
        .arg("-I")
        .arg(&w.cuda_include)
        .arg(&file)
        .output()
        .expect("running cc");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn bound_functions_constants_and_layouts_match_the_headers() {
    let test = "bound_functions_constants_and_layouts_match_the_headers";
    let Some(w) = wheels(test) else { return };
    if !have_cc(test) {
        return;
    }
    let (bindings, constants, layouts) = (abi::bindings(), abi::constants(), abi::type_layouts());
    for name in ["ncclAllReduce", "ncclCommAbort", "ncclCommGetAsyncError", "cudaStreamWaitEvent", "cudaEventQuery"] {
        assert!(bindings.iter().any(|b| b.symbol == name), "{name} is not in the checked table");
    }
    if let Err(e) = compile(&check_source(&bindings, &constants, &layouts), &w) {
        panic!(
            "ringtrain's NCCL/CUDA bindings differ from the headers in {} / {}:\n{e}",
            w.nccl_include.display(),
            w.cuda_include.display()
        );
    }
    eprintln!("checked {} functions, {} constants, {} types against the headers", bindings.len(), constants.len(), layouts.len());
}

/// The check can fail: one wrong value, argument type or layout in the tables, and the compile
/// fails naming it.
#[test]
fn a_wrong_entry_fails_the_check_naming_it() {
    let test = "a_wrong_entry_fails_the_check_naming_it";
    let Some(w) = wheels(test) else { return };
    if !have_cc(test) {
        return;
    }
    let (bindings, constants, layouts) = (abi::bindings(), abi::constants(), abi::type_layouts());

    let wrong_value: Vec<_> = constants.iter().map(|&(n, v)| (n, if n == "ncclFloat32" { 8 } else { v })).collect();
    let e = compile(&check_source(&bindings, &wrong_value, &layouts), &w).expect_err("ncclFloat32 = 8 compiled");
    assert!(e.contains("ncclFloat32: ringtrain uses 8"), "{e}");

    // size_t → int: the count narrowed, as a hand binding might get it wrong.
    let wrong_type: Vec<_> = bindings
        .iter()
        .map(|b| Binding {
            c_type: if b.symbol == "ncclAllReduce" { b.c_type.replace("size_t", "int") } else { b.c_type.clone() },
            ..b.clone()
        })
        .collect();
    let e = compile(&check_source(&wrong_type, &constants, &layouts), &w).expect_err("ncclAllReduce with an int count compiled");
    assert!(e.contains("ncclAllReduce: ringtrain binds it as"), "{e}");

    // An enum argument passed as a plain int is a different type too.
    let wrong_enum: Vec<_> = bindings
        .iter()
        .map(|b| Binding {
            c_type: if b.symbol == "ncclCommAbort" { "ncclResult_t (*)(void *)".into() } else { b.c_type.clone() },
            ..b.clone()
        })
        .collect();
    let e = compile(&check_source(&wrong_enum, &constants, &layouts), &w).expect_err("ncclCommAbort(void *) compiled");
    assert!(e.contains("ncclCommAbort: ringtrain binds it as"), "{e}");

    let wrong_layout: Vec<_> = layouts.iter().map(|&(n, s, a)| (n, if n == "ncclUniqueId" { 64 } else { s }, a)).collect();
    let e = compile(&check_source(&bindings, &constants, &wrong_layout), &w).expect_err("a 64-byte ncclUniqueId compiled");
    assert!(e.contains("ncclUniqueId: ringtrain lays it out as 64 bytes"), "{e}");
}

/// The header's NCCL_VERSION_CODE.
fn header_version(include: &Path) -> Option<i32> {
    let h = std::fs::read_to_string(include.join("nccl.h")).ok()?;
    h.lines().find_map(|l| l.strip_prefix("#define NCCL_VERSION_CODE")).and_then(|v| v.trim().parse().ok())
}

/// The wheel's libnccl loads without a GPU, has every symbol ringtrain binds, and reports the
/// version of the header the check compiled against.
#[test]
fn wheel_libnccl_loads_and_reports_its_version() {
    let Some(w) = wheels("wheel_libnccl_loads_and_reports_its_version") else { return };
    // SAFETY: loading NCCL runs its initialisers, which are safe to run.
    let lib = match unsafe { libloading::Library::new(&w.nccl_lib) } {
        Ok(lib) => lib,
        // NCCL opens libcuda itself at communicator setup; a build that links it could not load here.
        Err(e) if e.to_string().contains("libcuda.so") => {
            eprintln!("libnccl needs the NVIDIA driver to load here ({e}); version not checked");
            return;
        }
        Err(e) => panic!("loading {}: {e}", w.nccl_lib.display()),
    };
    for b in abi::bindings().iter().filter(|b| b.library == "libnccl") {
        // SAFETY: only the address is looked up.
        let found = unsafe { lib.get::<*const ()>(format!("{}\0", b.symbol).as_bytes()) };
        assert!(found.is_ok(), "{} not exported by {}", b.symbol, w.nccl_lib.display());
    }
    let mut version = 0;
    // SAFETY: ncclGetVersion(int *) (its type is checked against nccl.h above); needs no GPU.
    let code = unsafe {
        let get: libloading::Symbol<unsafe extern "C" fn(*mut i32) -> i32> = lib.get(b"ncclGetVersion\0").unwrap();
        get(&mut version)
    };
    assert_eq!(code, 0, "ncclGetVersion failed");
    eprintln!("NCCL {version} ({}.{}.{}) from {}", version / 10000, version / 100 % 100, version % 100, w.nccl_lib.display());
    assert_eq!(Some(version), header_version(&w.nccl_include), "libnccl and nccl.h of the wheel disagree");
}
