//! diffusers' `AutoencoderKL`: the Stable Diffusion image autoencoder.
//!
//! Parameter paths are diffusers' (`encoder.down_blocks.{i}.resnets.{j}.conv1`, …,
//! `encoder.mid_block.attentions.0.to_q`, `quant_conv`, `post_quant_conv`, `decoder.up_blocks.…`).
//! Checkpoints that still use the deprecated attention-block names of the mid-block
//! (`query`/`key`/`value`/`proj_attn`) load too — renamed at load time as diffusers'
//! `_convert_deprecated_attention_blocks` does — and their projection weights may be stored as
//! 1×1 convolutions (C, C, 1, 1), as in original LDM checkpoints.
//!
//! Numerics follow diffusers 0.42.1 with `AttnProcessor2_0` (fused scaled-dot-product
//! attention, default scale); `output_scale_factor` and `rescale_output_factor` are 1 in the
//! VAE, so the divisions by them are omitted (x / 1.0 is exact).

use crate::attention::{AttnKind, AttnSite, Place};
use crate::load::{load_strict, read_json, weight_file, KeyAction};
use crate::models::attention::Attention;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use std::path::Path;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// `vae/config.json` (diffusers `AutoencoderKL`). Defaults are those of diffusers'
/// `AutoencoderKL.__init__`, used only where a key is absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d_three")]
    pub in_channels: i64,
    #[serde(default = "d_three")]
    pub out_channels: i64,
    /// Only `DownEncoderBlock2D`.
    #[serde(default = "d_down_types")]
    pub down_block_types: Vec<String>,
    /// Only `UpDecoderBlock2D`.
    #[serde(default = "d_up_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_one")]
    pub layers_per_block: i64,
    /// `silu` (or its alias `swish`).
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_latent")]
    pub latent_channels: i64,
    #[serde(default = "d_groups")]
    pub norm_num_groups: i64,
    /// Only used for tiling in diffusers; kept for reference (an int or a pair).
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    /// Must be null: Stable Diffusion 1.x latents are only scaled, never shifted.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Must be null (per-channel latent statistics belong to other pipelines).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Ignored: this implementation always computes in fp32.
    #[serde(default = "d_true")]
    pub force_upcast: bool,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

fn d_three() -> i64 {
    3
}
fn d_one() -> i64 {
    1
}
fn d_down_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".to_string()]
}
fn d_up_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".to_string()]
}
fn d_block_out() -> Vec<i64> {
    vec![64]
}
fn d_act() -> String {
    "silu".to_string()
}
fn d_latent() -> i64 {
    4
}
fn d_groups() -> i64 {
    32
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}

/// The eps diffusers uses for every GroupNorm of the VAE (`resnet_eps=1e-6`).
const VAE_EPS: f64 = 1e-6;

impl VaeConfig {
    /// Checks the values this implementation supports; `origin` names the file for errors.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("{origin}: block_out_channels is empty");
        }
        if self.down_block_types.len() != n {
            bail!("{origin}: down_block_types has {} entries, block_out_channels {n}", self.down_block_types.len());
        }
        if self.up_block_types.len() != n {
            bail!("{origin}: up_block_types has {} entries, block_out_channels {n}", self.up_block_types.len());
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            if t != "DownEncoderBlock2D" {
                bail!("{origin}: down_block_types[{i}] = {t:?} is not supported (only DownEncoderBlock2D)");
            }
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            if t != "UpDecoderBlock2D" {
                bail!("{origin}: up_block_types[{i}] = {t:?} is not supported (only UpDecoderBlock2D)");
            }
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            bail!("{origin}: act_fn {:?} is not supported (only silu)", self.act_fn);
        }
        if self.norm_num_groups <= 0 {
            bail!("{origin}: norm_num_groups must be positive, got {}", self.norm_num_groups);
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c <= 0 || c % self.norm_num_groups != 0 {
                bail!(
                    "{origin}: block_out_channels[{i}] = {c} is not a positive multiple of norm_num_groups {}",
                    self.norm_num_groups
                );
            }
        }
        for (key, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
        ] {
            if v <= 0 {
                bail!("{origin}: {key} must be positive, got {v}");
            }
        }
        if self.layers_per_block < 1 {
            bail!("{origin}: layers_per_block must be ≥ 1, got {}", self.layers_per_block);
        }
        if let Some(s) = self.shift_factor {
            bail!("{origin}: shift_factor {s} is not supported (Stable Diffusion 1.x VAEs have shift_factor null)");
        }
        if self.latents_mean.is_some() || self.latents_std.is_some() {
            bail!("{origin}: latents_mean / latents_std are not supported (must be null)");
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            bail!("{origin}: scaling_factor must be a positive number, got {}", self.scaling_factor);
        }
        Ok(())
    }
}

