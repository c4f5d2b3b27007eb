//! A client of c10d's TCPStore: the store torchrun's agent serves on MASTER_PORT and tells its
//! workers to use (`TORCHELASTIC_USE_AGENT_STORE=True`), so torchrun can start ringtrain workers
//! (`torchrun --no-python ringtrain …`).
//!
//! Wire format (PyTorch's `TCPStore.cpp` client against its libuv server, as torch 2.11 speaks
//! it; little-endian, strings and byte vectors as a u64 length then the bytes): the client opens
//! with VALIDATE and the u32 magic 0x3C85F7CE (no answer), then PING with a u32 the server echoes.
//! Then: SET key value (no answer); ADD key i64 → i64; WAIT n keys… → STOP_WAITING, or, after the
//! client gives up and sends CANCEL_WAIT, WAIT_CANCELED (a STOP_WAITING that crossed it first);
//! GET key → value (PyTorch's client WAITs first, as here); CHECK n keys… → READY | NOT_READY.
//! Keys go out with a leading `/`, as PyTorch's client sends them, so a Python process on the same
//! store sees the same names.
//!
//! c10d's store has no authentication: whoever reaches the port can read and write every key.
//! torchrun's workers live with that; ringtrain under torchrun does too (see `group`).

use super::tcp::connect_retrying;
use super::{Store, StoreError};
use crate::wire::*;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

const VALIDATE: u8 = 0;
const SET: u8 = 1;
const GET: u8 = 3;
const ADD: u8 = 4;
const CHECK: u8 = 5;
const WAIT: u8 = 6;
const CANCEL_WAIT: u8 = 12;
const PING: u8 = 13;
const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;
const STOP_WAITING: u8 = 0;
const WAIT_CANCELED: u8 = 1;
const READY: u8 = 0;
/// How long a reply may take beyond any wait the client asked the server for.
const REPLY_SLACK: Duration = Duration::from_secs(10);

type Conn = (BufReader<TcpStream>, BufWriter<TcpStream>);

/// A connection to a c10d TCPStore.
pub struct C10dStore {
    addr: String,
    conn: Mutex<Conn>,
    local_ip: std::net::IpAddr,
}

impl C10dStore {
    /// Connects (retrying until `connect_timeout`) and checks that a c10d store answers.
    pub fn connect(addr: &str, connect_timeout: Duration) -> Result<Self, StoreError> {
        let stream = connect_retrying(addr, connect_timeout)?;
        let io_err = |op, source| StoreError::Io { addr: addr.to_string(), op, source };
        stream.set_nodelay(true).map_err(|e| io_err("connect", e))?;
        let local_ip = stream.local_addr().map_err(|e| io_err("connect", e))?.ip();
        stream.set_read_timeout(Some(REPLY_SLACK)).map_err(|e| io_err("connect", e))?;
        let mut r = BufReader::new(stream.try_clone().map_err(|e| io_err("connect", e))?);
        let mut w = BufWriter::new(stream);
        let nonce = std::process::id();
        let hello = (|| {
            write_u8(&mut w, VALIDATE)?;
            w.write_all(&VALIDATION_MAGIC.to_le_bytes())?;
            write_u8(&mut w, PING)?;
            w.write_all(&nonce.to_le_bytes())?;
            w.flush()?;
            read_u32(&mut r)
        })();
        match hello {
            Ok(echo) if echo == nonce => Ok(Self { addr: addr.to_string(), conn: Mutex::new((r, w)), local_ip }),
            Ok(echo) => {
                Err(StoreError::NotC10d { addr: addr.to_string(), what: format!("its answer to a ping was {echo:#x}, not {nonce:#x}") })
            }
            Err(e) => Err(StoreError::NotC10d { addr: addr.to_string(), what: format!("no answer to a ping: {e}") }),
        }
    }

    /// The local address this process reaches the store from (what peers on other hosts can
    /// reach it at).
    pub fn local_ip(&self) -> std::net::IpAddr {
        self.local_ip
    }

    fn call<T>(&self, op: &'static str, f: impl FnOnce(&mut Conn) -> std::io::Result<T>) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|source| StoreError::Io { addr: self.addr.clone(), op, source })
    }

    /// WAIT for `keys` up to `timeout`; on timeout, cancels the wait and names the keys still
    /// missing (CHECK, one by one).
    fn wait_keys(&self, keys: &[String], timeout: Duration) -> Result<(), StoreError> {
        let arrived = self.call("wait", |(r, w)| {
            write_u8(w, WAIT)?;
            write_keys(w, keys)?;
            w.flush()?;
            // A zero read timeout means "none" to the socket: wait at least a millisecond.
            r.get_ref().set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
            let answer = read_u8(r);
            r.get_ref().set_read_timeout(Some(REPLY_SLACK))?;
            match answer {
                Ok(STOP_WAITING) => Ok(true),
                Ok(other) => Err(invalid(format!("WAIT answered {other}, not STOP_WAITING"))),
                Err(e) if is_timeout(&e) => {
                    write_u8(w, CANCEL_WAIT)?;
                    w.flush()?;
                    // The keys may have arrived just as we gave up: STOP_WAITING, then the cancel.
                    let mut answer = read_u8(r)?;
                    if answer == STOP_WAITING {
                        answer = read_u8(r)?;
                    }
                    if answer != WAIT_CANCELED {
                        return Err(invalid(format!("CANCEL_WAIT answered {answer}, not WAIT_CANCELED")));
                    }
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })?;
        if arrived {
            return Ok(());
        }
        let mut missing = Vec::new();
        for key in keys {
            let ready = self.call("check", |(r, w)| {
                write_u8(w, CHECK)?;
                write_keys(w, std::slice::from_ref(key))?;
                w.flush()?;
                Ok(read_u8(r)? == READY)
            })?;
            if !ready {
                missing.push(key.clone());
            }
        }
        Err(StoreError::Timeout { keys: missing, secs: timeout.as_secs_f64() })
    }
}

/// The name c10d's client sends for `key`.
fn wire_key(key: &str) -> String {
    format!("/{key}")
}

fn write_keys(w: &mut impl Write, keys: &[String]) -> std::io::Result<()> {
    write_u64(w, keys.len() as u64)?;
    for k in keys {
        write_blob(w, wire_key(k).as_bytes())?;
    }
    Ok(())
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

impl Store for C10dStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.call("set", |(_, w)| {
            write_u8(w, SET)?;
            write_blob(w, wire_key(key).as_bytes())?;
            write_blob(w, value)?;
            w.flush()
        })
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        self.wait_keys(&[key.to_string()], timeout)?;
        self.call("get", |(r, w)| {
            write_u8(w, GET)?;
            write_blob(w, wire_key(key).as_bytes())?;
            w.flush()?;
            read_blob(r)
        })
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.call("add", |(r, w)| {
            write_u8(w, ADD)?;
            write_blob(w, wire_key(key).as_bytes())?;
            write_i64(w, delta)?;
            w.flush()?;
            read_i64(r)
        })
    }

    fn wait(&self, keys: &[String], timeout: Duration) -> Result<(), StoreError> {
        self.wait_keys(keys, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_does_not_echo_the_ping_is_not_taken_for_a_c10d_store() {
        // A ringtrain store (or anything else) on the port answers differently or not at all.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            std::thread::sleep(Duration::from_millis(300));
        });
        let err = C10dStore::connect(&addr, Duration::from_secs(5)).err().expect("not a c10d store");
        assert!(matches!(err, StoreError::NotC10d { .. }), "{err}");
        assert!(err.to_string().contains(&addr), "{err}");
    }
}
