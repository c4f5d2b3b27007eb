//! Dynamic loss scaling for fp16, as `torch.amp.GradScaler` does it: the loss is multiplied by a
//! scale before backward so small gradients survive fp16; before the optimizer step the
//! gradients are divided back and checked for inf/NaN. A step with any non-finite gradient is
//! skipped and the scale halves; after `growth_interval` clean steps in a row it doubles. The
//! scale and growth tracker are libtorch tensors updated by the same kernels PyTorch uses
//! (`_amp_foreach_non_finite_check_and_unscale_`, `_amp_update_scale_`), so the sequence of
//! scales and skipped steps is PyTorch's.

use super::AmpError;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// GradScaler's constructor arguments, with its defaults.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GradScalerConfig {
    #[serde(default = "default_init_scale")]
    pub init_scale: f64,
    #[serde(default = "default_growth_factor")]
    pub growth_factor: f64,
    #[serde(default = "default_backoff_factor")]
    pub backoff_factor: f64,
    #[serde(default = "default_growth_interval")]
    pub growth_interval: i64,
}

fn default_init_scale() -> f64 {
    65536.0
}
fn default_growth_factor() -> f64 {
    2.0
}
fn default_backoff_factor() -> f64 {
    0.5
}
fn default_growth_interval() -> i64 {
    2000
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        Self {
            init_scale: default_init_scale(),
            growth_factor: default_growth_factor(),
            backoff_factor: default_backoff_factor(),
            growth_interval: default_growth_interval(),
        }
    }
}

impl GradScalerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.init_scale.is_finite() && self.init_scale > 0.0) {
            return Err(format!("train.grad_scaler.init_scale must be a positive number, got {}", self.init_scale));
        }
        if !(self.growth_factor > 1.0 && self.growth_factor.is_finite()) {
            return Err(format!("train.grad_scaler.growth_factor must be greater than 1, got {}", self.growth_factor));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return Err(format!("train.grad_scaler.backoff_factor must be in (0, 1), got {}", self.backoff_factor));
        }
        if self.growth_interval < 1 {
            return Err(format!("train.grad_scaler.growth_interval must be at least 1, got {}", self.growth_interval));
        }
        Ok(())
    }
}

/// What a checkpoint keeps of a scaler (GradScaler's `state_dict`: `scale`, `_growth_tracker`).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScalerState {
    pub scale: f32,
    pub growth_tracker: i32,
}

pub struct GradScaler {
    cfg: GradScalerConfig,
    /// 0-dim f32 on the gradients' device.
    scale: Tensor,
    /// 0-dim i32: clean steps since the last change of scale.
    growth_tracker: Tensor,
}

fn torch(what: &str) -> impl FnOnce(tch::TchError) -> AmpError + '_ {
    move |e| AmpError(format!("{what}: {e}"))
}

impl GradScaler {
    pub fn new(cfg: GradScalerConfig, device: Device) -> Result<GradScaler, AmpError> {
        cfg.validate().map_err(AmpError)?;
        let scale = Tensor::f_full([], cfg.init_scale, (Kind::Float, device)).map_err(torch("grad scaler"))?;
        let growth_tracker = Tensor::f_full([], 0, (Kind::Int, device)).map_err(torch("grad scaler"))?;
        Ok(GradScaler { cfg, scale, growth_tracker })
    }

    /// `loss × scale`, to call backward on.
    pub fn scale(&self, loss: &Tensor) -> Result<Tensor, AmpError> {
        let s = self.scale.f_to_device(loss.device()).map_err(torch("scaling the loss"))?;
        loss.f_mul(&s).map_err(torch("scaling the loss"))
    }

    /// Divides `grads` by the scale in place; returns a one-element f32 tensor, 1 when any of them
    /// held an inf or a NaN (then the step must be skipped). Call it once per step, on the
    /// gradients this rank steps (its shards under ZeRO-1).
    pub fn unscale_(&self, grads: &[Tensor]) -> Result<Tensor, AmpError> {
        let device = self.scale.device();
        // GradScaler computes the reciprocal in double, then rounds it to f32.
        let inv = self
            .scale
            .f_to_kind(Kind::Double)
            .and_then(|s| s.f_reciprocal())
            .and_then(|s| s.f_to_kind(Kind::Float))
            .map_err(torch("unscaling"))?;
        let found = Tensor::f_zeros([], (Kind::Float, device)).map_err(torch("unscaling"))?;
        for (dev, group) in group_by_device(grads) {
            if dev == device {
                super::unscale_(&group, &found, &inv)?;
            } else {
                // Gradients on another device than the scale: a found_inf there, added back.
                let inv_here = inv.f_to_device(dev).map_err(torch("unscaling"))?;
                let found_here = Tensor::f_zeros([], (Kind::Float, dev)).map_err(torch("unscaling"))?;
                super::unscale_(&group, &found_here, &inv_here)?;
                let _ = found
                    .shallow_clone()
                    .f_add_(&found_here.f_to_device(device).map_err(torch("unscaling"))?)
                    .map_err(torch("unscaling"))?;
            }
        }
        Ok(found)
    }

