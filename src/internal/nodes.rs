//! Launchers on several nodes acting as one job (torchrun's static rendezvous): node 0's launcher
//! serves the job's store; every launcher announces itself per generation and waits for the
//! others (a timeout names the missing nodes); a failure anywhere is posted to the store and
//! stops every node; restarts happen together, one generation at a time.
//!
//! Keys: `nodes/gen<G>/joined/<node>`, `nodes/gen<G>/failed`, `nodes/gen<G>/done/<node>`.

use crate::rendezvous::{Store, StoreError, TcpStore, TcpStoreServer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct NodeCoordinator {
    store: TcpStore,
    addr: String,
    token: String,
    pub nnodes: usize,
    pub node_rank: usize,
    join_timeout: Duration,
    _server: Option<TcpStoreServer>,
}

/// Set by the watcher when another node failed (or the store was lost); read by the supervisor.
#[derive(Clone, Default)]
pub struct RemoteFailure {
    reason: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
}

impl RemoteFailure {
    pub fn get(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Ends the watcher thread.
    pub fn stop_watching(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn key(gen: u32, what: &str) -> String {
    format!("nodes/gen{gen}/{what}")
}

impl NodeCoordinator {
    /// Node 0 serves the store on `port`; every node connects (waiting up to the join timeout
    /// for node 0 to come up).
    pub fn start(
        master_addr: &str,
        port: u16,
        token: &str,
        nnodes: usize,
        node_rank: usize,
        join_timeout: Duration,
    ) -> Result<Self, String> {
        let server = if node_rank == 0 {
            Some(TcpStoreServer::start(&crate::rendezvous::bind_address(master_addr, port), token).map_err(|e| e.to_string())?)
        } else {
            None
        };
        let addr = format!("{master_addr}:{port}");
        let store = TcpStore::connect(&addr, token, join_timeout).map_err(|e| format!("node {node_rank}: {e}"))?;
        Ok(Self { store, addr, token: token.to_string(), nnodes, node_rank, join_timeout, _server: server })
    }

    /// The address this node reaches the master from: what peers on other nodes should use.
    pub fn local_ip(&self) -> std::net::IpAddr {
        self.store.local_ip()
    }

    /// Announces this node for generation `gen` and waits for all the others.
    pub fn join(&self, gen: u32) -> Result<(), String> {
        self.store.set(&key(gen, &format!("joined/{}", self.node_rank)), b"1").map_err(|e| e.to_string())?;
        let keys: Vec<String> = (0..self.nnodes).map(|n| key(gen, &format!("joined/{n}"))).collect();
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

    /// Starts watching generation `gen` for another node's failure, on a connection of its own.
    pub fn watch(&self, gen: u32) -> RemoteFailure {
        let flag = RemoteFailure::default();
        let out = flag.clone();
        let (addr, token) = (self.addr.clone(), self.token.clone());
        std::thread::spawn(move || {
            let store = match TcpStore::connect(&addr, &token, Duration::from_secs(10)) {
                Ok(s) => s,
                Err(e) => {
                    *flag.reason.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("lost contact with the job's store on node 0: {e}"));
                    return;
                }
            };
            while !flag.stop.load(Ordering::Relaxed) {
                match store.get(&key(gen, "failed"), Duration::from_millis(500)) {
                    Ok(v) => {
                        *flag.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(String::from_utf8_lossy(&v).into_owned());
                        return;
                    }
                    Err(StoreError::Timeout { .. }) => {}
                    Err(e) => {
                        if !flag.stop.load(Ordering::Relaxed) {
                            *flag.reason.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(format!("lost contact with the job's store on node 0: {e}"));
                        }
                        return;
                    }
                }
            }
        });
        out
    }

    /// Tells every node that generation `gen` failed here.
    pub fn report_failure(&self, gen: u32, what: &str) {
        let _ = self.store.set(&key(gen, "failed"), format!("node {}: {what}", self.node_rank).as_bytes());
    }

    /// Marks this node done; node 0 (which serves the store) waits for the others before leaving.
    pub fn finish(&self, gen: u32) -> Result<(), String> {
        self.store.set(&key(gen, &format!("done/{}", self.node_rank)), b"1").map_err(|e| e.to_string())?;
        if self.node_rank == 0 {
            let keys: Vec<String> = (0..self.nnodes).map(|n| key(gen, &format!("done/{n}"))).collect();
            self.store.wait(&keys, self.join_timeout).map_err(|e| format!("waiting for the other nodes to finish: {e}"))?;
        }
        Ok(())
    }
}
