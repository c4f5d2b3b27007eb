//! The training loop. Reads like DDP's pseudo-code:
//!
//! ```text
//! check every rank agrees on config and data; build model; broadcast rank 0's parameters
//! for epoch: sampler.set_epoch(epoch)
//!   for batch: zero grads → forward → loss → backward → all-reduce buckets (average) → step
//!   evaluate on the test set sharded across ranks; rank 0 writes the epoch's metrics
//! ```

pub mod breakdown;
mod checkpointing;
mod eval;
pub mod optim;
mod resume;

pub use eval::{evaluate, EvalResult};
pub use optim::Optimizer;
pub use resume::Resume;

use crate::comm::{CommError, Communicator};
use crate::config::Config;
use crate::data::{self, DataError, DistributedSampler, Loader};
use crate::ddp::{self, DdpError, Reducer};
use crate::fault::Fault;
use crate::models;
use crate::telemetry::{Metrics, Progress};
use breakdown::{peak_rss_mib, Breakdown, Phase};
use checkpointing::Position;
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Ddp(#[from] DdpError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("ranks disagree: {0}")]
    Disagree(String),
    #[error("{0}")]
    Startup(String),
}

pub struct TrainContext<'a> {
    pub cfg: &'a Config,
    pub comm: &'a mut dyn Communicator,
    pub run_dir: &'a Path,
    pub fault: Option<Fault>,
    pub resume: Resume,
    /// Set by a signal handler: finish the step, checkpoint, stop.
    pub stop: Arc<AtomicBool>,
    /// Test aid: every rank appends "epoch sample" lines to samples/rankN.txt.
    pub sample_log: bool,
    /// Where this rank computes (device::select).
    pub device: tch::Device,
}

