//! Little-endian framing shared by the store protocol and the ring handshake, and the hash ranks
//! compare what they hold with.

use std::io::{self, Read, Write};

/// Longest key or value the store accepts; a peer announcing more is corrupt or hostile.
pub const MAX_BLOB_BYTES: usize = 64 << 20;

pub fn write_u8(w: &mut impl Write, v: u8) -> io::Result<()> {
    w.write_all(&[v])
}

pub fn write_u64(w: &mut impl Write, v: u64) -> io::Result<()> {
    w.write_all(&v.to_le_bytes())
}

pub fn write_i64(w: &mut impl Write, v: i64) -> io::Result<()> {
    w.write_all(&v.to_le_bytes())
}

pub fn write_blob(w: &mut impl Write, b: &[u8]) -> io::Result<()> {
    write_u64(w, b.len() as u64)?;
    w.write_all(b)
}

pub fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

pub fn read_i64(r: &mut impl Read) -> io::Result<i64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(i64::from_le_bytes(b))
}

pub fn read_blob(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let n = read_u64(r)? as usize;
    if n > MAX_BLOB_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("blob of {n} bytes exceeds the limit")));
    }
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)?;
    Ok(b)
}

pub fn read_string(r: &mut impl Read) -> io::Result<String> {
    String::from_utf8(read_blob(r)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// True for the errors a socket read/write returns when its timeout expires.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// True for the errors that mean the other side has gone away.
pub fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
    )
}

/// FNV-1a's starting value.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Continues an FNV-1a hash `h` over `bytes`: small, dependency-free, and the same everywhere,
/// which is all comparing replicas, configs or tokens across ranks needs.
pub fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}
