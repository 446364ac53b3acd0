//! Segment Anything (SAM), as transformers' `SamModel`: the masks of the training photos (Eq. 5),
//! of I_g1 (M_g) and of the reference (M_r) in the paper come from SAM.
//!
//! - [`vision`]: the image encoder (ViTDet-style ViT with windowed and global attention, decomposed
//!   relative positions, convolutional neck) → image embeddings (1, C, h, w).
//! - the prompt encoder ([`SamModel::prompt_embeddings`]): points and boxes → sparse tokens, the
//!   "no mask" embedding → dense embeddings. Mask prompts are not implemented; their weights
//!   (`prompt_encoder.mask_embed.*`) are still loaded and shape-checked.
//! - [`decoder`]: the two-way-transformer mask decoder with the IoU head; its multimask output
//!   (three candidates) or single-mask output (mask token 0), as transformers'
//!   `multimask_output`; [`PixelPrompts::multimask`] says which a prompt gets by default.
//! - [`processor`]: `SamProcessor`'s pre- and post-processing.
//!
//! # Parameter names
//!
//! Exactly `SamModel`'s state dict as `save_pretrained` writes it (and `facebook/sam-vit-base`
//! ships): `shared_image_embedding.positional_embedding`, `vision_encoder.*`, `prompt_encoder.*`,
//! `mask_decoder.*`. `prompt_encoder.shared_embedding.positional_embedding` is a tied copy of
//! `shared_image_embedding.positional_embedding` (transformers' `_tied_weights_keys`): absent
//! from files transformers 5 writes; where a file carries it, it is skipped (the model uses the
//! shared one, as transformers does after tying).
//!
//! # Numerics
//!
//! As transformers 5.24 in `eval()`: dropout never applied; attention written out
//! (softmax(q kᵀ · scale + bias) v), which equals the `sdpa` path up to float rounding.

pub mod decoder;
pub mod processor;
pub mod vision;

use crate::load::{load_strict, read_json, require_positive, weight_file, KeyAction};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// `SamVisionConfig`. Defaults are ViT-B's (`facebook/sam-vit-base`), used where a key is absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamVisionConfig {
    #[serde(default = "d_768")]
    pub hidden_size: i64,
    #[serde(default = "d_256")]
    pub output_channels: i64,
    #[serde(default = "d_12")]
    pub num_hidden_layers: i64,
    #[serde(default = "d_12")]
    pub num_attention_heads: i64,
    #[serde(default = "d_3")]
    pub num_channels: i64,
    #[serde(default = "d_1024")]
    pub image_size: i64,
    #[serde(default = "d_16")]
    pub patch_size: i64,
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default)]
    pub mlp_dim: Option<i64>,
    #[serde(default = "d_true")]
    pub use_abs_pos: bool,
    #[serde(default = "d_true")]
    pub use_rel_pos: bool,
    #[serde(default = "d_14")]
    pub window_size: i64,
    #[serde(default = "d_global")]
    pub global_attn_indexes: Vec<i64>,
    /// Half the width of the random-Fourier positional encoding shared with the prompt encoder.
    #[serde(default = "d_128")]
    pub num_pos_feats: i64,
}

/// `SamPromptEncoderConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamPromptEncoderConfig {
    #[serde(default = "d_256")]
    pub hidden_size: i64,
    #[serde(default = "d_1024")]
    pub image_size: i64,
    #[serde(default = "d_16")]
    pub patch_size: i64,
    #[serde(default = "d_16")]
    pub mask_input_channels: i64,
    #[serde(default = "d_4")]
    pub num_point_embeddings: i64,
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

/// `SamMaskDecoderConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamMaskDecoderConfig {
    #[serde(default = "d_256")]
    pub hidden_size: i64,
    #[serde(default = "d_relu")]
    pub hidden_act: String,
    #[serde(default = "d_2048")]
    pub mlp_dim: i64,
    #[serde(default = "d_2")]
    pub num_hidden_layers: i64,
    #[serde(default = "d_8")]
    pub num_attention_heads: i64,
    #[serde(default = "d_2")]
    pub attention_downsample_rate: i64,
    #[serde(default = "d_3")]
    pub num_multimask_outputs: i64,
    #[serde(default = "d_3")]
    pub iou_head_depth: i64,
    #[serde(default = "d_256")]
    pub iou_head_hidden_dim: i64,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

