//! From a config to a ready `Trainer`: every rank agrees on config and data, builds the model,
//! restores a checkpoint or `init_from` weights on rank 0, and wraps the model in `Ddp`, which
//! broadcasts rank 0's parameters and buffers.

use super::breakdown::Breakdown;
use super::position::{self, Position};
use super::{agree, io_err, resume, tasks, TrainContext, TrainError, Trainer};
use crate::data::{self, DistributedSampler};
use crate::ddp::{self, Ddp, DdpOptions, Zero};
use crate::models;
use crate::optim::Optimizer;
use crate::telemetry::Metrics;
use tch::Tensor;

impl<'a> Trainer<'a> {
    pub(crate) fn setup(ctx: TrainContext<'a>) -> Result<Trainer<'a>, TrainError> {
        let TrainContext { cfg, comm, run_dir, fault, resume, stop, sample_log, device } = ctx;
        let (rank, world) = (comm.rank(), comm.world_size());
        let t = &cfg.train;

        // Identical config everywhere, or the replicas silently diverge.
        agree(comm, "config", format!("{:016x}", ddp::fnv1a(ddp::FNV_OFFSET, cfg.to_yaml().as_bytes())).as_bytes())?;
        let load = data::LoadContext { context_length: cfg.model.spec.context_length(), seed: t.seed };
        let splits = data::load(&cfg.data, &load)?;
        agree(
            comm,
            "data (train samples, test samples, classes)",
            format!("{}, {}, {}", splits.train.len(), splits.test.len(), splits.classes).as_bytes(),
        )?;

        tch::manual_seed(t.seed as i64);
        let inputs = models::Inputs { sample_shape: &splits.sample_shape, classes: splits.classes };
        let model = cfg.model.build(&inputs, device).map_err(model_error)?;
        let task = tasks::build(cfg).map_err(TrainError::Startup)?;
        check_output(&*model, &*task, &splits, device)?;
        let params: Vec<(String, Tensor)> = model.named_parameters().iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect();
        let buffers: Vec<(String, Tensor)> = model.named_buffers().iter().map(|(n, b)| (n.clone(), b.shallow_clone())).collect();
        let state: Vec<(String, Tensor)> = params.iter().chain(&buffers).map(|(n, p)| (n.clone(), p.shallow_clone())).collect();
        let mut opt = Optimizer::new(&cfg.optimizer, &params);
        let checkpoints = run_dir.join("checkpoints");
        let tied = model.tied();
        let resumed = resume::restore(comm, &resume, &checkpoints, &state, &tied, &mut opt)?;
        if resumed.is_none() {
            if let Some(path) = &cfg.model.init_from {
                resume::init_from(comm, path, &state, &tied)?;
            }
        }
        let opts = DdpOptions {
            bucket_cap_bytes: (cfg.ddp.bucket_cap_mb * 1048576.0) as usize,
            first_bucket_cap_bytes: (cfg.ddp.first_bucket_cap_mb * 1048576.0) as usize,
            overlap: cfg.ddp.overlap,
            reduce_bf16: cfg.ddp.reduce_dtype == crate::config::ReduceDtype::Bf16,
            broadcast_buffers: cfg.ddp.broadcast_buffers,
            shard: cfg.optimizer.shard,
            ..DdpOptions::default()
        };
        if opts.force_collectives && world == 1 {
            tracing::info!("RINGTRAIN_FORCE_COLLECTIVES=1: collectives run at world size 1 (a check of the multi-rank paths)");
        }
        let ddp = Ddp::new(comm, params, buffers, opts)?;
        // ZeRO-1: from here on the optimizer holds this rank's slices (and their state) only.
        let (opt, zero) = match cfg.optimizer.shard {
            true => {
                let zero = Zero::new(&ddp, &*comm)?;
                let slices = zero.slices()?;
                let mine: i64 = slices.iter().map(|s| s.len).sum();
                let total: usize = ddp.named_parameters().iter().map(|(_, p)| p.numel()).sum();
                tracing::info!(
                    "optimizer sharded (ZeRO-1): rank {rank} steps {mine} of {total} parameter elements and keeps their {} state only",
                    opt.name()
                );
                let opt = opt.shard(slices).map_err(TrainError::Startup)?;
                (opt, Some(zero))
            }
            false => (opt, None),
        };
        let n_params: usize = ddp.named_parameters().iter().map(|(_, p)| p.numel()).sum();
        tracing::info!(
            "model {}: {} tensors, {n_params} parameters, {} buffer(s); {} bucket(s) {:?}{}; {world} rank(s) × batch {}{} on {} samples",
            cfg.model.name,
            ddp.named_parameters().len(),
            ddp.named_buffers().len(),
            ddp.bucket_layout().len(),
            ddp.bucket_layout(),
            if ddp.buckets_shared() { " in shared memory" } else { "" },
            t.batch_size,
            if t.grad_accum_steps > 1 { format!(" × {} micro-batches", t.grad_accum_steps) } else { String::new() },
            splits.train.len()
        );

        let scaler = grad_scaler(cfg, resumed.as_ref(), device)?;
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

        let metrics = Metrics::open((rank == 0).then(|| run_dir.join("metrics.jsonl")).as_deref()).map_err(io_err("metrics.jsonl"))?;
        let samples_file = match sample_log {
            true => {
                let dir = run_dir.join("samples");
                std::fs::create_dir_all(&dir).map_err(io_err(dir.display().to_string()))?;
                let p = dir.join(format!("rank{rank}.txt"));
                Some(std::fs::OpenOptions::new().create(true).append(true).open(&p).map_err(io_err(p.display().to_string()))?)
            }
            false => None,
        };
        // Best effort: a plot that cannot be written must not stop training.
        let tb = match rank == 0 && t.tensorboard {
            true => {
                match crate::telemetry::tensorboard::EventWriter::create(&run_dir.join("tb"), resumed.as_ref().map(|m| m.global_step)) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::warn!("no TensorBoard events: {}: {e}", run_dir.join("tb").display());
                        None
                    }
                }
            }
            false => None,
        };
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
        comm.barrier()?;
        Ok(Trainer {
            cfg,
            comm,
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

/// fp16's loss scaler, restored from the checkpoint being resumed (a checkpoint of a run in
/// another precision starts it afresh, said in the log).
fn grad_scaler(
    cfg: &crate::config::Config,
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
