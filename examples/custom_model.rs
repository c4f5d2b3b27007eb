//! A model of your own, defined with `tch::nn` and trained with tch's own optimizer, made
//! data-parallel by ringtrain. Run it under the launcher:
//!
//!     cargo build --release --examples
//!     ringrun --nproc-per-node 2 target/release/examples/custom_model
//!
//! Every rank trains on its shard of Fashion-MNIST; after each backward the gradients are
//! averaged across ranks, so every replica takes the same step. At the end each rank prints
//! `rank R: loss FIRST -> LAST, parameter hash HASH` (losses: the mean of its first and last ten
//! steps); equal hashes mean bitwise-identical replicas.

use clap::Parser;
use ringtrain::data::{idx, Dataset, DistributedSampler};
use ringtrain::{Ddp, DdpOptions, InitOptions};
use std::path::PathBuf;
use tch::nn::{self, Module, OptimizerConfig};

#[derive(Parser)]
struct Args {
    /// Folder with Fashion-MNIST's IDX files (Debian: apt-get install dataset-fashion-mnist).
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    data: PathBuf,
    /// Optimizer steps per rank.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Zero gradients with tch's `opt.zero_grad()`, which sets them to None; ringtrain notices
    /// and re-attaches them to its buckets (with a warning). The default uses `ddp.zero_grad()`.
    #[arg(long)]
    tch_zero_grad: bool,
}

/// Layers of our own choosing: a small conv net for 1×28×28 images.
fn net(root: &nn::Path) -> impl Module {
    let conv = nn::ConvConfig { padding: 1, ..Default::default() };
    nn::seq()
        .add(nn::conv2d(root / "conv", 1, 16, 3, conv))
        .add_fn(|x| x.relu().max_pool2d_default(2).flatten(1, -1))
        .add(nn::linear(root / "fc1", 16 * 14 * 14, 64, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(root / "fc2", 64, 10, Default::default()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // Who we are (RANK, WORLD_SIZE, … from ringrun), the device, and the joined group.
    if args.batch_size == 0 {
        return Err("--batch-size must be at least 1".into());
    }
    let pg = ringtrain::init(InitOptions::default())?;
    let (rank, world) = (pg.rank(), pg.world_size());

    // Seeds may differ per rank: Ddp broadcasts rank 0's weights.
    tch::manual_seed(rank as i64);
    let vs = nn::VarStore::new(pg.device());
    let model = net(&vs.root());
    let mut ddp = Ddp::from_var_store(&pg, &vs, DdpOptions::default())?;
    let mut opt = nn::Adam::default().build(&vs, 1e-3)?;

    let dir = &args.data;
    let find = |name: &str| [dir.join(format!("{name}.gz")), dir.join(name)].into_iter().find(|p| p.exists()).unwrap_or(dir.join(name));
    let mut train = idx::load_pair(&find("train-images-idx3-ubyte"), &find("train-labels-idx1-ubyte"), 10)?;
    train.normalize = Some([0.2860, 0.3530]);
    let mut sampler = DistributedSampler::new(train.len(), world, rank, true, 0, false);

    let mut losses = Vec::new();
    let mut epoch = 0;
    while losses.len() < args.steps {
        sampler.set_epoch(epoch);
        for chunk in sampler.indices().chunks(args.batch_size) {
            if losses.len() == args.steps {
                break;
            }
            let batch = train.batch(chunk, epoch)?.to_device(pg.device())?;
            let loss = model.forward(&batch.input).cross_entropy_for_logits(&batch.target);
            if args.tch_zero_grad {
                opt.zero_grad();
            } else {
                ddp.zero_grad()?;
            }
            ddp.backward(&loss)?; // backward + averaged gradients
            opt.step();
            losses.push(loss.double_value(&[]));
        }
        epoch += 1;
    }

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let k = losses.len().min(10);
    let hash = ddp.state_hash()?;
    println!("rank {rank}: loss {:.4} -> {:.4}, parameter hash {hash:016x}", mean(&losses[..k]), mean(&losses[losses.len() - k..]));
    if ddp.reattached_grads() > 0 {
        println!("rank {rank}: {} gradient(s) were replaced by tch's zero_grad and re-attached", ddp.reattached_grads());
    }
    pg.finish();
    Ok(())
}
