//! Images, PNG metadata and atomic writes: outputs and checkpoints are written to a temporary
//! file next to the destination and renamed, so an interrupted run never leaves half a file.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Writes `path` atomically: `write` fills a temporary file in the same folder, which is then
/// synced and renamed over `path`.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut std::fs::File) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        write(&mut f)?;
        f.flush()?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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

/// A photo resized to cover (height, width) and centre-cropped (Catmull-Rom), as (3, H, W) in
/// [-1, 1]; the error names the file.
pub fn load_image_cover(path: &Path, height: i64, width: i64) -> Result<Tensor> {
    let img = image::open(path).with_context(|| format!("cannot read image {}", path.display()))?;
    let rgb = fit_cover(&img, width as u32, height as u32, image::imageops::FilterType::CatmullRom).to_rgb8();
    let t = Tensor::from_slice(&rgb.into_raw()).view([height, width, 3]).permute([2, 0, 1]); // (3, H, W) u8
    Ok(t.to_kind(Kind::Float) / 127.5 - 1.0)
}

/// A photo at its own size as (H, W, 3) uint8; the error names the file.
pub fn load_rgb_u8(path: &Path) -> Result<Tensor> {
    let img = image::open(path).with_context(|| format!("cannot read image {}", path.display()))?.to_rgb8();
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        bail!("image {} has no pixels", path.display());
    }
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
