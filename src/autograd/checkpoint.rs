//! Activation checkpointing, as PyTorch's reentrant `torch.utils.checkpoint`: a unit's forward
//! (a GPT block, a ResNet stage) runs without recording a graph, keeping only its input; when
//! backward reaches it, the forward runs again with recording on, from the same random-number
//! state and under the same autocast state as the first time, and backward goes through that
//! graph (a backward inside the backward). The unit's activations exist for one unit at a time
//! instead of for the whole model.
//!
//! The recomputation is the same arithmetic on the same inputs, so the gradients are bitwise
//! those of the unchecked forward, dropout included (its masks come from the restored state).
//! BatchNorm must not update its running statistics a second time: layers ask `recomputing()`
//! (set on the thread that runs the recomputation) and leave them alone then.

use super::function::{apply, Differentiable};
use crate::amp::{autocast_state, AutocastGuard};
use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void};
use std::sync::Mutex;
use tch::{Device, Kind, TchError, Tensor};

extern "C" {
    fn ringtrain_grad_enabled() -> c_int;
    fn ringtrain_backward_with(tensor: *mut c_void, grad: *mut c_void, err: *mut c_char, errlen: usize) -> c_int;
    fn ringtrain_rng_get_state(device_type: c_int, index: c_int, err: *mut c_char, errlen: usize) -> *mut c_void;
    fn ringtrain_rng_set_state(device_type: c_int, index: c_int, state: *mut c_void, err: *mut c_char, errlen: usize) -> c_int;
}

/// A unit's forward, run once without a graph and again in backward.
pub type UnitForward = Box<dyn Fn(&Tensor) -> Result<Tensor, TchError> + Send>;

thread_local! {
    static RECOMPUTING: Cell<bool> = const { Cell::new(false) };
}

/// True while this thread runs a checkpointed unit's forward the second time.
pub fn recomputing() -> bool {
    RECOMPUTING.with(|r| r.get())
}

/// Whether this thread records autograd graphs.
pub fn grad_enabled() -> bool {
    // SAFETY: reads libtorch's thread-local grad mode.
    unsafe { ringtrain_grad_enabled() != 0 }
}

