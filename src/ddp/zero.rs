//! ZeRO stages 1 and 2 (PyTorch's `ZeroRedundancyOptimizer`, DeepSpeed's stages 1 and 2) on the
//! reducer's side.
//!
//! ```text
//! backward   each bucket is reduce-scattered: rank r ends with the average of its shard only
//! step       the optimizer updates this rank's slices of the parameters (optim::ShardSlice),
//!            keeping state for those slices only: 1/N of the optimizer memory
//! gather     every replica is identical again: on one node the parameters are one node-shared
//!            copy each rank stepped its shards of in place, so a barrier; across nodes each
//!            rank's copy lies in its node's shared memory and is all-gathered in place; without
//!            shared memory each bucket is refilled with the updated shards and all-gathered, then
//!            copied back into the parameters (`shared_params`)
//! checkpoint the state is all-gathered the same way, so a checkpoint is the unsharded one
//! ```
//!
//! A shard is a contiguous range of a bucket, so a parameter may be split between ranks; the
//! update rules are elementwise (SGD, Adam, AdamW), so stepping slices gives the same numbers.
//! Where the bucket is the gather buffer, its gradients are spent once the step is taken, and
//! `zero_grad` clears it before the next backward. On the ring the shards are reduced in the
//! all-reduce's order, so SGD and Adam are bitwise equal to unsharded training.
//!
//! Stage 2 (`Shard::Grads`) keeps the same buckets, in memory handed back to the kernel outside
//! this rank's shard: the reducer releases the rest of each bucket as soon as it is
//! reduce-scattered (during backward), and `gather_parameters` again where the bucket carried
//! the parameters. Between steps only the shard is resident: 4/N bytes per parameter instead of
//! 4; during backward, a bucket's pages exist from its first gradient to its reduce-scatter.

use super::{Ddp, DdpError};
use crate::comm::{shard_bounds, Communicator};
use crate::optim::{Optimizer, ShardSlice};
use std::collections::HashMap;
use tch::Tensor;

struct Bucket {
    flat: Tensor,
    /// This rank's shard of the bucket, [start, end).
    own: (i64, i64),
    /// (parameter index, offset, length) of each parameter in the bucket.
    members: Vec<(usize, i64, i64)>,
    /// The communicator's shared memory (how ZeRO-2 releases its pages).
    shared: bool,
    /// Where this rank's shard of the gradients lives when `flat` is freed between backward
    /// passes (`DdpOptions::free_storage`).
    grad_shard: Option<Tensor>,
    /// ZeRO-3 with freed storage: where this rank's shard of the parameters lives.
    param_shard: Option<Tensor>,
    /// ZeRO-1 and -2 on a communicator with shared memory: the bucket's parameters live in a
    /// buffer of their own, laid out as the bucket (`shared_params`).
    param_flat: Option<Tensor>,
}

impl Bucket {
    /// The part [lo, hi) of a parameter at `off` with `n` elements that lies in this rank's
    /// shard, in the parameter's own flat indices; `None` when they do not meet.
    fn owned_part(&self, off: i64, n: i64) -> Option<(i64, i64)> {
        let (lo, hi) = (self.own.0.max(off) - off, self.own.1.min(off + n) - off);
        (hi > lo).then_some((lo, hi))
    }
}

pub struct Zero {
    buckets: Vec<Bucket>,
    params: Vec<(String, Tensor)>,
    /// Parameter index → (bucket, offset in it).
    place: HashMap<usize, (usize, i64)>,
    /// ZeRO-2: after a bucket carried the gathered parameters, all but this rank's shard is
    /// released again.
    release: bool,
    /// ZeRO-3: the parameters stay sharded after the step.
    params_sharded: Option<std::sync::Arc<super::params::ShardedParams>>,
    /// The parameters' buffers are one per node, not per rank (`shared_params`).
    common: bool,
}

fn flat_view(p: &Tensor) -> Result<Tensor, DdpError> {
    Ok(p.f_detach()?.f_view([-1])?)
}

