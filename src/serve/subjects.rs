//! The app's subjects: `DATA/subjects/ID/` with `subject.json` (name, class noun, where the
//! masks came from), `photos/STEM.png`, `masks/STEM.png` (white = subject, the layout `learn
//! --masks` reads) and `overlays/STEM.png`. Every upload is decoded before anything is kept and
//! stored re-encoded as PNG; a subject folder appears whole (built in `DATA/tmp/`, then renamed).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const SUBJECT_FILE: &str = "subject.json";
/// Photos per subject, as the paper (3–6).
pub const MIN_PHOTOS: usize = 3;
pub const MAX_PHOTOS: usize = 6;
/// The largest side an upload may have (decoded), and the largest file.
pub const MAX_SIDE: u32 = 4096;
pub const MAX_FILE_BYTES: usize = 20 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubjectSpec {
    pub id: String,
    pub name: String,
    pub class_noun: String,
    /// `uploaded`, `sam`, `attention`, or none yet.
    pub mask_source: Option<String>,
    pub mask_warning: Option<String>,
    pub created: f64,
}

/// An uploaded file: the form field's file name and its bytes.
pub struct Upload {
    pub file_name: String,
    pub bytes: Vec<u8>,
}

/// A file name's stem if it is a plain name (letters, digits, `-`, `_`, `.`; no path).
pub fn clean_stem(file_name: &str) -> Result<String> {
    let stem = Path::new(file_name).file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let plain = !stem.is_empty()
        && stem.len() <= 64
        && !file_name.contains('/')
        && !file_name.contains('\\')
        && !stem.starts_with('.')
        && stem.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !plain {
        bail!("{file_name:?}: a file name may hold only letters, digits, '-', '_' and '.'");
    }
    Ok(stem.to_string())
}

/// Decodes an uploaded image (PNG or JPEG), or says which file is not one.
pub fn decode(u: &Upload, what: &str) -> Result<image::DynamicImage> {
    if u.bytes.len() > MAX_FILE_BYTES {
        bail!("{what} {:?} is {} bytes; the limit is {MAX_FILE_BYTES}", u.file_name, u.bytes.len());
    }
    let img = image::load_from_memory(&u.bytes)
        .map_err(|e| anyhow::anyhow!("{what} {:?} is not a PNG or JPEG image ({e})", u.file_name))?;
    if img.width() > MAX_SIDE || img.height() > MAX_SIDE || img.width() < 8 || img.height() < 8 {
        bail!(
            "{what} {:?} is {}×{}; sides from 8 to {MAX_SIDE} pixels are accepted",
            u.file_name,
            img.width(),
            img.height()
        );
    }
    Ok(img)
}

pub struct Subjects {
    pub dir: PathBuf,
    tmp: PathBuf,
    lock: std::sync::Mutex<()>,
}

impl Subjects {
    pub fn open(data: &Path) -> Result<Self> {
        let dir = data.join("subjects");
        let tmp = data.join("tmp");
        crate::io::create_dir_all(&dir)?;
        crate::io::create_dir_all(&tmp)?;
        Ok(Self { dir, tmp, lock: std::sync::Mutex::new(()) })
    }

    pub fn subject_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    pub fn get(&self, id: &str) -> Result<Option<SubjectSpec>> {
        if !super::jobs::valid_id(id, 's') {
            return Ok(None);
        }
        let p = self.subject_dir(id).join(SUBJECT_FILE);
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not a subject file", p.display()))?))
    }

