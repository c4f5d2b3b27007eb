//! `ringtrain prepare-text`: UTF-8 text files → nanoGPT's `train.bin` / `val.bin` with byte-level
//! tokens (vocabulary 256: any text, no tokenizer file) and a `meta.json`.
//!
//! Folders are read in sorted order, files in them too (recursively), skipping hidden files and
//! fortune's `.dat` indexes and `.u8` links; the bytes of all files are concatenated, the first
//! 90% become `train.bin` and the rest `val.bin` (nanoGPT's shakespeare_char split). Files are
//! written under temporary names and renamed, `train.bin` last, so a folder with `train.bin` is
//! complete even if several ranks prepare it at once.

use super::DataError;
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Prepared {
    pub files: Vec<PathBuf>,
    pub train_tokens: usize,
    pub val_tokens: usize,
}

fn err(path: &Path, what: impl Into<String>) -> DataError {
    DataError::Idx { path: path.display().to_string(), what: what.into() }
}

/// The text files `inputs` name, folders expanded in sorted order.
pub fn text_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    for p in inputs {
        let meta = std::fs::metadata(p).map_err(|e| err(p, e.to_string()))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> =
                std::fs::read_dir(p).map_err(|e| err(p, e.to_string()))?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            entries.sort();
            let keep: Vec<PathBuf> = entries
                .into_iter()
                .filter(|e| {
                    let name = e.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    let link = std::fs::symlink_metadata(e).is_ok_and(|m| m.file_type().is_symlink());
                    !(name.starts_with('.') || name.ends_with(".dat") || name.ends_with(".u8") || link)
                })
                .collect();
            out.extend(text_files(&keep)?);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Prepares `out` from `inputs`; the split is at 90% of the bytes.
pub fn prepare_text(inputs: &[PathBuf], out: &Path) -> Result<Prepared, DataError> {
    let files = text_files(inputs)?;
    if files.is_empty() {
        return Err(DataError::Invalid(format!("prepare-text: no text files in {inputs:?}")));
    }
    let mut bytes = Vec::new();
    for f in &files {
        let data = std::fs::read(f).map_err(|e| err(f, e.to_string()))?;
        if let Err(e) = std::str::from_utf8(&data) {
            return Err(err(f, format!("not UTF-8 text (invalid byte at offset {})", e.valid_up_to())));
        }
        bytes.extend_from_slice(&data);
    }
    let split = bytes.len() * 9 / 10;
    if split == 0 || split == bytes.len() {
        return Err(DataError::Invalid(format!("prepare-text: {} bytes of text is too little to split 90/10", bytes.len())));
    }
    std::fs::create_dir_all(out).map_err(|e| err(out, e.to_string()))?;
    let tag = format!("tmp-{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], "");
    let write = |name: &str, data: &[u8]| -> Result<(), DataError> {
        let tmp = out.join(format!(".{name}.{tag}"));
        std::fs::write(&tmp, data).map_err(|e| err(&tmp, e.to_string()))?;
        std::fs::rename(&tmp, out.join(name)).map_err(|e| err(&out.join(name), e.to_string()))
    };
    let tokens = |b: &[u8]| -> Vec<u8> { b.iter().flat_map(|&c| (c as u16).to_le_bytes()).collect() };
    let meta = json!({
        "vocab_size": 256,
        "tokenizer": "bytes (each UTF-8 byte is one token, 0..=255)",
        "sources": files,
        "train_tokens": split,
        "val_tokens": bytes.len() - split,
        "split": "first 90% of the concatenated bytes train, the rest val",
    });
    write("meta.json", format!("{}\n", serde_json::to_string_pretty(&meta).expect("json")).as_bytes())?;
    write("val.bin", &tokens(&bytes[split..]))?;
    write("train.bin", &tokens(&bytes[..split]))?;
    Ok(Prepared { files, train_tokens: split, val_tokens: bytes.len() - split })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_read_sorted_skipping_indexes_and_split_90_10() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("b"), "héllo ").unwrap();
        std::fs::write(src.join("a"), "0123456789").unwrap();
        std::fs::write(src.join("a.dat"), [0xffu8, 0xfe]).unwrap();
        std::fs::write(src.join("sub").join("c"), "xyz").unwrap();
        std::os::unix::fs::symlink(src.join("a"), src.join("a.u8")).unwrap();
        let out = dir.path().join("out");
        let p = prepare_text(&[src.clone()], &out).unwrap();
        assert_eq!(p.files, vec![src.join("a"), src.join("b"), src.join("sub").join("c")]);
        // "0123456789" + "héllo " (7 bytes) + "xyz" = 20 bytes: 18 train, 2 val.
        assert_eq!((p.train_tokens, p.val_tokens), (18, 2));
        let train = std::fs::read(out.join("train.bin")).unwrap();
        assert_eq!(train.len(), 36);
        assert_eq!(u16::from_le_bytes([train[22], train[23]]), 0xc3, "é's first UTF-8 byte");
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
        assert_eq!(meta["vocab_size"], 256);
        assert!(std::fs::read_dir(&out).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.')));
    }

    #[test]
    fn non_utf8_and_empty_inputs_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("latin1.txt");
        std::fs::write(&bad, b"caf\xe9 au lait").unwrap();
        let e = prepare_text(&[bad], &dir.path().join("out")).unwrap_err().to_string();
        assert!(e.contains("latin1.txt") && e.contains("offset 3"), "{e}");
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(prepare_text(&[empty], &dir.path().join("out")).unwrap_err().to_string().contains("no text files"));
        assert!(prepare_text(&[dir.path().join("missing")], &dir.path().join("out")).is_err());
    }
}