#[derive(Clone, Debug)]
pub struct EpochSummary {
    pub epoch: usize,
    pub train_loss: f64,
    pub test: Option<EvalResult>,
    pub samples_per_s: f64,
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub global_steps: u64,
    pub epochs: Vec<EpochSummary>,
    pub param_hash: u64,
    /// Ended early on a stop request (after writing a checkpoint).
    pub stopped: bool,
    pub rank: usize,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TrainError {
    let what = what.into();
    move |source| TrainError::Io { what, source }
}

/// Fails unless every rank contributed the same bytes; names the first rank that differs.
fn agree(comm: &mut dyn Communicator, what: &str, mine: &[u8]) -> Result<(), TrainError> {
    let all = comm.all_gather(mine)?;
    if let Some(r) = all.iter().position(|v| v != &all[0]) {
        return Err(TrainError::Disagree(format!(
            "rank {r}'s {what} differs from rank 0's: {} vs {}",
            String::from_utf8_lossy(&all[r]),
            String::from_utf8_lossy(&all[0])
        )));
    }
    Ok(())
}

pub fn run(ctx: TrainContext<'_>) -> Result<Summary, TrainError> {
    let TrainContext { cfg, comm, run_dir, fault, resume, stop, sample_log, device } = ctx;
    let (rank, world) = (comm.rank(), comm.world_size());
    let t = &cfg.train;

    // Identical config everywhere, or the replicas silently diverge.
    agree(comm, "config", format!("{:016x}", ddp::fnv1a(ddp::FNV_OFFSET, cfg.to_yaml().as_bytes())).as_bytes())?;

    let splits = data::load(&cfg.data)?;
    let classes = splits.train.classes.max(splits.test.classes);
    agree(
        comm,
        "data (train samples, test samples, classes)",
        format!("{}, {}, {classes}", splits.train.len(), splits.test.len()).as_bytes(),
    )?;

    tch::manual_seed(t.seed as i64);
    let model = models::build(&cfg.model, &splits.train.sample_shape, classes, device)?;
    let named = model.named_parameters();
    let params: Vec<Tensor> = named.iter().map(|(_, p)| p.shallow_clone()).collect();
    let mut opt = Optimizer::new(&cfg.optimizer, &params);
    let checkpoints = run_dir.join("checkpoints");
    let resumed = resume::restore(comm, &resume, &checkpoints, named, &mut opt)?;
    if resumed.is_none() {
        if let Some(path) = &cfg.model.init_from {
            resume::init_from(comm, path, named)?;
        }
    }
    ddp::sync_replicas(comm, named)?;
    let mut reducer = Reducer::new(
        &params,
        (cfg.ddp.first_bucket_cap_mb * 1048576.0) as usize,
        (cfg.ddp.bucket_cap_mb * 1048576.0) as usize,
        if comm.device_native() { device } else { tch::Device::Cpu },
        cfg.ddp.reduce_dtype == crate::config::ReduceDtype::Bf16,
    )?;
    reducer.set_overlap(cfg.ddp.overlap);
    let bf16 = cfg.train.precision == crate::config::Precision::Bf16;
    let n_params: usize = params.iter().map(|p| p.numel()).sum();
    tracing::info!(
        "model {:?}: {} tensors, {n_params} parameters; {} bucket(s) {:?}; {world} rank(s) × batch {} on {} samples",
        cfg.model.name,
        params.len(),
        reducer.bucket_layout().len(),
        reducer.bucket_layout(),
        t.batch_size,
        splits.train.len()
    );

    // Where to start: the epoch, the position in its order where this sharding begins, and how
    // many of this sharding's steps are already done (see checkpoint::Meta).
    let mut pos = Position { global_step: 0, epoch: 0, epoch_base: 0, steps_in_shard: 0 };
    if let Some(m) = &resumed {
        pos.global_step = m.global_step;
        pos.epoch = m.epoch;
        if m.epoch_world_size == world && m.batch_size == t.batch_size {
            pos.epoch_base = m.epoch_base;
            pos.steps_in_shard = m.steps_in_shard;
        } else {
            // Different world size or batch: the samples of the epoch not yet seen are
            // re-sharded across the new ranks; none is repeated or skipped.
            pos.epoch_base = (m.epoch_base + m.steps_in_shard * (m.batch_size * m.epoch_world_size) as u64).min(splits.train.len() as u64);
            pos.steps_in_shard = 0;
            tracing::info!(
                "epoch {} continues at a new layout ({world} ranks × batch {}, was {} × {}): positions {}..{} of its order re-sharded",
                m.epoch,
                t.batch_size,
                m.epoch_world_size,
                m.batch_size,
                pos.epoch_base,
                splits.train.len()
            );
        }
    }

    let mut metrics = Metrics::open((rank == 0).then(|| run_dir.join("metrics.jsonl")).as_deref()).map_err(io_err("metrics.jsonl"))?;
    let mut samples_file = match sample_log {
        true => {
            let dir = run_dir.join("samples");
            std::fs::create_dir_all(&dir).map_err(io_err(dir.display().to_string()))?;
            let p = dir.join(format!("rank{rank}.txt"));
            Some(std::fs::OpenOptions::new().create(true).append(true).open(&p).map_err(io_err(p.display().to_string()))?)
        }
        false => None,
    };
    let mut sampler = DistributedSampler::new(splits.train.len(), world, rank, t.shuffle, t.seed, t.drop_last);
    let mut epochs = Vec::new();
    let mut last_saved = resumed.as_ref().map(|m| m.global_step);
    let done = |step: u64, epoch: usize| match t.max_steps {
        Some(m) => step >= m,
        None => epoch >= t.epochs,
    };
    let mut stopped = false;
    let mut timing = Breakdown::new(rank, t.trace);
    while !done(pos.global_step, pos.epoch) {
        let epoch = pos.epoch;
        sampler.set_epoch(epoch as u64);
        let indices = sampler.indices_from(pos.epoch_base as usize);
        let batches_in_shard = indices.len().div_ceil(t.batch_size) as u64;
        // Equal data means equal step counts; a rank that would take a different number of
        // steps would leave the others waiting in a collective, so it is an error here instead.
        agree(comm, "steps in this epoch", batches_in_shard.to_string().as_bytes())?;
        if batches_in_shard == 0 && pos.epoch_base == 0 {
            return Err(TrainError::Disagree(format!(
                "no training batches: {} samples over {world} ranks with drop_last={}",
                splits.train.len(),
                t.drop_last
            )));
        }
        let skip = (pos.steps_in_shard as usize * t.batch_size).min(indices.len());
        let todo: Vec<usize> = indices[skip..].to_vec();
        let loader = Loader::spawn(splits.train.clone(), todo.clone(), t.batch_size, cfg.data.prefetch_batches);
        let progress = Progress::new(rank == 0, epoch, batches_in_shard);
        let started = Instant::now();
        let (mut loss_sum, mut samples, mut steps) = (0.0f64, 0usize, 0u64);
        let mut window = (Instant::now(), 0usize);
        let mut epoch_complete = true;
        let mut batches = loader.enumerate();
        loop {
            let waited = Instant::now();
            let Some((i, batch)) = batches.next() else { break };
            timing.record(Phase::DataWait, waited);
            if t.max_steps.is_some_and(|m| pos.global_step >= m) {
                epoch_complete = false;
                break;
            }
            if let Some(f) = &fault {
                f.check(rank, pos.global_step);
            }
            ddp::zero_grads(&params)?;
            let started_fwd = Instant::now();
            let (input, target) = (batch.input.f_to_device(device)?, batch.target.f_to_device(device)?);
            // bf16: forward (and so backward) under autocast; parameters stay fp32.
            let loss = tch::autocast(bf16, || -> Result<Tensor, tch::TchError> {
                let logits = model.forward(&input)?;
                logits.f_cross_entropy_loss::<Tensor>(&target, None, tch::Reduction::Mean, -100, 0.0)
            })?;
            timing.record(Phase::Forward, started_fwd);
            // Backward, and the gradient all-reduce (overlapped with backward where possible). A
            // stop request (SIGTERM/SIGINT) rides along with the gradients, so every rank stops
            // after the same step.
            let started_bwd = Instant::now();
            let mut backward_done = started_bwd;
            let stop_votes = reducer.backward_and_reduce(comm, f32::from(u8::from(stop.load(Ordering::Relaxed))), || {
                loss.f_backward()?;
                backward_done = Instant::now();
                Ok(())
            })?;
            // Communication here is what backward did not hide.
            timing.record_span(Phase::Backward, started_bwd, backward_done);
            timing.record_span(Phase::Communication, backward_done, Instant::now());
            if timing.tracing() {
                for (b, (s0, s1)) in reducer.last_bucket_times().iter().enumerate() {
                    timing.event(&format!("bucket {b}"), "all_reduce", *s0, *s1);
                }
            }
            let started_opt = Instant::now();
            opt.step()?;
            timing.record(Phase::Optimizer, started_opt);
            timing.step_done();
            let l = loss.f_double_value(&[])?;
            if let Some(f) = &mut samples_file {
                let ids = &todo[i * t.batch_size..(i * t.batch_size + batch.len).min(todo.len())];
                let lines: String = ids.iter().map(|id| format!("{epoch} {id}\n")).collect();
                f.write_all(lines.as_bytes()).map_err(io_err("sample log"))?;
            }
            loss_sum += l * batch.len as f64;
            samples += batch.len;
            window.1 += batch.len;
            steps += 1;
            pos.global_step += 1;
            pos.steps_in_shard += 1;
            let step = pos.steps_in_shard;
            if rank == 0 && (step % t.log_every_steps == 0 || step == batches_in_shard) {
                let rate = (window.1 * world) as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
                progress.update(step, l, rate);
                if !progress.is_bar() {
                    tracing::info!("epoch {epoch} step {step}/{batches_in_shard} loss {l:.4} {rate:.0} samples/s");
                }
                metrics
                    .write(json!({"kind": "step", "epoch": epoch, "step": step, "global_step": pos.global_step, "loss": l, "samples_per_s": rate}))
                    .map_err(io_err("metrics.jsonl"))?;
                window = (Instant::now(), 0);
            }
            if stop_votes > 0.0 {
                progress.finish();
                tracing::warn!("stop requested: stopping after step {}", pos.global_step);
                if step < batches_in_shard {
                    checkpointing::save(comm, cfg, &checkpoints, named, &opt, &pos, "shutdown")?;
                    last_saved = Some(pos.global_step);
                }
                stopped = true;
                epoch_complete = step >= batches_in_shard;
                break;
            }
            let every = cfg.checkpoint.every_steps;
            if every > 0 && pos.global_step % every == 0 && step < batches_in_shard {
                checkpointing::save(comm, cfg, &checkpoints, named, &opt, &pos, "every_steps")?;
                last_saved = Some(pos.global_step);
            }
        }
        progress.finish();
        if epoch_complete {
            pos.epoch += 1;
            pos.epoch_base = 0;
            pos.steps_in_shard = 0;
            checkpointing::save(comm, cfg, &checkpoints, named, &opt, &pos, "epoch_end")?;
            last_saved = Some(pos.global_step);
        }
        let train_secs = started.elapsed().as_secs_f64();
        let samples_per_s = (samples * world) as f64 / train_secs.max(1e-9);
        let step_ms = timing.take();
        if rank == 0 {
            tracing::info!(
                "epoch {epoch} per step (ms): {}",
                step_ms.iter().map(|(k, v)| format!("{k} {:.2}", v.as_f64().unwrap_or(0.0))).collect::<Vec<_>>().join(", ")
            );
        }
        // Mean training loss over all ranks' samples.
        let mut acc = [loss_sum as f32, samples as f32];
        comm.all_reduce_sum(&mut acc)?;
        let train_loss = if acc[1] > 0.0 { (acc[0] / acc[1]) as f64 } else { f64::NAN };
        let test = if t.eval && !stopped { Some(evaluate(model.as_ref(), &splits.test, comm, device, bf16)?) } else { None };
        if let Some(r) = &test {
            tracing::info!(
                "epoch {epoch} done: train_loss {train_loss:.4} test_loss {:.4} test_acc {:.2}% {samples_per_s:.0} samples/s ({steps} steps, {train_secs:.1}s)",
                r.loss,
                r.accuracy * 100.0
            );
        } else {
            tracing::info!("epoch {epoch}: train_loss {train_loss:.4} {samples_per_s:.0} samples/s ({steps} steps, {train_secs:.1}s)");
        }
        metrics
            .write(json!({
                "kind": "epoch", "epoch": epoch, "train_loss": train_loss,
                "test_loss": test.as_ref().map(|r| r.loss), "test_acc": test.as_ref().map(|r| r.accuracy),
                "samples_per_s": samples_per_s, "steps": steps, "global_step": pos.global_step, "seconds": train_secs,
                "complete": epoch_complete, "step_ms": step_ms, "peak_rss_mib": peak_rss_mib(),
            }))
            .map_err(io_err("metrics.jsonl"))?;
        epochs.push(EpochSummary { epoch, train_loss, test, samples_per_s });
        if stopped {
            break;
        }
    }
    if last_saved != Some(pos.global_step) {
        checkpointing::save(comm, cfg, &checkpoints, named, &opt, &pos, "end")?;
    }

    comm.barrier()?;
    if t.trace {
        let path = run_dir.join("trace").join(format!("rank{rank}.json"));
        timing.write_trace(&path).map_err(io_err(path.display().to_string()))?;
    }
    let param_hash = ddp::parameter_hash(named)?;
    finish_outputs(run_dir, rank, named, param_hash, pos.global_step)?;
    tracing::info!("{} {} steps; parameter hash {param_hash:016x}", if stopped { "stopped after" } else { "finished" }, pos.global_step);
    Ok(Summary { global_steps: pos.global_step, epochs, param_hash, stopped, rank })
}

/// Each rank records its parameter hash (equal on all ranks = bitwise-equal replicas); rank 0
/// writes the final weights as safetensors with PyTorch names, atomically.
fn finish_outputs(run_dir: &Path, rank: usize, named: &[(String, Tensor)], hash: u64, steps: u64) -> Result<(), TrainError> {
    let ranks_dir = run_dir.join("ranks");
    std::fs::create_dir_all(&ranks_dir).map_err(io_err(ranks_dir.display().to_string()))?;
    let report = json!({"rank": rank, "param_hash": format!("{hash:016x}"), "global_steps": steps, "peak_rss_mib": peak_rss_mib()});
    let path = ranks_dir.join(format!("rank{rank}.json"));
    std::fs::write(&path, format!("{report}\n")).map_err(io_err(path.display().to_string()))?;
    if rank == 0 {
        let tmp = run_dir.join("model.safetensors.tmp");
        let detached: Vec<(String, Tensor)> = named.iter().map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu))).collect();
        Tensor::write_safetensors(&detached, &tmp)?;
        std::fs::rename(&tmp, run_dir.join("model.safetensors")).map_err(io_err("model.safetensors"))?;
    }
    Ok(())
}
