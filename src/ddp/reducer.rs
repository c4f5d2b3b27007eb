//! The reducer: gradients live in flat f32 buckets; after backward each bucket is divided by the
//! world size (as PyTorch's reducer does before communicating) and summed across ranks with one
//! all_reduce. Buckets are computed once, identically on every rank, and reduced in the same
//! order, so every rank issues the same collectives.
//!
//! Where the buckets share the parameters' device, every `.grad` is
//! a view into its bucket from the start: backward accumulates straight into the buckets and
//! nothing is copied. Something that replaces a `.grad` (an optimizer's `zero_grad` that sets it
//! to None, an assignment) would leave its rank stepping on a gradient nobody averaged, so
//! `reattach` checks every view before each backward and repairs what was replaced. Elsewhere
//! (device gradients with host buckets) gradients are copied in and out. With bf16 on the wire,
//! each bucket is converted to bf16 for its all-reduce and back: the buckets themselves stay f32.

use super::buckets::compute_bucket_assignment_by_size;
use super::hooks::{set_grad, Event, ReadyHooks};
use super::storage::{self, Released};
use super::DdpError;
use crate::comm::{shard_bounds, CommHandle, Communicator};
use crossbeam_channel::Receiver;
use std::time::Instant;
use tch::{Kind, TchError, Tensor};

struct Bucket {
    params: Vec<usize>,
    /// (offset, numel) of each parameter inside `flat`.
    spans: Vec<(i64, i64)>,
    flat: Tensor,
    /// With bf16 on the wire: the communicator's own bf16 buffer for this bucket (shared memory
    /// on one node), so the bf16 copy is reduced in place too; `None` converts afresh each time.
    low: Option<Tensor>,
    /// Sharded: this rank's shard of `flat`, [start, end).
    own: (i64, i64),
    /// `flat` is the communicator's shared memory (how its pages are released).
    shared: bool,
    /// ZeRO-2/3 on a device (or `free_storage`): once reduced, this rank's shard is copied out
    /// and `flat` freed until the next backward (`storage`); the optimizer steps on the copy.
    freed: Option<Released>,
}

/// How the reducer is built (`DdpOptions` carries the user-facing form).
pub struct ReducerOptions {
    pub first_cap_bytes: usize,
    pub cap_bytes: usize,
    /// Where the flat buckets live: the model's device for a backend that reduces device memory
    /// itself (NCCL), else the CPU (host backends).
    pub buffer_device: tch::Device,
    /// All-reduce in bf16: half the bytes on the wire.
    pub reduce_bf16: bool,
    /// Start each bucket's all-reduce during backward, as soon as its gradients are ready.
    pub overlap: bool,
    /// ZeRO over this many ranks: buckets are reduce-scattered (each rank gets the average of
    /// its shard only). Device buckets are padded to a multiple of it (NCCL's reduce-scatter
    /// wants equal shards); host buckets keep DDP's exact layout, so the ring adds every element
    /// in the all-reduce's order at any world size.
    pub shard_world: Option<usize>,
    /// ZeRO-2: after each host bucket is reduce-scattered, everything but this rank's shard is
    /// zeroed by handing its pages back to the kernel (`pages`).
    pub release_unowned: bool,
    /// With `release_unowned`: free the buckets' storage instead (always on a device, where
    /// pages cannot be handed back; on the host only when asked, e.g. to test that path).
    pub free_storage: bool,
    /// Called with a bucket's index once it is reduced (ZeRO-3 releases the unit's gathered
    /// parameters), on the thread that reduced it.
    pub after_reduce: Option<AfterReduce>,
    /// Reduce even at world size 1 (`DdpOptions::force_collectives`).
    pub force_collectives: bool,
}

/// One bucket as ZeRO sees it (`Reducer::buckets`): ZeRO-1/2 step slices of it and gather
/// through it, ZeRO-3 lays its parameters' buffer out the same.
pub struct BucketView {
    pub flat: Tensor,
    /// This rank's shard of it (all of it unsharded).
    pub own: (i64, i64),
    /// Each parameter's (index, offset, length) inside it.
    pub members: Vec<(usize, i64, i64)>,
    /// The communicator's shared memory (how its pages are released).
    pub shared: bool,
    /// This rank's shard of the averaged gradients where `flat` is freed between backward
    /// passes (`ReducerOptions::free_storage`); else it is `flat`'s own range.
    pub grad_shard: Option<Tensor>,
}

