//! Learning-rate schedules: the rate is a pure function of the optimizer step, so a resumed run
//! (which knows its step) continues the same curve with no scheduler state to save.

use serde::{Deserialize, Serialize};

/// The learning rate as a function of the optimizer step (0-based, as nanoGPT's `iter_num`), so a
/// resumed run continues the same curve.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleConfig {
    /// `optimizer.lr` throughout.
    Constant,
    /// torch.optim.lr_scheduler.StepLR: lr · gamma^⌊step / step_size⌋.
    Step { step_size: u64, gamma: f64 },
    /// nanoGPT's `get_lr`: linear warmup over `warmup_steps`, cosine decay to `min_lr` at
    /// `decay_steps`, `min_lr` after.
    WarmupCosine { warmup_steps: u64, decay_steps: u64, min_lr: f64 },
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig::Constant
    }
}

/// The learning rate for optimizer step `step` (0-based: the first step is 0, as nanoGPT's
/// `iter_num`), given the configured peak `lr`.
pub fn lr_at(schedule: &ScheduleConfig, lr: f64, step: u64) -> f64 {
    match *schedule {
        ScheduleConfig::Constant => lr,
        // StepLR after `step` scheduler steps: lr · gamma^⌊step / step_size⌋.
        ScheduleConfig::Step { step_size, gamma } => lr * gamma.powi((step / step_size.max(1)) as i32),
        // nanoGPT's get_lr (train.py): warmup to lr, cosine down to min_lr, then min_lr.
        ScheduleConfig::WarmupCosine { warmup_steps, decay_steps, min_lr } => {
            if step < warmup_steps {
                return lr * (step + 1) as f64 / (warmup_steps + 1) as f64;
            }
            if step > decay_steps || decay_steps <= warmup_steps {
                return min_lr;
            }
            let decay_ratio = (step - warmup_steps) as f64 / (decay_steps - warmup_steps) as f64;
            let coeff = 0.5 * (1.0 + (std::f64::consts::PI * decay_ratio).cos());
            min_lr + coeff * (lr - min_lr)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_schedule_is_steplr() {
        let s = ScheduleConfig::Step { step_size: 3, gamma: 0.5 };
        let got: Vec<f64> = (0..7).map(|i| lr_at(&s, 0.8, i)).collect();
        assert_eq!(got, vec![0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.2]);
        assert_eq!(lr_at(&ScheduleConfig::Constant, 0.3, 1000), 0.3);
    }

    #[test]
    fn warmup_cosine_matches_nanogpt_at_chosen_steps() {
        // (step, lr) from nanoGPT's get_lr evaluated by Python (scripts/reference/optim_fixture.py,
        // section `schedule`), learning_rate 6e-4, warmup_iters 10, lr_decay_iters 100, min_lr 6e-5.
        let s = ScheduleConfig::WarmupCosine { warmup_steps: 10, decay_steps: 100, min_lr: 6e-5 };
        for (step, want) in crate::optim::fixture::section("schedule").iter().map(|v| (v[0] as u64, v[1])) {
            let got = lr_at(&s, 6e-4, step);
            assert!((got - want).abs() <= 1e-15 * want.abs().max(1e-12), "step {step}: {got} vs nanoGPT {want}");
        }
    }
}
