//! A model's units — a GPT block, a ResNet stage — and what runs around each: activation
//! checkpointing, and ZeRO-3's gathers of the unit's parameters. Each parameter belongs to the
//! unit whose name prefixes its own (`transformer.h.3.` holds `transformer.h.3.attn.c_attn.weight`);
//! the rest (embeddings, stems, heads) is the root unit, named "", which the model runs as one or
//! more segments (GPT: the embeddings, then `ln_f` and the tied `lm_head`).

use crate::autograd::checkpoint::{checkpoint, UnitForward};
use std::sync::Arc;
use tch::{TchError, Tensor};

/// Called around every unit's forward (ZeRO-3's parameter gathers).
pub trait UnitHooks: Send + Sync {
    /// Before unit `name` runs (its parameters must be whole by then).
    fn before(&self, name: &str) -> Result<(), TchError>;
    /// After it ran, with its output; returns the output the model goes on with (one whose
    /// backward first makes the parameters whole again).
    fn after(&self, name: &str, output: Tensor) -> Result<Tensor, TchError>;
}

/// How a model runs its units; plainly by default.
#[derive(Clone, Default)]
pub struct Units {
    /// Recompute each (non-root) unit's activations in backward.
    pub checkpoint: bool,
    pub hooks: Option<Arc<dyn UnitHooks>>,
}

impl Units {
    /// `forward(x)` as unit `name` ("" for a segment of the root unit, which is never
    /// checkpointed).
    pub fn run(&self, name: &str, x: &Tensor, forward: UnitForward) -> Result<Tensor, TchError> {
        if let Some(h) = &self.hooks {
            h.before(name)?;
        }
        let y = match self.checkpoint && !name.is_empty() {
            true => checkpoint(name, x, forward)?,
            false => forward(x)?,
        };
        match &self.hooks {
            Some(h) => h.after(name, y),
            None => Ok(y),
        }
    }
}

impl Units {
    /// Back in the root unit after a unit that the root's own code called (a compiled forward
    /// that reads root parameters after it): the root's parameters whole again.
    pub fn enter_root(&self) -> Result<(), TchError> {
        match &self.hooks {
            Some(h) => h.before(""),
            None => Ok(()),
        }
    }
}

/// The unit a parameter belongs to: the longest unit name that prefixes it (followed by a dot),
/// else the root (None).
pub fn unit_of<'a>(param: &str, units: &'a [String]) -> Option<&'a str> {
    units
        .iter()
        .filter(|u| param.len() > u.len() && param.starts_with(u.as_str()) && param.as_bytes()[u.len()] == b'.')
        .max_by_key(|u| u.len())
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_belong_to_the_longest_unit_prefixing_them() {
        let units: Vec<String> = ["transformer.h.1", "transformer.h.10", "layer1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(unit_of("transformer.h.1.ln_1.weight", &units), Some("transformer.h.1"));
        assert_eq!(unit_of("transformer.h.10.ln_1.weight", &units), Some("transformer.h.10"));
        assert_eq!(unit_of("transformer.wte.weight", &units), None);
        assert_eq!(unit_of("layer1", &units), None);
        assert_eq!(unit_of("layer10.conv.weight", &units), None);
    }
}
