//! transformers' `ViTModel` (the DINO ViT-S/16 image encoder of HiFi Tuner §3.3).
//!
//! # Parameter names
//!
//! The VarStore uses the names transformers 5.24.0 **writes** with `save_pretrained` (and that
//! `facebook/dino-vits16` ships): `embeddings.cls_token` (1, 1, d),
//! `embeddings.position_embeddings` (1, 1+N, d), `embeddings.patch_embeddings.projection`
//! (conv, kernel = stride = patch), `encoder.layer.{i}.attention.attention.{query,key,value}`,
//! `encoder.layer.{i}.attention.output.dense`, `encoder.layer.{i}.intermediate.dense` (fc1),
//! `encoder.layer.{i}.output.dense` (fc2), `encoder.layer.{i}.layernorm_{before,after}`,
//! `layernorm`. (In memory transformers 5 calls these `layers.{i}.attention.q_proj`, …,
//! `mlp.fc1`/`mlp.fc2` and renames them when loading and saving.)
//!
//! [`ViTModel::load`] also accepts, for each key:
//! - a `vit.` prefix (the base model inside `ViTForImageClassification` & co.);
//! - transformers' in-memory spelling (`layers.{i}.attention.q_proj`, `…o_proj`, `mlp.fc1`,
//!   `mlp.fc2`), as a raw `state_dict()` dump would have it;
//! - the pooler (`pooler.dense.*`), **skipped whether present or absent**: HiFi Tuner uses the
//!   CLS token of the last hidden state, never `pooler_output`, so the pooler is not built.
//!
//! Anything else (a `classifier.*` head, a `mask_token`) is reported as unused by the strict
//! loader, as are missing and mis-shaped keys.
//!
//! # Numerics
//!
//! As transformers 5.24 with its default attention (`sdpa`): no mask, not causal,
//! `scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5)`. Dropout is never applied
//! (inference / `eval()` semantics; the dropout probabilities of config.json are accepted and
//! ignored). Position embeddings are not interpolated: the input must be exactly
//! `image_size` (transformers' default `interpolate_pos_encoding=False` raises the same way).

use crate::load::{load_strict, read_json, require_positive, weight_file, KeyAction};
use crate::models::attention::encoder_self_attention;
use crate::models::clip_text::Activation;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// `image_size` / `patch_size` of `ViTConfig`: an int or `[height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size2 {
    Square(i64),
    HeightWidth([i64; 2]),
}

impl Size2 {
    /// (height, width)
    pub fn hw(self) -> (i64, i64) {
        match self {
            Size2::Square(s) => (s, s),
            Size2::HeightWidth([h, w]) => (h, w),
        }
    }
}

/// `config.json` of a transformers `ViTModel` (`ViTConfig`). Defaults are those of the
/// `ViTConfig` class (ViT-B/16), used only where a key is absent. Unknown keys (`pooler_act`,
/// `encoder_stride`, `initializer_range`, …) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViTConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: i64,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: i64,
    /// `gelu` (exact, erf — transformers' default and DINO's), `gelu_new`,
    /// `gelu_pytorch_tanh` or `quick_gelu`.
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_image")]
    pub image_size: Size2,
    #[serde(default = "d_patch")]
    pub patch_size: Size2,
    #[serde(default = "d_channels")]
    pub num_channels: i64,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    /// Optional override of `hidden_size / num_attention_heads` (transformers reads
    /// `getattr(config, "head_dim", …)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    /// Ignored (inference only).
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    /// Ignored (inference only).
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
}

fn d_hidden() -> i64 {
    768
}
fn d_layers() -> i64 {
    12
}
fn d_heads() -> i64 {
    12
}
fn d_intermediate() -> i64 {
    3072
}
fn d_act() -> String {
    "gelu".to_string()
}
fn d_eps() -> f64 {
    1e-12
}
fn d_image() -> Size2 {
    Size2::Square(224)
}
fn d_patch() -> Size2 {
    Size2::Square(16)
}
fn d_channels() -> i64 {
    3
}
fn d_true() -> bool {
    true
}

