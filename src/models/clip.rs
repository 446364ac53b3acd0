//! transformers' `CLIPModel` (text and vision towers with their projections) and
//! `CLIPImageProcessor`: the CLIP-I and CLIP-T metrics of DreamBooth (see [`crate::eval::metrics`]).
//!
//! # Layout
//!
//! A folder as `openai/clip-vit-base-patch32` ships it: `config.json` (`CLIPConfig` with
//! `text_config`, `vision_config`, `projection_dim`), `model.safetensors` (fp32 or fp16),
//! `preprocessor_config.json` (optional: without it the processor defaults to the vision tower's
//! `image_size` for both the shortest edge and the crop, with the CLIP mean/std) and the tokenizer
//! files (read by [`crate::eval::metrics`], not here).
//!
//! # Parameter names (exactly transformers')
//!
//! - text: `text_model.*` — our [`ClipTextModel`] (the SD text encoder is the same network),
//!   then `text_projection.weight` (P, d_t), no bias;
//! - vision: `vision_model.embeddings.class_embedding` (d_v), `…patch_embedding.weight`
//!   (conv, no bias, kernel = stride = patch), `…position_embedding.weight` (1+N, d_v),
//!   `vision_model.pre_layrnorm` (sic), `vision_model.encoder.layers.{i}.*` (the CLIP encoder
//!   layer, not causal), `vision_model.post_layernorm`, then `visual_projection.weight`
//!   (P, d_v), no bias;
//! - `logit_scale` (a scalar), loaded and kept (unused by the metrics, which are cosines).
//!
//! The non-persistent `position_ids` buffers that old checkpoints carry are skipped; any other
//! unknown, missing or mis-shaped key is an error naming the file.
//!
//! # Numerics
//!
//! As transformers 5.24 with `sdpa`: `get_text_features` = `text_projection` of the final
//! layer-normed hidden state at the first `eos_token_id` position (or, for the legacy
//! `eos_token_id == 2` configs, at the argmax of the ids — the same position for padded CLIP
//! ids); `get_image_features` = `visual_projection(post_layernorm(h[:, 0]))` with
//! `h = encoder(pre_layrnorm(embeddings))`. Neither is normalised (cosines normalise).

use crate::load::{load_strict_tensors, read_json, read_safetensors, require_positive, weight_file, KeyAction};
use crate::models::clip_text::{Activation, ClipEncoderLayer, ClipTextConfig, ClipTextModel, EncoderDims};
use anyhow::{bail, Context, Result};
use image::{imageops::FilterType, DynamicImage};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// OpenAI CLIP's channel means (RGB), transformers' `OPENAI_CLIP_MEAN`.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's channel standard deviations, `OPENAI_CLIP_STD`.
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// `vision_config` of `CLIPConfig` (`CLIPVisionConfig`; class defaults where a key is absent).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_v_hidden")]
    pub hidden_size: i64,
    #[serde(default = "d_v_intermediate")]
    pub intermediate_size: i64,
    #[serde(default = "d_v_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "d_v_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_v_channels")]
    pub num_channels: i64,
    #[serde(default = "d_v_image")]
    pub image_size: i64,
    #[serde(default = "d_v_patch")]
    pub patch_size: i64,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Must be 0 (inference only).
    #[serde(default)]
    pub attention_dropout: f64,
}

fn d_v_hidden() -> i64 {
    768
}
fn d_v_intermediate() -> i64 {
    3072
}
fn d_v_layers() -> i64 {
    12
}
fn d_v_heads() -> i64 {
    12
}
fn d_v_channels() -> i64 {
    3
}
fn d_v_image() -> i64 {
    224
}
fn d_v_patch() -> i64 {
    32
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_proj() -> i64 {
    512
}
fn d_text() -> ClipTextConfig {
    serde_json::from_str("{}").expect("ClipTextConfig defaults")
}

/// `config.json` of a `CLIPModel`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipConfig {
    #[serde(default = "d_text")]
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    #[serde(default = "d_proj")]
    pub projection_dim: i64,
}

