//! SAM's image encoder (`SamVisionEncoder`): patch embedding, absolute positions, ViT layers with
//! windowed attention (global in the layers `global_attn_indexes`), each with decomposed relative
//! positions (MViTv2), and the neck (1×1 conv, LN, 3×3 conv, LN) to `output_channels`.

use super::{layer_norm_cf, Act, SamVisionConfig};
use anyhow::{bail, Result};
use tch::{nn, nn::Module, Kind, Tensor};

/// `SamVisionAttention`: multi-head self-attention over an (B, H, W, C) grid.
#[derive(Debug)]
struct VisionAttention {
    qkv: nn::Linear,
    proj: nn::Linear,
    /// (2S − 1, head_dim) each, S the side this layer attends over (window or whole grid).
    rel_pos: Option<(Tensor, Tensor)>,
    heads: i64,
    scale: f64,
}

/// Rows of a (2S − 1, c) relative table for query i, key j at i − j + S − 1: (S, S, c). The
/// table is used at its stored size (q_size = k_size = S: transformers' linear resize is then
/// the identity).
fn rel_table(table: &Tensor, s: i64) -> Tensor {
    let q = Tensor::arange(s, (Kind::Int64, table.device())).unsqueeze(1);
    let k = Tensor::arange(s, (Kind::Int64, table.device())).unsqueeze(0);
    table.index_select(0, &(q - k + (s - 1)).view([-1])).view([s, s, -1])
}

impl VisionAttention {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, h, w, c) = x.size4().expect("(B, H, W, C)");
        let hd = c / self.heads;
        let qkv = self.qkv.forward(x).reshape([b, h * w, 3, self.heads, hd]).permute([2, 0, 3, 1, 4]); // (3, B, heads, HW, hd)
        let qkv = qkv.reshape([3, b * self.heads, h * w, hd]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2)); // (B·heads, HW, hd)
        let mut attn = (&q * self.scale).matmul(&k.transpose(-2, -1)); // (B·heads, HW, HW)
        if let Some((rh, rw)) = &self.rel_pos {
            let (rh, rw) = (rel_table(rh, h), rel_table(rw, w)); // (h, h, hd), (w, w, hd)
            let rq = q.reshape([b * self.heads, h, w, hd]);
            let rel_h = Tensor::einsum("bhwc,hkc->bhwk", &[&rq, &rh], None::<i64>); // (B·heads, h, w, h)
            let rel_w = Tensor::einsum("bhwc,wkc->bhwk", &[&rq, &rw], None::<i64>); // (B·heads, h, w, w)
            let bias = rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2); // (B·heads, h, w, h, w)
            attn += bias.reshape([b * self.heads, h * w, h * w]);
        }
        let out = attn.softmax(-1, Kind::Float).matmul(&v); // (B·heads, HW, hd)
        let out = out.reshape([b, self.heads, h, w, hd]).permute([0, 2, 3, 1, 4]).reshape([b, h, w, c]);
        self.proj.forward(&out)
    }
}

/// `SamVisionLayer`: pre-norm (windowed) attention and MLP, each with a residual.
#[derive(Debug)]
struct VisionLayer {
    layer_norm1: nn::LayerNorm,
    attn: VisionAttention,
    layer_norm2: nn::LayerNorm,
    lin1: nn::Linear,
    lin2: nn::Linear,
    act: Act,
    /// 0 = global attention.
    window: i64,
}

impl VisionLayer {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.layer_norm1.forward(x);
        let a = if self.window > 0 {
            let (b, hh, ww, c) = h.size4().expect("(B, H, W, C)");
            let s = self.window;
            let (ph, pw) = ((s - hh % s) % s, (s - ww % s) % s);
            let p = h.constant_pad_nd([0, 0, 0, pw, 0, ph]); // (B, Hp, Wp, C), zeros at the bottom/right
            let (hp, wp) = (hh + ph, ww + pw);
            let win = p.reshape([b, hp / s, s, wp / s, s, c]).permute([0, 1, 3, 2, 4, 5]).reshape([-1, s, s, c]); // (B·nW, s, s, C)
            let o = self.attn.forward(&win);
            let o = o.reshape([b, hp / s, wp / s, s, s, c]).permute([0, 1, 3, 2, 4, 5]).reshape([b, hp, wp, c]);
            o.narrow(1, 0, hh).narrow(2, 0, ww) // (B, H, W, C)
        } else {
            self.attn.forward(&h)
        };
        let x = x + a;
        let m = self.lin2.forward(&self.act.apply(&self.lin1.forward(&self.layer_norm2.forward(&x))));
        x + m
    }
}

