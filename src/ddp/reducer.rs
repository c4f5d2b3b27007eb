//! The reducer: after backward, each bucket's gradients are copied into one flat f32 buffer,
//! divided by the world size (as PyTorch's reducer does before communicating), summed across
//! ranks with one all_reduce, and copied back. Buckets are computed once, identically on every
//! rank, and reduced in the same order, so every rank issues the same collectives.

use super::buckets::compute_bucket_assignment_by_size;
use super::hooks::ReadyHooks;
use super::DdpError;
use crate::comm::Communicator;
use crossbeam_channel::Receiver;
use std::time::Instant;
use tch::{Kind, TchError, Tensor};

struct Bucket {
    params: Vec<usize>,
    /// (offset, numel) of each parameter inside `flat`.
    spans: Vec<(i64, i64)>,
    flat: Tensor,
}

pub struct Reducer {
    params: Vec<Tensor>,
    buckets: Vec<Bucket>,
    /// All-reduce in bf16 (NCCL): half the bytes on the wire.
    reduce_bf16: bool,
    /// When each bucket's all-reduce ran in the last `reduce`, for the timeline.
    bucket_times: Vec<(Instant, Instant)>,
    /// Gradients live inside the buckets (after the first step): backward accumulates straight
    /// into them and no copies in or out are needed.
    attached: bool,
    /// Start each bucket's all-reduce during backward, as soon as its gradients are ready.
    overlap: bool,
    hooks: Option<(ReadyHooks, Receiver<usize>)>,
    /// Bucket of each parameter.
    bucket_of: Vec<usize>,
}

/// Marks the end of backward on the ready channel.
const BACKWARD_DONE: usize = usize::MAX;

/// One extra f32 rides at the end of the last bucket: a control value each rank contributes
/// (e.g. "a stop was requested here") whose sum every rank learns with no extra collective.
impl Bucket {
    fn control_slot(&self) -> i64 {
        self.spans.last().map_or(0, |&(off, n)| off + n)
    }

    fn set_control(&self, value: f32) -> Result<(), TchError> {
        self.flat.f_narrow(0, self.control_slot(), 1)?.f_fill_(value as f64).map(|_| ())
    }

    /// The sum of every rank's control value, after the (pre-divided) all-reduce.
    fn control_sum(&self, world: f64) -> Result<f32, TchError> {
        Ok((self.flat.f_double_value(&[self.control_slot()])? * world) as f32)
    }
}

/// Divides a bucket by the world size and sums it across ranks (as bf16 on the wire when asked);
/// returns when it started and ended, for the timeline.
fn all_reduce_bucket(comm: &mut dyn Communicator, flat: &Tensor, world: f64, bf16: bool) -> Result<(Instant, Instant), DdpError> {
    let started = Instant::now();
    let mut flat = flat.shallow_clone();
    let _ = flat.f_div_scalar_(world)?;
    if bf16 {
        let mut low = flat.f_to_kind(Kind::BFloat16)?;
        comm.all_reduce_tensor(&mut low)?;
        flat.f_copy_(&low)?;
    } else {
        comm.all_reduce_tensor(&mut flat)?;
    }
    Ok((started, Instant::now()))
}

impl Reducer {
    /// `buffer_device`: where the flat buckets live — the model's device for a backend that
    /// reduces device memory itself (NCCL), else the CPU (host backends; device gradients are
    /// copied there and back).
    pub fn new(
        params: &[Tensor],
        first_cap_bytes: usize,
        cap_bytes: usize,
        buffer_device: tch::Device,
        reduce_bf16: bool,
    ) -> Result<Self, DdpError> {
        for (i, p) in params.iter().enumerate() {
            if p.kind() != Kind::Float {
                return Err(DdpError::Unsupported(format!("parameter {i} has dtype {:?}; gradients are reduced as f32", p.kind())));
            }
        }
        let sizes: Vec<usize> = params.iter().map(|p| p.numel() * 4).collect();
        let assignment = compute_bucket_assignment_by_size(&sizes, &[first_cap_bytes, cap_bytes]);
        let mut bucket_of = vec![0; params.len()];
        for (b, idx) in assignment.iter().enumerate() {
            for &i in idx {
                bucket_of[i] = b;
            }
        }
        let last = assignment.len().saturating_sub(1);
        let mut buckets: Vec<Bucket> = assignment
            .into_iter()
            .enumerate()
            .map(|(bi, idx)| {
                let mut off = 0i64;
                let spans = idx
                    .iter()
                    .map(|&i| {
                        let n = params[i].numel() as i64;
                        off += n;
                        (off - n, n)
                    })
                    .collect();
                let extra = i64::from(bi == last);
                Bucket { params: idx, spans, flat: Tensor::zeros([off + extra], (Kind::Float, buffer_device)) }
            })
            .collect();
        if buckets.is_empty() {
            // No parameters: still one bucket, for the control value.
            buckets.push(Bucket { params: vec![], spans: vec![], flat: Tensor::zeros([1], (Kind::Float, buffer_device)) });
        }
        Ok(Self {
            params: params.iter().map(|p| p.shallow_clone()).collect(),
            buckets,
            reduce_bf16,
            bucket_times: Vec::new(),
            attached: false,
            overlap: false,
            hooks: None,
            bucket_of,
        })
    }

    /// Overlap communication with backward where the backend allows it (from the second step on,
    /// once gradients live in the buckets).
    pub fn set_overlap(&mut self, on: bool) {
        self.overlap = on;
    }