impl ClipVisionConfig {
    fn validate(&self, origin: &str) -> Result<Activation> {
        let act = Activation::from_config(&self.hidden_act, origin)?;
        require_positive(
            origin,
            &[
                ("vision_config.hidden_size", self.hidden_size),
                ("vision_config.intermediate_size", self.intermediate_size),
                ("vision_config.num_attention_heads", self.num_attention_heads),
                ("vision_config.num_channels", self.num_channels),
                ("vision_config.image_size", self.image_size),
                ("vision_config.patch_size", self.patch_size),
            ],
        )?;
        if self.num_hidden_layers < 0 {
            bail!("{origin}: vision_config.num_hidden_layers must be ≥ 0");
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            bail!("{origin}: vision_config.hidden_size is not divisible by num_attention_heads");
        }
        if self.image_size < self.patch_size {
            bail!("{origin}: vision_config.image_size {} < patch_size {}", self.image_size, self.patch_size);
        }
        if self.attention_dropout != 0.0 {
            bail!("{origin}: vision_config.attention_dropout must be 0");
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            bail!("{origin}: vision_config.layer_norm_eps must be positive");
        }
        Ok(act)
    }

    /// Patches N = (image_size / patch_size)².
    pub fn num_patches(&self) -> i64 {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// transformers' `CLIPVisionTransformer` + `visual_projection`, and `text_projection` (the
/// parts of a `CLIPModel` beyond the text encoder).
#[derive(Debug)]
struct VisionTower {
    class_embedding: Tensor,
    patch_embedding: nn::Conv<[i64; 2]>,
    position_embedding: Tensor,
    pre_layrnorm: nn::LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    post_layernorm: nn::LayerNorm,
    visual_projection: nn::Linear,
}

/// transformers' `CLIPModel` for feature extraction.
#[derive(Debug)]
pub struct ClipModel {
    pub config: ClipConfig,
    /// The text tower (`text_model.*`), our SD text encoder.
    pub text: ClipTextModel,
    /// Everything else: `vision_model.*`, `visual_projection`, `text_projection`, `logit_scale`.
    pub vs: nn::VarStore,
    vision: VisionTower,
    text_projection: nn::Linear,
    /// `logit_scale` (a scalar, log of the temperature), as loaded.
    pub logit_scale: Tensor,
    eos_token_id: i64,
}

impl ClipModel {
    /// A randomly initialised model (tests).
    pub fn new(config: ClipConfig, device: Device) -> Result<Self> {
        Self::build(config, device, "CLIP config")
    }

    fn build(config: ClipConfig, device: Device, origin: &str) -> Result<Self> {
        // tch initialises every variable at random: no other thread may draw meanwhile
        crate::rng::exclusive(|| Self::build_unlocked(config, device, origin))
    }

    fn build_unlocked(config: ClipConfig, device: Device, origin: &str) -> Result<Self> {
        let text = ClipTextModel::build(config.text_config.clone(), device, &format!("{origin} (text_config)"))?;
        let v = &config.vision_config;
        let act = v.validate(origin)?;
        require_positive(origin, &[("projection_dim", config.projection_dim)])?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let vm = &root / "vision_model";
        let emb = &vm / "embeddings";
        let d = v.hidden_size;
        let init = nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        let class_embedding = emb.var("class_embedding", &[d], init);
        let patch_embedding = nn::conv(
            &emb / "patch_embedding",
            v.num_channels,
            d,
            [v.patch_size, v.patch_size],
            nn::ConvConfigND::<[i64; 2]> { stride: [v.patch_size, v.patch_size], bias: false, ..Default::default() },
        );
        let position_embedding = (&emb / "position_embedding").var("weight", &[1 + v.num_patches(), d], init);
        let ln = nn::LayerNormConfig { eps: v.layer_norm_eps, ..Default::default() };
        let dims = EncoderDims {
            hidden_size: d,
            intermediate_size: v.intermediate_size,
            heads: v.num_attention_heads,
            layer_norm_eps: v.layer_norm_eps,
            causal: false,
        };
        let layers = (0..v.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&vm / "encoder" / "layers" / i, &dims, act))
            .collect();
        let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
        let p = config.projection_dim;
        let vision = VisionTower {
            class_embedding,
            patch_embedding,
            position_embedding,
            pre_layrnorm: nn::layer_norm(&vm / "pre_layrnorm", vec![d], ln),
            layers,
            post_layernorm: nn::layer_norm(&vm / "post_layernorm", vec![d], ln),
            visual_projection: nn::linear(&root / "visual_projection", d, p, no_bias),
        };
        let text_projection = nn::linear(&root / "text_projection", config.text_config.hidden_size, p, no_bias);
        let logit_scale = root.var("logit_scale", &[], nn::Init::Const(2.6592));
        let eos_token_id = config.text_config.eos_token_id.unwrap_or(49407);
        Ok(Self { config, text, vs, vision, text_projection, logit_scale, eos_token_id })
    }

    /// Loads `dir/config.json` and `dir/model.safetensors` (strict; see the module docs).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!("CLIP model folder {} does not exist", dir.display());
        }
        let cfg_path = dir.join("config.json");
        let config: ClipConfig = read_json(&cfg_path)?;
        let mut model = Self::build(config, device, &cfg_path.display().to_string())?;
        let weights = weight_file(dir)?;
        let what = weights.display().to_string();
        let (text, rest): (Vec<_>, Vec<_>) =
            read_safetensors(&weights)?.into_iter().partition(|(k, _)| k.starts_with("text_model."));
        let skip_buffers = |key: &str, _: &Tensor| {
            if key.ends_with("embeddings.position_ids") {
                KeyAction::Skip
            } else {
                KeyAction::Load(key.to_string())
            }
        };
        load_strict_tensors(&model.text.vs, &format!("{what} (text_model.*)"), text, &skip_buffers)?;
        load_strict_tensors(
            &model.vs,
            &format!("{what} (vision_model.*, projections, logit_scale)"),
            rest,
            &skip_buffers,
        )?;
        model.text.vs.freeze();
        model.vs.freeze();
        Ok(model)
    }

    /// The side of the square vision input.
    pub fn image_size(&self) -> i64 {
        self.config.vision_config.image_size
    }

    /// transformers' `get_text_features`: ids (B, L) int64 -> (B, P), unnormalised.
    pub fn text_features(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.to_device(self.vs.device());
        let hidden = self.text.f_forward(&ids)?; // (B, L, d)
        let pos = if self.eos_token_id == 2 {
            ids.argmax(-1, false)
        } else {
            // first position of eos (pad may equal eos); a row without eos takes position 0, as
            // transformers' argmax over an all-false row does.
            ids.eq(self.eos_token_id).to_kind(Kind::Int).argmax(-1, false)
        }; // (B,)
        let b = hidden.size()[0];
        let pooled = hidden.index(&[Some(Tensor::arange(b, (Kind::Int64, hidden.device()))), Some(pos)]); // (B, d)
        Ok(self.text_projection.forward(&pooled))
    }

    /// transformers' `get_image_features`: pixel values (B, C, S, S) -> (B, P), unnormalised.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let v = &self.config.vision_config;
        let (b, c, h, w) = pixel_values
            .size4()
            .with_context(|| format!("pixel values must be (B, C, H, W), got {:?}", pixel_values.size()))?;
        if c != v.num_channels || h != v.image_size || w != v.image_size {
            bail!(
                "pixel values are {c}×{h}×{w}; this CLIP vision tower takes {}×{s}×{s} (preprocess first)",
                v.num_channels,
                s = v.image_size
            );
        }
        let t = &self.vision;
        let x = pixel_values.to_device(self.vs.device()).to_kind(Kind::Float);
        let d = v.hidden_size;
        let patches = t.patch_embedding.forward(&x).flatten(2, -1).transpose(1, 2); // (B, N, d)
        let cls = t.class_embedding.view([1, 1, d]).expand([b, 1, d], false);
        let mut hs = t.pre_layrnorm.forward(&(Tensor::cat(&[cls, patches], 1) + t.position_embedding.unsqueeze(0))); // (B, 1+N, d)
        for layer in &t.layers {
            hs = layer.forward(&hs);
        }
        let pooled = t.post_layernorm.forward(&hs.select(1, 0)); // (B, d)
        Ok(t.visual_projection.forward(&pooled))
    }
}

