//! Launchers on several nodes acting as one job. Node 0's launcher serves the job's store; a
//! failure anywhere is posted to the store and stops every node; restarts happen together, one
//! generation at a time.
//!
//! Two memberships: static (`--nnodes N`, torchrun's static rendezvous: every launcher announces
//! itself per generation and waits for the others, a timeout names the missing nodes) and elastic
//! (`--nnodes MIN:MAX`, see `elastic`: nodes come and go between generations).
//!
//! Keys: `nodes/gen<G>/joined/<node>`, `nodes/gen<G>/failed`, `nodes/gen<G>/done/<node>`.

use super::elastic::{self, ElasticOptions, Members};
use crate::rendezvous::{Store, StoreError, TcpStore, TcpStoreServer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which nodes a job has: a fixed count with this node's rank, or a range admitted at run time.
#[derive(Clone, Debug)]
pub enum Membership {
    Static { nnodes: usize, node_rank: usize },
    Elastic(ElasticOptions),
}

pub struct NodeCoordinator {
    store: TcpStore,
    addr: String,
    token: String,
    membership: Membership,
    join_timeout: Duration,
    /// How peers name this node in logs: its address and launcher's pid.
    me: String,
    /// The generation restarts count from (the store host's first).
    base: u32,
    /// The members of the generation now running (elastic), for the next one's news.
    current: Mutex<Option<Members>>,
    _server: Option<TcpStoreServer>,
}

/// One generation, as this node takes part in it.
#[derive(Clone, Debug, PartialEq)]
pub struct Joined {
    pub gen: u32,
    pub nnodes: usize,
    pub node_rank: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RemoteKind {
    /// Another node failed or was lost: stop at once.
    Failed,
    /// Nodes wait to join: stop at a checkpoint and re-form.
    Reform,
    /// The store (node 0) is gone: the job cannot go on.
    StoreLost,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Remote {
    pub reason: String,
    pub kind: RemoteKind,
}

/// Set by the watcher when another node failed (or the store was lost); read by the supervisor.
#[derive(Clone, Default)]
pub struct RemoteFailure {
    state: Arc<Mutex<Option<Remote>>>,
    stop: Arc<AtomicBool>,
}

impl RemoteFailure {
    pub fn get(&self) -> Option<Remote> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub(super) fn set(&self, r: Remote) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }
    pub(super) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    /// Ends the watcher thread.
    pub fn stop_watching(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
    /// Whether the watcher finds the store gone within `within` (a worker's failure may be seen
    /// first when node 0 dies: the store's loss is the cause to report).
    pub fn store_lost_within(&self, within: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + within;
        loop {
            match self.get() {
                Some(Remote { reason, kind: RemoteKind::StoreLost }) => return Some(reason),
                Some(_) => return None,
                None if std::time::Instant::now() >= deadline => return None,
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Why this node stops when the store went away: node 0's launcher serves it, so a closed
/// connection means node 0 is gone, and the job cannot go on without it.
pub(super) fn store_lost(e: &StoreError) -> String {
    match e {
        StoreError::Io { addr, source, .. } if crate::wire::is_closed(source) => format!(
            "node 0 is gone: its launcher, which serves the job's store ({addr}), closed the connection; the job cannot go on \
             without it: start every node again, the workers with --resume auto, to go on from the latest checkpoint"
        ),
        e => format!("lost contact with the job's store on node 0: {e}"),
    }
}

pub(super) fn key(gen: u32, what: &str) -> String {
    format!("nodes/gen{gen}/{what}")
}

impl NodeCoordinator {
    /// Node 0 serves the store on `port`; every node connects (waiting up to the join timeout
    /// for node 0 to come up). Elastic: node 0 is the node whose address `master_addr` is (the
    /// first launcher there to bind the port); `gen` is this launcher's first generation.
    pub fn start(
        master_addr: &str,
        port: u16,
        token: &str,
        membership: Membership,
        join_timeout: Duration,
        gen: u32,
    ) -> Result<Self, String> {
        let server = match &membership {
            Membership::Static { node_rank: 0, .. } => {
                Some(TcpStoreServer::start(&crate::rendezvous::bind_address(master_addr, port), token).map_err(|e| e.to_string())?)
            }
            Membership::Static { .. } => None,
            Membership::Elastic(o) if o.host.unwrap_or_else(|| crate::rendezvous::is_local_address(master_addr)) => {
                match TcpStoreServer::start(&crate::rendezvous::bind_address(master_addr, port), token) {
                    Ok(s) => Some(s),
                    // Another launcher on this host serves it: this one is a client.
                    Err(StoreError::Bind { source, .. }) if source.kind() == std::io::ErrorKind::AddrInUse => None,
                    Err(e) => return Err(e.to_string()),
                }
            }
            Membership::Elastic(_) => None,
        };
        let addr = format!("{master_addr}:{port}");
        let who = match &membership {
            Membership::Static { node_rank, .. } => format!("node {node_rank}"),
            Membership::Elastic(_) => "this node".into(),
        };
        let store = TcpStore::connect(&addr, token, join_timeout).map_err(|e| format!("{who}: {e}"))?;
        let me = format!("{} (pid {})", store.local_ip(), std::process::id());
        let base = match (&membership, &server) {
            (Membership::Static { .. }, _) => gen,
            (Membership::Elastic(_), Some(_)) => {
                store.set("nodes/base", gen.to_string().as_bytes()).map_err(|e| e.to_string())?;
                gen
            }
            (Membership::Elastic(_), None) => {
                let v = store.get("nodes/base", join_timeout).map_err(|e| format!("waiting for node 0 to open the job: {e}"))?;
                String::from_utf8_lossy(&v).parse().map_err(|_| "node 0 published a bad generation".to_string())?
            }
        };
        Ok(Self { store, addr, token: token.to_string(), membership, join_timeout, me, base, current: Mutex::new(None), _server: server })
    }

    /// The address this node reaches the master from: what peers on other nodes should use.
    pub fn local_ip(&self) -> std::net::IpAddr {
        self.store.local_ip()
    }

    /// Whether this launcher serves the store (node 0).
    pub fn is_host(&self) -> bool {
        self._server.is_some()
    }

    /// The generation restarts are counted from.
    pub fn base(&self) -> u32 {
        self.base
    }

    /// Names this node in logs by the address peers reach it at.
    pub fn name_as(&mut self, addr: &str) {
        self.me = format!("{addr} (pid {})", std::process::id());
    }

    /// Takes part in generation `gen` (elastic: the newest one at or after it): returns this
    /// node's place once every member is in; `None` when the job finished while this node waited
    /// to join. Elastic: logs the members and world size (`nproc_per_node` workers each).
    pub fn join(&self, gen: u32, nproc_per_node: usize) -> Result<Option<Joined>, String> {
        let o = match &self.membership {
            Membership::Static { nnodes, node_rank } => {
                self.join_static(gen)?;
                return Ok(Some(Joined { gen, nnodes: *nnodes, node_rank: *node_rank }));
            }
            Membership::Elastic(o) => o,
        };
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let (node_rank, m) = if self.is_host() {
            let previous = current.as_ref().map(|m| m.ids.clone()).unwrap_or_default();
            (0, elastic::host_round(&self.store, gen, o, &self.me, &previous, self.join_timeout)?)
        } else {
            match elastic::join_round(&self.store, gen, &self.me, self.join_timeout)? {
                Some(x) => x,
                None => return Ok(None),
            }
        };
        let world_note = if m.news.is_empty() { String::new() } else { format!(" ({})", m.news) };
        super::status::message(&format!(
            "ringrun: generation {}: {} node(s), world size {}{world_note}; this is node {node_rank}; nodes: {}",
            m.gen,
            m.ids.len(),
            m.ids.len() * nproc_per_node,
            m.ids.iter().enumerate().map(|(k, id)| format!("{k} = {id}")).collect::<Vec<_>>().join(", ")
        ));
        let joined = Joined { gen: m.gen, nnodes: m.ids.len(), node_rank };
        *current = Some(m);
        Ok(Some(joined))
    }

    fn join_static(&self, gen: u32) -> Result<(), String> {
        let Membership::Static { nnodes, node_rank } = self.membership else { unreachable!("static membership") };
        self.store.set(&key(gen, &format!("joined/{node_rank}")), b"1").map_err(|e| e.to_string())?;
        let keys: Vec<String> = (0..nnodes).map(|n| key(gen, &format!("joined/{n}"))).collect();
        match self.store.wait(&keys, self.join_timeout) {
            Ok(()) => Ok(()),
            Err(StoreError::Timeout { keys, .. }) => {
                let missing: Vec<String> = keys.iter().filter_map(|k| k.rsplit('/').next().map(String::from)).collect();
                Err(format!(
                    "node(s) [{}] did not join within {:.0}s (is ringrun running there with --node-rank and the same --master-addr/--master-port?)",
                    missing.join(", "),
                    self.join_timeout.as_secs_f64()
                ))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Starts watching generation `j.gen` for another node's failure, on a connection of its
    /// own. Elastic: with heartbeats, and on node 0, admitting waiting nodes when `admit`.
    pub fn watch(&self, j: &Joined, admit: bool) -> RemoteFailure {
        if let Membership::Elastic(o) = &self.membership {
            let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            let m = current.as_ref().expect("watch after join");
            return elastic::watch(&self.addr, &self.token, j.node_rank, m, o, admit);
        }
        let flag = RemoteFailure::default();
        let out = flag.clone();
        let (addr, token, gen) = (self.addr.clone(), self.token.clone(), j.gen);
        std::thread::spawn(move || {
            let store = match TcpStore::connect(&addr, &token, Duration::from_secs(10)) {
                Ok(s) => s,
                Err(e) => return flag.set(Remote { reason: store_lost(&e), kind: RemoteKind::StoreLost }),
            };
            while !flag.stopped() {
                match store.get(&key(gen, "failed"), Duration::from_millis(500)) {
                    Ok(v) => return flag.set(Remote { reason: String::from_utf8_lossy(&v).into_owned(), kind: RemoteKind::Failed }),
                    Err(StoreError::Timeout { .. }) => {}
                    Err(e) => {
                        if !flag.stopped() {
                            flag.set(Remote { reason: store_lost(&e), kind: RemoteKind::StoreLost });
                        }
                        return;
                    }
                }
            }
        });
        out
    }

    /// Why node 0 asked the nodes to stop at a checkpoint and re-form, if it did. Workers that
    /// stopped on another node's request exit 0 as at the end of training: this tells them apart
    /// (node 0 asks before any worker stops, so no wait is needed).
    pub fn reform_asked(&self, j: &Joined) -> Option<String> {
        let v = self.store.get(&key(j.gen, "reform"), Duration::from_millis(1)).ok()?;
        Some(String::from_utf8_lossy(&v).into_owned())
    }

    /// Tells every node that generation `j.gen` failed here.
    pub fn report_failure(&self, j: &Joined, what: &str) {
        let _ = self.store.set(&key(j.gen, "failed"), format!("node {}: {what}", j.node_rank).as_bytes());
    }

    /// Elastic: nodes waiting to join poll for the job's end; give them time to read it before
    /// the store goes with this launcher.
    fn tell_waiting_nodes_the_end(&self, j: &Joined) -> Result<(), String> {
        self.store.set("nodes/finished", b"1").map_err(|e| e.to_string())?;
        let arrived = 1 + self.store.add(&key(j.gen, "arrivals"), 0).map_err(|e| e.to_string())? as usize;
        if arrived > j.nnodes {
            std::thread::sleep(Duration::from_secs(1));
        }
        Ok(())
    }

    /// Marks this node done; node 0 (which serves the store) waits for the others before leaving,
    /// and tells nodes waiting to join that the job is over.
    pub fn finish(&self, j: &Joined) -> Result<(), String> {
        self.store.set(&key(j.gen, &format!("done/{}", j.node_rank)), b"1").map_err(|e| e.to_string())?;
        if j.node_rank == 0 {
            let keys: Vec<String> = (0..j.nnodes).map(|n| key(j.gen, &format!("done/{n}"))).collect();
            match &self.membership {
                Membership::Static { .. } => {
                    self.store.wait(&keys, self.join_timeout).map_err(|e| format!("waiting for the other nodes to finish: {e}"))?
                }
                // This node's workers ended well, so the job's work is done: a node that does not
                // say it ended within the node timeout (frozen, or lost at the very end) is not
                // waited for.
                Membership::Elastic(o) => match self.store.wait(&keys, o.node_timeout) {
                    Ok(()) => {}
                    Err(StoreError::Timeout { keys, .. }) => {
                        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
                        let ids = current.as_ref().map(|m| m.ids.clone()).unwrap_or_default();
                        let silent: Vec<String> = keys
                            .iter()
                            .filter_map(|k| k.rsplit('/').next()?.parse::<usize>().ok())
                            .map(|n| format!("node {n} ({})", ids.get(n).map_or("?", String::as_str)))
                            .collect();
                        super::status::message(&format!(
                            "ringrun: warning: {} did not report its end within {:.0}s; the job finished here",
                            silent.join(", "),
                            o.node_timeout.as_secs_f64()
                        ));
                    }
                    Err(e) => return Err(format!("waiting for the other nodes to finish: {e}")),
                },
            }
            if let Membership::Elastic(_) = self.membership {
                self.tell_waiting_nodes_the_end(j)?;
            }
        }
        Ok(())
    }
}
