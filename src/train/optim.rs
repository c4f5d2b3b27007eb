//! SGD and Adam with exactly PyTorch's update rules (torch.optim.SGD / torch.optim.Adam,
//! single-tensor path), written out so their state (momentum buffers, moments, step counts) is
//! ours to checkpoint.

use crate::config::{OptimizerConfig, OptimizerName};
use tch::{TchError, Tensor};

pub struct Optimizer {
    cfg: OptimizerConfig,
    params: Vec<Tensor>,
    /// SGD: momentum buffer per parameter. Adam: first moment.
    state_a: Vec<Option<Tensor>>,
    /// Adam: second moment.
    state_b: Vec<Option<Tensor>>,
    /// Per-parameter workspace for the update.
    scratch: Vec<Option<Tensor>>,
    step: u64,
}

impl Optimizer {
    pub fn new(cfg: &OptimizerConfig, params: &[Tensor]) -> Self {
        Self {
            cfg: cfg.clone(),
            params: params.iter().map(|p| p.shallow_clone()).collect(),
            state_a: params.iter().map(|_| None).collect(),
            state_b: params.iter().map(|_| None).collect(),
            scratch: params.iter().map(|_| None).collect(),
            step: 0,
        }
    }

    pub fn step(&mut self) -> Result<(), TchError> {
        self.step += 1;
        let _guard = tch::no_grad_guard();
        for i in 0..self.params.len() {
            let g = self.params[i].grad();
            if !g.defined() {
                continue;
            }
            // One parameter-sized scratch tensor per parameter, reused every step: the update
            // allocates nothing (a fresh 64 MB temporary per step costs page faults every time).
            if self.scratch[i].is_none() {
                self.scratch[i] = Some(g.f_empty_like()?);
            }
            match self.cfg.name {
                OptimizerName::Sgd => self.sgd(i, g)?,
                OptimizerName::Adam => self.adam(i, g)?,
            }
        }
        Ok(())
    }

    fn sgd(&mut self, i: usize, grad: Tensor) -> Result<(), TchError> {
        let c = &self.cfg;
        let p = &mut self.params[i];
        let scratch = self.scratch[i].as_mut().expect("made in step");
        // d_p = grad + weight_decay * p (into scratch), or the gradient itself. A 0-dim tensor as
        // addcmul_'s second factor gives PyTorch's `add_(x, alpha=a)` in one pass.
        let mut d_p = if c.weight_decay != 0.0 {
            scratch.f_copy_(&grad)?;
            let _ = scratch.f_addcmul_(p, &Tensor::from(c.weight_decay))?;
            scratch.shallow_clone()
        } else {
            grad
        };
        if c.momentum != 0.0 {
            let buf = match self.state_a[i].take() {
                None => d_p.f_detach_copy()?,
                Some(mut b) => {
                    let _ = b.f_mul_scalar_(c.momentum)?;
                    if c.dampening != 0.0 {
                        let _ = b.f_add_(&d_p.f_mul_scalar(1.0 - c.dampening)?)?;
                    } else {
                        let _ = b.f_add_(&d_p)?;
                    }
                    b
                }
            };
            d_p = if c.nesterov { d_p.f_add(&buf.f_mul_scalar(c.momentum)?)? } else { buf.shallow_clone() };
            self.state_a[i] = Some(buf);
        }
        // p.add_(d_p, alpha=-lr)
        let _ = p.f_addcmul_(&d_p, &Tensor::from(-c.lr))?;
        Ok(())
    }

    fn adam(&mut self, i: usize, grad: Tensor) -> Result<(), TchError> {
        let c = &self.cfg;
        let (beta1, beta2) = (c.betas[0], c.betas[1]);
        let p = &mut self.params[i];
        let scratch = self.scratch[i].as_mut().expect("made in step");
        let grad = if c.weight_decay != 0.0 { grad.f_add(&p.f_mul_scalar(c.weight_decay)?)? } else { grad };
        // exp_avg.lerp_(grad, 1 - beta1), as torch.optim.Adam.
        let m = self.state_a[i].get_or_insert_with(|| grad.zeros_like());
        let _ = m.f_lerp_(&grad, 1.0 - beta1)?;
        // exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad²
        let v = self.state_b[i].get_or_insert_with(|| grad.zeros_like());
        let _ = v.f_mul_scalar_(beta2)?;
        let _ = grad.f_mul_out(scratch, &grad)?;
        let _ = v.f_addcmul_(scratch, &Tensor::from(1.0 - beta2))?;
        let step = self.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(step);
        let bias_correction2 = 1.0 - beta2.powi(step);
        let step_size = c.lr / bias_correction1;
        // denom = sqrt(v) / sqrt(bias_correction2) + eps; p -= step_size * m / denom
        let _ = v.f_sqrt_out(scratch)?;
        let _ = scratch.f_div_scalar_(bias_correction2.sqrt())?;
        let _ = scratch.f_add_scalar_(c.eps)?;
        let m = self.state_a[i].as_ref().unwrap();
        let _ = m.f_div_out(scratch, &scratch.shallow_clone())?;
        let _ = p.f_addcmul_(scratch, &Tensor::from(-step_size))?;
        Ok(())
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    pub fn name(&self) -> &'static str {
        match self.cfg.name {
            OptimizerName::Sgd => "sgd",
            OptimizerName::Adam => "adam",
        }
    }

