//! DINO ViT image embeddings: preprocessing, CLS embedding, cosine similarity.
//!
//! HiFi Tuner §3.3 picks, among a subject's source photos, the one whose DINO ViT-S/16
//! embedding is most similar (cosine) to a generated image ([`Dino::most_similar`]). The model
//! is a transformers `ViTModel` folder (`config.json` + `model.safetensors`, the layout of
//! `facebook/dino-vits16`), see [`crate::models::vit`].
//!
//! # Preprocessing ([`preprocess`])
//!
//! The DINO evaluation transform (torchvision), parameterised by the model's square
//! `image_size` S so tiny test configs work (S = 224 gives exactly the usual numbers):
//!
//! 1. convert to RGB (8 bit);
//! 2. `Resize(R)` with R = round(S·256/224) (256 for S = 224): the shorter side becomes R, the
//!    longer side `int(R · long / short)` (truncated), bicubic;
//! 3. `CenterCrop(S)`: offsets `round((H − S) / 2)`, `round((W − S) / 2)` with Python's
//!    round-half-to-even (37 → 32 crops from offset 2, not 3);
//! 4. `ToTensor` (÷ 255) and `Normalize` with the ImageNet mean (0.485, 0.456, 0.406) and std
//!    (0.229, 0.224, 0.225).
//!
//! Step 2 uses the `image` crate's `CatmullRom` filter. That is the same cubic kernel as
//! PIL's `BICUBIC` (Keys, a = −0.5) and, like PIL, widens the kernel when downscaling; it is
//! **close to, not identical with**, PIL: PIL computes fixed-point weights and rounds to 8 bit
//! between its horizontal and vertical passes, the `image` crate keeps `f32` between passes.
//! JPEG decoding also differs slightly between PIL (libjpeg-turbo) and the `image` crate.
//! Measured on the fixture photo (64×64 JPEG → 37×37 → 32×32, tests/dino.rs), in normalised
//! units: from the same decoded pixels 0.003 mean / 0.018 max absolute difference to
//! torchvision + PIL; from the JPEG file (decoders differ by ≤ 3/255) 0.007 mean / 0.035 max.
//! The CLS embeddings of the tiny test model then agree to cosine 0.99998.
//!
//! # Embedding
//!
//! The embedding of an image is the CLS token (row 0) of the ViT's last hidden state, after
//! the final `layernorm` — not transformers' `pooler_output` (DINO has no trained pooler).

use crate::models::vit::ViTModel;
use anyhow::{bail, Result};
use image::{imageops::FilterType, DynamicImage};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// ImageNet channel means (RGB).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Images embedded per forward pass in [`Dino::embed_images`].
const BATCH: usize = 32;

/// A DINO image encoder (evaluation only: its weights are frozen).
#[derive(Debug)]
pub struct Dino {
    pub model: ViTModel,
}

impl Dino {
    /// Loads a transformers `ViTModel` folder (`config.json` + `model.safetensors`). Its
    /// `image_size` must be square (the preprocessing crops a square).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let mut model = ViTModel::load(dir, device)?;
        let (h, w) = model.config.image_size.hw();
        if h != w {
            bail!(
                "{}: image_size [{h}, {w}] is not square; the DINO preprocessing crops a square",
                dir.join("config.json").display()
            );
        }
        model.vs.freeze();
        Ok(Self { model })
    }

    /// The side S of the square model input.
    pub fn image_size(&self) -> i64 {
        self.model.config.image_size.hw().0
    }

    /// The embedding width d (`hidden_size`).
    pub fn dim(&self) -> i64 {
        self.model.config.hidden_size
    }

    /// Preprocessed `pixel_values` (B, 3, S, S) -> CLS embeddings (B, d) on the model's device.
    /// Differentiable with respect to `pixel_values`.
    pub fn embed_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let hidden = self.model.f_forward(pixel_values)?; // (B, 1+N, d)
        Ok(hidden.select(1, 0)) // (B, d)
    }

    /// One image -> its embedding (d,) (preprocessed with [`preprocess`], no gradient).
    pub fn embed_image(&self, img: &DynamicImage) -> Result<Tensor> {
        Ok(self.embed_images(std::slice::from_ref(img))?.select(0, 0))
    }

    /// Images -> embeddings (n, d), in order (batches of 32, no gradient).
    pub fn embed_images(&self, images: &[DynamicImage]) -> Result<Tensor> {
        if images.is_empty() {
            bail!("no images to embed");
        }
        let s = self.image_size();
        let mut out = Vec::new();
        for chunk in images.chunks(BATCH) {
            let pixels = chunk.iter().map(|im| preprocess(im, s)).collect::<Result<Vec<_>>>()?;
            let batch = Tensor::stack(&pixels, 0); // (b, 3, S, S)
            out.push(tch::no_grad(|| self.embed_pixels(&batch))?);
        }
        Ok(Tensor::cat(&out, 0)) // (n, d)
    }

    /// The index of the candidate most similar (cosine of DINO embeddings) to `query`, and the
    /// cosine of every candidate, in order. Ties go to the first; a NaN cosine never wins.
    /// An empty candidate list is an error.
    pub fn most_similar(&self, query: &DynamicImage, candidates: &[DynamicImage]) -> Result<(usize, Vec<f64>)> {
        if candidates.is_empty() {
            bail!("most_similar: no candidate images");
        }
        let q = self.embed_image(query)?;
        let c = self.embed_images(candidates)?;
        let sims: Vec<f64> = (0..candidates.len() as i64).map(|i| cosine(&q, &c.get(i))).collect();
        let mut best = 0;
        for (i, &s) in sims.iter().enumerate() {
            if s > sims[best] || sims[best].is_nan() && !s.is_nan() {
                best = i;
            }
        }
        Ok((best, sims))
    }
}

