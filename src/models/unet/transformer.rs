//! diffusers' `Transformer2DModel` (continuous input) with `BasicTransformerBlock`s, as the
//! SD UNet's `attentions.{i}` use them.

use super::reborrow;
use super::resnet::group_norm;
use crate::attention::{AttentionController, AttnKind, AttnSite};
use crate::models::attention::Attention;
use tch::{nn, nn::Module, Tensor};

/// Shapes of one [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    pub channels: i64,
    pub heads: i64,
    pub dim_head: i64,
    pub layers: i64,
    pub cross_attention_dim: i64,
    pub groups: i64,
    pub use_linear_projection: bool,
}

/// `proj_in` / `proj_out`: a 1×1 convolution on (B, C, h, w), or a Linear on (B, hw, C)
/// with `use_linear_projection`.
#[derive(Debug)]
pub enum Proj {
    Conv(nn::Conv2D),
    Linear(nn::Linear),
}

impl Proj {
    fn new(vs: nn::Path, c_in: i64, c_out: i64, linear: bool) -> Self {
        if linear {
            Proj::Linear(nn::linear(vs, c_in, c_out, Default::default()))
        } else {
            Proj::Conv(nn::conv2d(vs, c_in, c_out, 1, Default::default()))
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Proj::Conv(c) => c.forward(x),
            Proj::Linear(l) => l.forward(x),
        }
    }
}

/// `Transformer2DModel`: GroupNorm (eps 1e-6), `proj_in`, transformer blocks, `proj_out`, residual.
#[derive(Debug)]
pub struct Transformer2DModel {
    pub norm: nn::GroupNorm,
    pub proj_in: Proj,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Proj,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(vs: nn::Path, s: TransformerSpec) -> Self {
        let inner = s.heads * s.dim_head;
        let linear = s.use_linear_projection;
        let blocks =
            (0..s.layers).map(|j| BasicTransformerBlock::new(&vs / "transformer_blocks" / j, inner, s)).collect();
        Self {
            norm: group_norm(&vs / "norm", s.groups, s.channels, 1e-6),
            proj_in: Proj::new(&vs / "proj_in", s.channels, inner, linear),
            transformer_blocks: blocks,
            proj_out: Proj::new(&vs / "proj_out", inner, s.channels, linear),
            use_linear_projection: linear,
        }
    }

    /// `x`: (B, C, h, w), `context`: (B, M, cross_attention_dim) -> (B, C, h, w).
    /// `site` gives place, block and attention index; layer, kind and size are filled in here.
    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        site: AttnSite,
        mut ctrl: Option<&mut dyn AttentionController>,
    ) -> Tensor {
        let (b, _, h, w) = x.size4().expect("Transformer2DModel input must be (B, C, h, w)");
        let site = AttnSite { height: h, width: w, ..site };
        let mut hs = self.project_in(&self.norm.forward(x), b, h * w); // (B, hw, inner)
        for (j, block) in self.transformer_blocks.iter().enumerate() {
            let site = AttnSite { layer: j, ..site };
            hs = block.forward(&hs, context, site, reborrow(&mut ctrl));
        }
        self.project_out(&hs, b, h, w) + x
    }

    /// (B, C, h, w) -> (B, hw, inner)
    fn project_in(&self, x: &Tensor, b: i64, hw: i64) -> Tensor {
        let to_tokens = |t: &Tensor| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([b, hw, c]) // (B, hw, c)
        };
        if self.use_linear_projection {
            self.proj_in.forward(&to_tokens(x))
        } else {
            to_tokens(&self.proj_in.forward(x))
        }
    }

    /// (B, hw, inner) -> (B, C, h, w)
    fn project_out(&self, x: &Tensor, b: i64, h: i64, w: i64) -> Tensor {
        let to_image = |t: &Tensor| {
            let c = t.size()[2];
            t.reshape([b, h, w, c]).permute([0, 3, 1, 2]).contiguous() // (B, c, h, w)
        };
        if self.use_linear_projection {
            to_image(&self.proj_out.forward(x))
        } else {
            self.proj_out.forward(&to_image(x))
        }
    }
}

/// `BasicTransformerBlock` (layer_norm type): self-attention, cross-attention, GEGLU feed-forward,
/// each pre-normed (LayerNorm eps 1e-5) and residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    pub norm1: nn::LayerNorm,
    pub attn1: Attention,
    pub norm2: nn::LayerNorm,
    pub attn2: Attention,
    pub norm3: nn::LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vs: nn::Path, dim: i64, s: TransformerSpec) -> Self {
        let ln = |name: &str| nn::layer_norm(&vs / name, vec![dim], Default::default());
        Self {
            norm1: ln("norm1"),
            attn1: Attention::new(&vs / "attn1", dim, None, s.heads, s.dim_head, false),
            norm2: ln("norm2"),
            attn2: Attention::new(&vs / "attn2", dim, Some(s.cross_attention_dim), s.heads, s.dim_head, false),
            norm3: ln("norm3"),
            ff: FeedForward::new(&vs / "ff", dim),
        }
    }

    /// `x`: (B, hw, dim), `context`: (B, M, cross_attention_dim) -> (B, hw, dim).
    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        site: AttnSite,
        mut ctrl: Option<&mut dyn AttentionController>,
    ) -> Tensor {
        let self_site = AttnSite { kind: AttnKind::SelfAttn, ..site };
        let cross_site = AttnSite { kind: AttnKind::Cross, ..site };
        let n = self.norm1.forward(x);
        let x = self.attn1.forward(&n, None, &self_site, reborrow(&mut ctrl)) + x;
        let n = self.norm2.forward(&x);
        let x = self.attn2.forward(&n, Some(context), &cross_site, reborrow(&mut ctrl)) + x;
        self.ff.forward(&self.norm3.forward(&x)) + x
    }
}

/// `FeedForward` with GEGLU: `net.2(a · gelu(gate))` where `[a, gate] = net.0.proj(x)`.
#[derive(Debug)]
pub struct FeedForward {
    /// `net.0.proj`: dim -> 2 · 4·dim.
    pub proj: nn::Linear,
    /// `net.2`: 4·dim -> dim.
    pub out: nn::Linear,
}

impl FeedForward {
    fn new(vs: nn::Path, dim: i64) -> Self {
        let inner = 4 * dim;
        Self {
            proj: nn::linear(&vs / "net" / 0 / "proj", dim, 2 * inner, Default::default()),
            out: nn::linear(&vs / "net" / 2, inner, dim, Default::default()),
        }
    }

    /// (B, N, dim) -> (B, N, dim)
    fn forward(&self, x: &Tensor) -> Tensor {
        let parts = self.proj.forward(x).chunk(2, -1); // 2 × (B, N, 4·dim)
        self.out.forward(&(&parts[0] * parts[1].gelu("none")))
    }
}
