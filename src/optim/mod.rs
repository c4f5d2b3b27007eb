//! Optimizers with exactly PyTorch's update rules (torch.optim.SGD / Adam / AdamW, single-tensor
//! path), written out so their state (momentum buffers, moments, step count) is ours to
//! checkpoint and broadcast; learning-rate schedules; gradient clipping.
//!
//! Parameter groups: each parameter carries its own weight decay, so nanoGPT's groups (decay
//! for matrices and embeddings, none for biases and norm weights) are one flag
//! (`weight_decay_1d: false`).

mod clip;
#[cfg(test)]
mod fixture;
mod schedule;
mod shard;

pub use clip::{clip_grad_norm, grad_norm};
pub use schedule::{lr_at, ScheduleConfig};
pub use shard::ShardSlice;

use serde::{Deserialize, Serialize};
use tch::{TchError, Tensor};

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerName {
    Sgd,
    Adam,
    /// Adam with decoupled weight decay (torch.optim.AdamW).
    Adamw,
}

/// The optimizer and its hyperparameters (the config's `optimizer:` section).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    pub name: OptimizerName,
    pub lr: f64,
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub dampening: f64,
    #[serde(default)]
    pub nesterov: bool,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Apply `weight_decay` to 1-d parameters too (biases, norm weights), as PyTorch does for
    /// `model.parameters()`. `false`: only tensors of 2+ dimensions decay, nanoGPT's
    /// `configure_optimizers` groups.
    #[serde(default = "yes")]
    pub weight_decay_1d: bool,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// ZeRO stage 1 (PyTorch's `ZeroRedundancyOptimizer`): gradients are reduce-scattered, each
    /// rank steps and keeps optimizer state for 1/N of the parameters, then the parameters are
    /// all-gathered. Checkpoints hold the whole state, as without sharding.
    #[serde(default)]
    pub shard: bool,
}

