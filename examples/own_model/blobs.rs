//! `data: {format: blobs, classes: 4, dims: 8, …}`: Gaussian blobs, one per class, generated the
//! same on every rank. Everything the format is lives here: its keys, their checks, the loader.

use ringtrain::data::{ArrayDataset, DataError, DataKind, DataSpec, LoadContext, Pixels, Splits};
use serde::{Deserialize, Serialize};

pub const KIND: DataKind = DataKind::of::<Blobs>("blobs");

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Blobs {
    pub classes: usize,
    pub dims: usize,
    #[serde(default = "default_samples")]
    pub train_samples: usize,
    #[serde(default = "default_samples")]
    pub test_samples: usize,
    /// Spread of each blob around its centre (the centres are ±1 in each dimension).
    #[serde(default = "default_spread")]
    pub spread: f32,
    #[serde(default)]
    pub seed: u64,
}

fn default_samples() -> usize {
    1000
}
fn default_spread() -> f32 {
    0.5
}

impl DataSpec for Blobs {
    fn sample_shape(&self) -> Option<Vec<i64>> {
        Some(vec![self.dims as i64])
    }

    fn validate(&self) -> Result<(), String> {
        if self.classes < 2 || self.dims == 0 {
            return Err("data.classes must be at least 2 and data.dims at least 1".into());
        }
        if !(self.spread > 0.0) {
            return Err(format!("data.spread must be positive, got {}", self.spread));
        }
        Ok(())
    }

    fn load(&self, _ctx: &LoadContext) -> Result<Splits, DataError> {
        Ok(Splits::arrays(self.split(self.train_samples, 1), self.split(self.test_samples, 2)))
    }
}

impl Blobs {
    fn split(&self, n: usize, stream: u64) -> ArrayDataset {
        let mut rng = Lcg(self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ stream);
        // Class c's centre: bit d of (c + 1) picks +1 or -1 in dimension d.
        let centre = |c: usize, d: usize| if ((c + 1) >> (d % 16)) & 1 == 1 { 1.0 } else { -1.0 };
        let mut pixels = Vec::with_capacity(n * self.dims);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let c = i % self.classes;
            labels.push(c as i64);
            pixels.extend((0..self.dims).map(|d| centre(c, d) + self.spread * rng.normal()));
        }
        ArrayDataset { pixels: Pixels::F32(pixels), labels, sample_shape: vec![self.dims as i64], classes: self.classes, normalize: None }
    }
}

/// A small generator, the same on every platform, so every rank makes equal data.
struct Lcg(u64);

impl Lcg {
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
}
