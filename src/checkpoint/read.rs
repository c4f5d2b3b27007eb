//! Finding and verifying checkpoints. Nothing is loaded unless every checksum matches.

use super::*;
use std::path::Path;
use tch::Tensor;

pub struct LoadedCheckpoint {
    pub path: PathBuf,
    pub meta: Meta,
    pub model: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
}

/// A checkpoint verified, its model read, its optimizer state left in its file to be read one
/// tensor at a time (the trainer's resume hands the state out as it reads it, so rank 0 never
/// holds all of it).
pub struct OpenedCheckpoint {
    pub path: PathBuf,
    pub meta: Meta,
    pub model: Vec<(String, Tensor)>,
    pub optimizer: super::SafetensorsReader,
}

impl OpenedCheckpoint {
    /// Reads the optimizer state too.
    pub fn read_all(self) -> Result<LoadedCheckpoint, CheckpointError> {
        let optimizer = self.optimizer.read_all()?;
        Ok(LoadedCheckpoint { path: self.path, meta: self.meta, model: self.model, optimizer })
    }
}

fn invalid(path: &Path, what: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid { path: path.to_path_buf(), what: what.into() }
}

/// Reads and verifies one checkpoint folder.
pub fn load(path: &Path) -> Result<LoadedCheckpoint, CheckpointError> {
    open(path)?.read_all()
}

/// Verifies the checkpoint at `path` (every file against its checksum) and reads its model and
/// meta; the optimizer state stays in its file (`OpenedCheckpoint`).
pub fn open(path: &Path) -> Result<OpenedCheckpoint, CheckpointError> {
    let read = |file: &str| std::fs::read(path.join(file)).map_err(|e| invalid(path, format!("{file}: {e}")));
    let sums = String::from_utf8(read(CHECKSUMS_FILE)?).map_err(|_| invalid(path, "checksums.sha256 is not text"))?;
    let mut listed = Vec::new();
    for line in sums.lines() {
        let (digest, file) = line.split_once("  ").ok_or_else(|| invalid(path, format!("malformed checksum line {line:?}")))?;
        // Hashed in pieces: a checkpoint can be larger than the memory left beside the model.
        let actual = super::stream::sha256_of(&path.join(file)).map_err(|e| invalid(path, format!("{file}: {e}")))?;
        if actual != digest {
            return Err(invalid(path, format!("{file} fails its checksum (truncated or corrupted)")));
        }
        listed.push(file.to_string());
    }
    for required in [MODEL_FILE, OPTIMIZER_FILE, META_FILE] {
        if !listed.iter().any(|f| f == required) {
            return Err(invalid(path, format!("checksums.sha256 does not cover {required}")));
        }
    }
    let meta: Meta = serde_json::from_slice(&read(META_FILE)?).map_err(|e| invalid(path, format!("meta.json: {e}")))?;
    if meta.format_version != FORMAT_VERSION {
        return Err(invalid(path, format!("format version {} (this build reads {FORMAT_VERSION})", meta.format_version)));
    }
    // Each tensor read straight into its own memory (not the file's bytes, then a copy).
    let model = super::stream::SafetensorsReader::open(&path.join(MODEL_FILE))?.read_all()?;
    let optimizer = super::stream::SafetensorsReader::open(&path.join(OPTIMIZER_FILE))?;
    Ok(OpenedCheckpoint { path: path.to_path_buf(), model, optimizer, meta })
}

/// The newest usable checkpoint in `dir`: the one `latest` names, else the newest folder that
/// verifies. Each skipped one is returned with its reason, for a warning. `Ok(None)` when there
/// are no checkpoints at all; an error when there are some and none is usable.
/// The newest checkpoint folder's name in `dir` (`step-…`), usable or not: a run directory that
/// has one belongs to a run.
pub fn newest_folder(dir: &Path) -> Option<String> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            step_of(&name).map(|s| (s, name))
        })
        .max()
        .map(|(_, name)| name)
}

pub fn find_resumable(dir: &Path) -> Result<(Option<LoadedCheckpoint>, Vec<String>), CheckpointError> {
    find_with(dir, load)
}

