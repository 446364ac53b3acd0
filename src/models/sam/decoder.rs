//! SAM's mask decoder (`SamMaskDecoder`): a two-way transformer between the prompt tokens
//! ([IoU token, mask tokens, sparse prompt embeddings]) and the image embeddings, a transposed-
//! convolution upscaler (×4), one hypernetwork MLP per mask token, and the IoU prediction head.
//! One image and one prompt set: every tensor has batch 1.

use super::{layer_norm_cf, Act, SamMaskDecoderConfig};
use tch::{nn, nn::Module, Tensor};

/// `SamAttention`: projections to hidden/downsample, multi-head attention, projection back.
#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    heads: i64,
    scale: f64,
}

impl Attention {
    fn new(vs: nn::Path, c: i64, downsample: i64, heads: i64) -> Self {
        let inner = c / downsample;
        Self {
            q_proj: nn::linear(&vs / "q_proj", c, inner, Default::default()),
            k_proj: nn::linear(&vs / "k_proj", c, inner, Default::default()),
            v_proj: nn::linear(&vs / "v_proj", c, inner, Default::default()),
            out_proj: nn::linear(&vs / "out_proj", inner, c, Default::default()),
            heads,
            scale: ((inner / heads) as f64).powf(-0.5),
        }
    }

    /// (N, Lq, C), (N, Lk, C), (N, Lk, C) → (N, Lq, C).
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let split = |x: Tensor| {
            let (n, l, c) = x.size3().expect("(N, L, C)");
            x.reshape([n, l, self.heads, c / self.heads]).transpose(1, 2) // (N, heads, L, c/heads)
        };
        let (q, k, v) = (split(self.q_proj.forward(q)), split(self.k_proj.forward(k)), split(self.v_proj.forward(v)));
        let p = (q.matmul(&k.transpose(2, 3)) * self.scale).softmax(-1, tch::Kind::Float); // (N, heads, Lq, Lk)
        let o = p.matmul(&v).transpose(1, 2); // (N, Lq, heads, c/heads)
        let (n, l) = (o.size()[0], o.size()[1]);
        self.out_proj.forward(&o.reshape([n, l, -1]))
    }
}

/// `SamTwoWayAttentionBlock`.
#[derive(Debug)]
struct TwoWayBlock {
    self_attn: Attention,
    layer_norm1: nn::LayerNorm,
    cross_attn_token_to_image: Attention,
    layer_norm2: nn::LayerNorm,
    lin1: nn::Linear,
    lin2: nn::Linear,
    act: Act,
    layer_norm3: nn::LayerNorm,
    layer_norm4: nn::LayerNorm,
    cross_attn_image_to_token: Attention,
    skip_first_layer_pe: bool,
}

impl TwoWayBlock {
    /// queries (1, T, C), keys (1, HW, C) → updated (queries, keys).
    fn forward(&self, queries: &Tensor, keys: &Tensor, qpe: &Tensor, kpe: &Tensor) -> (Tensor, Tensor) {
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)
        } else {
            let q = queries + qpe;
            queries + self.self_attn.forward(&q, &q, queries)
        };
        let queries = self.layer_norm1.forward(&queries);
        let (q, k) = (&queries + qpe, keys + kpe);
        let queries = self.layer_norm2.forward(&(&queries + self.cross_attn_token_to_image.forward(&q, &k, keys)));
        let mlp = self.lin2.forward(&self.act.apply(&self.lin1.forward(&queries)));
        let queries = self.layer_norm3.forward(&(queries + mlp));
        let (q, k) = (&queries + qpe, keys + kpe);
        let keys = self.layer_norm4.forward(&(keys + self.cross_attn_image_to_token.forward(&k, &q, &queries)));
        (queries, keys)
    }
}

/// `SamFeedForward`: proj_in, ReLU, (layers, ReLU)…, proj_out.
#[derive(Debug)]
struct FeedForward {
    proj_in: nn::Linear,
    layers: Vec<nn::Linear>,
    proj_out: nn::Linear,
}

