//! diffusers' `UNet2DConditionModel` for the Stable Diffusion 1.x, 2.x and XL families (the
//! noise predictor ε_θ(x_t, t, c), or v_θ for v-prediction models), built from
//! `unet/config.json` with diffusers' parameter names, so the diffusers safetensors file loads
//! strictly without renaming. SDXL's micro-conditioning (`addition_embed_type = "text_time"`)
//! takes an [`AddedCond`] beside the encoder hidden states.
//!
//! Every attention call reports an [`AttnSite`](crate::attention::AttnSite) to the optional
//! [`AttentionController`]: `place` Down/Mid/Up, `block` (index in `down_blocks` / `up_blocks`,
//! 0 for mid), `attention` (index in the block's `attentions`), `layer` (index in
//! `transformer_blocks`), `kind` (SelfAttn for `attn1`, Cross for `attn2`) and the latent size.
//!
//! Any latent size is accepted: when it is not divisible by [`UNet2DConditionModel::downsample_factor`],
//! each upsampler interpolates to the size of the matching skip tensor, as diffusers does
//! (`forward_upsample_size`).

pub mod blocks;
pub mod checkpoint;
pub mod config;
pub mod embeddings;
pub mod resnet;
pub mod transformer;

pub use config::{PerLevel, UNetConfig};

use crate::attention::AttentionController;
use crate::load::{load_strict, read_json, weight_file, KeyAction};
use anyhow::{Context, Result};
use blocks::{Cond, DownBlock, MidBlock, UpBlock, UpChannels};
use config::Level;
use embeddings::{timestep_embedding, TimestepEmbedding};
use resnet::{conv_same, group_norm};
use std::path::Path;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// SDXL's `added_cond_kwargs`: the pooled, projected prompt embedding of the second text encoder
/// (`text_embeds`, (B, P)) and the six size / crop numbers (`time_ids`, (B, 6): original height
/// and width, crop top and left, target height and width).
#[derive(Debug)]
pub struct AddedCond {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

impl AddedCond {
    pub fn shallow_clone(&self) -> Self {
        Self { text_embeds: self.text_embeds.shallow_clone(), time_ids: self.time_ids.shallow_clone() }
    }

    /// Rows repeated `n` times (`num_images_per_prompt`).
    pub fn repeat(&self, n: i64) -> Self {
        Self { text_embeds: self.text_embeds.repeat([n, 1]), time_ids: self.time_ids.repeat([n, 1]) }
    }

    /// Two batches stacked (`[a; b]`), as the guidance batch [φ; c].
    pub fn cat(a: &Self, b: &Self) -> Self {
        Self {
            text_embeds: Tensor::cat(&[&a.text_embeds, &b.text_embeds], 0),
            time_ids: Tensor::cat(&[&a.time_ids, &b.time_ids], 0),
        }
    }
}

/// The conditional UNet. Parameter paths are diffusers' (`conv_in`, `time_embedding.linear_1`,
/// `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`, …).
#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub vs: nn::VarStore,
    pub config: UNetConfig,
    pub conv_in: nn::Conv2D,
    pub time_embedding: TimestepEmbedding,
    /// SDXL's `add_embedding`: (pooled text embeds ++ sinusoids of the time ids) → time width.
    pub add_embedding: Option<TimestepEmbedding>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: nn::GroupNorm,
    pub conv_out: nn::Conv2D,
}

impl UNet2DConditionModel {
    /// The attention projections `to_q`, `to_k`, `to_v`, `to_out.0` of every transformer block
    /// (self- and cross-attention, down, mid and up): the LoRA targets of diffusers'
    /// `train_dreambooth_lora.py`.
    pub fn lora_targets_mut(&mut self) -> Vec<&mut crate::models::lora::LoraLinear> {
        let transformers = self
            .down_blocks
            .iter_mut()
            .flat_map(|b| b.attentions.iter_mut())
            .chain(self.mid_block.iter_mut().flat_map(|b| b.attentions.iter_mut()))
            .chain(self.up_blocks.iter_mut().flat_map(|b| b.attentions.iter_mut()));
        transformers
            .flat_map(|t| t.transformer_blocks.iter_mut())
            .flat_map(|b| {
                let [q1, k1, v1, o1] = b.attn1.projections_mut();
                let [q2, k2, v2, o2] = b.attn2.projections_mut();
                [q1, k1, v1, o1, q2, k2, v2, o2]
            })
            .collect()
    }

