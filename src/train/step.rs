//! One optimizer step: the learning rate from the schedule, then each micro-batch's forward and
//! backward — only the last one all-reduces (DDP's `no_sync()` before it), carrying the stop
//! vote — then clipping and the update.

use super::breakdown::Phase;
use super::{io_err, TrainError, Trainer};
use crate::data::{Batch, DataError, Loader};
use crate::optim;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Instant;

pub(crate) struct StepOutcome {
    /// Mean loss over the step's samples (unscaled).
    pub loss: f64,
    pub samples: usize,
    /// Sum of every rank's stop request: > 0 means every rank stops after this step.
    pub stop_votes: f32,
    /// Global gradient norm after the all-reduce (when clipping, or when `want_norm`).
    pub grad_norm: Option<f64>,
    pub lr: f64,
    /// fp16: the step was skipped (non-finite gradients) and the loss scale backed off.
    pub skipped: bool,
}

impl Trainer<'_> {
    /// Takes `micro` batches from `loader` (the epoch's `todo` from position `taken` on, for the
    /// sample log) and makes one optimizer step of them.
    pub(crate) fn step(
        &mut self,
        loader: &mut Loader,
        micro: u64,
        todo: &[usize],
        taken: &mut usize,
        want_norm: bool,
    ) -> Result<StepOutcome, TrainError> {
        let lr = optim::lr_at(&self.cfg.optimizer.schedule, self.cfg.optimizer.lr, self.pos.global_step);
        self.opt.set_lr(lr);
        self.ddp.zero_grad()?;
        let (mut loss_sum, mut samples, mut stop_votes) = (0f64, 0usize, 0f32);
        for m in 0..micro {
            let batch = self.next_batch(loader, todo, taken)?;
            let len = batch.len;
            let (loss, votes) = self.forward_backward(batch, m, micro)?;
            stop_votes = votes;
            loss_sum += loss * len as f64;
            samples += len;
        }
        let (grad_norm, skipped) = self.update(want_norm)?;
        self.timing.step_done();
        self.pos.global_step += 1;
        self.pos.steps_in_shard += micro;
        Ok(StepOutcome { loss: loss_sum / samples.max(1) as f64, samples, stop_votes, grad_norm, lr, skipped })
    }

    /// The loader's next batch (time waited recorded; its sample ids logged when asked).
    fn next_batch(&mut self, loader: &mut Loader, todo: &[usize], taken: &mut usize) -> Result<Batch, TrainError> {
        let waited = Instant::now();
        let batch: Batch = match loader.next() {
            Some(b) => b?,
            None => return Err(DataError::Loader("the loader ended before the epoch's last batch".into()).into()),
        };
        self.timing.record(Phase::DataWait, waited);
        if let Some(f) = &mut self.samples_file {
            let ids = &todo[*taken..(*taken + batch.len).min(todo.len())];
            // With the step it trains in: work lost to a failure (steps after the checkpoint
            // resumed from) can be told apart.
            let step = self.pos.global_step + 1;
            let lines: String = ids.iter().map(|id| format!("{} {id} {step}\n", self.pos.epoch)).collect();
            f.write_all(lines.as_bytes()).map_err(io_err("sample log"))?;
        }
        *taken += self.cfg.train.batch_size;
        Ok(batch)
    }

    /// Micro-batch `m` of `micro`: forward and backward; the last one all-reduces the gradients
    /// with the stop vote. Returns the (unscaled) loss and, on the last, the sum of the votes.
    fn forward_backward(&mut self, batch: Batch, m: u64, micro: u64) -> Result<(f64, f32), TrainError> {
        let t = &self.cfg.train;
        // Dropout draws from libtorch's generator: seeded from (seed, rank, step, micro-batch)
        // so a resumed run draws the same masks (the generator's state is not checkpointed).
        if self.cfg.model.spec.random_in_training() {
            tch::manual_seed(dropout_seed(t.seed, self.comm().rank(), self.pos.global_step, m));
        }
        let started_fwd = Instant::now();
        let batch = batch.to_device(self.device)?;
        // bf16 / fp16: forward under autocast (backward follows the dtypes it recorded);
        // parameters, gradients and optimizer state stay fp32.
        // Under ZeRO-3, `Ddp::forward` prefetches each unit's parameters during the one before.
        let (device, precision, task, model) = (self.device, self.precision, &self.task, self.model.as_ref());
        let loss = self.ddp.forward(|| crate::amp::autocast(device, precision, || task.loss(model, &batch)))??;
        // Mean over the step's micro-batches; a single one is left untouched (bitwise as
        // without accumulation). fp16 then multiplies by the loss scale (GradScaler.scale).
        let scaled = if micro > 1 { loss.f_div_scalar(micro as f64)? } else { loss.shallow_clone() };
        let scaled = match &self.scaler {
            Some(s) => s.scale(&scaled)?,
            None => scaled,
        };
        self.timing.record(Phase::Forward, started_fwd);

        let last = m + 1 == micro;
        self.ddp.set_sync(last);
        let started_bwd = Instant::now();
        let mut backward_done = started_bwd;
        let vote = if last { f32::from(u8::from(self.stop.load(Ordering::Relaxed))) } else { 0.0 };
        let votes = self.ddp.backward_with(vote, || {
            scaled.f_backward()?;
            backward_done = Instant::now();
            Ok(())
        });
        self.ddp.set_sync(true);
        let votes = votes?;
        // Communication here is what backward did not hide.
        self.timing.record_span(Phase::Backward, started_bwd, backward_done);
        if last {
            self.timing.record_span(Phase::Communication, backward_done, Instant::now());
            if self.timing.tracing() {
                for (b, (s0, s1)) in self.ddp.last_bucket_times().iter().enumerate() {
                    self.timing.event(&format!("bucket {b}"), "all_reduce", *s0, *s1);
                }
            }
        }
        Ok((loss.f_double_value(&[])?, if last { votes } else { 0.0 }))
    }

    /// Unscale (fp16), clip or measure the gradient norm, step (unless fp16 skips it), and under
    /// ZeRO-1 gather the updated shards. Returns the norm and whether the step was skipped.
    fn update(&mut self, want_norm: bool) -> Result<(Option<f64>, bool), TrainError> {
        let started_opt = Instant::now();
        let skipped = self.unscale()?;
        let grad_norm = match (&self.zero, self.cfg.train.clip_grad_norm) {
            (Some(z), max) if max.is_some() || want_norm => Some(z.clip_grad_norm(&mut *self.comm(), &self.opt, max)?),
            (Some(_), _) => None,
            (None, Some(max)) => Some(optim::clip_grad_norm(&self.params, max)?),
            (None, None) if want_norm => Some(optim::grad_norm(&self.params)?),
            (None, None) => None,
        };
        // fp16: a step whose gradients overflowed on any rank is skipped everywhere.
        if !skipped {
            self.opt.step()?;
        }
        if let Some(s) = &mut self.scaler {
            s.update(skipped)?;
        }
        self.timing.record(Phase::Optimizer, started_opt);
        if let Some(z) = &self.zero {
            // ZeRO-1: every rank's updated shards to every rank.
            let started = Instant::now();
            z.gather_parameters(&mut *self.comm())?;
            self.timing.record(Phase::Communication, started);
        }
        Ok((grad_norm, skipped))
    }

    /// fp16: divides the gradients this rank steps by the loss scale and says whether the step
    /// must be skipped: any rank found an inf or a NaN (agreed by an all-reduce of the flags, as
    /// under ZeRO-1 each rank sees only its shards). Without a scaler, never.
    fn unscale(&mut self) -> Result<bool, TrainError> {
        let Some(scaler) = &self.scaler else { return Ok(false) };
        let found = tch::no_grad(|| scaler.unscale_(&self.opt.grads()))?;
        let mut flag = [found.f_double_value(&[])? as f32];
        if self.comm().world_size() > 1 || self.ddp.collectives_forced() {
            self.comm().all_reduce_sum(&mut flag)?;
        }
        Ok(flag[0] > 0.0)
    }
}

/// A seed for (seed, rank, step, micro-batch): FNV-1a of the four, non-negative for libtorch.
fn dropout_seed(seed: u64, rank: usize, step: u64, micro: u64) -> i64 {
    let mut bytes = Vec::with_capacity(32);
    for v in [seed, rank as u64, step, micro] {
        bytes.extend(v.to_le_bytes());
    }
    (crate::ddp::fnv1a(crate::ddp::FNV_OFFSET, &bytes) >> 1) as i64
}
