//! ZeRO-3 (`Shard::Params`, FSDP's FULL_SHARD) on the parameters' side: the parameters live in
//! flat buffers laid out as DDP's gradient buckets (the same order, lengths and shards), and are
//! views into them. Between uses only this rank's shard of each is resident — the optimizer
//! steps it in place — and the rest is released memory (`pages`). A unit (a GPT block, a ResNet
//! stage, the root's segments) needs the buffers holding any of its parameters:
//!
//! ```text
//! forward    before a unit runs, its buffers are all-gathered (the parameters are whole), and
//!            the previous unit's that it does not share are released; its output is wrapped
//!            so that backward gathers them again first
//! backward   a bucket is reduce-scattered once all its gradients are in (the reducer, as
//!            ZeRO-2), and then its parameters' buffer is released
//! reading    `Ddp::full_state` gathers every buffer and holds them whole until it is dropped
//! ```
//!
//! Keeping DDP's buckets (rather than one bucket per unit) keeps DDP's order of additions: ZeRO-3
//! is bitwise equal to DDP on the ring at any world size.
//!
//! Every rank runs the same forward and backward, so every rank gathers the same units in the
//! same order. A gather inside backward goes through the communicator's handle to the thread
//! that holds it during an overlapped backward, between the bucket reductions.
//!
//! Prefetch: inside `Ddp::forward` the communicator is lent to a thread of its own, and a unit
//! entering forward sends the gather of the unit that came after it in the previous forward
//! there, to run while this unit computes; in backward (the communication thread's) each unit
//! sends the gather of the unit before it in this forward. Whether a queued gather has anything
//! to do is decided when it runs, in queue order — the same on every rank — never by the
//! compute thread, which may see a bucket the communication thread is about to release.

use super::pages;
use super::reducer::BucketView;
use super::storage::Released;
use super::DdpError;
use crate::autograd::Differentiable;
use crate::comm::{CommHandle, Pending};
use crate::units::UnitHooks;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tch::{TchError, Tensor};

/// One bucket's parameters.
struct UnitBuffer {
    flat: Mutex<Tensor>,
    own: (i64, i64),
    /// Whole (gathered); set by the gather itself, on whichever thread holds the communicator.
    whole: Arc<AtomicBool>,
    /// A prefetch of this bucket queued and not yet waited for.
    pending: Mutex<Option<Pending<Result<(), DdpError>>>>,
    /// The communicator's shared memory (how its pages are released).
    shared: bool,
    /// Device memory (or `DdpOptions::free_storage`): released, the buffer is freed and this
    /// rank's shard lives on in a copy of its own (`storage`); `None`: host pages handed back.
    /// (Behind a lock only because tensors are not `Sync`; each use takes a shallow copy.)
    freed: Option<Mutex<Freed>>,
}

/// A bucket released by freeing its buffer.
struct Freed {
    kept: Released,
    /// The bucket's parameters, with their offset and shape in it: while the buffer is freed
    /// each is one NaN broadcast to its shape (its size stays what optimizers and checkpoints
    /// read), so a stray read computes NaN instead of reading freed memory.
    members: Vec<(Tensor, i64, Vec<i64>)>,
    poison: Tensor,
}

impl Freed {
    fn shallow_clone(&self) -> Freed {
        Freed {
            kept: self.kept.shallow_clone(),
            members: self.members.iter().map(|(p, off, shape)| (p.shallow_clone(), *off, shape.clone())).collect(),
            poison: self.poison.shallow_clone(),
        }
    }

    /// Frees the buffer; `keep`: this rank's shard of it first goes to the kept copy (writes
    /// made while it was whole, through `Ddp::full_state`, survive as they do in host pages).
    fn release(&self, flat: &Tensor, keep: bool) -> Result<(), TchError> {
        if keep && super::storage::is_allocated(flat) {
            self.kept.keep(flat)?;
        }
        for (p, _, shape) in &self.members {
            p.shallow_clone().f_set_data(&self.poison.f_expand(shape.as_slice(), false)?)?;
        }
        self.kept.release(flat)
    }

    /// Allocates the buffer with this rank's shard in place (the rest for the gather to fill).
    fn restore(&self, flat: &Tensor) -> Result<(), TchError> {
        self.kept.restore(flat, false).map(|_| ())
    }