fn conv(vs: nn::Path, i: i64, o: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    nn::conv2d(vs, i, o, k, nn::ConvConfig { stride, padding, ..Default::default() })
}

fn group_norm(vs: nn::Path, groups: i64, channels: i64) -> nn::GroupNorm {
    nn::group_norm(vs, groups, channels, nn::GroupNormConfig { eps: VAE_EPS, ..Default::default() })
}

/// `ResnetBlock2D` without time embedding (`temb_channels=None`, `output_scale_factor=1`).
#[derive(Debug)]
struct ResnetBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock {
    fn new(vs: nn::Path, groups: i64, cin: i64, cout: i64) -> Self {
        Self {
            norm1: group_norm(&vs / "norm1", groups, cin),
            conv1: conv(&vs / "conv1", cin, cout, 3, 1, 1),
            norm2: group_norm(&vs / "norm2", groups, cout),
            conv2: conv(&vs / "conv2", cout, cout, 3, 1, 1),
            conv_shortcut: (cin != cout).then(|| conv(&vs / "conv_shortcut", cin, cout, 1, 1, 0)),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x.shallow_clone(),
        };
        skip + h
    }
}

/// The mid-block attention: GroupNorm, one-head self-attention over the H·W positions,
/// residual.
#[derive(Debug)]
struct VaeAttention {
    group_norm: nn::GroupNorm,
    attn: Attention,
}

impl VaeAttention {
    fn new(vs: nn::Path, groups: i64, channels: i64) -> Self {
        // diffusers: heads = in_channels // attention_head_dim with attention_head_dim =
        // in_channels, so one head of width C.
        Self {
            group_norm: group_norm(&vs / "group_norm", groups, channels),
            attn: Attention::new(vs, channels, None, 1, channels, true),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("VAE attention input must be (B, C, H, W)");
        let hs = x.view([b, c, h * w]); // (B, C, HW)
        let hs = self.group_norm.forward(&hs).transpose(1, 2); // (B, HW, C)
        let site = AttnSite {
            place: Place::Mid,
            block: 0,
            attention: 0,
            layer: 0,
            kind: AttnKind::SelfAttn,
            height: h,
            width: w,
        };
        let out = self.attn.forward(&hs, None, &site, None); // (B, HW, C)
        out.transpose(-1, -2).reshape([b, c, h, w]) + x
    }
}

/// `UNetMidBlock2D` as the VAE builds it: resnet, (attention), resnet.
#[derive(Debug)]
struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn new(vs: nn::Path, groups: i64, channels: i64, add_attention: bool) -> Self {
        Self {
            resnet0: ResnetBlock::new(&vs / "resnets" / 0, groups, channels, channels),
            attention: add_attention.then(|| VaeAttention::new(&vs / "attentions" / 0, groups, channels)),
            resnet1: ResnetBlock::new(&vs / "resnets" / 1, groups, channels, channels),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.resnet0.forward(x);
        let h = match &self.attention {
            Some(a) => a.forward(&h),
            None => h,
        };
        self.resnet1.forward(&h)
    }
}

/// `DownEncoderBlock2D`: resnets, then (except in the last block) a stride-2 convolution
/// after zero-padding right and bottom by one (`Downsample2D` with `padding=0`).
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsampler: Option<nn::Conv2D>,
}

impl DownBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h);
        }
        if let Some(d) = &self.downsampler {
            // F.pad(h, (0, 1, 0, 1)): width right by 1, height bottom by 1.
            h = d.forward(&h.constant_pad_nd([0, 1, 0, 1])); // (B, C, ⌊H/2⌋, ⌊W/2⌋)
        }
        h
    }
}

/// `UpDecoderBlock2D`: resnets, then (except in the last block) nearest ×2 and a 3×3 conv.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsampler: Option<nn::Conv2D>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h);
        }
        if let Some(u) = &self.upsampler {
            let (_, _, hh, ww) = h.size4().expect("VAE decoder activations must be (B, C, H, W)");
            // F.interpolate(scale_factor=2.0, mode="nearest")
            h = h.upsample_nearest2d([2 * hh, 2 * ww], Some(2.0), Some(2.0)); // (B, C, 2H, 2W)
            h = u.forward(&h);
        }
        h
    }
}