    pub fn list(&self) -> Result<Vec<SubjectSpec>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.dir).with_context(|| format!("cannot read {}", self.dir.display()))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(s) = self.get(&name)? {
                v.push(s);
            }
        }
        v.sort_by_key(|s| super::jobs::id_number(&s.id));
        Ok(v)
    }

    pub fn save(&self, s: &SubjectSpec) -> Result<()> {
        let p = self.subject_dir(&s.id).join(SUBJECT_FILE);
        crate::io::write_bytes_atomic(&p, serde_json::to_string_pretty(s)?.as_bytes())
    }

    /// Checks everything, then writes the subject folder whole. Errors name the file at fault.
    pub fn create(&self, name: &str, class_noun: &str, photos: &[Upload], masks: &[Upload]) -> Result<SubjectSpec> {
        let name = name.trim();
        let class_noun = class_noun.trim();
        if name.is_empty() || name.len() > 80 {
            bail!("name: give the subject a name (1–80 characters)");
        }
        if class_noun.is_empty()
            || class_noun.len() > 40
            || !class_noun.chars().all(|c| c.is_alphanumeric() || c == ' ' || c == '-')
        {
            bail!("class_noun: one or two plain words, e.g. \"dog\" or \"backpack\" (got {class_noun:?})");
        }
        if photos.len() < MIN_PHOTOS || photos.len() > MAX_PHOTOS {
            bail!("photos: {MIN_PHOTOS} to {MAX_PHOTOS} photos of the subject, got {}", photos.len());
        }
        let mut decoded = Vec::new();
        for u in photos {
            let stem = clean_stem(&u.file_name)?;
            if decoded.iter().any(|(s, _): &(String, _)| *s == stem) {
                bail!("photos: two photos share the name {stem:?}");
            }
            decoded.push((stem, decode(u, "photo")?));
        }
        let mut decoded_masks = Vec::new();
        for u in masks {
            let stem = clean_stem(&u.file_name)?;
            let Some((_, photo)) = decoded.iter().find(|(s, _)| *s == stem) else {
                bail!("masks: {:?} pairs with no photo (a mask takes its photo's name)", u.file_name);
            };
            let m = decode(u, "mask")?;
            if (m.width(), m.height()) != (photo.width(), photo.height()) {
                bail!(
                    "masks: {:?} is {}×{}, its photo {}×{}",
                    u.file_name,
                    m.width(),
                    m.height(),
                    photo.width(),
                    photo.height()
                );
            }
            decoded_masks.push((stem, m));
        }
        if !decoded_masks.is_empty() && decoded_masks.len() != decoded.len() {
            bail!(
                "masks: give a mask for every photo or none ({} masks, {} photos)",
                decoded_masks.len(),
                decoded.len()
            );
        }
        let _g = self.lock.lock().unwrap();
        let n = self.list()?.iter().map(|s| super::jobs::id_number(&s.id)).max().unwrap_or(0) + 1;
        let id = format!("s{n}");
        let spec = SubjectSpec {
            id: id.clone(),
            name: name.into(),
            class_noun: class_noun.into(),
            mask_source: (!decoded_masks.is_empty()).then(|| "uploaded".into()),
            mask_warning: None,
            created: super::jobs::now(),
        };
        let tmp = self.tmp.join(format!("{id}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        let build = || -> Result<()> {
            for (stem, img) in &decoded {
                save_png(&tmp.join("photos").join(format!("{stem}.png")), img)?;
            }
            for (stem, m) in &decoded_masks {
                save_png(
                    &tmp.join("masks").join(format!("{stem}.png")),
                    &image::DynamicImage::ImageLuma8(m.to_luma8()),
                )?;
                write_overlay(&tmp, stem)?;
            }
            crate::io::write_bytes_atomic(&tmp.join(SUBJECT_FILE), serde_json::to_string_pretty(&spec)?.as_bytes())?;
            Ok(())
        };
        if let Err(e) = build() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, self.subject_dir(&id))
            .with_context(|| format!("cannot move {} into place", tmp.display()))?;
        Ok(spec)
    }

    /// Replaces one photo's mask by an upload.
    pub fn set_mask(&self, id: &str, stem: &str, u: &Upload) -> Result<()> {
        let dir = self.subject_dir(id);
        let photo = dir.join("photos").join(format!("{stem}.png"));
        if clean_stem(&format!("{stem}.png")).is_err() || !photo.is_file() {
            bail!("subject {id} has no photo {stem:?}");
        }
        let m = decode(u, "mask")?;
        let p = image::image_dimensions(&photo).with_context(|| format!("cannot read {}", photo.display()))?;
        if (m.width(), m.height()) != p {
            bail!("mask {:?} is {}×{}, the photo {stem} {}×{}", u.file_name, m.width(), m.height(), p.0, p.1);
        }
        let masks = dir.join("masks");
        let n_photos = crate::subject::data::images_by_stem(&dir.join("photos"))?.len();
        let n_masks = if masks.is_dir() { crate::subject::data::images_by_stem(&masks)?.len() } else { 0 };
        if n_masks == 0 && n_photos > 1 {
            bail!("subject {id} has no masks yet: compute them (POST /api/subjects/{id}/masks) or upload all at creation, then replace one");
        }
        save_png(&masks.join(format!("{stem}.png")), &image::DynamicImage::ImageLuma8(m.to_luma8()))?;
        write_overlay(&dir, stem)?;
        let mut s = self.get(id)?.context("subject vanished")?;
        s.mask_source = Some("uploaded".into());
        s.mask_warning = None;
        self.save(&s)
    }
}

/// `overlays/STEM.png` of a subject folder: the photo with its mask tinted red (the subject) and
/// the rest dimmed, as `mask` draws its overlays.
pub fn write_overlay(dir: &Path, stem: &str) -> Result<()> {
    let photo = dir.join("photos").join(format!("{stem}.png"));
    let mask = dir.join("masks").join(format!("{stem}.png"));
    let p = image::open(&photo).with_context(|| format!("cannot read {}", photo.display()))?.to_rgb8();
    let m = image::open(&mask).with_context(|| format!("cannot read {}", mask.display()))?.to_luma8();
    if p.dimensions() != m.dimensions() {
        bail!("{} and {} differ in size", photo.display(), mask.display());
    }
    let mut o = p.clone();
    for (x, y, px) in o.enumerate_pixels_mut() {
        let inside = m.get_pixel(x, y).0[0] > 127;
        for (c, v) in px.0.iter_mut().enumerate() {
            let f = f32::from(*v);
            *v = if inside {
                (0.55 * f + 0.45 * [255.0, 40.0, 40.0][c]).round() as u8
            } else {
                (0.45 * f).round() as u8
            };
        }
    }
    save_png(&dir.join("overlays").join(format!("{stem}.png")), &image::DynamicImage::ImageRgb8(o))
}

/// Writes a PNG atomically (temp file + rename).
pub fn save_png(path: &Path, img: &image::DynamicImage) -> Result<()> {
    if let Some(d) = path.parent() {
        crate::io::create_dir_all(d)?;
    }
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::io::write_bytes_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems() {
        assert_eq!(clean_stem("dog_01.JPG").unwrap(), "dog_01");
        for bad in ["../x.png", "a/b.png", ".png", "a b.png", "é.png", ""] {
            assert!(clean_stem(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_text_file_named_png_is_refused_by_name() {
        let u = Upload { file_name: "notes.png".into(), bytes: b"hello".to_vec() };
        let e = decode(&u, "photo").unwrap_err().to_string();
        assert!(e.contains("notes.png") && e.contains("not a PNG or JPEG"), "{e}");
    }
}
