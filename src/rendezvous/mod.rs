//! Rendezvous: a small key-value store the ranks use to find each other.
//!
//! Mirrors c10d's `Store`: `set`, `get` (waits for the key), `add` (atomic counter) and `wait`.
//! Every blocking call takes a timeout, and a timeout names the keys it waited for.

mod memory;
mod prefix;
mod tcp;

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
