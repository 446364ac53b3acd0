//! diffusers' `Attention` (multi-head attention with `to_q`, `to_k`, `to_v`, `to_out.0`), shared
//! by the UNet's transformer blocks and the VAE's mid-block, with the typed hook of
//! [`crate::attention`].

use crate::attention::{AttentionController, AttnSite};
use crate::models::lora::LoraLinear;
use tch::{nn, nn::Module, Kind, Tensor};

/// Multi-head attention as diffusers' `Attention` with `AttnProcessor2_0`.
#[derive(Debug)]
pub struct Attention {
    pub to_q: LoraLinear,
    pub to_k: LoraLinear,
    pub to_v: LoraLinear,
    pub to_out: LoraLinear,
    pub heads: i64,
    pub dim_head: i64,
}

impl Attention {
    /// `vs` is the path of the attention module (e.g. `…transformer_blocks.0.attn2`);
    /// `context_dim` is the key/value input width (None = self-attention on `query_dim`).
    pub fn new(
        vs: nn::Path,
        query_dim: i64,
        context_dim: Option<i64>,
        heads: i64,
        dim_head: i64,
        qkv_bias: bool,
    ) -> Self {
        let inner = heads * dim_head;
        let kv_dim = context_dim.unwrap_or(query_dim);
        let nb = nn::LinearConfig { bias: qkv_bias, ..Default::default() };
        Self {
            to_q: LoraLinear::new(&vs / "to_q", query_dim, inner, nb),
            to_k: LoraLinear::new(&vs / "to_k", kv_dim, inner, nb),
            to_v: LoraLinear::new(&vs / "to_v", kv_dim, inner, nb),
            to_out: LoraLinear::new(&vs / "to_out" / 0, inner, query_dim, Default::default()),
            heads,
            dim_head,
        }
    }

    /// `x`: (B, N, query_dim); `context`: (B, M, context_dim) or None for self-attention.
    /// With a controller that wants `site`, the probabilities are materialised and passed to it.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        site: &AttnSite,
        ctrl: Option<&mut dyn AttentionController>,
    ) -> Tensor {
        let ctx = context.unwrap_or(x);
        let q = self.split_heads(&self.to_q.forward(x)); // (B, heads, N, dh)
        let k = self.split_heads(&self.to_k.forward(ctx)); // (B, heads, M, dh)
        let v = self.split_heads(&self.to_v.forward(ctx)); // (B, heads, M, dh)
        let out = match ctrl {
            Some(c) if c.wants(site) => {
                let scale = (self.dim_head as f64).powf(-0.5);
                // Softmax in float32 (whatever the compute kind): the controller sees float32.
                let probs = (q.matmul(&k.transpose(-1, -2)) * scale).softmax(-1, Kind::Float); // (B, heads, N, M)
                let probs = c.on_probs(site, probs);
                probs.to_kind(v.kind()).matmul(&v) // (B, heads, N, dh)
            }
            _ => sdpa(&q, &k, &v),
        };
        self.to_out.forward(&self.merge_heads(&out))
    }

    /// The four projections (LoRA targets).
    pub fn projections_mut(&mut self) -> [&mut LoraLinear; 4] {
        [&mut self.to_q, &mut self.to_k, &mut self.to_v, &mut self.to_out]
    }

    /// (B, N, heads·dh) -> (B, heads, N, dh)
    pub fn split_heads(&self, t: &Tensor) -> Tensor {
        let (b, n, _) = t.size3().expect("attention input must be (B, N, C)");
        t.view([b, n, self.heads, self.dim_head]).transpose(1, 2)
    }

    /// (B, heads, N, dh) -> (B, N, heads·dh)
    pub fn merge_heads(&self, t: &Tensor) -> Tensor {
        let (b, _, n, _) = t.size4().expect("attention output must be (B, heads, N, dh)");
        t.transpose(1, 2).reshape([b, n, self.heads * self.dim_head])
    }
}

/// The multi-head self-attention core of transformers' encoders (CLIP text, ViT): project,
/// split heads, `scaled_dot_product_attention` with an explicit scale, merge heads.
/// `x`: (B, L, d) -> (B, L, heads·dh), before the output projection.
#[allow(clippy::too_many_arguments)]
pub fn encoder_self_attention(
    x: &Tensor,
    q: &impl Module,
    k: &impl Module,
    v: &impl Module,
    heads: i64,
    head_dim: i64,
    causal: bool,
    scale: f64,
) -> Tensor {
    let (b, l, _) = x.size3().expect("attention input must be (B, L, d)");
    let split = |t: Tensor| t.view([b, l, heads, head_dim]).transpose(1, 2); // (B, heads, L, dh)
    let (q, k, v) = (split(q.forward(x)), split(k.forward(x)), split(v.forward(x)));
    let out = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, causal, Some(scale), false); // (B, heads, L, dh)
    out.transpose(1, 2).contiguous().reshape([b, l, heads * head_dim]) // (B, L, heads·dh)
}

/// Fused attention with the default scale 1/√dh, as `F.scaled_dot_product_attention`.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, false, None, false)
}
