//! Training photos and subject masks: pairing by file stem, validation, resize / centre-crop to
//! the model's resolution, and the mask brought to latent size by area averaging (a soft mask
//! M ∈ [0, 1]: a latent cell's weight is the fraction of its pixels that are subject).

use anyhow::{bail, Context, Result};
use image::{imageops::FilterType, DynamicImage, GenericImageView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// One training photo at the model's resolution.
#[derive(Debug)]
pub struct Photo {
    pub path: PathBuf,
    /// (3, S, S) in [-1, 1].
    pub image: Tensor,
    /// (1, S, S) in [0, 1] (white = subject), when masks were given.
    pub mask: Option<Tensor>,
    pub mask_path: Option<PathBuf>,
}

/// Image files of a folder by stem, sorted.
pub fn images_by_stem(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))?;
    let mut out = BTreeMap::new();
    for e in rd {
        let p = e?.path();
        let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        if p.is_file() && IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            if let Some(prev) = out.insert(stem.clone(), p.clone()) {
                bail!("two images share the stem {stem:?}: {} and {}", prev.display(), p.display());
            }
        }
    }
    Ok(out)
}

/// Resizes the shorter side to `size` and crops the centre square.
fn fit(img: &DynamicImage, size: u32, filter: FilterType) -> DynamicImage {
    crate::io::fit_cover(img, size, size, filter)
}

/// (C, S, S) float tensor in [0, 1] from 8-bit channels.
fn to_tensor(pixels: Vec<u8>, channels: i64, size: u32) -> Tensor {
    let s = size as i64;
    Tensor::from_slice(&pixels).view([s, s, channels]).permute([2, 0, 1]).to_kind(Kind::Float) / 255.0
}

/// How strictly a mask must match its photo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskFit {
    /// Same aspect ratio (masks are resized with their photos): training photos.
    SameAspect,
    /// Exactly the photo's size: reference photos for guidance, where a mask of another size
    /// is more likely a mismatched file than a rescaled one.
    SameSize,
}

/// Loads the photos of `images` (and the masks of `masks`, paired by file stem), resized and
/// centre-cropped to `size`×`size`. Errors name the offending file.
pub fn load_photos(images: &Path, masks: Option<&Path>, size: u32, fit_rule: MaskFit) -> Result<Vec<Photo>> {
    let imgs = images_by_stem(images)?;
    if imgs.is_empty() {
        bail!("no images (.jpg, .jpeg, .png) in {}", images.display());
    }
    let mask_files = match masks {
        Some(m) => Some(images_by_stem(m)?),
        None => None,
    };
    if let Some(mf) = &mask_files {
        for (stem, p) in mf {
            if !imgs.contains_key(stem) {
                bail!("mask {} has no image with the stem {stem:?} in {}", p.display(), images.display());
            }
        }
    }
    let mut photos = Vec::new();
    for (stem, path) in &imgs {
        let img = crate::io::open_photo(path)?;
        let image = to_tensor(fit(&img, size, FilterType::CatmullRom).to_rgb8().into_raw(), 3, size) * 2.0 - 1.0;
        let (mask, mask_path) = match &mask_files {
            None => (None, None),
            Some(mf) => {
                let mp = mf.get(stem).with_context(|| {
                    format!(
                        "image {} has no mask with the stem {stem:?} in {}",
                        path.display(),
                        masks.unwrap().display()
                    )
                })?;
                (Some(fit(&load_mask(mp, &img, fit_rule)?, size, FilterType::Triangle)), Some(mp.clone()))
            }
        };
        let mask = mask.map(|m| to_tensor(m.to_luma8().into_raw(), 1, size));
        photos.push(Photo { path: path.clone(), image, mask, mask_path });
    }
    Ok(photos)
}

/// Reads a mask and checks it against its image: same aspect ratio (or size), some white.
fn load_mask(path: &Path, image: &DynamicImage, rule: MaskFit) -> Result<DynamicImage> {
    let m = crate::io::open_image(path)?;
    let (mw, mh) = m.dimensions();
    let (iw, ih) = image.dimensions();
    if rule == MaskFit::SameSize && (mw, mh) != (iw, ih) {
        bail!("mask {} is {mw}x{mh} but its image is {iw}x{ih}: they must have the same size", path.display());
    }
    let (ra, rb) = (mw as f64 / mh as f64, iw as f64 / ih as f64);
    if (ra / rb - 1.0).abs() > 0.01 {
        bail!("mask {} is {mw}x{mh} but its image is {iw}x{ih}: the aspect ratios differ", path.display());
    }
    if !m.to_luma8().pixels().any(|p| p.0[0] >= 128) {
        bail!("mask {} is all black: it marks no subject pixels (white = subject)", path.display());
    }
    Ok(m)
}

/// M at latent size (N, 1, h, w) by area averaging of pixel masks (N, 1, S, S).
pub fn latent_masks(masks: &Tensor, h: i64, w: i64) -> Tensor {
    masks.adaptive_avg_pool2d([h, w])
}
