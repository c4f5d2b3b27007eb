//! The TCP store: rank 0 serves a `MemoryStore` on MASTER_ADDR:MASTER_PORT; every rank (rank 0
//! too) talks to it through a `TcpStore` client.
//!
//! Protocol (little-endian, see `wire`). Handshake, a challenge-response on the job token that
//! never sends it (`auth`): the client opens with `HELLO_MAGIC` and a nonce c; the server answers
//! `HELLO_MAGIC` (so a client that reached some other program on the port says so instead of
//! misreading its bytes), its nonce s and HMAC(token, "store-server" ‖ c ‖ s); the client checks
//! it — a server without
//! the token (a stranger on the port) learns nothing — and answers HMAC(token, "store-client" ‖
//! s ‖ c); the server answers 1 (accepted) or 0 (refused, then closes). Then request/response pairs:
//! SET key value -> 0; GET key timeout_ms -> 0 value | 1; ADD key delta -> value;
//! WAIT n keys.. timeout_ms -> 0 | 1 n missing-keys...

use super::{MemoryStore, Store, StoreError};
use crate::auth;
use crate::wire::*;
use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HELLO_MAGIC: u64 = 0x5254_5354_4f52_4532; // "RTSTORE2"
const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
const OP_WAIT: u8 = 4;
/// Extra time a client waits for a reply beyond the server-side wait it asked for.
const REPLY_SLACK: Duration = Duration::from_secs(10);

/// The server half. Lives as long as the process (its threads are detached): rank 0 serves the
/// store for the whole job.
pub struct TcpStoreServer {
    addr: SocketAddr,
}

impl TcpStoreServer {
    /// Binds `addr` (port 0 picks a free port) and serves in background threads.
    pub fn start(addr: &str, token: &str) -> Result<Self, StoreError> {
        let listener = TcpListener::bind(addr).map_err(|source| StoreError::Bind { addr: addr.to_string(), source })?;
        let local = listener.local_addr().map_err(|source| StoreError::Bind { addr: addr.to_string(), source })?;
        let table = Arc::new(MemoryStore::new());
        let token = token.to_string();
        std::thread::Builder::new()
            .name("store-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let (table, token) = (table.clone(), token.clone());
                    let _ = std::thread::Builder::new().name("store-conn".into()).spawn(move || serve_connection(conn, &table, &token));
                }
            })
            .map_err(|source| StoreError::Bind { addr: format!("{addr} (starting its accept thread)"), source })?;
        Ok(Self { addr: local })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

