//! torchvision's image transforms on one sample: resize, center crop, random crop with padding,
//! random horizontal flip on the 8-bit image, then ToTensor's scaling to [0, 1] and Normalize's
//! per-channel (x − mean) / std. Random choices draw from a generator seeded by (seed, epoch,
//! sample index), so a sample looks the same in a resumed or restarted run, on any rank, whichever
//! loader thread makes it.

use crate::data::splitmix::SplitMix;
use fast_image_resize as fr;
use serde::{Deserialize, Serialize};

/// One step of a pipeline, as YAML: `- resize: 36`, `- center_crop: 32`,
/// `- random_crop: {size: 32, padding: 4}`, `- random_horizontal_flip: 0.5`,
/// `- normalize: {mean: [0.49, 0.48, 0.45], std: [0.25, 0.24, 0.26]}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(try_from = "Spec", into = "Spec")]
pub enum Transform {
    /// The shorter side to this many pixels, keeping the aspect ratio (torchvision's
    /// `Resize(int)`); bilinear with antialiasing when shrinking.
    Resize(u32),
    /// The central size × size pixels (zero-padded where the image is smaller).
    CenterCrop(u32),
    /// Zero-pad every side by `padding`, then a random size × size window.
    RandomCrop { size: u32, padding: u32 },
    /// Mirror left–right with this probability.
    RandomHorizontalFlip(f64),
    /// After scaling to [0, 1]: (x − mean[c]) / std[c]; one value applies to every channel.
    Normalize { mean: Vec<f32>, std: Vec<f32> },
}

