//! Writing a checkpoint atomically, then pruning old ones.

use super::*;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use tch::Tensor;

pub struct CheckpointData<'a> {
    pub meta: Meta,
    pub model: &'a [(String, Tensor)],
    pub optimizer: Vec<(String, Tensor)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn safetensors_bytes(tensors: &[(String, Tensor)], scratch: &Path) -> Result<Vec<u8>, CheckpointError> {
    let detached: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu))).collect();
    Tensor::write_safetensors(&detached, scratch).map_err(|source| match source {
        // A full disk comes back as safetensors' IoError, whose Display is a debug dump.
        tch::TchError::SafeTensorError { err: safetensors::SafeTensorError::IoError(e), .. } => io(scratch)(e),
        tch::TchError::Io(e) => io(scratch)(e),
        source => CheckpointError::Torch { path: scratch.to_path_buf(), source },
    })?;
    let bytes = std::fs::read(scratch).map_err(io(scratch))?;
    std::fs::remove_file(scratch).map_err(io(scratch))?;
    Ok(bytes)
}

/// Writes `data` under `dir` (the checkpoints folder), updates `latest`, keeps the newest `keep`.
/// Returns the new checkpoint's folder.
pub fn write(dir: &Path, data: CheckpointData<'_>, keep: usize) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    remove_stale_temporaries(dir);
    let name = data.meta.dir_name();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let latest_tmp = dir.join(format!(".{LATEST_FILE}.tmp-{}", std::process::id()));
    let written = write_into(dir, data, keep, &name, &tmp, &latest_tmp);
    if written.is_err() {
        // A failed write (a full disk) leaves nothing behind to fill the disk further.
        let _ = std::fs::remove_dir_all(&tmp);
        let _ = std::fs::remove_file(&latest_tmp);
    }
    written
}

/// Removes what an earlier process's failed or killed write left (`.…tmp-<pid>` of a process
/// that no longer runs).
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-")).and_then(|(_, p)| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let p = e.path();
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
}

fn write_into(
    dir: &Path,
    data: CheckpointData<'_>,
    keep: usize,
    name: &str,
    tmp: &Path,
    latest_tmp: &Path,
) -> Result<PathBuf, CheckpointError> {
    let final_dir = dir.join(name);
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(io(tmp))?;
    }
    std::fs::create_dir(tmp).map_err(io(tmp))?;

    let model = safetensors_bytes(data.model, &tmp.join("model.tmp"))?;
    let optimizer = safetensors_bytes(&data.optimizer, &tmp.join("optimizer.tmp"))?;
    let meta = serde_json::to_vec_pretty(&data.meta).expect("meta serialises");
    let mut sums = String::new();
    for (file, bytes) in [(MODEL_FILE, &model), (OPTIMIZER_FILE, &optimizer), (META_FILE, &meta)] {
        write_synced(&tmp.join(file), bytes)?;
        sums.push_str(&format!("{}  {file}\n", sha256_hex(bytes)));
    }
    write_synced(&tmp.join(CHECKSUMS_FILE), sums.as_bytes())?;
    sync_dir(tmp)?;

    // A restarted run may write the same step again; the new one replaces it.
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(tmp, &final_dir).map_err(io(&final_dir))?;
    write_synced(latest_tmp, format!("{name}\n").as_bytes())?;
    std::fs::rename(latest_tmp, dir.join(LATEST_FILE)).map_err(io(dir))?;
    sync_dir(dir)?;
    prune(dir, keep, name)?;
    Ok(final_dir)
}

/// Deletes all but the newest `keep` checkpoints (never `current`).
fn prune(dir: &Path, keep: usize, current: &str) -> Result<(), CheckpointError> {
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            step_of(&name).map(|s| (s, e.path()))
        })
        .collect();
    steps.sort_by(|a, b| b.0.cmp(&a.0));
    for (_, path) in steps.into_iter().skip(keep.max(1)) {
        if path.file_name().is_some_and(|n| n == current) {
            continue;
        }
        std::fs::remove_dir_all(&path).map_err(io(&path))?;
    }
    Ok(())
}
