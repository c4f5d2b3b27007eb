//! ringrun's reading of the `PET_*` variables, as torchrun reads them (each of its options
//! defaults to `PET_<OPTION>`): what Kubernetes' training operator sets in every pod
//! (`PET_NNODES`, `PET_NPROC_PER_NODE`, `PET_NODE_RANK`, `PET_MASTER_ADDR`, `PET_MASTER_PORT`), so
//! `ringrun ringtrain --config …` needs no flags there. The v1 PyTorchJob operator sets
//! `MASTER_ADDR`/`MASTER_PORT` instead of the `PET_` pair: where the operator's other `PET_`
//! variables say so, ringrun takes those.

use std::collections::HashMap;

/// `--nproc-per-node`: a count, or `auto` (what the operator sets by default): one worker per
/// visible GPU, else one per node (a CPU worker uses all the node's cores through its threads;
/// torchrun would start one per core).
pub fn parse_nproc_per_node(v: &str) -> Result<usize, String> {
    if v.trim() == "auto" {
        return Ok(visible_gpus().max(1));
    }
    match v.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{v:?} is not a worker count (a number ≥ 1, or auto)")),
    }
}

/// `--nnodes`: a fixed count `N` (or torchrun's `N:N`), or an elastic range `MIN:MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeCount {
    pub min: usize,
    pub max: usize,
}

impl NodeCount {
    pub fn is_elastic(&self) -> bool {
        self.min < self.max
    }
}

impl std::fmt::Display for NodeCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_elastic() {
            write!(f, "{}:{}", self.min, self.max)
        } else {
            write!(f, "{}", self.min)
        }
    }
}

pub fn parse_nnodes(v: &str) -> Result<NodeCount, String> {
    let count = |s: &str| s.trim().parse::<usize>().ok().filter(|&n| n >= 1);
    match v.split_once(':') {
        None => count(v).map(|n| NodeCount { min: n, max: n }).ok_or_else(|| format!("{v:?} is not a node count")),
        Some((lo, hi)) => match (count(lo), count(hi)) {
            (Some(min), Some(max)) if min <= max => Ok(NodeCount { min, max }),
            _ => Err(format!("{v:?} is not a node count or MIN:MAX range (1 ≤ MIN ≤ MAX)")),
        },
    }
}

/// The master address or port when neither the flag nor its `PET_` variable gave one: the v1
/// operator's `MASTER_ADDR`/`MASTER_PORT` (`key`) when the operator's `PET_NNODES` or
/// `PET_NODE_RANK` shows ringrun runs in such a pod; else none (a stray `MASTER_ADDR` in a shell
/// is not taken for a job's).
pub fn operator_fallback(env: &HashMap<String, String>, key: &str) -> Option<String> {
    let in_operator_pod = env.contains_key("PET_NNODES") || env.contains_key("PET_NODE_RANK");
    in_operator_pod.then(|| env.get(key).cloned()).flatten()
}

/// GPUs this process may use: CUDA_VISIBLE_DEVICES's list when set, else the driver's count.
fn visible_gpus() -> usize {
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) => list.split(',').filter(|d| !d.trim().is_empty() && !d.trim().starts_with('-')).count(),
        Err(_) => std::fs::read_dir("/proc/driver/nvidia/gpus").map_or(0, |d| d.count()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_counts_and_ranges() {
        assert_eq!(parse_nnodes("2"), Ok(NodeCount { min: 2, max: 2 }));
        assert_eq!(parse_nnodes("3:3").map(|n| n.is_elastic()), Ok(false));
        assert_eq!(parse_nnodes("1:3"), Ok(NodeCount { min: 1, max: 3 }));
        assert_eq!(parse_nnodes("1:3").unwrap().to_string(), "1:3");
        assert!(parse_nnodes("0").is_err() && parse_nnodes("x").is_err() && parse_nnodes("3:1").is_err());
        assert_eq!(parse_nproc_per_node("4"), Ok(4));
        assert!(parse_nproc_per_node("auto").unwrap() >= 1);
        assert!(parse_nproc_per_node("0").is_err());
    }

    #[test]
    fn the_v1_operators_master_variables_only_in_its_pods() {
        let env = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
        let pod = env(&[("PET_NNODES", "2"), ("MASTER_ADDR", "job-master-0"), ("MASTER_PORT", "23456")]);
        assert_eq!(operator_fallback(&pod, "MASTER_ADDR").as_deref(), Some("job-master-0"));
        assert_eq!(operator_fallback(&pod, "MASTER_PORT").as_deref(), Some("23456"));
        let shell = env(&[("MASTER_ADDR", "10.0.0.9")]);
        assert_eq!(operator_fallback(&shell, "MASTER_ADDR"), None);
    }
}