/// `find_resumable`, the optimizer state left in its file (`OpenedCheckpoint`).
pub fn find_resumable_opened(dir: &Path) -> Result<(Option<OpenedCheckpoint>, Vec<String>), CheckpointError> {
    find_with(dir, open)
}

fn find_with<T>(dir: &Path, load: impl Fn(&Path) -> Result<T, CheckpointError>) -> Result<(Option<T>, Vec<String>), CheckpointError> {
    if !dir.exists() {
        return Ok((None, vec![]));
    }
    let mut candidates: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|source| CheckpointError::Io { path: dir.to_path_buf(), source })?
        .filter_map(|e| e.ok())
        .filter_map(|e| step_of(&e.file_name().to_string_lossy()).map(|s| (s, e.path())))
        .collect();
    candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
    // `latest` goes first when it names an existing folder (it is written after the folder).
    let mut skipped = Vec::new();
    if let Ok(name) = std::fs::read_to_string(dir.join(LATEST_FILE)) {
        let name = name.trim();
        match candidates.iter().position(|(_, p)| p.file_name().is_some_and(|n| n == name)) {
            Some(pos) => {
                let first = candidates.remove(pos);
                candidates.insert(0, first);
            }
            None => skipped.push(format!("{}: `latest` names {name:?}, which does not exist", dir.display())),
        }
    }
    for (_, path) in &candidates {
        match load(path) {
            Ok(c) => return Ok((Some(c), skipped)),
            Err(e) => skipped.push(e.to_string()),
        }
    }
    if candidates.is_empty() {
        Ok((None, skipped))
    } else {
        Err(CheckpointError::NoneUsable { dir: dir.to_path_buf(), reasons: skipped.join("; ") })
    }
}