impl Zero {
    /// The shards of `ddp`'s buckets this rank owns (`ddp` made with `DdpOptions::shard`).
    /// Collective: every rank calls it, in the same order as its other collectives.
    ///
    /// On the CPU over shared memory it moves the parameters (`shared_params`): the model's
    /// tensors keep their identity but their storage becomes shared memory, on one node the same
    /// memory on every rank. From then on, a write to the parameters by one rank is every rank's,
    /// and between `Ddp::backward` and `gather_parameters` they are being stepped: read them
    /// after the gather. A handle to the old storage taken before (a `detach()`, a view, a tie
    /// made of another tensor object) no longer follows the parameter.
    pub fn new(ddp: &Ddp, comm: &mut dyn Communicator) -> Result<Zero, DdpError> {
        let params: Vec<(String, Tensor)> = ddp.named_parameters().iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect();
        // (ZeRO-3's parameters are views into its buffers, whole or not: no copy is involved.)
        if let Some((n, _)) = params.iter().find(|(_, p)| !p.is_contiguous()).filter(|_| ddp.sharded_params().is_none()) {
            return Err(DdpError::Unsupported(format!("parameter `{n}` is not contiguous: its shards cannot be flat views")));
        }
        let mut place = HashMap::new();
        let buckets = ddp
            .reducer_buckets()
            .into_iter()
            .enumerate()
            .map(|(bi, super::reducer::BucketView { flat, members, shared, grad_shard, .. })| {
                // Not the reducer's `own`: a Zero over an unsharded Ddp still steps 1/N.
                let n = flat.numel();
                let (a, b) = shard_bounds(n, comm.world_size(), comm.shard_index());
                for &(i, off, _) in &members {
                    place.insert(i, (bi, off));
                }
                let param_shard = ddp.sharded_params().and_then(|s| s.shard_copy(bi));
                Bucket { flat, own: (a as i64, b as i64), members, shared, grad_shard, param_shard, param_flat: None }
            })
            .collect();
        let mut zero =
            Zero { buckets, params, place, release: ddp.releases_unowned(), params_sharded: ddp.sharded_params(), common: false };
        zero.shared_params(comm)?;
        ddp.zero_attached.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(zero)
    }

    /// Moves the parameters into shared memory laid out as the buckets, when the communicator has
    /// some (a node-local ring on the CPU), so that `gather_parameters` copies nothing back.
    ///
    /// - The whole group one node-local ring: one buffer per bucket for the node
    ///   (`alloc_node_shared`), which every rank's parameters are views of. Each rank steps its
    ///   shard in place and the gather is a barrier; the node holds one copy of the parameters.
    /// - Otherwise (several nodes): a copy per rank (`alloc_reduce_buffer`), and the gather is the
    ///   all-gather in place, each rank's stepped shard copied into its peers' copies.
    ///
    /// Through the bucket, the gather took three passes over it more (the shard in, the
    /// all-gather, everything back into the parameters), which cost ZeRO-1 more than the half of
    /// the optimizer it saves. Nothing writes the parameters while a peer reads them: the step
    /// comes after the sum of the control values, which every rank enters only once its backward
    /// has finished, and the next forward after the gather.
    ///
    /// Not for ZeRO-3 (its buffers are its own), buckets freed between uses (their gradients'
    /// shard is a private copy), or parameters that are not f32 on the CPU.
    /// `RINGTRAIN_ZERO_SHARED_PARAMS=0` keeps the parameters where they are (every rank must see
    /// the same setting: the allocations are collective).
    fn shared_params(&mut self, comm: &mut dyn Communicator) -> Result<(), DdpError> {
        let off = std::env::var("RINGTRAIN_ZERO_SHARED_PARAMS").is_ok_and(|v| v == "0");
        let cpu_f32 = self.params.iter().all(|(_, p)| p.device() == tch::Device::Cpu && p.kind() == tch::Kind::Float);
        let freed = self.buckets.iter().any(|b| b.grad_shard.is_some());
        if off || !cpu_f32 || freed || self.params_sharded.is_some() || self.buckets.is_empty() {
            return Ok(());
        }
        // The backend answers alike for every bucket and on every rank.
        let common = comm.alloc_node_shared(1, tch::Kind::Float)?.is_some();
        let writes = !common || comm.rank() == 0;
        let _guard = tch::no_grad_guard();
        for b in &mut self.buckets {
            let n = b.flat.numel();
            let flat = match common {
                true => comm.alloc_node_shared(n, tch::Kind::Float)?,
                false => comm.alloc_reduce_buffer(n, tch::Kind::Float)?,
            };
            let Some(flat) = flat else {
                if common {
                    return Err(DdpError::Unsupported("the communicator stopped giving node-shared memory".into()));
                }
                // No shared memory at all: nothing was moved.
                return Ok(());
            };
            // (The optimizer's slices, made after this, are views of the moved parameters.)
            super::params::move_into(&flat, &b.members, &self.params, writes)?;
            b.param_flat = Some(flat);
        }
        self.common = common;
        if common {
            // Nobody reads the parameters before rank 0 has written them.
            comm.barrier()?;
            if comm.rank() == 0 {
                tracing::info!("ZeRO: the parameters are one copy in node-shared memory; each rank steps its shards of it in place");
            }
        }
        Ok(())
    }