/// transformers' `CLIPImageProcessor` (its PIL algorithm): RGB, shortest edge → `shortest_edge`
/// (long side `int(S · long / short)`) bicubic, centre crop with floor-division offsets,
/// × `rescale_factor`, normalise with `image_mean` / `image_std`.
///
/// The resize uses the `image` crate's `CatmullRom` (PIL's bicubic kernel, a = −0.5, widened when
/// downscaling) but keeps f32 between the two passes where PIL rounds to 8 bit: close to, not
/// identical with, PIL (measured in tests/clip.rs).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    pub do_resize: bool,
    pub shortest_edge: u32,
    pub do_center_crop: bool,
    /// (height, width)
    pub crop: (u32, u32),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Int(i64),
    Shortest { shortest_edge: i64 },
    HeightWidth { height: i64, width: i64 },
}

#[derive(Deserialize)]
struct PreprocessorFile {
    #[serde(default)]
    do_resize: Option<bool>,
    #[serde(default)]
    size: Option<SizeSpec>,
    #[serde(default)]
    resample: Option<i64>,
    #[serde(default)]
    do_center_crop: Option<bool>,
    #[serde(default)]
    crop_size: Option<SizeSpec>,
    #[serde(default)]
    do_rescale: Option<bool>,
    #[serde(default)]
    rescale_factor: Option<f64>,
    #[serde(default)]
    do_normalize: Option<bool>,
    #[serde(default)]
    image_mean: Option<[f64; 3]>,
    #[serde(default)]
    image_std: Option<[f64; 3]>,
}