    /// After the gather: the parameters are their views again.
    fn show(&self, flat: &Tensor) -> Result<(), TchError> {
        for (p, off, shape) in &self.members {
            let n: i64 = shape.iter().product();
            p.shallow_clone().f_set_data(&flat.f_narrow(0, *off, n)?.f_view(shape.as_slice())?)?;
        }
        Ok(())
    }
}

pub struct ShardedParams {
    comm: CommHandle,
    /// One per gradient bucket, by the bucket's index.
    units: Vec<UnitBuffer>,
    /// Unit name ("" for the root) → the buckets holding its parameters.
    by_name: HashMap<String, Vec<usize>>,
    /// The buckets the unit that ran last in forward needed or prefetched (released lazily,
    /// when the next unit does not need them).
    held: Mutex<Vec<usize>>,
    /// The units in the order the current forward (inside `Ddp::forward`) entered them, and
    /// that of the previous one, which predicts what to prefetch.
    order: Mutex<Order>,
    /// While `Ddp::full_state` holds the parameters whole, nothing is released.
    pinned: AtomicUsize,
    /// Prefetch (`DdpOptions::prefetch`).
    prefetch: bool,
    /// Release in forward when the next unit runs (`DdpOptions::reshard_after_forward`).
    after_forward: bool,
    /// Gathers done, and of those prefetched, for the log and tests.
    gathers: Arc<AtomicUsize>,
    prefetched: Arc<AtomicUsize>,
}

/// How `ShardedParams` gathers and releases (from `DdpOptions`).
pub(crate) struct Release {
    pub prefetch: bool,
    pub after_forward: bool,
    pub free_storage: bool,
}

#[derive(Default)]
struct Order {
    current: Option<Vec<String>>,
    last: Vec<String>,
}

/// Makes each of `members` ((parameter index, offset, length) in `flat`) a view into `flat` at
/// its offset: the parameter itself (the model's tensor, whoever holds it) then lives in the
/// buffer. `copy`: its values are copied there first (without, the buffer's are kept: another
/// rank wrote them into memory shared with this one). Call under no_grad.
pub(super) fn move_into(flat: &Tensor, members: &[(usize, i64, i64)], params: &[(String, Tensor)], copy: bool) -> Result<(), TchError> {
    for &(i, off, n) in members {
        let p = &params[i].1;
        let view = flat.f_narrow(0, off, n)?.f_view(p.size().as_slice())?;
        if copy {
            view.shallow_clone().f_copy_(p)?;
        }
        let _ = p.shallow_clone().f_set_source_tensor_(&view)?;
    }
    Ok(())
}

fn torch(e: DdpError) -> TchError {
    TchError::Torch(e.to_string())
}

impl ShardedParams {
    /// Moves `params` into per-bucket flat buffers, makes each parameter a view into its buffer
    /// and releases all but this rank's shard. `units`: the model's unit names (parameter name
    /// prefixes; the rest is the root, "").
    pub(crate) fn new(
        comm: CommHandle,
        params: &[(String, Tensor)],
        layout: &[BucketView],
        units: &[String],
        how: Release,
    ) -> Result<ShardedParams, DdpError> {
        let Release { prefetch, after_forward, free_storage } = how;
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (b, l) in layout.iter().enumerate() {
            for &(i, _, _) in &l.members {
                let unit = crate::units::unit_of(&params[i].0, units).unwrap_or("").to_string();
                let list = by_name.entry(unit).or_default();
                if list.last() != Some(&b) {
                    list.push(b);
                }
            }
        }
        let mut buffers = Vec::with_capacity(layout.len());
        let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
        for l in layout {
            let len = l.flat.numel() as i64;
            // Freed storage is this process's own: the communicator's shared memory stays mapped.
            let flat = match device {
                tch::Device::Cpu if !free_storage => comm.lock().alloc_reduce_buffer(len as usize, tch::Kind::Float)?,
                _ => None,
            };
            let shared = flat.is_some();
            let flat = match flat {
                Some(f) => f,
                None => Tensor::f_zeros([len], (tch::Kind::Float, device))?,
            };
            tch::no_grad(|| move_into(&flat, &l.members, params, true))?;
            let freed = match free_storage || device != tch::Device::Cpu {
                true => Some(Mutex::new(Freed {
                    kept: Released::new(&flat, l.own)?,
                    members: l.members.iter().map(|&(i, off, _)| (params[i].1.shallow_clone(), off, params[i].1.size())).collect(),
                    // 0-dim: it expands to any shape, a scalar parameter's too.
                    poison: Tensor::f_full([] as [i64; 0], f64::NAN, (tch::Kind::Float, device))?,
                })),
                false => None,
            };
            buffers.push(UnitBuffer {
                flat: Mutex::new(flat),
                own: l.own,
                whole: Arc::new(AtomicBool::new(true)),
                pending: Mutex::new(None),
                shared,
                freed,
            });
        }
        let sp = ShardedParams {
            comm,
            units: buffers,
            by_name,
            held: Mutex::new(Vec::new()),
            order: Mutex::new(Order::default()),
            pinned: AtomicUsize::new(0),
            prefetch,
            after_forward,
            gathers: Arc::new(AtomicUsize::new(0)),
            prefetched: Arc::new(AtomicUsize::new(0)),
        };
        for b in 0..sp.units.len() {
            sp.release(b)?;
        }
        Ok(sp)
    }