fn shim_error(err: &[c_char]) -> TchError {
    // SAFETY: the shim wrote a NUL-terminated message into `err`.
    TchError::Torch(unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
}

/// (device type, index) as the shim numbers them.
fn device_code(d: Device) -> (c_int, c_int) {
    match d {
        Device::Cuda(i) => (1, i as c_int),
        _ => (0, 0),
    }
}

/// The default generator's state on `device`.
fn rng_state(device: Device) -> Result<Tensor, TchError> {
    let (t, i) = device_code(device);
    let mut err = [0 as c_char; 1024];
    // SAFETY: the shim returns a new heap at::Tensor* or null with a message.
    let p = unsafe { ringtrain_rng_get_state(t, i, err.as_mut_ptr(), err.len()) };
    if p.is_null() {
        return Err(shim_error(&err));
    }
    // SAFETY: a heap at::Tensor* made for us, as tch's own calls return them.
    Ok(unsafe { Tensor::from_ptr(p as *mut torch_sys::C_tensor) })
}

fn set_rng_state(device: Device, state: &Tensor) -> Result<(), TchError> {
    let (t, i) = device_code(device);
    let mut s = state.shallow_clone();
    let mut err = [0 as c_char; 1024];
    // SAFETY: `s` is a live handle for the call; the shim copies the state out of it.
    match unsafe { ringtrain_rng_set_state(t, i, s.as_mut_ptr() as *mut c_void, err.as_mut_ptr(), err.len()) } {
        0 => Ok(()),
        _ => Err(shim_error(&err)),
    }
}

/// `torch.autograd.backward(output, grad)`: accumulates into the leaves of `output`'s graph.
fn backward_with(output: &Tensor, grad: &Tensor) -> Result<(), TchError> {
    let (mut o, mut g) = (output.shallow_clone(), grad.shallow_clone());
    let mut err = [0 as c_char; 2048];
    // SAFETY: two live tch handles for the duration of the call.
    match unsafe { ringtrain_backward_with(o.as_mut_ptr() as *mut c_void, g.as_mut_ptr() as *mut c_void, err.as_mut_ptr(), err.len()) } {
        0 => Ok(()),
        _ => Err(shim_error(&err)),
    }
}

/// What the first run saw, for the second.
struct Saved {
    forward: UnitForward,
    input: Tensor,
    /// The CPU generator's state, and the input's device's when it is not the CPU.
    rng: Vec<(Device, Tensor)>,
    /// Autocast on the input's device: (enabled, dtype).
    autocast: (bool, Kind),
}

struct Checkpointed {
    name: String,
    saved: Mutex<Option<Saved>>,
}

/// Puts the generators back as they were when dropped (after the recomputation, so dropout
/// later in the step draws as it would have).
struct RngRestore(Vec<(Device, Tensor)>);

impl Drop for RngRestore {
    fn drop(&mut self) {
        for (d, s) in &self.0 {
            let _ = set_rng_state(*d, s);
        }
    }
}

struct Recomputing;

impl Recomputing {
    fn enter() -> Recomputing {
        RECOMPUTING.with(|r| r.set(true));
        Recomputing
    }
}

impl Drop for Recomputing {
    fn drop(&mut self) {
        RECOMPUTING.with(|r| r.set(false));
    }
}

impl Differentiable for Checkpointed {
    fn forward(&self, input: &Tensor) -> Result<Tensor, String> {
        let guard = self.saved.lock().map_err(|_| "checkpoint state poisoned".to_string())?;
        let s = guard.as_ref().ok_or("checkpoint state missing")?;
        (s.forward)(input).map_err(|e| e.to_string())
    }

    fn backward(&self, grad_output: &Tensor) -> Result<Tensor, String> {
        // Taken: a graph is backpropagated once (the recomputed one is freed as it goes).
        let s =
            self.saved.lock().map_err(|_| "checkpoint state poisoned".to_string())?.take().ok_or_else(|| {
                format!("unit `{}` was backpropagated twice: a checkpointed graph is freed after its backward", self.name)
            })?;
        let fail = |e: TchError| format!("recomputing unit `{}`: {e}", self.name);
        let x = s.input.detach().f_requires_grad_(true).map_err(fail)?;
        let output = {
            let now: Vec<(Device, Tensor)> =
                s.rng.iter().map(|(d, _)| Ok((*d, rng_state(*d)?))).collect::<Result<_, TchError>>().map_err(fail)?;
            let _restore = RngRestore(now);
            for (d, state) in &s.rng {
                set_rng_state(*d, state).map_err(fail)?;
            }
            let _autocast = AutocastGuard::set(x.device(), s.autocast.0, s.autocast.1).map_err(|e| format!("unit `{}`: {e}", self.name))?;
            let _recomputing = Recomputing::enter();
            tch::with_grad(|| (s.forward)(&x)).map_err(fail)?
        };
        backward_with(&output, grad_output).map_err(fail)?;
        let g = x.grad();
        if g.defined() {
            Ok(g)
        } else {
            // The unit's output does not depend on its input (it cannot happen for a residual
            // block; a zero gradient is what autograd would give).
            x.f_zeros_like().map_err(fail)
        }
    }
}

/// `forward(input)` for unit `name`, checkpointed when gradients are being recorded: only
/// `input` is kept, and `forward` runs again when backward reaches the unit. Without gradient
/// recording (evaluation), just `forward(input)`.
pub fn checkpoint(name: &str, input: &Tensor, forward: UnitForward) -> Result<Tensor, TchError> {
    if !grad_enabled() {
        return forward(input);
    }
    let device = input.device();
    let mut rng = vec![(Device::Cpu, rng_state(Device::Cpu)?)];
    if device != Device::Cpu {
        rng.push((device, rng_state(device)?));
    }
    let autocast = autocast_state(device).map_err(|e| TchError::Torch(e.to_string()))?;
    // A node is recorded only for an input that needs a gradient; a unit fed data directly
    // still needs its parameters' gradients, so it gets a leaf that does.
    let input = if input.requires_grad() { input.shallow_clone() } else { input.detach().f_requires_grad_(true)? };
    let saved = Saved { forward, input: input.detach(), rng, autocast };
    apply(&input, Box::new(Checkpointed { name: name.to_string(), saved: Mutex::new(Some(saved)) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two dropouts and a matmul on a parameter, as a unit.
    fn unit(w: &Tensor) -> UnitForward {
        let w = w.shallow_clone();
        Box::new(move |x: &Tensor| x.f_dropout(0.3, true)?.f_matmul(&w)?.f_tanh()?.f_dropout(0.2, true))
    }

    fn run(checkpointed: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        tch::manual_seed(3);
        let w = (Tensor::randn([8, 8], tch::kind::FLOAT_CPU) * 0.5).set_requires_grad(true);
        let x0 = Tensor::randn([4, 8], tch::kind::FLOAT_CPU).set_requires_grad(true);
        let x = &x0 * 2.0;
        let y = if checkpointed { checkpoint("u", &x, unit(&w)).unwrap() } else { unit(&w)(&x).unwrap() };
        // Randomness after the unit: must draw the same numbers either way.
        let after = Tensor::rand([4], tch::kind::FLOAT_CPU);
        (y.square().sum(Kind::Float)).backward();
        let v = |t: &Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        (v(&y), v(&w.grad()), v(&x0.grad()), v(&after))
    }

    #[test]
    fn checkpointed_gradients_are_bitwise_the_plain_ones_dropout_included() {
        let (plain, ck) = (run(false), run(true));
        assert!(plain.0 == ck.0, "outputs");
        assert!(plain.1 == ck.1, "parameter gradients");
        assert!(plain.2 == ck.2, "input gradients");
        assert!(plain.3 == ck.3, "the generator after the unit");
        assert!(plain.1.iter().any(|&g| g != 0.0));
    }

    #[test]
    fn without_gradient_recording_the_unit_just_runs() {
        let w = Tensor::ones([2, 2], tch::kind::FLOAT_CPU).set_requires_grad(true);
        let y = tch::no_grad(|| checkpoint("u", &Tensor::ones([1, 2], tch::kind::FLOAT_CPU), Box::new(move |x| x.f_matmul(&w))).unwrap());
        assert!(!y.requires_grad());
        assert_eq!(Vec::<f32>::try_from(y.flatten(0, -1)).unwrap(), vec![2.0, 2.0]);
    }
}