fn serve_connection(conn: TcpStream, table: &MemoryStore, token: &str) {
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let _ = conn.set_nodelay(true);
    // A client that connects and says nothing must not pin a thread forever.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(reader) = conn.try_clone() else {
        tracing::warn!("store: dropped a connection from {peer}: its socket could not be cloned");
        return;
    };
    let mut r = BufReader::new(reader);
    let mut w = BufWriter::new(conn);
    let hello = (|| -> std::io::Result<bool> {
        if read_u64(&mut r)? != HELLO_MAGIC {
            return Ok(false);
        }
        let c = read_blob(&mut r)?;
        let s = auth::nonce()?;
        write_u64(&mut w, HELLO_MAGIC)?;
        write_blob(&mut w, &s)?;
        write_blob(&mut w, &auth::proof(token, b"store-server", &[&c, &s]))?;
        w.flush()?;
        let presented = read_blob(&mut r)?;
        Ok(auth::verify(token, b"store-client", &[&s, &c], &presented))
    })();
    match hello {
        Ok(true) => {}
        Ok(false) | Err(_) => {
            tracing::warn!("store: refused a connection from {peer}: no valid job token presented");
            let _ = write_u8(&mut w, 0).and_then(|_| w.flush());
            return;
        }
    }
    if write_u8(&mut w, 1).and_then(|_| w.flush()).is_err() {
        return;
    }
    // Clients idle between requests for as long as training runs.
    let _ = w.get_ref().set_read_timeout(None);
    let _ = r.get_ref().set_read_timeout(None);
    loop {
        let result = (|| -> std::io::Result<()> {
            match read_u8(&mut r)? {
                OP_SET => {
                    let key = read_string(&mut r)?;
                    let value = read_blob(&mut r)?;
                    table.set(&key, &value).ok();
                    write_u8(&mut w, 0)?;
                }
                OP_GET => {
                    let key = read_string(&mut r)?;
                    let timeout = Duration::from_millis(read_u64(&mut r)?);
                    match table.get(&key, timeout) {
                        Ok(v) => {
                            write_u8(&mut w, 0)?;
                            write_blob(&mut w, &v)?;
                        }
                        Err(_) => write_u8(&mut w, 1)?,
                    }
                }
                OP_ADD => {
                    let key = read_string(&mut r)?;
                    let delta = read_i64(&mut r)?;
                    write_i64(&mut w, table.add(&key, delta).unwrap_or(0))?;
                }
                OP_WAIT => {
                    let n = read_u64(&mut r)? as usize;
                    let keys = (0..n).map(|_| read_string(&mut r)).collect::<Result<Vec<_>, _>>()?;
                    let timeout = Duration::from_millis(read_u64(&mut r)?);
                    match table.wait(&keys, timeout) {
                        Ok(()) => write_u8(&mut w, 0)?,
                        Err(StoreError::Timeout { keys, .. }) => {
                            write_u8(&mut w, 1)?;
                            write_u64(&mut w, keys.len() as u64)?;
                            for k in keys {
                                write_blob(&mut w, k.as_bytes())?;
                            }
                        }
                        Err(_) => unreachable!("MemoryStore::wait only times out"),
                    }
                }
                op => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unknown op {op}"))),
            }
            w.flush()
        })();
        if result.is_err() {
            return; // client gone or speaking nonsense: drop the connection
        }
    }
}

