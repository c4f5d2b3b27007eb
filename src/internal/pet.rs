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

/// `--rdzv-backend`: how nodes meet. `static` (torchrun's default): every node has a fixed
/// `--node-rank`; `c10d`: the store on the rendezvous host numbers nodes as they arrive (with
/// `--nnodes MIN:MAX` ringrun does so whatever the backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RdzvBackend {
    Static,
    C10d,
}

pub fn parse_rdzv_backend(v: &str) -> Result<RdzvBackend, String> {
    match v.trim() {
        "static" => Ok(RdzvBackend::Static),
        "c10d" => Ok(RdzvBackend::C10d),
        other => Err(format!(
            "{other:?}: ringrun's nodes meet through the store its node 0 serves (torchrun's static or c10d backends); \
             etcd is not supported"
        )),
    }
}

/// `--rdzv-endpoint HOST[:PORT]` (PET_RDZV_ENDPOINT, what the operator sets for an elastic policy):
/// the store's address; torchrun's default port 29400 when none is given.
pub fn parse_endpoint(v: &str) -> Result<(String, u16), String> {
    let v = v.trim();
    let (host, port) = match v.rsplit_once(':') {
        // A bare IPv6 address has colons but no port.
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => (h, Some(p)),
        _ => (v, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{v:?} is not a HOST[:PORT] endpoint"));
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("{v:?}: {p:?} is not a port number"))?,
        None => 29400,
    };
    Ok((host.to_string(), port))
}

/// `--rdzv-conf key=value,…` (PET_RDZV_CONF): torchrun's rendezvous settings ringrun has a use for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RdzvConf {
    /// Seconds to wait for the nodes (`--join-timeout-secs`).
    pub join_timeout: Option<u64>,
    /// Seconds more nodes may join after the minimum (`--rdzv-settle-secs`).
    pub last_call_timeout: Option<u64>,
    /// Whether this node serves the store (else: the node whose address the endpoint is).
    pub is_host: Option<bool>,
    /// Keys ringrun does not use (said once at start).
    pub ignored: Vec<String>,
}

pub fn parse_rdzv_conf(v: &str) -> Result<RdzvConf, String> {
    let mut c = RdzvConf::default();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, val) = part.split_once('=').ok_or_else(|| format!("--rdzv-conf {part:?}: expected key=value"))?;
        let secs =
            || val.trim().parse::<f64>().map(|s| s.ceil() as u64).map_err(|_| format!("--rdzv-conf {k}={val:?}: not a number of seconds"));
        match k.trim() {
            "join_timeout" => c.join_timeout = Some(secs()?),
            "last_call_timeout" => c.last_call_timeout = Some(secs()?),
            "is_host" => {
                c.is_host = Some(match val.trim().to_ascii_lowercase().as_str() {
                    "1" | "true" | "yes" | "y" => true,
                    "0" | "false" | "no" | "n" => false,
                    _ => return Err(format!("--rdzv-conf is_host={val:?}: expected true or false")),
                })
            }
            other => c.ignored.push(other.to_string()),
        }
    }
    Ok(c)
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
    fn rendezvous_endpoints_backends_and_settings_as_torchrun_reads_them() {
        assert_eq!(parse_endpoint("job-worker-0:23456"), Ok(("job-worker-0".into(), 23456)));
        assert_eq!(parse_endpoint("10.0.0.1"), Ok(("10.0.0.1".into(), 29400)));
        assert_eq!(parse_endpoint("[fd00::1]:29500"), Ok(("fd00::1".into(), 29500)));
        assert!(parse_endpoint("host:port").unwrap_err().contains("not a port number"));
        assert_eq!(parse_rdzv_backend("c10d"), Ok(RdzvBackend::C10d));
        assert!(parse_rdzv_backend("etcd").unwrap_err().contains("etcd is not supported"));
        let c = parse_rdzv_conf("join_timeout=600,last_call_timeout=2.5,is_host=false,read_timeout=60").unwrap();
        assert_eq!((c.join_timeout, c.last_call_timeout, c.is_host), (Some(600), Some(3), Some(false)));
        assert_eq!(c.ignored, vec!["read_timeout".to_string()]);
        assert!(parse_rdzv_conf("is_host=maybe").is_err() && parse_rdzv_conf("join_timeout").is_err());
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
