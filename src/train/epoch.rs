//! One epoch: the sampler's order for this rank, the optimizer steps over it (logging, stop
//! requests and periodic checkpoints between them), then the epoch's metrics and evaluation.

use super::position;
use super::step::StepOutcome;
use super::tasks::EvalContext;
use super::{agree, evaluate, io_err, EpochSummary, TrainError, Trainer};
use crate::data::Loader;
use crate::telemetry::Progress;
use serde_json::json;
use std::io::Write;
use std::time::{Duration, Instant};

/// What one epoch carries from step to step.
struct EpochRun {
    epoch: usize,
    batches_in_shard: u64,
    /// The step count the progress lines show (bounded by `train.max_steps`).
    shown_total: u64,
    /// This rank's sample indices still to train on, and how many of them are taken.
    todo: Vec<usize>,
    taken: usize,
    progress: Progress,
    started: Instant,
    /// Time spent in mid-epoch evaluation, kept out of the training throughput.
    eval_time: Duration,
    loss_sum: f64,
    samples: usize,
    steps: u64,
    /// Start and samples of the logging window, for the rate shown.
    window: (Instant, usize),
    complete: bool,
}

impl Trainer<'_> {
    pub(crate) fn run_epoch(&mut self) -> Result<EpochSummary, TrainError> {
        let mut run = self.begin_epoch()?;
        let cfg = self.cfg;
        let t = &cfg.train;
        let mut loader = Loader::spawn_workers(
            self.splits.train.clone(),
            run.todo.clone(),
            t.batch_size,
            self.cfg.data.prefetch_batches,
            run.epoch as u64,
            self.cfg.data.workers,
        )?;
        while self.train_step(&mut run, &mut loader)? {}
        drop(loader);
        run.progress.finish();
        self.end_epoch(run)
    }

    /// The sampler's order for this rank from where the position stands.
    fn begin_epoch(&mut self) -> Result<EpochRun, TrainError> {
        let (rank, world) = (self.rank(), self.comm().world_size());
        let cfg = self.cfg;
        let t = &cfg.train;
        let epoch = self.pos.epoch;
        self.sampler.set_epoch(epoch as u64);
        let indices = self.sampler.indices_from(self.pos.epoch_base as usize);
        let batches_in_shard = indices.len().div_ceil(t.batch_size) as u64;
        // Equal data means equal step counts; a rank that would take a different number of
        // steps would leave the others waiting in a collective, so it is an error here instead.
        agree(&mut *self.comm(), "steps in this epoch", batches_in_shard.to_string().as_bytes())?;
        if batches_in_shard == 0 && self.pos.epoch_base == 0 {
            return Err(TrainError::Disagree(format!(
                "no training batches: {} samples over {world} ranks with drop_last={}",
                self.splits.train.len(),
                t.drop_last
            )));
        }
        let skip = (self.pos.steps_in_shard as usize * t.batch_size).min(indices.len());
        let shown_total =
            position::last_batch_shown(batches_in_shard, self.pos.steps_in_shard, self.pos.global_step, t.max_steps, t.grad_accum_steps);
        Ok(EpochRun {
            epoch,
            batches_in_shard,
            shown_total,
            todo: indices[skip..].to_vec(),
            taken: 0,
            progress: Progress::new(rank == 0, epoch, shown_total),
            started: Instant::now(),
            eval_time: Duration::ZERO,
            loss_sum: 0.0,
            samples: 0,
            steps: 0,
            window: (Instant::now(), 0),
            complete: true,
        })
    }

    /// One optimizer step and what follows it (logging, evaluation, stop, checkpoint); false
    /// when the epoch (or training) ends here.
    fn train_step(&mut self, run: &mut EpochRun, loader: &mut Loader) -> Result<bool, TrainError> {
        let cfg = self.cfg;
        let t = &cfg.train;
        let batches_left = run.batches_in_shard.saturating_sub(self.pos.steps_in_shard);
        if batches_left == 0 {
            return Ok(false);
        }
        if t.max_steps.is_some_and(|m| self.pos.global_step >= m) {
            run.complete = false;
            return Ok(false);
        }
        if let Some(f) = &self.fault {
            f.check(self.rank(), self.pos.global_step);
        }
        if let Some(pause) = super::fault::test_step_pause() {
            std::thread::sleep(pause);
        }
        let micro = position::micro_batches_in_step(batches_left, t.grad_accum_steps);
        let log_step = (self.pos.global_step + 1) % t.log_every_steps == 0 || micro == batches_left;
        let log_now = self.rank() == 0 && log_step;
        // Sharded (ZeRO-1), the norm is a collective: every rank computes it when rank 0 logs.
        let want_norm = if self.zero.is_some() { log_step } else { log_now };
        let out = self.step(loader, micro, &run.todo, &mut run.taken, want_norm)?;
        self.skipped_steps += u64::from(out.skipped);
        run.loss_sum += out.loss * out.samples as f64;
        run.samples += out.samples;
        run.window.1 += out.samples;
        run.steps += 1;
        if log_step {
            self.log_step(run, &out, log_now)?;
            run.window = (Instant::now(), 0);
        }
        self.after_step(run, &out)
    }

    /// A logged step: rank 0's progress, metrics.jsonl and TensorBoard; every rank's status
    /// record for ringrun's status line.
    fn log_step(&mut self, run: &mut EpochRun, out: &StepOutcome, log_now: bool) -> Result<(), TrainError> {
        let (epoch, step) = (run.epoch, self.pos.steps_in_shard);
        // Every rank's phase means over the logging window: TensorBoard (rank 0) and ringrun's
        // status line (the slowest rank).
        let phases = self.timing.take_window();
        let rate = (run.window.1 * self.comm().world_size()) as f64 / run.window.0.elapsed().as_secs_f64().max(1e-9);
        if self.status_line {
            self.emit_status(out, rate, &phases, run.batches_in_shard);
        }
        if !log_now {
            return Ok(());
        }
        run.progress.update(step, out.loss, rate);
        // The world size too: a resume may change it, and a curve is read against it.
        let mut line = json!({"kind": "step", "epoch": epoch, "step": step, "global_step": self.pos.global_step,
                              "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm, "samples_per_s": rate,
                              "world_size": self.comm().world_size()});
        let tokens = self.throughput(rate, &mut line);
        if let Some(s) = &self.scaler {
            // fp16: the scale after this step's update, and the steps skipped so far.
            line["loss_scale"] = json!(s.current_scale()?);
            line["skipped_steps"] = json!(self.skipped_steps);
        }
        let mut scalars: Vec<(String, f64)> =
            ["loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "flops_per_s", "mfu", "loss_scale"]
                .iter()
                .filter_map(|k| line[*k].as_f64().map(|v| (format!("train/{k}"), v)))
                .collect();
        scalars.extend(phases.iter().map(|(p, ms)| (format!("step_ms/{p}"), *ms)));
        self.tb_scalars(&scalars);
        // Under ringrun's status line the per-step lines would only scroll it away.
        if !run.progress.is_bar() && !self.status_line {
            tracing::info!(
                "epoch {epoch} step {step}/{} loss {:.4} lr {:.3e}{} {}",
                run.shown_total,
                out.loss,
                out.lr,
                out.grad_norm.map(|g| format!(" grad_norm {g:.3}")).unwrap_or_default(),
                tokens.unwrap_or_else(|| format!("{rate:.0} samples/s"))
            );
        }
        self.metrics.write(line).map_err(io_err("metrics.jsonl"))
    }

    /// Between steps: a mid-epoch evaluation, a stop request, a periodic checkpoint. False when
    /// a stop ends training here.
    fn after_step(&mut self, run: &mut EpochRun, out: &StepOutcome) -> Result<bool, TrainError> {
        let cfg = self.cfg;
        let t = &cfg.train;
        let step = self.pos.steps_in_shard;
        let eval_every = t.eval_every_steps;
        // The last step of the epoch or of training is evaluated after the epoch anyway.
        let ending = step >= run.batches_in_shard || t.max_steps.is_some_and(|m| self.pos.global_step >= m) || out.stop_votes > 0.0;
        if t.eval && eval_every > 0 && self.pos.global_step % eval_every == 0 && !ending {
            let t0 = Instant::now();
            self.evaluate_now(run.epoch)?;
            run.eval_time += t0.elapsed();
            run.window.0 += t0.elapsed();
        }
        if out.stop_votes > 0.0 {
            run.progress.finish();
            tracing::warn!("stop requested: stopping after step {}", self.pos.global_step);
            if step < run.batches_in_shard {
                self.checkpoint("shutdown")?;
            }
            self.stopped = true;
            run.complete = step >= run.batches_in_shard;
            return Ok(false);
        }
        let every = self.cfg.checkpoint.every_steps;
        if every > 0 && self.pos.global_step % every == 0 && step < run.batches_in_shard {
            self.checkpoint("every_steps")?;
        }
        Ok(true)
    }

    /// The epoch's end: its checkpoint, mean loss over all ranks, evaluation, and its line.
    fn end_epoch(&mut self, run: EpochRun) -> Result<EpochSummary, TrainError> {
        let (rank, world, epoch) = (self.rank(), self.comm().world_size(), run.epoch);
        if run.complete {
            self.pos.epoch += 1;
            self.pos.epoch_base = 0;
            self.pos.steps_in_shard = 0;
            self.checkpoint("epoch_end")?;
        }
        let train_secs = run.started.elapsed().saturating_sub(run.eval_time).as_secs_f64();
        let samples_per_s = (run.samples * world) as f64 / train_secs.max(1e-9);
        let step_ms = self.timing.take();
        if rank == 0 {
            tracing::info!(
                "epoch {epoch} per step (ms): {}",
                step_ms.iter().map(|(k, v)| format!("{k} {:.2}", v.as_f64().unwrap_or(0.0))).collect::<Vec<_>>().join(", ")
            );
        }
        // Mean training loss over all ranks' samples.
        let mut acc = [run.loss_sum as f32, run.samples as f32];
        self.comm().all_reduce_sum(&mut acc)?;
        let train_loss = if acc[1] > 0.0 { (acc[0] / acc[1]) as f64 } else { f64::NAN };
        let test = match self.cfg.train.eval && !self.stopped {
            true => Some(self.evaluate_test()?),
            false => None,
        };
        let shown: String = test.iter().flat_map(|r| r.metrics.iter()).map(|(k, v)| format!(" test_{k} {}", fmt_metric(k, *v))).collect();
        tracing::info!(
            "epoch {epoch}{}: train_loss {train_loss:.4}{shown} {samples_per_s:.0} samples/s ({} steps, {train_secs:.1}s)",
            if test.is_some() { " done" } else { "" },
            run.steps
        );
        let mut line = json!({
            "kind": "epoch", "epoch": epoch, "train_loss": train_loss,
            "samples_per_s": samples_per_s, "steps": run.steps, "global_step": self.pos.global_step, "seconds": train_secs,
            "complete": run.complete, "step_ms": step_ms, "peak_rss_mib": super::peak_rss_mib(),
        });
        for (k, v) in test.iter().flat_map(|r| r.metrics.iter()) {
            line[format!("test_{k}")] = json!(v);
        }
        if self.splits.may_skip {
            line["skipped_images"] = json!(self.count_skipped()?);
        }
        let mut scalars = vec![("train/epoch_loss".to_string(), train_loss)];
        scalars.extend(test.iter().flat_map(|r| r.metrics.iter()).map(|(k, v)| (format!("eval/{k}"), *v)));
        self.tb_scalars(&scalars);
        if let Some(t) = self.throughput(samples_per_s, &mut line) {
            tracing::info!("epoch {epoch} throughput: {t}");
        }
        self.metrics.write(line).map_err(io_err("metrics.jsonl"))?;
        Ok(EpochSummary { epoch, train_loss, test, samples_per_s })
    }

    /// Unreadable samples left out so far on all ranks (a collective): every rank counts what
    /// its loader skipped; the total is reported, never silent.
    fn count_skipped(&mut self) -> Result<u64, TrainError> {
        let ((a, first_a), (b, first_b)) = (self.splits.train.skipped(), self.splits.test.skipped());
        // f32 counts exactly up to 2^24 skipped images.
        let mut total = [(a + b) as f32];
        self.comm().all_reduce_sum(&mut total)?;
        let total = total[0] as u64;
        if a + b > 0 {
            tracing::warn!(
                "{total} unreadable image(s) skipped so far on all ranks ({} here), e.g. {}",
                a + b,
                first_a.or(first_b).unwrap_or_default()
            );
        } else if total > 0 && self.rank() == 0 {
            tracing::warn!("{total} unreadable image(s) skipped so far on all ranks");
        }
        Ok(total)
    }

    /// The test split through the model in evaluation mode, on every rank.
    fn evaluate_test(&mut self) -> Result<super::EvalResult, TrainError> {
        // Every rank evaluates the same model, the one a checkpoint saves: each rank's own
        // BatchNorm statistics would give a test accuracy no saved file reproduces.
        self.ddp.unify_buffers(self.cfg.ddp.eval_buffers)?;
        // ZeRO-3: whole parameters for the evaluation (ranks may run different numbers of
        // batches, so no unit may be gathered batch by batch).
        let _whole = self.ddp.full_state()?;
        let rank = self.rank();
        let mut comm = self.comm();
        let mut ctx = EvalContext {
            train: &self.splits.train,
            test: &self.splits.test,
            comm: &mut *comm,
            device: self.device,
            precision: self.precision,
            classes: self.splits.classes,
            workers: self.cfg.data.workers,
            run_dir: (rank == 0).then_some(self.run_dir),
        };
        if let Some(result) = self.task.evaluate(self.model.as_ref(), &mut ctx) {
            return result;
        }
        evaluate(self.model.as_ref(), self.task.as_ref(), &self.splits.test, ctx.comm, self.device, self.precision, self.cfg.data.workers)
    }
}

