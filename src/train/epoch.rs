//! One epoch: the sampler's order for this rank, the optimizer steps over it (logging, stop
//! requests and periodic checkpoints between them), then the epoch's metrics and evaluation.

use super::position;
use super::{agree, evaluate, io_err, EpochSummary, TrainError, Trainer};
use crate::data::Loader;
use crate::telemetry::Progress;
use serde_json::json;
use std::io::Write;
use std::time::Instant;

impl Trainer<'_> {
    pub(crate) fn run_epoch(&mut self) -> Result<EpochSummary, TrainError> {
        let (rank, world) = (self.rank(), self.comm.world_size());
        let cfg = self.cfg;
        let t = &cfg.train;
        let epoch = self.pos.epoch;
        self.sampler.set_epoch(epoch as u64);
        let indices = self.sampler.indices_from(self.pos.epoch_base as usize);
        let batches_in_shard = indices.len().div_ceil(t.batch_size) as u64;
        // Equal data means equal step counts; a rank that would take a different number of
        // steps would leave the others waiting in a collective, so it is an error here instead.
        agree(self.comm, "steps in this epoch", batches_in_shard.to_string().as_bytes())?;
        if batches_in_shard == 0 && self.pos.epoch_base == 0 {
            return Err(TrainError::Disagree(format!(
                "no training batches: {} samples over {world} ranks with drop_last={}",
                self.splits.train.len(),
                t.drop_last
            )));
        }
        let skip = (self.pos.steps_in_shard as usize * t.batch_size).min(indices.len());
        let todo: Vec<usize> = indices[skip..].to_vec();
        let mut loader = Loader::spawn_workers(
            self.splits.train.clone(),
            todo.clone(),
            t.batch_size,
            self.cfg.data.prefetch_batches,
            epoch as u64,
            self.cfg.data.workers,
        )?;
        let shown_total =
            position::last_batch_shown(batches_in_shard, self.pos.steps_in_shard, self.pos.global_step, t.max_steps, t.grad_accum_steps);
        let progress = Progress::new(rank == 0, epoch, shown_total);
        let started = Instant::now();
        // Time spent in mid-epoch evaluation, kept out of the training throughput.
        let mut eval_time = std::time::Duration::ZERO;
        let (mut loss_sum, mut samples, mut steps) = (0.0f64, 0usize, 0u64);
        let mut window = (Instant::now(), 0usize);
        let mut epoch_complete = true;
        let mut taken = 0usize;
        loop {
            let batches_left = batches_in_shard.saturating_sub(self.pos.steps_in_shard);
            if batches_left == 0 {
                break;
            }
            if t.max_steps.is_some_and(|m| self.pos.global_step >= m) {
                epoch_complete = false;
                break;
            }
            if let Some(f) = &self.fault {
                f.check(rank, self.pos.global_step);
            }
            let micro = position::micro_batches_in_step(batches_left, t.grad_accum_steps);
            let epoch_ends = micro == batches_left;
            let log_step = (self.pos.global_step + 1) % t.log_every_steps == 0 || epoch_ends;
            let log_now = rank == 0 && log_step;
            // Sharded (ZeRO-1), the norm is a collective: every rank computes it when rank 0 logs.
            let want_norm = if self.zero.is_some() { log_step } else { log_now };
            let out = self.step(&mut loader, micro, &todo, &mut taken, want_norm)?;
            self.skipped_steps += u64::from(out.skipped);
            loss_sum += out.loss * out.samples as f64;
            samples += out.samples;
            window.1 += out.samples;
            steps += 1;
            let step = self.pos.steps_in_shard;
            // Every rank's phase means over the logging window: TensorBoard (rank 0) and
            // ringrun's status line (the slowest rank).
            let phases = if log_step { self.timing.take_window() } else { Vec::new() };
            let rate = (window.1 * world) as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
            if log_step && self.status_line {
                self.emit_status(&out, rate, &phases, batches_in_shard);
            }
            if log_now {
                progress.update(step, out.loss, rate);
                let mut line = json!({"kind": "step", "epoch": epoch, "step": step, "global_step": self.pos.global_step,
                                      "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm, "samples_per_s": rate});
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
                if !progress.is_bar() && !self.status_line {
                    tracing::info!(
                        "epoch {epoch} step {step}/{shown_total} loss {:.4} lr {:.3e}{} {}",
                        out.loss,
                        out.lr,
                        out.grad_norm.map(|g| format!(" grad_norm {g:.3}")).unwrap_or_default(),
                        tokens.unwrap_or_else(|| format!("{rate:.0} samples/s"))
                    );
                }
                self.metrics.write(line).map_err(io_err("metrics.jsonl"))?;
            }
            if log_step {
                window = (Instant::now(), 0);
            }
            let eval_every = t.eval_every_steps;
            // The last step of the epoch or of training is evaluated after the epoch anyway.
            let ending = step >= batches_in_shard || t.max_steps.is_some_and(|m| self.pos.global_step >= m) || out.stop_votes > 0.0;
            if t.eval && eval_every > 0 && self.pos.global_step % eval_every == 0 && !ending {
                let t0 = Instant::now();
                self.evaluate_now(epoch)?;
                eval_time += t0.elapsed();
                window.0 += t0.elapsed();
            }
            if out.stop_votes > 0.0 {
                progress.finish();
                tracing::warn!("stop requested: stopping after step {}", self.pos.global_step);
                if step < batches_in_shard {
                    self.checkpoint("shutdown")?;
                }
                self.stopped = true;
                epoch_complete = step >= batches_in_shard;
                break;
            }
            let every = self.cfg.checkpoint.every_steps;
            if every > 0 && self.pos.global_step % every == 0 && step < batches_in_shard {
                self.checkpoint("every_steps")?;
            }
        }
        drop(loader);
        progress.finish();
        if epoch_complete {
            self.pos.epoch += 1;
            self.pos.epoch_base = 0;
            self.pos.steps_in_shard = 0;
            self.checkpoint("epoch_end")?;
        }
        let train_secs = started.elapsed().saturating_sub(eval_time).as_secs_f64();
        let samples_per_s = (samples * world) as f64 / train_secs.max(1e-9);
        let step_ms = self.timing.take();
        if rank == 0 {
            tracing::info!(
                "epoch {epoch} per step (ms): {}",
                step_ms.iter().map(|(k, v)| format!("{k} {:.2}", v.as_f64().unwrap_or(0.0))).collect::<Vec<_>>().join(", ")
            );
        }
        // Mean training loss over all ranks' samples.
        let mut acc = [loss_sum as f32, samples as f32];
        self.comm.all_reduce_sum(&mut acc)?;
        let train_loss = if acc[1] > 0.0 { (acc[0] / acc[1]) as f64 } else { f64::NAN };
        let test = match t.eval && !self.stopped {
            true => Some(evaluate(
                self.model.as_ref(),
                self.task.as_ref(),
                &self.splits.test,
                self.comm,
                self.device,
                self.precision,
                self.cfg.data.workers,
            )?),
            false => None,
        };
        let shown: String = test.iter().flat_map(|r| r.metrics.iter()).map(|(k, v)| format!(" test_{k} {}", fmt_metric(k, *v))).collect();
        tracing::info!(
            "epoch {epoch}{}: train_loss {train_loss:.4}{shown} {samples_per_s:.0} samples/s ({steps} steps, {train_secs:.1}s)",
            if test.is_some() { " done" } else { "" }
        );
        let mut line = json!({
            "kind": "epoch", "epoch": epoch, "train_loss": train_loss,
            "samples_per_s": samples_per_s, "steps": steps, "global_step": self.pos.global_step, "seconds": train_secs,
            "complete": epoch_complete, "step_ms": step_ms, "peak_rss_mib": super::peak_rss_mib(),
        });
        for (k, v) in test.iter().flat_map(|r| r.metrics.iter()) {
            line[format!("test_{k}")] = json!(v);
        }
        if self.cfg.data.corrupt_images == crate::config::CorruptImages::Skip {
            // Every rank counts what its loader left out; the total is reported, never silent.
            let ((a, first_a), (b, first_b)) = (self.splits.train.skipped(), self.splits.test.skipped());
            // f32 counts exactly up to 2^24 skipped images.
            let mut total = [(a + b) as f32];
            self.comm.all_reduce_sum(&mut total)?;
            line["skipped_images"] = json!(total[0] as u64);
            if a + b > 0 {
                tracing::warn!(
                    "{} unreadable image(s) skipped so far on all ranks ({} here), e.g. {}",
                    total[0] as u64,
                    a + b,
                    first_a.or(first_b).unwrap_or_default()
                );
            } else if total[0] > 0.0 && rank == 0 {
                tracing::warn!("{} unreadable image(s) skipped so far on all ranks", total[0] as u64);
            }
        }
        let mut scalars = vec![("train/epoch_loss".to_string(), train_loss)];
        scalars.extend(test.iter().flat_map(|r| r.metrics.iter()).map(|(k, v)| (format!("eval/{k}"), *v)));
        self.tb_scalars(&scalars);
        let tokens = self.throughput(samples_per_s, &mut line);
        if let Some(t) = tokens {
            tracing::info!("epoch {epoch} throughput: {t}");
        }
        self.metrics.write(line).map_err(io_err("metrics.jsonl"))?;
        Ok(EpochSummary { epoch, train_loss, test, samples_per_s })
    }
}

impl Trainer<'_> {
    /// One status record for ringrun's status line (stdout, one line).
    fn emit_status(&self, out: &super::step::StepOutcome, rate: f64, phases: &[(&'static str, f64)], batches_in_shard: u64) {
        let t = &self.cfg.train;
        let per_epoch =
            (batches_in_shard + self.pos.epoch_base / (t.batch_size * self.comm.world_size()).max(1) as u64).div_ceil(t.grad_accum_steps);
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
        let _ = writeln!(o, "{}{record}", crate::internal::status::MARKER).and_then(|_| o.flush());
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
        let peak = peak.flops * self.comm.world_size() as f64;
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
    fn evaluate_now(&mut self, epoch: usize) -> Result<(), TrainError> {
        let r = evaluate(
            self.model.as_ref(),
            self.task.as_ref(),
            &self.splits.test,
            self.comm,
            self.device,
            self.precision,
            self.cfg.data.workers,
        )?;
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
