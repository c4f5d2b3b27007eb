//! Writing a checkpoint atomically (tensors streamed into their files), then pruning old ones.

use super::stream::{Entry, StreamedFile};
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

/// Writes `data` under `dir` (the checkpoints folder), updates `latest`, keeps the newest `keep`.
/// Returns the new checkpoint's folder.
pub fn write(dir: &Path, data: CheckpointData<'_>, keep: usize) -> Result<PathBuf, CheckpointError> {
    let model: Vec<Entry> = data.model.iter().map(|(n, t)| Entry::of(n, t)).collect();
    let optimizer: Vec<Entry> = data.optimizer.iter().map(|(n, t)| Entry::of(n, t)).collect();
    let mut pending = begin(dir, data.meta, &model, &optimizer)?;
    for (n, t) in data.model {
        pending.model(n, t)?;
    }
    for (n, t) in &data.optimizer {
        pending.optimizer(n, t)?;
    }
    pending.commit(keep)
}

/// A checkpoint being written: its files are made in a temporary folder with their headers,
/// the tensors stream in (`model`, `optimizer`) in any order, and `commit` checks, flushes and
/// renames it into place. Dropped uncommitted (an error on the way), it leaves nothing behind.
pub struct Pending {
    dir: PathBuf,
    tmp: PathBuf,
    meta: Meta,
    model: Option<StreamedFile>,
    optimizer: Option<StreamedFile>,
}

/// Starts a checkpoint for `meta` under `dir` (the checkpoints folder) that will hold the
/// tensors `model` and `optimizer` list.
pub fn begin(dir: &Path, meta: Meta, model: &[Entry], optimizer: &[Entry]) -> Result<Pending, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    remove_stale_temporaries(dir);
    let tmp = dir.join(format!(".{}.tmp-{}", meta.dir_name(), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let mut pending = Pending { dir: dir.to_path_buf(), tmp, meta, model: None, optimizer: None };
    pending.model = Some(StreamedFile::create(&pending.tmp.join(MODEL_FILE), model)?);
    pending.optimizer = Some(StreamedFile::create(&pending.tmp.join(OPTIMIZER_FILE), optimizer)?);
    Ok(pending)
}

impl Pending {
    /// One tensor of `model.safetensors`.
    pub fn model(&mut self, name: &str, t: &Tensor) -> Result<(), CheckpointError> {
        self.model.as_mut().expect("open until commit").put(name, t)
    }

    /// One tensor of `optimizer.safetensors`.
    pub fn optimizer(&mut self, name: &str, t: &Tensor) -> Result<(), CheckpointError> {
        self.optimizer.as_mut().expect("open until commit").put(name, t)
    }

    /// Finishes the files (every listed tensor written), writes `meta.json` and the checksums,
    /// renames the folder into place, updates `latest` and keeps the newest `keep` checkpoints.
    pub fn commit(mut self, keep: usize) -> Result<PathBuf, CheckpointError> {
        let tmp = self.tmp.clone();
        let name = self.meta.dir_name();
        let final_dir = self.dir.join(&name);
        let latest_tmp = self.dir.join(format!(".{LATEST_FILE}.tmp-{}", std::process::id()));
        let mut sums = String::new();
        for (file, f) in [(MODEL_FILE, self.model.take()), (OPTIMIZER_FILE, self.optimizer.take())] {
            let digest = f.expect("open until commit").finish()?;
            sums.push_str(&format!("{digest}  {file}\n"));
        }
        let meta = serde_json::to_vec_pretty(&self.meta).expect("meta serialises");
        write_synced(&tmp.join(META_FILE), &meta)?;
        sums.push_str(&format!("{}  {META_FILE}\n", sha256_hex(&meta)));
        write_synced(&tmp.join(CHECKSUMS_FILE), sums.as_bytes())?;
        sync_dir(&tmp)?;

        // A restarted run may write the same step again; the new one replaces it.
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        let latest = write_synced(&latest_tmp, format!("{name}\n").as_bytes())
            .and_then(|_| std::fs::rename(&latest_tmp, self.dir.join(LATEST_FILE)).map_err(io(&self.dir)));
        if latest.is_err() {
            let _ = std::fs::remove_file(&latest_tmp);
        }
        latest?;
        sync_dir(&self.dir)?;
        prune(&self.dir, keep, &name)?;
        Ok(final_dir)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Not committed (an error on the way: a full disk): nothing is left to fill it further.
        // After a commit the folder has been renamed away and this finds nothing.
        self.model = None;
        self.optimizer = None;
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
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
