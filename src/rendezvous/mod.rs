//! Rendezvous: a small key-value store the ranks use to find each other.
//!
//! Mirrors c10d's `Store`: `set`, `get` (waits for the key), `add` (atomic counter) and `wait`.
//! Every blocking call takes a timeout, and a timeout names the keys it waited for.

mod c10d;
mod memory;
mod prefix;
mod tcp;

pub use c10d::C10dStore;
pub use memory::MemoryStore;
pub use prefix::PrefixStore;
pub use tcp::{TcpStore, TcpStoreServer};

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: timed out after {secs:.1}s waiting for key(s) {keys:?}")]
    Timeout { keys: Vec<String>, secs: f64 },
    #[error("store at {addr}: could not connect within {secs:.0}s (is rank 0 running and MASTER_ADDR/MASTER_PORT right?): {source}")]
    Connect { addr: String, secs: f64, source: std::io::Error },
    #[error("store at {addr}: connection refused by the server: job token mismatch (RINGTRAIN_JOB_TOKEN differs from rank 0's)")]
    Rejected { addr: String },
    #[error(
        "store at {addr}: the server there does not hold this job's token (a different RINGTRAIN_JOB_TOKEN, another job, or another \
         program on the port); nothing secret was sent to it"
    )]
    NotOurs { addr: String },
    #[error(
        "store at {addr}: the program listening there is not a ringtrain store ({what}): another program holds that \
         port; choose a free one (--master-port / MASTER_PORT); nothing secret was sent to it"
    )]
    Foreign { addr: String, what: String },
    #[error(
        "store at {addr}: no c10d TCPStore answers there ({what}); torchrun's variables (TORCHELASTIC_USE_AGENT_STORE=True) \
         say its agent serves one at MASTER_ADDR:MASTER_PORT"
    )]
    NotC10d { addr: String, what: String },
    #[error("store at {addr}: {op} failed: {source}")]
    Io { addr: String, op: &'static str, source: std::io::Error },
    #[error("store: cannot serve on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// The c10d-style key-value store interface.
pub trait Store: Send + Sync {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Waits up to `timeout` for `key` to be set, then returns its value.
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError>;
    /// Adds `delta` to the integer at `key` (missing = 0) and returns the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError>;
    /// Waits up to `timeout` until every key is set.
    fn wait(&self, keys: &[String], timeout: Duration) -> Result<(), StoreError>;
}

/// Whether `addr` (a name or an address) is one of this host's own: an elastic job's store is
/// served by the node whose address the master address is.
pub fn is_local_address(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    (addr, 0).to_socket_addrs().is_ok_and(|mut a| a.any(|a| a.ip().is_loopback() || std::net::UdpSocket::bind((a.ip(), 0)).is_ok()))
}

/// Where rank 0 (or node 0) serves the store for peers that reach it at `master_addr`: that
/// address's own interface, so the store is not offered on every network the host is on (c10d
/// binds all of them). `RINGTRAIN_STORE_BIND` overrides it (e.g. `0.0.0.0` behind NAT, where
/// MASTER_ADDR is not an address of this host). A name or address that is not local — an alias the
/// host cannot bind — falls back to all interfaces, with a warning.
pub fn bind_address(master_addr: &str, port: u16) -> String {
    if let Ok(bind) = std::env::var("RINGTRAIN_STORE_BIND") {
        return format!("{bind}:{port}");
    }
    use std::net::ToSocketAddrs;
    // IPv4 first, as clients try it first (`TcpStore::connect`).
    let ip = (master_addr, port).to_socket_addrs().ok().and_then(|a| {
        let all: Vec<_> = a.collect();
        all.iter().find(|a| a.is_ipv4()).or(all.first()).map(|a| a.ip())
    });
    match ip {
        // A host name that resolves to loopback here (Debian maps its own name to 127.0.1.1) may
        // resolve to the LAN address on the other nodes: loopback only when asked for literally.
        Some(ip) if ip.is_loopback() && !(master_addr == "localhost" || master_addr.parse::<std::net::IpAddr>().is_ok()) => {
            format!("0.0.0.0:{port}")
        }
        // Binding a UDP socket to ip:0 succeeds exactly when ip is an address of this host.
        Some(ip) if std::net::UdpSocket::bind((ip, 0)).is_ok() => std::net::SocketAddr::new(ip, port).to_string(),
        _ => {
            tracing::warn!(
                "MASTER_ADDR {master_addr} is not an address of this host; serving the store on all interfaces \
                 (set RINGTRAIN_STORE_BIND to choose one)"
            );
            format!("0.0.0.0:{port}")
        }
    }
}

#[cfg(test)]
mod bind_tests {
    #[test]
    fn the_store_binds_the_master_address_interface() {
        assert_eq!(super::bind_address("127.0.0.1", 5), "127.0.0.1:5");
        assert_eq!(super::bind_address("localhost", 6).rsplit_once(':').unwrap().1, "6");
        assert!(super::bind_address("localhost", 6).starts_with("127.") || super::bind_address("localhost", 6).starts_with("[::1]"));
        // 192.0.2.0/24 is TEST-NET-1: never an address of this host.
        assert_eq!(super::bind_address("192.0.2.7", 7), "0.0.0.0:7");
    }
}
