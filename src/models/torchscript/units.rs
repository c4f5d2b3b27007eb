//! Units inside a TorchScript module (`model.units`, the shim `units.cpp`): each named submodule's
//! call in the compiled forward is rewritten into the op `ringtrain::unit`, which lands here and
//! runs the submodule through `Units::run` — ZeRO-3's gathers around it, activation
//! checkpointing (its forward called again in backward) — as a built-in model's units run.
//!
//! The module's own parameters outside any unit are the root's: the whole forward runs as a root
//! segment, and after each unit the root is entered again (as GPT's `ln_f` and head follow its
//! blocks), so its parameters are whole wherever the compiled code reads them.

use crate::units::Units;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, Once};
use tch::{TchError, Tensor};

type UnitFn = extern "C" fn(i64, *const c_char, *mut c_void, *mut c_char, usize) -> *mut c_void;

extern "C" {
    fn ringtrain_ts_set_unit_fn(f: UnitFn);
    fn ringtrain_ts_add_unit(module: *mut c_void, hooks: i64, path: *const c_char, err: *mut c_char, len: usize) -> c_int;
    fn ringtrain_ts_call(module: *mut c_void, path: *const c_char, x: *mut c_void, err: *mut c_char, len: usize) -> *mut c_void;
}

/// A `torch::jit::Module*`, used only through the shim while its `TorchScript` lives.
#[derive(Clone, Copy)]
struct Module(*mut c_void);
// SAFETY: the module is only called into (forward) under libtorch's own synchronisation, from the
// thread running the model's forward or its backward's recomputation.
unsafe impl Send for Module {}

struct Registered {
    module: Module,
    units: Units,
}

static REGISTRY: Mutex<Option<HashMap<i64, Registered>>> = Mutex::new(None);
static NEXT: AtomicI64 = AtomicI64::new(1);
static INSTALL: Once = Once::new();

fn registry<R>(f: impl FnOnce(&mut HashMap<i64, Registered>) -> R) -> R {
    f(REGISTRY.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashMap::new))
}

/// A module's units, registered until dropped.
pub struct TsUnits {
    id: i64,
}

impl TsUnits {
    /// Rewrites `module`'s calls of each named submodule into units run by `units`.
    pub fn register(module: *mut c_void, names: &[String], units: Units) -> Result<TsUnits, String> {
        // A unit inside another would release the outer one's parameters while its code runs.
        for a in names {
            if let Some(b) = names.iter().find(|b| b.len() > a.len() && b.starts_with(a.as_str()) && b.as_bytes()[a.len()] == b'.') {
                return Err(format!("model.units: `{b}` lies inside `{a}`; units cannot nest"));
            }
            if names.iter().filter(|b| *b == a).count() > 1 {
                return Err(format!("model.units: `{a}` is listed twice"));
            }
        }
        // SAFETY: `run_unit` has the signature the shim calls.
        INSTALL.call_once(|| unsafe { ringtrain_ts_set_unit_fn(run_unit) });
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        registry(|r| r.insert(id, Registered { module: Module(module), units }));
        let registered = TsUnits { id };
        for name in names {
            let path = CString::new(name.as_str()).map_err(|_| format!("model.units: `{name}` holds a NUL byte"))?;
            let mut err = vec![0u8; 4096];
            // SAFETY: a live module, a NUL-terminated name, a buffer with its length.
            if unsafe { ringtrain_ts_add_unit(module, id, path.as_ptr(), err.as_mut_ptr().cast(), err.len()) } != 0 {
                return Err(text(&err));
            }
        }
        Ok(registered)
    }

    /// How the units run from now on.
    pub fn set(&self, units: Units) {
        registry(|r| {
            if let Some(e) = r.get_mut(&self.id) {
                e.units = units;
            }
        });
    }

    pub fn units(&self) -> Units {
        registry(|r| r.get(&self.id).map(|e| e.units.clone()).unwrap_or_default())
    }
}

impl Drop for TsUnits {
    fn drop(&mut self) {
        registry(|r| r.remove(&self.id));
    }
}

fn text(buf: &[u8]) -> String {
    CStr::from_bytes_until_nul(buf).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

fn put(err: *mut c_char, len: usize, msg: &str) {
    if err.is_null() || len == 0 {
        return;
    }
    let n = msg.len().min(len - 1);
    // SAFETY: the shim's buffer of `len` bytes; n + 1 ≤ len.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), err.cast::<u8>(), n);
        *err.add(n) = 0;
    }
}

/// The submodule's own forward, through the shim.
fn call(module: Module, path: &CString, x: &Tensor) -> Result<Tensor, TchError> {
    let mut x = x.shallow_clone();
    let mut err = vec![0u8; 4096];
    // SAFETY: a live module and tensor handle; the result is a new heap tensor we now own.
    let out = unsafe { ringtrain_ts_call(module.0, path.as_ptr(), x.as_mut_ptr().cast(), err.as_mut_ptr().cast(), err.len()) };
    if out.is_null() {
        return Err(TchError::Torch(text(&err)));
    }
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// `ringtrain::unit(hooks, name, x)`: unit `name` on `x`, then the root entered again.
extern "C" fn run_unit(id: i64, name: *const c_char, x: *mut c_void, err: *mut c_char, len: usize) -> *mut c_void {
    let result = std::panic::catch_unwind(|| -> Result<Tensor, String> {
        // SAFETY: the op's arguments: a NUL-terminated name and a live tensor handle.
        let (name, x) = unsafe { (CStr::from_ptr(name).to_string_lossy().into_owned(), Tensor::clone_from_ptr(x.cast())) };
        // Not held while the unit runs: a unit's forward may hold units of its own.
        let (module, units) =
            registry(|r| r.get(&id).map(|e| (e.module, e.units.clone()))).ok_or_else(|| format!("the module of unit {name} is gone"))?;
        let path = CString::new(name.as_str()).map_err(|e| e.to_string())?;
        let y = units.run(&name, &x, Box::new(move |x: &Tensor| call(module, &path, x))).map_err(|e| e.to_string())?;
        units.enter_root().map_err(|e| e.to_string())?;
        Ok(y)
    });
    match result {
        Ok(Ok(y)) => {
            let ptr = y.as_ptr() as *mut c_void;
            // Ownership of the heap tensor passes to the shim, which deletes it.
            std::mem::forget(y);
            ptr
        }
        Ok(Err(msg)) => {
            put(err, len, &msg);
            std::ptr::null_mut()
        }
        Err(_) => {
            put(err, len, "panicked");
            std::ptr::null_mut()
        }
    }
}
