//! Gradient-ready notifications from libtorch's autograd engine (the C++ shim beside this file):
//! each parameter's index is sent on a channel as soon as backward has accumulated its .grad.
//! The same channel carries the collectives that run inside backward (`Event::Job`), so the
//! communication thread sees both in the order the engine produced them.

use crossbeam_channel::{unbounded, Receiver, Sender};
use std::ffi::{c_int, c_void};
use tch::Tensor;

extern "C" {
    fn ringtrain_set_ready_hook(tensor: *mut c_void, f: extern "C" fn(*mut c_void, c_int), ctx: *mut c_void, index: c_int) -> c_int;
    fn ringtrain_clear_ready_hook(tensor: *mut c_void) -> c_int;
    fn ringtrain_set_grad(tensor: *mut c_void, grad: *mut c_void) -> c_int;
}

/// Makes `grad` the `.grad` of `param` (same storage: backward then accumulates into it).
pub fn set_grad(param: &Tensor, grad: &Tensor) -> Result<(), String> {
    let mut p = param.shallow_clone();
    let mut g = grad.shallow_clone();
    // SAFETY: two live tch tensor handles; the shim assigns one to the other's grad slot (a
    // refcounted copy of the handle), so neither outlives the call through these pointers.
    match unsafe { ringtrain_set_grad(p.as_mut_ptr() as *mut c_void, g.as_mut_ptr() as *mut c_void) } {
        0 => Ok(()),
        _ => Err("setting a parameter's gradient failed".into()),
    }
}

/// What the communication thread receives during an overlapped backward.
pub enum Event {
    /// Parameter `i`'s gradient is accumulated.
    Ready(usize),
    /// A collective issued inside backward, to run on the lent communicator.
    Job(crate::comm::CommJob),
    /// Backward has returned.
    Done,
}

extern "C" fn on_ready(ctx: *mut c_void, index: c_int) {
    // SAFETY: ctx is the boxed Sender owned by ReadyHooks, which clears the hooks before dropping it.
    let tx = unsafe { &*(ctx as *const Sender<Event>) };
    let _ = tx.send(Event::Ready(index as usize));
}

pub struct ReadyHooks {
    params: Vec<Tensor>,
    tx: Box<Sender<Event>>,
}

impl ReadyHooks {
    pub fn install(params: &[Tensor]) -> Result<(ReadyHooks, Receiver<Event>), String> {
        let (tx, rx) = unbounded();
        let mut hooks = ReadyHooks { params: params.iter().map(|p| p.shallow_clone()).collect(), tx: Box::new(tx) };
        let ctx = hooks.tx.as_ref() as *const Sender<Event> as *mut c_void;
        for (i, p) in hooks.params.iter_mut().enumerate() {
            // SAFETY: a live tch tensor handle; the shim only attaches a hook to its autograd meta.
            if unsafe { ringtrain_set_ready_hook(p.as_mut_ptr() as *mut c_void, on_ready, ctx, i as c_int) } != 0 {
                return Err(format!("registering the gradient hook of parameter {i} failed"));
            }
        }
        Ok((hooks, rx))
    }

    /// A sender on the same channel (for the end-of-backward marker and jobs).
    pub fn sender(&self) -> Sender<Event> {
        (*self.tx).clone()
    }
}

impl Drop for ReadyHooks {
    fn drop(&mut self) {
        for p in &mut self.params {
            // SAFETY: as in install.
            unsafe { ringtrain_clear_ready_hook(p.as_mut_ptr() as *mut c_void) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn hooks_fire_once_per_parameter_after_accumulation() {
        let a = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let b = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let (hooks, rx) = ReadyHooks::install(&[a.shallow_clone(), b.shallow_clone()]).unwrap();
        let loss = (&a * 2.0).sum(Kind::Float) + (&b * &b).sum(Kind::Float) + (&a * 3.0).sum(Kind::Float);
        loss.backward();
        let mut got: Vec<usize> = rx.try_iter().map(|e| if let Event::Ready(i) = e { i } else { usize::MAX }).collect();
        got.sort();
        assert_eq!(got, vec![0, 1]);
        assert_eq!(Vec::<f32>::try_from(&a.grad()).unwrap(), vec![5.0, 5.0]);
        drop(hooks);
        let loss = (&a * 1.0).sum(Kind::Float);
        loss.backward();
        assert!(rx.try_iter().next().is_none(), "hooks must be gone after drop");
    }
}