/// A transform as written in YAML: a map with exactly one of these keys. (serde_yaml reads an
/// enum from a parsed tree only as a `!tag`, so the one-key map goes through this struct.)
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resize: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    center_crop: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    random_crop: Option<CropSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    random_horizontal_flip: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    normalize: Option<NormalizeSpec>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CropSpec {
    size: u32,
    #[serde(default)]
    padding: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NormalizeSpec {
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl TryFrom<Spec> for Transform {
    type Error = String;
    fn try_from(s: Spec) -> Result<Transform, String> {
        let mut found = vec![];
        if let Some(n) = s.resize {
            found.push(Transform::Resize(n));
        }
        if let Some(n) = s.center_crop {
            found.push(Transform::CenterCrop(n));
        }
        if let Some(c) = s.random_crop {
            found.push(Transform::RandomCrop { size: c.size, padding: c.padding });
        }
        if let Some(p) = s.random_horizontal_flip {
            found.push(Transform::RandomHorizontalFlip(p));
        }
        if let Some(n) = s.normalize {
            found.push(Transform::Normalize { mean: n.mean, std: n.std });
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err("a transform needs one of resize, center_crop, random_crop, random_horizontal_flip, normalize".into()),
            _ => Err("one transform per list item: {resize: 36}, then {center_crop: 32}, …".into()),
        }
    }
}

impl From<Transform> for Spec {
    fn from(t: Transform) -> Spec {
        let mut s = Spec::default();
        match t {
            Transform::Resize(n) => s.resize = Some(n),
            Transform::CenterCrop(n) => s.center_crop = Some(n),
            Transform::RandomCrop { size, padding } => s.random_crop = Some(CropSpec { size, padding }),
            Transform::RandomHorizontalFlip(p) => s.random_horizontal_flip = Some(p),
            Transform::Normalize { mean, std } => s.normalize = Some(NormalizeSpec { mean, std }),
        }
        s
    }
}

/// An 8-bit image, channels × height × width.
#[derive(Clone, Debug, PartialEq)]
pub struct Img {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<u8>,
}

/// SplitMix64 (`data::splitmix`): small, fast, and good enough to place crops and flip coins; one
/// stream per sample.
pub struct SampleRng(SplitMix);

impl SampleRng {
    pub fn new(seed: u64, epoch: u64, index: u64) -> SampleRng {
        let mut r = SplitMix(seed ^ 0x9E37_79B9_7F4A_7C15);
        r.0 ^= r.next_u64().wrapping_add(epoch);
        r.0 ^= r.next_u64().wrapping_add(index);
        SampleRng(SplitMix(r.next_u64()))
    }
    pub fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in 0..=max.
    pub fn upto(&mut self, max: usize) -> usize {
        (self.next() % (max as u64 + 1)) as usize
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0.uniform()
    }
}

/// Checks a pipeline once, before any image is read: Normalize comes last and has one value or
/// one per channel; sizes are positive; probabilities are probabilities.
pub fn validate(pipeline: &[Transform], channels: Option<usize>) -> Result<(), String> {
    for (i, t) in pipeline.iter().enumerate() {
        match t {
            Transform::Resize(0) | Transform::CenterCrop(0) | Transform::RandomCrop { size: 0, .. } => {
                return Err(format!("transform {i} ({t:?}): the size must be at least 1"))
            }
            Transform::RandomHorizontalFlip(p) if !(0.0..=1.0).contains(p) => {
                return Err(format!("transform {i}: random_horizontal_flip takes a probability in [0, 1], got {p}"))
            }
            Transform::Normalize { mean, std } => {
                if i + 1 != pipeline.len() {
                    return Err(format!("transform {i}: normalize must come last (it works on the scaled values)"));
                }
                if mean.len() != std.len() || mean.is_empty() {
                    return Err(format!("transform {i}: normalize needs as many means as stds (got {} and {})", mean.len(), std.len()));
                }
                if let Some(c) = channels.filter(|&c| mean.len() != 1 && mean.len() != c) {
                    return Err(format!("transform {i}: normalize has {} values for images of {c} channel(s)", mean.len()));
                }
                if std.iter().any(|s| !(*s > 0.0)) {
                    return Err(format!("transform {i}: normalize's std must be positive, got {std:?}"));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Runs `pipeline` on `img` and writes the result as f32 (scaled to [0, 1], normalized if asked)
/// into a new vector; returns it with its (c, h, w).
pub fn apply(pipeline: &[Transform], mut img: Img, rng: &mut SampleRng) -> (Vec<f32>, [usize; 3]) {
    let mut norm = None;
    for t in pipeline {
        img = match t {
            Transform::Resize(size) => resize(&img, *size as usize),
            Transform::CenterCrop(size) => {
                let s = *size as usize;
                let top = (img.h as f64 - s as f64) / 2.0;
                let left = (img.w as f64 - s as f64) / 2.0;
                // torchvision: int(round((h - th) / 2)); negative where it must pad.
                crop(&img, top.round_ties_even() as isize, left.round_ties_even() as isize, s, s)
            }
            Transform::RandomCrop { size, padding } => {
                let (s, p) = (*size as usize, *padding as usize);
                let (ph, pw) = (img.h + 2 * p, img.w + 2 * p);
                // A window larger than the padded image is centred and zero-filled, drawing nothing.
                let top = if ph >= s { rng.upto(ph - s) as isize } else { (ph as isize - s as isize) / 2 };
                let left = if pw >= s { rng.upto(pw - s) as isize } else { (pw as isize - s as isize) / 2 };
                crop(&img, top - p as isize, left - p as isize, s, s)
            }
            Transform::RandomHorizontalFlip(p) => {
                if rng.unit() < *p {
                    flip(&mut img);
                }
                img
            }
            Transform::Normalize { mean, std } => {
                norm = Some((mean, std));
                img
            }
        };
    }
    let plane = img.h * img.w;
    let mut out: Vec<f32> = img.data.iter().map(|&b| b as f32 / 255.0).collect();
    if let Some((mean, std)) = norm {
        for c in 0..img.c {
            let (m, s) = (mean[c.min(mean.len() - 1)], std[c.min(std.len() - 1)]);
            for v in &mut out[c * plane..(c + 1) * plane] {
                *v = (*v - m) / s;
            }
        }
    }
    (out, [img.c, img.h, img.w])
}

/// The window of `h` × `w` at (top, left), which may reach outside the image (zeros there).
fn crop(img: &Img, top: isize, left: isize, h: usize, w: usize) -> Img {
    let mut data = vec![0u8; img.c * h * w];
    for c in 0..img.c {
        for y in 0..h {
            let sy = top + y as isize;
            if sy < 0 || sy >= img.h as isize {
                continue;
            }
            let (x0, x1) = ((-left).max(0) as usize, ((img.w as isize - left).min(w as isize)).max(0) as usize);
            if x0 >= x1 {
                continue;
            }
            let src = c * img.h * img.w + sy as usize * img.w;
            let dst = c * h * w + y * w;
            let sx0 = (left + x0 as isize) as usize;
            data[dst + x0..dst + x1].copy_from_slice(&img.data[src + sx0..src + sx0 + (x1 - x0)]);
        }
    }
    Img { c: img.c, h, w, data }
}

fn flip(img: &mut Img) {
    for row in img.data.chunks_mut(img.w) {
        row.reverse();
    }
}

/// Shorter side to `size`, as torchvision's Resize(int): the longer side scaled by the same
/// factor, truncated. Bilinear convolution, its support widened when shrinking (antialiasing, as
/// PIL's and torchvision's default). A size of 0 on either side (a sliver image) stays 1 pixel.
fn resize(img: &Img, size: usize) -> Img {
    let (h, w) = if img.h <= img.w {
        (size, ((size as f64 * img.w as f64 / img.h as f64) as usize).max(1))
    } else {
        (((size as f64 * img.h as f64 / img.w as f64) as usize).max(1), size)
    };
    if (h, w) == (img.h, img.w) {
        return img.clone();
    }
    let plane = img.h * img.w;
    let mut data = Vec::with_capacity(img.c * h * w);
    let mut resizer = fr::Resizer::new();
    let options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
    for c in 0..img.c {
        let src = fr::images::ImageRef::new(img.w as u32, img.h as u32, &img.data[c * plane..(c + 1) * plane], fr::PixelType::U8)
            .expect("a plane holds h × w bytes");
        let mut dst = fr::images::Image::new(w as u32, h as u32, fr::PixelType::U8);
        resizer.resize(&src, &mut dst, &options).expect("same pixel type, non-empty sizes");
        data.extend_from_slice(dst.buffer());
    }
    Img { c: img.c, h, w, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(c: usize, h: usize, w: usize) -> Img {
        Img { c, h, w, data: (0..c * h * w).map(|i| (i % 251) as u8).collect() }
    }

    #[test]
    fn crops_flips_and_pads_as_torchvision() {
        let img = ramp(1, 4, 5);
        let mut rng = SampleRng::new(0, 0, 0);
        let (v, shape) = apply(&[Transform::CenterCrop(2)], img.clone(), &mut rng);
        assert_eq!(shape, [1, 2, 2]);
        // rows 1..3 (round(1.0)), columns 2..4 (round(1.5) = 2)
        assert_eq!(v, [7.0, 8.0, 12.0, 13.0].map(|x: f32| x / 255.0));
        let mut flipped = img.clone();
        flip(&mut flipped);
        assert_eq!(&flipped.data[..5], &[4, 3, 2, 1, 0]);
        // A 4×4 image padded by 1 and a 6×6 window: the whole padded image, zeros around.
        let (v, shape) = apply(&[Transform::RandomCrop { size: 6, padding: 1 }], ramp(1, 4, 4), &mut rng);
        assert_eq!(shape, [1, 6, 6]);
        assert!(v[..7].iter().all(|&x| x == 0.0), "{v:?}");
        assert_eq!((v[8], v[11], v[12], v[13]), (1.0 / 255.0, 0.0, 0.0, 4.0 / 255.0));
        // Python's round: halves to even (round(2.5) = 2), as torchvision computes the offset.
        let (v, _) = apply(&[Transform::CenterCrop(1)], ramp(1, 6, 6), &mut rng);
        assert_eq!(v, [14.0 / 255.0], "row 2, column 2");
        let (v, _) = apply(&[Transform::Normalize { mean: vec![0.5], std: vec![0.25] }], ramp(1, 1, 1), &mut rng);
        assert_eq!(v, [(0.0 - 0.5) / 0.25]);
    }

    #[test]
    fn random_choices_depend_on_seed_epoch_and_index_only() {
        let p = [Transform::RandomCrop { size: 24, padding: 4 }, Transform::RandomHorizontalFlip(0.5)];
        let img = ramp(3, 28, 28);
        let run = |s, e, i| apply(&p, img.clone(), &mut SampleRng::new(s, e, i)).0;
        assert_eq!(run(1, 2, 3), run(1, 2, 3));
        let distinct = [run(1, 2, 4), run(1, 3, 3), run(2, 2, 3)].iter().filter(|v| **v != run(1, 2, 3)).count();
        assert!(distinct >= 2, "different (seed, epoch, index) should mostly give different crops");
        let mut rng = SampleRng::new(5, 0, 0);
        let flips = (0..10_000).filter(|_| rng.unit() < 0.5).count();
        assert!((4_700..5_300).contains(&flips), "{flips}");
    }

    #[test]
    fn resize_keeps_the_aspect_ratio_of_the_shorter_side() {
        let (_, shape) = apply(&[Transform::Resize(16)], ramp(3, 32, 48), &mut SampleRng::new(0, 0, 0));
        assert_eq!(shape, [3, 16, 24]);
        let (_, shape) = apply(&[Transform::Resize(10), Transform::CenterCrop(8)], ramp(1, 40, 20), &mut SampleRng::new(0, 0, 0));
        assert_eq!(shape, [1, 8, 8]);
    }

    #[test]
    fn bad_pipelines_are_named() {
        let n = |m: Vec<f32>| Transform::Normalize { mean: m.clone(), std: m };
        assert!(validate(&[n(vec![0.5]), Transform::RandomHorizontalFlip(0.5)], Some(1)).unwrap_err().contains("last"));
        assert!(validate(&[n(vec![0.5, 0.5])], Some(3)).unwrap_err().contains("2 values for images of 3"));
        assert!(validate(&[Transform::RandomHorizontalFlip(1.5)], None).unwrap_err().contains("probability"));
        assert!(validate(&[Transform::CenterCrop(0)], None).is_err());
        assert!(validate(&[Transform::Resize(8), n(vec![0.5, 0.5, 0.5])], Some(3)).is_ok());
    }
}
