//! nanoGPT's token files: `train.bin` / `val.bin`, raw little-endian uint16 ids with no header,
//! memory-mapped (a file of any size costs no RAM up front), and `meta.json` with the vocabulary.
//!
//! A sample is a window start: sample i is tokens [i, i + block) as input and [i + 1, i + block + 1)
//! as target. Training draws an epoch over every window start through `DistributedSampler`
//! (shuffled from seed + epoch), rather than nanoGPT's random starts with replacement: the order is
//! then a function of (seed, epoch, rank, step), so resume is exact and a resume on another world
//! size re-shards the unseen windows like any other data set, and no window repeats within an
//! epoch. Evaluation uses `eval_windows` starts spread evenly over `val.bin`: the same set every
//! run and at every world size.

use super::{prepare, Batch, DataError, DataKind, DataSpec, Dataset, LoadContext, Samples, Splits};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Tensor;

pub const KIND: DataKind = DataKind::of::<TokensSpec>("tokens");

/// `data: {format: tokens, dir: …}`: nanoGPT's token files, for language models.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokensSpec {
    /// The folder holding `train.bin`, `val.bin` and `meta.json`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// When `dir` holds no `train.bin`, make it from these UTF-8 text files or folders first (as
    /// `ringtrain prepare-text`).
    #[serde(default)]
    pub prepare_from: Vec<PathBuf>,
    /// Evaluation windows, evenly spaced over `val.bin` (the same every run and world size).
    #[serde(default = "default_eval_windows")]
    pub eval_windows: usize,
}

fn default_eval_windows() -> usize {
    200
}

impl DataSpec for TokensSpec {
    fn samples(&self) -> Samples {
        Samples::Tokens
    }

    fn validate(&self) -> Result<(), String> {
        if self.dir.is_none() {
            return Err("data.dir is required when data.format is tokens".into());
        }
        if self.eval_windows == 0 {
            return Err("data.eval_windows must be at least 1".into());
        }
        Ok(())
    }

    fn load(&self, ctx: &LoadContext) -> Result<Splits, DataError> {
        let dir = self.dir.as_deref().expect("validated: tokens has a dir");
        let block = ctx.context_length.ok_or_else(|| DataError::Invalid("token data needs a model with a context length".into()))?;
        if !dir.join("train.bin").exists() && !self.prepare_from.is_empty() {
            let p = prepare::prepare_text(&self.prepare_from, dir)?;
            tracing::info!(
                "prepared {} from {} text file(s): {} train, {} val tokens",
                dir.display(),
                p.files.len(),
                p.train_tokens,
                p.val_tokens
            );
        }
        let file = |name: &str| -> Result<TokenFile, DataError> {
            let p = dir.join(name);
            if !p.exists() {
                return Err(DataError::Invalid(format!(
                    "{}: no {name} (make it with `ringtrain prepare-text --input TEXT --out {}`, or set data.prepare_from)",
                    dir.display(),
                    dir.display()
                )));
            }
            TokenFile::open(&p)
        };
        // The token files first: a folder with none is told how to make them.
        let train = file("train.bin")?;
        let vocab = vocab_size(dir)?;
        Ok(Splits {
            train: Arc::new(TokenWindows::all(train, block, vocab)?),
            test: Arc::new(TokenWindows::spread(file("val.bin")?, block, vocab, self.eval_windows)?),
            sample_shape: vec![block as i64],
            classes: vocab,
            may_skip: false,
        })
    }
}

/// One token file, memory-mapped.
pub struct TokenFile {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl TokenFile {
    pub fn open(path: &Path) -> Result<TokenFile, DataError> {
        let bad = |what: String| DataError::Idx { path: path.display().to_string(), what };
        let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        // SAFETY: the file is only read; a token file rewritten underneath a running job would be
        // a user error we cannot prevent (nanoGPT's np.memmap has the same contract).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| bad(format!("memory-mapping: {e}")))?;
        if map.len() % 2 != 0 {
            return Err(bad(format!("{} bytes is not a whole number of uint16 tokens", map.len())));
        }
        Ok(TokenFile { path: path.to_path_buf(), map })
    }