/// `config.json` of a `SamModel` (`SamConfig`); unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamConfig {
    pub vision_config: SamVisionConfig,
    pub prompt_encoder_config: SamPromptEncoderConfig,
    pub mask_decoder_config: SamMaskDecoderConfig,
}

fn d_2() -> i64 {
    2
}
fn d_3() -> i64 {
    3
}
fn d_4() -> i64 {
    4
}
fn d_8() -> i64 {
    8
}
fn d_12() -> i64 {
    12
}
fn d_14() -> i64 {
    14
}
fn d_16() -> i64 {
    16
}
fn d_128() -> i64 {
    128
}
fn d_256() -> i64 {
    256
}
fn d_768() -> i64 {
    768
}
fn d_1024() -> i64 {
    1024
}
fn d_2048() -> i64 {
    2048
}
fn d_eps() -> f64 {
    1e-6
}
fn d_true() -> bool {
    true
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_gelu() -> String {
    "gelu".into()
}
fn d_relu() -> String {
    "relu".into()
}
fn d_global() -> Vec<i64> {
    vec![2, 5, 8, 11]
}

/// The activations SAM's configs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Gelu,
    Relu,
}

impl Act {
    fn parse(name: &str, origin: &str, key: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Self::Gelu),
            "relu" => Ok(Self::Relu),
            _ => bail!("{origin}: {key}.hidden_act {name:?} is not supported (gelu, relu)"),
        }
    }

    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Self::Gelu => x.gelu("none"),
            Self::Relu => x.relu(),
        }
    }
}

impl SamVisionConfig {
    pub fn mlp_dim(&self) -> i64 {
        self.mlp_dim.unwrap_or((self.hidden_size as f64 * self.mlp_ratio) as i64)
    }
    /// Patches per side: image_size / patch_size.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
}

impl SamConfig {
    /// Checks what this implementation needs; `origin` names the config file.
    pub fn validate(&self, origin: &str) -> Result<(Act, Act, Act)> {
        let (v, p, m) = (&self.vision_config, &self.prompt_encoder_config, &self.mask_decoder_config);
        require_positive(
            origin,
            &[
                ("vision_config.hidden_size", v.hidden_size),
                ("vision_config.output_channels", v.output_channels),
                ("vision_config.num_attention_heads", v.num_attention_heads),
                ("vision_config.num_channels", v.num_channels),
                ("vision_config.image_size", v.image_size),
                ("vision_config.patch_size", v.patch_size),
                ("vision_config.num_pos_feats", v.num_pos_feats),
                ("vision_config.mlp_dim", v.mlp_dim()),
                ("prompt_encoder_config.hidden_size", p.hidden_size),
                ("prompt_encoder_config.mask_input_channels", p.mask_input_channels),
                ("mask_decoder_config.hidden_size", m.hidden_size),
                ("mask_decoder_config.num_attention_heads", m.num_attention_heads),
                ("mask_decoder_config.attention_downsample_rate", m.attention_downsample_rate),
                ("mask_decoder_config.num_multimask_outputs", m.num_multimask_outputs),
                ("mask_decoder_config.iou_head_hidden_dim", m.iou_head_hidden_dim),
                ("mask_decoder_config.mlp_dim", m.mlp_dim),
            ],
        )?;
        if v.hidden_size % v.num_attention_heads != 0 {
            bail!("{origin}: vision_config.hidden_size is not divisible by num_attention_heads");
        }
        if v.image_size % v.patch_size != 0 {
            bail!("{origin}: vision_config.image_size must be a multiple of patch_size");
        }
        if 2 * v.num_pos_feats != p.hidden_size || p.hidden_size != m.hidden_size || v.output_channels != m.hidden_size
        {
            bail!(
                "{origin}: 2·vision_config.num_pos_feats ({}), prompt_encoder_config.hidden_size ({}), \
                 mask_decoder_config.hidden_size ({}) and vision_config.output_channels ({}) must agree",
                2 * v.num_pos_feats,
                p.hidden_size,
                m.hidden_size,
                v.output_channels
            );
        }
        if p.image_size != v.image_size || p.patch_size != v.patch_size {
            bail!("{origin}: prompt_encoder_config image_size/patch_size must equal vision_config's");
        }
        if p.num_point_embeddings != 4 {
            bail!("{origin}: prompt_encoder_config.num_point_embeddings must be 4 (neg, pos, box corners)");
        }
        if m.hidden_size < 8 || (m.hidden_size / m.attention_downsample_rate) % m.num_attention_heads != 0 {
            bail!("{origin}: mask_decoder_config.hidden_size must be at least 8 and its attention width a multiple of the heads");
        }
        if m.iou_head_depth < 2 {
            bail!("{origin}: mask_decoder_config.iou_head_depth must be at least 2");
        }
        if v.window_size < 0 || v.global_attn_indexes.iter().any(|&i| i < 0 || i >= v.num_hidden_layers) {
            bail!("{origin}: vision_config.window_size must be ≥ 0 and global_attn_indexes within the layers");
        }
        Ok((
            Act::parse(&v.hidden_act, origin, "vision_config")?,
            Act::parse(&p.hidden_act, origin, "prompt_encoder_config")?,
            Act::parse(&m.hidden_act, origin, "mask_decoder_config")?,
        ))
    }
}