/// `SamVisionEncoder`.
#[derive(Debug)]
pub struct VisionEncoder {
    projection: nn::Conv2D,
    /// (1, g, g, C)
    pos_embed: Option<Tensor>,
    layers: Vec<VisionLayer>,
    neck_conv1: nn::Conv2D,
    neck_ln1: nn::LayerNorm,
    neck_conv2: nn::Conv2D,
    neck_ln2: nn::LayerNorm,
    image_size: i64,
    channels: i64,
}

impl VisionEncoder {
    /// `vs` is `vision_encoder`.
    pub fn new(vs: nn::Path, cfg: &SamVisionConfig, act: Act) -> Self {
        let d = cfg.hidden_size;
        let g = cfg.grid();
        let hd = d / cfg.num_attention_heads;
        let projection = nn::conv2d(
            &vs / "patch_embed" / "projection",
            cfg.num_channels,
            d,
            cfg.patch_size,
            nn::ConvConfig { stride: cfg.patch_size, ..Default::default() },
        );
        let pos_embed = cfg.use_abs_pos.then(|| vs.var("pos_embed", &[1, g, g, d], nn::Init::Const(0.0)));
        let ln = nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = &vs / "layers" / i;
                let window = if cfg.global_attn_indexes.contains(&i) { 0 } else { cfg.window_size };
                let side = if window == 0 { g } else { window };
                let a = &l / "attn";
                let qkv_cfg = nn::LinearConfig { bias: cfg.qkv_bias, ..Default::default() };
                VisionLayer {
                    layer_norm1: nn::layer_norm(&l / "layer_norm1", vec![d], ln),
                    attn: VisionAttention {
                        qkv: nn::linear(&a / "qkv", d, 3 * d, qkv_cfg),
                        proj: nn::linear(&a / "proj", d, d, Default::default()),
                        rel_pos: cfg.use_rel_pos.then(|| {
                            (
                                a.var("rel_pos_h", &[2 * side - 1, hd], nn::Init::Const(0.0)),
                                a.var("rel_pos_w", &[2 * side - 1, hd], nn::Init::Const(0.0)),
                            )
                        }),
                        heads: cfg.num_attention_heads,
                        scale: (hd as f64).powf(-0.5),
                    },
                    layer_norm2: nn::layer_norm(&l / "layer_norm2", vec![d], ln),
                    lin1: nn::linear(&l / "mlp" / "lin1", d, cfg.mlp_dim(), Default::default()),
                    lin2: nn::linear(&l / "mlp" / "lin2", cfg.mlp_dim(), d, Default::default()),
                    act,
                    window,
                }
            })
            .collect();
        let n = &vs / "neck";
        let oc = cfg.output_channels;
        let no_bias = |pad: i64| nn::ConvConfig { bias: false, padding: pad, ..Default::default() };
        // SamLayerNorm's default eps (1e-6), not the config's.
        let nln = nn::LayerNormConfig { eps: 1e-6, ..Default::default() };
        Self {
            projection,
            pos_embed,
            layers,
            neck_conv1: nn::conv2d(&n / "conv1", d, oc, 1, no_bias(0)),
            neck_ln1: nn::layer_norm(&n / "layer_norm1", vec![oc], nln),
            neck_conv2: nn::conv2d(&n / "conv2", oc, oc, 3, no_bias(1)),
            neck_ln2: nn::layer_norm(&n / "layer_norm2", vec![oc], nln),
            image_size: cfg.image_size,
            channels: cfg.num_channels,
        }
    }

    /// Pixel values (B, C, S, S) → image embeddings (B, output_channels, g, g).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let size = pixel_values.size();
        if size.len() != 4 || size[1] != self.channels || size[2] != self.image_size || size[3] != self.image_size {
            bail!("SAM pixel values must be (B, {}, {s}, {s}), got {size:?}", self.channels, s = self.image_size);
        }
        let mut h = self.projection.forward(pixel_values).permute([0, 2, 3, 1]); // (B, g, g, d)
        if let Some(p) = &self.pos_embed {
            h += p;
        }
        for l in &self.layers {
            h = l.forward(&h);
        }
        let h = self.neck_conv1.forward(&h.permute([0, 3, 1, 2])); // (B, oc, g, g)
        let h = layer_norm_cf(&self.neck_ln1, &h);
        Ok(layer_norm_cf(&self.neck_ln2, &self.neck_conv2.forward(&h)))
    }
}
