//! Joining the group: which backend, and how the ranks find each other.
//!
//! | started by | backend | rendezvous |
//! |---|---|---|
//! | ringrun / torchrun-style env | ring | TCP store on MASTER_ADDR:MASTER_PORT |
//! | mpirun (Open MPI) / PMI | mpi | MPI itself |
//! | mpirun | ring | rank 0 starts the store on a free port and MPI_Bcasts its address and a job token |
//! | srun (no MPI) | ring | MASTER_ADDR = first host of SLURM_JOB_NODELIST, MASTER_PORT = 20000 + SLURM_JOB_ID mod 20000 (either may be set explicitly) |
//!
//! `comm.backend: auto` picks mpi when the launcher is an MPI launcher and MPI is built in.

use crate::comm::mpi::{self, MpiComm, MpiRuntime};
use crate::comm::nccl::NcclComm;
use crate::comm::{Communicator, HierComm, RingComm, RingOptions};
use crate::launch::{LaunchInfo, LaunchSource};
use crate::rendezvous::{MemoryStore, PrefixStore, Store, TcpStore, TcpStoreServer};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

/// The communicator (`comm.backend` in the config).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// MPI when started by mpirun (and built with MPI), else the ring.
    Auto,
    /// Built-in TCP ring.
    Ring,
    /// MPI collectives (needs an MPI launcher and the `mpi` feature).
    Mpi,
    /// NCCL on CUDA devices (`auto` picks it when the device is cuda).
    Nccl,
}

/// How the group communicates (the config's `comm:` section); `InitOptions` carries the same.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommConfig {
    #[serde(default = "default_backend")]
    pub backend: Backend,
    /// Bound on every store wait and collective; a rank that does not answer within it is named
    /// in the error.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Ring links between ranks on the same node: `shm`, `unix` sockets, or `tcp` like links
    /// between nodes.
    #[serde(default = "default_local_transport")]
    pub local_transport: LocalTransport,
    /// Ring backend across nodes: all-reduce within each node, then across nodes (one ring per
    /// local index), then within the node again. Used when every node has the same number (> 1)
    /// of ranks; else the flat ring.
    #[serde(default)]
    pub hierarchical: bool,
}

/// How ring links between ranks on one node are made (`comm.local_transport`).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LocalTransport {
    /// Shared-memory rings (set up over Unix sockets).
    Shm,
    Unix,
    Tcp,
}

fn default_local_transport() -> LocalTransport {
    LocalTransport::Shm
}

impl Default for CommConfig {
    fn default() -> Self {
        Self {
            backend: default_backend(),
            timeout_secs: default_timeout(),
            local_transport: default_local_transport(),
            hierarchical: false,
        }
    }
}

fn default_backend() -> Backend {
    Backend::Auto
}
fn default_timeout() -> u64 {
    300
}

/// The backend `auto` resolves to: NCCL on CUDA devices, MPI under an MPI launcher (when built
/// in), else the ring.
pub fn resolve_backend(wanted: Backend, source: LaunchSource, cuda: bool, under_srun: bool) -> Backend {
    match wanted {
        Backend::Auto if cuda => Backend::Nccl,
        // srun's pmi2 plugin sets PMI_RANK too, but Debian's Open MPI cannot start under it: there
        // the ring (found through Slurm's variables) is the safe choice; ask for mpi explicitly
        // with `srun --mpi=pmix`.
        Backend::Auto if mpi::BUILT && source == LaunchSource::Pmi && under_srun => Backend::Ring,
        Backend::Auto if mpi::BUILT && matches!(source, LaunchSource::OpenMpi | LaunchSource::Pmi) => Backend::Mpi,
        Backend::Auto => Backend::Ring,
        b => b,
    }
}

/// A joined group: the communicator, and MPI when it carried the ring's rendezvous.
pub struct Group {
    pub comm: Box<dyn Communicator>,
    pub runtime: Runtime,
}

/// What must outlive the communicator: MPI, when it carried the ring's rendezvous.
pub struct Runtime {
    mpi: Option<MpiRuntime>,
}

impl Runtime {
    /// Leaves cleanly after success (MPI_Finalize when MPI was used); the communicator is gone.
    pub fn finish(self) {
        drop(self.mpi);
    }

