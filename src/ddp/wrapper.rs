//! `Ddp`: DistributedDataParallel over a model's named parameters and buffers.
//!
//! ```text
//! Ddp::new        replica check (names, shapes, dtypes on every rank) → broadcast rank 0's
//!                 parameters and buffers → buckets, gradients attached to them; keeps the
//!                 group's communicator handle
//! backward        re-attach replaced gradients → loss.backward() with each bucket all-reduced
//!                 as soon as it is ready → averaged gradients on every rank → rank 0's buffers
//!                 to everyone (broadcast_buffers=True)
//! no_sync         backward accumulates locally, no communication (gradient accumulation)
//! zero_grad       in place; the gradients stay inside the buckets
//! ```
//!
//! DDP broadcasts buffers (BatchNorm's statistics) at the start of each forward that follows a
//! synchronising backward; sending them right after that backward instead gives the next forward
//! the same values, and evaluation and checkpoints between steps see rank 0's buffers on every
//! rank, the ones that get saved.
//!
//! A collective that fails poisons the `Ddp`: peers may have written partial sums into its
//! buckets, so its gradients, parameters and buffers may differ between ranks. Every later call
//! returns the error instead of computing or saving a mixed state.

use super::params::{Release, ShardedParams, Zero3Hooks};
use super::reducer::{AfterReduce, Reducer, ReducerOptions};
use super::{parameter_hash, sync_replicas, DdpError};
use crate::comm::{AsComm, CommHandle, Communicator};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tch::{nn::VarStore, Tensor};

/// How a `Ddp` reduces; the defaults are PyTorch DDP's.
#[derive(Clone, Debug)]
pub struct DdpOptions {
    /// Bucket size cap (PyTorch's `bucket_cap_mb`, 25 MiB).
    pub bucket_cap_bytes: usize,
    /// Cap of the first bucket (the last layers' gradients, ready first), 1 MiB as PyTorch.
    pub first_bucket_cap_bytes: usize,
    /// All-reduce buckets during backward, as soon as their gradients are ready.
    pub overlap: bool,
    /// Gradients travel as bf16 (half the bytes; less precision).
    pub reduce_bf16: bool,
    /// Rank 0's buffers go to every rank after each synchronising backward (DDP's
    /// `broadcast_buffers=True`).
    pub broadcast_buffers: bool,
    /// ZeRO: gradients are reduce-scattered instead of all-reduced, so each rank holds the
    /// average of its shard only; pair with `Zero` (see `ddp::zero`), which steps the shards.
    /// `Grads` (ZeRO-2) also gives the memory of the rest of each bucket back as soon as it
    /// is reduced; `Params` (ZeRO-3) shards the parameters by unit as well.
    pub shard: Shard,
    /// ZeRO-3's units: parameter name prefixes (a GPT block's `transformer.h.3`); every
    /// parameter no unit prefixes is the root unit's (""). The model must run its units through
    /// the hooks `Ddp::unit_hooks` gives (`units::Units`).
    pub units: Vec<String>,
    /// ZeRO-3: gather the next unit's parameters while the current one computes (`Ddp::forward`
    /// in forward, the communication thread in backward).
    pub prefetch: bool,
    /// ZeRO-3: a unit's parameters are released when the next unit runs in forward (true, FSDP's
    /// default), or kept whole until its gradients are reduced in backward (false).
    pub reshard_after_forward: bool,
    /// Issue every collective even at world size 1, where they are no-ops that would otherwise
    /// be skipped, so the code paths that only a multi-rank job reaches (bucket all-reduce,
    /// buffer broadcast, reduce-scatter offsets) run on one device: the GPU check runs NCCL this
    /// way on a single GPU. Default: the `RINGTRAIN_FORCE_COLLECTIVES=1` environment switch.
    pub force_collectives: bool,
    /// ZeRO-2/3 release memory by freeing the buffers' storage (allocated again before the next
    /// use, FSDP's way) instead of handing host pages back. Always so on a device, whose memory
    /// has no pages to hand back; on the host it tests that path (it is slower there: a freed
    /// gradient bucket is allocated whole at the next backward, pages only as they are written).
    /// Default: the `RINGTRAIN_FREE_STORAGE=1` environment switch.
    pub free_storage: bool,
}