impl ClipImageProcessor {
    /// The class defaults for a vision tower of side `image_size` (224 → transformers' defaults).
    pub fn default_for(image_size: i64) -> Self {
        let s = image_size as u32;
        Self {
            do_resize: true,
            shortest_edge: s,
            do_center_crop: true,
            crop: (s, s),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// `dir/preprocessor_config.json` when present, else [`Self::default_for`].
    pub fn load(dir: &Path, image_size: i64) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let mut p = Self::default_for(image_size);
        if !path.is_file() {
            return Ok(p);
        }
        let f: PreprocessorFile = read_json(&path)?;
        let origin = path.display();
        if let Some(r) = f.resample {
            if r != 3 {
                bail!("{origin}: resample {r} is not supported (only 3, bicubic, as CLIP uses)");
            }
        }
        let pos = |v: i64, what: &str| -> Result<u32> {
            if v <= 0 || v > 100_000 {
                bail!("{origin}: {what} must be a positive size, got {v}");
            }
            Ok(v as u32)
        };
        p.do_resize = f.do_resize.unwrap_or(true);
        match f.size {
            None => {}
            Some(SizeSpec::Int(s)) | Some(SizeSpec::Shortest { shortest_edge: s }) => {
                p.shortest_edge = pos(s, "size.shortest_edge")?
            }
            Some(SizeSpec::HeightWidth { .. }) => {
                bail!("{origin}: size {{height, width}} is not supported (CLIP resizes the shortest edge)")
            }
        }
        p.do_center_crop = f.do_center_crop.unwrap_or(true);
        match f.crop_size {
            None => {}
            Some(SizeSpec::Int(s)) => p.crop = (pos(s, "crop_size")?, pos(s, "crop_size")?),
            Some(SizeSpec::HeightWidth { height, width }) => {
                p.crop = (pos(height, "crop_size.height")?, pos(width, "crop_size.width")?)
            }
            Some(SizeSpec::Shortest { .. }) => bail!("{origin}: crop_size must be an int or {{height, width}}"),
        }
        p.do_rescale = f.do_rescale.unwrap_or(true);
        p.rescale_factor = f.rescale_factor.unwrap_or(p.rescale_factor);
        p.do_normalize = f.do_normalize.unwrap_or(true);
        p.mean = f.image_mean.unwrap_or(p.mean);
        p.std = f.image_std.unwrap_or(p.std);
        if p.std.contains(&0.0) {
            bail!("{origin}: image_std has a zero");
        }
        Ok(p)
    }

    /// Image -> pixel values (3, crop_h, crop_w) f32 on the CPU.
    pub fn preprocess(&self, img: &DynamicImage) -> Result<Tensor> {
        let mut rgb = img.to_rgb8();
        let (w, h) = rgb.dimensions();
        if w == 0 || h == 0 {
            bail!("cannot preprocess an empty ({w}x{h}) image");
        }
        if self.do_resize {
            let s = self.shortest_edge;
            let (short, long) = (w.min(h), w.max(h));
            let new_long = (s as f64 * long as f64 / short as f64) as u32; // int(), truncation
            let (nw, nh) = if w <= h { (s, new_long) } else { (new_long, s) };
            rgb = image::imageops::resize(&rgb, nw, nh, FilterType::CatmullRom);
        }
        if self.do_center_crop {
            let (ch, cw) = self.crop;
            let (w, h) = rgb.dimensions();
            if w < cw || h < ch {
                bail!("the resized image ({w}×{h}) is smaller than the crop ({cw}×{ch}); padding is not supported");
            }
            let (top, left) = ((h - ch) / 2, (w - cw) / 2); // floor division, as transformers
            rgb = image::imageops::crop_imm(&rgb, left, top, cw, ch).to_image();
        }
        Ok(pixel_values(
            &rgb,
            self.do_rescale.then_some(self.rescale_factor),
            self.do_normalize.then_some((self.mean, self.std)),
        ))
    }
}

/// An RGB image -> (3, H, W) f32 pixel values: × `rescale`, then (x − mean) / std, in f64 as
/// transformers' processors compute them (CLIP's and BLIP's).
pub fn pixel_values(rgb: &image::RgbImage, rescale: Option<f64>, normalize: Option<([f64; 3], [f64; 3])>) -> Tensor {
    let (w, h) = rgb.dimensions();
    let x = Tensor::from_slice(rgb.as_raw()).view([h as i64, w as i64, 3]).permute([2, 0, 1]).to_kind(Kind::Double);
    let x = match rescale {
        Some(f) => x * f,
        None => x,
    };
    let x = match normalize {
        Some((mean, std)) => (x - Tensor::from_slice(&mean).view([3, 1, 1])) / Tensor::from_slice(&std).view([3, 1, 1]),
        None => x,
    };
    x.to_kind(Kind::Float)
}

/// A CLIP model folder with its processor: image and text embeddings for the metrics.
#[derive(Debug)]
pub struct Clip {
    pub model: ClipModel,
    pub processor: ClipImageProcessor,
    pub dir: PathBuf,
}

impl Clip {
    /// Loads the model and the processor of `dir`; the processor's crop must be the model's
    /// square input.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let model = ClipModel::load(dir, device)?;
        let processor = ClipImageProcessor::load(dir, model.image_size())?;
        let s = model.image_size() as u32;
        if !processor.do_center_crop || processor.crop != (s, s) {
            bail!(
                "{}: the processor's crop {:?} is not the vision tower's input {s}×{s}",
                dir.join("preprocessor_config.json").display(),
                processor.crop
            );
        }
        Ok(Self { model, processor, dir: dir.to_path_buf() })
    }

    /// Images -> image features (n, P), in batches of 32, no gradient.
    pub fn embed_images(&self, images: &[DynamicImage]) -> Result<Tensor> {
        if images.is_empty() {
            bail!("no images to embed");
        }
        let mut out = Vec::new();
        for chunk in images.chunks(32) {
            let px = chunk.iter().map(|im| self.processor.preprocess(im)).collect::<Result<Vec<_>>>()?;
            out.push(tch::no_grad(|| self.model.image_features(&Tensor::stack(&px, 0)))?);
        }
        Ok(Tensor::cat(&out, 0))
    }
}
