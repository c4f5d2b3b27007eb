//! torchvision's `ImageFolder`: one sub-folder per class, classes sorted by name and numbered from
//! 0, the images inside (any depth) sorted by path. JPEG and PNG, decoded to RGB as ImageFolder's
//! default loader does.

use super::super::{DataError, DataKind, DataSpec, LoadContext, Splits};
use super::{CorruptImages, Images, Source, TransformsConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const KIND: DataKind = DataKind::of::<FolderSpec>("image_folder");

/// `data: {format: image_folder, dir: …}`: torchvision's ImageFolder, `dir/train/CLASS/*.jpg|png`
/// and `dir/val/…` (or `dir/test/…`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FolderSpec {
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Image transforms per split (files differ in size: a resize and crop belong here).
    #[serde(default)]
    pub transforms: Option<TransformsConfig>,
    /// Images that cannot be decoded: `error` (default) or `skip` (counted and reported).
    #[serde(default)]
    pub corrupt_images: CorruptImages,
}

impl DataSpec for FolderSpec {
    fn validate(&self) -> Result<(), String> {
        if self.dir.is_none() {
            return Err("data.dir is required when data.format is image_folder".into());
        }
        super::check_pipeline(self.transforms.as_ref(), None, 3)
    }

    fn load(&self, ctx: &LoadContext) -> Result<Splits, DataError> {
        let dir = self.dir.as_deref().expect("validated: image_folder has a dir");
        let (train_classes, train) = scan(&dir.join("train"))?;
        let test_dir = ["val", "test"]
            .iter()
            .map(|s| dir.join(s))
            .find(|p| p.is_dir())
            .ok_or_else(|| DataError::Invalid(format!("{}: no val/ or test/ folder beside train/ for evaluation", dir.display())))?;
        let (test_classes, test) = scan(&test_dir)?;
        // ImageFolder numbers each split's folders on its own: the same names or the labels differ.
        if test_classes != train_classes {
            return Err(DataError::Invalid(format!(
                "{}: class folders differ from train/'s ({} vs {}): the class numbers would not match",
                test_dir.display(),
                test_classes.len(),
                train_classes.len()
            )));
        }
        tracing::info!(
            "image folder {}: {} classes, {} train and {} test images",
            dir.display(),
            train_classes.len(),
            train.len(),
            test.len()
        );
        let files = |v: Vec<(PathBuf, i64)>| {
            let (paths, labels): (Vec<PathBuf>, Vec<i64>) = v.into_iter().unzip();
            (Source::Files(paths), labels)
        };
        let (train, test, classes) = (files(train), files(test), train_classes.len());
        let (transforms, corrupt) = (self.transforms.clone(), self.corrupt_images);
        super::splits(Images { train, test, classes, transforms, normalize: None, corrupt }, ctx.seed)
    }
}

/// Extensions read (lower-cased).
pub const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Class names (sorted) and (path, class) for every image under `root`.
pub fn scan(root: &Path) -> Result<(Vec<String>, Vec<(PathBuf, i64)>), DataError> {
    let read_dir = |d: &Path| std::fs::read_dir(d).map_err(|e| DataError::Invalid(format!("{}: cannot be listed: {e}", d.display())));
    let mut classes: Vec<String> = vec![];
    for e in read_dir(root)? {
        let e = e.map_err(|e| DataError::Invalid(format!("{}: {e}", root.display())))?;
        if e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.') {
            classes.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    classes.sort();
    if classes.is_empty() {
        return Err(DataError::Invalid(format!(
            "{}: no class folders (ImageFolder layout: {}/CLASS/IMAGE.jpg)",
            root.display(),
            root.display()
        )));
    }
    let mut samples = vec![];
    for (k, class) in classes.iter().enumerate() {
        let mut files = vec![];
        walk(&root.join(class), &mut files)?;
        files.sort();
        samples.extend(files.into_iter().map(|f| (f, k as i64)));
    }
    if samples.is_empty() {
        return Err(DataError::Invalid(format!("{}: no .jpg, .jpeg or .png images in its class folders", root.display())));
    }
    Ok((classes, samples))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::Invalid(format!("{}: cannot be listed: {e}", dir.display())))?;
    for e in entries {
        let p = e.map_err(|e| DataError::Invalid(format!("{}: {e}", dir.display())))?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.extension().is_some_and(|x| EXTENSIONS.contains(&x.to_string_lossy().to_lowercase().as_str())) {
            out.push(p);
        }
    }
    Ok(())
}

/// Decodes `path` to 8-bit RGB, channels first.
pub fn decode(path: &Path) -> Result<super::transforms::Img, String> {
    let img = image::open(path).map_err(|e| e.to_string())?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let hwc = img.into_raw();
    let mut data = vec![0u8; 3 * h * w];
    for (i, px) in hwc.chunks_exact(3).enumerate() {
        data[i] = px[0];
        data[h * w + i] = px[1];
        data[2 * h * w + i] = px[2];
    }
    Ok(super::transforms::Img { c: 3, h, w, data })
}
