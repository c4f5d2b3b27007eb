//! Namespaces keys, so one store serves several users (ring setup, restarts) without clashes.

use super::{Store, StoreError};
use std::sync::Arc;
use std::time::Duration;

pub struct PrefixStore {
    prefix: String,
    inner: Arc<dyn Store>,
}

impl PrefixStore {
    pub fn new(prefix: impl Into<String>, inner: Arc<dyn Store>) -> Self {
        Self { prefix: prefix.into(), inner }
    }

    fn key(&self, k: &str) -> String {
        format!("{}/{}", self.prefix, k)
    }
}

impl Store for PrefixStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.set(&self.key(key), value)
    }
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        self.inner.get(&self.key(key), timeout)
    }
    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.inner.add(&self.key(key), delta)
    }
    fn wait(&self, keys: &[String], timeout: Duration) -> Result<(), StoreError> {
        let keys: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        self.inner.wait(&keys, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::MemoryStore;

    #[test]
    fn prefixes_do_not_clash() {
        let base: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let a = PrefixStore::new("a", base.clone());
        let b = PrefixStore::new("b", base.clone());
        a.set("k", b"1").unwrap();
        b.set("k", b"2").unwrap();
        assert_eq!(a.get("k", Duration::ZERO).unwrap(), b"1");
        assert_eq!(base.get("b/k", Duration::ZERO).unwrap(), b"2");
    }
}
