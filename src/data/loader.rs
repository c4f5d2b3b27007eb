//! The loader: a background thread turns this rank's index list into ready batches (f32 input,
//! int64 labels), `prefetch` ahead of the training step, so the step never waits on assembly.

use super::Dataset;
use crossbeam_channel::{bounded, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::Tensor;

pub struct Batch {
    pub input: Tensor,
    pub target: Tensor,
    pub len: usize,
}

pub struct Loader {
    rx: Option<Receiver<Batch>>,
    thread: Option<JoinHandle<()>>,
    batches: usize,
}

impl Loader {
    /// Batches of `batch_size` in index order; the last may be smaller (DataLoader's default,
    /// drop_last=False). Every rank has as many indices, so every rank takes as many steps.
    pub fn spawn(data: Arc<Dataset>, indices: Vec<usize>, batch_size: usize, prefetch: usize) -> Loader {
        let batches = indices.len().div_ceil(batch_size);
        let (tx, rx) = bounded(prefetch);
        let thread = std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || {
                let k = data.sample_numel();
                for chunk in indices.chunks(batch_size) {
                    let mut x = vec![0f32; chunk.len() * k];
                    let mut y = Vec::with_capacity(chunk.len());
                    for (j, &i) in chunk.iter().enumerate() {
                        data.write_sample(i, &mut x[j * k..(j + 1) * k]);
                        y.push(data.labels[i]);
                    }
                    let mut shape = vec![chunk.len() as i64];
                    shape.extend_from_slice(&data.sample_shape);
                    let batch =
                        Batch { input: Tensor::from_slice(&x).view(shape.as_slice()), target: Tensor::from_slice(&y), len: chunk.len() };
                    if tx.send(batch).is_err() {
                        return; // consumer stopped early (max_steps)
                    }
                }
            })
            .expect("spawning the loader thread");
        Loader { rx: Some(rx), thread: Some(thread), batches }
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
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
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