/// Cosine similarity of two tensors of the same number of elements (flattened), in f64:
/// `a·b / max(‖a‖‖b‖, 1e-8)` (torch's `cosine_similarity` with its default eps).
///
/// Panics if the element counts differ (a programming error: both come from one model).
pub fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.numel(), b.numel(), "cosine of tensors with {:?} and {:?} elements", a.size(), b.size());
    let a = a.detach().to_device(Device::Cpu).to_kind(Kind::Double).flatten(0, -1);
    let b = b.detach().to_device(Device::Cpu).to_kind(Kind::Double).flatten(0, -1);
    let dot = a.dot(&b).double_value(&[]);
    let na = a.norm().double_value(&[]);
    let nb = b.norm().double_value(&[]);
    dot / (na * nb).max(1e-8)
}

/// The side R the shorter image side is resized to before the centre crop S:
/// round(S · 256 / 224), half to even as Python's `round` (256 for S = 224).
pub fn resize_size(image_size: i64) -> i64 {
    (image_size as f64 * 256.0 / 224.0).round_ties_even() as i64
}

/// The DINO evaluation transform (see the module docs): image -> normalised (3, S, S) f32 on
/// the CPU. Errors on an empty image or a non-positive `image_size`.
pub fn preprocess(img: &DynamicImage, image_size: i64) -> Result<Tensor> {
    if image_size <= 0 || image_size > u32::MAX as i64 / 2 {
        bail!("image_size must be positive, got {image_size}");
    }
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        bail!("cannot preprocess an empty ({w}x{h}) image");
    }
    let s = image_size as u32;
    // torchvision Resize(int): shorter side -> r, longer -> int(r * long / short).
    let r = resize_size(image_size) as u32;
    let (short, long) = (w.min(h), w.max(h));
    let new_long = (r as f64 * long as f64 / short as f64) as u32; // truncation, as int()
    let (nw, nh) = if w <= h { (r, new_long) } else { (new_long, r) };
    // `resize` copies instead of resampling when the size is unchanged (as torchvision does).
    let resized = image::imageops::resize(&rgb, nw, nh, FilterType::CatmullRom);
    // CenterCrop(s): Python round() of the offsets (half to even). r ≥ s, so no padding.
    let top = ((nh - s) as f64 / 2.0).round_ties_even() as u32;
    let left = ((nw - s) as f64 / 2.0).round_ties_even() as u32;
    let cropped = image::imageops::crop_imm(&resized, left, top, s, s).to_image();
    let raw = cropped.into_raw(); // S·S·3 bytes, HWC
    let x = Tensor::from_slice(&raw).view([image_size, image_size, 3]).permute([2, 0, 1]).to_kind(Kind::Float) / 255.0; // (3, S, S) in [0, 1]
    let mean = Tensor::from_slice(&IMAGENET_MEAN).view([3, 1, 1]);
    let std = Tensor::from_slice(&IMAGENET_STD).view([3, 1, 1]);
    Ok((x - mean) / std)
}
