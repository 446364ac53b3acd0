//! Images, PNG metadata and atomic writes: outputs and checkpoints are written to a temporary
//! file next to the destination and renamed, so an interrupted run never leaves half a file.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Writes `path` atomically: `write` fills a temporary file in the same folder, which is then
/// synced and renamed over `path`. Every error (a full disk, a read-only folder) names `path`,
/// and the temporary file is removed.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut std::fs::File) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    create_dir_all(&dir)?;
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let written = || format!("cannot write {}", path.display());
        write(&mut f).with_context(written)?;
        f.flush().with_context(written)?;
        f.sync_all().with_context(written)?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `std::fs::create_dir_all` with an error that names the folder.
pub fn create_dir_all(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))
}

/// Writes bytes atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |f| Ok(f.write_all(bytes)?))
}

/// A network's variables under their (upstream) key names, as float32 or, with `fp16`, float16,
/// written atomically by [`write_safetensors_atomic`] (keys sorted, no metadata).
pub fn write_var_store_atomic(vs: &tch::nn::VarStore, path: &Path, fp16: bool) -> Result<()> {
    let vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, if fp16 { t.detach().to_kind(Kind::Half) } else { t.detach() }))
        .collect();
    write_safetensors_atomic(path, &vars, &Default::default())
}

/// Saves named tensors as safetensors with string metadata in the header, atomically.
///
/// The bytes are a function of the inputs only (keys sorted, no timestamps), so two equal
/// states give byte-identical files.
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut data: Vec<u8> = Vec::new();
    for (name, t) in sorted {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let dtype = match t.kind() {
            Kind::Float => "F32",
            Kind::Half => "F16",
            Kind::BFloat16 => "BF16",
            Kind::Double => "F64",
            Kind::Int64 => "I64",
            Kind::Int => "I32",
            Kind::Uint8 => "U8",
            k => bail!("cannot write tensor {name} of dtype {k:?} to {}", path.display()),
        };
        let numel = t.numel();
        let start = data.len();
        data.resize(start + numel * t.kind().elt_size_in_bytes(), 0);
        t.f_copy_data_u8(&mut data[start..], numel)?;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.size(), "data_offsets": [start, data.len()]}),
        );
    }
    // serde_json's Map is a BTreeMap here: keys come out sorted.
    let mut head = serde_json::to_vec(&header)?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    write_atomic(path, |f| {
        f.write_all(&(head.len() as u64).to_le_bytes())?;
        f.write_all(&head)?;
        f.write_all(&data)?;
        Ok(())
    })
}

/// An 8-bit RGB image, rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// From a (H, W, 3) uint8 tensor.
    pub fn from_hwc_u8(t: &Tensor) -> Result<Self> {
        let (h, w, c) = t.size3().context("image tensor must be (H, W, 3)")?;
        if c != 3 || t.kind() != Kind::Uint8 {
            bail!("image tensor must be (H, W, 3) uint8, got {:?} {:?}", t.size(), t.kind());
        }
        let flat = t.contiguous().view([-1]);
        let n = (h * w * 3) as usize;
        let mut pixels = vec![0u8; n];
        flat.copy_data(&mut pixels, n);
        Ok(Self { width: w as u32, height: h as u32, pixels })
    }

    /// PNG bytes, with `text` chunks (keyword, value).
    pub fn to_png(&self, text: &[(&str, &str)]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width, self.height);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            for (k, v) in text {
                if v.is_ascii() {
                    enc.add_text_chunk(k.to_string(), v.to_string())?;
                } else {
                    enc.add_itxt_chunk(k.to_string(), v.to_string())?;
                }
            }
            let mut w = enc.write_header()?;
            w.write_image_data(&self.pixels)?;
        }
        Ok(out)
    }

    /// Writes a PNG atomically.
    pub fn save_png(&self, path: &Path, text: &[(&str, &str)]) -> Result<()> {
        write_bytes_atomic(path, &self.to_png(text)?)
    }
}

/// Reads the text chunks (tEXt, zTXt, iTXt) of a PNG file.
pub fn png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(f))
        .read_info()
        .with_context(|| format!("{} is not a PNG", path.display()))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> =
        info.uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
    for t in &info.utf8_text {
        out.push((t.keyword.clone(), t.get_text().unwrap_or_default()));
    }
    for t in &info.compressed_latin1_text {
        out.push((t.keyword.clone(), t.get_text().unwrap_or_default()));
    }
    Ok(out)
}