    /// Leaves after a failure without MPI_Finalize, which would wait for ranks that may be gone;
    /// the non-zero exit makes mpirun end the job.
    pub fn abandon(self) {
        std::mem::forget(self);
    }
}

pub fn join(cfg: &CommConfig, launch: &mut LaunchInfo, env: &HashMap<String, String>, device: tch::Device) -> Result<Group> {
    let timeout = Duration::from_secs(cfg.timeout_secs);
    let backend = resolve_backend(cfg.backend, launch.source, device.is_cuda(), launch.under_srun);
    if backend == Backend::Nccl && !device.is_cuda() {
        bail!("comm.backend nccl needs a CUDA device (device: cuda), this rank computes on {device:?}");
    }
    if cfg.hierarchical && backend != Backend::Ring && launch.rank == 0 {
        tracing::warn!("comm.hierarchical applies to the ring backend; {backend:?} arranges its own collectives");
    }
    let under_mpi = matches!(launch.source, LaunchSource::OpenMpi | LaunchSource::Pmi);
    // MPI is initialised when it is the backend, or when it carries the ring's rendezvous (not
    // under srun, whose variables find rank 0 without it).
    let runtime = if backend == Backend::Mpi || (under_mpi && !launch.under_srun && launch.master_addr.is_none() && launch.world_size > 1) {
        let rt = MpiRuntime::init()?;
        if rt.size() != launch.world_size || rt.rank() != launch.rank {
            bail!(
                "MPI reports rank {} of {} but the launcher's environment ({}) says rank {} of {}: this binary's MPI library \
                 (Open MPI) does not match the launcher that started it (e.g. MPICH's mpiexec); use Open MPI's mpirun",
                rt.rank(),
                rt.size(),
                launch.source.describe(),
                launch.rank,
                launch.world_size
            );
        }
        Some(rt)
    } else {
        None
    };
    match backend {
        Backend::Mpi => {
            let rt = runtime.expect("initialised above");
            Ok(Group { comm: Box::new(MpiComm::new(rt, timeout)?), runtime: Runtime { mpi: None } })
        }
        Backend::Ring | Backend::Nccl => {
            if let Some(rt) = &runtime {
                share_store_address_over_mpi(rt, launch)?;
            } else if launch.source == LaunchSource::Slurm || launch.under_srun {
                derive_from_slurm(launch, env)?;
            }
            let joined = if backend == Backend::Nccl { nccl(launch, timeout, device) } else { ring(launch, timeout, cfg, env) };
            match joined {
                Ok(comm) => Ok(Group { comm: strict_if_asked(comm, env, device), runtime: Runtime { mpi: runtime } }),
                Err(e) => {
                    std::mem::forget(runtime);
                    Err(e)
                }
            }
        }
        Backend::Auto => unreachable!("resolved above"),
    }
}

/// RINGTRAIN_STRICT_DEVICE=1 (tests and the GPU check): the communicator holds every tensor to
/// NCCL's device contract (`comm::strict`), so a caller that would hand NCCL a tensor on the
/// wrong device fails under the ring too.
fn strict_if_asked(comm: Box<dyn Communicator>, env: &HashMap<String, String>, device: tch::Device) -> Box<dyn Communicator> {
    if env.get("RINGTRAIN_STRICT_DEVICE").is_some_and(|v| v == "1") && !comm.device_native() {
        tracing::info!("strict device check: every tensor handed to the {} backend must be on {device:?}", comm.backend_name());
        return Box::new(crate::comm::StrictDevice::new(comm, device));
    }
    comm
}

