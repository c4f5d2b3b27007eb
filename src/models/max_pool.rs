//! `max_pool2d(x, 2)` — 2 × 2 windows, stride 2, no padding — bit for bit as libtorch computes it,
//! in a fraction of the time.
//!
//! libtorch's CPU max pooling on NCHW tensors walks each window element by element and writes
//! an int64 index per output; in the reference CNN its two pools took about a quarter of the
//! forward pass on one thread (9 and 4 ms of a batch of 64 here). This kernel reads a pair of
//! rows at a time and keeps a one-byte window position instead, in loops the compiler
//! vectorises.
//!
//! Same numbers: each window is scanned in libtorch's order (row by row) with libtorch's rule
//! (`v > max || isnan(v)`, from −∞, position 0), so the value and the position it picks are
//! libtorch's, NaN and ties included; backward writes the output's gradient at that position
//! and `0 + g` there, as libtorch's zeroed gradient plus `+=` does (so −0 becomes +0), zeros
//! elsewhere. A row or column left over by an odd size is skipped by the windows (floor mode)
//! and gets a zero gradient.
//!
//! Used for contiguous f32 CPU tensors when libtorch runs one thread (a worker's default here);
//! anything else goes to libtorch's own kernel, which parallelises.

use crate::autograd::{apply, Differentiable};
use std::sync::Mutex;
use tch::{Device, Kind, TchError, Tensor};

/// `x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)` for `[N, C, H, W]` (or `[C, H, W]`).
pub fn max_pool_2x2(x: &Tensor) -> Result<Tensor, TchError> {
    if !fast_path(x) {
        return x.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
    }
    if x.requires_grad() && crate::autograd::checkpoint::grad_enabled() {
        apply(x, Box::new(MaxPool2x2 { arg: Mutex::new(None) }))
    } else {
        Ok(forward(x)?.0)
    }
}

fn fast_path(x: &Tensor) -> bool {
    let size = x.size();
    x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && (size.len() == 4 || size.len() == 3)
        && size[size.len() - 2] >= 2
        && size[size.len() - 1] >= 2
        && x.is_contiguous()
        && tch::get_num_threads() == 1
}

struct MaxPool2x2 {
    /// The input's shape and each window's chosen position (0–3, row-major), from forward.
    arg: Mutex<Option<(Vec<i64>, Tensor)>>,
}

impl Differentiable for MaxPool2x2 {
    fn forward(&self, input: &Tensor) -> Result<Tensor, String> {
        let (out, arg) = forward(input).map_err(|e| e.to_string())?;
        *self.arg.lock().expect("max-pool state") = Some((input.size(), arg));
        Ok(out)
    }

    fn backward(&self, grad_output: &Tensor) -> Result<Tensor, String> {
        if crate::autograd::checkpoint::grad_enabled() {
            return Err("max_pool_2x2 has no double backward (create_graph): call libtorch's max_pool2d".into());
        }
        // Kept, not taken: a backward with retain_graph may run again.
        let (shape, arg) = {
            let state = self.arg.lock().expect("max-pool state");
            let (shape, arg) = state.as_ref().ok_or("max_pool_2x2: backward before forward")?;
            (shape.clone(), arg.shallow_clone())
        };
        if grad_output.size() != out_shape(&shape) {
            return Err(format!("max_pool_2x2: gradient of shape {:?} for an output of {:?}", grad_output.size(), out_shape(&shape)));
        }
        backward(&shape, &arg, grad_output).map_err(|e| e.to_string())
    }
}

/// (planes, h, w, ho, wo) of an NCHW or CHW shape.
fn dims(shape: &[i64]) -> (usize, usize, usize, usize, usize) {
    let n = shape.len();
    let planes: i64 = shape[..n - 2].iter().product();
    let (h, w) = (shape[n - 2] as usize, shape[n - 1] as usize);
    (planes as usize, h, w, h / 2, w / 2)
}

fn out_shape(shape: &[i64]) -> Vec<i64> {
    let n = shape.len();
    let mut s = shape.to_vec();
    s[n - 2] /= 2;
    s[n - 1] /= 2;
    s
}

/// The pooled values and each window's position.
fn forward(x: &Tensor) -> Result<(Tensor, Tensor), TchError> {
    let shape = x.size();
    let (planes, h, w, ho, wo) = dims(&shape);
    let out = Tensor::f_empty(out_shape(&shape), (Kind::Float, Device::Cpu))?;
    let arg = Tensor::f_empty(out_shape(&shape), (Kind::Uint8, Device::Cpu))?;
    // SAFETY: contiguous CPU tensors of exactly these element counts and types, alive for the
    // call; `out` and `arg` are fresh, so nothing else aliases them.
    let (xs, os, args) = unsafe {
        (
            std::slice::from_raw_parts(x.data_ptr() as *const f32, planes * h * w),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, planes * ho * wo),
            std::slice::from_raw_parts_mut(arg.data_ptr() as *mut u8, planes * ho * wo),
        )
    };
    for p in 0..planes {
        let plane = &xs[p * h * w..(p + 1) * h * w];
        for i in 0..ho {
            let at = (p * ho + i) * wo;
            pool_rows(&plane[2 * i * w..][..2 * wo], &plane[(2 * i + 1) * w..][..2 * wo], &mut os[at..at + wo], &mut args[at..at + wo]);
        }
    }
    Ok((out, arg))
}