    fn flat(&self, b: usize) -> Tensor {
        self.units[b].flat.lock().unwrap_or_else(|p| p.into_inner()).shallow_clone()
    }

    /// The all-gather of bucket `b`'s parameters, to run wherever the communicator is: it does
    /// nothing if the bucket is whole by then.
    fn gather_job(
        &self,
        b: usize,
        ahead: bool,
    ) -> impl FnOnce(&mut dyn crate::comm::Communicator) -> Result<(), DdpError> + Send + 'static {
        let mut flat = self.flat(b);
        let whole = self.units[b].whole.clone();
        let freed = self.freed(b);
        let (gathers, prefetched) = (self.gathers.clone(), self.prefetched.clone());
        move |comm| {
            if whole.load(Ordering::Acquire) {
                return Ok(());
            }
            if let Some(f) = &freed {
                f.restore(&flat)?;
            }
            comm.all_gather_shards_tensor(&mut flat)?;
            if let Some(f) = &freed {
                f.show(&flat)?;
            }
            whole.store(true, Ordering::Release);
            gathers.fetch_add(1, Ordering::Relaxed);
            if ahead {
                prefetched.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
    }

    /// Makes unit `b`'s parameters whole (a collective; every rank calls it at the same point).
    pub fn gather(&self, b: usize) -> Result<(), DdpError> {
        self.settle(b)?;
        // Not lent, no other thread changes `whole`: a whole bucket needs nothing (nor the
        // communicator, which a caller may be holding, e.g. reading a pinned model).
        if !self.comm.is_lent() && self.units[b].whole.load(Ordering::Acquire) {
            return Ok(());
        }
        let what = format!("the all-gather of the parameters of bucket {b}");
        self.comm.submit(&what, self.gather_job(b, false))?.wait()?
    }

    /// Queues the gather of bucket `b` where the communicator is lent, without waiting (nothing
    /// when it is not: there is no thread to overlap with). At most one is queued per bucket.
    fn prefetch(&self, b: usize) -> Result<(), DdpError> {
        if !self.prefetch || !self.comm.is_lent() {
            return Ok(());
        }
        let mut pending = self.units[b].pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.is_none() {
            let what = format!("the prefetch of the parameters of bucket {b}");
            *pending = Some(self.comm.submit(&what, self.gather_job(b, true))?);
        }
        Ok(())
    }

    /// Waits for bucket `b`'s queued prefetch, if any.
    fn settle(&self, b: usize) -> Result<(), DdpError> {
        let pending = self.units[b].pending.lock().unwrap_or_else(|p| p.into_inner()).take();
        match pending {
            Some(p) => p.wait()?,
            None => Ok(()),
        }
    }

    /// Releases unit `b`'s parameters outside this rank's shard (unless pinned whole), once a
    /// prefetch of it has run. From the compute thread.
    pub fn release(&self, b: usize) -> Result<(), DdpError> {
        self.settle(b)?;
        self.release_now(b)
    }

    /// `release` on the thread holding the communicator (after the bucket's reduction), in
    /// order with the gathers queued there: it cannot wait for one queued behind it.
    pub fn release_now(&self, b: usize) -> Result<(), DdpError> {
        self.release_keeping(b, false)
    }

    /// `release_now`; `keep`: a freed buffer's shard is kept from it first (see `Freed::release`).
    fn release_keeping(&self, b: usize, keep: bool) -> Result<(), DdpError> {
        let u = &self.units[b];
        if self.pinned.load(Ordering::Acquire) > 0 || !u.whole.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.freed(b) {
            Some(f) => f.release(&self.flat(b), keep)?,
            None => pages::zero_outside(&self.flat(b), u.own.0, u.own.1, u.shared)?,
        }
        u.whole.store(false, Ordering::Release);
        Ok(())
    }

    /// After the optimizer stepped the shards in place: a bucket still whole holds the other
    /// ranks' parameters from before the step, so every one is released (gathered afresh when
    /// next needed). A bucket can be whole here: a root segment's backward may gather one after
    /// its gradients were reduced.
    pub fn stepped(&self) -> Result<(), DdpError> {
        for b in 0..self.units.len() {
            self.release(b)?;
        }
        Ok(())
    }

    /// Every unit whole until `unpin` (a collective).
    pub fn pin(&self) -> Result<(), DdpError> {
        for b in 0..self.units.len() {
            self.gather(b)?;
        }
        self.pinned.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    pub fn unpin(&self) -> Result<(), DdpError> {
        if self.pinned.fetch_sub(1, Ordering::AcqRel) == 1 {
            // What was written while whole is kept (never after a step: the stale buffer would
            // overwrite the stepped shard, so `stepped` releases without keeping).
            for b in 0..self.units.len() {
                self.settle(b)?;
                self.release_keeping(b, true)?;
            }
        }
        Ok(())
    }

    pub fn pinned(&self) -> bool {
        self.pinned.load(Ordering::Acquire) > 0
    }

    /// All-gathers done so far, and how many of them were prefetches.
    pub fn gathers(&self) -> (usize, usize) {
        (self.gathers.load(Ordering::Relaxed), self.prefetched.load(Ordering::Relaxed))
    }

    /// Bytes of the parameter buffers resident in memory (host buffers, or any whose storage is
    /// freed: those count their allocation and the shard's copy).
    pub fn resident_bytes(&self) -> Option<usize> {
        (0..self.units.len())
            .map(|b| match self.freed(b) {
                Some(f) => Some(f.kept.resident_bytes(&self.flat(b))),
                None => pages::resident_bytes(&self.flat(b)),
            })
            .sum()
    }

    /// Bucket `b`'s shard where the optimizer must step it: its own copy when the buffer is
    /// freed between uses (`None`: the parameters' views into the buffer).
    pub fn shard_copy(&self, b: usize) -> Option<Tensor> {
        self.freed(b).map(|f| f.kept.shard)
    }

    /// Bucket `b`'s freed-storage parts, if it is released that way.
    fn freed(&self, b: usize) -> Option<Freed> {
        self.units[b].freed.as_ref().map(|f| f.lock().unwrap_or_else(|p| p.into_inner()).shallow_clone())
    }

    /// Calls `f(i)` for every parameter index in `0..bucket_of.len()` in order with its bucket
    /// (`bucket_of[i]`) whole, one bucket at a time: a bucket's parameters are consecutive, so
    /// each is gathered once and released when the walk leaves it (a collective: every rank
    /// walks). What the walk found whole it leaves whole.
    pub(crate) fn walk(&self, bucket_of: &[usize], mut f: impl FnMut(usize) -> Result<(), DdpError>) -> Result<(), DdpError> {
        let mut current: Option<(usize, bool)> = None;
        for (i, &b) in bucket_of.iter().enumerate() {
            if current.map(|(c, _)| c) != Some(b) {
                if let Some((c, false)) = current {
                    self.release(c)?;
                }
                let was_whole = self.units[b].whole.load(Ordering::Acquire);
                self.gather(b)?;
                current = Some((b, was_whole));
            }
            f(i)?;
        }
        if let Some((c, false)) = current {
            self.release(c)?;
        }
        Ok(())
    }

    /// The buckets unit `name` needs.
    fn buckets_of(&self, name: &str) -> &[usize] {
        self.by_name.get(name).map_or(&[], Vec::as_slice)
    }

    /// `Ddp::forward` starts: record the order units run in (and prefetch by the last one's).
    pub(crate) fn begin_forward(&self) {
        self.order.lock().unwrap_or_else(|p| p.into_inner()).current = Some(Vec::new());
    }

    /// `Ddp::forward` ended: its order predicts the next forward's.
    pub(crate) fn end_forward(&self) {
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(current) = order.current.take() {
            order.last = current;
        }
    }

    /// Before unit `name` runs in forward: its buffers whole, the next unit's prefetched, the
    /// previous unit's others released. Returns the buckets of the unit that ran before it in
    /// this forward (what its backward prefetches), inside `Ddp::forward`.
    fn enter(&self, name: &str) -> Result<Vec<usize>, DdpError> {
        let need = self.buckets_of(name);
        let (next, before) = {
            let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
            let last = std::mem::take(&mut order.last);
            let (next, before) = match order.current.as_mut() {
                Some(current) => {
                    let at = current.len();
                    current.push(name.to_string());
                    // The unit that followed this one last time, if the forward so far matches.
                    let next = match last.get(at) == Some(&current[at]) {
                        true => last.get(at + 1).map(|n| self.buckets_of(n)).unwrap_or(&[]),
                        false => &[],
                    };
                    let before = at.checked_sub(1).map(|p| self.buckets_of(&current[p])).unwrap_or(&[]);
                    (next.to_vec(), before.to_vec())
                }
                None => (Vec::new(), Vec::new()),
            };
            order.last = last;
            (next, before)
        };
        for &b in need {
            self.gather(b)?;
        }
        let next: Vec<usize> = next.into_iter().filter(|b| !need.contains(b)).collect();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        // Kept (`reshard_after_forward: false`), they are released once reduced in backward.
        for &b in held.iter().filter(|b| self.after_forward && !need.contains(b) && !next.contains(b)) {
            self.release(b)?;
        }
        for &b in &next {
            self.prefetch(b)?;
        }
        *held = need.iter().chain(&next).copied().collect();
        Ok(before.into_iter().filter(|b| !need.contains(b)).collect())
    }
}

/// The model's unit hooks over a `ShardedParams`.
pub struct Zero3Hooks {
    params: Arc<ShardedParams>,
    /// From `before` to `after` of the unit running: the buckets its backward prefetches.
    before: Mutex<Vec<usize>>,
}

impl Zero3Hooks {
    pub fn new(params: Arc<ShardedParams>) -> Zero3Hooks {
        Zero3Hooks { params, before: Mutex::new(Vec::new()) }
    }
}

impl UnitHooks for Zero3Hooks {
    fn before(&self, name: &str) -> Result<(), TchError> {
        let before = self.params.enter(name).map_err(torch)?;
        *self.before.lock().unwrap_or_else(|p| p.into_inner()) = before;
        Ok(())
    }

    fn after(&self, name: &str, output: Tensor) -> Result<Tensor, TchError> {
        let buckets = self.params.buckets_of(name).to_vec();
        let before = std::mem::take(&mut *self.before.lock().unwrap_or_else(|p| p.into_inner()));
        if buckets.is_empty() || !crate::autograd::checkpoint::grad_enabled() || !output.requires_grad() {
            return Ok(output);
        }
        crate::autograd::apply(&output, Box::new(GatherBeforeBackward { params: self.params.clone(), buckets, before }))
    }
}

/// Identity forward; its backward, which runs before the unit's own (it consumes the unit's
/// output), makes the unit's parameters whole again and queues the gather of the unit that ran
/// before it in forward (whose backward comes next).
struct GatherBeforeBackward {
    params: Arc<ShardedParams>,
    buckets: Vec<usize>,
    before: Vec<usize>,
}

impl Differentiable for GatherBeforeBackward {
    fn forward(&self, input: &Tensor) -> Result<Tensor, String> {
        input.f_view_as(input).map_err(|e| e.to_string())
    }

    fn backward(&self, grad_output: &Tensor) -> Result<Tensor, String> {
        for &b in &self.buckets {
            self.params.gather(b).map_err(|e| e.to_string())?;
        }
        for &b in &self.before {
            self.params.prefetch(b).map_err(|e| e.to_string())?;
        }
        Ok(grad_output.shallow_clone())
    }
}
