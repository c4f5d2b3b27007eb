//! Checkpoints from a group of ranks: rank 0 writes (or reads), and every rank learns the outcome
//! before any goes on, so a failed write stops every rank with rank 0's reason and a checkpoint
//! read on rank 0 reaches ranks on other nodes without a shared disk.

use super::stream::Entry;
use super::write::Pending;
use super::*;
use crate::comm::{broadcast_blob, CommHandle, Communicator};
use std::path::Path;
use tch::{Kind, Tensor};

/// Writes `data` from rank 0 under `dir` (a checkpoints folder), keeping the newest `keep`;
/// every rank returns the new folder, or rank 0's error.
pub fn save_shared(comm: &mut dyn Communicator, dir: &Path, keep: usize, data: CheckpointData<'_>) -> Result<PathBuf, CheckpointError> {
    let mine = (comm.rank() == 0).then(|| match write(dir, data, keep) {
        Ok(p) => format!("ok:{}", p.display()),
        Err(e) => format!("err:{e}"),
    });
    outcome(comm, mine)
}

/// Where a streamed checkpoint's tensors go: on rank 0 into the files being written, elsewhere
/// nowhere. A write that fails is remembered and the rest are skipped, so that rank 0 goes on
/// taking part in the collectives that produce the tensors and no rank waits for it.
pub struct Sink {
    pending: Option<Pending>,
    error: Option<CheckpointError>,
}

impl Sink {
    /// One tensor of `model.safetensors` (ignored where nothing is written).
    pub fn model(&mut self, name: &str, t: &Tensor) {
        if let (Some(p), None) = (self.pending.as_mut(), &self.error) {
            self.error = p.model(name, t).err();
        }
    }

    /// One tensor of `optimizer.safetensors`.
    pub fn optimizer(&mut self, name: &str, t: &Tensor) {
        if let (Some(p), None) = (self.pending.as_mut(), &self.error) {
            self.error = p.optimizer(name, t).err();
        }
    }
}

/// Writes a checkpoint from rank 0 whose tensors `feed` streams in, keeping the newest `keep`
/// under `dir`: `model` and `optimizer` list what the files will hold, and `feed` runs on every
/// rank (under ZeRO it gathers the state piece by piece, a collective, and only rank 0's sink
/// writes). Every rank returns the new folder, or rank 0's error.
pub fn save_streamed<E: From<CheckpointError>>(
    comm: &CommHandle,
    dir: &Path,
    keep: usize,
    meta: Meta,
    model: &[Entry],
    optimizer: &[Entry],
    feed: impl FnOnce(&mut Sink) -> Result<(), E>,
) -> Result<PathBuf, E> {
    let rank = comm.lock().rank();
    let mut sink = Sink { pending: None, error: None };
    if rank == 0 {
        match begin(dir, meta, model, optimizer) {
            Ok(p) => sink.pending = Some(p),
            Err(e) => sink.error = Some(e),
        }
    }
    feed(&mut sink)?;
    let mine = (rank == 0).then(|| {
        let written = match (sink.error.take(), sink.pending.take()) {
            (Some(e), _) => Err(e),
            (None, Some(p)) => p.commit(keep),
            (None, None) => unreachable!("rank 0 began a checkpoint or kept why not"),
        };
        match written {
            Ok(p) => format!("ok:{}", p.display()),
            Err(e) => format!("err:{e}"),
        }
    });
    Ok(outcome(&mut *comm.lock(), mine)?)
}

/// Rank 0's outcome of a write (`ok:<folder>` or `err:<reason>`) to every rank.
fn outcome(comm: &mut dyn Communicator, mine: Option<String>) -> Result<PathBuf, CheckpointError> {
    let status = String::from_utf8_lossy(&broadcast_blob(comm, 0, mine.as_deref().map(str::as_bytes))?).into_owned();
    match status.split_once(':') {
        Some(("ok", path)) => Ok(PathBuf::from(path)),
        Some(("err", e)) => Err(CheckpointError::Rank0(format!("rank 0 could not write a checkpoint: {e}"))),
        _ => Err(CheckpointError::Rank0(format!("bad checkpoint status from rank 0: {status:?}"))),
    }
}

