//! Will the training state fit? Refused up front, with the numbers, rather than left to the
//! kernel's out-of-memory killer halfway into the first step.
//!
//! Once the model is built its parameters are resident; what training adds per rank before any
//! activation is known from the parameter count: the gradients (DDP's buckets, which the
//! gradients are views of) and the optimizer's state and scratch (SGD: a momentum buffer, and a
//! scratch tensor where weight decay needs one; Adam: two moments and a scratch), the optimizer's
//! part divided by the world size under ZeRO-1 (`ddp.shard: optimizer`), and the gradients too
//! under ZeRO-2 (`ddp.shard: grads`). Ranks on the same machine (the same kernel boot
//! id, so emulated nodes count as one machine, as they share its memory) add up, and their sum
//! is compared with what the kernel says is available (MemAvailable). This is a lower bound:
//! activations, data and communication buffers come on top, so only a job that cannot fit is
//! refused.

use super::TrainError;
use crate::comm::Communicator;
use crate::ddp::Shard;
use crate::optim::{OptimizerConfig, OptimizerName};

/// Bytes one rank adds to its resident parameters once training starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Need {
    pub gradients: u64,
    pub optimizer: u64,
}

impl Need {
    pub fn total(&self) -> u64 {
        self.gradients + self.optimizer
    }
}

/// What `parameters` elements of `elem_bytes` each need beyond themselves, at `world` ranks.
pub fn need(parameters: u64, elem_bytes: u64, opt: &OptimizerConfig, shard: Shard, world: u64) -> Need {
    let per_element = match opt.name {
        OptimizerName::Sgd => u64::from(opt.momentum != 0.0) + u64::from(opt.weight_decay != 0.0),
        OptimizerName::Adam | OptimizerName::Adamw => 3,
    };
    let state = parameters * per_element * elem_bytes;
    let divided = |b: u64, on: bool| if on { b.div_ceil(world.max(1)) } else { b };
    Need { gradients: divided(parameters * elem_bytes, shard >= Shard::Grads), optimizer: divided(state, shard >= Shard::Optimizer) }
}

/// Bytes as people read them: MiB below a GiB.
fn size(b: u64) -> String {
    if b < 1 << 30 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    }
}

/// This machine's memory available to new allocations, in bytes (Linux's MemAvailable); `None`
/// where the kernel does not say. `RINGTRAIN_TEST_MEM_AVAILABLE_MIB` stands in for it in tests.
fn available() -> Option<u64> {
    if let Some(mib) = std::env::var("RINGTRAIN_TEST_MEM_AVAILABLE_MIB").ok().and_then(|v| v.parse::<u64>().ok()) {
        return Some(mib << 20);
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib << 10)
}

fn machine_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// Every rank's need against its machine's available memory; the same error on every rank when
/// a machine's ranks together need more than it has. Call once every rank's model is built (the
/// barrier inside makes the reading of available memory come after all of them).
pub fn check(comm: &mut dyn Communicator, mine: &Need, opt: &OptimizerConfig, shard: Shard) -> Result<(), TrainError> {
    comm.barrier()?;
    let me = machine_id();
    let row = format!("{me} {} {}", mine.total(), available().map_or(-1, |a| a as i64));
    let rows: Vec<String> = comm.all_gather(row.as_bytes())?.iter().map(|r| String::from_utf8_lossy(r).into_owned()).collect();
    let fields: Vec<Vec<&str>> = rows.iter().map(|r| r.split(' ').collect()).collect();
    let here: Vec<&Vec<&str>> = fields.iter().filter(|f| f.first() == Some(&me.as_str())).collect();
    let total: u64 = here.iter().filter_map(|f| f.get(1)?.parse::<u64>().ok()).sum();
    // The smallest reading of the machine's ranks: they read it at about the same moment.
    let Some(avail) = here.iter().filter_map(|f| f.get(2)?.parse::<i64>().ok()).filter(|&a| a >= 0).min() else { return Ok(()) };
    if total <= avail as u64 {
        return Ok(());
    }
    let shard = match shard {
        Shard::Off => {
            "; ddp.shard: optimizer divides the optimizer state over the ranks, grads the gradients too, params the parameters as well"
        }
        Shard::Optimizer => " (divided over the ranks); ddp.shard: grads divides the gradients too, params the parameters as well",
        Shard::Grads | Shard::Params => " (both divided over the ranks)",
    };
    Err(TrainError::Startup(format!(
        "the training state does not fit this machine's memory: its {} rank(s) need at least {} more than their parameters \
         (per rank: gradients {}, optimizer state {} for {}{shard}), but {} is available; use fewer ranks per machine or a \
         smaller model",
        here.len(),
        size(total),
        size(mine.gradients),
        size(mine.optimizer),
        match opt.name {
            OptimizerName::Sgd => "sgd",
            OptimizerName::Adam => "adam",
            OptimizerName::Adamw => "adamw",
        },
        size(avail as u64)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(name: OptimizerName, momentum: f64, weight_decay: f64) -> OptimizerConfig {
        OptimizerConfig { momentum, weight_decay, ..OptimizerConfig::new(name, 0.1) }
    }

    #[test]
    fn the_need_per_rank_follows_the_optimizer_and_sharding() {
        let p = 1_000_000;
        assert_eq!(need(p, 4, &opt(OptimizerName::Sgd, 0.0, 0.0), Shard::Off, 2), Need { gradients: 4_000_000, optimizer: 0 });
        assert_eq!(need(p, 4, &opt(OptimizerName::Sgd, 0.9, 0.0), Shard::Off, 2).optimizer, 4_000_000);
        assert_eq!(need(p, 4, &opt(OptimizerName::Sgd, 0.9, 1e-4), Shard::Off, 2).optimizer, 8_000_000);
        assert_eq!(need(p, 4, &opt(OptimizerName::Adamw, 0.0, 0.1), Shard::Off, 2).optimizer, 12_000_000);
        // ZeRO-1 divides the optimizer's part, not the gradients; ZeRO-2 both.
        let adamw = opt(OptimizerName::Adamw, 0.0, 0.1);
        assert_eq!(need(p, 4, &adamw, Shard::Optimizer, 3), Need { gradients: 4_000_000, optimizer: 4_000_000 });
        assert_eq!(need(p, 4, &adamw, Shard::Grads, 3), Need { gradients: 1_333_334, optimizer: 4_000_000 });
    }
}