/// Under mpirun without MASTER_ADDR: rank 0 serves the store on a free port and tells the others
/// where, with a fresh job token, through MPI_Bcast.
fn share_store_address_over_mpi(rt: &MpiRuntime, launch: &mut LaunchInfo) -> Result<()> {
    let mut msg = [0u8; 256];
    if launch.rank == 0 {
        launch.job_token = crate::auth::new_job_token()?;
        let ip = reachable_ip(launch);
        // Served on the address the others are told, not on every interface.
        let server = TcpStoreServer::start(&std::net::SocketAddr::new(ip, 0).to_string(), &launch.job_token)?;
        let text = format!("{ip}\n{}\n{}", server.local_addr().port(), launch.job_token);
        msg[..text.len()].copy_from_slice(text.as_bytes());
        std::mem::forget(server); // serves for the life of the process
    }
    rt.broadcast_bytes(&mut msg, 0)?;
    let text = String::from_utf8_lossy(&msg).trim_end_matches('\0').to_string();
    let mut parts = text.split('\n');
    let (Some(ip), Some(port), Some(token)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("malformed store address from rank 0 over MPI: {text:?}");
    };
    launch.master_addr = Some(ip.to_string());
    launch.master_port = Some(port.parse().context("store port from rank 0")?);
    launch.job_token = token.to_string();
    launch.store_served = launch.rank == 0;
    tracing::info!("store address {ip}:{port} shared over MPI");
    Ok(())
}

/// Under srun without MASTER_ADDR/MASTER_PORT: derive both from Slurm's variables.
fn derive_from_slurm(launch: &mut LaunchInfo, env: &HashMap<String, String>) -> Result<()> {
    let job = env.get("SLURM_JOB_ID").or_else(|| env.get("SLURM_JOBID"));
    if launch.master_addr.is_none() {
        let list = env
            .get("SLURM_JOB_NODELIST")
            .or_else(|| env.get("SLURM_NODELIST"))
            .context("under srun the ring backend needs MASTER_ADDR or SLURM_JOB_NODELIST to find rank 0's host")?;
        launch.master_addr = Some(first_host(list).with_context(|| format!("SLURM_JOB_NODELIST={list:?}"))?);
    }
    // Two job steps of one allocation run side by side: both the port and the token come from
    // the job *and* the step, so neither collides with nor joins the other.
    let step = env.get("SLURM_STEP_ID").or_else(|| env.get("SLURM_STEPID")).map(String::as_str).unwrap_or("0");
    if launch.master_port.is_none() {
        let id: u64 = job.context("under srun the ring backend needs MASTER_PORT or SLURM_JOB_ID")?.parse().context("SLURM_JOB_ID")?;
        let step: u64 = step.parse().context("SLURM_STEP_ID")?;
        launch.master_port = Some(crate::launch::slurm_port(id, step));
    }
    if launch.job_token.is_empty() {
        // Keeps out strays from other jobs and steps; set RINGTRAIN_JOB_TOKEN for a secret one.
        launch.job_token = format!("slurm-job-{}.{step}", job.map(String::as_str).unwrap_or("0"));
    }
    tracing::info!(
        "store at {}:{} derived from Slurm's node list and job id",
        launch.master_addr.as_deref().unwrap_or("?"),
        launch.master_port.unwrap_or(0)
    );
    Ok(())
}

/// First host of a Slurm node list: `node[01-04,07],gpu1` → `node01`.
pub fn first_host(list: &str) -> Option<String> {
    let first = {
        let mut depth = 0;
        let end = list.char_indices().find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                ',' if depth == 0 => return true,
                _ => {}
            }
            false
        });
        &list[..end.map_or(list.len(), |(i, _)| i)]
    };
    if first.is_empty() {
        return None;
    }
    match first.split_once('[') {
        None => Some(first.to_string()),
        Some((prefix, rest)) => {
            let (ranges, suffix) = rest.split_once(']')?;
            let lo = ranges.split([',', '-']).next()?;
            Some(format!("{prefix}{lo}{suffix}"))
        }
    }
}