impl ViTConfig {
    /// Checks the values this implementation supports; `origin` names the file for errors.
    pub fn validate(&self, origin: &str) -> Result<Activation> {
        let act = Activation::from_config(&self.hidden_act, origin)?;
        require_positive(
            origin,
            &[
                ("hidden_size", self.hidden_size),
                ("num_attention_heads", self.num_attention_heads),
                ("intermediate_size", self.intermediate_size),
                ("num_channels", self.num_channels),
            ],
        )?;
        if self.num_hidden_layers < 0 {
            bail!("{origin}: num_hidden_layers must be ≥ 0, got {}", self.num_hidden_layers);
        }
        match self.head_dim {
            Some(hd) if hd <= 0 => bail!("{origin}: head_dim must be positive, got {hd}"),
            Some(_) => {}
            None => {
                if self.hidden_size % self.num_attention_heads != 0 {
                    bail!(
                        "{origin}: hidden_size {} is not divisible by num_attention_heads {}",
                        self.hidden_size,
                        self.num_attention_heads
                    );
                }
            }
        }
        let (ih, iw) = self.image_size.hw();
        let (ph, pw) = self.patch_size.hw();
        if ph <= 0 || pw <= 0 {
            bail!("{origin}: patch_size must be positive, got {:?}", self.patch_size);
        }
        if ih < ph || iw < pw {
            bail!("{origin}: image_size {:?} is smaller than patch_size {:?}", self.image_size, self.patch_size);
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            bail!("{origin}: layer_norm_eps must be positive, got {}", self.layer_norm_eps);
        }
        Ok(act)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Number of patches N = (H / ph) · (W / pw) (floor, as the strided convolution).
    pub fn num_patches(&self) -> i64 {
        let (ih, iw) = self.image_size.hw();
        let (ph, pw) = self.patch_size.hw();
        (ih / ph) * (iw / pw)
    }
}

/// `ViTAttention` (self-attention with the output projection).
#[derive(Debug)]
struct VitAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    out: nn::Linear,
    heads: i64,
    head_dim: i64,
    scale: f64,
}

impl VitAttention {
    /// `vs` is `encoder.layer.{i}.attention`.
    fn new(vs: nn::Path, cfg: &ViTConfig) -> Self {
        let d = cfg.hidden_size;
        let inner = cfg.num_attention_heads * cfg.head_dim();
        let qkv = nn::LinearConfig { bias: cfg.qkv_bias, ..Default::default() };
        let att = &vs / "attention";
        Self {
            query: nn::linear(&att / "query", d, inner, qkv),
            key: nn::linear(&att / "key", d, inner, qkv),
            value: nn::linear(&att / "value", d, inner, qkv),
            out: nn::linear(&vs / "output" / "dense", inner, d, Default::default()),
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            scale: (cfg.head_dim() as f64).powf(-0.5),
        }
    }

    /// `x`: (B, L, d) -> (B, L, d)
    fn forward(&self, x: &Tensor) -> Tensor {
        let (q, k, v) = (&self.query, &self.key, &self.value);
        let o = encoder_self_attention(x, q, k, v, self.heads, self.head_dim, false, self.scale); // (B, L, heads·dh)
        self.out.forward(&o)
    }
}

/// `ViTLayer`: pre-norm attention and MLP, each with a residual.
#[derive(Debug)]
struct VitLayer {
    attention: VitAttention,
    layernorm_before: nn::LayerNorm,
    layernorm_after: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    act: Activation,
}

impl VitLayer {
    /// `vs` is `encoder.layer.{i}`.
    fn new(vs: nn::Path, cfg: &ViTConfig, act: Activation) -> Self {
        let d = cfg.hidden_size;
        let ln = nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() };
        Self {
            attention: VitAttention::new(&vs / "attention", cfg),
            layernorm_before: nn::layer_norm(&vs / "layernorm_before", vec![d], ln),
            layernorm_after: nn::layer_norm(&vs / "layernorm_after", vec![d], ln),
            fc1: nn::linear(&vs / "intermediate" / "dense", d, cfg.intermediate_size, Default::default()),
            fc2: nn::linear(&vs / "output" / "dense", cfg.intermediate_size, d, Default::default()),
            act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x + self.attention.forward(&self.layernorm_before.forward(x));
        let m = self.fc2.forward(&self.act.apply(&self.fc1.forward(&self.layernorm_after.forward(&h))));
        h + m
    }
}

/// transformers' `ViTModel` without the pooler: pixel values -> last hidden state.
#[derive(Debug)]
pub struct ViTModel {
    pub vs: nn::VarStore,
    pub config: ViTConfig,
    /// (1, 1, d)
    cls_token: Tensor,
    /// (1, 1+N, d)
    position_embeddings: Tensor,
    patch_embed: nn::Conv<[i64; 2]>,
    layers: Vec<VitLayer>,
    layernorm: nn::LayerNorm,
}

impl ViTModel {
    /// A randomly initialised model (cls token and position embeddings ~ N(0, 0.02²); tch
    /// defaults elsewhere).
    pub fn new(config: ViTConfig, device: Device) -> Result<Self> {
        Self::build(config, device, "ViT config")
    }

    fn build(config: ViTConfig, device: Device, origin: &str) -> Result<Self> {
        // tch initialises every variable at random: no other thread may draw meanwhile
        crate::rng::exclusive(|| Self::build_unlocked(config, device, origin))
    }

