//! From a config to a ready `Trainer`: every rank agrees on config and data, builds the model,
//! restores a checkpoint or `init_from` weights on rank 0, and wraps the model in `Ddp`, which
//! broadcasts rank 0's parameters and buffers.

use super::breakdown::Breakdown;
use super::position::{self, Position};
use super::{agree, io_err, resume, tasks, TrainContext, TrainError, Trainer};
use crate::config::Config;
use crate::data::{self, DistributedSampler};
use crate::ddp::{self, Ddp, DdpOptions, Zero};
use crate::models;
use crate::optim::Optimizer;
use crate::telemetry::Metrics;
use tch::Tensor;

/// The model and what comes with it, before `Ddp` wraps it.
struct Built {
    model: Box<dyn models::Model>,
    task: Box<dyn tasks::Task>,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
}

/// Rank 0's outputs beside the checkpoints.
struct Outputs {
    metrics: Metrics,
    samples_file: Option<std::fs::File>,
    tb: Option<crate::telemetry::tensorboard::EventWriter>,
}

impl<'a> Trainer<'a> {
    pub(crate) fn setup(ctx: TrainContext<'a>) -> Result<Trainer<'a>, TrainError> {
        let TrainContext { cfg, comm: handle, run_dir, fault, resume, stop, sample_log, device } = ctx;
        let (rank, world) = {
            let c = handle.lock();
            (c.rank(), c.world_size())
        };
        let t = &cfg.train;
        let checkpoints = run_dir.join("checkpoints");
        if resume == resume::Resume::No {
            resume::refuse_a_used_directory(&mut *handle.lock(), &checkpoints)?;
        }
        let splits = agree_and_load(&mut *handle.lock(), cfg)?;
        let Built { mut model, task, params, buffers } = build(cfg, &splits, device, &handle)?;
        if device == tch::Device::Cpu {
            // Before the gradients and optimizer state exist: refuse a job that cannot fit.
            let elements: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
            let elem = params.first().map_or(4, |(_, p)| p.kind().elt_size_in_bytes() as u64);
            let need = super::footprint::need(elements as u64, elem, &cfg.optimizer, cfg.shard(), world as u64);
            super::footprint::check(&mut *handle.lock(), &need, &cfg.optimizer, cfg.shard())?;
        }
        let state: Vec<(String, Tensor)> = params.iter().chain(&buffers).map(|(n, p)| (n.clone(), p.shallow_clone())).collect();
        let opt = Optimizer::new(&cfg.optimizer, &params);
        let tied = model.tied();
        let restored = resume::restore(&mut *handle.lock(), cfg, &resume, &checkpoints, &state, &tied, opt.name())?;
        let (resumed, pending) = restored.unzip();
        let run_id = resume::run_id(&mut *handle.lock(), resumed.as_ref())?;
        match &resumed {
            Some(_) => tracing::info!("run {run_id} continues"),
            None => tracing::info!("run {run_id} starts"),
        }
        if rank == 0 && resumed.is_some() {
            let resolved = run_dir.join("config.yaml");
            std::fs::write(&resolved, cfg.to_yaml()).map_err(io_err(resolved.display().to_string()))?;
        }
        if resumed.is_none() {
            if let Some(path) = &cfg.model.init_from {
                resume::init_from(&mut *handle.lock(), path, &state, &tied)?;
            }
        }
        let (ddp, mut opt, zero) = wrap(&handle, cfg, params, buffers, opt, model.unit_names())?;
        if let Some(hooks) = ddp.unit_hooks() {
            let units = models::Units { checkpoint: cfg.train.activation_checkpointing, hooks: Some(hooks) };
            model.set_units(units).map_err(|e| TrainError::Startup(format!("ddp.shard: params for model {}: {e}", cfg.model.name)))?;
        }
        if let Some(p) = pending {
            // After sharding: each rank keeps its slices only (ZeRO-1's memory, from the start).
            p.load_into(&mut *handle.lock(), &state, &mut opt)?;
        }
        // Freed large blocks wait for reuse from here on: the steps' own temporaries (setting
        // up's were given back, so its peak is what it was).
        crate::host_memory::keep_freed_blocks();
        // What setting up cost (a resumed ZeRO-1 run must not hold the whole optimizer state).
        tracing::info!("set up: peak resident memory {:.0} MiB", super::breakdown::peak_rss_mib());
        log_layout(cfg, &ddp, world, splits.train.len());
        let scaler = precision(cfg, resumed.as_ref(), device)?;
        let pos: Position = position::start(resumed.as_ref(), world, t.batch_size, splits.train.len());
        if let Some(m) = resumed.as_ref().filter(|m| m.epoch_world_size != world || m.batch_size != t.batch_size) {
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
        let Outputs { metrics, samples_file, tb } = outputs(cfg, run_dir, rank, sample_log, resumed.as_ref().map(|m| m.global_step))?;
        let sampler = DistributedSampler::new(splits.train.len(), world, rank, t.shuffle, t.seed, t.drop_last);
        // MFU's denominator, for models that count their FLOPs; measured before the barrier so
        // the ranks sharing a machine measure side by side, as they will train.
        let peak = match model.flops_per_token() {
            Some(_) => {
                let p = super::peak::peak(t.peak_tflops, device, t.precision)?;
                tracing::info!("MFU against {:.3} TFLOP/s per rank ({})", p.flops / 1e12, p.source);
                Some(p)
            }
            None => None,
        };
        // Every rank's timeline starts as the same barrier ends, so the merged timeline lines
        // the ranks up without trusting their wall clocks (skew: the barrier's exit, microseconds).
        handle.lock().barrier()?;
        Ok(Trainer {
            cfg,
            comm: handle,
            run_dir,
            checkpoints,
            fault,
            stop,
            device,
            precision: t.precision,
            scaler,
            skipped_steps: 0,
            peak,
            task,
            params: ddp.parameters(),
            model,
            ddp,
            opt,
            zero,
            splits,
            last_saved: resumed.as_ref().map(|m| m.global_step),
            run_id,
            pos,
            metrics,
            tb,
            samples_file,
            sampler,
            timing: Breakdown::new(rank, t.trace),
            status_line: std::env::var("RINGTRAIN_STATUS").is_ok_and(|v| !v.is_empty()),
            stopped: false,
        })
    }
}

/// Identical config everywhere (or the replicas silently diverge), then the data, whose sizes
/// every rank must agree on too.
fn agree_and_load(comm: &mut dyn crate::comm::Communicator, cfg: &Config) -> Result<data::Splits, TrainError> {
    agree(comm, "config", format!("{:016x}", ddp::fnv1a(ddp::FNV_OFFSET, cfg.to_yaml().as_bytes())).as_bytes())?;
    let load = data::LoadContext { context_length: cfg.model.spec.context_length(), seed: cfg.train.seed };
    let splits = data::load(&cfg.data, &load)?;
    agree(
        comm,
        "data (train samples, test samples, classes)",
        format!("{}, {}, {}", splits.train.len(), splits.test.len(), splits.classes).as_bytes(),
    )?;
    Ok(splits)
}

/// The replica from the seed, its task, and its named tensors; its output checked against the
/// task before anything trains.
fn build(cfg: &Config, splits: &data::Splits, device: tch::Device, comm: &crate::comm::CommHandle) -> Result<Built, TrainError> {
    tch::manual_seed(cfg.train.seed as i64);
    let inputs = models::Inputs { sample_shape: &splits.sample_shape, classes: splits.classes, comm: Some(comm) };
    let mut model = cfg.model.build(&inputs, device).map_err(model_error)?;
    if cfg.shard() == ddp::Shard::Params && model.unit_names().is_empty() {
        return Err(TrainError::Startup(format!(
            "ddp.shard: params shards the parameters by unit, and model {} has none (GPT's blocks and ResNet's stages are units, \
             a TorchScript module's are named in model.units); use ddp.shard: grads",
            cfg.model.name
        )));
    }
    if cfg.train.activation_checkpointing {
        // Set now (checked before anything else is built); ZeRO-3 adds its hooks after wrapping.
        model
            .set_units(models::Units { checkpoint: true, hooks: None })
            .map_err(|e| TrainError::Startup(format!("train.activation_checkpointing for model {}: {e}", cfg.model.name)))?;
        let units = model.unit_names();
        tracing::info!("activation checkpointing: {} unit(s) recomputed in backward ({})", units.len(), units.join(", "));
    }
    let task = tasks::build(cfg, comm).map_err(TrainError::Startup)?;
    check_output(&*model, &*task, splits, device)?;
    let named = |v: &[(String, Tensor)]| v.iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect::<Vec<_>>();
    let (params, buffers) = (named(model.named_parameters()), named(model.named_buffers()));
    Ok(Built { model, task, params, buffers })
}

/// `Ddp` around the parameters (broadcasting rank 0's), and with `ddp.shard` (or
/// `optimizer.shard`) the ZeRO wrapper, after which the optimizer holds this rank's slices (and
/// their state) only.
fn wrap(
    handle: &crate::comm::CommHandle,
    cfg: &Config,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
    opt: Optimizer,
    units: Vec<String>,
) -> Result<(Ddp, Optimizer, Option<Zero>), TrainError> {
    let opts = DdpOptions {
        bucket_cap_bytes: (cfg.ddp.bucket_cap_mb * 1048576.0) as usize,
        first_bucket_cap_bytes: (cfg.ddp.first_bucket_cap_mb * 1048576.0) as usize,
        overlap: cfg.ddp.overlap,
        reduce_bf16: cfg.ddp.reduce_dtype == crate::config::ReduceDtype::Bf16,
        broadcast_buffers: cfg.ddp.broadcast_buffers,
        shard: cfg.shard(),
        units,
        prefetch: cfg.ddp.prefetch,
        reshard_after_forward: cfg.ddp.reshard_after_forward,
        ..DdpOptions::default()
    };
    let rank = handle.lock().rank();
    if opts.force_collectives && handle.lock().world_size() == 1 {
        tracing::info!("RINGTRAIN_FORCE_COLLECTIVES=1: collectives run at world size 1 (a check of the multi-rank paths)");
    }
    if opts.free_storage && cfg.shard() >= crate::ddp::Shard::Grads && rank == 0 {
        tracing::info!("RINGTRAIN_FREE_STORAGE=1: ZeRO frees its buffers' storage between uses, as on a device (a check of that path)");
    }
    let ddp = Ddp::new(handle, params, buffers, opts)?;
    if !cfg.shard().is_on() {
        return Ok((ddp, opt, None));
    }
    let zero = Zero::new(&ddp, &mut *handle.lock())?;
    let slices = zero.slices()?;
    let mine: i64 = slices.iter().map(|s| s.len).sum();
    let total: usize = ddp.named_parameters().iter().map(|(_, p)| p.numel()).sum();
    tracing::info!(
        "optimizer sharded ({}): rank {rank} steps {mine} of {total} parameter elements and keeps their {} state only{}",
        cfg.shard().stage(),
        opt.name(),
        match cfg.shard() {
            ddp::Shard::Grads => " and their averaged gradients between steps",
            ddp::Shard::Params => ", their averaged gradients, and their parameters between uses (each unit gathered while it runs)",
            _ => "",
        }
    );
    if cfg.shard() == ddp::Shard::Params {
        // ZeRO-3 is for a model that does not fit otherwise: what it frees must reach the
        // kernel, not stay in the allocator's heap (about 0.1 of DDP's peak for the GPT of
        // scripts/bench_memory.sh, at about 10% of step time in page faults). ZeRO-2, chosen
        // for speed with less memory, keeps glibc's default.
        ddp::give_back_freed_memory();
    }
    let opt = zero.shard_optimizer(opt)?;
    Ok((ddp, opt, Some(zero)))
}

fn log_layout(cfg: &Config, ddp: &Ddp, world: usize, train_samples: usize) {
    let t = &cfg.train;
    let n_params: usize = ddp.named_parameters().iter().map(|(_, p)| p.numel()).sum();
    tracing::info!(
        "model {}: {} tensors, {n_params} parameters, {} buffer(s); {} bucket(s) {:?}{}; {world} rank(s) × batch {}{} on {train_samples} samples",
        cfg.model.name,
        ddp.named_parameters().len(),
        ddp.named_buffers().len(),
        ddp.bucket_layout().len(),
        ddp.bucket_layout(),
        if ddp.buckets_shared() { " in shared memory" } else { "" },
        t.batch_size,
        if t.grad_accum_steps > 1 { format!(" × {} micro-batches", t.grad_accum_steps) } else { String::new() },
    );
}

/// Autocast as libtorch reports it, and fp16's loss scaler.
fn precision(
    cfg: &Config,
    resumed: Option<&crate::checkpoint::Meta>,
    device: tch::Device,
) -> Result<Option<crate::amp::GradScaler>, TrainError> {
    let t = &cfg.train;
    let scaler = grad_scaler(cfg, resumed, device)?;
    if t.precision.autocast_kind().is_some() {
        // What libtorch itself reports inside the autocast region training uses: the GPU
        // check looks for this line (a "bf16" that ran as fp16 once went unseen).
        let (on, dtype) = crate::amp::autocast(device, t.precision, || crate::amp::autocast_state(device))??;
        tracing::info!("autocast on {device:?}: dtype {dtype:?}, enabled {on} (read back from libtorch)");
    }
    if t.precision == crate::amp::Precision::Fp16 && !device.is_cuda() {
        // Measured: the reference CNN trains two orders of magnitude slower in fp16 than in fp32 on a CPU
        // without AVX512-FP16, under PyTorch's CPU autocast too.
        tracing::warn!(
            "train.precision fp16 on the CPU: libtorch's fp16 CPU kernels are slow (PyTorch's too); bf16 is the CPU's fast path"
        );
    }
    Ok(scaler)
}

/// metrics.jsonl (rank 0), the sample log (tests), TensorBoard events (rank 0, best effort: a
/// chart that cannot be written must not stop training).
fn outputs(
    cfg: &Config,
    run_dir: &std::path::Path,
    rank: usize,
    sample_log: bool,
    resumed_step: Option<u64>,
) -> Result<Outputs, TrainError> {
    let metrics = Metrics::open((rank == 0).then(|| run_dir.join("metrics.jsonl")).as_deref()).map_err(io_err("metrics.jsonl"))?;
    let samples_file = match sample_log {
        true => {
            let dir = run_dir.join("samples");
            std::fs::create_dir_all(&dir).map_err(io_err(dir.display().to_string()))?;
            let p = dir.join(format!("rank{rank}.txt"));
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&p).map_err(io_err(p.display().to_string()))?;
            // Each start marks where it resumed, and which restart of the group it is (a rank may
            // log into another file after a restart): what an earlier start logged past this step
            // was work lost to a failure.
            let restart = std::env::var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|_| "0".into());
            let mark = format!("# start after global step {} (restart {restart})\n", resumed_step.unwrap_or(0));
            std::io::Write::write_all(&mut f, mark.as_bytes()).map_err(io_err(p.display().to_string()))?;
            Some(f)
        }
        false => None,
    };
    let tb = match rank == 0 && cfg.train.tensorboard {
        true => match crate::telemetry::tensorboard::EventWriter::create(&run_dir.join("tb"), resumed_step) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("no TensorBoard events: {}: {e}", run_dir.join("tb").display());
                None
            }
        },
        false => None,
    };
    Ok(Outputs { metrics, samples_file, tb })
}