/// See `ReducerOptions::after_reduce`.
pub type AfterReduce = std::sync::Arc<dyn Fn(usize) -> Result<(), DdpError> + Send + Sync>;

pub struct Reducer {
    params: Vec<Tensor>,
    buckets: Vec<Bucket>,
    reduce_bf16: bool,
    /// When each bucket's all-reduce ran in the last `reduce`, for the timeline.
    bucket_times: Vec<(Instant, Instant)>,
    /// Each parameter's view into its bucket, when gradients live in the buckets.
    views: Option<Vec<Tensor>>,
    overlap: bool,
    force_collectives: bool,
    hooks: Option<(ReadyHooks, Receiver<Event>)>,
    /// Bucket of each parameter.
    bucket_of: Vec<usize>,
    /// Gradients found replaced (and re-attached) since the reducer was built.
    reattached: u64,
    /// ZeRO-1: reduce-scatter instead of all-reduce; the control value travels on its own.
    shard: bool,
    /// Every bucket is the communicator's own memory (`alloc_reduce_buffer`).
    shared_buckets: bool,
    /// ZeRO-2 on host buckets: release what is not this rank's after each reduce-scatter.
    release: bool,
    after_reduce: Option<AfterReduce>,
}

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

/// How a bucket is summed across ranks.
#[derive(Clone, Copy)]
enum Reduction {
    AllReduce,
    /// As bf16 on the wire.
    AllReduceBf16,
    /// ZeRO-1: only this rank's shard is summed here.
    ReduceScatter,
}

/// Divides a bucket by the world size and sums it across ranks; returns when it started and
/// ended, for the timeline. `deferred`: the sum may still be in flight on return (NCCL: launched
/// on its stream, where the end is the launch) until `comm.wait_pending()`, which the caller
/// issues before reading the bucket. The bf16 path copies the result back, so it never defers.
fn reduce_bucket(
    comm: &mut dyn Communicator,
    flat: &Tensor,
    low: Option<&Tensor>,
    world: f64,
    how: Reduction,
    deferred: bool,
    release: Option<Release>,
) -> Result<(Instant, Instant), DdpError> {
    let started = Instant::now();
    let mut flat = flat.shallow_clone();
    // Averaged as PyTorch's reducer does: each rank's bucket divided by the world size, then
    // summed. The deferred all-reduce leaves the division to the backend, which may fold it into
    // its reads (the same bits).
    let fused = matches!((how, deferred), (Reduction::AllReduce | Reduction::ReduceScatter, true));
    if !fused {
        let _ = flat.f_div_scalar_(world)?;
    }
    match how {
        Reduction::AllReduce if deferred => comm.all_reduce_divided_tensor_async(&mut flat, world)?,
        Reduction::AllReduce => comm.all_reduce_tensor(&mut flat)?,
        Reduction::AllReduceBf16 => {
            // Copying into a bf16 tensor rounds as `to_kind` does: the same bits either way.
            let mut low = match low {
                Some(l) => {
                    let mut l = l.shallow_clone();
                    l.f_copy_(&flat)?;
                    l
                }
                None => flat.f_to_kind(Kind::BFloat16)?,
            };
            comm.all_reduce_tensor(&mut low)?;
            flat.f_copy_(&low)?;
        }
        // Only this rank's shard is averaged: the rest may be left undivided (it is not read).
        Reduction::ReduceScatter if deferred => comm.reduce_scatter_divided_tensor_async(&mut flat, world)?,
        Reduction::ReduceScatter => comm.reduce_scatter_tensor(&mut flat)?,
    }
    if let Some(r) = release {
        // Host buckets only: the reduce-scatter has finished on return, and the rest of the
        // bucket (peers' partial sums) is not needed.
        super::pages::zero_outside(&flat, r.own.0, r.own.1, r.shared)?;
    }
    Ok((started, Instant::now()))
}