    /// Builds the UNet of `config` with tch's default random initialisation.
    pub fn new(config: UNetConfig, device: Device) -> Result<Self> {
        // tch initialises every variable at random: no other thread may draw meanwhile
        crate::rng::exclusive(|| Self::new_unlocked(config, device))
    }

    fn new_unlocked(config: UNetConfig, device: Device) -> Result<Self> {
        let levels = config.levels()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let c0 = config.block_out_channels[0];
        let conv_in = conv_same(&root / "conv_in", config.in_channels, c0, config.conv_in_kernel);
        let time_embedding = TimestepEmbedding::new(&root / "time_embedding", c0, config.time_embed_dim());
        let add_embedding = config
            .text_time()
            .map(|(_, d_in)| TimestepEmbedding::new(&root / "add_embedding", d_in, config.time_embed_dim()));
        let down_blocks = Self::build_down(&root / "down_blocks", &config, &levels);
        let mid_block = config
            .mid_block_type
            .as_ref()
            .map(|_| MidBlock::new(&root / "mid_block", &config, &levels[levels.len() - 1]));
        let up_blocks = Self::build_up(&root / "up_blocks", &config, &levels);
        let conv_norm_out = group_norm(&root / "conv_norm_out", config.groups(), c0, config.norm_eps);
        let conv_out = conv_same(&root / "conv_out", c0, config.out_channels, config.conv_out_kernel);
        Ok(Self {
            vs,
            config,
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    fn build_down(vs: nn::Path, cfg: &UNetConfig, levels: &[Level]) -> Vec<DownBlock> {
        let n = levels.len();
        (0..n)
            .map(|i| {
                let c_in = if i == 0 { levels[0].channels } else { levels[i - 1].channels };
                DownBlock::new(&vs / i, cfg, &levels[i], c_in, cfg.down_has_attention(i), i + 1 < n)
            })
            .collect()
    }

    fn build_up(vs: nn::Path, cfg: &UNetConfig, levels: &[Level]) -> Vec<UpBlock> {
        let n = levels.len();
        (0..n)
            .map(|i| {
                let level = &levels[n - 1 - i];
                let ch = UpChannels {
                    prev_out: levels[(n - i).min(n - 1)].channels,
                    skip_last: levels[(n - 1 - i).saturating_sub(1)].channels,
                };
                UpBlock::new(&vs / i, cfg, level, ch, cfg.up_has_attention(i), i + 1 < n)
            })
            .collect()
    }

    /// Reads `dir/config.json` and loads the weights of `dir` strictly (no renaming).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let config: UNetConfig = read_json(&dir.join("config.json"))?;
        let model = Self::new(config, device)?;
        let weights = weight_file(dir)?;
        load_strict(&model.vs, &weights, &|key, _| KeyAction::Load(key.to_string()))
            .with_context(|| format!("loading the UNet from {}", dir.display()))?;
        Ok(model)
    }

    /// 2^(levels − 1). Latent sizes divisible by it take the plain 2× upsampling path; others
    /// are accepted too and upsampled to the skip sizes, as diffusers does.
    pub fn downsample_factor(&self) -> i64 {
        1 << (self.down_blocks.len() - 1)
    }

    /// Predicts the noise. `sample`: (B, in_channels, h, w); `timesteps`: (B,) or a 0-dim
    /// scalar (broadcast to B), integer or float; `encoder_hidden_states`: (B, M, cross_attention_dim).
    /// Returns (B, out_channels, h, w). An SDXL UNet needs [`forward_added`](Self::forward_added).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        ctrl: Option<&mut dyn AttentionController>,
    ) -> Tensor {
        self.forward_added(sample, timesteps, encoder_hidden_states, None, ctrl)
    }

    /// Whether the UNet needs SDXL's [`AddedCond`].
    pub fn needs_added_cond(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// [`forward`](Self::forward) with SDXL's micro-conditioning: the time embedding gains
    /// `add_embedding(text_embeds ++ sinusoids(time_ids))`, as diffusers' `get_aug_embed` for
    /// `"text_time"`. `added` must be given exactly when [`needs_added_cond`](Self::needs_added_cond);
    /// callers check that first (a mismatch is a programming error and panics).
    pub fn forward_added(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
        mut ctrl: Option<&mut dyn AttentionController>,
    ) -> Tensor {
        // Mixed precision: inputs in the weights' kind, the prediction in the caller's kind.
        let out_kind = sample.kind();
        let sample = &sample.to_kind(self.vs.kind());
        let context = encoder_hidden_states.to_kind(self.vs.kind());
        let emb = self.embedding(timesteps, sample, added);
        let cond = Cond { temb: &emb, context: &context };
        let sample = if self.config.center_input_sample { sample * 2.0 - 1.0 } else { sample.shallow_clone() };
        let mut h = self.conv_in.forward(&sample);
        let mut skips = vec![h.shallow_clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let (out, res) = block.forward(&h, cond, i, reborrow(&mut ctrl));
            h = out;
            skips.extend(res);
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, cond, reborrow(&mut ctrl));
        }
        let forward_size = self.needs_upsample_size(&sample);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let res = skips.split_off(skips.len() - block.resnets.len());
            // The size of the next (shallower) level; none after the last up block.
            let size = skips.last().filter(|_| forward_size).map(spatial);
            h = block.forward(&h, res, cond, i, size, reborrow(&mut ctrl));
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu()).to_kind(out_kind)
    }