/// One image (3, H, W) in [-1, 1] -> (H, W, 3) uint8 (see [`decoded_to_u8`]).
pub fn image_to_u8(image: &Tensor) -> Tensor {
    decoded_to_u8(&image.unsqueeze(0)).squeeze_dim(0)
}

/// A mask (H, W) in [0, 1] -> a gray (H, W, 3) uint8 image.
pub fn mask_to_u8(mask: &Tensor) -> Tensor {
    (mask.to_device(tch::Device::Cpu) * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .unsqueeze(-1)
        .repeat([1, 1, 3])
}

/// Decoder output (B, 3, H, W) in about [-1, 1] -> (B, H, W, 3) uint8, as diffusers'
/// `VaeImageProcessor.postprocess(output_type="np")` then `numpy_to_pil`:
/// (x·0.5 + 0.5).clamp(0, 1), ×255, round half to even.
pub fn decoded_to_u8(images: &Tensor) -> Tensor {
    let x = (images.to_kind(Kind::Float) * 0.5 + 0.5).clamp(0.0, 1.0);
    let x = x.to_device(tch::Device::Cpu).permute([0, 2, 3, 1]); // (B, H, W, 3)
    (x * 255.0).round().to_kind(Kind::Uint8)
}

/// Resizes `img` to cover `width`×`height` (the scale that fills both sides) and crops the
/// centre.
pub fn fit_cover(
    img: &image::DynamicImage,
    width: u32,
    height: u32,
    filter: image::imageops::FilterType,
) -> image::DynamicImage {
    use image::GenericImageView;
    let (w, h) = img.dimensions();
    let scale = (width as f64 / w as f64).max(height as f64 / h as f64);
    let (nw, nh) = (((w as f64 * scale).round() as u32).max(width), ((h as f64 * scale).round() as u32).max(height));
    let r = img.resize_exact(nw, nh, filter);
    r.crop_imm((nw - width) / 2, (nh - height) / 2, width, height)
}

/// The largest side, in pixels, of an image hifi-tuner reads. Checked from the file's header
/// before anything is decoded, so a huge (or hostile) file costs nothing.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// The most pixels an image may have: 100 megapixels, more than any camera photo; decoded it is
/// 300 MB (8-bit RGB). Every photo is resized to the model's size (512 px for SD-1.x) anyway.
pub const MAX_IMAGE_PIXELS: u64 = 100_000_000;
/// The shortest side of a photo: below 16 px a photo holds next to nothing of its subject
/// (SD's VAE maps 8 px to one latent cell, so a 16 px photo is 2×2 latent cells) and would be
/// enlarged 32× to SD-1.x's 512 px.
pub const MIN_PHOTO_SIDE: u32 = 16;
/// The most elongated photo: photos are centre-cropped to the model's (square) shape, and past
/// 4:1 that crop keeps less than a quarter of the photo, most likely missing the subject.
pub const MAX_PHOTO_ASPECT: f64 = 4.0;

/// Opens an image file (PNG or JPEG, recognised by its content): its size is checked from
/// the header against [`MAX_IMAGE_SIDE`] and [`MAX_IMAGE_PIXELS`] before decoding, and its
/// EXIF orientation is applied (a phone photo stored sideways comes out upright, as PIL's
/// `ImageOps.exif_transpose` in diffusers' `train_dreambooth.py`). Every image hifi-tuner
/// reads goes through here; errors name the file.
pub fn open_image(path: &Path) -> Result<image::DynamicImage> {
    use image::ImageDecoder;
    let what = || format!("cannot read image {}", path.display());
    let reader =
        || -> Result<_> { image::ImageReader::open(path).with_context(what)?.with_guessed_format().with_context(what) };
    // The size, from the header alone (no limits: nothing is allocated for the pixels yet).
    let mut probe = reader()?;
    probe.no_limits();
    let (w, h) = probe.into_dimensions().with_context(what)?;
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || (w as u64) * (h as u64) > MAX_IMAGE_PIXELS {
        bail!(
            "image {} is {w}x{h} pixels: hifi-tuner reads images of at most {MAX_IMAGE_SIDE} pixels a side and {} \
             megapixels (photos are resized to the model's size, 512 px for SD-1.x, anyway); downscale it first",
            path.display(),
            MAX_IMAGE_PIXELS / 1_000_000
        );
    }
    if w == 0 || h == 0 {
        bail!("image {} has no pixels ({w}x{h})", path.display());
    }
    let mut reader = reader()?;
    let mut limits = image::Limits::default();
    // The bound on what the decoder allocates covers the largest image allowed, at 16 bits per
    // channel with alpha.
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().with_context(what)?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = image::DynamicImage::from_decoder(decoder).with_context(what)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// [`open_image`] for a photo of a subject or a scene: also refuses a shorter side below
/// [`MIN_PHOTO_SIDE`] and an aspect ratio beyond [`MAX_PHOTO_ASPECT`] (both say why).
pub fn open_photo(path: &Path) -> Result<image::DynamicImage> {
    let img = open_image(path)?;
    check_photo_shape(path, img.width(), img.height())?;
    Ok(img)
}

/// The shape rules of [`open_photo`].
pub fn check_photo_shape(path: &Path, w: u32, h: u32) -> Result<()> {
    let (short, long) = (w.min(h), w.max(h));
    if short < MIN_PHOTO_SIDE {
        bail!(
            "photo {} is {w}x{h} pixels: a photo needs at least {MIN_PHOTO_SIDE} pixels on its shorter side (it \
             is resized to the model's size, 512 px for SD-1.x, and below that holds next to nothing of its subject)",
            path.display()
        );
    }
    if long as f64 > MAX_PHOTO_ASPECT * short as f64 {
        bail!(
            "photo {} is {w}x{h} pixels (aspect ratio {:.1}:1): at most {MAX_PHOTO_ASPECT}:1 is accepted, because \
             photos are centre-cropped to the model's shape and beyond that the crop keeps under a quarter of \
             the photo; crop it around the subject first",
            path.display(),
            long as f64 / short as f64
        );
    }
    Ok(())
}

/// A photo resized to cover (height, width) and centre-cropped (Catmull-Rom), as (3, H, W) in
/// [-1, 1]; the error names the file.
pub fn load_image_cover(path: &Path, height: i64, width: i64) -> Result<Tensor> {
    let img = open_photo(path)?;
    let rgb = fit_cover(&img, width as u32, height as u32, image::imageops::FilterType::CatmullRom).to_rgb8();
    let t = Tensor::from_slice(&rgb.into_raw()).view([height, width, 3]).permute([2, 0, 1]); // (3, H, W) u8
    Ok(t.to_kind(Kind::Float) / 127.5 - 1.0)
}

/// A photo at its own size as (H, W, 3) uint8; the error names the file.
pub fn load_rgb_u8(path: &Path) -> Result<Tensor> {
    let img = open_photo(path)?.to_rgb8();
    let (w, h) = img.dimensions();
    Ok(Tensor::from_slice(img.as_raw()).view([h as i64, w as i64, 3]))
}

/// The SHA-256 of a file's bytes, in hex (identifies a photo across runs).
pub fn file_sha256(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

/// A heat map (h, w) in [0, 1] tinted red over an image (H, W, 3) u8 → (H, W, 3) u8.
pub fn heat_overlay(image: &Tensor, heat: &Tensor) -> Tensor {
    let (h, w, _) = image.size3().expect("(H, W, 3)");
    let m = heat.to_device(tch::Device::Cpu).to_kind(Kind::Float).view([1, 1, heat.size()[0], heat.size()[1]]);
    let m = m.upsample_bilinear2d([h, w], false, None, None).view([h, w, 1]).clamp(0.0, 1.0) * 0.6; // (H, W, 1)
    let red = Tensor::from_slice(&[255f32, 32.0, 0.0]).view([1, 1, 3]);
    let img = image.to_device(tch::Device::Cpu).to_kind(Kind::Float);
    let keep: Tensor = 1.0 - &m;
    let out: Tensor = img * keep + red * &m;
    out.round().clamp(0.0, 255.0).to_kind(Kind::Uint8)
}