/// `RINGTRAIN_FORCE_COLLECTIVES=1`: see `DdpOptions::force_collectives`.
pub fn force_collectives_from_env() -> bool {
    std::env::var("RINGTRAIN_FORCE_COLLECTIVES").is_ok_and(|v| v == "1")
}

impl Default for DdpOptions {
    fn default() -> Self {
        Self {
            bucket_cap_bytes: 25 << 20,
            first_bucket_cap_bytes: 1 << 20,
            overlap: true,
            reduce_bf16: false,
            broadcast_buffers: true,
            shard: Shard::Off,
            units: Vec::new(),
            prefetch: true,
            reshard_after_forward: true,
            force_collectives: force_collectives_from_env(),
            free_storage: std::env::var("RINGTRAIN_FREE_STORAGE").is_ok_and(|v| v == "1"),
        }
    }
}

/// What each rank keeps of the training state, as DeepSpeed's ZeRO stages: everything (DDP), or
/// only its shard of the optimizer state (stage 1), or of the averaged gradients too (stage 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shard {
    #[default]
    #[serde(alias = "none")]
    Off,
    /// ZeRO-1: the optimizer steps this rank's shard; state for it only.
    Optimizer,
    /// ZeRO-2: as `Optimizer`, and of each gradient bucket only this rank's shard stays resident
    /// between backward passes: the rest is handed back to the kernel as soon as the bucket is
    /// reduce-scattered (host buckets; device buckets keep their memory).
    Grads,
    /// ZeRO-3 (FSDP's FULL_SHARD): as `Grads`, and the parameters too: each unit's
    /// (`DdpOptions::units`) are gathered whole only while it runs (`ddp::params`).
    Params,
}

impl Shard {
    pub fn is_on(self) -> bool {
        self != Shard::Off
    }

    /// "ZeRO-1"/"ZeRO-2", for logs.
    pub fn stage(self) -> &'static str {
        match self {
            Shard::Off => "DDP",
            Shard::Optimizer => "ZeRO-1",
            Shard::Grads => "ZeRO-2",
            Shard::Params => "ZeRO-3",
        }
    }
}

/// How `Ddp::unify_buffers` makes buffers equal across ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferSync {
    /// Rank 0's buffers everywhere: what a checkpoint saves.
    Broadcast,
    /// The mean over ranks (floating-point buffers; integer ones from rank 0).
    Average,
}

pub struct Ddp {
    comm: CommHandle,
    /// Why the replicas can no longer be trusted: a collective failed midway.
    poisoned: Option<String>,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
    reducer: Reducer,
    opts: DdpOptions,
    /// False inside `no_sync`: backward accumulates without communicating.
    sync: bool,
    warned_reattach: bool,
    /// A `Zero` was built from this (sharded) Ddp: its optimizer steps the shards.
    pub(super) zero_attached: std::sync::atomic::AtomicBool,
    /// ZeRO-3: the parameters' unit buffers.
    sharded: Option<Arc<ShardedParams>>,
}

