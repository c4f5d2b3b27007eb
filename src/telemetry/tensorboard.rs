//! TensorBoard event files, written by hand: TFRecord framing (length, masked CRC-32C of the
//! length, the record, masked CRC-32C of the record) around `tensorflow.Event` protobufs with scalar
//! summaries. Why not a crate: the maintained ones (`tensorboard-rs`) pull in a protobuf code
//! generator and image stack for what is three message types and a CRC; the framing and the CRCs
//! are checked by TensorBoard's own reader in the tests.
//!
//! One file per start of a run (`<run dir>/tb/events.out.tfevents.<secs>.<host>.<pid>`). Each
//! file begins with a `SessionLog.START` at the first step it will log (the resumed step + 1, or 1
//! for a fresh start): TensorBoard then drops what earlier starts logged from that step on (work
//! lost to a crash, or an older run in the same directory), so no step appears twice.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

/// CRC-32C (Castagnoli), bitwise table built once.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// TFRecord's masked CRC.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field.
fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    varint(out, ((field << 3) | 2) as u64);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), <body> }`.
fn event(wall_time: f64, step: i64, body: &[u8]) -> Vec<u8> {
    let mut e = vec![0x09];
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10);
    varint(&mut e, step as u64);
    e.extend_from_slice(body);
    e
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// A new event file under `dir`; `resumed_at`: the global step a resumed run continues from
    /// (a fresh start is 0: it replaces the curves of an earlier run in the same directory).
    pub fn create(dir: &Path, resumed_at: Option<u64>) -> std::io::Result<EventWriter> {
        let resumed_at = Some(resumed_at.unwrap_or(0));
        std::fs::create_dir_all(dir)?;
        let mut host = [0u8; 256];
        // SAFETY: gethostname writes at most host.len() bytes.
        unsafe { libc::gethostname(host.as_mut_ptr() as *mut libc::c_char, host.len()) };
        let host = String::from_utf8_lossy(&host[..host.iter().position(|&b| b == 0).unwrap_or(0)]).into_owned();
        let path = dir.join(format!("events.out.tfevents.{:010}.{host}.{}", now() as u64, std::process::id()));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let mut w = EventWriter { file: BufWriter::new(file), path };
        // file_version = 3 (string)
        let mut version = Vec::new();
        bytes_field(&mut version, 3, b"brain.Event:2");
        w.record(&event(now(), 0, &version))?;
        if let Some(step) = resumed_at {
            // session_log = 7: SessionLog { status = 1: START (1) }
            let mut log = Vec::new();
            bytes_field(&mut log, 7, &[0x08, 0x01]);
            w.record(&event(now(), step as i64 + 1, &log))?;
        }
        w.file.flush()?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes())?;
        self.file.write_all(data)?;
        self.file.write_all(&masked_crc(data).to_le_bytes())
    }

    /// Scalars at `step`: one event with a `Summary { value { tag, simple_value } … }`.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> std::io::Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values.iter().filter(|(_, v)| v.is_finite()) {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, tag.as_bytes());
            value.push(0x15); // simple_value = 2 (float)
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            bytes_field(&mut summary, 1, &value);
        }
        let mut body = Vec::new();
        bytes_field(&mut body, 5, &summary);
        self.record(&event(now(), step as i64, &body))?;
        self.file.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn records_are_framed() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), Some(9)).unwrap();
        w.scalars(10, &[("train/loss".into(), 1.5), ("nan".into(), f64::NAN)]).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut at = 0;
        let mut records = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc(data));
            at += 16 + len;
            records += 1;
        }
        assert_eq!(records, 3, "version, session start, scalars");
        assert!(String::from_utf8_lossy(&bytes).contains("train/loss") && !String::from_utf8_lossy(&bytes).contains("nan"));
    }
}