    /// The kind the UNet computes in (its weights').
    pub fn kind(&self) -> Kind {
        self.vs.kind()
    }

    /// Sinusoidal embedding of the (broadcast) timesteps through `time_embedding`: (B, time_embed_dim).
    /// The embedding every resnet reads: the time embedding, plus SDXL's `add_embedding` of the
    /// pooled text embeds and the size ids (`addition_embed_type = "text_time"`).
    fn embedding(&self, timesteps: &Tensor, sample: &Tensor, added: Option<&AddedCond>) -> Tensor {
        let emb = self.time_embed(timesteps, sample);
        match (&self.add_embedding, added) {
            (Some(add), Some(a)) => {
                let (dim, _) = self.config.text_time().expect("add_embedding exists for text_time");
                let b = a.text_embeds.size()[0];
                let ids = a.time_ids.to_device(sample.device()).flatten(0, -1); // (B·6,)
                let t = timestep_embedding(&ids, dim, self.config.flip_sin_to_cos, self.config.freq_shift);
                let t = t.reshape([b, -1]); // (B, 6·dim)
                let add_in = Tensor::cat(&[a.text_embeds.to_device(sample.device()).to_kind(Kind::Float), t], -1);
                let aug = add.forward(&add_in.to_kind(emb.kind()));
                emb + aug
            }
            (None, None) => emb,
            (Some(_), None) => panic!("this SDXL UNet needs text_embeds and time_ids (AddedCond)"),
            (None, Some(_)) => panic!("AddedCond given to a UNet without addition_embed_type \"text_time\""),
        }
    }

    fn time_embed(&self, timesteps: &Tensor, sample: &Tensor) -> Tensor {
        let b = sample.size()[0];
        let t = if timesteps.dim() == 0 { timesteps.unsqueeze(0) } else { timesteps.shallow_clone() };
        let t = t.to_device(sample.device()).expand([b], false); // (B,)
        let c0 = self.config.block_out_channels[0];
        let t_emb = timestep_embedding(&t, c0, self.config.flip_sin_to_cos, self.config.freq_shift);
        self.time_embedding.forward(&t_emb.to_kind(sample.kind()))
    }

    /// diffusers' `forward_upsample_size`: some spatial size is not a multiple of 2^(#upsamplers).
    fn needs_upsample_size(&self, sample: &Tensor) -> bool {
        let f = self.downsample_factor();
        sample.size()[2..].iter().any(|d| d % f != 0)
    }
}

pub use crate::attention::reborrow;

/// (h, w) of a (B, C, h, w) tensor.
fn spatial(t: &Tensor) -> [i64; 2] {
    let s = t.size();
    [s[2], s[3]]
}
