//! torchvision's `ImageFolder`: one sub-folder per class, classes sorted by name and numbered from
//! 0, the images inside (any depth) sorted by path. JPEG and PNG, decoded to RGB as ImageFolder's
//! default loader does.

use super::super::DataError;
use std::path::{Path, PathBuf};

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
