//! Start of training: every rank must have built the same model (names, shapes, dtypes, in
//! order); then rank 0's parameters and buffers are broadcast so replicas start bit-identical.

use crate::comm::{CommError, Communicator};
use crate::wire::{fnv1a, FNV_OFFSET};
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum DdpError {
    #[error("model mismatch: {0}")]
    ModelMismatch(String),
    #[error("ddp: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// Parameter `i` got a second gradient in one synchronising backward (PyTorch: "marked ready
    /// twice"); `Ddp` names it.
    #[error("ddp: parameter #{0} was marked ready twice in one backward")]
    ReadyTwice(usize),
    /// An earlier collective failed midway: the replicas may differ.
    #[error("ddp: an earlier collective failed ({0}); the replicas may differ, so nothing more is computed or saved from them: restart from a checkpoint")]
    Poisoned(String),
}

fn describe(name: &str, t: &Tensor) -> String {
    format!("{name} {:?} {:?}", t.size(), t.kind())
}

/// Checks all ranks hold the same parameter list, then broadcasts rank 0's values.
pub fn sync_replicas(comm: &mut dyn Communicator, params: &[(String, Tensor)]) -> Result<(), DdpError> {
    let mine: Vec<String> = params.iter().map(|(n, t)| describe(n, t)).collect();
    let all = comm.all_gather(mine.join("\n").as_bytes())?;
    let reference: Vec<&str> = std::str::from_utf8(&all[0]).unwrap_or("").split('\n').filter(|s| !s.is_empty()).collect();
    for (rank, blob) in all.iter().enumerate().skip(1) {
        let theirs: Vec<&str> = std::str::from_utf8(blob).unwrap_or("").split('\n').filter(|s| !s.is_empty()).collect();
        if let Some(msg) = first_difference(&reference, &theirs) {
            return Err(DdpError::ModelMismatch(format!("rank 0 and rank {rank} built different models: {msg}")));
        }
    }
    tch::no_grad(|| -> Result<(), DdpError> {
        for (_, t) in params {
            // Parameters are contiguous leaf tensors; broadcasting into their storage updates
            // the model in place.
            let mut view = t.shallow_clone();
            comm.broadcast_tensor(&mut view, 0)?;
        }
        Ok(())
    })
}

/// Describes the first position where two parameter lists differ.
pub fn first_difference(a: &[&str], b: &[&str]) -> Option<String> {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y {
            return Some(format!("parameter #{i}: `{x}` vs `{y}`"));
        }
    }
    match a.len().cmp(&b.len()) {
        std::cmp::Ordering::Equal => None,
        _ => Some(format!("{} parameters vs {}", a.len(), b.len())),
    }
}

/// FNV-1a over every parameter's bytes in order: equal hashes mean bitwise-equal replicas.
pub fn parameter_hash(params: &[(String, Tensor)]) -> Result<u64, tch::TchError> {
    params.iter().try_fold(FNV_OFFSET, |h, (name, t)| hash_tensor(h, name, t))
}

/// `parameter_hash`'s step: `h` extended by one named tensor.
pub fn hash_tensor(h: u64, name: &str, t: &Tensor) -> Result<u64, tch::TchError> {
    let t = t.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut bytes = vec![0u8; n];
    t.f_copy_data_u8(&mut bytes, t.numel())?;
    Ok(fnv1a(fnv1a(h, name.as_bytes()), &bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_difference_names_position() {
        assert_eq!(first_difference(&["a", "b"], &["a", "b"]), None);
        assert!(first_difference(&["a", "b"], &["a", "c"]).unwrap().contains("#1"));
        assert!(first_difference(&["a"], &["a", "b"]).unwrap().contains("1 parameters vs 2"));
    }
}
