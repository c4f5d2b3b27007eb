//! A safetensors file written one tensor at a time, in any order: the header (every tensor's
//! name, dtype, shape and place) is written first, from the list of what will come, and each
//! tensor's bytes go straight to their place as it arrives. A writer holds no tensor, so a
//! ZeRO-3 rank can write a model that is never whole in its memory, gathered one bucket at a
//! time. The bytes are exactly those `Tensor::write_safetensors` writes for the same tensors
//! (the safetensors crate's order: dtype, widest first, then name), so files do not depend on
//! how they were written.

use super::{CheckpointError, PathBuf};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use tch::{Kind, Tensor};

/// What one tensor of the file will be.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    pub shape: Vec<i64>,
}

impl Entry {
    pub fn of(name: &str, t: &Tensor) -> Entry {
        Entry { name: name.to_string(), kind: t.kind(), shape: t.size() }
    }
}

/// A safetensors file being written.
pub struct StreamedFile {
    file: File,
    path: PathBuf,
    /// Name → (byte offset in the file, entry, written yet).
    places: HashMap<String, (u64, Entry, bool)>,
}

/// The kinds a safetensors file holds, with their dtypes.
const DTYPES: [(Kind, safetensors::Dtype); 10] = {
    use safetensors::Dtype as D;
    [
        (Kind::Float, D::F32),
        (Kind::Double, D::F64),
        (Kind::Half, D::F16),
        (Kind::BFloat16, D::BF16),
        (Kind::Int64, D::I64),
        (Kind::Int, D::I32),
        (Kind::Int16, D::I16),
        (Kind::Int8, D::I8),
        (Kind::Uint8, D::U8),
        (Kind::Bool, D::BOOL),
    ]
};

fn dtype(kind: Kind) -> Option<safetensors::Dtype> {
    DTYPES.iter().find(|(k, _)| *k == kind).map(|&(_, d)| d)
}

fn kind_of(dtype: safetensors::Dtype) -> Option<Kind> {
    DTYPES.iter().find(|(_, d)| *d == dtype).map(|&(k, _)| k)
}

impl StreamedFile {
    /// Creates `path` with the header for `entries` and room for their bytes.
    pub fn create(path: &Path, entries: &[Entry]) -> Result<StreamedFile, CheckpointError> {
        let invalid = |what: String| CheckpointError::Invalid { path: path.to_path_buf(), what };
        let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
        let mut sorted = Vec::with_capacity(entries.len());
        for e in entries {
            let d = dtype(e.kind)
                .ok_or_else(|| invalid(format!("tensor `{}` has kind {:?}, which safetensors cannot hold", e.name, e.kind)))?;
            sorted.push((d, e));
        }
        // The safetensors crate's order (its `prepare`): dtype descending, then name.
        sorted.sort_by(|(ld, le), (rd, re)| rd.cmp(ld).then(le.name.cmp(&re.name)));
        if let Some(w) = sorted.windows(2).find(|w| w[0].1.name == w[1].1.name) {
            return Err(invalid(format!("tensor `{}` is listed twice", w[0].1.name)));
        }
        // The header as the crate serialises its `Metadata`: a JSON map in that order, each
        // value `{"dtype":…,"shape":[…],"data_offsets":[start,end]}`, padded to 8 bytes.
        let mut header = String::from("{");
        let mut offset = 0usize;
        let mut starts = Vec::with_capacity(sorted.len());
        for (i, (d, e)) in sorted.iter().enumerate() {
            let n = e.shape.iter().product::<i64>() as usize * d.size();
            let info = safetensors::tensor::TensorInfo {
                dtype: *d,
                shape: e.shape.iter().map(|&s| s as usize).collect(),
                data_offsets: (offset, offset + n),
            };
            if i > 0 {
                header.push(',');
            }
            header.push_str(&serde_json::to_string(&e.name).expect("a string serialises"));
            header.push(':');
            header.push_str(&serde_json::to_string(&info).expect("tensor info serialises"));
            starts.push(offset);
            offset += n;
        }
        header.push('}');
        header.push_str(&" ".repeat((8 - header.len() % 8) % 8));
        let data_start = 8 + header.len() as u64;
        let mut file = File::create(path).map_err(io)?;
        file.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
        file.write_all(header.as_bytes()).map_err(io)?;
        file.set_len(data_start + offset as u64).map_err(io)?;
        let places = sorted.iter().zip(starts).map(|((_, e), s)| (e.name.clone(), (data_start + s as u64, (*e).clone(), false))).collect();
        Ok(StreamedFile { file, path: path.to_path_buf(), places })
    }

