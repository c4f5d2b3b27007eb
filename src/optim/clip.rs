//! Gradient clipping by global norm, as `torch.nn.utils.clip_grad_norm_`: the L2 norm of the
//! per-parameter L2 norms, then every gradient scaled by min(1, max_norm / (norm + 1e-6)).
//! Under DDP it runs after the all-reduce, so every rank sees the same gradients and clips alike.

use tch::{TchError, Tensor};

/// Clips in place; returns the total norm before clipping (what PyTorch returns).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<f64, TchError> {
    let total = grad_norm_tensor(params)?;
    let Some(total) = total else { return Ok(0.0) };
    let _guard = tch::no_grad_guard();
    // clip_coef = max_norm / (total + 1e-6), clamped to 1, multiplied in even when it is 1 (as
    // PyTorch does, so the bits match).
    let coef = (total.f_add_scalar(1e-6)?.f_reciprocal()? * max_norm).f_clamp_max(1.0)?;
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.f_mul_(&coef.f_to_kind(g.kind())?)?;
        }
    }
    total.f_double_value(&[])
}

/// The global L2 norm of the gradients, without changing them.
pub fn grad_norm(params: &[Tensor]) -> Result<f64, TchError> {
    grad_norm_tensor(params)?.map_or(Ok(0.0), |t| t.f_double_value(&[]))
}

fn grad_norm_tensor(params: &[Tensor]) -> Result<Option<Tensor>, TchError> {
    let _guard = tch::no_grad_guard();
    let mut norms = Vec::new();
    for p in params {
        let g = p.grad();
        if g.defined() {
            norms.push(g.f_norm()?);
        }
    }
    if norms.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tensor::f_stack(&norms, 0)?.f_norm()?))
}