impl Trainer<'_> {
    /// One status record for ringrun's status line (stdout, one line).
    fn emit_status(&self, out: &StepOutcome, rate: f64, phases: &[(&'static str, f64)], batches_in_shard: u64) {
        let cfg = self.cfg;
        let t = &cfg.train;
        let per_epoch =
            (batches_in_shard + self.pos.epoch_base / (t.batch_size * self.comm().world_size()).max(1) as u64).div_ceil(t.grad_accum_steps);
        let total = t.max_steps.unwrap_or(per_epoch * t.epochs as u64);
        let (unit, rate) = match self.task.tokens_per_sample() {
            Some(n) => ("tokens/s", rate * n as f64),
            None => ("samples/s", rate),
        };
        // Compute time only: waiting in the all-reduce is longest on the fastest rank, so a sum
        // including it would make every rank look alike.
        let compute_ms: f64 = phases.iter().filter(|(p, _)| *p != "communication").map(|(_, ms)| ms).sum();
        let record = json!({"rank": self.rank(), "step": self.pos.global_step, "total": total, "epoch": self.pos.epoch,
                            "loss": out.loss, "rate": rate, "unit": unit, "step_ms": compute_ms});
        // A launcher gone away (EPIPE) must not fail training: the record is only for its screen.
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{}{record}", crate::telemetry::STATUS_MARKER).and_then(|_| o.flush());
    }

    /// Tokens/s, achieved FLOP/s and MFU into `line` for token tasks; the log text for them.
    fn throughput(&self, samples_per_s: f64, line: &mut serde_json::Value) -> Option<String> {
        let per_sample = self.task.tokens_per_sample()?;
        let tokens_per_s = samples_per_s * per_sample as f64;
        line["tokens_per_s"] = json!(tokens_per_s);
        let (Some(flops), Some(peak)) = (self.model.flops_per_token(), &self.peak) else {
            return Some(format!("{tokens_per_s:.0} tokens/s"));
        };
        // The rate is the whole job's: against every rank's peak.
        let achieved = flops * tokens_per_s;
        let peak = peak.flops * self.comm().world_size() as f64;
        line["flops_per_s"] = json!(achieved);
        line["mfu"] = json!(achieved / peak);
        Some(format!(
            "{tokens_per_s:.0} tokens/s, {:.2} GFLOP/s ({:.1}% of {:.3} TFLOP/s)",
            achieved / 1e9,
            100.0 * achieved / peak,
            peak / 1e12
        ))
    }

    /// Evaluation in the middle of an epoch (`train.eval_every_steps`): logged and written as an
    /// `eval` line of metrics.jsonl.
    pub(super) fn evaluate_now(&mut self, epoch: usize) -> Result<(), TrainError> {
        let r = self.evaluate_test()?;
        let shown: String = r.metrics.iter().map(|(k, v)| format!(" {k} {}", fmt_metric(k, *v))).collect();
        tracing::info!("eval at step {}:{shown}", self.pos.global_step);
        let mut line = json!({"kind": "eval", "epoch": epoch, "global_step": self.pos.global_step, "samples": r.samples});
        for (k, v) in &r.metrics {
            line[format!("test_{k}")] = json!(v);
        }
        self.tb_scalars(&r.metrics.iter().map(|(k, v)| (format!("eval/{k}"), *v)).collect::<Vec<_>>());
        self.metrics.write(line).map_err(io_err("metrics.jsonl"))
    }
}

/// Accuracy-like metrics as percentages, the rest with four decimals.
pub(crate) fn fmt_metric(name: &str, v: f64) -> String {
    if name == "acc" {
        format!("{:.2}%", v * 100.0)
    } else {
        format!("{v:.4}")
    }
}
