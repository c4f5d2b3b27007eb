//! The loader: background threads turn this rank's index list into ready batches, `prefetch`
//! ahead of the training step, so the step never waits on assembly (or decoding). With N
//! workers (DataLoader's `num_workers`), worker w makes batches w, w+N, w+2N, … and the
//! iterator takes them round-robin, so batches arrive in sampler order whatever the timing.

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
    /// Both tensors moved to `device`. To a GPU they go through pinned (page-locked) memory and
    /// a non-blocking copy, as DataLoader's pin_memory=True and `.to(device, non_blocking=True)`:
    /// the copy is a DMA queued on the stream, so the host goes on to launch the forward pass
    /// instead of staging pageable memory and waiting. The pinned copy's memory is released only
    /// after the transfer (libtorch's pinned allocator records the copy's stream).
    pub fn to_device(&self, device: tch::Device) -> Result<Batch, tch::TchError> {
        Ok(Batch { input: move_to(&self.input, device)?, target: move_to(&self.target, device)?, len: self.len })
    }
}

fn move_to(t: &Tensor, device: tch::Device) -> Result<Tensor, tch::TchError> {
    if !device.is_cuda() || t.device() != tch::Device::Cpu {
        return t.f_to_device(device);
    }
    // at::_pin_memory: pin_memory and is_pinned with a device (tch always passes one) print a
    // deprecation warning on every call. Batches are fresh tensors, never pinned already.
    t.f_internal_pin_memory(device)?.f_to_device_(device, t.kind(), true, false)
}

pub struct Loader {
    rxs: Vec<Receiver<Result<Batch, DataError>>>,
    threads: Vec<JoinHandle<()>>,
    batches: usize,
    next: usize,
}

impl Loader {
    /// Batches of `batch_size` in index order; the last may be smaller (DataLoader's default,
    /// drop_last=False). Every rank has as many indices, so every rank takes as many steps.
    pub fn spawn(data: Arc<dyn Dataset>, indices: Vec<usize>, batch_size: usize, prefetch: usize, epoch: u64) -> Result<Loader, DataError> {
        Loader::spawn_workers(data, indices, batch_size, prefetch, epoch, 1)
    }

    /// As `spawn`, with `workers` threads; about `prefetch` batches are held ready in all.
    pub fn spawn_workers(
        data: Arc<dyn Dataset>,
        indices: Vec<usize>,
        batch_size: usize,
        prefetch: usize,
        epoch: u64,
        workers: usize,
    ) -> Result<Loader, DataError> {
        let chunks: Arc<Vec<Vec<usize>>> = Arc::new(indices.chunks(batch_size.max(1)).map(|c| c.to_vec()).collect());
        let batches = chunks.len();
        let workers = workers.clamp(1, batches.max(1));
        let mut loader = Loader { rxs: vec![], threads: vec![], batches, next: 0 };
        for w in 0..workers {
            let (tx, rx) = bounded(prefetch.div_ceil(workers).max(1));
            let (data, chunks) = (data.clone(), chunks.clone());
            let thread = std::thread::Builder::new()
                .name(format!("loader-{w}"))
                .spawn(move || {
                    for chunk in chunks.iter().skip(w).step_by(workers) {
                        let batch = data.batch(chunk, epoch);
                        let failed = batch.is_err();
                        // A send fails when the consumer stopped early (max_steps).
                        if tx.send(batch).is_err() || failed {
                            return;
                        }
                    }
                })
                .map_err(|e| DataError::Loader(format!("starting loader thread {w}: {e}")))?;
            loader.rxs.push(rx);
            loader.threads.push(thread);
        }
        Ok(loader)
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
        if self.next >= self.batches || self.rxs.is_empty() {
            return None;
        }
        let k = self.next;
        self.next += 1;
        match self.rxs[k % self.rxs.len()].recv() {
            Ok(b) => Some(b),
            // The worker ended early: it sent an error before (already yielded) or panicked.
            Err(_) => Some(Err(DataError::Loader(format!("loader thread {} stopped before batch {k}", k % self.rxs.len())))),
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.rxs.clear(); // unblocks the threads' sends
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batch i holds its indices; odd batches are slow, so out-of-order completion is likely.
    struct Slow;
    impl Dataset for Slow {
        fn len(&self) -> usize {
            1000
        }
        fn batch(&self, indices: &[usize], _epoch: u64) -> Result<Batch, DataError> {
            if indices[0] % 20 == 10 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let v: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
            Ok(Batch { input: Tensor::from_slice(&v), target: Tensor::from_slice(&v), len: v.len() })
        }
    }

    #[test]
    fn workers_deliver_batches_in_sampler_order() {
        let indices: Vec<usize> = (0..205).rev().collect();
        for workers in [1, 2, 3, 8] {
            let got: Vec<i64> = Loader::spawn_workers(Arc::new(Slow), indices.clone(), 10, 4, 0, workers)
                .unwrap()
                .flat_map(|b| Vec::<i64>::try_from(b.unwrap().target).unwrap())
                .collect();
            assert_eq!(got, indices.iter().map(|&i| i as i64).collect::<Vec<_>>(), "{workers} workers");
        }
        // Stopping early (max_steps) joins the threads without hanging.
        let mut l = Loader::spawn_workers(Arc::new(Slow), indices, 10, 2, 0, 3).unwrap();
        assert!(l.next().is_some());
        drop(l);
    }
}