/// ZeRO-2: what `reduce_bucket` keeps of a host bucket after reduce-scattering it.
#[derive(Clone, Copy)]
struct Release {
    own: (i64, i64),
    shared: bool,
}

/// A zeroed bucket of `numel` f32. On the host, the communicator's own memory when it has some
/// (shared memory every rank on the node maps: the all-reduce then reads the peers' buckets in
/// place instead of streaming them through links); every rank asks for the same buckets in the
/// same order, as the allocation is collective.
/// Returns the bucket and whether it is the communicator's.
fn bucket_buffer(comm: &mut dyn Communicator, numel: i64, device: tch::Device) -> Result<(Tensor, bool), DdpError> {
    if device == tch::Device::Cpu {
        if let Some(t) = comm.alloc_reduce_buffer(numel as usize, Kind::Float)? {
            return Ok((t, true));
        }
    }
    Ok((Tensor::f_zeros([numel], (Kind::Float, device))?, false))
}

/// With bf16 on the wire and host buckets: the communicator's own bf16 buffer, when it has one.
fn wire_buffer(comm: &mut dyn Communicator, opts: &ReducerOptions, numel: i64) -> Result<Option<Tensor>, DdpError> {
    if !opts.reduce_bf16 || opts.buffer_device != tch::Device::Cpu {
        return Ok(None);
    }
    Ok(comm.alloc_reduce_buffer(numel as usize, Kind::BFloat16)?)
}

impl Reducer {
    pub fn new(comm: &mut dyn Communicator, params: &[Tensor], opts: &ReducerOptions) -> Result<Self, DdpError> {
        for (i, p) in params.iter().enumerate() {
            if p.kind() != Kind::Float {
                return Err(DdpError::Unsupported(format!("parameter {i} has dtype {:?}; gradients are reduced as f32", p.kind())));
            }
            if !p.requires_grad() {
                return Err(DdpError::Unsupported(format!("parameter {i} does not require a gradient (pass it as a buffer)")));
            }
        }
        let sizes: Vec<usize> = params.iter().map(|p| p.numel() * 4).collect();
        let assignment = compute_bucket_assignment_by_size(&sizes, &[opts.first_cap_bytes, opts.cap_bytes]);
        let mut bucket_of = vec![0; params.len()];
        for (b, idx) in assignment.iter().enumerate() {
            for &i in idx {
                bucket_of[i] = b;
            }
        }
        let last = assignment.len().saturating_sub(1);
        let mut buckets = Vec::with_capacity(assignment.len());
        let attachable = params.iter().all(|p| p.device() == opts.buffer_device);
        let mut shared_buckets = true;
        for (bi, idx) in assignment.into_iter().enumerate() {
            let mut off = 0i64;
            let spans = idx
                .iter()
                .map(|&i| {
                    let n = params[i].numel() as i64;
                    off += n;
                    (off - n, n)
                })
                .collect();
            // The control slot rides in the last bucket (sharded, it stays zero: the sum of a
            // reduce-scatter reaches one rank only, so the vote travels on its own; the slot keeps
            // the layout DDP's). Sharded device buckets are padded with zeros to a multiple of the
            // world size, so every rank's shard has the same length.
            let extra = i64::from(bi == last);
            let off = match opts.shard_world {
                Some(w) if opts.buffer_device != tch::Device::Cpu => (off + extra + w as i64 - 1) / w as i64 * w as i64 - extra,
                _ => off,
            };
            buckets.push(Self::bucket(comm, opts, attachable, idx, spans, off + extra)?);
        }
        if buckets.is_empty() {
            // No parameters: still one bucket, for the control value.
            buckets.push(Self::bucket(comm, opts, attachable, vec![], vec![], 1)?);
        }
        for b in &buckets {
            shared_buckets &= b.shared;
        }
        let mut reducer = Self {
            params: params.iter().map(|p| p.shallow_clone()).collect(),
            buckets,
            reduce_bf16: opts.reduce_bf16,
            bucket_times: Vec::new(),
            views: None,
            overlap: opts.overlap,
            force_collectives: opts.force_collectives,
            hooks: None,
            bucket_of,
            reattached: 0,
            shard: opts.shard_world.is_some(),
            shared_buckets,
            release: opts.release_unowned && opts.buffer_device == tch::Device::Cpu && !opts.free_storage,
            after_reduce: opts.after_reduce.clone(),
        };
        if attachable {
            reducer.attach()?;
        }
        Ok(reducer)
    }

