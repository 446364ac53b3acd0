//! The UNet's down, mid and up blocks: `(CrossAttn)DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `(CrossAttn)UpBlock2D`. A block without cross-attention simply has no `attentions`.

use super::config::{Level, UNetConfig};
use super::reborrow;
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetSpec, Upsample2D};
use super::transformer::{Transformer2DModel, TransformerSpec};
use crate::attention::{AttentionController, AttnKind, AttnSite, Place};
use tch::{nn, Tensor};

/// Resnet shapes for a block of `cfg` (output scale 1, as every SD block but the mid one).
fn resnet_spec(cfg: &UNetConfig, c_in: i64, c_out: i64) -> ResnetSpec {
    ResnetSpec {
        c_in,
        c_out,
        temb: cfg.time_embed_dim(),
        groups: cfg.groups(),
        eps: cfg.norm_eps,
        output_scale_factor: 1.0,
    }
}

/// Transformer shapes for `level` of `cfg`.
fn transformer_spec(cfg: &UNetConfig, level: &Level) -> TransformerSpec {
    TransformerSpec {
        channels: level.channels,
        heads: level.heads,
        dim_head: level.dim_head,
        layers: level.transformer_layers,
        cross_attention_dim: level.cross_attention_dim,
        groups: cfg.groups(),
        use_linear_projection: cfg.use_linear_projection,
    }
}

/// The site of `attentions.{attention}` in block `block` at `place`; the transformer fills in
/// layer, kind and size.
fn site(place: Place, block: usize, attention: usize) -> AttnSite {
    AttnSite { place, block, attention, layer: 0, kind: AttnKind::SelfAttn, height: 0, width: 0 }
}

/// What every block is conditioned on: the time embedding (B, time_embed_dim) for the resnets
/// and the text `context` (B, M, cross_attention_dim) for the cross-attention.
#[derive(Clone, Copy)]
pub struct Cond<'a> {
    pub temb: &'a Tensor,
    pub context: &'a Tensor,
}

/// `down_blocks.{i}`: resnets (each followed by a transformer in the cross-attention variant),
/// then an optional strided-conv downsampler.
#[derive(Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// `c_in`: channels entering the block; `level`: this block's settings.
    pub fn new(vs: nn::Path, cfg: &UNetConfig, level: &Level, c_in: i64, cross_attn: bool, downsample: bool) -> Self {
        let c = level.channels;
        let resnets = (0..level.layers)
            .map(|j| {
                let spec = resnet_spec(cfg, if j == 0 { c_in } else { c }, c);
                ResnetBlock2D::new(&vs / "resnets" / j, spec)
            })
            .collect();
        let n_attn = if cross_attn { level.layers } else { 0 };
        let attentions = (0..n_attn)
            .map(|j| Transformer2DModel::new(&vs / "attentions" / j, transformer_spec(cfg, level)))
            .collect();
        let downsampler = downsample.then(|| Downsample2D::new(&vs / "downsamplers" / 0, c, cfg.downsample_padding));
        Self { resnets, attentions, downsampler }
    }

    /// Returns the block output and the skip tensors it hands to the up path (one per resnet,
    /// plus the downsampled output).
    pub fn forward(
        &self,
        x: &Tensor,
        cond: Cond,
        index: usize,
        mut ctrl: Option<&mut dyn AttentionController>,
    ) -> (Tensor, Vec<Tensor>) {
        let mut h = x.shallow_clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, cond.temb);
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, cond.context, site(Place::Down, index, j), reborrow(&mut ctrl));
            }
            skips.push(h.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h);
            skips.push(h.shallow_clone());
        }
        (h, skips)
    }
}

/// `mid_block` (`UNetMidBlock2DCrossAttn`): `resnets.0`, `attentions.0`, `resnets.1`.
#[derive(Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn new(vs: nn::Path, cfg: &UNetConfig, level: &Level) -> Self {
        let c = level.channels;
        let spec = ResnetSpec { output_scale_factor: cfg.mid_block_scale_factor, ..resnet_spec(cfg, c, c) };
        Self {
            resnets: (0..2).map(|j| ResnetBlock2D::new(&vs / "resnets" / j, spec)).collect(),
            attentions: vec![Transformer2DModel::new(&vs / "attentions" / 0, transformer_spec(cfg, level))],
        }
    }

    /// (B, C, h, w) -> (B, C, h, w)
    pub fn forward(&self, x: &Tensor, cond: Cond, mut ctrl: Option<&mut dyn AttentionController>) -> Tensor {
        let mut h = self.resnets[0].forward(x, cond.temb);
        for (j, (attn, resnet)) in self.attentions.iter().zip(&self.resnets[1..]).enumerate() {
            h = attn.forward(&h, cond.context, site(Place::Mid, 0, j), reborrow(&mut ctrl));
            h = resnet.forward(&h, cond.temb);
        }
        h
    }
}

/// Channel counts of one up block, as diffusers computes them.
#[derive(Debug, Clone, Copy)]
pub struct UpChannels {
    /// Output channels of the previous up block (or of the mid block).
    pub prev_out: i64,
    /// Channels of the skip feeding this block's LAST resnet (the next-shallower level's).
    pub skip_last: i64,
}

/// `up_blocks.{i}`: `layers + 1` resnets, each fed the concat of the running tensor and one skip
/// (optionally followed by a transformer), then an optional nearest-2× upsampler + conv.
#[derive(Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `level`: the settings of the matching down level (up block `i` mirrors level `n-1-i`).
    pub fn new(
        vs: nn::Path,
        cfg: &UNetConfig,
        level: &Level,
        ch: UpChannels,
        cross_attn: bool,
        upsample: bool,
    ) -> Self {
        let c = level.channels;
        let n = level.layers + 1;
        let resnets = (0..n)
            .map(|j| {
                let skip = if j == n - 1 { ch.skip_last } else { c };
                let running = if j == 0 { ch.prev_out } else { c };
                ResnetBlock2D::new(&vs / "resnets" / j, resnet_spec(cfg, running + skip, c))
            })
            .collect();
        let n_attn = if cross_attn { n } else { 0 };
        let attentions = (0..n_attn)
            .map(|j| Transformer2DModel::new(&vs / "attentions" / j, transformer_spec(cfg, level)))
            .collect();
        let upsampler = upsample.then(|| Upsample2D::new(&vs / "upsamplers" / 0, c));
        Self { resnets, attentions, upsampler }
    }

    /// `skips`: this block's skip tensors in down order (the last one is consumed first).
    /// `upsample_size`: diffusers' forwarded size for latents not divisible by the overall factor.
    pub fn forward(
        &self,
        x: &Tensor,
        mut skips: Vec<Tensor>,
        cond: Cond,
        index: usize,
        upsample_size: Option<[i64; 2]>,
        mut ctrl: Option<&mut dyn AttentionController>,
    ) -> Tensor {
        let mut h = x.shallow_clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("one skip tensor per up-block resnet");
            h = resnet.forward(&Tensor::cat(&[&h, &skip], 1), cond.temb); // concat on channels
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, cond.context, site(Place::Up, index, j), reborrow(&mut ctrl));
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&h, upsample_size),
            None => h,
        }
    }
}