    fn suffixes(&self) -> (&'static str, &'static str) {
        match self.cfg.name {
            OptimizerName::Sgd => ("momentum_buffer", ""),
            OptimizerName::Adam => ("exp_avg", "exp_avg_sq"),
        }
    }

    /// State tensors named `<param>.<state>` as in PyTorch's optimizer state (momentum_buffer;
    /// exp_avg, exp_avg_sq). `names` are the parameters' names, in the optimizer's order.
    pub fn state(&self, names: &[String]) -> Vec<(String, Tensor)> {
        let (a, b) = self.suffixes();
        let mut out = Vec::new();
        for (i, n) in names.iter().enumerate() {
            if let Some(t) = &self.state_a[i] {
                out.push((format!("{n}.{a}"), t.shallow_clone()));
            }
            if let Some(t) = &self.state_b[i] {
                out.push((format!("{n}.{b}"), t.shallow_clone()));
            }
        }
        out
    }

    /// Restores what `state` returned (copies, so the source may be dropped) and the step count.
    /// Names that match no parameter or the wrong shape are errors.
    pub fn load_state(&mut self, names: &[String], state: &[(String, Tensor)], steps: u64) -> Result<(), String> {
        let (a, b) = self.suffixes();
        for (key, t) in state {
            let (param, suffix) = key.rsplit_once('.').ok_or_else(|| format!("optimizer state `{key}` has no state suffix"))?;
            let i = names.iter().position(|n| n == param).ok_or_else(|| format!("optimizer state `{key}` names no parameter"))?;
            if t.size() != self.params[i].size() {
                return Err(format!("optimizer state `{key}` has shape {:?}, parameter {:?}", t.size(), self.params[i].size()));
            }
            let copy = t.to_kind(self.params[i].kind()).to_device(self.params[i].device()).detach_copy();
            match suffix {
                s if s == a => self.state_a[i] = Some(copy),
                s if s == b && !b.is_empty() => self.state_b[i] = Some(copy),
                _ => return Err(format!("optimizer state `{key}`: `{suffix}` is not {} state", self.name())),
            }
        }
        self.step = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn cfg(name: OptimizerName, momentum: f64) -> OptimizerConfig {
        OptimizerConfig { name, lr: 0.1, momentum, dampening: 0.0, nesterov: false, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1e-8 }
    }

    fn run(c: OptimizerConfig, grads: &[f32]) -> f64 {
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = Optimizer::new(&c, &[p.shallow_clone()]);
        for &g in grads {
            let loss = (&p * g as f64).sum(Kind::Float);
            crate::ddp::zero_grads(&[p.shallow_clone()]).unwrap();
            loss.backward();
            opt.step().unwrap();
        }
        p.double_value(&[0])
    }

    #[test]
    fn sgd_momentum_matches_hand_computation() {
        // buf1 = 1, p = 1 - 0.1 = 0.9; buf2 = 0.9*1 + 2 = 2.9, p = 0.9 - 0.29 = 0.61.
        assert!((run(cfg(OptimizerName::Sgd, 0.9), &[1.0, 2.0]) - 0.61).abs() < 1e-6);
        assert!((run(cfg(OptimizerName::Sgd, 0.0), &[1.0, 2.0]) - 0.7).abs() < 1e-6);
    }

    #[test]
    fn adam_first_step_moves_by_lr() {
        // Adam's first step is lr * sign(g) (up to eps).
        assert!((run(cfg(OptimizerName::Adam, 0.0), &[3.0]) - 0.9).abs() < 1e-5);
    }
}
