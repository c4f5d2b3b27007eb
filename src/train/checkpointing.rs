//! Writing a checkpoint from inside training: the loop's position and the optimizer's state,
//! written by rank 0 with every rank learning the outcome (checkpoint::save_shared).

use super::position::Position;
use super::TrainError;
use crate::checkpoint::{self, CheckpointData, Meta};
use crate::comm::Communicator;
use crate::config::Config;
use crate::optim::Optimizer;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Tensor;

#[allow(clippy::too_many_arguments)]
pub fn save(
    comm: &mut dyn Communicator,
    cfg: &Config,
    dir: &Path,
    state: &[(String, Tensor)],
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
    let world = comm.world_size();
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
    // Only rank 0 writes; the others skip gathering the optimizer state, except under ZeRO-1,
    // where every rank sends its shards.
    let optimizer = match zero {
        Some(z) => {
            let full = z.gather_state(comm, opt)?;
            if comm.rank() == 0 {
                full
            } else {
                Vec::new()
            }
        }
        None if comm.rank() == 0 => opt.state(),
        None => Vec::new(),
    };
    let path = checkpoint::save_shared(comm, dir, cfg.checkpoint.keep, CheckpointData { meta, model: state, optimizer })?;
    if comm.rank() == 0 {
        tracing::info!("checkpoint {} written ({reason}) in {:.0} ms", path.display(), started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Some(path))
}
