//! Writing a checkpoint from inside training: the loop's position, the model and the optimizer's
//! state, streamed into rank 0's files (under ZeRO gathered piece by piece), with every rank
//! learning the outcome (checkpoint::save_streamed).

use super::position::Position;
use super::TrainError;
use crate::checkpoint::{self, Entry, Meta};
use crate::comm::CommHandle;
use crate::config::Config;
use crate::ddp::Ddp;
use crate::optim::Optimizer;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[allow(clippy::too_many_arguments)]
pub fn save(
    comm: &CommHandle,
    cfg: &Config,
    dir: &Path,
    ddp: &Ddp,
    opt: &Optimizer,
    zero: Option<&crate::ddp::Zero>,
    pos: &Position,
    grad_scaler: Option<crate::amp::ScalerState>,
    run_id: &str,
    reason: &str,
) -> Result<Option<PathBuf>, TrainError> {
    if !cfg.checkpoint.enabled {
        return Ok(None);
    }
    let (rank, world) = {
        let c = comm.lock();
        (c.rank(), c.world_size())
    };
    let started = Instant::now();
    let meta = Meta {
        format_version: checkpoint::FORMAT_VERSION,
        global_step: pos.global_step,
        epoch: pos.epoch,
        epoch_base: pos.epoch_base,
        epoch_world_size: world,
        steps_in_shard: pos.steps_in_shard,
        world_size: world,
        batch_size: cfg.train.batch_size,
        seed: cfg.train.seed,
        optimizer: opt.name().to_string(),
        optimizer_steps: opt.steps_taken(),
        rng: "derived: model init from manual_seed(train.seed); epoch order from randperm seeded with train.seed + epoch; \
              the learning rate from the schedule at global_step; nothing else draws random numbers"
            .into(),
        reason: reason.to_string(),
        config: cfg.to_yaml(),
        run_id: run_id.to_string(),
        user: serde_json::Value::Null,
        grad_scaler,
    };
    // Unsharded, the optimizer's state is rank 0's own tensors, listed and written as they are.
    let unsharded = if zero.is_none() && rank == 0 { opt.state() } else { Vec::new() };
    let optimizer: Vec<Entry> = match zero {
        Some(z) => z.state_entries(opt),
        None => unsharded.iter().map(|(n, t)| Entry::of(n, t)).collect(),
    };
    // Every rank takes part in the gathers (ZeRO-3's parameters, ZeRO's optimizer state); only
    // rank 0's sink writes, each tensor as it comes.
    let path = checkpoint::save_streamed(
        comm,
        dir,
        cfg.checkpoint.keep,
        meta,
        &ddp.state_entries(),
        &optimizer,
        |sink| -> Result<(), TrainError> {
            ddp.state_each(0, |n, t| {
                sink.model(n, t);
                Ok(())
            })?;
            match zero {
                Some(z) => z.gather_state_each(&mut *comm.lock(), opt, 0, |n, t| {
                    sink.optimizer(n, t);
                    Ok(())
                })?,
                None => unsharded.iter().for_each(|(n, t)| sink.optimizer(n, t)),
            }
            Ok(())
        },
    )?;
    if rank == 0 {
        tracing::info!("checkpoint {} written ({reason}) in {:.0} ms", path.display(), started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Some(path))
}
