//! `Fsdp`: fully sharded data parallel (ZeRO-3, PyTorch FSDP's FULL_SHARD) for a program's own
//! tch model — a `Ddp` with `Shard::Params`, its `Zero`, and the `Units` its forward runs
//! through, held together so the calls come in the right order.
//!
//! ```no_run
//! # use ringtrain::ddp::{Fsdp, DdpOptions};
//! # use ringtrain::optim::{Optimizer, OptimizerConfig, OptimizerName};
//! # use tch::{nn, Tensor};
//! # fn run(pg: &ringtrain::process_group::ProcessGroup, x: Tensor) -> Result<(), Box<dyn std::error::Error>> {
//! let vs = nn::VarStore::new(tch::Device::Cpu);
//! let (l1, l2) = (nn::linear(vs.root() / "l1", 512, 512, Default::default()), nn::linear(vs.root() / "l2", 512, 10, Default::default()));
//! // Units by parameter-name prefix; what no unit names (here nothing) is the root's.
//! let mut fsdp = Fsdp::from_var_store(pg, &vs, &["l1", "l2"], false, DdpOptions::default())?;
//! let mut opt = fsdp.shard_optimizer(Optimizer::new(&OptimizerConfig::new(OptimizerName::Adamw, 1e-3), fsdp.named_parameters()))?;
//! let units = fsdp.units();
//! // Each unit's forward is a `Send` closure holding its layer's tensors.
//! let (w1, b1, w2, b2) = (l1.ws.shallow_clone(), l1.bs.as_ref().map(|b| b.shallow_clone()), l2.ws.shallow_clone(), l2.bs.as_ref().map(|b| b.shallow_clone()));
//! let y = fsdp.forward(|| -> Result<Tensor, tch::TchError> {
//!     let h = units.run("l1", &x, Box::new(move |x: &Tensor| x.f_linear(&w1, b1.as_ref())?.f_relu()))?;
//!     units.run("l2", &h, Box::new(move |x: &Tensor| x.f_linear(&w2, b2.as_ref())))
//! })?;
//! fsdp.zero_grad()?;
//! fsdp.backward(&y.square().mean(tch::Kind::Float))?;
//! fsdp.step(&mut opt)?;
//! # Ok(()) }
//! ```
//!
//! Parameters are whole only inside their unit (and inside `full_state` / `state_each`):
//! reading one elsewhere reads its shard and zeros.

use super::wrapper::{Ddp, DdpOptions, Shard};
use super::{DdpError, Zero};
use crate::comm::AsComm;
use crate::optim::Optimizer;
use crate::units::Units;
use tch::nn::VarStore;
use tch::Tensor;

pub struct Fsdp {
    ddp: Ddp,
    zero: Zero,
    units: Units,
}

impl Fsdp {
    /// Shards `params` over the group's ranks by the units `units` names (parameter-name
    /// prefixes: `encoder.layers.3` holds `encoder.layers.3.attn.weight`; the rest is the root
    /// unit, "", which the model runs as one or more segments of its own). `checkpoint`:
    /// recompute each unit's activations in backward. `opts.shard` and `opts.units` are set here.
    pub fn new(
        group: &impl AsComm,
        params: Vec<(String, Tensor)>,
        buffers: Vec<(String, Tensor)>,
        units: &[&str],
        checkpoint: bool,
        opts: DdpOptions,
    ) -> Result<Fsdp, DdpError> {
        if units.is_empty() {
            return Err(DdpError::Unsupported("Fsdp needs at least one unit: it gathers the parameters unit by unit".into()));
        }
        let opts = DdpOptions { shard: Shard::Params, units: units.iter().map(|u| u.to_string()).collect(), ..opts };
        let ddp = Ddp::new(group, params, buffers, opts)?;
        let zero = Zero::new(&ddp, &mut *group.comm_handle().lock())?;
        let units = Units { checkpoint, hooks: ddp.unit_hooks() };
        Ok(Fsdp { ddp, zero, units })
    }

    /// As `new`, over a `VarStore`'s variables (see `Ddp::from_var_store`).
    pub fn from_var_store(
        group: &impl AsComm,
        vs: &VarStore,
        units: &[&str],
        checkpoint: bool,
        opts: DdpOptions,
    ) -> Result<Fsdp, DdpError> {
        let (params, buffers) = super::wrapper::split_var_store(vs);
        Fsdp::new(group, params, buffers, units, checkpoint, opts)
    }

    /// What the model's forward runs each unit through (`Units::run`): the gathers, the
    /// releases and (with `checkpoint`) the recomputation.
    pub fn units(&self) -> Units {
        self.units.clone()
    }

    /// The optimizer of this rank's shards, from one built over `named_parameters`.
    pub fn shard_optimizer(&self, opt: Optimizer) -> Result<Optimizer, DdpError> {
        self.zero.shard_optimizer(opt)
    }

    /// Steps the shards, then marks every gathered copy stale (gathered afresh when next used).
    pub fn step(&mut self, opt: &mut Optimizer) -> Result<(), DdpError> {
        opt.step()?;
        self.zero.gather_parameters(&mut *self.ddp.comm().lock())
    }

    /// The `Zero` stepping the shards (its optimizer-state gather writes checkpoints).
    pub fn zero(&self) -> &Zero {
        &self.zero
    }
}

/// Everything else is the `Ddp`'s: `forward`, `backward`, `zero_grad`, `full_state`,
/// `state_each`, `state_hash`, `parameter_bytes_resident`, …
impl std::ops::Deref for Fsdp {
    type Target = Ddp;
    fn deref(&self) -> &Ddp {
        &self.ddp
    }
}

impl std::ops::DerefMut for Fsdp {
    fn deref_mut(&mut self) -> &mut Ddp {
        &mut self.ddp
    }
}