    /// This rank's slice of every parameter its shards touch, in parameter order, for
    /// `Optimizer::shard`.
    pub fn slices(&self) -> Result<Vec<ShardSlice>, DdpError> {
        let mut out = Vec::new();
        for b in &self.buckets {
            for &(i, off, n) in &b.members {
                let Some((lo, hi)) = b.owned_part(off, n) else { continue };
                out.push(ShardSlice {
                    index: i,
                    name: self.params[i].0.clone(),
                    lo,
                    len: hi - lo,
                    // Where the buffers are freed between uses, the shards' own copies.
                    param: match &b.param_shard {
                        Some(s) => s.f_narrow(0, off + lo - b.own.0, hi - lo)?,
                        None => flat_view(&self.params[i].1)?.f_narrow(0, lo, hi - lo)?,
                    },
                    grad: match &b.grad_shard {
                        Some(s) => s.f_narrow(0, off + lo - b.own.0, hi - lo)?,
                        None => b.flat.f_narrow(0, off + lo, hi - lo)?,
                    },
                });
            }
        }
        out.sort_by_key(|s| s.index);
        Ok(out)
    }

    /// `opt` (built over the Ddp's parameters, in any order) turned into the optimizer of this
    /// rank's slices. Its parameters must be the Ddp's, by name and shape: a parameter only one
    /// side has would be stepped without averaged gradients, or never.
    pub fn shard_optimizer(&self, opt: Optimizer) -> Result<Optimizer, DdpError> {
        let theirs: Vec<(String, Vec<i64>)> = opt.named_shapes();
        let mine: Vec<(String, Vec<i64>)> = self.params.iter().map(|(n, p)| (n.clone(), p.size())).collect();
        let missing: Vec<&str> = mine.iter().filter(|m| !theirs.contains(m)).map(|(n, _)| n.as_str()).collect();
        let extra: Vec<&str> = theirs.iter().filter(|t| !mine.contains(t)).map(|(n, _)| n.as_str()).collect();
        if !missing.is_empty() || !extra.is_empty() {
            return Err(DdpError::Unsupported(format!(
                "the optimizer's parameters are not the Ddp's (by name and shape): the Ddp's {missing:?} are not in the \
                 optimizer, the optimizer's {extra:?} are not in the Ddp"
            )));
        }
        opt.shard(self.slices()?).map_err(DdpError::Unsupported)
    }

    /// After the optimizer stepped this rank's slices: every rank's updated slices to every
    /// rank, so the replicas are identical again.
    pub fn gather_parameters(&self, comm: &mut dyn Communicator) -> Result<(), DdpError> {
        if let Some(sharded) = &self.params_sharded {
            // ZeRO-3: the shards were stepped in place; units are gathered when they run.
            return sharded.stepped();
        }
        if self.common {
            // Every rank stepped its shard of the node's one copy in place: once all have, the
            // parameters are whole (the bucket's gradients stay as the reduce-scatter left them).
            return Ok(comm.barrier()?);
        }
        let _guard = tch::no_grad_guard();
        for b in &self.buckets {
            if let Some(params) = &b.param_flat {
                // The stepped shard is already in place; the bucket's gradients stay as the
                // reduce-scatter left them (ZeRO-2 released the rest of it then).
                comm.all_gather_shards_tensor(&mut params.shallow_clone())?;
                continue;
            }
            let mut flat = b.flat.shallow_clone();
            // A freed gradient bucket carries the gathered parameters in a fresh allocation,
            // freed again after (its gradients were moved to their shard).
            let borrowed = b.grad_shard.is_some() && !super::storage::is_allocated(&flat);
            if borrowed {
                super::storage::allocate(&flat, flat.numel() * 4)?;
            }
            for &(i, off, n) in &b.members {
                if let Some((lo, hi)) = b.owned_part(off, n) {
                    flat.f_narrow(0, off + lo, hi - lo)?.f_copy_(&flat_view(&self.params[i].1)?.f_narrow(0, lo, hi - lo)?)?;
                }
            }
            comm.all_gather_shards_tensor(&mut flat)?;
            for &(i, off, n) in &b.members {
                flat_view(&self.params[i].1)?.f_copy_(&flat.f_narrow(0, off, n)?)?;
            }
            if b.grad_shard.is_some() {
                // The bucket carried parameters, not gradients: its gradients' views go (the
                // averaged shard lives in its copy) and its storage is freed, whether it was
                // borrowed here or still held a no_sync backward's sums.
                super::storage::free_gradients(&flat, b.members.iter().map(|&(i, _, _)| &self.params[i].1))?;
            } else if self.release {
                // The next backward accumulates into zeros outside the shard; the shard itself is
                // this rank's parameters now and is zeroed by zero_grad before then.
                super::pages::zero_outside(&flat, b.own.0, b.own.1, b.shared)?;
            }
        }
        Ok(())
    }