/// A LayerNorm over the channels of (B, C, H, W) (`SamLayerNorm(data_format="channels_first")`).
pub(crate) fn layer_norm_cf(ln: &nn::LayerNorm, x: &Tensor) -> Tensor {
    use tch::nn::Module;
    ln.forward(&x.permute([0, 2, 3, 1])).permute([0, 3, 1, 2]) // (B, H, W, C) → (B, C, H, W)
}

/// The prompt encoder's parameters (`prompt_encoder.*`).
#[derive(Debug)]
struct PromptEncoder {
    /// `point_embed.{0,1,2,3}`: negative point, positive point, box top-left, box bottom-right.
    point_embed: Vec<Tensor>,
    not_a_point_embed: Tensor,
    no_mask_embed: Tensor,
}

/// Points (with labels) and/or one box, in the model's input frame (after
/// [`processor::SamProcessor::normalize_coords`]).
#[derive(Debug, Default)]
pub struct Prompts {
    /// (n, 2) x, y.
    pub points: Option<Tensor>,
    /// (n,) 1 = subject, 0 = background, −1 = not a point, −10 = padding.
    pub labels: Option<Tensor>,
    /// (4,) x0, y0, x1, y1.
    pub boxes: Option<Tensor>,
}

/// transformers' `SamModel`.
#[derive(Debug)]
pub struct SamModel {
    pub vs: nn::VarStore,
    pub config: SamConfig,
    /// `shared_image_embedding.positional_embedding`, (2, num_pos_feats): the Gaussian matrix of
    /// the random-Fourier positional encoding.
    positional_embedding: Tensor,
    pub vision: vision::VisionEncoder,
    prompt: PromptEncoder,
    pub decoder: decoder::MaskDecoder,
}

impl SamModel {
    /// A randomly initialised model (for shapes and tests).
    pub fn new(config: SamConfig, device: Device) -> Result<Self> {
        Self::build(config, device, "SAM config")
    }

    fn build(config: SamConfig, device: Device, origin: &str) -> Result<Self> {
        // tch initialises every variable at random: no other thread may draw meanwhile
        crate::rng::exclusive(|| Self::build_unlocked(config, device, origin))
    }

