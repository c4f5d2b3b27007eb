//! The loader: a background thread turns this rank's index list into ready batches, `prefetch`
//! ahead of the training step, so the step never waits on assembly.

use super::{DataError, Dataset};
use crossbeam_channel::{bounded, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::Tensor;

/// One batch: the model's input and the task's target, `len` samples.
#[derive(Debug)]
pub struct Batch {
    pub input: Tensor,
    pub target: Tensor,
    pub len: usize,
}

impl Batch {
    /// Both tensors moved to `device`.
    pub fn to_device(&self, device: tch::Device) -> Result<Batch, tch::TchError> {
        Ok(Batch { input: self.input.f_to_device(device)?, target: self.target.f_to_device(device)?, len: self.len })
    }
}

pub struct Loader {
    rx: Option<Receiver<Result<Batch, DataError>>>,
    thread: Option<JoinHandle<()>>,
    batches: usize,
}

impl Loader {
    /// Batches of `batch_size` in index order; the last may be smaller (DataLoader's default,
    /// drop_last=False). Every rank has as many indices, so every rank takes as many steps.
    pub fn spawn(data: Arc<dyn Dataset>, indices: Vec<usize>, batch_size: usize, prefetch: usize, epoch: u64) -> Result<Loader, DataError> {
        let batches = indices.len().div_ceil(batch_size);
        let (tx, rx) = bounded(prefetch);
        let thread = std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || {
                for chunk in indices.chunks(batch_size) {
                    let batch = data.batch(chunk, epoch);
                    let failed = batch.is_err();
                    // A send fails when the consumer stopped early (max_steps).
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| DataError::Loader(format!("starting it: {e}")))?;
        Ok(Loader { rx: Some(rx), thread: Some(thread), batches })
    }

    /// Number of batches this loader yields.
    pub fn len(&self) -> usize {
        self.batches
    }

    pub fn is_empty(&self) -> bool {
        self.batches == 0
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.rx.take(); // unblocks the thread's send
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