/// Buffers grouped by dtype and device, each group in the buffers' order: what one flat
/// broadcast can carry.
fn coalesce_groups(buffers: &[(String, Tensor)]) -> Vec<Vec<&Tensor>> {
    let mut groups: Vec<((tch::Kind, tch::Device), Vec<&Tensor>)> = Vec::new();
    for (_, b) in buffers {
        let key = (b.kind(), b.device());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push(b),
            None => groups.push((key, vec![b])),
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

impl Ddp {
    /// Wraps `params` (trainable, f32) and `buffers` (any dtype, no gradient), in an order that
    /// must be the same on every rank. Checks the replicas agree and broadcasts rank 0's values.
    pub fn new(
        group: &impl AsComm,
        params: Vec<(String, Tensor)>,
        buffers: Vec<(String, Tensor)>,
        opts: DdpOptions,
    ) -> Result<Ddp, DdpError> {
        let handle = group.comm_handle();
        let mut guard = handle.lock();
        let comm: &mut dyn Communicator = &mut *guard;
        let mut seen = std::collections::HashSet::new();
        if let Some((n, _)) = params.iter().chain(&buffers).find(|(n, _)| !seen.insert(n.as_str())) {
            return Err(DdpError::Unsupported(format!("`{n}` is listed twice (a tied weight must appear once)")));
        }
        let all: Vec<(String, Tensor)> = params.iter().chain(&buffers).map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        sync_replicas(comm, &all)?;
        if opts.shard.is_on() && opts.reduce_bf16 {
            return Err(DdpError::Unsupported("sharding reduce-scatters f32 gradients: reduce_bf16 cannot be combined with it".into()));
        }
        let device = params.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
        let zero3 = opts.shard == Shard::Params;
        // Once a unit's gradients are reduced, its parameters are released (set below: the
        // buffers follow the reducer's layout).
        let cell: Arc<OnceLock<Arc<ShardedParams>>> = Arc::default();
        let after_reduce: Option<AfterReduce> = zero3.then(|| {
            let cell = cell.clone();
            Arc::new(move |b: usize| cell.get().map_or(Ok(()), |sp| sp.release_now(b))) as AfterReduce
        });
        let reducer_opts = ReducerOptions {
            first_cap_bytes: opts.first_bucket_cap_bytes,
            cap_bytes: opts.bucket_cap_bytes,
            // Sharded, the optimizer steps slices of the buckets beside the parameters: they
            // share a device (a host backend stages them).
            buffer_device: if comm.device_native() || opts.shard.is_on() { device } else { tch::Device::Cpu },
            reduce_bf16: opts.reduce_bf16,
            overlap: opts.overlap,
            shard_world: opts.shard.is_on().then_some(comm.world_size()),
            release_unowned: opts.shard >= Shard::Grads,
            free_storage: opts.free_storage,
            after_reduce,
            force_collectives: opts.force_collectives,
        };
        let params_only: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
        let reducer = Reducer::new(comm, &params_only, &reducer_opts)?;
        drop(guard);
        let sharded = match zero3 {
            true => {
                let layout = reducer.buckets();
                let sp = Arc::new(ShardedParams::new(
                    handle.clone(),
                    &params,
                    &layout,
                    &opts.units,
                    Release { prefetch: opts.prefetch, after_forward: opts.reshard_after_forward, free_storage: opts.free_storage },
                )?);
                let _ = cell.set(sp.clone());
                Some(sp)
            }
            false => None,
        };
        Ok(Ddp {
            comm: handle,
            poisoned: None,
            params,
            buffers,
            reducer,
            opts,
            sync: true,
            warned_reattach: false,
            zero_attached: false.into(),
            sharded,
        })
    }

    /// Wraps a `tch::nn::VarStore`: trainable variables are parameters, the others buffers
    /// (e.g. BatchNorm's running statistics), each sorted by name — a VarStore keeps them in a
    /// HashMap, whose order differs between processes.
    pub fn from_var_store(group: &impl AsComm, vs: &VarStore, opts: DdpOptions) -> Result<Ddp, DdpError> {
        let (params, buffers) = split_var_store(vs);
        Ddp::new(group, params, buffers, opts)
    }

    /// Backward of `loss`, then (unless inside `no_sync`) gradients averaged across ranks and
    /// rank 0's buffers on every rank.
    pub fn backward(&mut self, loss: &Tensor) -> Result<(), DdpError> {
        self.backward_with(0.0, || loss.f_backward()).map(|_| ())
    }

    /// As `backward`, with the backward pass given as a closure and a control value every rank
    /// contributes; returns the sum of all ranks' values (0 inside `no_sync`). It rides in the
    /// last bucket, so a vote (e.g. "stop after this step") costs no extra collective. The sum
    /// goes through the gradients' pre-division by the world size: read it as a vote (> 0), not
    /// an exact count (and coarsely with bf16 reduction).
    pub fn backward_with(&mut self, control: f32, backward: impl FnOnce() -> Result<(), tch::TchError>) -> Result<f32, DdpError> {
        self.healthy()?;
        self.reducer.restore()?;
        self.reattach()?;
        if !self.sync {
            backward()?;
            return Ok(0.0);
        }
        if self.opts.shard.is_on() && !self.zero_attached.load(std::sync::atomic::Ordering::Relaxed) {
            // Reduce-scattered, the gradients outside this rank's shards are partial sums or this
            // rank's own: an ordinary optimizer would step on them and the replicas would drift apart.
            return Err(DdpError::Unsupported(
                "DdpOptions::shard leaves each rank the average of its own shard of the gradients only: build a \
                 ddp::Zero from this Ddp and step through it (zero.shard_optimizer(opt), then \
                 zero.gather_parameters), or turn shard off"
                    .into(),
            ));
        }
        let handle = self.comm.clone();
        let overlap = self.reducer.can_overlap(&*handle.lock());
        let result = if overlap {
            self.reducer.backward_and_reduce(&mut *handle.lock(), &handle, control, backward)
        } else {
            // The communicator is not borrowed during backward, so a collective inside it
            // (`autograd::all_gather`'s backward) can run.
            match backward() {
                Ok(()) => self.reducer.reduce(&mut *handle.lock(), control),
                Err(e) => Err(e.into()),
            }
        };
        let mut comm = handle.lock();
        let votes = match result {
            Err(DdpError::ReadyTwice(i)) => Err(DdpError::Unsupported(format!(
                "parameter `{}` was marked ready twice: it got a second gradient in one synchronising backward (a second \
                 backward pass through it, or reentrant activation checkpointing), after its bucket may already have been \
                 reduced. Run one backward per synchronising step (accumulate under no_sync); these gradients are not usable",
                self.params[i].0
            ))),
            other => other,
        };
        let votes = self.poison_on_failure(votes)?;
        let synced = self.broadcast_buffers(&mut *comm);
        self.poison_on_failure(synced)?;
        Ok(votes)
    }

    /// The error, unless an earlier collective poisoned this `Ddp`.
    pub fn healthy(&self) -> Result<(), DdpError> {
        match &self.poisoned {
            None => Ok(()),
            Some(why) => Err(DdpError::Poisoned(why.clone())),
        }
    }

    /// A collective's result; its failure (not a libtorch error in the backward closure, which
    /// communicates nothing) poisons this `Ddp`.
    fn poison_on_failure<T>(&mut self, r: Result<T, DdpError>) -> Result<T, DdpError> {
        if let Err(DdpError::Comm(e)) = &r {
            self.poisoned = Some(e.to_string());
        }
        r
    }

    /// The communicator this `Ddp` talks through (the one it was built with).
    pub fn comm(&self) -> &CommHandle {
        &self.comm
    }

    /// Runs `f` with gradient synchronisation off (PyTorch's `no_sync()`): backward passes in it
    /// accumulate gradients locally; the next `backward` outside communicates the sum.
    pub fn no_sync<R>(&mut self, f: impl FnOnce(&mut Ddp) -> R) -> R {
        let before = self.sync;
        self.sync = false;
        let r = f(self);
        self.sync = before;
        r
    }

    /// Turns gradient synchronisation on or off for the following backward passes (what
    /// `no_sync` does around a closure; DDP's `require_backward_grad_sync`).
    pub fn set_sync(&mut self, on: bool) {
        self.sync = on;
    }

    /// Zeroes the gradients in place. Prefer it to an optimizer's `zero_grad`, which in tch sets
    /// them to None (repaired at the next backward, with a warning, where gradients live in the
    /// buckets).
    pub fn zero_grad(&mut self) -> Result<(), DdpError> {
        self.healthy()?;
        self.reattach()?;
        self.reducer.zero_grad()
    }

    /// Broadcasts rank 0's buffers to every rank (when `broadcast_buffers` is on and there are
    /// buffers). `backward` does it; call it after changing buffers outside a training step.
    pub fn sync_buffers(&mut self) -> Result<(), DdpError> {
        self.healthy()?;
        let handle = self.comm.clone();
        let r = self.broadcast_buffers(&mut *handle.lock());
        self.poison_on_failure(r)
    }

    /// Makes every rank's buffers equal before they are evaluated or saved, whatever
    /// `broadcast_buffers` says: rank 0's (`Broadcast`), or the mean over ranks of the
    /// floating-point ones with the integer ones (BatchNorm's `num_batches_tracked`) from rank 0
    /// (`Average`, timm's `distribute_bn` with reduce).
    pub fn unify_buffers(&mut self, how: BufferSync) -> Result<(), DdpError> {
        self.healthy()?;
        let handle = self.comm.clone();
        let r = self.unify(&mut *handle.lock(), how);
        self.poison_on_failure(r)
    }

    fn unify(&self, comm: &mut dyn Communicator, how: BufferSync) -> Result<(), DdpError> {
        let world = comm.world_size();
        if self.buffers.is_empty() || (world == 1 && !self.opts.force_collectives) {
            return Ok(());
        }
        // One flat collective per dtype (and device), as PyTorch's `_broadcast_coalesced`: a
        // ResNet-50 has about 160 buffers, and one collective each cost more than their bytes.
        tch::no_grad(|| -> Result<(), DdpError> {
            for group in coalesce_groups(&self.buffers) {
                let flat: Vec<Tensor> = group.iter().map(|b| b.f_reshape([-1])).collect::<Result<_, _>>()?;
                let mut flat = Tensor::f_cat(&flat, 0)?;
                if how == BufferSync::Average && flat.is_floating_point() {
                    // Summed in fp32 whatever the buffers' dtype, then divided once.
                    let mut sum = flat.f_to_kind(tch::Kind::Float)?.f_contiguous()?;
                    comm.all_reduce_tensor(&mut sum)?;
                    flat = sum.f_div_scalar(world as f64)?.f_to_kind(flat.kind())?;
                } else {
                    comm.broadcast_tensor(&mut flat, 0)?;
                }
                // Copied back on every rank, root too (its values are unchanged by a broadcast),
                // so one code path runs wherever the check runs.
                let mut off = 0;
                for b in group {
                    let n = b.numel() as i64;
                    b.shallow_clone().f_copy_(&flat.f_narrow(0, off, n)?.f_view(b.size().as_slice())?)?;
                    off += n;
                }
            }
            Ok(())
        })
    }

    fn broadcast_buffers(&self, comm: &mut dyn Communicator) -> Result<(), DdpError> {
        match self.opts.broadcast_buffers {
            true => self.unify(comm, BufferSync::Broadcast),
            false => Ok(()),
        }
    }

    fn reattach(&mut self) -> Result<(), DdpError> {
        let repaired = self.reducer.reattach()?;
        if !repaired.is_empty() && !self.warned_reattach {
            self.warned_reattach = true;
            let names: Vec<&str> = repaired.iter().take(3).map(|&i| self.params[i].0.as_str()).collect();
            tracing::warn!(
                "ddp: the gradients of {} parameter(s) ({}{}) were replaced since the last step, e.g. by an optimizer's \
                 zero_grad that sets them to None; re-attached them to the all-reduce buckets (None counts as zero). \
                 Use Ddp::zero_grad to avoid this",
                repaired.len(),
                names.join(", "),
                if repaired.len() > 3 { ", …" } else { "" }
            );
        }
        Ok(())
    }

    /// True when collectives run even at world size 1 (`DdpOptions::force_collectives`).
    pub fn collectives_forced(&self) -> bool {
        self.opts.force_collectives
    }

    /// Gradients found replaced and re-attached so far.
    pub fn reattached_grads(&self) -> u64 {
        self.reducer.reattached()
    }

    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn named_buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }

    /// The parameters (shallow handles), e.g. for a tch optimizer or `clip_grad_norm`.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.shallow_clone()).collect()
    }

    /// Parameters then buffers, the order checkpoints and hashes use; refused once a failed
    /// collective has left them possibly different between ranks, and under ZeRO-3 unless
    /// `full_state` holds the parameters whole.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>, DdpError> {
        self.healthy()?;
        if self.sharded.as_ref().is_some_and(|s| !s.pinned()) {
            return Err(DdpError::Unsupported(
                "under ZeRO-3 each rank holds a shard of the parameters: read them through Ddp::full_state".into(),
            ));
        }
        Ok(self.params.iter().chain(&self.buffers).map(|(n, t)| (n.clone(), t.shallow_clone())).collect())
    }

    /// The parameters (whole: under ZeRO-3 every unit is gathered, a collective every rank
    /// calls, and held until the returned value is dropped) then the buffers.
    pub fn full_state(&self) -> Result<FullState, DdpError> {
        self.healthy()?;
        if let Some(s) = &self.sharded {
            s.pin()?;
        }
        // Made before reading, so a failure below still unpins.
        let mut whole = FullState { pinned: self.sharded.clone(), state: Vec::new() };
        whole.state = self.state()?;
        Ok(whole)
    }

    /// FNV-1a over every parameter's and buffer's bytes: equal on every rank = identical replicas.
    /// Under ZeRO-3 a collective that gathers one bucket at a time.
    pub fn state_hash(&self) -> Result<u64, DdpError> {
        self.healthy()?;
        let Some(s) = &self.sharded else { return Ok(parameter_hash(&self.state()?)?) };
        let mut h = crate::wire::FNV_OFFSET;
        s.walk(&self.param_buckets(), |i| {
            h = super::replica::hash_tensor(h, &self.params[i].0, &self.params[i].1)?;
            Ok(())
        })?;
        for (name, t) in &self.buffers {
            h = super::replica::hash_tensor(h, name, t)?;
        }
        Ok(h)
    }

    /// Calls `f(name, tensor)` on rank `root` for every parameter then buffer, in `state`'s
    /// order (a collective): what rank 0 writes into a checkpoint or `model.safetensors`. Under
    /// ZeRO-3 the parameters are gathered one bucket at a time and `f` sees each while its
    /// bucket is whole, so no rank ever holds the whole model; elsewhere `f` reads them in place.
    pub fn state_each(&self, root: usize, mut f: impl FnMut(&str, &Tensor) -> Result<(), DdpError>) -> Result<(), DdpError> {
        self.healthy()?;
        let here = self.comm.lock().rank() == root;
        match &self.sharded {
            Some(s) => s.walk(&self.param_buckets(), |i| if here { f(&self.params[i].0, &self.params[i].1) } else { Ok(()) })?,
            None if here => {
                for (name, p) in &self.params {
                    f(name, p)?;
                }
            }
            None => {}
        }
        if here {
            for (name, t) in &self.buffers {
                f(name, t)?;
            }
        }
        Ok(())
    }

    /// What `state_each` gives, listed before it runs (names, kinds, shapes): a streamed file's
    /// header.
    pub fn state_entries(&self) -> Vec<crate::checkpoint::Entry> {
        self.params.iter().chain(&self.buffers).map(|(n, t)| crate::checkpoint::Entry::of(n, t)).collect()
    }

    /// The bucket of each parameter.
    fn param_buckets(&self) -> Vec<usize> {
        let mut of = vec![0; self.params.len()];
        for (b, members) in self.reducer.bucket_layout().iter().enumerate() {
            for &i in members {
                of[i] = b;
            }
        }
        of
    }

    /// Runs the model's forward `f`. Under ZeRO-3 with an overlapping backend the communicator
    /// is lent to a thread meanwhile, so that each unit's parameters are gathered while the unit
    /// before it computes (prefetch; inside `f`, reach the communicator through `CommHandle::run`
    /// only). Elsewhere it only calls `f`. Gathers happen without it too, just not ahead.
    pub fn forward<R>(&self, f: impl FnOnce() -> R) -> R {
        let Some(s) = &self.sharded else { return f() };
        if !self.opts.prefetch || !self.reducer.can_overlap(&*self.comm.lock()) {
            return f();
        }
        struct Ended<'a>(&'a ShardedParams);
        impl Drop for Ended<'_> {
            fn drop(&mut self) {
                self.0.end_forward();
            }
        }
        let _scope = self.comm.lend_to_thread();
        s.begin_forward();
        let _ended = Ended(s);
        f()
    }

    /// ZeRO-3: the hooks the model runs its units through (`units::Units::hooks`).
    pub fn unit_hooks(&self) -> Option<Arc<dyn crate::units::UnitHooks>> {
        self.sharded.as_ref().map(|s| Arc::new(Zero3Hooks::new(s.clone())) as Arc<dyn crate::units::UnitHooks>)
    }

    /// ZeRO-3: bytes of the parameters' buffers resident in memory (host buffers).
    pub fn parameter_bytes_resident(&self) -> Option<usize> {
        self.sharded.as_ref()?.resident_bytes()
    }

    /// ZeRO-3: parameter all-gathers done so far (units gathered for forward and backward).
    pub fn parameter_gathers(&self) -> usize {
        self.sharded.as_ref().map_or(0, |s| s.gathers().0)
    }

    /// ZeRO-3: how many of those were prefetches (queued ahead of the unit needing them).
    pub fn parameter_prefetches(&self) -> usize {
        self.sharded.as_ref().map_or(0, |s| s.gathers().1)
    }

    /// ZeRO-3's parameter buffers (`Zero` marks their gathered copies stale after a step).
    pub(crate) fn sharded_params(&self) -> Option<Arc<ShardedParams>> {
        self.sharded.clone()
    }

    /// Start and end of each bucket's all-reduce in the last synchronising backward.
    pub fn last_bucket_times(&self) -> &[(Instant, Instant)] {
        self.reducer.last_bucket_times()
    }

    /// Parameter indices of each bucket, in reduction order.
    /// True when the gradient buckets live in memory the communicator shares between the node's
    /// ranks, so its collectives read them in place.
    pub fn buckets_shared(&self) -> bool {
        self.reducer.buckets_shared()
    }

    pub fn bucket_layout(&self) -> Vec<Vec<usize>> {
        self.reducer.bucket_layout()
    }

    /// ZeRO-2 on host buckets: `Zero` releases a bucket again after gathering parameters
    /// through it.
    pub(crate) fn releases_unowned(&self) -> bool {
        self.reducer.releases()
    }

    /// Bytes of the gradient buckets resident in memory: all of them under DDP and ZeRO-1,
    /// about this rank's shard between steps under ZeRO-2 (host buckets; `None` on a device).
    pub fn gradient_bytes_resident(&self) -> Option<usize> {
        self.reducer.resident_bytes()
    }

    /// Each bucket's flat tensor, its parameters' (index, offset, length) and whether it is
    /// shared memory, for `Zero`.
    pub(crate) fn reducer_buckets(&self) -> Vec<super::reducer::BucketView> {
        self.reducer.buckets()
    }
}