    /// Runs `backward` and averages the gradients; returns the sum of every rank's `control`.
    /// With overlap, a communication thread all-reduces each bucket, in bucket order on every
    /// rank, as soon as backward has accumulated all of its gradients; the step then waits only
    /// for what backward did not hide. Results are bitwise the same as without overlap.
    pub fn backward_and_reduce(
        &mut self,
        comm: &mut dyn Communicator,
        control: f32,
        backward: impl FnOnce() -> Result<(), tch::TchError>,
    ) -> Result<f32, DdpError> {
        let can_overlap = self.overlap && self.attached && comm.world_size() > 1 && comm.supports_overlap() && !self.reduce_bf16;
        if !can_overlap {
            backward()?;
            return self.reduce(comm, control);
        }
        if self.hooks.is_none() {
            self.hooks = Some(ReadyHooks::install(&self.params).map_err(DdpError::Unsupported)?);
        }
        let (hooks, rx) = self.hooks.as_ref().expect("installed above");
        while rx.try_recv().is_ok() {} // nothing stale from an aborted step
        let world = comm.world_size() as f64;
        let last = self.buckets.len() - 1;
        self.buckets[last].set_control(control)?;
        let flats: Vec<Tensor> = self.buckets.iter().map(|b| b.flat.shallow_clone()).collect();
        let sizes: Vec<usize> = self.buckets.iter().map(|b| b.params.len()).collect();
        let bucket_of = &self.bucket_of;
        let done = hooks.sender();
        let (backward_result, reduced) = std::thread::scope(|s| {
            let worker = s.spawn(move || -> Result<Vec<(Instant, Instant)>, DdpError> {
                let mut ready = vec![0usize; sizes.len()];
                let mut next = 0;
                let mut times = Vec::with_capacity(sizes.len());
                let mut reduce_ready = |next: &mut usize, upto: &dyn Fn(usize) -> bool| -> Result<(), DdpError> {
                    while *next < sizes.len() && upto(*next) {
                        times.push(all_reduce_bucket(comm, &flats[*next], world, false)?);
                        *next += 1;
                    }
                    Ok(())
                };
                for i in rx.iter() {
                    if i == BACKWARD_DONE {
                        break;
                    }
                    ready[bucket_of[i]] += 1;
                    reduce_ready(&mut next, &|b| ready[b] >= sizes[b])?;
                }
                // Parameters that got no gradient this step still take part (zeros).
                reduce_ready(&mut next, &|_| true)?;
                Ok(times)
            });
            let backward_result = backward();
            let _ = done.send(BACKWARD_DONE);
            (backward_result, worker.join().expect("communication thread panicked"))
        });
        backward_result?;
        self.bucket_times = reduced?;
        Ok(self.buckets[last].control_sum(world)?)
    }

    /// Start and end of each bucket's all-reduce in the last `reduce`.
    pub fn last_bucket_times(&self) -> &[(Instant, Instant)] {
        &self.bucket_times
    }

    /// Parameter indices of each bucket, in reduction order.
    pub fn bucket_layout(&self) -> Vec<Vec<usize>> {
        self.buckets.iter().map(|b| b.params.clone()).collect()
    }

    /// Averages every gradient across ranks and returns the sum of every rank's `control`. A
    /// parameter that got no gradient this step contributes zeros, so all ranks still exchange
    /// identical buckets.
    pub fn reduce(&mut self, comm: &mut dyn Communicator, control: f32) -> Result<f32, DdpError> {
        let world = comm.world_size() as f64;
        if comm.world_size() == 1 {
            // Nothing to average: no copies in and out of buckets.
            return Ok(control);
        }
        let last = self.buckets.len() - 1;
        self.buckets[last].set_control(control)?;
        self.bucket_times.clear();
        for b in &self.buckets {
            for (&i, &(off, n)) in b.params.iter().zip(&b.spans) {
                let mut dst = b.flat.f_narrow(0, off, n)?;
                let g = self.params[i].grad();
                if !g.defined() {
                    let _ = dst.f_zero_()?;
                } else if !self.attached {
                    dst.f_copy_(&g.f_view([-1])?)?;
                }
            }
            self.bucket_times.push(all_reduce_bucket(comm, &b.flat, world, self.reduce_bf16)?);
            for (&i, &(off, n)) in b.params.iter().zip(&b.spans) {
                let mut g = self.params[i].grad();
                if g.defined() && !self.attached {
                    // Copy back, and from now on let the gradient live in the bucket (zeroed in
                    // place by zero_grads, never replaced, so the view stays valid).
                    let view = b.flat.f_narrow(0, off, n)?.f_view_as(&g)?;
                    g.f_copy_(&view)?;
                    if self.reduce_bf16 || g.device() != b.flat.device() {
                        continue;
                    }
                    g.f_set_data(&view)?;
                }
            }
        }
        if !self.reduce_bf16 && self.params.iter().all(|p| p.grad().defined()) {
            self.attached = self.buckets.iter().all(|b| b.params.iter().all(|&i| self.params[i].grad().device() == b.flat.device()));
        }
        Ok(self.buckets[last].control_sum(world)?)
    }
}

/// Zeroes gradients in place (keeping their storage), as `zero_grad(set_to_none=False)`.
pub fn zero_grads(params: &[Tensor]) -> Result<(), tch::TchError> {
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.f_zero_()?;
        }
    }
    Ok(())
}