    /// What the whole optimizer state holds, as an unsharded optimizer's `state()` names it:
    /// `<param>.<kind>` for every parameter and kind of state, shaped as the parameter.
    pub fn state_entries(&self, opt: &Optimizer) -> Vec<crate::checkpoint::Entry> {
        let kinds = opt.state_kinds();
        let mut out = Vec::with_capacity(self.params.len() * kinds.len());
        for (name, p) in &self.params {
            for kind in &kinds {
                out.push(crate::checkpoint::Entry { name: format!("{name}.{kind}"), kind: p.kind(), shape: p.size() });
            }
        }
        out
    }

    /// The whole optimizer state on rank `root`, one bucket's worth at a time (a collective:
    /// every rank calls it): `f(name, tensor)` on `root` for every entry of `state_entries`,
    /// bucket by bucket; no rank holds more of the state than its shards and one bucket.
    /// Checkpoints stay independent of the world size and of sharding.
    pub fn gather_state_each(
        &self,
        comm: &mut dyn Communicator,
        opt: &Optimizer,
        root: usize,
        mut f: impl FnMut(&str, &Tensor) -> Result<(), DdpError>,
    ) -> Result<(), DdpError> {
        let spans = opt.shard_spans().ok_or_else(|| DdpError::Unsupported("gather_state_each needs a sharded optimizer".into()))?;
        let index: HashMap<&str, usize> = self.params.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
        let here = comm.rank() == root;
        for &kind in &opt.state_kinds() {
            for (bi, b) in self.buckets.iter().enumerate() {
                let mut tmp = b.flat.f_zeros_like()?;
                for (e, &(name, lo, len)) in spans.iter().enumerate() {
                    let i = index[name];
                    let (at, off) = self.place[&i];
                    if at != bi {
                        continue;
                    }
                    let state = opt.shard_state(e, kind).ok_or_else(|| {
                        DdpError::Unsupported(format!("optimizer state `{name}.{kind}` is missing on rank {}", comm.rank()))
                    })?;
                    tmp.f_narrow(0, off + lo, len)?.f_copy_(&state)?;
                }
                comm.all_gather_shards_tensor(&mut tmp)?;
                if here {
                    for &(i, off, n) in &b.members {
                        let (name, p) = &self.params[i];
                        f(&format!("{name}.{kind}"), &tmp.f_narrow(0, off, n)?.f_view(p.size().as_slice())?)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The global L2 norm of the averaged gradients (each rank holds only its shards: their
    /// squared norms are summed across ranks); with `max_norm`, scales them as
    /// `clip_grad_norm_` would. Returns the norm before clipping.
    pub fn clip_grad_norm(&self, comm: &mut dyn Communicator, opt: &Optimizer, max_norm: Option<f64>) -> Result<f64, DdpError> {
        let _guard = tch::no_grad_guard();
        let grads = opt.grads();
        let mut local = 0f64;
        for g in &grads {
            let n = g.f_norm()?.f_double_value(&[])?;
            local += n * n;
        }
        let mut sum = [local as f32];
        comm.all_reduce_sum(&mut sum)?;
        let total = (sum[0].max(0.0) as f64).sqrt();
        if let Some(max) = max_norm {
            let coef = (max / (total + 1e-6)).min(1.0);
            for g in &grads {
                let _ = g.shallow_clone().f_mul_scalar_(coef)?;
            }
        }
        Ok(total)
    }
}
