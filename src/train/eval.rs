//! Evaluation on the test split, sharded across ranks without padding (rank r takes r, r+w, …,
//! so every test sample counts exactly once); the task's sums are added up across ranks.

use super::tasks::Task;
use super::TrainError;
use crate::comm::Communicator;
use crate::data::{Dataset, Loader};
use crate::models::Model;
use std::sync::Arc;

/// The task's metrics over the whole split, `loss` first; `samples` evaluated.
#[derive(Clone, Debug)]
pub struct EvalResult {
    pub metrics: Vec<(&'static str, f64)>,
    pub samples: usize,
}

impl EvalResult {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    pub fn loss(&self) -> f64 {
        self.get("loss").unwrap_or(f64::NAN)
    }
}

const EVAL_BATCH: usize = 1000;

pub fn evaluate(
    model: &dyn Model,
    task: &dyn Task,
    test: &Arc<dyn Dataset>,
    comm: &mut dyn Communicator,
    device: tch::Device,
    precision: crate::amp::Precision,
    workers: usize,
) -> Result<EvalResult, TrainError> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let indices: Vec<usize> = (rank..test.len()).step_by(world).collect();
    let mut sums: Vec<f64> = Vec::new();
    let mut samples = 0usize;
    let _guard = tch::no_grad_guard();
    for batch in Loader::spawn_workers(test.clone(), indices, EVAL_BATCH, 2 * workers, 0, workers)? {
        let batch = batch?.to_device(device)?;
        let part = crate::amp::autocast(device, precision, || task.eval_sums(model, &batch))??;
        if sums.is_empty() {
            sums = vec![0.0; part.len()];
        }
        for (s, p) in sums.iter_mut().zip(&part) {
            *s += p;
        }
        samples += batch.len;
    }
    // Every rank's sums, added in rank order in f64: exact for counts, the same on every rank.
    let mut mine: Vec<u8> = (samples as f64).to_le_bytes().to_vec();
    mine.extend((sums.len() as f64).to_le_bytes());
    mine.extend(sums.iter().flat_map(|s| s.to_le_bytes()));
    let all = comm.all_gather(&mine)?;
    let mut total = Vec::new();
    let mut total_samples = 0usize;
    for blob in &all {
        let vals: Vec<f64> = blob.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        total_samples += vals[0] as usize;
        let theirs = &vals[2..2 + vals[1] as usize];
        if total.is_empty() {
            total = vec![0.0; theirs.len()];
        }
        for (t, v) in total.iter_mut().zip(theirs) {
            *t += v;
        }
    }
    if total.is_empty() {
        return Ok(EvalResult { metrics: vec![("loss", f64::NAN)], samples: 0 });
    }
    Ok(EvalResult { metrics: task.metrics(&total), samples: total_samples })
}