type Named = Vec<(String, Tensor)>;

/// A VarStore's trainable variables (parameters) and the others (buffers), each sorted by name.
pub(super) fn split_var_store(vs: &VarStore) -> (Named, Named) {
    let mut params = Vec::new();
    let mut buffers = Vec::new();
    for (name, t) in vs.variables() {
        if t.requires_grad() {
            params.push((name, t));
        } else {
            buffers.push((name, t));
        }
    }
    params.sort_by(|a, b| a.0.cmp(&b.0));
    buffers.sort_by(|a, b| a.0.cmp(&b.0));
    (params, buffers)
}

/// `Ddp::full_state`'s tensors; under ZeRO-3 the parameters stay whole until this is dropped
/// (every rank's at the same point: releasing is local, but the model's next forward gathers).
pub struct FullState {
    pinned: Option<Arc<ShardedParams>>,
    state: Vec<(String, Tensor)>,
}

impl std::ops::Deref for FullState {
    type Target = [(String, Tensor)];
    fn deref(&self) -> &Self::Target {
        &self.state
    }
}

impl Drop for FullState {
    fn drop(&mut self) {
        if let Some(s) = &self.pinned {
            if let Err(e) = s.unpin() {
                tracing::warn!("releasing the gathered parameters: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{CommError, RingComm, RingOptions};
    use crate::rendezvous::MemoryStore;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tch::Kind;

    /// A ring that counts the tensor broadcasts it is asked for.
    struct Counting {
        inner: RingComm,
        broadcasts: Arc<AtomicUsize>,
        reduces: Arc<AtomicUsize>,
    }

    impl Communicator for Counting {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world_size(&self) -> usize {
            self.inner.world_size()
        }
        fn backend_name(&self) -> &'static str {
            "counting"
        }
        fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
            self.inner.all_reduce_sum(buf)
        }
        fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
            self.inner.broadcast(buf, root)
        }
        fn all_gather(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
            self.inner.all_gather(mine)
        }
        fn barrier(&mut self) -> Result<(), CommError> {
            self.inner.barrier()
        }
        fn timeout(&self) -> Duration {
            self.inner.timeout()
        }
        fn broadcast_tensor(&mut self, t: &mut Tensor, root: usize) -> Result<(), CommError> {
            self.broadcasts.fetch_add(1, Ordering::SeqCst);
            self.inner.broadcast_tensor(t, root)
        }
        fn all_reduce_tensor(&mut self, t: &mut Tensor) -> Result<(), CommError> {
            self.reduces.fetch_add(1, Ordering::SeqCst);
            self.inner.all_reduce_tensor(t)
        }
    }

    fn ring(store: &MemoryStore, rank: usize, world: usize) -> RingComm {
        let opts = RingOptions::new("t", std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), Duration::from_secs(20));
        RingComm::connect(store, rank, world, &opts).unwrap()
    }