    /// Writes tensor `name` (listed at `create`, with this kind and shape) into its place.
    pub fn put(&mut self, name: &str, t: &Tensor) -> Result<(), CheckpointError> {
        let invalid = |what: String| CheckpointError::Invalid { path: self.path.clone(), what };
        let Some((at, entry, written)) = self.places.get_mut(name) else {
            return Err(invalid(format!("tensor `{name}` was not listed in the header")));
        };
        if *written {
            return Err(invalid(format!("tensor `{name}` written twice")));
        }
        if t.kind() != entry.kind || t.size() != entry.shape {
            return Err(invalid(format!(
                "tensor `{name}` is {:?} {:?}, but the header says {:?} {:?}",
                t.kind(),
                t.size(),
                entry.kind,
                entry.shape
            )));
        }
        let torch = |source| CheckpointError::Torch { path: PathBuf::from(name), source };
        let host = t.f_detach().and_then(|t| t.f_to_device(tch::Device::Cpu)).and_then(|t| t.f_contiguous()).map_err(torch)?;
        let len = host.numel() * host.kind().elt_size_in_bytes();
        // An empty tensor has no bytes (and libtorch gives it a null data pointer).
        if len > 0 {
            // SAFETY: `host` is a contiguous CPU tensor of `len` > 0 bytes (a non-null data
            // pointer) that outlives the slice.
            let bytes = unsafe { std::slice::from_raw_parts(host.data_ptr() as *const u8, len) };
            self.file.write_all_at(bytes, *at).map_err(|source| CheckpointError::Io { path: self.path.clone(), source })?;
        }
        *written = true;
        Ok(())
    }

    /// Checks that every listed tensor was written, flushes the file to disk and returns its
    /// SHA-256 (read back: the bytes arrived out of order).
    pub fn finish(self) -> Result<String, CheckpointError> {
        let io = |source| CheckpointError::Io { path: self.path.clone(), source };
        let mut missing: Vec<&str> = self.places.iter().filter(|(_, p)| !p.2).map(|(n, _)| n.as_str()).collect();
        if !missing.is_empty() {
            missing.sort();
            return Err(CheckpointError::Invalid {
                path: self.path.clone(),
                what: format!("tensors never written: {}", missing.join(", ")),
            });
        }
        self.file.sync_all().map_err(io)?;
        sha256_of(&self.path).map_err(io)
    }
}

/// A safetensors file read one tensor at a time: the header is parsed at `open`, and each
/// tensor's bytes are read straight into a tensor of its own when asked for, so reading never
/// holds the file's bytes beside the tensors made from them.
pub struct SafetensorsReader {
    file: File,
    path: PathBuf,
    /// In the file's order: name, kind, shape, byte offset in the file, byte length.
    entries: Vec<(String, Kind, Vec<i64>, u64, usize)>,
}

impl SafetensorsReader {
    /// Opens `path` and checks its header: every tensor's kind and shape agree with its byte
    /// range, and the ranges lie inside the file.
    pub fn open(path: &Path) -> Result<SafetensorsReader, CheckpointError> {
        let invalid = |what: String| CheckpointError::Invalid { path: path.to_path_buf(), what };
        let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0).map_err(|_| invalid("shorter than a safetensors header".into()))?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 || 8 + n > size {
            return Err(invalid(format!("a safetensors header of {n} bytes does not fit a file of {size}")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8).map_err(io)?;
        let mut map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| invalid(format!("safetensors header: {e}")))?;
        map.remove("__metadata__");
        let data_start = 8 + n;
        let mut entries = Vec::with_capacity(map.len());
        for (name, v) in map {
            let info: safetensors::tensor::TensorInfo =
                serde_json::from_value(v).map_err(|e| invalid(format!("safetensors header, tensor `{name}`: {e}")))?;
            let kind = kind_of(info.dtype).ok_or_else(|| invalid(format!("tensor `{name}` has dtype {:?}", info.dtype)))?;
            let (a, b) = info.data_offsets;
            let elems: usize = info.shape.iter().product();
            if b < a || b - a != elems * info.dtype.size() || data_start + b as u64 > size {
                return Err(invalid(format!("tensor `{name}`: bytes {a}..{b} do not hold shape {:?} or lie outside the file", info.shape)));
            }
            entries.push((name, kind, info.shape.iter().map(|&d| d as i64).collect(), data_start + a as u64, b - a));
        }
        entries.sort_by_key(|e| e.3);
        Ok(SafetensorsReader { file, path: path.to_path_buf(), entries })
    }

