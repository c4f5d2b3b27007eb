//! In-process store: the table behind the TCP server, and a store for tests.

use super::{Store, StoreError};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct MemoryStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until all keys exist; on timeout returns the ones still missing.
    fn wait_for(&self, keys: &[String], timeout: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + timeout;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let missing: Vec<String> = keys.iter().filter(|k| !map.contains_key(*k)).cloned().collect();
            if missing.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::Timeout { keys: missing, secs: timeout.as_secs_f64() });
            }
            map = self.changed.wait_timeout(map, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl Store for MemoryStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_string(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        self.wait_for(&[key.to_string()], timeout)?;
        Ok(self.map.lock().unwrap_or_else(|p| p.into_inner())[key].clone())
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let current = map.get(key).and_then(|v| std::str::from_utf8(v).ok()).and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
        let next = current + delta;
        map.insert(key.to_string(), next.to_string().into_bytes());
        drop(map);
        self.changed.notify_all();
        Ok(next)
    }

    fn wait(&self, keys: &[String], timeout: Duration) -> Result<(), StoreError> {
        self.wait_for(keys, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn get_waits_for_a_later_set() {
        let s = Arc::new(MemoryStore::new());
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.get("k", Duration::from_secs(5)).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        s.set("k", b"v").unwrap();
        assert_eq!(t.join().unwrap(), b"v");
    }

    #[test]
    fn timeout_names_missing_keys() {
        let s = MemoryStore::new();
        s.set("a", b"1").unwrap();
        let err = s.wait(&["a".into(), "b".into()], Duration::from_millis(50)).unwrap_err();
        match err {
            StoreError::Timeout { keys, .. } => assert_eq!(keys, vec!["b".to_string()]),
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn add_counts() {
        let s = MemoryStore::new();
        assert_eq!(s.add("c", 2).unwrap(), 2);
        assert_eq!(s.add("c", 3).unwrap(), 5);
        assert_eq!(s.get("c", Duration::ZERO).unwrap(), b"5");
    }
}
