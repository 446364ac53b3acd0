//! `unet/config.json` of a diffusers `UNet2DConditionModel`, and the per-level settings it
//! resolves to.
//!
//! Keys this crate does not know are ignored. Keys that select diffusers features outside the
//! Stable Diffusion 1.x / 2.x / XL family (class embeddings, other addition embeddings, Fourier
//! time embedding, scale-shift resnets, …) are accepted only at their default value; anything
//! else is an error that names the file and the key. SDXL's `addition_embed_type = "text_time"`
//! needs `addition_time_embed_dim` and `projection_class_embeddings_input_dim`.
//!
//! Read but without effect on the forward: `sample_size`, `upcast_attention` (diffusers'
//! `AttnProcessor2_0` never reads it), `dropout` (the forward is eval-mode). Left to the
//! "unknown key" path because they only matter for refused block or embedding types:
//! `resnet_out_scale_factor`, `cross_attention_norm`, `addition_embed_type_num_heads`.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// A config value that is either one value for every level or a list with one per level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerLevel<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerLevel<T> {
    /// The value of every level, checking the list length against `levels`.
    pub fn resolve(&self, key: &str, levels: usize) -> Result<Vec<T>> {
        match self {
            PerLevel::One(v) => Ok(vec![v.clone(); levels]),
            PerLevel::Each(v) if v.len() == levels => Ok(v.clone()),
            PerLevel::Each(v) => {
                bail!("{FILE}: `{key}` has {} entries but there are {levels} down blocks", v.len())
            }
        }
    }
}

const FILE: &str = "unet/config.json";

fn default_channels() -> i64 {
    4
}
fn default_true() -> bool {
    true
}
fn default_block_out_channels() -> Vec<i64> {
    vec![320, 640, 1280, 1280]
}
fn default_down_block_types() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec()
}
fn default_up_block_types() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}
fn default_mid_block_type() -> Option<String> {
    Some(MID_CROSS_ATTN.to_string())
}
fn default_two() -> PerLevel<i64> {
    PerLevel::One(2)
}
fn default_one() -> PerLevel<i64> {
    PerLevel::One(1)
}
fn default_head_dim() -> PerLevel<i64> {
    PerLevel::One(8)
}
fn default_false() -> PerLevel<bool> {
    PerLevel::One(false)
}
fn default_f64_one() -> f64 {
    1.0
}
fn default_i64_one() -> i64 {
    1
}
fn default_groups() -> Option<i64> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_cross_dim() -> PerLevel<i64> {
    PerLevel::One(1280)
}
fn default_silu() -> String {
    "silu".into()
}
fn default_three() -> i64 {
    3
}
fn default_str_default() -> String {
    "default".into()
}
fn default_positional() -> String {
    "positional".into()
}

/// The cross-attention mid block of Stable Diffusion.
pub const MID_CROSS_ATTN: &str = "UNetMidBlock2DCrossAttn";

/// `unet/config.json`, with diffusers' defaults for missing keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "default_channels")]
    pub in_channels: i64,
    #[serde(default = "default_channels")]
    pub out_channels: i64,
    /// Nominal latent size; not used by the forward.
    #[serde(default)]
    pub sample_size: Option<PerLevel<i64>>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_false")]
    pub only_cross_attention: PerLevel<bool>,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "default_two")]
    pub layers_per_block: PerLevel<i64>,
    #[serde(default = "default_i64_one")]
    pub downsample_padding: i64,
    #[serde(default = "default_f64_one")]
    pub mid_block_scale_factor: f64,
    /// Dropout probability; the forward runs in eval mode, so it has no effect.
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_groups")]
    pub norm_num_groups: Option<i64>,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_cross_dim")]
    pub cross_attention_dim: PerLevel<i64>,
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: PerLevel<i64>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    /// diffusers' misnomer: with `num_attention_heads` unset this is the number of HEADS.
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: PerLevel<i64>,
    #[serde(default)]
    pub num_attention_heads: Option<PerLevel<i64>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// fp32 upcast of the attention scores (SD-2.1: true; SDXL: null). diffusers' default
    /// `AttnProcessor2_0` (fused SDPA) never reads it, and neither does our fused path; the
    /// path that records attention probabilities takes its softmax in float32 always.
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    #[serde(default = "default_str_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    /// Width of the time embedding; `None` = 4 × `block_out_channels[0]`.
    #[serde(default)]
    pub time_embedding_dim: Option<i64>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
    #[serde(default = "default_three")]
    pub conv_in_kernel: i64,
    #[serde(default = "default_three")]
    pub conv_out_kernel: i64,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<i64>,
    /// Doubles the resnets' time-embedding width in diffusers even without a class embedding.
    #[serde(default)]
    pub class_embeddings_concat: bool,
    /// `"text_time"` (SDXL: pooled text embeds + size/crop ids) or null.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each of the six `time_ids`' sinusoidal embeddings (SDXL: 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<i64>,
    /// Input width of `add_embedding` (SDXL: 1280 pooled + 6 × 256 = 2816).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<i64>,
    #[serde(default)]
    pub encoder_hid_dim: Option<i64>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default = "default_str_default")]
    pub attention_type: String,
}

