//! Writing a checkpoint from inside training: rank 0 writes, then every rank learns whether it
//! succeeded before any proceeds (a failed write stops every rank with rank 0's error).

use super::{Optimizer, TrainError};
use crate::checkpoint::{self, CheckpointData, Meta};
use crate::comm::{broadcast_blob, Communicator};
use crate::config::Config;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Tensor;

/// Where in training we are, for the meta file.
pub struct Position {
    pub global_step: u64,
    pub epoch: usize,
    pub epoch_base: u64,
    pub steps_in_shard: u64,
}

pub fn save(
    comm: &mut dyn Communicator,
    cfg: &Config,
    dir: &Path,
    params: &[(String, Tensor)],
    opt: &Optimizer,
    pos: &Position,
    reason: &str,
) -> Result<Option<PathBuf>, TrainError> {
    if !cfg.checkpoint.enabled {
        return Ok(None);
    }
    let world = comm.world_size();
    let mine = (comm.rank() == 0).then(|| {
        let started = Instant::now();
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
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
                  nothing else draws random numbers"
                .into(),
            reason: reason.to_string(),
            config: cfg.to_yaml(),
        };
        let data = CheckpointData { meta, model: params, optimizer: opt.state(&names) };
        match checkpoint::write(dir, data, cfg.checkpoint.keep) {
            Ok(p) => {
                tracing::info!("checkpoint {} written ({reason}) in {:.0} ms", p.display(), started.elapsed().as_secs_f64() * 1e3);
                format!("ok:{}", p.display())
            }
            Err(e) => format!("err:{e}"),
        }
    });
    let status = String::from_utf8_lossy(&broadcast_blob(comm, 0, mine.as_deref().map(str::as_bytes))?).into_owned();
    match status.split_once(':') {
        Some(("ok", path)) => Ok(Some(PathBuf::from(path))),
        Some(("err", e)) => Err(TrainError::Startup(format!("rank 0 could not write a checkpoint: {e}"))),
        _ => Err(TrainError::Disagree(format!("bad checkpoint status from rank 0: {status:?}"))),
    }
}