    fn build_unlocked(config: SamConfig, device: Device, origin: &str) -> Result<Self> {
        let (vact, pact, mact) = config.validate(origin)?;
        let _ = pact; // the mask embedding's activation: mask prompts are not implemented
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let v = &config.vision_config;
        let positional_embedding = (&root / "shared_image_embedding").var(
            "positional_embedding",
            &[2, v.num_pos_feats],
            nn::Init::Randn { mean: 0.0, stdev: 1.0 },
        );
        let vision = vision::VisionEncoder::new(&root / "vision_encoder", v, vact);
        let p = &config.prompt_encoder_config;
        let pe = &root / "prompt_encoder";
        let c = p.hidden_size;
        let emb = |path: nn::Path| path.var("weight", &[1, c], nn::Init::Randn { mean: 0.0, stdev: 1.0 });
        let prompt = PromptEncoder {
            point_embed: (0..4).map(|i| emb(&pe / "point_embed" / i)).collect(),
            not_a_point_embed: emb(&pe / "not_a_point_embed"),
            no_mask_embed: emb(&pe / "no_mask_embed"),
        };
        // `mask_embed`: built so that its weights are loaded and checked; not used (no mask prompts).
        let me = &pe / "mask_embed";
        let mic = p.mask_input_channels;
        let conv = |name: &str, cin: i64, cout: i64, k: i64| {
            nn::conv2d(&me / name, cin, cout, k, nn::ConvConfig { stride: k, ..Default::default() })
        };
        let ln = nn::LayerNormConfig { eps: p.layer_norm_eps, ..Default::default() };
        let _mask_embed = (
            conv("conv1", 1, mic / 4, 2),
            conv("conv2", mic / 4, mic, 2),
            conv("conv3", mic, c, 1),
            nn::layer_norm(&me / "layer_norm1", vec![mic / 4], ln),
            nn::layer_norm(&me / "layer_norm2", vec![mic], ln),
        );
        let decoder = decoder::MaskDecoder::new(&root / "mask_decoder", &config.mask_decoder_config, mact);
        Ok(Self { vs, config, positional_embedding, vision, prompt, decoder })
    }

