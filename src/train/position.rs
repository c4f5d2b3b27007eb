//! Where training stands and where a resumed run starts: pure arithmetic, no tensors.
//!
//! An epoch's order is `randperm(n)` seeded with seed + epoch. The current sharding started at
//! position `epoch_base` of that order with `world` ranks and has consumed `batches_in_shard`
//! batches of `batch` on every rank since (DistributedSampler's rank r takes positions r, r+w, …,
//! so k batches of every rank cover the prefix `[0, epoch_base + k·batch·world)`).
//! `global_step` counts optimizer steps; with gradient accumulation one step consumes several
//! batches, and checkpoints fall on step boundaries.

use crate::checkpoint::Meta;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub global_step: u64,
    pub epoch: usize,
    pub epoch_base: u64,
    /// Batches (micro-batches under accumulation) this sharding has consumed in the epoch.
    pub steps_in_shard: u64,
}

/// The position to start from: the beginning, or a checkpoint's position. On the checkpoint's
/// layout (world size and batch) it continues exactly; on another layout the epoch's unseen
/// positions are re-sharded across the new ranks, none repeated or skipped.
pub fn start(resumed: Option<&Meta>, world: usize, batch: usize, train_samples: usize) -> Position {
    let Some(m) = resumed else { return Position { global_step: 0, epoch: 0, epoch_base: 0, steps_in_shard: 0 } };
    if m.epoch_world_size == world && m.batch_size == batch {
        return Position { global_step: m.global_step, epoch: m.epoch, epoch_base: m.epoch_base, steps_in_shard: m.steps_in_shard };
    }
    let consumed = m.epoch_base + m.steps_in_shard * (m.batch_size * m.epoch_world_size) as u64;
    Position { global_step: m.global_step, epoch: m.epoch, epoch_base: consumed.min(train_samples as u64), steps_in_shard: 0 }
}

/// Micro-batches of the next optimizer step: `accum`, or what is left of the epoch's shard.
pub fn micro_batches_in_step(batches_left: u64, accum: u64) -> u64 {
    batches_left.min(accum)
}

/// Optimizer steps left in the epoch's shard (the last one may take fewer micro-batches).
pub fn steps_left(batches_left: u64, accum: u64) -> u64 {
    batches_left.div_ceil(accum)
}

/// The last batch of the epoch's shard this run reaches, for progress lines ("step k/N"): the
/// shard's end, or sooner where `train.max_steps` stops the run.
pub fn last_batch_shown(batches_in_shard: u64, steps_in_shard: u64, global_step: u64, max_steps: Option<u64>, accum: u64) -> u64 {
    match max_steps {
        Some(m) => batches_in_shard.min(steps_in_shard + m.saturating_sub(global_step) * accum),
        None => batches_in_shard,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_counts_to_where_the_run_stops() {
        // The GPT demo: 1,500 steps of an epoch of 72,465 batches.
        assert_eq!(last_batch_shown(72_465, 0, 0, Some(1500), 1), 1500);
        // Resumed at step 1,000, 1,000 batches into the shard, 2 micro-batches per step.
        assert_eq!(last_batch_shown(72_465, 1000, 1000, Some(1500), 2), 2000);
        assert_eq!(last_batch_shown(100, 0, 0, Some(1500), 1), 100);
        assert_eq!(last_batch_shown(100, 0, 0, None, 1), 100);
    }

    fn meta(world: usize, batch: usize, epoch_base: u64, steps_in_shard: u64) -> Meta {
        Meta {
            format_version: crate::checkpoint::FORMAT_VERSION,
            global_step: 40,
            epoch: 2,
            epoch_base,
            epoch_world_size: world,
            steps_in_shard,
            world_size: world,
            batch_size: batch,
            seed: 0,
            optimizer: "sgd".into(),
            optimizer_steps: 40,
            rng: String::new(),
            reason: "every_steps".into(),
            config: String::new(),
            run_id: String::new(),
            user: serde_json::Value::Null,
            grad_scaler: None,
        }
    }

    #[test]
    fn fresh_start_is_the_beginning() {
        assert_eq!(start(None, 2, 8, 100), Position { global_step: 0, epoch: 0, epoch_base: 0, steps_in_shard: 0 });
    }

    #[test]
    fn same_layout_continues_exactly() {
        let p = start(Some(&meta(2, 8, 16, 3)), 2, 8, 1000);
        assert_eq!(p, Position { global_step: 40, epoch: 2, epoch_base: 16, steps_in_shard: 3 });
    }

    #[test]
    fn other_layout_reshards_the_unseen_suffix() {
        // (old world, old batch, base, batches) → new base, over world sizes and batch sizes.
        for (w, b, base, k, new_w, new_b, want) in [
            (2, 8, 0, 3, 3, 8, 48),     // 3 batches × 8 × 2 ranks
            (3, 4, 10, 5, 2, 4, 70),    // 10 + 5·4·3
            (2, 8, 0, 3, 2, 16, 48),    // same world, other batch
            (2, 8, 990, 3, 1, 8, 1000), // clamped to the data set
        ] {
            let p = start(Some(&meta(w, b, base, k)), new_w, new_b, 1000);
            assert_eq!(
                (p.epoch_base, p.steps_in_shard, p.epoch, p.global_step),
                (want, 0, 2, 40),
                "{w}×{b} base {base} k {k} → {new_w}×{new_b}"
            );
        }
    }

    #[test]
    fn accumulation_groups_the_shard() {
        assert_eq!((micro_batches_in_step(10, 4), steps_left(10, 4)), (4, 3));
        assert_eq!((micro_batches_in_step(2, 4), steps_left(2, 4)), (2, 1));
        assert_eq!((micro_batches_in_step(8, 1), steps_left(8, 1)), (1, 8));
        assert_eq!(steps_left(0, 3), 0);
    }
}
