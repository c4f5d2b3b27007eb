//! ZeRO stage 1 on the optimizer's side: an optimizer over this rank's slices of the parameters.
//! Each slice is a flat view into its parameter, stepped with an explicit gradient (the same
//! slice of the reduce-scattered bucket), so the update rules run unchanged on 1/N of the
//! elements and only that much state exists. Which slices a rank owns, and gathering parameters
//! and state back, belong to the reducer's side (`ddp::zero`).

use super::Optimizer;
use tch::Tensor;

/// One parameter's slice owned by this rank.
pub struct ShardSlice {
    /// Index of the parameter in the `Ddp` (the order slices come in).
    pub index: usize,
    /// The parameter's name: the optimizer's parameter of that name is the one sliced, whatever
    /// order the optimizer was built in.
    pub name: String,
    /// Where the slice starts in the flattened parameter, and its length.
    pub lo: i64,
    pub len: i64,
    /// The parameter's elements [lo, lo + len), flattened: a view sharing its storage.
    pub param: Tensor,
    /// The reduced gradient of those elements: a view into the bucket.
    pub grad: Tensor,
}

pub(super) struct Sharding {
    pub grads: Vec<Tensor>,
    /// (lo, len) of each entry in its flattened parameter.
    pub spans: Vec<(i64, i64)>,
    /// Every parameter's name and full shape, owned here or not (to check loaded state).
    pub full: Vec<(String, Vec<i64>)>,
}

impl Optimizer {
    /// The optimizer of this rank's slices, carrying over the configuration, step count, each
    /// parameter's weight decay (its group's, decided on the full shape) and the matching slices
    /// of any state already loaded (a resumed checkpoint's).
    pub fn shard(self, slices: Vec<ShardSlice>) -> Result<Optimizer, String> {
        let full: Vec<(String, Vec<i64>)> = self.names.iter().cloned().zip(self.params.iter().map(|p| p.size())).collect();
        let take = |t: &Option<Tensor>, s: &ShardSlice, i: usize| -> Result<Option<Tensor>, String> {
            t.as_ref()
                .map(|t| {
                    t.f_reshape([-1])
                        .and_then(|f| f.f_narrow(0, s.lo, s.len))
                        .and_then(|f| f.f_contiguous())
                        .and_then(|f| f.f_detach_copy())
                })
                .transpose()
                .map_err(|e| format!("slicing optimizer state of `{}`: {e}", full[i].0))
        };
        // Each slice's parameter in this optimizer, by name: weight-decay groups and state are
        // the optimizer's, and its order need not be the Ddp's.
        let mut at = Vec::with_capacity(slices.len());
        for s in &slices {
            let i = self.names.iter().position(|n| *n == s.name).ok_or_else(|| {
                format!("the optimizer has no parameter `{}` (it must be built over the same parameters as the Ddp)", s.name)
            })?;
            let numel: i64 = full[i].1.iter().product();
            if s.lo + s.len > numel {
                return Err(format!("parameter `{}` has {numel} elements in the optimizer, fewer than its shard needs", s.name));
            }
            at.push(i);
        }
        let mut state_a = Vec::with_capacity(slices.len());
        let mut state_b = Vec::with_capacity(slices.len());
        for (s, &i) in slices.iter().zip(&at) {
            state_a.push(take(&self.state_a[i], s, i)?);
            state_b.push(take(&self.state_b[i], s, i)?);
        }
        Ok(Optimizer {
            cfg: self.cfg,
            names: at.iter().map(|&i| self.names[i].clone()).collect(),
            weight_decay: at.iter().map(|&i| self.weight_decay[i]).collect(),
            lr: self.lr,
            state_a,
            state_b,
            scratch: slices.iter().map(|_| None).collect(),
            step: self.step,
            shard: Some(Sharding {
                grads: slices.iter().map(|s| s.grad.shallow_clone()).collect(),
                spans: slices.iter().map(|s| (s.lo, s.len)).collect(),
                full,
            }),
            params: slices.into_iter().map(|s| s.param).collect(),
        })
    }

    /// Sharded: where each of this rank's entries lies in its parameter, by parameter name.
    pub fn shard_spans(&self) -> Option<Vec<(&str, i64, i64)>> {
        let sh = self.shard.as_ref()?;
        Some(self.names.iter().zip(&sh.spans).map(|(n, &(lo, len))| (n.as_str(), lo, len)).collect())
    }

    /// This rank's gradient slices (sharded) or the parameters' gradients.
    pub fn grads(&self) -> Vec<Tensor> {
        match &self.shard {
            Some(sh) => sh.grads.iter().map(|g| g.shallow_clone()).collect(),
            None => self.params.iter().map(|p| p.grad()).collect(),
        }
    }

    /// Whether state of kind a (momentum buffer / exp_avg) and b (exp_avg_sq) exists: after a
    /// step, for every parameter with a gradient (under DDP all of them), so every rank agrees.
    pub fn state_kinds(&self) -> Vec<&'static str> {
        let (a, b) = self.suffixes();
        let stateful_a = match self.cfg.name {
            super::OptimizerName::Sgd => self.cfg.momentum != 0.0,
            _ => true,
        };
        let mut kinds = Vec::new();
        if self.step > 0 && stateful_a {
            kinds.push(a);
        }
        if self.step > 0 && !b.is_empty() {
            kinds.push(b);
        }
        kinds
    }

    /// This rank's slice of state `kind` for entry `i` (None before it exists).
    pub fn shard_state(&self, i: usize, kind: &str) -> Option<Tensor> {
        let (a, _) = self.suffixes();
        let t = if kind == a { &self.state_a[i] } else { &self.state_b[i] };
        t.as_ref().map(|t| t.shallow_clone())
    }

    /// Loads whole (unsharded) state, as a checkpoint holds it, keeping this rank's slices.
    pub(super) fn load_sharded_state(&mut self, state: &[(String, Tensor)], steps: u64) -> Result<(), String> {
        let (a, b) = self.suffixes();
        let sh = self.shard.as_ref().expect("sharded");
        for (key, t) in state {
            let (param, suffix) = key.rsplit_once('.').ok_or_else(|| format!("optimizer state `{key}` has no state suffix"))?;
            let (_, shape) =
                sh.full.iter().find(|(n, _)| n == param).ok_or_else(|| format!("optimizer state `{key}` names no parameter"))?;
            if &t.size() != shape {
                return Err(format!("optimizer state `{key}` has shape {:?}, parameter {shape:?}", t.size()));
            }
            if suffix != a && (suffix != b || b.is_empty()) {
                return Err(format!("optimizer state `{key}`: `{suffix}` is not {} state", self.name()));
            }
            // Not owned here: another rank keeps it.
            let Some(i) = self.names.iter().position(|n| n == param) else { continue };
            let (lo, len) = sh.spans[i];
            let p = &self.params[i];
            let copy = t
                .f_reshape([-1])
                .and_then(|f| f.f_narrow(0, lo, len))
                .and_then(|f| f.f_to_kind(p.kind()))
                .and_then(|f| f.f_to_device(p.device()))
                .and_then(|f| f.f_contiguous())
                .and_then(|f| f.f_detach_copy())
                .map_err(|e| format!("optimizer state `{key}`: {e}"))?;
            if suffix == a {
                self.state_a[i] = Some(copy);
            } else {
                self.state_b[i] = Some(copy);
            }
        }
        self.step = steps;
        Ok(())
    }
}
