//! An autograd function written in Rust: a forward and a backward on one tensor, recorded in
//! libtorch's graph by the C++ shim beside this file (tch has no custom autograd function).
//! libtorch runs the forward with gradient recording off and calls the backward from its engine
//! (the thread that called `backward`, or the device's engine thread on CUDA).

use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::{TchError, Tensor};

/// One differentiable operation on one tensor. `Send + Sync`: libtorch may run the backward on
/// another thread than the forward, and frees the node wherever the graph is dropped.
pub trait Differentiable: Send + Sync {
    /// The output, computed with gradient recording off. To keep the output for backward,
    /// keep `output.detach()`, never the output's own handle: libtorch makes this operation's
    /// node the output's grad_fn, and the node owns this state, so holding the output would be a
    /// reference cycle that keeps every step's graph alive.
    fn forward(&self, input: &Tensor) -> Result<Tensor, String>;
    /// The gradient of the input from the gradient of the output.
    fn backward(&self, grad_output: &Tensor) -> Result<Tensor, String>;
}

type ApplyFn = extern "C" fn(*mut c_void, *mut c_void, *mut c_char, usize) -> *mut c_void;

extern "C" {
    fn ringtrain_apply_function(
        input: *mut c_void,
        state: *mut c_void,
        fwd: ApplyFn,
        bwd: ApplyFn,
        drop: extern "C" fn(*mut c_void),
        out: *mut *mut c_void,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

type State = Box<dyn Differentiable>;

/// `op.forward(input)`, recorded so that backward through the output calls `op.backward`.
pub fn apply(input: &Tensor, op: Box<dyn Differentiable>) -> Result<Tensor, TchError> {
    let state: *mut State = Box::into_raw(Box::new(op));
    let mut input = input.shallow_clone();
    let mut out: *mut c_void = std::ptr::null_mut();
    let mut err = [0 as c_char; 2048];
    // SAFETY: `input` is a live tch handle (an at::Tensor*); the shim takes ownership of `state`
    // (dropping it through `drop_state` exactly once) and writes a new handle to `out` on success.
    let rc = unsafe {
        ringtrain_apply_function(
            input.as_mut_ptr() as *mut c_void,
            state as *mut c_void,
            call_forward,
            call_backward,
            drop_state,
            &mut out,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 || out.is_null() {
        // SAFETY: the shim wrote a NUL-terminated message into `err`.
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        return Err(TchError::Torch(msg));
    }
    // SAFETY: a heap at::Tensor* the shim allocated for us, as tch's own calls return them.
    Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
}

extern "C" fn call_forward(state: *mut c_void, tensor: *mut c_void, err: *mut c_char, errlen: usize) -> *mut c_void {
    call(state, tensor, err, errlen, |op, t| op.forward(t))
}

extern "C" fn call_backward(state: *mut c_void, tensor: *mut c_void, err: *mut c_char, errlen: usize) -> *mut c_void {
    call(state, tensor, err, errlen, |op, t| op.backward(t))
}

/// Runs `f` on the state and the tensor (whose handle this side now owns); a failure or a panic
/// becomes the message in `err` (no unwinding into C++).
fn call(
    state: *mut c_void,
    tensor: *mut c_void,
    err: *mut c_char,
    errlen: usize,
    f: impl FnOnce(&dyn Differentiable, &Tensor) -> Result<Tensor, String>,
) -> *mut c_void {
    // SAFETY: `tensor` is a new heap at::Tensor* the shim made for this call; `state` is the box
    // `apply` leaked, alive until `drop_state`.
    let (op, input) = unsafe { (&**(state as *const State), Tensor::from_ptr(tensor as *mut torch_sys::C_tensor)) };
    let result = match catch_unwind(AssertUnwindSafe(|| f(op, &input))) {
        Ok(r) => r,
        Err(p) => Err(format!(
            "panicked: {}",
            p.downcast_ref::<String>().map(String::as_str).or(p.downcast_ref::<&str>().copied()).unwrap_or("?")
        )),
    };
    match result {
        Ok(mut out) => {
            let ptr = out.as_mut_ptr() as *mut c_void;
            // The shim takes this handle over and deletes it.
            std::mem::forget(out);
            ptr
        }
        Err(msg) => {
            let bytes = msg.as_bytes();
            let n = bytes.len().min(errlen.saturating_sub(1));
            // SAFETY: `err` holds `errlen` bytes; we write n < errlen of them and a NUL.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr() as *const c_char, err, n);
                *err.add(n) = 0;
            }
            std::ptr::null_mut()
        }
    }
}

extern "C" fn drop_state(state: *mut c_void) {
    // SAFETY: the pointer `apply` leaked; the shim calls this once.
    drop(unsafe { Box::from_raw(state as *mut State) });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tch::Kind;

    /// y = 3x, with a backward that counts its calls and scales by 3.
    struct Triple(Arc<AtomicUsize>, Arc<AtomicUsize>);
    impl Differentiable for Triple {
        fn forward(&self, x: &Tensor) -> Result<Tensor, String> {
            Ok(x * 3.0)
        }
        fn backward(&self, g: &Tensor) -> Result<Tensor, String> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(g * 3.0)
        }
    }
    impl Drop for Triple {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Fails;
    impl Differentiable for Fails {
        fn forward(&self, x: &Tensor) -> Result<Tensor, String> {
            Ok(x.copy())
        }
        fn backward(&self, _: &Tensor) -> Result<Tensor, String> {
            Err("rank 1 closed its connection".into())
        }
    }

    #[test]
    fn a_rust_function_takes_part_in_backward_and_is_dropped_with_its_graph() {
        let (calls, drops) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let x = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let y = apply(&x, Box::new(Triple(calls.clone(), drops.clone()))).unwrap();
        assert_eq!(Vec::<f32>::try_from(&y).unwrap(), vec![3.0, 6.0]);
        assert!(y.requires_grad());
        (&y * &y).sum(Kind::Float).backward();
        // d/dx (3x)^2 = 18x
        assert_eq!(Vec::<f32>::try_from(&x.grad()).unwrap(), vec![18.0, 36.0]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        drop(y);
        assert_eq!(drops.load(Ordering::SeqCst), 1, "the state is dropped once the graph is freed");
    }

    #[test]
    fn a_failing_backward_is_an_error_of_backward_with_its_message() {
        let x = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let y = apply(&x, Box::new(Fails)).unwrap();
        let err = y.sum(Kind::Float).f_backward().unwrap_err().to_string();
        assert!(err.contains("rank 1 closed its connection"), "{err}");
    }
}