/// The address other ranks should use for this host: RINGTRAIN_LOCAL_ADDR if set; loopback when
/// the whole job is on this node; else the first non-loopback IPv4 address.
fn reachable_ip(launch: &LaunchInfo) -> IpAddr {
    if let Some(ip) = std::env::var("RINGTRAIN_LOCAL_ADDR").ok().and_then(|a| a.parse().ok()) {
        return ip;
    }
    if launch.local_world_size == launch.world_size {
        return IpAddr::V4(Ipv4Addr::LOCALHOST);
    }
    first_non_loopback_ipv4().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

fn first_non_loopback_ipv4() -> Option<IpAddr> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and then free.
    unsafe {
        if libc::getifaddrs(&mut addrs) != 0 {
            return None;
        }
        let mut cur = addrs;
        let mut found = None;
        while !cur.is_null() {
            let a = (*cur).ifa_addr;
            if !a.is_null() && (*a).sa_family as i32 == libc::AF_INET && (*cur).ifa_flags & libc::IFF_LOOPBACK as u32 == 0 {
                let sin = &*(a as *const libc::sockaddr_in);
                found = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                break;
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(addrs);
        found
    }
}

/// This rank's node, for choosing Unix sockets between neighbours on the same node:
/// RINGTRAIN_NODE_ID, else the launcher's node rank (GROUP_RANK, or the Kubernetes operator's
/// PET_NODE_RANK for a worker it started directly), else the host name.
fn node_id(env: &HashMap<String, String>) -> String {
    if let Some(id) = env.get("RINGTRAIN_NODE_ID") {
        return id.clone();
    }
    if let Some(g) = env.get("GROUP_RANK").or_else(|| env.get("PET_NODE_RANK")) {
        return format!("group-{g}");
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == 0).unwrap_or(0)]).into_owned()
}

/// The job's store (served by rank 0, by the multi-node launcher, or by torchrun's agent),
/// namespaced by restart generation, and the address this host reaches it from.
fn connect_store(launch: &mut LaunchInfo, timeout: Duration) -> Result<(Arc<dyn Store>, IpAddr)> {
    let addr = launch.store_addr()?;
    if launch.agent_store {
        return connect_agent_store(launch, &addr, timeout);
    }
    if launch.rank == 0 && !launch.store_served {
        let port = launch.master_port.expect("store_addr checked the port");
        let server = TcpStoreServer::start(
            &crate::rendezvous::bind_address(launch.master_addr.as_deref().unwrap_or("127.0.0.1"), port),
            &launch.job_token,
        )
        .with_context(|| format!("rank 0 serving the store on port {port} (MASTER_PORT)"))?;
        std::mem::forget(server);
    }
    let client = TcpStore::connect(&addr, &launch.job_token, timeout)?;
    let local_ip = client.local_ip();
    let store: Arc<dyn Store> = Arc::new(client);
    // Keys are namespaced by restart count so a restarted group never reads a stale address.
    Ok((Arc::new(PrefixStore::new(format!("gen{}", launch.restart_count), store)), local_ip))
}

/// Under torchrun: its agent's c10d store, under the prefix torchrun's own workers use for this
/// restart attempt (the agent's rendezvous keys live beside it). That store has no token, so
/// rank 0 makes one for the ring's links and passes it through the store: it keeps strays from
/// other jobs off the links, though anyone who can reach the store can read it
/// (RINGTRAIN_JOB_TOKEN, when set on every node, is used as it is).
fn connect_agent_store(launch: &mut LaunchInfo, addr: &str, timeout: Duration) -> Result<(Arc<dyn Store>, IpAddr)> {
    let client = crate::rendezvous::C10dStore::connect(addr, timeout)?;
    let local_ip = client.local_ip();
    let store: Arc<dyn Store> = Arc::new(PrefixStore::new(format!("worker/attempt_{}/ringtrain", launch.restart_count), Arc::new(client)));
    if launch.job_token.is_empty() {
        if launch.rank == 0 {
            launch.job_token = crate::auth::new_job_token()?;
            store.set("job_token", launch.job_token.as_bytes())?;
        } else {
            let token = store.get("job_token", timeout).context("waiting for rank 0's job token in torchrun's store")?;
            launch.job_token = String::from_utf8(token).context("the job token in torchrun's store is not text")?;
        }
    }
    tracing::info!("rendezvous through torchrun's agent store at {addr}");
    Ok((store, local_ip))
}

/// NCCL on this rank's GPU; the unique id travels through the store.
fn nccl(launch: &mut LaunchInfo, timeout: Duration, device: tch::Device) -> Result<Box<dyn Communicator>> {
    let tch::Device::Cuda(index) = device else { bail!("NCCL needs a CUDA device") };
    let store: Arc<dyn Store> = if launch.world_size == 1 { Arc::new(MemoryStore::new()) } else { connect_store(launch, timeout)?.0 };
    Ok(Box::new(NcclComm::new(store.as_ref(), launch.rank, launch.world_size, index, timeout)?))
}