    /// Loads `dir/config.json` and `dir/model.safetensors` (strict; see the module docs).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!("SAM model folder {} does not exist", dir.display());
        }
        let cfg_path = dir.join("config.json");
        let config: SamConfig = read_json(&cfg_path)?;
        let model = Self::build(config, device, &cfg_path.display().to_string())?;
        let weights = weight_file(dir)?;
        load_strict(&model.vs, &weights, &|key, _| {
            if key == "prompt_encoder.shared_embedding.positional_embedding" {
                KeyAction::Skip // tied to shared_image_embedding.positional_embedding
            } else {
                KeyAction::Load(key.to_string())
            }
        })?;
        Ok(model)
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The input side the model expects (1024 for ViT-B).
    pub fn image_size(&self) -> i64 {
        self.config.vision_config.image_size
    }

    /// `get_image_embeddings`: pixel values (B, 3, S, S) → (B, C, S/p, S/p).
    pub fn image_embeddings(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision.forward(&pixel_values.to_device(self.device()).to_kind(Kind::Float))
    }

    /// `SamPositionalEmbedding`: coordinates (…, 2) in [0, 1] → (…, 2F) =
    /// [sin(2π (2c − 1) G), cos(2π (2c − 1) G)].
    fn fourier(&self, coords01: &Tensor) -> Tensor {
        let c = (coords01 * 2.0 - 1.0).matmul(&self.positional_embedding) * (2.0 * std::f64::consts::PI); // (…, F)
        Tensor::cat(&[c.sin(), c.cos()], -1)
    }

    /// `get_image_wide_positional_embeddings`: (1, 2F, g, g), cell centres (j + ½)/g, (i + ½)/g.
    pub fn image_wide_pe(&self) -> Tensor {
        let g = self.config.prompt_encoder_config.image_size / self.config.prompt_encoder_config.patch_size;
        let opts = (Kind::Float, self.device());
        let grid = Tensor::ones([g, g], opts);
        let y = (grid.cumsum(0, Kind::Float) - 0.5) / g as f64; // (g, g)
        let x = (grid.cumsum(1, Kind::Float) - 0.5) / g as f64;
        self.fourier(&Tensor::stack(&[x, y], -1)).permute([2, 0, 1]).unsqueeze(0)
        // (g, g, 2F) → (1, 2F, g, g)
    }

    /// The prompt encoder for one prompt set: (sparse (1, 1, n, C), dense (1, C, g, g)). Points
    /// are padded with one "not a point" when there is no box, as transformers does.
    pub fn prompt_embeddings(&self, prompts: &Prompts) -> Result<(Tensor, Tensor)> {
        let dev = self.device();
        let s = self.config.prompt_encoder_config.image_size as f64;
        let mut parts = Vec::new();
        if let Some(points) = &prompts.points {
            let Some(labels) = &prompts.labels else { bail!("points need labels") };
            let (n, two) = points.size2()?;
            if two != 2 || labels.size() != [n] {
                bail!("points must be (n, 2) with (n,) labels, got {:?} and {:?}", points.size(), labels.size());
            }
            let mut pts = points.to_device(dev).to_kind(Kind::Float) + 0.5; // pixel centres
            let mut lab = labels.to_device(dev).to_kind(Kind::Float);
            if prompts.boxes.is_none() {
                pts = Tensor::cat(&[pts, Tensor::zeros([1, 2], (Kind::Float, dev))], 0); // (n+1, 2)
                lab = Tensor::cat(&[lab, Tensor::full([1], -1.0, (Kind::Float, dev))], 0);
            }
            let mut e = self.fourier(&(pts / s)); // (n', C)
            let lab = lab.unsqueeze(-1); // (n', 1)
            e = self.prompt.not_a_point_embed.expand_as(&e).where_self(&lab.eq(-1.0), &e);
            e = e.zeros_like().where_self(&lab.eq(-10.0), &e);
            e = (&e + &self.prompt.point_embed[0]).where_self(&lab.eq(0.0), &e);
            e = (&e + &self.prompt.point_embed[1]).where_self(&lab.eq(1.0), &e);
            parts.push(e);
        }
        if let Some(b) = &prompts.boxes {
            if b.size() != [4] {
                bail!("a box must be (4,) x0, y0, x1, y1, got {:?}", b.size());
            }
            let corners = (b.to_device(dev).to_kind(Kind::Float) + 0.5).view([2, 2]); // (2 corners, xy)
            let e = self.fourier(&(corners / s)); // (2, C)
            let offs = Tensor::cat(&[&self.prompt.point_embed[2], &self.prompt.point_embed[3]], 0); // (2, C)
            parts.push(e + offs);
        }
        if parts.is_empty() {
            bail!("SAM needs at least one point or a box");
        }
        let sparse = Tensor::cat(&parts, 0).unsqueeze(0).unsqueeze(0); // (1, 1, n, C)
        let g = self.config.prompt_encoder_config.image_size / self.config.prompt_encoder_config.patch_size;
        let c = self.config.prompt_encoder_config.hidden_size;
        let dense = self.prompt.no_mask_embed.view([1, c, 1, 1]).expand([1, c, g, g], false);
        Ok((sparse, dense))
    }

    /// The mask decoder: (low-resolution mask logits (1, 1, K, 4g, 4g), predicted IoUs
    /// (1, 1, K)); `multimask` as transformers' `multimask_output`: K = num_multimask_outputs
    /// (mask tokens 1…K), else K = 1 (mask token 0).
    pub fn decode(
        &self,
        image_embeddings: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
        multimask: bool,
    ) -> (Tensor, Tensor) {
        self.decoder.forward(image_embeddings, &self.image_wide_pe(), sparse, dense, multimask)
    }
}

/// SAM's answer for one photo and one prompt set.
#[derive(Debug)]
pub struct Prediction {
    /// (K, H, W) mask logits at the photo's size; `> 0` is the mask (K = 1 for the single
    /// output, else the multimask outputs).
    pub logits: Tensor,
    /// The K predicted IoUs.
    pub iou: Vec<f64>,
}

impl Prediction {
    /// Index of the candidate with the best predicted IoU.
    pub fn best(&self) -> usize {
        (0..self.iou.len()).fold(0, |b, i| if self.iou[i] > self.iou[b] { i } else { b })
    }

    /// Candidate `i` as a 0/1 float mask (H, W).
    pub fn mask(&self, i: usize) -> Tensor {
        self.logits.get(i as i64).gt(0.0).to_kind(Kind::Float)
    }
}