/// diffusers' `Encoder` (with `double_z=True`).
#[derive(Debug)]
struct Encoder {
    conv_in: nn::Conv2D,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    fn new(vs: nn::Path, cfg: &VaeConfig) -> Self {
        let g = cfg.norm_num_groups;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let bp = &vs / "down_blocks" / i;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| ResnetBlock::new(&bp / "resnets" / j, g, if j == 0 { in_c } else { out_c }, out_c))
                .collect();
            let downsampler = (i + 1 < n).then(|| conv(&bp / "downsamplers" / 0 / "conv", out_c, out_c, 3, 2, 0));
            down_blocks.push(DownBlock { resnets, downsampler });
        }
        let last = ch[n - 1];
        Self {
            conv_in: conv(&vs / "conv_in", cfg.in_channels, ch[0], 3, 1, 1),
            down_blocks,
            mid_block: MidBlock::new(&vs / "mid_block", g, last, cfg.mid_block_add_attention),
            conv_norm_out: group_norm(&vs / "conv_norm_out", g, last),
            conv_out: conv(&vs / "conv_out", last, 2 * cfg.latent_channels, 3, 1, 1),
        }
    }

    /// (B, in, H, W) -> (B, 2·latent, H/f, W/f)
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(x);
        for b in &self.down_blocks {
            h = b.forward(&h);
        }
        let h = self.mid_block.forward(&h);
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// diffusers' `Decoder` (`norm_type="group"`).
#[derive(Debug)]
struct Decoder {
    conv_in: nn::Conv2D,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    fn new(vs: nn::Path, cfg: &VaeConfig) -> Self {
        let g = cfg.norm_num_groups;
        let rev: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let prev_c = out_c;
            out_c = c;
            let bp = &vs / "up_blocks" / i;
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| ResnetBlock::new(&bp / "resnets" / j, g, if j == 0 { prev_c } else { out_c }, out_c))
                .collect();
            let upsampler = (i + 1 < n).then(|| conv(&bp / "upsamplers" / 0 / "conv", out_c, out_c, 3, 1, 1));
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let first = cfg.block_out_channels[0];
        Self {
            conv_in: conv(&vs / "conv_in", cfg.latent_channels, rev[0], 3, 1, 1),
            mid_block: MidBlock::new(&vs / "mid_block", g, rev[0], cfg.mid_block_add_attention),
            up_blocks,
            conv_norm_out: group_norm(&vs / "conv_norm_out", g, first),
            conv_out: conv(&vs / "conv_out", first, cfg.out_channels, 3, 1, 1),
        }
    }

    /// (B, latent, h, w) -> (B, out, h·f, w·f)
    fn forward(&self, z: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(z);
        h = self.mid_block.forward(&h);
        for b in &self.up_blocks {
            h = b.forward(&h);
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// The posterior of [`AutoencoderKL::encode`], diffusers' `DiagonalGaussianDistribution`.
#[derive(Debug)]
pub struct LatentDist {
    /// (B, latent, h, w)
    pub mean: Tensor,
    /// (B, latent, h, w), clamped to [-30, 20]
    pub logvar: Tensor,
}

impl LatentDist {
    /// exp(0.5 · logvar)
    pub fn std(&self) -> Tensor {
        (&self.logvar * 0.5).exp()
    }

    /// mean + std · ε with ε ~ N(0, I) from torch's global generator.
    pub fn sample(&self) -> Tensor {
        self.sample_with_noise(&self.mean.randn_like())
    }

    /// mean + std · `noise` (diffusers' `sample` with a given ε).
    pub fn sample_with_noise(&self, noise: &Tensor) -> Tensor {
        &self.mean + self.std() * noise
    }

    /// The mode (the mean).
    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug)]
pub struct AutoencoderKL {
    pub vs: nn::VarStore,
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<nn::Conv2D>,
    post_quant_conv: Option<nn::Conv2D>,
}

impl AutoencoderKL {
    /// A randomly initialised model (tch default initialisation).
    pub fn new(config: VaeConfig, device: Device) -> Result<Self> {
        Self::build(config, device, "vae config")
    }

    fn build(config: VaeConfig, device: Device, origin: &str) -> Result<Self> {
        // tch initialises every variable at random: no other thread may draw meanwhile
        crate::rng::exclusive(|| Self::build_unlocked(config, device, origin))
    }

    fn build_unlocked(config: VaeConfig, device: Device, origin: &str) -> Result<Self> {
        config.validate(origin)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let l = config.latent_channels;
        let encoder = Encoder::new(&root / "encoder", &config);
        let decoder = Decoder::new(&root / "decoder", &config);
        let quant_conv = config.use_quant_conv.then(|| conv(&root / "quant_conv", 2 * l, 2 * l, 1, 1, 0));
        let post_quant_conv = config.use_post_quant_conv.then(|| conv(&root / "post_quant_conv", l, l, 1, 1, 0));
        Ok(Self { vs, config, encoder, decoder, quant_conv, post_quant_conv })
    }

    /// Loads `dir/config.json` and the weights of `dir`, strictly, accepting the deprecated
    /// mid-block attention names (see [`map_legacy_key`]).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let config: VaeConfig = read_json(&cfg_path)?;
        let model = Self::build(config, device, &cfg_path.display().to_string())?;
        load_strict(&model.vs, &weight_file(dir)?, &vae_key)?;
        Ok(model)
    }

    /// `image` (B, in_channels, H, W) in [-1, 1] -> the latent posterior (B, latent, H/f, W/f).
    pub fn encode(&self, image: &Tensor) -> LatentDist {
        self.f_encode(image).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn f_encode(&self, image: &Tensor) -> Result<LatentDist> {
        let size = image.size();
        if size.len() != 4 || size[1] != self.config.in_channels {
            bail!("VAE input must be (B, {}, H, W), got {size:?}", self.config.in_channels);
        }
        let mut h = self.encoder.forward(&image.to_device(self.vs.device()).to_kind(self.vs.kind())); // (B, 2L, h, w)
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h);
        }
        let parts = h.chunk(2, 1);
        let mean = parts[0].to_kind(Kind::Float); // (B, L, h, w), float32 whatever the weights' kind
        let logvar = parts[1].clamp(-30.0, 20.0).to_kind(Kind::Float); // (B, L, h, w)
        Ok(LatentDist { mean, logvar })
    }

    /// `z` (B, latent, h, w), unscaled (divide by [`Self::scaling_factor`] first) -> the raw
    /// decoder output (B, out_channels, h·f, w·f), roughly in [-1, 1], not clamped.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        self.f_decode(z).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn f_decode(&self, z: &Tensor) -> Result<Tensor> {
        let size = z.size();
        if size.len() != 4 || size[1] != self.config.latent_channels {
            bail!("VAE latents must be (B, {}, h, w), got {size:?}", self.config.latent_channels);
        }
        let mut z = z.to_device(self.vs.device()).to_kind(self.vs.kind());
        if let Some(q) = &self.post_quant_conv {
            z = q.forward(&z);
        }
        Ok(self.decoder.forward(&z).to_kind(Kind::Float))
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Image pixels per latent pixel along each side: 2^(len(block_out_channels) - 1).
    pub fn downscale_factor(&self) -> i64 {
        1 << (self.config.block_out_channels.len() - 1)
    }

    pub fn latent_channels(&self) -> i64 {
        self.config.latent_channels
    }
}