    fn bucket(
        comm: &mut dyn Communicator,
        opts: &ReducerOptions,
        attachable: bool,
        params: Vec<usize>,
        spans: Vec<(i64, i64)>,
        len: i64,
    ) -> Result<Bucket, DdpError> {
        // Only where the gradients are the buckets' views: copied-out gradients would be copied
        // back into a freed bucket.
        let frees = attachable && opts.release_unowned && (opts.free_storage || opts.buffer_device != tch::Device::Cpu);
        // Freed storage is this process's own: the communicator's shared memory stays mapped.
        let (flat, shared) = match frees {
            true => (Tensor::f_zeros([len], (Kind::Float, opts.buffer_device))?, false),
            false => bucket_buffer(comm, len, opts.buffer_device)?,
        };
        let low = wire_buffer(comm, opts, len)?;
        let own = match opts.shard_world {
            Some(w) => {
                let (a, b) = shard_bounds(len as usize, w, comm.shard_index());
                (a as i64, b as i64)
            }
            None => (0, len),
        };
        let freed = if frees { Some(Released::new(&flat, own)?) } else { None };
        Ok(Bucket { params, spans, flat, low, own, shared, freed })
    }

    /// What `reduce_bucket` releases of bucket `b` (ZeRO-2 on host buckets).
    fn release_of(&self, b: &Bucket) -> Option<Release> {
        self.release.then_some(Release { own: b.own, shared: b.shared })
    }

    /// Lets every gradient live in its bucket: existing values are copied in, then `.grad`
    /// becomes the view.
    fn attach(&mut self) -> Result<(), DdpError> {
        let mut views: Vec<Tensor> = (0..self.params.len()).map(|_| Tensor::new()).collect();
        for b in &self.buckets {
            for (&i, &(off, n)) in b.params.iter().zip(&b.spans) {
                let p = &self.params[i];
                // Detached: the same memory, but not an autograd view, so a zero_grad that
                // detaches gradients in place (libtorch's optimizers do) works on it.
                let mut view = b.flat.f_narrow(0, off, n)?.f_view(p.size().as_slice())?.f_detach()?;
                let g = p.grad();
                if g.defined() {
                    view.f_copy_(&g)?;
                } else {
                    let _ = view.f_zero_()?;
                }
                set_grad(p, &view).map_err(DdpError::Unsupported)?;
                views[i] = view;
            }
        }
        self.views = Some(views);
        Ok(())
    }

    /// Checks that every gradient is still its bucket view and re-attaches the ones that were
    /// replaced (a None gradient counts as zero). Returns the indices repaired.
    pub fn reattach(&mut self) -> Result<Vec<usize>, DdpError> {
        let Some(views) = &self.views else { return Ok(vec![]) };
        let mut repaired = Vec::new();
        for (i, (p, view)) in self.params.iter().zip(views).enumerate() {
            if !storage::is_allocated(&self.buckets[self.bucket_of[i]].flat) {
                // Freed since its reduction: `restore` attaches it before the next backward.
                continue;
            }
            let g = p.grad();
            if g.defined() && g.data_ptr() == view.data_ptr() {
                continue;
            }
            let mut view = view.shallow_clone();
            tch::no_grad(|| if g.defined() { view.f_copy_(&g) } else { view.f_zero_().map(|_| ()) })?;
            set_grad(p, &view).map_err(DdpError::Unsupported)?;
            repaired.push(i);
        }
        self.reattached += repaired.len() as u64;
        Ok(repaired)
    }

    /// Before a backward: every freed bucket allocated again (zeros, and this rank's shard of
    /// what was reduced into it, as host buckets keep it until `zero_grad`) and its parameters'
    /// gradients its views again.
    pub fn restore(&mut self) -> Result<(), DdpError> {
        let Some(views) = &self.views else { return Ok(()) };
        for b in &self.buckets {
            let Some(f) = &b.freed else { continue };
            if f.restore(&b.flat, true)? {
                for &i in &b.params {
                    set_grad(&self.params[i], &views[i]).map_err(DdpError::Unsupported)?;
                }
            }
        }
        Ok(())
    }