/// fp16's loss scaler, restored from the checkpoint being resumed (a checkpoint of a run in
/// another precision starts it afresh, said in the log).
fn grad_scaler(
    cfg: &Config,
    resumed: Option<&crate::checkpoint::Meta>,
    device: tch::Device,
) -> Result<Option<crate::amp::GradScaler>, TrainError> {
    let t = &cfg.train;
    if t.precision != crate::amp::Precision::Fp16 {
        return Ok(None);
    }
    let mut scaler = crate::amp::GradScaler::new(t.grad_scaler.clone(), device)?;
    match resumed.map(|m| m.grad_scaler) {
        Some(Some(state)) => {
            scaler.load_state(&state)?;
            tracing::info!("fp16 loss scale {} restored (growth tracker {})", state.scale, state.growth_tracker);
        }
        Some(None) => tracing::info!("the checkpoint has no fp16 loss scale: starting at {}", t.grad_scaler.init_scale),
        None => {}
    }
    Ok(Some(scaler))
}

/// The model's evaluation-mode output on two training samples has the shape the task needs: a
/// wrong TorchScript output (or `model.output`) is named before training, not met as a
/// cross-entropy error mid-step. Evaluation mode under no_grad changes no state and draws no
/// random numbers.
fn check_output(model: &dyn models::Model, task: &dyn tasks::Task, splits: &data::Splits, device: tch::Device) -> Result<(), TrainError> {
    let n = splits.train.len().min(2);
    if n == 0 {
        return Ok(());
    }
    let indices: Vec<usize> = (0..n).collect();
    let batch = splits.train.batch(&indices, 0)?.to_device(device)?;
    let logits = tch::no_grad(|| model.forward_t(&batch.input, false)).map_err(model_error)?;
    task.check_output(&logits, &batch, splits.classes).map_err(TrainError::Startup)
}

/// A model's own errors (a TorchScript file, a shape that does not fit) are already in words:
/// shown as they are, not as a libtorch failure.
fn model_error(e: tch::TchError) -> TrainError {
    match e {
        tch::TchError::Torch(msg) => TrainError::Startup(msg),
        other => TrainError::Torch(other),
    }
}