/// Copies `loaded` tensors into the model's parameters and buffers (rank 0), requiring the same
/// names and shapes; the error lists every missing, unexpected and mis-shaped tensor.
pub fn copy_into(params: &[(String, Tensor)], loaded: &[(String, Tensor)], source: &Path) -> Result<(), String> {
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    for (name, p) in params {
        match loaded.iter().find(|(n, _)| n == name) {
            None => missing.push(name.clone()),
            Some((_, t)) if t.size() != p.size() => misshaped.push(format!("{name} (file {:?}, model {:?})", t.size(), p.size())),
            Some(_) => {}
        }
    }
    let unexpected: Vec<String> = loaded.iter().filter(|(n, _)| !params.iter().any(|(m, _)| m == n)).map(|(n, _)| n.clone()).collect();
    if !(missing.is_empty() && unexpected.is_empty() && misshaped.is_empty()) {
        return Err(format!(
            "{} does not fit the model: missing {missing:?}, unexpected {unexpected:?}, mis-shaped {misshaped:?}",
            source.display()
        ));
    }
    tch::no_grad(|| -> Result<(), String> {
        for (name, p) in params {
            let (_, t) = loaded.iter().find(|(n, _)| n == name).expect("checked above");
            let mut dst = p.shallow_clone();
            dst.f_copy_(&t.to_kind(p.kind()).to_device(p.device())).map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::super::write::*;
    use super::*;
    use tch::Kind;

    fn meta(step: u64) -> Meta {
        Meta {
            format_version: FORMAT_VERSION,
            global_step: step,
            epoch: 0,
            epoch_base: 0,
            epoch_world_size: 2,
            steps_in_shard: step,
            world_size: 2,
            batch_size: 4,
            seed: 0,
            optimizer: "sgd".into(),
            optimizer_steps: step,
            rng: "test".into(),
            reason: "every_steps".into(),
            config: String::new(),
            run_id: String::new(),
            user: serde_json::Value::Null,
            grad_scaler: None,
        }
    }

    fn save(dir: &Path, step: u64, keep: usize) -> PathBuf {
        let w = Tensor::from_slice(&[step as f32, 2.0, 3.0]);
        let model = vec![("fc1.weight".to_string(), w.shallow_clone())];
        let opt = vec![("fc1.weight.momentum_buffer".to_string(), w.to_kind(Kind::Float))];
        write(dir, CheckpointData { meta: meta(step), model: &model, optimizer: opt }, keep).unwrap()
    }

    fn temporaries(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    /// Issue 27, item 10: a failed write leaves no temporary folder, and what an earlier
    /// process's failed write left is removed at the next write.
    #[test]
    fn failed_writes_leave_no_temporaries() {
        let d = tempfile::tempdir().unwrap();
        // A file where the step's folder goes: the write fails at its last move.
        std::fs::write(d.path().join("step-000000050"), b"in the way").unwrap();
        let w = Tensor::from_slice(&[1f32]);
        let model = vec![("w".to_string(), w.shallow_clone())];
        let e = write(d.path(), CheckpointData { meta: meta(50), model: &model, optimizer: vec![] }, 3).unwrap_err().to_string();
        assert!(e.contains("step-000000050") && !e.contains('\n'), "{e}");
        assert_eq!(temporaries(d.path()), Vec::<String>::new());
        // Left by processes that no longer run.
        std::fs::create_dir(d.path().join(".step-000000007.tmp-4000000000")).unwrap();
        std::fs::write(d.path().join(".step-000000007.tmp-4000000000/model.safetensors"), b"half").unwrap();
        std::fs::write(d.path().join(".latest.tmp-4000000001"), b"step-000000007").unwrap();
        save(d.path(), 60, 3);
        assert_eq!(temporaries(d.path()), Vec::<String>::new());
    }

    #[test]
    fn roundtrip_latest_and_keep() {
        let d = tempfile::tempdir().unwrap();
        for step in [10, 20, 30, 40] {
            save(d.path(), step, 3);
        }
        let names: Vec<String> = {
            let mut v: Vec<String> =
                std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            v.sort();
            v
        };
        assert_eq!(names, vec!["latest", "step-000000020", "step-000000030", "step-000000040"]);
        let (c, skipped) = find_resumable(d.path()).unwrap();
        let c = c.unwrap();
        assert!(skipped.is_empty());
        assert_eq!(c.meta, meta(40));
        assert_eq!(c.model[0].1.double_value(&[0]), 40.0);
    }

    #[test]
    fn a_latest_naming_a_missing_folder_is_reported() {
        let d = tempfile::tempdir().unwrap();
        save(d.path(), 10, 5);
        std::fs::write(d.path().join(LATEST_FILE), "step-000000099\n").unwrap();
        let (found, skipped) = find_resumable(d.path()).unwrap();
        assert_eq!(found.unwrap().meta.global_step, 10);
        assert!(skipped.iter().any(|s| s.contains("step-000000099") && s.contains("does not exist")), "{skipped:?}");
    }

    #[test]
    fn corrupt_checkpoints_are_skipped_with_reasons() {
        let d = tempfile::tempdir().unwrap();
        save(d.path(), 10, 5);
        let b = save(d.path(), 20, 5);
        let c = save(d.path(), 30, 5);
        // Truncate the newest's model, flip one bit in the next one's optimizer state.
        let m = c.join(MODEL_FILE);
        let len = std::fs::metadata(&m).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&m).unwrap().set_len(len / 2).unwrap();
        let o = b.join(OPTIMIZER_FILE);
        let mut bytes = std::fs::read(&o).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&o, bytes).unwrap();

        let (found, skipped) = find_resumable(d.path()).unwrap();
        assert_eq!(found.unwrap().meta.global_step, 10);
        assert_eq!(skipped.len(), 2);
        assert!(skipped[0].contains("step-000000030") && skipped[0].contains("model.safetensors"), "{skipped:?}");
        assert!(skipped[1].contains("step-000000020") && skipped[1].contains("optimizer.safetensors"), "{skipped:?}");

        std::fs::remove_dir_all(d.path().join("step-000000010")).unwrap();
        let err = find_resumable(d.path()).err().unwrap().to_string();
        assert!(err.contains("no usable checkpoint"), "{err}");
        assert!(find_resumable(&d.path().join("none")).unwrap().0.is_none());
    }
}