    /// After a reduction has finished (on every stream): each freed-storage bucket's shard
    /// copied out, its parameters' gradients undefined (nothing may read the memory: a read
    /// gets no gradient instead) and its storage freed.
    fn free_reduced(&mut self) -> Result<(), DdpError> {
        for b in &self.buckets {
            let Some(f) = &b.freed else { continue };
            if !storage::is_allocated(&b.flat) {
                continue;
            }
            f.keep(&b.flat)?;
            storage::free_gradients(&b.flat, b.params.iter().map(|&i| &self.params[i]))?;
        }
        Ok(())
    }

    /// Gradients found replaced and re-attached so far.
    pub fn reattached(&self) -> u64 {
        self.reattached
    }

    /// Zeroes every gradient in place, keeping the views (as `zero_grad(set_to_none=False)`).
    pub fn zero_grad(&mut self) -> Result<(), DdpError> {
        if self.views.is_some() {
            self.reattach()?;
            for b in &self.buckets {
                if let Some(f) = &b.freed {
                    let _ = f.shard.shallow_clone().f_zero_()?;
                    if !storage::is_allocated(&b.flat) {
                        continue;
                    }
                }
                match self.release_of(b) {
                    // Sharded: the whole bucket is released (it reads as zeros), this rank's
                    // shard too — nothing of the gradients is resident from the step until the
                    // next backward writes them, when the activations peak.
                    Some(r) => super::pages::zero_range(&b.flat, 0, b.flat.numel() as i64, r.shared)?,
                    None => {
                        let _ = b.flat.shallow_clone().f_zero_()?;
                    }
                }
            }
        } else {
            for p in &self.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.f_zero_()?;
                }
            }
        }
        Ok(())
    }

    /// Whether `backward_and_reduce` overlaps: otherwise run backward, then `reduce`.
    pub fn can_overlap(&self, comm: &dyn Communicator) -> bool {
        self.overlap && self.views.is_some() && (comm.world_size() > 1 || self.force_collectives) && comm.supports_overlap()
    }

    /// Runs `backward` and averages the gradients; returns the sum of every rank's `control`.
    /// A communication thread all-reduces each bucket, in bucket order on every rank, as soon as
    /// backward has accumulated all of its gradients; the step then waits only for what backward
    /// did not hide. Results are bitwise the same as without overlap. `handle` (whose
    /// communicator `comm` is) is lent to that thread meanwhile, so a collective inside backward
    /// (`autograd::all_gather`'s) runs there, between the buckets, in the engine's order.
    /// Call only when `can_overlap`.
    pub fn backward_and_reduce(
        &mut self,
        comm: &mut dyn Communicator,
        handle: &CommHandle,
        control: f32,
        backward: impl FnOnce() -> Result<(), tch::TchError>,
    ) -> Result<f32, DdpError> {
        if self.hooks.is_none() {
            self.hooks = Some(ReadyHooks::install(&self.params).map_err(DdpError::Unsupported)?);
        }
        let (hooks, rx) = self.hooks.as_ref().expect("installed above");
        while rx.try_recv().is_ok() {} // nothing stale from an aborted or no_sync step
        let world = comm.world_size() as f64;
        let last = self.buckets.len() - 1;
        if !self.shard {
            self.buckets[last].set_control(control)?;
        }
        let how = self.reduction();
        let flats: Vec<Tensor> = self.buckets.iter().map(|b| b.flat.shallow_clone()).collect();
        let lows: Vec<Option<Tensor>> = self.buckets.iter().map(|b| b.low.as_ref().map(|l| l.shallow_clone())).collect();
        let releases: Vec<Option<Release>> = self.buckets.iter().map(|b| self.release_of(b)).collect();
        let after_reduce = self.after_reduce.clone();
        let sizes: Vec<usize> = self.buckets.iter().map(|b| b.params.len()).collect();
        let bucket_of = &self.bucket_of;
        let done = hooks.sender();
        let jobs = hooks.sender();
        handle.lend(Box::new(move |job| jobs.send(Event::Job(job)).is_ok()), comm.timeout());
        // Lent to the communication thread for the scope, back here for the control sum.
        let comm_lent: &mut dyn Communicator = &mut *comm;
        let (backward_result, reduced) = std::thread::scope(|s| {
            let worker = std::thread::Builder::new().name("ddp-comm".into()).spawn_scoped(s, move || {
                // However this thread ends, a job sent later is refused and one queued but not
                // run is dropped: its caller gets an error, not a wait.
                struct Stop<'a>(&'a CommHandle, &'a Receiver<Event>);
                impl Drop for Stop<'_> {
                    fn drop(&mut self) {
                        self.0.stop_lending(|| while self.1.try_recv().is_ok() {});
                    }
                }
                let _stop = Stop(handle, rx);
                let mut ready = vec![0usize; sizes.len()];
                // Distinct parameters, not hook firings: a second gradient for one parameter (a
                // second backward through it, reentrant checkpointing) would complete a bucket
                // still accumulating, or add into one being reduced.
                let mut seen = vec![false; bucket_of.len()];
                let mut next = 0;
                let mut times = Vec::with_capacity(sizes.len());
                let mut reduce_ready =
                    |comm: &mut dyn Communicator, next: &mut usize, upto: &dyn Fn(usize) -> bool| -> Result<(), DdpError> {
                        while *next < sizes.len() && upto(*next) {
                            // The last bucket is ready when backward has (all but) finished:
                            // this rank then only waits, and may wait busily (`set_idle_waits`).
                            comm.set_idle_waits(*next + 1 == sizes.len());
                            let t = reduce_bucket(comm, &flats[*next], lows[*next].as_ref(), world, how, true, releases[*next]);
                            comm.set_idle_waits(false);
                            times.push(t?);
                            if let Some(f) = &after_reduce {
                                f(*next)?;
                            }
                            *next += 1;
                        }
                        Ok(())
                    };
                for event in rx.iter() {
                    let i = match event {
                        Event::Done => break,
                        Event::Job(job) => {
                            job(&mut *comm_lent);
                            continue;
                        }
                        Event::Ready(i) => i,
                    };
                    if std::mem::replace(&mut seen[i], true) {
                        return Err(DdpError::ReadyTwice(i));
                    }
                    ready[bucket_of[i]] += 1;
                    reduce_ready(&mut *comm_lent, &mut next, &|b| ready[b] >= sizes[b])?;
                }
                // Parameters that got no gradient this step still take part (zeros), as with
                // DDP's find_unused_parameters: no rank waits for a hook that never fires.
                reduce_ready(&mut *comm_lent, &mut next, &|_| true)?;
                Ok(times)
            });
            // The end marker goes out even if `backward` panics (a drop guard), so the
            // communication thread never waits forever for it.
            struct Done(crossbeam_channel::Sender<Event>);
            impl Drop for Done {
                fn drop(&mut self) {
                    let _ = self.0.send(Event::Done);
                }
            }
            let guard = Done(done);
            let backward_result = backward();
            drop(guard);
            let reduced = match worker {
                Ok(w) => w.join().unwrap_or_else(|_| Err(DdpError::Unsupported("the communication thread panicked".into()))),
                Err(e) => Err(DdpError::Unsupported(format!("starting the communication thread: {e}"))),
            };
            (backward_result, reduced)
        });
        handle.reclaim();
        // Whatever failed, the next backward must not write into buckets still being reduced.
        let pending = comm.wait_pending();
        backward_result?;
        self.bucket_times = reduced?;
        pending?;
        self.free_reduced()?;
        self.control_sum(comm, control)
    }

    /// Start and end of each bucket's all-reduce in the last `reduce`.
    pub fn last_bucket_times(&self) -> &[(Instant, Instant)] {
        &self.bucket_times
    }

    /// True when the buckets are the communicator's own memory (shared by the node's ranks).
    pub fn buckets_shared(&self) -> bool {
        self.shared_buckets
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
        if comm.world_size() == 1 && !self.force_collectives {
            // Nothing to average (a freed-storage bucket's gradients still move to its shard).
            self.free_reduced()?;
            return Ok(control);
        }
        let last = self.buckets.len() - 1;
        if !self.shard {
            self.buckets[last].set_control(control)?;
        }
        self.bucket_times.clear();
        let attached = self.views.is_some();
        let how = self.reduction();
        // Backward has finished: this rank only waits for its peers (see `set_idle_waits`).
        comm.set_idle_waits(true);
        let reduced = (|| -> Result<(), DdpError> {
            for (bi, b) in self.buckets.iter().enumerate() {
                if !attached {
                    for (&i, &(off, n)) in b.params.iter().zip(&b.spans) {
                        let mut dst = b.flat.f_narrow(0, off, n)?;
                        let g = self.params[i].grad();
                        if g.defined() {
                            dst.f_copy_(&g.f_view([-1])?)?;
                        } else {
                            let _ = dst.f_zero_()?;
                        }
                    }
                }
                // Copied-out gradients are read right after: only attached buckets may defer.
                self.bucket_times.push(reduce_bucket(comm, &b.flat, b.low.as_ref(), world, how, attached, self.release_of(b))?);
                if let Some(f) = &self.after_reduce {
                    f(bi)?;
                }
                if !attached {
                    for (&i, &(off, n)) in b.params.iter().zip(&b.spans) {
                        let p = &self.params[i];
                        let view = b.flat.f_narrow(0, off, n)?.f_view(p.size().as_slice())?;
                        let mut g = p.grad();
                        if g.defined() {
                            g.f_copy_(&view)?;
                        } else {
                            // No gradient here, but other ranks had one: this rank must step on the
                            // average too.
                            let own = view.f_to_device(p.device())?.f_detach_copy()?;
                            set_grad(p, &own).map_err(DdpError::Unsupported)?;
                        }
                    }
                }
            }
            Ok(())
        })();
        comm.set_idle_waits(false);
        // Whatever failed, the buckets already launched must be waited for before anything
        // touches them again.
        let pending = comm.wait_pending();
        reduced?;
        pending?;
        self.free_reduced()?;
        self.control_sum(comm, control)
    }

    fn reduction(&self) -> Reduction {
        match (self.shard, self.reduce_bf16) {
            (true, _) => Reduction::ReduceScatter,
            (false, true) => Reduction::AllReduceBf16,
            (false, false) => Reduction::AllReduce,
        }
    }

    /// The sum of every rank's control value: read from the last bucket, or (ZeRO-1) summed on
    /// its own, exactly.
    fn control_sum(&self, comm: &mut dyn Communicator, control: f32) -> Result<f32, DdpError> {
        if self.shard {
            let mut v = [control];
            comm.all_reduce_sum(&mut v)?;
            return Ok(v[0]);
        }
        let sum = self.buckets[self.buckets.len() - 1].control_sum(comm.world_size() as f64)?;
        // The read waited for the sums on the device. Had NCCL's watchdog aborted meanwhile, it
        // read (and the optimizer would step on) partial sums: its recorded error says so.
        comm.wait_pending()?;
        Ok(sum)
    }

    /// ZeRO-2 on host buckets: whether buckets are released outside this rank's shard.
    pub fn releases(&self) -> bool {
        self.release
    }

    /// Bytes of the gradient buckets resident in memory (host buckets, or any freed between
    /// backward passes: those count their allocation and the shard's copy).
    pub fn resident_bytes(&self) -> Option<usize> {
        self.buckets
            .iter()
            .map(|b| match &b.freed {
                Some(f) => Some(f.resident_bytes(&b.flat)),
                None => super::pages::resident_bytes(&b.flat),
            })
            .sum()
    }

    /// Every bucket, for ZeRO's slices and gathers and ZeRO-3's parameter buffers.
    pub fn buckets(&self) -> Vec<BucketView> {
        self.buckets
            .iter()
            .map(|b| BucketView {
                flat: b.flat.shallow_clone(),
                own: b.own,
                members: b.params.iter().zip(&b.spans).map(|(&i, &(off, n))| (i, off, n)).collect(),
                shared: b.shared,
                grad_shard: b.freed.as_ref().map(|f| f.shard.shallow_clone()),
            })
            .collect()
    }
}