/// A TCP connection to `addr`, retrying until `connect_timeout` (the server may still be
/// starting): every address the name resolves to, IPv4 first (a server binds one of them).
pub(super) fn connect_retrying(addr: &str, connect_timeout: Duration) -> Result<TcpStream, StoreError> {
    let deadline = Instant::now() + connect_timeout;
    loop {
        let attempt = addr.to_socket_addrs().and_then(|it| {
            let mut all: Vec<_> = it.collect();
            all.sort_by_key(|a| !a.is_ipv4());
            let mut last = std::io::Error::other("address resolves to nothing");
            for sa in all {
                match TcpStream::connect_timeout(&sa, Duration::from_secs(2)) {
                    Ok(s) => return Ok(s),
                    Err(e) => last = e,
                }
            }
            Err(last)
        });
        match attempt {
            Ok(s) => return Ok(s),
            Err(source) if Instant::now() >= deadline => {
                return Err(StoreError::Connect { addr: addr.to_string(), secs: connect_timeout.as_secs_f64(), source })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A client connection to the store.
pub struct TcpStore {
    addr: String,
    conn: Mutex<(BufReader<TcpStream>, BufWriter<TcpStream>)>,
    local_ip: std::net::IpAddr,
}

impl TcpStore {
    /// Connects, retrying until `connect_timeout` (rank 0 may still be starting its server).
    pub fn connect(addr: &str, token: &str, connect_timeout: Duration) -> Result<Self, StoreError> {
        let stream = connect_retrying(addr, connect_timeout)?;
        let io_err = |op, source| StoreError::Io { addr: addr.to_string(), op, source };
        stream.set_nodelay(true).map_err(|e| io_err("connect", e))?;
        let local_ip = stream.local_addr().map_err(|e| io_err("connect", e))?.ip();
        stream.set_read_timeout(Some(REPLY_SLACK)).map_err(|e| io_err("connect", e))?;
        let mut r = BufReader::new(stream.try_clone().map_err(|e| io_err("connect", e))?);
        let mut w = BufWriter::new(stream);
        let c = auth::nonce().map_err(|e| io_err("hello", e))?;
        write_u64(&mut w, HELLO_MAGIC).map_err(|e| io_err("hello", e))?;
        write_blob(&mut w, &c).map_err(|e| io_err("hello", e))?;
        w.flush().map_err(|e| io_err("hello", e))?;
        // Whatever answers must first show it speaks this protocol: a foreign server's first bytes
        // (an HTTP reply, another job's protocol) are not read as a length.
        match read_u64(&mut r) {
            Ok(HELLO_MAGIC) => {}
            Ok(_) => return Err(StoreError::Foreign { addr: addr.to_string(), what: "it answered in another protocol".into() }),
            Err(e) if is_closed(&e) => return Err(StoreError::Rejected { addr: addr.to_string() }),
            Err(e) => return Err(StoreError::Foreign { addr: addr.to_string(), what: format!("no answer to the handshake ({e})") }),
        }
        // The server proves it holds the token before we prove anything to it.
        let (s, server_proof) = match read_blob(&mut r).and_then(|s| Ok((s, read_blob(&mut r)?))) {
            Ok(x) => x,
            Err(e) if is_closed(&e) => return Err(StoreError::Rejected { addr: addr.to_string() }),
            Err(e) => return Err(io_err("hello", e)),
        };
        if !auth::verify(token, b"store-server", &[&c, &s], &server_proof) {
            return Err(StoreError::NotOurs { addr: addr.to_string() });
        }
        write_blob(&mut w, &auth::proof(token, b"store-client", &[&s, &c])).map_err(|e| io_err("hello", e))?;
        w.flush().map_err(|e| io_err("hello", e))?;
        match read_u8(&mut r) {
            Ok(1) => {}
            Ok(_) => return Err(StoreError::Rejected { addr: addr.to_string() }),
            Err(e) if is_closed(&e) => return Err(StoreError::Rejected { addr: addr.to_string() }),
            Err(e) => return Err(io_err("hello", e)),
        }
        Ok(Self { addr: addr.to_string(), conn: Mutex::new((r, w)), local_ip })
    }

    /// The local address this process uses to reach the store: the address peers on other
    /// hosts can reach us at (not a loopback address unless the master is local).
    pub fn local_ip(&self) -> std::net::IpAddr {
        self.local_ip
    }

    fn call<T>(
        &self,
        op: &'static str,
        wait: Duration,
        f: impl FnOnce(&mut BufReader<TcpStream>, &mut BufWriter<TcpStream>) -> std::io::Result<T>,
    ) -> Result<T, StoreError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let (r, w) = &mut *guard;
        r.get_ref().set_read_timeout(Some(wait + REPLY_SLACK)).map_err(|source| StoreError::Io { addr: self.addr.clone(), op, source })?;
        f(r, w).map_err(|source| StoreError::Io { addr: self.addr.clone(), op, source })
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.call("set", Duration::ZERO, |r, w| {
            write_u8(w, OP_SET)?;
            write_blob(w, key.as_bytes())?;
            write_blob(w, value)?;
            w.flush()?;
            read_u8(r).map(|_| ())
        })
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        let found = self.call("get", timeout, |r, w| {
            write_u8(w, OP_GET)?;
            write_blob(w, key.as_bytes())?;
            write_u64(w, millis(timeout))?;
            w.flush()?;
            match read_u8(r)? {
                0 => Ok(Some(read_blob(r)?)),
                _ => Ok(None),
            }
        })?;
        found.ok_or_else(|| StoreError::Timeout { keys: vec![key.to_string()], secs: timeout.as_secs_f64() })
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.call("add", Duration::ZERO, |r, w| {
            write_u8(w, OP_ADD)?;
            write_blob(w, key.as_bytes())?;
            write_i64(w, delta)?;
            w.flush()?;
            read_i64(r)
        })
    }

    fn wait(&self, keys: &[String], timeout: Duration) -> Result<(), StoreError> {
        let missing = self.call("wait", timeout, |r, w| {
            write_u8(w, OP_WAIT)?;
            write_u64(w, keys.len() as u64)?;
            for k in keys {
                write_blob(w, k.as_bytes())?;
            }
            write_u64(w, millis(timeout))?;
            w.flush()?;
            match read_u8(r)? {
                0 => Ok(vec![]),
                _ => {
                    let n = read_u64(r)? as usize;
                    (0..n).map(|_| read_string(r)).collect()
                }
            }
        })?;
        if missing.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Timeout { keys: missing, secs: timeout.as_secs_f64() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(token: &str) -> String {
        TcpStoreServer::start("127.0.0.1:0", token).unwrap().local_addr().to_string()
    }

    #[test]
    fn set_get_add_wait_over_tcp() {
        let addr = server("tok");
        let a = TcpStore::connect(&addr, "tok", Duration::from_secs(5)).unwrap();
        let b = TcpStore::connect(&addr, "tok", Duration::from_secs(5)).unwrap();
        let t = std::thread::spawn(move || b.get("late", Duration::from_secs(5)).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        a.set("late", b"hello").unwrap();
        assert_eq!(t.join().unwrap(), b"hello");
        assert_eq!(a.add("n", 1).unwrap(), 1);
        assert_eq!(a.add("n", 1).unwrap(), 2);
        a.wait(&["late".into(), "n".into()], Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn a_foreign_server_on_the_port_is_named_as_such_not_misread() {
        // An HTTP server's reply used to be read as a blob length ("blob of 5789751444030890300
        // bytes exceeds the limit").
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            std::thread::sleep(Duration::from_millis(200));
        });
        let err = TcpStore::connect(&addr, "tok", Duration::from_secs(5)).err().expect("a foreign server is refused");
        assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&addr) && text.contains("not a ringtrain store") && text.contains("--master-port"), "{text}");
    }

    #[test]
    fn wait_timeout_names_missing_keys() {
        let addr = server("tok");
        let a = TcpStore::connect(&addr, "tok", Duration::from_secs(5)).unwrap();
        a.set("present", b"").unwrap();
        let err = a.wait(&["present".into(), "absent".into()], Duration::from_millis(100)).unwrap_err();
        assert!(matches!(&err, StoreError::Timeout { keys, .. } if keys == &vec!["absent".to_string()]), "{err}");
        let err = a.get("nope", Duration::from_millis(100)).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn a_foreign_server_on_the_port_never_sees_the_token() {
        // Whatever holds the master port (here: a program that records what it is sent and
        // answers with junk) learns nothing: the client proves nothing until the server has.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let spy = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut seen = vec![0u8; 4096];
            let n = std::io::Read::read(&mut conn, &mut seen).unwrap_or(0);
            // It even imitates the protocol's opening, so the token check is what refuses it.
            let junk = HELLO_MAGIC
                .to_le_bytes()
                .iter()
                .chain(&[32u8, 0, 0, 0, 0, 0, 0, 0])
                .chain(&[7u8; 32])
                .chain(&[32u8, 0, 0, 0, 0, 0, 0, 0])
                .chain(&[9u8; 32])
                .copied()
                .collect::<Vec<u8>>();
            let _ = std::io::Write::write_all(&mut conn, &junk);
            let mut more = vec![0u8; 4096];
            let m = std::io::Read::read(&mut conn, &mut more).unwrap_or(0);
            seen.truncate(n);
            seen.extend_from_slice(&more[..m]);
            seen
        });
        let token = "a-secret-job-token-0123456789";
        let err = TcpStore::connect(&addr, token, Duration::from_secs(5)).err().expect("a foreign server is not our store");
        assert!(matches!(err, StoreError::NotOurs { .. }), "{err}");
        assert!(err.to_string().contains("nothing"), "{err}");
        let seen = spy.join().unwrap();
        assert!(!seen.is_empty());
        assert!(!seen.windows(token.len()).any(|w| w == token.as_bytes()), "the token crossed the wire");
    }

    #[test]
    fn wrong_token_is_refused_and_server_survives() {
        let addr = server("right");
        let err = TcpStore::connect(&addr, "wrong", Duration::from_secs(5)).err().expect("must be refused");
        assert!(matches!(err, StoreError::NotOurs { .. } | StoreError::Rejected { .. }), "{err}");
        let ok = TcpStore::connect(&addr, "right", Duration::from_secs(5)).unwrap();
        ok.set("k", b"v").unwrap();
    }

    #[test]
    fn connect_to_nothing_times_out_naming_the_address() {
        // Bind then drop to get a port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let err = TcpStore::connect(&addr, "t", Duration::from_millis(300)).err().unwrap();
        assert!(err.to_string().contains(&addr), "{err}");
    }
}