/// Settings of one level (down block `i`, up block `n-1-i`), resolved from the config.
#[derive(Debug, Clone)]
pub struct Level {
    pub channels: i64,
    pub layers: i64,
    pub transformer_layers: i64,
    pub heads: i64,
    /// `channels / heads`, rounded down as diffusers does (the transformer's inner width
    /// `heads · dim_head` may then be below `channels`).
    pub dim_head: i64,
    pub cross_attention_dim: i64,
}

impl UNetConfig {
    /// Number of resolution levels (down blocks).
    pub fn num_levels(&self) -> usize {
        self.down_block_types.len()
    }

    /// GroupNorm group count (checked non-null by [`validate`](Self::validate)).
    pub fn groups(&self) -> i64 {
        self.norm_num_groups.unwrap_or(32)
    }

    /// Width of the time embedding fed to every resnet.
    pub fn time_embed_dim(&self) -> i64 {
        self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4)
    }

    /// SDXL's micro-conditioning: (addition_time_embed_dim, projection_class_embeddings_input_dim)
    /// when `addition_embed_type` is `"text_time"` (checked by [`validate`](Self::validate)).
    pub fn text_time(&self) -> Option<(i64, i64)> {
        (self.addition_embed_type.as_deref() == Some("text_time")).then(|| {
            (self.addition_time_embed_dim.unwrap_or(0), self.projection_class_embeddings_input_dim.unwrap_or(0))
        })
    }

    /// Whether down block `i` is a `CrossAttnDownBlock2D`.
    pub fn down_has_attention(&self, i: usize) -> bool {
        self.down_block_types[i] == "CrossAttnDownBlock2D"
    }

    /// Whether up block `i` is a `CrossAttnUpBlock2D`.
    pub fn up_has_attention(&self, i: usize) -> bool {
        self.up_block_types[i] == "CrossAttnUpBlock2D"
    }

    /// Per-level settings in down-block order. Validates the config first.
    pub fn levels(&self) -> Result<Vec<Level>> {
        self.validate()?;
        let n = self.num_levels();
        let layers = self.layers_per_block.resolve("layers_per_block", n)?;
        let tlayers = self.transformer_layers_per_block.resolve("transformer_layers_per_block", n)?;
        // diffusers: num_attention_heads = num_attention_heads or attention_head_dim.
        let heads = self.attention_head_dim.resolve("attention_head_dim", n)?;
        let cross = self.cross_attention_dim.resolve("cross_attention_dim", n)?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let channels = self.block_out_channels[i];
            if heads[i] <= 0 || heads[i] > channels {
                bail!(
                    "{FILE}: `attention_head_dim` (the number of heads) {} must be in 1..={channels} \
                     (block_out_channels[{i}])",
                    heads[i]
                );
            }
            let level = Level {
                channels,
                layers: layers[i],
                transformer_layers: tlayers[i],
                heads: heads[i],
                dim_head: channels / heads[i],
                cross_attention_dim: cross[i],
            };
            out.push(level);
        }
        Ok(out)
    }

    /// Checks that every key is supported; errors name the file and the key.
    pub fn validate(&self) -> Result<()> {
        self.validate_structure()?;
        self.validate_unsupported()
    }

    fn validate_structure(&self) -> Result<()> {
        let n = self.num_levels();
        if n == 0 {
            bail!("{FILE}: `down_block_types` is empty");
        }
        if self.up_block_types.len() != n || self.block_out_channels.len() != n {
            bail!(
                "{FILE}: `down_block_types` ({n}), `up_block_types` ({}) and `block_out_channels` ({}) \
                 must have the same length",
                self.up_block_types.len(),
                self.block_out_channels.len()
            );
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                bail!("{FILE}: `down_block_types` entry {t:?} is not supported (CrossAttnDownBlock2D, DownBlock2D)");
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                bail!("{FILE}: `up_block_types` entry {t:?} is not supported (CrossAttnUpBlock2D, UpBlock2D)");
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != MID_CROSS_ATTN {
                bail!("{FILE}: `mid_block_type` {m:?} is not supported ({MID_CROSS_ATTN} or null)");
            }
        }
        let Some(groups) = self.norm_num_groups else {
            bail!("{FILE}: `norm_num_groups` null is not supported");
        };
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if groups <= 0 || c <= 0 || c % groups != 0 {
                bail!("{FILE}: `norm_num_groups` {groups} does not divide block_out_channels[{i}] = {c}");
            }
        }
        for (key, k) in [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)] {
            if k <= 0 || k % 2 == 0 {
                bail!("{FILE}: `{key}` {k} is not supported (odd kernel sizes only)");
            }
        }
        if matches!(self.cross_attention_dim, PerLevel::Each(_)) {
            bail!("{FILE}: a per-level list for `cross_attention_dim` is not supported");
        }
        Ok(())
    }

    fn validate_unsupported(&self) -> Result<()> {
        let refuse = |key: &str, why: &str| -> Result<()> {
            bail!("{FILE}: `{key}` {why} is not supported by this Stable Diffusion 1.x / 2.x / XL UNet")
        };
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                for (key, v) in [
                    ("addition_time_embed_dim", self.addition_time_embed_dim),
                    ("projection_class_embeddings_input_dim", self.projection_class_embeddings_input_dim),
                ] {
                    if v.is_none_or(|v| v <= 0) {
                        bail!("{FILE}: `addition_embed_type` \"text_time\" (SDXL) needs a positive `{key}`, got {v:?}");
                    }
                }
            }
            Some(other) => refuse("addition_embed_type", &format!("{other:?} (only \"text_time\", SDXL's)"))?,
        }
        if self.num_attention_heads.is_some() {
            // diffusers 0.42 raises here too (naming issue #2011).
            refuse("num_attention_heads", "set (diffusers itself refuses it; use attention_head_dim)")?;
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            refuse("act_fn", &format!("{:?}", self.act_fn))?;
        }
        let only_cross = match &self.only_cross_attention {
            PerLevel::One(b) => *b,
            PerLevel::Each(v) => v.iter().any(|b| *b),
        };
        if only_cross || self.mid_block_only_cross_attention == Some(true) {
            refuse("only_cross_attention", "true")?;
        }
        if self.dual_cross_attention {
            refuse("dual_cross_attention", "true")?;
        }
        if self.reverse_transformer_layers_per_block.as_ref().is_some_and(|v| !v.is_null()) {
            refuse("reverse_transformer_layers_per_block", "set")?;
        }
        if self.resnet_time_scale_shift != "default" {
            refuse("resnet_time_scale_shift", &format!("{:?}", self.resnet_time_scale_shift))?;
        }
        if self.class_embeddings_concat {
            refuse("class_embeddings_concat", "true")?;
        }
        if self.resnet_skip_time_act {
            refuse("resnet_skip_time_act", "true")?;
        }
        if self.time_embedding_type != "positional" {
            refuse("time_embedding_type", &format!("{:?}", self.time_embedding_type))?;
        }
        if self.attention_type != "default" {
            refuse("attention_type", &format!("{:?}", self.attention_type))?;
        }
        let must_be_null: [(&str, bool); 7] = [
            ("time_embedding_act_fn", self.time_embedding_act_fn.is_some()),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("class_embed_type", self.class_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("encoder_hid_dim_type", self.encoder_hid_dim_type.is_some()),
        ];
        for (key, set) in must_be_null {
            if set {
                refuse(key, "non-null")?;
            }
        }
        Ok(())
    }
}