    pub fn len(&self) -> usize {
        self.map.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn token(&self, i: usize) -> u16 {
        u16::from_le_bytes([self.map[2 * i], self.map[2 * i + 1]])
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Windows of `block + 1` tokens; `starts`: which window starts are the samples (all of them for
/// training, an evenly spaced subset for evaluation).
pub struct TokenWindows {
    file: TokenFile,
    block: usize,
    vocab: usize,
    starts: Option<Vec<usize>>,
}

impl TokenWindows {
    /// Every window start of `file` (training).
    pub fn all(file: TokenFile, block: usize, vocab: usize) -> Result<TokenWindows, DataError> {
        Self::check(&file, block)?;
        Ok(TokenWindows { file, block, vocab, starts: None })
    }

    /// `count` window starts spread evenly from the first to the last (evaluation).
    pub fn spread(file: TokenFile, block: usize, vocab: usize, count: usize) -> Result<TokenWindows, DataError> {
        Self::check(&file, block)?;
        let last = file.len() - block - 1;
        let count = count.min(last + 1);
        let starts = (0..count).map(|i| if count == 1 { 0 } else { i * last / (count - 1) }).collect();
        Ok(TokenWindows { file, block, vocab, starts: Some(starts) })
    }

    fn check(file: &TokenFile, block: usize) -> Result<(), DataError> {
        if file.len() < block + 1 {
            return Err(DataError::Idx {
                path: file.path.display().to_string(),
                what: format!("{} tokens is fewer than one window of block_size + 1 = {}", file.len(), block + 1),
            });
        }
        Ok(())
    }

    fn start(&self, i: usize) -> usize {
        self.starts.as_ref().map_or(i, |s| s[i])
    }
}

impl Dataset for TokenWindows {
    fn len(&self) -> usize {
        self.starts.as_ref().map_or(self.file.len() - self.block, Vec::len)
    }

    fn batch(&self, indices: &[usize], _epoch: u64) -> Result<Batch, DataError> {
        let t = self.block;
        let mut x = Vec::with_capacity(indices.len() * t);
        let mut y = Vec::with_capacity(indices.len() * t);
        for &i in indices {
            if i >= self.len() {
                return Err(DataError::Invalid(format!("window {i} is past the end ({} windows)", self.len())));
            }
            let s = self.start(i);
            for k in 0..t {
                let (a, b) = (self.file.token(s + k), self.file.token(s + k + 1));
                if a as usize >= self.vocab || b as usize >= self.vocab {
                    return Err(DataError::Idx {
                        path: self.file.path.display().to_string(),
                        what: format!("token {} at position {} is outside the vocabulary of {}", a.max(b), s + k, self.vocab),
                    });
                }
                x.push(a as i64);
                y.push(b as i64);
            }
        }
        let shape = [indices.len() as i64, t as i64];
        let input = Tensor::f_from_slice(&x).and_then(|v| v.f_view(shape)).map_err(|e| DataError::Invalid(e.to_string()))?;
        let target = Tensor::f_from_slice(&y).and_then(|v| v.f_view(shape)).map_err(|e| DataError::Invalid(e.to_string()))?;
        Ok(Batch { input, target, len: indices.len() })
    }
}

/// The vocabulary size from `dir/meta.json` (`vocab_size`). A missing file is an error: guessing
/// 65,536 (any uint16) once trained a model 11× the size of the byte-level one, silently.
pub fn vocab_size(dir: &Path) -> Result<usize, DataError> {
    let path = dir.join("meta.json");
    match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DataError::Idx {
            path: path.display().to_string(),
            what: "missing: it gives the vocabulary size, e.g. {\"vocab_size\": 256} (`ringtrain prepare-text` writes it)".into(),
        }),
        Err(e) => Err(DataError::Idx { path: path.display().to_string(), what: e.to_string() }),
        Ok(text) => {
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| DataError::Idx { path: path.display().to_string(), what: e.to_string() })?;
            v["vocab_size"].as_u64().filter(|&n| (1..=65536).contains(&n)).map(|n| n as usize).ok_or_else(|| DataError::Idx {
                path: path.display().to_string(),
                what: "vocab_size is missing or not in 1..=65536".into(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, tokens: &[u16]) -> TokenFile {
        let p = dir.join("t.bin");
        std::fs::write(&p, tokens.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        TokenFile::open(&p).unwrap()
    }

    #[test]
    fn windows_give_input_and_shifted_target() {
        let dir = tempfile::tempdir().unwrap();
        let tokens: Vec<u16> = (0..10).map(|i| i * 3).collect();
        let w = TokenWindows::all(file(dir.path(), &tokens), 4, 256).unwrap();
        assert_eq!(w.len(), 6);
        let b = w.batch(&[0, 5], 0).unwrap();
        assert_eq!(Vec::<i64>::try_from(&b.input.view([-1])).unwrap(), vec![0, 3, 6, 9, 15, 18, 21, 24]);
        assert_eq!(Vec::<i64>::try_from(&b.target.view([-1])).unwrap(), vec![3, 6, 9, 12, 18, 21, 24, 27]);
        assert!(w.batch(&[6], 0).is_err());
    }

    #[test]
    fn eval_windows_are_spread_and_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let w = TokenWindows::spread(file(dir.path(), &[1; 100]), 9, 256, 5).unwrap();
        assert_eq!(w.starts.as_deref(), Some(&[0, 22, 45, 67, 90][..]));
        let few = TokenWindows::spread(file(dir.path(), &[1; 12]), 9, 256, 5).unwrap();
        assert_eq!(few.starts.as_deref(), Some(&[0, 1, 2][..]));
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let short = TokenWindows::all(file(dir.path(), &[1, 2, 3]), 4, 256);
        assert!(short.err().unwrap().to_string().contains("fewer than one window"));
        let w = TokenWindows::all(file(dir.path(), &[1, 2, 300, 4, 5, 6]), 2, 256).unwrap();
        let e = w.batch(&[1], 0).unwrap_err().to_string();
        assert!(e.contains("t.bin") && e.contains("300"), "{e}");
        std::fs::write(dir.path().join("odd.bin"), [1u8, 2, 3]).unwrap();
        assert!(TokenFile::open(&dir.path().join("odd.bin")).err().unwrap().to_string().contains("whole number"));
    }

    /// Issue 27, item 9: no meta.json is an error naming the file, not a 65,536-token guess.
    #[test]
    fn a_missing_meta_json_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = vocab_size(dir.path()).unwrap_err().to_string();
        assert!(e.contains("meta.json: missing") && e.contains("vocab_size"), "{e}");
        std::fs::write(dir.path().join("meta.json"), r#"{"vocab_size": 256}"#).unwrap();
        assert_eq!(vocab_size(dir.path()).unwrap(), 256);
    }
}