/// The newest usable checkpoint under `dir` (a checkpoints folder), read and verified by rank 0
/// and broadcast to every rank; `None` when there is none. Tensors come back on `device`.
pub fn load_shared(comm: &mut dyn Communicator, dir: &Path, device: tch::Device) -> Result<Option<LoadedCheckpoint>, CheckpointError> {
    let mut found: Option<LoadedCheckpoint> = None;
    let header = (comm.rank() == 0).then(|| {
        let answer = match find_resumable(dir) {
            Ok((c, skipped)) => {
                for reason in skipped {
                    tracing::warn!("skipping unusable checkpoint: {reason}");
                }
                found = c;
                Ok(found.as_ref().map(|c| {
                    serde_json::json!({
                        "path": c.path, "meta": c.meta,
                        "model": describe(&c.model), "optimizer": describe(&c.optimizer),
                    })
                }))
            }
            Err(e) => Err(e.to_string()),
        };
        serde_json::to_vec(&answer).expect("serialisable")
    });
    let blob = broadcast_blob(comm, 0, header.as_deref())?;
    let answer: Result<Option<serde_json::Value>, String> =
        serde_json::from_slice(&blob).map_err(|e| CheckpointError::Rank0(format!("bad checkpoint header from rank 0: {e}")))?;
    let Some(h) = answer.map_err(CheckpointError::Rank0)? else { return Ok(None) };
    let bad = |what: &str| CheckpointError::Rank0(format!("bad checkpoint header from rank 0: {what}"));
    let meta: Meta = serde_json::from_value(h["meta"].clone()).map_err(|e| bad(&e.to_string()))?;
    let path: PathBuf = serde_json::from_value(h["path"].clone()).map_err(|e| bad(&e.to_string()))?;
    let (model, optimizer) = match found {
        Some(c) => (c.model, c.optimizer),
        None => (allocate(&h["model"]).ok_or_else(|| bad("model"))?, allocate(&h["optimizer"]).ok_or_else(|| bad("optimizer"))?),
    };
    let model = broadcast_all(comm, model, device)?;
    let optimizer = broadcast_all(comm, optimizer, device)?;
    Ok(Some(LoadedCheckpoint { path, meta, model, optimizer }))
}

fn kind_name(k: Kind) -> String {
    format!("{k:?}")
}

fn kind_from(name: &str) -> Option<Kind> {
    [Kind::Float, Kind::Double, Kind::Half, Kind::BFloat16, Kind::Int64, Kind::Int, Kind::Int16, Kind::Int8, Kind::Uint8, Kind::Bool]
        .into_iter()
        .find(|k| kind_name(*k) == name)
}

fn describe(tensors: &[(String, Tensor)]) -> serde_json::Value {
    tensors.iter().map(|(n, t)| serde_json::json!([n, t.size(), kind_name(t.kind())])).collect()
}

fn allocate(list: &serde_json::Value) -> Option<Vec<(String, Tensor)>> {
    list.as_array()?
        .iter()
        .map(|e| {
            let name = e[0].as_str()?.to_string();
            let shape: Vec<i64> = serde_json::from_value(e[1].clone()).ok()?;
            let kind = kind_from(e[2].as_str()?)?;
            Some((name, Tensor::zeros(shape.as_slice(), (kind, tch::Device::Cpu))))
        })
        .collect()
}

/// Rank 0's tensors to every rank, in order; on the backend's device when it reduces device
/// memory itself (NCCL), else through host memory.
fn broadcast_all(
    comm: &mut dyn Communicator,
    tensors: Vec<(String, Tensor)>,
    device: tch::Device,
) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let wire = if comm.device_native() { device } else { tch::Device::Cpu };
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let torch = |source| CheckpointError::Torch { path: PathBuf::from(&name), source };
        let mut t = t.f_to_device(wire).and_then(|t| t.f_contiguous()).map_err(torch)?;
        comm.broadcast_tensor(&mut t, 0)?;
        let t = t.f_to_device(device).map_err(torch)?;
        out.push((name, t));
    }
    Ok(out)
}