    /// Ten f32 buffers and three i64 ones (BatchNorm's statistics and step counters).
    fn buffers(fill: f64) -> Vec<(String, Tensor)> {
        let mut b: Vec<(String, Tensor)> = (0..10)
            .map(|i| (format!("bn{i}.running_mean"), Tensor::full([3 + i], fill + i as f64, (Kind::Float, tch::Device::Cpu))))
            .collect();
        b.extend(
            (0..3).map(|i| (format!("bn{i}.num_batches_tracked"), Tensor::full([1], fill as i64 + i, (Kind::Int64, tch::Device::Cpu)))),
        );
        b
    }

    fn params() -> Vec<(String, Tensor)> {
        vec![("w".into(), Tensor::ones([4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true))]
    }

    /// Defect 8: one broadcast per dtype, not one per buffer; every rank ends with rank 0's values.
    #[test]
    fn buffers_travel_in_one_broadcast_per_dtype() {
        let store = MemoryStore::default();
        let results: Vec<(usize, Vec<(String, Tensor)>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let store = &store;
                    s.spawn(move || {
                        let count = Arc::new(AtomicUsize::new(0));
                        let comm = Counting { inner: ring(store, rank, 2), broadcasts: count.clone(), reduces: Arc::default() };
                        let bufs = buffers(1.0);
                        let mut ddp = Ddp::new(&CommHandle::new(Box::new(comm)), params(), bufs, DdpOptions::default()).unwrap();
                        // Diverge after the replica check: rank 1's statistics drift.
                        if rank == 1 {
                            for (_, b) in &ddp.buffers {
                                let _ = b.shallow_clone().fill_(7);
                            }
                        }
                        count.store(0, Ordering::SeqCst);
                        ddp.sync_buffers().unwrap();
                        let after: Vec<(String, Tensor)> = ddp.buffers.iter().map(|(n, b)| (n.clone(), b.copy())).collect();
                        (count.load(Ordering::SeqCst), after)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let expected = buffers(1.0);
        for (rank, (count, after)) in results.iter().enumerate() {
            assert_eq!(*count, 2, "rank {rank}: one broadcast per dtype (f32, i64)");
            for ((name, got), (_, want)) in after.iter().zip(&expected) {
                assert!(got.equal(want), "rank {rank}: {name} is not rank 0's");
            }
        }
    }

    /// The check's switch: at world size 1 the buffer broadcast and the bucket all-reduce are
    /// skipped unless collectives are forced; forced, the gradient is still the (world-1) average.
    #[test]
    fn forced_collectives_run_at_world_size_one() {
        for (force, want) in [(false, 0), (true, 2)] {
            let store = MemoryStore::default();
            let (count, reduces) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let comm = Counting { inner: ring(&store, 0, 1), broadcasts: count.clone(), reduces: reduces.clone() };
            let opts = DdpOptions { force_collectives: force, ..DdpOptions::default() };
            let mut ddp = Ddp::new(&CommHandle::new(Box::new(comm)), params(), buffers(1.0), opts).unwrap();
            count.store(0, Ordering::SeqCst);
            ddp.sync_buffers().unwrap();
            assert_eq!(count.load(Ordering::SeqCst), want, "force_collectives {force}");
            let w = ddp.named_parameters()[0].1.shallow_clone();
            let loss = (&w * &w).sum(Kind::Float);
            ddp.backward(&loss).unwrap();
            // The synchronising backward broadcast the buffers too (forced: one per dtype again).
            assert_eq!(count.load(Ordering::SeqCst), 2 * want, "buffers after backward, force_collectives {force}");
            assert_eq!(reduces.load(Ordering::SeqCst) > 0, force, "bucket all-reduce with force_collectives {force}");
            assert!(w.grad().equal(&(&w * 2.0)), "force_collectives {force}: gradient {:?}", w.grad());
        }
    }
}