const LEGACY_ATTN_NAMES: [(&str, &str); 4] =
    [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")];

/// Renames a deprecated mid-block attention key (`….mid_block.attentions.{i}.query.weight` ->
/// `….to_q.weight`; `key` -> `to_k`, `value` -> `to_v`, `proj_attn` -> `to_out.0`), as
/// diffusers' `_convert_deprecated_attention_blocks`. Other keys are returned unchanged.
pub fn map_legacy_key(key: &str) -> String {
    let Some(pos) = key.find(".mid_block.attentions.") else {
        return key.to_string();
    };
    let rest = &key[pos + ".mid_block.attentions.".len()..]; // "{i}.{name}.{weight|bias}"
    let parts: Vec<&str> = rest.split('.').collect();
    if parts.len() == 3 && parts[0].parse::<u32>().is_ok() && (parts[2] == "weight" || parts[2] == "bias") {
        for (old, new) in LEGACY_ATTN_NAMES {
            if parts[1] == old {
                return format!("{}.mid_block.attentions.{}.{new}.{}", &key[..pos], parts[0], parts[2]);
            }
        }
    }
    key.to_string()
}

/// The VAE's key mapping for [`load_strict`]: legacy attention names are renamed
/// ([`map_legacy_key`]) and a 1×1-conv projection weight (C, C, 1, 1) of the mid-block
/// attention is loaded into the linear weight (C, C).
fn vae_key(key: &str, value: &Tensor) -> KeyAction {
    let name = map_legacy_key(key);
    let is_attn_proj =
        name.contains(".mid_block.attentions.") && name.ends_with(".weight") && !name.contains(".group_norm.");
    let size = value.size();
    if is_attn_proj && size.len() == 4 && size[2..] == [1, 1] {
        return KeyAction::LoadValue(name, value.flatten(1, 3)); // (C, C, 1, 1) -> (C, C)
    }
    KeyAction::Load(name)
}