    /// After the step (taken or skipped): backs off when `found_inf`, else counts a clean step
    /// and grows the scale every `growth_interval` of them.
    pub fn update(&mut self, found_inf: bool) -> Result<(), AmpError> {
        let found = Tensor::f_full([], if found_inf { 1.0 } else { 0.0 }, (Kind::Float, self.scale.device())).map_err(torch("update"))?;
        let _ = self
            .scale
            .f_internal_amp_update_scale_(
                &self.growth_tracker,
                &found,
                self.cfg.growth_factor,
                self.cfg.backoff_factor,
                self.cfg.growth_interval,
            )
            .map_err(torch("updating the loss scale"))?;
        Ok(())
    }

    /// The current scale (a host read).
    pub fn current_scale(&self) -> Result<f64, AmpError> {
        self.scale.f_double_value(&[]).map_err(torch("reading the loss scale"))
    }

    pub fn state(&self) -> Result<ScalerState, AmpError> {
        Ok(ScalerState {
            scale: self.current_scale()? as f32,
            growth_tracker: self.growth_tracker.f_int64_value(&[]).map_err(torch("reading the growth tracker"))? as i32,
        })
    }

    pub fn load_state(&mut self, state: &ScalerState) -> Result<(), AmpError> {
        if !(state.scale.is_finite() && state.scale > 0.0) || state.growth_tracker < 0 {
            return Err(AmpError(format!("a checkpointed grad scaler state is invalid: {state:?}")));
        }
        let _ = self.scale.f_fill_(state.scale as f64).map_err(torch("restoring the loss scale"))?;
        let _ = self.growth_tracker.f_fill_(state.growth_tracker as i64).map_err(torch("restoring the growth tracker"))?;
        Ok(())
    }
}

fn group_by_device(grads: &[Tensor]) -> Vec<(Device, Vec<Tensor>)> {
    let mut groups: Vec<(Device, Vec<Tensor>)> = Vec::new();
    for g in grads.iter().filter(|g| g.defined()) {
        match groups.iter_mut().find(|(d, _)| *d == g.device()) {
            Some((_, v)) => v.push(g.shallow_clone()),
            None => groups.push((g.device(), vec![g.shallow_clone()])),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_on_inf_and_grows_after_the_interval() {
        let cfg = GradScalerConfig { init_scale: 1024.0, growth_interval: 2, ..Default::default() };
        let mut s = GradScaler::new(cfg, Device::Cpu).unwrap();
        let mut scales = vec![];
        for inf in [false, false, true, false, true, false, false] {
            s.update(inf).unwrap();
            scales.push(s.current_scale().unwrap());
        }
        assert_eq!(scales, vec![1024.0, 2048.0, 1024.0, 1024.0, 512.0, 512.0, 1024.0]);
        let st = s.state().unwrap();
        let mut t = GradScaler::new(GradScalerConfig::default(), Device::Cpu).unwrap();
        t.load_state(&st).unwrap();
        assert_eq!(t.state().unwrap(), st);
    }

    #[test]
    fn unscale_divides_by_the_scale_and_flags_inf() {
        let s = GradScaler::new(GradScalerConfig { init_scale: 8.0, ..Default::default() }, Device::Cpu).unwrap();
        let g = Tensor::from_slice(&[8.0f32, 16.0]);
        let found = s.unscale_(&[g.shallow_clone()]).unwrap();
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![1.0, 2.0]);
        assert_eq!(found.double_value(&[]), 0.0);
        let nan = Tensor::from_slice(&[f32::NAN]);
        assert_eq!(s.unscale_(&[g, nan]).unwrap().double_value(&[]), 1.0);
    }
}
