//! Gradient accumulation with `Ddp::no_sync`, plus the rest of the library's training kit:
//! ringtrain's AdamW (PyTorch's rule, nanoGPT's parameter groups), a warmup-cosine schedule,
//! clipping by global norm, and checkpoints with the program's own metadata that resume exactly.
//!
//!     ringrun --nproc-per-node 2 target/release/examples/grad_accum --steps 40 --checkpoints /tmp/ga
//!
//! Each optimizer step takes `--accum` micro-batches per rank: the first ones backward inside
//! `no_sync` (local accumulation, no communication), the last one all-reduces the sum. Stopped
//! and started again with the same `--checkpoints`, it continues from the newest checkpoint and
//! ends bitwise where an uninterrupted run ends (the printed hash).

use clap::Parser;
use ringtrain::checkpoint::{self, CheckpointData, Meta};
use ringtrain::config::{OptimizerConfig, OptimizerName, ScheduleConfig, SyntheticConfig};
use ringtrain::data::{synthetic, Dataset, DistributedSampler};
use ringtrain::optim::{self, Optimizer};
use ringtrain::{Ddp, DdpOptions, InitOptions};
use serde_json::json;
use std::path::PathBuf;
use tch::nn::{self, Module};

#[derive(Parser)]
struct Args {
    /// Optimizer steps in total (a resumed run counts the ones already done).
    #[arg(long, default_value_t = 40)]
    steps: u64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 4)]
    accum: u64,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Save a checkpoint here every `--every` steps, and resume from the newest one found.
    #[arg(long)]
    checkpoints: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    every: u64,
    /// Stop after this many steps of this run (to try resuming).
    #[arg(long)]
    stop_after: Option<u64>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let pg = ringtrain::init(InitOptions::default())?;
    let (rank, world, device) = (pg.rank(), pg.world_size(), pg.device());
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let model = nn::seq()
        .add(nn::linear(&root / "fc1", 32, 64, Default::default()))
        .add(nn::layer_norm(&root / "ln", vec![64], Default::default()))
        .add_fn(|x| x.gelu("none"))
        .add(nn::linear(&root / "fc2", 64, 4, Default::default()));
    let mut ddp = Ddp::from_var_store(&pg, &vs, DdpOptions::default())?;
    let cfg = OptimizerConfig {
        weight_decay: 0.1,
        weight_decay_1d: false, // nanoGPT's groups: biases and norm weights do not decay
        schedule: ScheduleConfig::WarmupCosine { warmup_steps: 5, decay_steps: args.steps, min_lr: 1e-4 },
        ..OptimizerConfig::new(OptimizerName::Adamw, 3e-3)
    };
    let mut opt = Optimizer::new(&cfg, ddp.named_parameters());

    // Resume: rank 0 reads the newest checkpoint, every rank receives it.
    let mut step = 0u64;
    if let Some(dir) = &args.checkpoints {
        if let Some(c) = checkpoint::load_shared(&mut *pg.comm(), dir, device)? {
            checkpoint::copy_into(&ddp.state()?, &c.model, &c.path)?;
            opt.load_state(&c.optimizer, c.meta.optimizer_steps)?;
            step = c.meta.user["step"].as_u64().ok_or("checkpoint without a step")?;
            if rank == 0 {
                println!("resumed from {} at step {step}", c.path.display());
            }
        }
    }

    let data = synthetic::generate(&SyntheticConfig { train_samples: 4096, test_samples: 0, shape: vec![32], classes: 4, seed: 1 }, 0);
    let mut sampler = DistributedSampler::new(data.len(), world, rank, true, 0, true);
    let per_epoch = (sampler.indices().len() / args.batch_size.max(1)) as u64 / args.accum.max(1);
    if args.batch_size == 0 || args.accum == 0 || args.every == 0 || per_epoch == 0 {
        return Err(format!(
            "--batch-size, --accum and --every must be at least 1, and {} samples per rank must fill one step",
            sampler.indices().len()
        )
        .into());
    }
    let started = step;
    let mut last_loss = f64::NAN;
    while step < args.steps && args.stop_after.is_none_or(|n| step - started < n) {
        // Where step `step` reads is a function of the step alone, so a resumed run reads the same.
        let epoch = step / per_epoch;
        sampler.set_epoch(epoch);
        let indices = sampler.indices();
        let first = ((step % per_epoch) * args.accum) as usize * args.batch_size;
        opt.set_lr(optim::lr_at(&cfg.schedule, cfg.lr, step));
        ddp.zero_grad()?;
        let mut loss_sum = 0.0;
        for m in 0..args.accum as usize {
            let chunk = &indices[first + m * args.batch_size..first + (m + 1) * args.batch_size];
            let b = data.batch(chunk, epoch)?.to_device(device)?;
            let loss = model.forward(&b.input).cross_entropy_for_logits(&b.target) / args.accum as f64;
            if m + 1 < args.accum as usize {
                ddp.no_sync(|ddp| ddp.backward(&loss))?; // accumulate locally
            } else {
                ddp.backward(&loss)?; // all-reduce the accumulated sum
            }
            loss_sum += loss.double_value(&[]);
        }
        let norm = optim::clip_grad_norm(&ddp.parameters(), 1.0)?;
        opt.step()?;
        step += 1;
        last_loss = loss_sum;
        if rank == 0 && step % 10 == 0 {
            println!("step {step}: loss {loss_sum:.4} grad_norm {norm:.3} lr {:.2e}", opt.lr());
        }
        if let Some(dir) = args.checkpoints.as_ref().filter(|_| step % args.every == 0) {
            let meta = Meta::for_program(step, world, opt.name(), opt.steps_taken(), json!({"step": step}));
            let state = ddp.state()?;
            checkpoint::save_shared(&mut *pg.comm(), dir, 3, CheckpointData { meta, model: &state, optimizer: opt.state() })?;
        }
    }
    println!("rank {rank}: step {step}, loss {last_loss:.4}, parameter hash {:016x}", ddp.state_hash()?);
    pg.finish();
    Ok(())
}