impl FeedForward {
    fn new(vs: nn::Path, input: i64, hidden: i64, output: i64, num_layers: i64) -> Self {
        Self {
            proj_in: nn::linear(&vs / "proj_in", input, hidden, Default::default()),
            layers: (0..num_layers - 2)
                .map(|i| nn::linear(&vs / "layers" / i, hidden, hidden, Default::default()))
                .collect(),
            proj_out: nn::linear(&vs / "proj_out", hidden, output, Default::default()),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.proj_in.forward(x).relu();
        for l in &self.layers {
            h = l.forward(&h).relu();
        }
        self.proj_out.forward(&h)
    }
}

/// `SamMaskDecoder`.
#[derive(Debug)]
pub struct MaskDecoder {
    /// (1, C)
    iou_token: Tensor,
    /// (K + 1, C)
    mask_tokens: Tensor,
    layers: Vec<TwoWayBlock>,
    final_attn_token_to_image: Attention,
    layer_norm_final_attn: nn::LayerNorm,
    upscale_conv1: nn::ConvTranspose2D,
    upscale_layer_norm: nn::LayerNorm,
    upscale_conv2: nn::ConvTranspose2D,
    hypernetworks: Vec<FeedForward>,
    iou_head: FeedForward,
    pub num_multimask_outputs: i64,
}

impl MaskDecoder {
    /// `vs` is `mask_decoder`.
    pub fn new(vs: nn::Path, cfg: &SamMaskDecoderConfig, act: Act) -> Self {
        let c = cfg.hidden_size;
        let k = cfg.num_multimask_outputs + 1;
        let init = nn::Init::Randn { mean: 0.0, stdev: 1.0 };
        let ln = nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() };
        let t = &vs / "transformer";
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = &t / "layers" / i;
                let (h, r) = (cfg.num_attention_heads, cfg.attention_downsample_rate);
                TwoWayBlock {
                    self_attn: Attention::new(&l / "self_attn", c, 1, h),
                    layer_norm1: nn::layer_norm(&l / "layer_norm1", vec![c], ln),
                    cross_attn_token_to_image: Attention::new(&l / "cross_attn_token_to_image", c, r, h),
                    layer_norm2: nn::layer_norm(&l / "layer_norm2", vec![c], ln),
                    lin1: nn::linear(&l / "mlp" / "lin1", c, cfg.mlp_dim, Default::default()),
                    lin2: nn::linear(&l / "mlp" / "lin2", cfg.mlp_dim, c, Default::default()),
                    act,
                    layer_norm3: nn::layer_norm(&l / "layer_norm3", vec![c], ln),
                    layer_norm4: nn::layer_norm(&l / "layer_norm4", vec![c], ln),
                    cross_attn_image_to_token: Attention::new(&l / "cross_attn_image_to_token", c, r, h),
                    skip_first_layer_pe: i == 0,
                }
            })
            .collect();
        let up = nn::ConvTransposeConfig { stride: 2, ..Default::default() };
        Self {
            iou_token: (&vs / "iou_token").var("weight", &[1, c], init),
            mask_tokens: (&vs / "mask_tokens").var("weight", &[k, c], init),
            layers,
            final_attn_token_to_image: Attention::new(
                &t / "final_attn_token_to_image",
                c,
                cfg.attention_downsample_rate,
                cfg.num_attention_heads,
            ),
            // nn.LayerNorm's default eps (1e-5): transformers does not pass the config's here.
            layer_norm_final_attn: nn::layer_norm(&t / "layer_norm_final_attn", vec![c], Default::default()),
            upscale_conv1: nn::conv_transpose2d(&vs / "upscale_conv1", c, c / 4, 2, up),
            // SamLayerNorm's default eps 1e-6.
            upscale_layer_norm: nn::layer_norm(
                &vs / "upscale_layer_norm",
                vec![c / 4],
                nn::LayerNormConfig { eps: 1e-6, ..Default::default() },
            ),
            upscale_conv2: nn::conv_transpose2d(&vs / "upscale_conv2", c / 4, c / 8, 2, up),
            hypernetworks: (0..k)
                .map(|i| FeedForward::new(&vs / "output_hypernetworks_mlps" / i, c, c, c / 8, 3))
                .collect(),
            iou_head: FeedForward::new(&vs / "iou_prediction_head", c, cfg.iou_head_hidden_dim, k, cfg.iou_head_depth),
            num_multimask_outputs: cfg.num_multimask_outputs,
        }
    }

    /// image embeddings (1, C, g, g), image-wide PE (1, C, g, g), sparse (1, 1, n, C), dense
    /// (1, C, g, g) → (mask logits (1, 1, K, 4g, 4g), IoUs (1, 1, K)). As transformers'
    /// `SamMaskDecoder`: with `multimask` the K = `num_multimask_outputs` outputs of mask tokens
    /// 1…K, without it the single output of mask token 0 (K = 1).
    pub fn forward(
        &self,
        image: &Tensor,
        pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
        multimask: bool,
    ) -> (Tensor, Tensor) {
        let (_, c, g, _) = image.size4().expect("(1, C, g, g)");
        let k = self.mask_tokens.size()[0];
        let tokens = Tensor::cat(&[&self.iou_token, &self.mask_tokens, &sparse.view([-1, c])], 0).unsqueeze(0); // (1, 1+k+n, C)
        let keys = (image + dense).flatten(2, -1).transpose(1, 2); // (1, g², C)
        let kpe = pe.flatten(2, -1).transpose(1, 2); // (1, g², C)
        let (mut q, mut kk) = (tokens.shallow_clone(), keys);
        for l in &self.layers {
            (q, kk) = l.forward(&q, &kk, &tokens, &kpe);
        }
        let attn = self.final_attn_token_to_image.forward(&(&q + &tokens), &(&kk + &kpe), &kk);
        let q = self.layer_norm_final_attn.forward(&(q + attn));
        let iou_out = q.select(1, 0); // (1, C)
        let img = kk.transpose(1, 2).reshape([1, c, g, g]);
        let up = layer_norm_cf(&self.upscale_layer_norm, &self.upscale_conv1.forward(&img)).gelu("none");
        let up = self.upscale_conv2.forward(&up).gelu("none"); // (1, C/8, 4g, 4g)
        let hyper = Tensor::stack(
            &self
                .hypernetworks
                .iter()
                .enumerate()
                .map(|(i, m)| m.forward(&q.select(1, 1 + i as i64)))
                .collect::<Vec<_>>(),
            1,
        ); // (1, k, C/8)
        let (s, ch) = (up.size()[2], up.size()[1]);
        let masks = hyper.matmul(&up.reshape([1, ch, s * s])).reshape([1, 1, k, s, s]);
        let iou = self.iou_head.forward(&iou_out).reshape([1, 1, k]);
        let (start, len) = if multimask { (1, k - 1) } else { (0, 1) };
        (masks.narrow(2, start, len), iou.narrow(2, start, len))
    }
}