/// The ring, with the store on rank 0 (or the multi-node launcher's).
fn ring(launch: &mut LaunchInfo, timeout: Duration, cfg: &CommConfig, env: &HashMap<String, String>) -> Result<Box<dyn Communicator>> {
    let local = cfg.local_transport;
    if launch.world_size == 1 {
        let opts = RingOptions::new(launch.job_token.clone(), IpAddr::V4(Ipv4Addr::LOCALHOST), timeout);
        return Ok(Box::new(RingComm::connect(&MemoryStore::new(), 0, 1, &opts)?));
    }
    let (generation, store_ip) = connect_store(launch, timeout)?;
    // The address peers should use: RINGTRAIN_LOCAL_ADDR (ringrun --local-addr), else the one
    // this host reaches the store from.
    let bind_ip = match env.get("RINGTRAIN_LOCAL_ADDR") {
        Some(a) => a.parse().with_context(|| format!("RINGTRAIN_LOCAL_ADDR={a:?} is not an IP address"))?,
        None => store_ip,
    };
    let mut opts = RingOptions::new(launch.job_token.clone(), bind_ip, timeout);
    opts.node_id = (local != LocalTransport::Tcp).then(|| node_id(env));
    opts.shm = local == LocalTransport::Shm;
    if cfg.hierarchical {
        match HierComm::connect(generation.clone(), launch.rank, launch.world_size, &node_id(env), &opts)? {
            Some(h) => {
                let (nodes, per_node) = h.shape();
                tracing::info!("hierarchical all-reduce: {nodes} nodes × {per_node} ranks (a ring within each node, {per_node} across)");
                return Ok(Box::new(h));
            }
            None => tracing::info!("comm.hierarchical: the job is not several nodes with the same number (> 1) of ranks each: flat ring"),
        }
    }
    let comm = RingComm::connect(generation.as_ref(), launch.rank, launch.world_size, &opts)?.with_stall_reports(generation.clone());
    Ok(Box::new(comm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_first_host() {
        for (list, host) in [
            ("node01", "node01"),
            ("node[01-04,07],gpu1", "node01"),
            ("gpu[3,5-6]", "gpu3"),
            ("a-b[009-010]x,c", "a-b009x"),
            ("localhost,other", "localhost"),
        ] {
            assert_eq!(first_host(list).as_deref(), Some(host), "{list}");
        }
        assert_eq!(first_host(""), None);
    }

    #[test]
    fn slurm_steps_get_their_own_port() {
        let ports: std::collections::HashSet<u16> = (0..50).map(|step| crate::launch::slurm_port(123456, step)).collect();
        assert_eq!(ports.len(), 50, "steps of one job collide");
        assert!(ports.iter().all(|p| (20000..40000).contains(p)));
        assert_ne!(crate::launch::slurm_port(7, 0), crate::launch::slurm_port(8, 0));
        // srun --mpi=pmi2: PMI_RANK and SLURM_* both set; auto is the ring, found through Slurm.
        assert_eq!(resolve_backend(Backend::Auto, LaunchSource::Pmi, false, true), Backend::Ring);
        assert_eq!(resolve_backend(Backend::Auto, LaunchSource::Pmi, false, false), if mpi::BUILT { Backend::Mpi } else { Backend::Ring });
    }

    #[test]
    fn auto_backend() {
        assert_eq!(resolve_backend(Backend::Auto, LaunchSource::Torchrun, false, false), Backend::Ring);
        assert_eq!(resolve_backend(Backend::Auto, LaunchSource::Slurm, false, true), Backend::Ring);
        let under_mpirun = resolve_backend(Backend::Auto, LaunchSource::OpenMpi, false, false);
        assert_eq!(under_mpirun, if mpi::BUILT { Backend::Mpi } else { Backend::Ring });
        assert_eq!(resolve_backend(Backend::Ring, LaunchSource::OpenMpi, false, false), Backend::Ring);
        assert_eq!(resolve_backend(Backend::Auto, LaunchSource::Torchrun, true, false), Backend::Nccl);
        assert_eq!(resolve_backend(Backend::Auto, LaunchSource::OpenMpi, true, false), Backend::Nccl);
        assert_eq!(resolve_backend(Backend::Ring, LaunchSource::Torchrun, true, false), Backend::Ring);
    }
}
