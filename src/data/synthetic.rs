//! A deterministic, learnable synthetic classification task for tests and benchmarks: samples are
//! standard normal, labels the argmax of a fixed random linear "teacher".

use super::splitmix::SplitMix;
use super::{ArrayDataset, DataError, DataKind, DataSpec, LoadContext, Pixels, Splits};
use serde::{Deserialize, Serialize};

pub const KIND: DataKind = DataKind::of::<SyntheticSpec>("synthetic");

/// `data: {format: synthetic, synthetic: {…}}`: generated in memory; for tests and benchmarks.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSpec {
    #[serde(default)]
    pub synthetic: Option<SyntheticConfig>,
    /// (mean, std) applied to every value.
    #[serde(default)]
    pub normalize: Option<[f32; 2]>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    pub train_samples: usize,
    pub test_samples: usize,
    /// Sample shape, e.g. [16] for vectors or [1, 28, 28] for images.
    pub shape: Vec<usize>,
    pub classes: usize,
    #[serde(default)]
    pub seed: u64,
}

impl DataSpec for SyntheticSpec {
    fn sample_shape(&self) -> Option<Vec<i64>> {
        self.synthetic.as_ref().map(|s| s.shape.iter().map(|&d| d as i64).collect())
    }

    fn validate(&self) -> Result<(), String> {
        let Some(s) = &self.synthetic else {
            return Err("data.synthetic is required when data.format is synthetic".into());
        };
        if s.train_samples == 0 {
            return Err("data.synthetic.train_samples must be at least 1".into());
        }
        if s.classes < 2 {
            return Err("data.synthetic.classes must be at least 2".into());
        }
        if s.shape.is_empty() || s.shape.contains(&0) {
            return Err("data.synthetic.shape must be non-empty with positive sizes".into());
        }
        if let Some([_, std]) = self.normalize {
            if !(std > 0.0 && std.is_finite()) {
                return Err(format!("data.normalize: std must be positive, got {std}"));
            }
        }
        Ok(())
    }

    fn load(&self, _ctx: &LoadContext) -> Result<Splits, DataError> {
        let s = self.synthetic.as_ref().expect("validated: synthetic has its section");
        let split = |which| {
            let mut d = generate(s, which);
            d.normalize = self.normalize;
            d
        };
        Ok(Splits::arrays(split(0), split(1)))
    }
}

/// `split` 0 is the training set, 1 the test set: same teacher, different samples.
pub fn generate(cfg: &SyntheticConfig, split: u64) -> ArrayDataset {
    let d: usize = cfg.shape.iter().product();
    let n = if split == 0 { cfg.train_samples } else { cfg.test_samples };
    let mut teacher_rng = SplitMix(cfg.seed ^ 0x7465_6163_6865_72);
    let teacher: Vec<f32> = (0..cfg.classes * d).map(|_| teacher_rng.normal()).collect();
    let mut rng = SplitMix(cfg.seed.wrapping_mul(31).wrapping_add(split + 1));
    let mut pixels = Vec::with_capacity(n * d);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let x: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
        let score = |c: usize| teacher[c * d..(c + 1) * d].iter().zip(&x).map(|(w, v)| w * v).sum::<f32>();
        let label = (0..cfg.classes).max_by(|&a, &b| score(a).total_cmp(&score(b))).unwrap_or(0);
        pixels.extend_from_slice(&x);
        labels.push(label as i64);
    }
    ArrayDataset {
        pixels: Pixels::F32(pixels),
        labels,
        sample_shape: cfg.shape.iter().map(|&s| s as i64).collect(),
        classes: cfg.classes,
        normalize: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_uses_every_class() {
        let cfg = SyntheticConfig { train_samples: 500, test_samples: 50, shape: vec![8], classes: 4, seed: 3 };
        let (a, b) = (generate(&cfg, 0), generate(&cfg, 0));
        assert_eq!(a.labels, b.labels);
        assert_eq!(a.len(), 500);
        assert_eq!(generate(&cfg, 1).len(), 50);
        for c in 0..4 {
            assert!(a.labels.contains(&c), "class {c} missing");
        }
    }
}