/// Prompts in pixel coordinates of the original photo.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PixelPrompts {
    /// (x, y, label): 1 = subject, 0 = background.
    pub points: Vec<(f64, f64, i64)>,
    /// x0, y0, x1, y1.
    pub boxes: Option<[f64; 4]>,
}

impl PixelPrompts {
    /// Whether these prompts get SAM's three multimask outputs (`true`) or its single output
    /// (`false`, mask token 0). The rule: **single output whenever a box is given (with or
    /// without points); the three outputs for points alone.** SAM's authors
    /// (segment-anything's `SamPredictor.predict` docstring and its predictor notebook) return
    /// three masks for ambiguous prompts such as a single point, and recommend
    /// `multimask_output=False` for unambiguous ones, of which a box is the clear case; their
    /// box and box-plus-point examples use it. Points alone keep transformers' default (`True`).
    pub fn multimask(&self) -> bool {
        self.boxes.is_none()
    }
}

impl SamModel {
    /// Image embeddings of a photo (H, W, 3) uint8, with its pre-processing.
    pub fn embed(&self, image: &Tensor) -> Result<(Tensor, processor::Prepared)> {
        let p = processor::preprocess(&image.to_device(self.device()), self.image_size())?;
        let e = tch::no_grad(|| self.image_embeddings(&p.pixel_values))?;
        Ok((e, p))
    }

    /// The candidate masks of a photo whose embeddings are `emb` for prompts in its pixels: one
    /// or three, by [`PixelPrompts::multimask`].
    pub fn predict_embedded(
        &self,
        emb: &Tensor,
        p: &processor::Prepared,
        prompts: &PixelPrompts,
    ) -> Result<Prediction> {
        self.predict_embedded_with(emb, p, prompts, prompts.multimask())
    }

    /// [`predict_embedded`](Self::predict_embedded) with the output chosen by the caller:
    /// `multimask` as transformers' `multimask_output`.
    pub fn predict_embedded_with(
        &self,
        emb: &Tensor,
        p: &processor::Prepared,
        prompts: &PixelPrompts,
        multimask: bool,
    ) -> Result<Prediction> {
        let s = self.image_size();
        let f = |v: Vec<f64>, shape: &[i64]| Tensor::from_slice(&v).to_kind(Kind::Float).view(shape);
        let (points, labels) = if prompts.points.is_empty() {
            (None, None)
        } else {
            let n = prompts.points.len() as i64;
            let xy = f(prompts.points.iter().flat_map(|&(x, y, _)| [x, y]).collect(), &[n, 2]);
            let lab = f(prompts.points.iter().map(|&(_, _, l)| l as f64).collect(), &[n]);
            (Some(processor::normalize_coords(&xy, p.original, s)), Some(lab))
        };
        let boxes =
            prompts.boxes.map(|b| processor::normalize_coords(&f(b.to_vec(), &[2, 2]), p.original, s).view([4]));
        let prompts = Prompts { points, labels, boxes };
        tch::no_grad(|| {
            let (sparse, dense) = self.prompt_embeddings(&prompts)?;
            let (masks, iou) = self.decode(emb, &sparse, &dense, multimask);
            let logits = processor::post_process_logits(&masks.squeeze_dim(0), p, s).squeeze_dim(0); // (K, H, W)
            let iou = Vec::<f64>::try_from(iou.to_kind(Kind::Double).view([-1]).to_device(Device::Cpu))?;
            Ok(Prediction { logits: logits.to_device(Device::Cpu), iou })
        })
    }

    /// [`embed`](Self::embed) then [`predict_embedded`](Self::predict_embedded).
    pub fn predict(&self, image: &Tensor, prompts: &PixelPrompts) -> Result<Prediction> {
        let (emb, p) = self.embed(image)?;
        self.predict_embedded(&emb, &p, prompts)
    }

    /// [`embed`](Self::embed) then [`predict_embedded_with`](Self::predict_embedded_with).
    pub fn predict_with(&self, image: &Tensor, prompts: &PixelPrompts, multimask: bool) -> Result<Prediction> {
        let (emb, p) = self.embed(image)?;
        self.predict_embedded_with(&emb, &p, prompts, multimask)
    }
}
