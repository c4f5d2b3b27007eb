//! A ring link: TCP between nodes, a Unix stream socket between ranks on the same node (about
//! twice TCP loopback's bandwidth here, and no network stack). Unix sockets use Linux's abstract
//! namespace, so nothing is left on disk after a crash.

use super::shm::ShmLink;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::time::{Duration, Instant};

pub enum Link {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// One direction of a shared-memory ring (same node), set up over the Unix link.
    Shm(ShmLink),
}

impl Link {
    pub fn try_clone(&self) -> io::Result<Link> {
        Ok(match self {
            Link::Tcp(s) => Link::Tcp(s.try_clone()?),
            Link::Unix(s) => Link::Unix(s.try_clone()?),
            Link::Shm(s) => Link::Shm(s.try_clone()),
        })
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Link::Tcp(s) => s.shutdown(Shutdown::Both),
            Link::Unix(s) => s.shutdown(Shutdown::Both),
            Link::Shm(s) => {
                s.shutdown();
                Ok(())
            }
        };
    }

    pub fn configure(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Link::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
            Link::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
            // Its timeout was fixed when it was made.
            Link::Shm(_) => Ok(()),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Link::Tcp(_) => "tcp",
            Link::Unix(_) => "unix",
            Link::Shm(_) => "shm",
        }
    }

    /// Turns this same-node Unix link into a shared-memory one: the sending side (`to_next`)
    /// makes the segment and hands it over; the receiving side (`from_prev`) takes it.
    pub fn upgrade_to_shm(self, sending: bool, name: &str, timeout: Duration) -> io::Result<Link> {
        match self {
            Link::Unix(s) if sending => Ok(Link::Shm(ShmLink::offer(&s, name, timeout)?)),
            Link::Unix(s) => Ok(Link::Shm(ShmLink::accept(&s, timeout)?)),
            other => Ok(other),
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.read(buf),
            Link::Unix(s) => s.read(buf),
            Link::Shm(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.write(buf),
            Link::Unix(s) => s.write(buf),
            Link::Shm(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a rank listens, as published in the store: `tcp=IP:PORT node=ID [unix=NAME]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub tcp: SocketAddr,
    pub node: String,
    pub unix: Option<String>,
}

impl Endpoint {
    pub fn encode(&self) -> String {
        let mut s = format!("tcp={} node={}", self.tcp, self.node);
        if let Some(u) = &self.unix {
            s.push_str(&format!(" unix={u}"));
        }
        s
    }

    pub fn decode(s: &str) -> Option<Endpoint> {
        let (mut tcp, mut node, mut unix) = (None, None, None);
        for part in s.split(' ') {
            match part.split_once('=')? {
                ("tcp", v) => tcp = v.parse().ok(),
                ("node", v) => node = Some(v.to_string()),
                ("unix", v) => unix = Some(v.to_string()),
                _ => return None,
            }
        }
        Some(Endpoint { tcp: tcp?, node: node?, unix })
    }
}

pub struct Listener {
    tcp: TcpListener,
    unix: Option<UnixListener>,
    pub endpoint: Endpoint,
}

impl Listener {
    /// Listens on TCP at `ip`, and on the abstract Unix socket `unix_name` when given.
    pub fn bind(ip: IpAddr, node: &str, unix_name: Option<String>) -> io::Result<Listener> {
        let tcp = TcpListener::bind((ip, 0))?;
        tcp.set_nonblocking(true)?;
        let unix = match &unix_name {
            Some(name) => {
                let l = UnixListener::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let endpoint = Endpoint { tcp: tcp.local_addr()?, node: node.to_string(), unix: unix_name };
        Ok(Listener { tcp, unix, endpoint })
    }

    /// Accepts the next connection on either socket, or `None` at the deadline. Returns the link
    /// and a description of where it came from.
    pub fn accept_until(&self, deadline: Instant) -> io::Result<Option<(Link, String)>> {
        loop {
            match self.tcp.accept() {
                Ok((s, from)) => return Ok(Some((Link::Tcp(s), from.to_string()))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if let Some(u) = &self.unix {
                match u.accept() {
                    Ok((s, _)) => return Ok(Some((Link::Unix(s), "a local unix socket".into()))),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Connects to `to`, over Unix when both ranks are on the same node and it listens there.
pub fn connect_until(to: &Endpoint, my_node: &str, deadline: Instant) -> io::Result<Link> {
    loop {
        let attempt = match &to.unix {
            Some(name) if to.node == my_node => {
                UnixAddr::from_abstract_name(name.as_bytes()).and_then(|a| UnixStream::connect_addr(&a)).map(Link::Unix)
            }
            _ => TcpStream::connect_timeout(&to.tcp, Duration::from_secs(2)).map(Link::Tcp),
        };
        match attempt {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_roundtrip() {
        let e = Endpoint { tcp: "10.0.0.1:5000".parse().unwrap(), node: "n0".into(), unix: Some("rt-abc-1".into()) };
        assert_eq!(Endpoint::decode(&e.encode()), Some(e.clone()));
        let t = Endpoint { unix: None, ..e };
        assert_eq!(Endpoint::decode(&t.encode()), Some(t));
        assert_eq!(Endpoint::decode("junk"), None);
    }
}