    fn build_unlocked(config: ViTConfig, device: Device, origin: &str) -> Result<Self> {
        let act = config.validate(origin)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let d = config.hidden_size;
        let emb = &root / "embeddings";
        let init = nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        let cls_token = emb.var("cls_token", &[1, 1, d], init);
        let position_embeddings = emb.var("position_embeddings", &[1, 1 + config.num_patches(), d], init);
        let (ph, pw) = config.patch_size.hw();
        // (d, C, ph, pw) kernel, stride = patch: one output per patch.
        let patch_embed: nn::Conv<[i64; 2]> = nn::conv(
            &emb / "patch_embeddings" / "projection",
            config.num_channels,
            d,
            [ph, pw],
            nn::ConvConfigND::<[i64; 2]> { stride: [ph, pw], ..Default::default() },
        );
        let layers = (0..config.num_hidden_layers)
            .map(|i| VitLayer::new(&root / "encoder" / "layer" / i, &config, act))
            .collect();
        let layernorm = nn::layer_norm(
            &root / "layernorm",
            vec![d],
            nn::LayerNormConfig { eps: config.layer_norm_eps, ..Default::default() },
        );
        Ok(Self { vs, config, cls_token, position_embeddings, patch_embed, layers, layernorm })
    }

    /// Loads `dir/config.json` and `dir/model.safetensors` (strict; see the module docs for
    /// the accepted key spellings and the skipped pooler).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!("ViT model folder {} does not exist", dir.display());
        }
        let cfg_path = dir.join("config.json");
        let config: ViTConfig = read_json(&cfg_path)?;
        let model = Self::build(config, device, &cfg_path.display().to_string())?;
        let weights = weight_file(dir)?;
        load_strict(&model.vs, &weights, &|key, _| match canonical_key(key) {
            Some(name) => KeyAction::Load(name),
            None => KeyAction::Skip,
        })?;
        Ok(model)
    }

    pub fn hidden_size(&self) -> i64 {
        self.config.hidden_size
    }

    /// `pixel_values` (B, C, H, W), (H, W) = image_size -> last hidden state (B, 1+N, d),
    /// after the final `layernorm`; row 0 of each item is the CLS token. Panics on a wrong
    /// shape; see [`Self::f_forward`].
    pub fn forward(&self, pixel_values: &Tensor) -> Tensor {
        self.f_forward(pixel_values).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Fallible [`Self::forward`]: checks the input's rank, channels and size. Differentiable
    /// with respect to `pixel_values` and the weights (call under `tch::no_grad` for inference).
    pub fn f_forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values
            .size4()
            .with_context(|| format!("pixel values must be (B, C, H, W), got {:?}", pixel_values.size()))?;
        if c != self.config.num_channels {
            bail!("pixel values have {c} channels, the ViT expects num_channels = {}", self.config.num_channels);
        }
        let (ih, iw) = self.config.image_size.hw();
        if (h, w) != (ih, iw) {
            bail!(
                "input image size ({h}*{w}) doesn't match the ViT's image_size ({ih}*{iw}); \
                 position embeddings are not interpolated — resize/crop the input first"
            );
        }
        let x = pixel_values.to_device(self.vs.device()).to_kind(Kind::Float);
        let d = self.config.hidden_size;
        let patches = self.patch_embed.forward(&x).flatten(2, -1).transpose(1, 2); // (B, N, d)
        let cls = self.cls_token.expand([b, 1, d], false); // (B, 1, d)
        let mut h = Tensor::cat(&[cls, patches], 1) + &self.position_embeddings; // (B, 1+N, d)
        for layer in &self.layers {
            h = layer.forward(&h);
        }
        Ok(self.layernorm.forward(&h))
    }
}

/// Maps a weight-file key to the VarStore name; `None` for a key that is skipped (the pooler).
///
/// Strips a leading `vit.`; rewrites transformers' in-memory names (`layers.{i}.attention.q_proj`,
/// `k_proj`, `v_proj`, `o_proj`, `mlp.fc1`, `mlp.fc2`) to the saved ones. Other keys pass
/// through unchanged (and the strict loader reports them if the model lacks them).
pub fn canonical_key(key: &str) -> Option<String> {
    let key = key.strip_prefix("vit.").unwrap_or(key);
    if key.starts_with("pooler.") {
        return None;
    }
    if let Some(rest) = key.strip_prefix("layers.") {
        if let Some((i, tail)) = rest.split_once('.') {
            if i.parse::<u64>().is_ok() {
                let tail = [
                    ("attention.q_proj.", "attention.attention.query."),
                    ("attention.k_proj.", "attention.attention.key."),
                    ("attention.v_proj.", "attention.attention.value."),
                    ("attention.o_proj.", "attention.output.dense."),
                    ("mlp.fc1.", "intermediate.dense."),
                    ("mlp.fc2.", "output.dense."),
                ]
                .iter()
                .find_map(|(new, old)| tail.strip_prefix(new).map(|p| format!("{old}{p}")))
                .unwrap_or_else(|| tail.to_string());
                return Some(format!("encoder.layer.{i}.{tail}"));
            }
        }
    }
    Some(key.to_string())
}