    /// The tensors' names, in the file's order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.0.clone()).collect()
    }

    /// Tensor `name`, read from the file into a tensor of its own (on the CPU).
    pub fn read(&self, name: &str) -> Result<Tensor, CheckpointError> {
        let (_, kind, shape, at, len) = self
            .entries
            .iter()
            .find(|e| e.0 == name)
            .ok_or_else(|| CheckpointError::Invalid { path: self.path.clone(), what: format!("no tensor `{name}`") })?;
        let t = Tensor::f_empty(shape.as_slice(), (*kind, tch::Device::Cpu))
            .map_err(|source| CheckpointError::Torch { path: self.path.clone(), source })?;
        if *len > 0 {
            // SAFETY: a fresh contiguous CPU tensor of exactly `len` > 0 bytes, which nothing
            // else references while it is filled.
            let bytes = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, *len) };
            self.file.read_exact_at(bytes, *at).map_err(|source| CheckpointError::Io { path: self.path.clone(), source })?;
        }
        Ok(t)
    }

    /// Every tensor, in the file's order.
    pub fn read_all(&self) -> Result<Vec<(String, Tensor)>, CheckpointError> {
        self.entries.iter().map(|e| Ok((e.0.clone(), self.read(&e.0)?))).collect()
    }
}

/// SHA-256 of a file, read in pieces.
pub fn sha256_of(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_equal_libtorchs_writer_whatever_the_order_of_arrival() {
        let d = tempfile::tempdir().unwrap();
        let tensors = vec![
            ("b.weight".to_string(), Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([3, 4])),
            ("a.bias".to_string(), Tensor::from_slice(&[1.5f32, -2.0])),
            ("steps".to_string(), Tensor::from_slice(&[7i64])),
            ("z.\"odd\" name".to_string(), Tensor::ones([2, 1, 2], (Kind::BFloat16, tch::Device::Cpu))),
            ("empty".to_string(), Tensor::zeros([0], (Kind::Float, tch::Device::Cpu))),
        ];
        let reference = d.path().join("ref.safetensors");
        Tensor::write_safetensors(&tensors, &reference).unwrap();
        let path = d.path().join("streamed.safetensors");
        let entries: Vec<Entry> = tensors.iter().map(|(n, t)| Entry::of(n, t)).collect();
        let mut f = StreamedFile::create(&path, &entries).unwrap();
        for (n, t) in tensors.iter().rev() {
            f.put(n, t).unwrap();
        }
        let digest = f.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes, std::fs::read(&reference).unwrap());
        assert_eq!(digest, crate::checkpoint::sha256_hex(&bytes));
        // Read back one at a time: the same tensors, bit for bit.
        let r = SafetensorsReader::open(&path).unwrap();
        assert_eq!(r.names().len(), tensors.len());
        for (n, t) in &tensors {
            let back = r.read(n).unwrap();
            assert_eq!((back.kind(), back.size()), (t.kind(), t.size()), "{n}");
            assert!(back.to_kind(Kind::Double).equal(&t.to_kind(Kind::Double)), "{n}");
        }
        assert!(r.read("nothing").is_err());
    }

    #[test]
    fn a_header_that_does_not_fit_its_file_is_an_error_not_a_huge_allocation() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.safetensors");
        Tensor::write_safetensors(&[("a", Tensor::ones([4], (Kind::Float, tch::Device::Cpu)))], &path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 4);
        std::fs::write(&path, &bytes).unwrap();
        assert!(SafetensorsReader::open(&path).err().unwrap().to_string().contains("outside the file"));
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert!(SafetensorsReader::open(&path).err().unwrap().to_string().contains("does not fit"));
    }

    #[test]
    fn a_tensor_missing_twice_or_of_another_shape_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let a = Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu));
        let entries = vec![Entry::of("a", &a), Entry::of("b", &a)];
        let mut f = StreamedFile::create(&d.path().join("x"), &entries).unwrap();
        f.put("a", &a).unwrap();
        assert!(f.put("a", &a).unwrap_err().to_string().contains("written twice"));
        assert!(f.put("c", &a).unwrap_err().to_string().contains("not listed"));
        assert!(f.put("b", &a.view([3, 2])).unwrap_err().to_string().contains("header says"));
        assert!(f.finish().unwrap_err().to_string().contains("never written: b"));
        let twice = vec![Entry::of("a", &a), Entry::of("a", &a)];
        assert!(StreamedFile::create(&d.path().join("y"), &twice).err().unwrap().to_string().contains("listed twice"));
    }
}