impl OptimizerConfig {
    /// PyTorch's defaults for `name` with learning rate `lr` (AdamW: weight_decay 0.01, as
    /// torch.optim.AdamW).
    pub fn new(name: OptimizerName, lr: f64) -> Self {
        OptimizerConfig {
            name,
            lr,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: if name == OptimizerName::Adamw { 0.01 } else { 0.0 },
            betas: default_betas(),
            eps: default_eps(),
            weight_decay_1d: true,
            schedule: ScheduleConfig::Constant,
            shard: false,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}

pub struct Optimizer {
    cfg: OptimizerConfig,
    names: Vec<String>,
    params: Vec<Tensor>,
    /// Weight decay of each parameter (its group's).
    weight_decay: Vec<f64>,
    /// The learning rate of the next step (the schedule sets it).
    lr: f64,
    /// SGD: momentum buffer per parameter. Adam/AdamW: first moment.
    state_a: Vec<Option<Tensor>>,
    /// Adam/AdamW: second moment.
    state_b: Vec<Option<Tensor>>,
    /// Per-parameter workspace for the update.
    scratch: Vec<Option<Tensor>>,
    step: u64,
    /// ZeRO-1: each entry is a slice of a parameter, stepped with an explicit gradient (its
    /// slice of the reduced bucket); see `shard`.
    shard: Option<shard::Sharding>,
}

impl Optimizer {
    /// An optimizer over `params` (named, in a fixed order; state is saved under these names).
    pub fn new(cfg: &OptimizerConfig, params: &[(String, Tensor)]) -> Self {
        let weight_decay = params.iter().map(|(_, p)| if cfg.weight_decay_1d || p.dim() >= 2 { cfg.weight_decay } else { 0.0 }).collect();
        Self {
            cfg: cfg.clone(),
            names: params.iter().map(|(n, _)| n.clone()).collect(),
            params: params.iter().map(|(_, p)| p.shallow_clone()).collect(),
            weight_decay,
            lr: cfg.lr,
            state_a: params.iter().map(|_| None).collect(),
            state_b: params.iter().map(|_| None).collect(),
            scratch: params.iter().map(|_| None).collect(),
            step: 0,
            shard: None,
        }
    }

    /// Sets the learning rate used from the next step on (all groups).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// The weight decay each parameter gets, in order (its group's).
    pub fn weight_decays(&self) -> &[f64] {
        &self.weight_decay
    }

    /// Puts the parameters whose names satisfy `member` in a group of their own with this weight
    /// decay (e.g. no decay for embeddings); returns how many it matched.
    pub fn set_weight_decay(&mut self, member: impl Fn(&str) -> bool, weight_decay: f64) -> usize {
        let mut n = 0;
        for (name, wd) in self.names.iter().zip(self.weight_decay.iter_mut()) {
            if member(name) {
                *wd = weight_decay;
                n += 1;
            }
        }
        n
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self) -> Result<(), TchError> {
        self.step += 1;
        let _guard = tch::no_grad_guard();
        for i in 0..self.params.len() {
            let g = match &self.shard {
                Some(sh) => sh.grads[i].shallow_clone(),
                None => self.params[i].grad(),
            };
            if !g.defined() {
                continue;
            }
            // One parameter-sized scratch tensor per parameter, reused every step: the update
            // allocates nothing (a fresh 64 MB temporary per step costs page faults every time).
            // Plain SGD without weight decay never uses one.
            let needs_scratch = self.cfg.name != OptimizerName::Sgd || self.weight_decay[i] != 0.0;
            if needs_scratch && self.scratch[i].is_none() {
                self.scratch[i] = Some(g.f_empty_like()?);
            }
            match self.cfg.name {
                OptimizerName::Sgd => self.sgd(i, g)?,
                OptimizerName::Adam | OptimizerName::Adamw => self.adam(i, g)?,
            }
        }
        Ok(())
    }

    fn sgd(&mut self, i: usize, grad: Tensor) -> Result<(), TchError> {
        let c = &self.cfg;
        let wd = self.weight_decay[i];
        let p = &mut self.params[i];
        // d_p = grad + weight_decay * p (into scratch), or the gradient itself. A 0-dim tensor as
        // addcmul_'s second factor gives PyTorch's `add_(x, alpha=a)` in one pass.
        let mut d_p = if wd != 0.0 {
            let scratch = self.scratch[i].as_mut().expect("made in step");
            scratch.f_copy_(&grad)?;
            let _ = scratch.f_addcmul_(p, &Tensor::from(wd))?;
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
        let _ = p.f_addcmul_(&d_p, &Tensor::from(-self.lr))?;
        Ok(())
    }

    fn adam(&mut self, i: usize, grad: Tensor) -> Result<(), TchError> {
        let c = &self.cfg;
        let (beta1, beta2) = (c.betas[0], c.betas[1]);
        let wd = self.weight_decay[i];
        let lr = self.lr;
        let p = &mut self.params[i];
        let scratch = self.scratch[i].as_mut().expect("made in step");
        let grad = match c.name {
            // AdamW: decoupled decay, param.mul_(1 - lr * weight_decay), before the moments.
            OptimizerName::Adamw if wd != 0.0 => {
                let _ = p.f_mul_scalar_(1.0 - lr * wd)?;
                grad
            }
            // Adam: L2 penalty folded into the gradient.
            OptimizerName::Adam if wd != 0.0 => grad.f_add(&p.f_mul_scalar(wd)?)?,
            _ => grad,
        };
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
        let step_size = lr / bias_correction1;
        // denom = sqrt(v) / sqrt(bias_correction2) + eps; p -= step_size * m / denom
        let _ = v.f_sqrt_out(scratch)?;
        let _ = scratch.f_div_scalar_(bias_correction2.sqrt())?;
        let _ = scratch.f_add_scalar_(c.eps)?;
        let m = self.state_a[i].as_ref().expect("set above");
        let _ = m.f_div_out(scratch, &scratch.shallow_clone())?;
        let _ = p.f_addcmul_(scratch, &Tensor::from(-step_size))?;
        Ok(())
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Every parameter's name and full shape, as built (sharded: the whole parameters, not the
    /// slices this rank steps).
    pub fn named_shapes(&self) -> Vec<(String, Vec<i64>)> {
        match &self.shard {
            Some(sh) => sh.full.clone(),
            None => self.names.iter().cloned().zip(self.params.iter().map(|p| p.size())).collect(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self.cfg.name {
            OptimizerName::Sgd => "sgd",
            OptimizerName::Adam => "adam",
            OptimizerName::Adamw => "adamw",
        }
    }

    fn suffixes(&self) -> (&'static str, &'static str) {
        match self.cfg.name {
            OptimizerName::Sgd => ("momentum_buffer", ""),
            OptimizerName::Adam | OptimizerName::Adamw => ("exp_avg", "exp_avg_sq"),
        }
    }

    /// State tensors named `<param>.<state>` as in PyTorch's optimizer state (momentum_buffer;
    /// exp_avg, exp_avg_sq). Sharded (ZeRO-1), each is this rank's slice of the flattened state.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let (a, b) = self.suffixes();
        let mut out = Vec::new();
        for (i, n) in self.names.iter().enumerate() {
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
    pub fn load_state(&mut self, state: &[(String, Tensor)], steps: u64) -> Result<(), String> {
        if self.shard.is_some() {
            return self.load_sharded_state(state, steps);
        }
        let (a, b) = self.suffixes();
        for (key, t) in state {
            let (param, suffix) = key.rsplit_once('.').ok_or_else(|| format!("optimizer state `{key}` has no state suffix"))?;
            let i = self.names.iter().position(|n| n == param).ok_or_else(|| format!("optimizer state `{key}` names no parameter"))?;
            if t.size() != self.params[i].size() {
                return Err(format!("optimizer state `{key}` has shape {:?}, parameter {:?}", t.size(), self.params[i].size()));
            }
            let copy = t
                .f_to_kind(self.params[i].kind())
                .and_then(|t| t.f_to_device(self.params[i].device()))
                .and_then(|t| t.f_detach_copy())
                .map_err(|e| format!("optimizer state `{key}`: {e}"))?;
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
        OptimizerConfig { momentum, lr: 0.1, ..OptimizerConfig::new(name, 0.1) }
    }

    fn run(c: OptimizerConfig, grads: &[f32]) -> f64 {
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = Optimizer::new(&c, &[("p".into(), p.shallow_clone())]);
        for &g in grads {
            let loss = (&p * g as f64).sum(Kind::Float);
            let _ = p.grad().f_zero_();
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

    /// Runs `c` over the fixture's parameters and gradient sequence (`lrs`: per-step learning
    /// rates, else constant) and compares with what torch.optim computed.
    fn check_against_torch(c: OptimizerConfig, lrs: Option<Vec<f64>>, section: &str) {
        let init = fixture::section("opt_init");
        let grads = fixture::section("opt_grads");
        let shapes: [&[i64]; 2] = [&[3, 4], &[4]];
        let named: Vec<(String, Tensor)> = (0..2)
            .map(|i| {
                let v: Vec<f32> = init[i].iter().map(|&x| x as f32).collect();
                (["weight", "bias"][i].to_string(), Tensor::from_slice(&v).view(shapes[i]).set_requires_grad(true))
            })
            .collect();
        let mut opt = Optimizer::new(&c, &named);
        for k in 0..5 {
            if let Some(l) = &lrs {
                opt.set_lr(l[k]);
            }
            for (i, (_, p)) in named.iter().enumerate() {
                let g: Vec<f32> = grads[2 * k + i].iter().map(|&x| x as f32).collect();
                // Set the gradient through a backward pass (tch has no grad setter): d(p·g)/dp = g.
                let loss = (p * Tensor::from_slice(&g).view(shapes[i])).sum(Kind::Float);
                let _ = p.grad().f_zero_();
                loss.backward();
            }
            opt.step().unwrap();
        }
        let want = fixture::section(section);
        for (i, (name, p)) in named.iter().enumerate() {
            let got = Vec::<f32>::try_from(&p.detach().view([-1])).unwrap();
            for (j, (&g, &w)) in got.iter().zip(&want[i]).enumerate() {
                let rel = (g as f64 - w).abs() / w.abs().max(1e-6);
                assert!(rel <= 1e-6, "{section}: {name}[{j}] = {g}, torch {w} (relative {rel:e})");
            }
        }
    }

    #[test]
    fn adamw_with_groups_and_schedule_matches_torch() {
        let c = OptimizerConfig {
            betas: [0.9, 0.95],
            weight_decay: 0.1,
            weight_decay_1d: false,
            schedule: ScheduleConfig::WarmupCosine { warmup_steps: 2, decay_steps: 4, min_lr: 1e-3 },
            ..OptimizerConfig::new(OptimizerName::Adamw, 1e-2)
        };
        let lrs: Vec<f64> = (0..5).map(|k| lr_at(&c.schedule, c.lr, k)).collect();
        // The schedule itself against nanoGPT's get_lr as Python computed it.
        for (a, b) in lrs.iter().zip(&fixture::section("opt_adamw_lrs")[0]) {
            assert!((a - b).abs() <= 1e-15, "{a} vs {b}");
        }
        let opt = Optimizer::new(
            &c,
            &[("w".into(), Tensor::zeros([2, 2], tch::kind::FLOAT_CPU)), ("b".into(), Tensor::zeros([2], tch::kind::FLOAT_CPU))],
        );
        assert_eq!(opt.weight_decays(), &[0.1, 0.0], "nanoGPT's groups: matrices decay, vectors do not");
        check_against_torch(c, Some(lrs), "opt_adamw");
    }

    #[test]
    fn adamw_sgd_adam_match_torch() {
        check_against_torch(
            OptimizerConfig { weight_decay: 0.1, ..OptimizerConfig::new(OptimizerName::Adamw, 1e-2) },
            None,
            "opt_adamw_all_decay",
        );
        check_against_torch(
            OptimizerConfig { momentum: 0.9, weight_decay: 0.01, ..OptimizerConfig::new(OptimizerName::Sgd, 0.1) },
            None,
            "opt_sgd",
        );
        check_against_torch(
            OptimizerConfig { momentum: 0.9, nesterov: true, ..OptimizerConfig::new(OptimizerName::Sgd, 0.1) },
            None,
            "opt_sgd_nesterov",
        );
        check_against_torch(OptimizerConfig { weight_decay: 0.01, ..OptimizerConfig::new(OptimizerName::Adam, 1e-2) }, None, "opt_adam");
    }

    #[test]
    fn clip_grad_norm_matches_torch() {
        let init = fixture::section("opt_init");
        let grads = fixture::section("opt_grads");
        let shapes: [&[i64]; 2] = [&[3, 4], &[4]];
        for section in ["clip", "clip_big"] {
            let want = fixture::section(section);
            let params: Vec<Tensor> = (0..2)
                .map(|i| {
                    let v: Vec<f32> = init[i].iter().map(|&x| x as f32).collect();
                    let p = Tensor::from_slice(&v).view(shapes[i]).set_requires_grad(true);
                    let g: Vec<f32> = grads[i].iter().map(|&x| x as f32 * 3.0).collect();
                    (&p * Tensor::from_slice(&g).view(shapes[i])).sum(Kind::Float).backward();
                    p
                })
                .collect();
            let total = clip_grad_norm(&params, want[0][0]).unwrap();
            assert!((total - want[0][1]).abs() / want[0][1] <= 1e-6, "{section}: total norm {total} vs torch {}", want[0][1]);
            for (i, p) in params.iter().enumerate() {
                let got = Vec::<f32>::try_from(&p.grad().view([-1])).unwrap();
                for (&g, &w) in got.iter().zip(&want[1 + i]) {
                    assert!((g as f64 - w).abs() <= 1e-6 * w.abs().max(1e-6), "{section}: clipped gradient {g} vs torch {w}");
                }
            }
        }
    }
}