/// One output row from two input rows: window j is (r0[2j], r0[2j+1], r1[2j], r1[2j+1]),
/// scanned in that order with libtorch's rule.
#[inline]
fn pool_rows(r0: &[f32], r1: &[f32], out: &mut [f32], arg: &mut [u8]) {
    for (j, (o, a)) in out.iter_mut().zip(arg.iter_mut()).enumerate() {
        let (mut m, mut k) = (f32::NEG_INFINITY, 0u8);
        for (t, v) in [r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]].into_iter().enumerate() {
            let take = v > m || v.is_nan();
            m = if take { v } else { m };
            k = if take { t as u8 } else { k };
        }
        *o = m;
        *a = k;
    }
}

/// The input's gradient: each window's output gradient at its chosen position, 0 elsewhere.
fn backward(shape: &[i64], arg: &Tensor, grad_output: &Tensor) -> Result<Tensor, TchError> {
    let (planes, h, w, ho, wo) = dims(shape);
    let g = grad_output.f_to_kind(Kind::Float)?.f_contiguous()?;
    let odd = h % 2 == 1 || w % 2 == 1;
    // Rows and columns no window covers stay zero; otherwise every element is written below.
    let grad = if odd { Tensor::f_zeros(shape, (Kind::Float, Device::Cpu))? } else { Tensor::f_empty(shape, (Kind::Float, Device::Cpu))? };
    // SAFETY: as in `forward`: contiguous CPU tensors of these sizes; `grad` is fresh.
    let (gs, args, out) = unsafe {
        (
            std::slice::from_raw_parts(g.data_ptr() as *const f32, planes * ho * wo),
            std::slice::from_raw_parts(arg.data_ptr() as *const u8, planes * ho * wo),
            std::slice::from_raw_parts_mut(grad.data_ptr() as *mut f32, planes * h * w),
        )
    };
    for p in 0..planes {
        let plane = &mut out[p * h * w..(p + 1) * h * w];
        for i in 0..ho {
            let at = (p * ho + i) * wo;
            let (top, bottom) = plane[2 * i * w..].split_at_mut(w);
            unpool_rows(&gs[at..at + wo], &args[at..at + wo], &mut top[..2 * wo], &mut bottom[..2 * wo]);
        }
    }
    Ok(grad)
}

#[inline]
fn unpool_rows(g: &[f32], arg: &[u8], r0: &mut [f32], r1: &mut [f32]) {
    for (j, (&g, &k)) in g.iter().zip(arg).enumerate() {
        // libtorch adds into a zeroed gradient: 0 + g (so a −0 gradient arrives as +0).
        let v = 0.0f32 + g;
        r0[2 * j] = if k == 0 { v } else { 0.0 };
        r0[2 * j + 1] = if k == 1 { v } else { 0.0 };
        r1[2 * j] = if k == 2 { v } else { 0.0 };
        r1[2 * j + 1] = if k == 3 { v } else { 0.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn libtorch(x: &Tensor) -> Tensor {
        x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
    }

    /// Values with many ties (ReLU zeros, repeated values), NaN, ±∞ and −0, odd and even sizes:
    /// forward and backward bitwise equal to libtorch's.
    #[test]
    fn bitwise_libtorch() {
        tch::set_num_threads(1);
        tch::manual_seed(7);
        for shape in [&[3i64, 4, 8, 8][..], &[2, 3, 7, 9], &[1, 2, 2, 2], &[2, 5, 28, 28], &[3, 5, 6]] {
            let base = Tensor::randn(shape, (Kind::Float, Device::Cpu));
            // Rounded to a few values, so windows hold ties; then ReLU zeros, specials.
            let x = (base * 2.0).round().relu();
            let flat = x.view([-1]);
            let n = flat.size()[0];
            for (i, v) in [(0, f64::NAN), (5, f64::INFINITY), (n / 2, f64::NEG_INFINITY), (n / 3, f64::NAN), (n / 3 + 1, f64::NAN)] {
                let _ = flat.get(i).fill_(v);
            }
            let g = Tensor::randn(out_shape(shape), (Kind::Float, Device::Cpu));
            let _ = g.view([-1]).get(0).fill_(-0.0);
            let a = x.detach().set_requires_grad(true);
            let b = x.detach().set_requires_grad(true);
            assert!(fast_path(&a), "the test runs this kernel, not libtorch's");
            let ya = max_pool_2x2(&a).unwrap();
            let yb = libtorch(&b);
            assert!(ya.requires_grad(), "recorded for backward");
            let bits = |t: &Tensor| t.view_dtype(Kind::Int);
            assert!(bits(&ya).equal(&bits(&yb)), "forward {shape:?}");
            (&ya * &g).sum(Kind::Float).backward();
            (&yb * &g).sum(Kind::Float).backward();
            assert!(bits(&a.grad()).equal(&bits(&b.grad())), "backward {shape:?}");
        }
    }

    /// Without gradients it is the plain forward; elsewhere (several threads, other dtypes,
    /// non-contiguous) it is libtorch's own.
    #[test]
    fn falls_back_where_it_does_not_apply() {
        let x = Tensor::randn([2, 3, 6, 6], (Kind::Float, Device::Cpu));
        let y = tch::no_grad(|| max_pool_2x2(&x.set_requires_grad(true))).unwrap();
        assert!(!y.requires_grad());
        assert!(y.equal(&libtorch(&x)));
        let t = x.transpose(2, 3);
        assert!(max_pool_2x2(&t).unwrap().equal(&libtorch(&t)));
        let d = x.to_kind(Kind::Double);
        assert!(max_pool_2x2(&d).unwrap().equal(&libtorch(&d)));
    }
}
