//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D` as the SD UNet uses them.

use tch::{nn, nn::Module, Tensor};

/// A 3×3 (or k×k) convolution with "same" padding and stride 1.
pub fn conv_same(vs: nn::Path, c_in: i64, c_out: i64, k: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig { padding: (k - 1) / 2, ..Default::default() };
    nn::conv2d(vs, c_in, c_out, k, cfg)
}

/// GroupNorm with affine parameters, as `torch.nn.GroupNorm`.
pub fn group_norm(vs: nn::Path, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    nn::group_norm(vs, groups, channels, nn::GroupNormConfig { eps, ..Default::default() })
}

/// `ResnetBlock2D` with `time_embedding_norm="default"`, SiLU and pre-norm.
#[derive(Debug)]
pub struct ResnetBlock2D {
    pub norm1: nn::GroupNorm,
    pub conv1: nn::Conv2D,
    pub time_emb_proj: nn::Linear,
    pub norm2: nn::GroupNorm,
    pub conv2: nn::Conv2D,
    /// 1×1 projection of the input when the channel count changes.
    pub conv_shortcut: Option<nn::Conv2D>,
    pub output_scale_factor: f64,
}

/// Shapes and norms of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetSpec {
    pub c_in: i64,
    pub c_out: i64,
    pub temb: i64,
    pub groups: i64,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vs: nn::Path, s: ResnetSpec) -> Self {
        let conv_shortcut =
            (s.c_in != s.c_out).then(|| nn::conv2d(&vs / "conv_shortcut", s.c_in, s.c_out, 1, Default::default()));
        Self {
            norm1: group_norm(&vs / "norm1", s.groups, s.c_in, s.eps),
            conv1: conv_same(&vs / "conv1", s.c_in, s.c_out, 3),
            time_emb_proj: nn::linear(&vs / "time_emb_proj", s.temb, s.c_out, Default::default()),
            norm2: group_norm(&vs / "norm2", s.groups, s.c_out, s.eps),
            conv2: conv_same(&vs / "conv2", s.c_out, s.c_out, 3),
            conv_shortcut,
            output_scale_factor: s.output_scale_factor,
        }
    }

    /// `x`: (B, c_in, h, w), `temb`: (B, temb) -> (B, c_out, h, w).
    /// Dropout sits between `norm2` and `conv2` in diffusers; this is the eval-mode forward.
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let t = self.time_emb_proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1); // (B, c_out, 1, 1)
        let h = self.conv2.forward(&self.norm2.forward(&(h + t)).silu());
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x.shallow_clone(),
        };
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `Downsample2D` with a strided 3×3 convolution (`downsamplers.0.conv`).
#[derive(Debug)]
pub struct Downsample2D {
    pub conv: nn::Conv2D,
    /// diffusers' `downsample_padding`; 0 means an asymmetric (0, 1, 0, 1) zero pad first.
    pub padding: i64,
}

impl Downsample2D {
    pub fn new(vs: nn::Path, channels: i64, padding: i64) -> Self {
        let cfg = nn::ConvConfig { stride: 2, padding, ..Default::default() };
        Self { conv: nn::conv2d(&vs / "conv", channels, channels, 3, cfg), padding }
    }

    /// (B, C, h, w) -> (B, C, ⌈h/2⌉, ⌈w/2⌉) for the usual padding 1.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.padding == 0 {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D`: nearest-neighbour upsampling, then a 3×3 convolution (`upsamplers.0.conv`).
#[derive(Debug)]
pub struct Upsample2D {
    pub conv: nn::Conv2D,
}

impl Upsample2D {
    pub fn new(vs: nn::Path, channels: i64) -> Self {
        Self { conv: conv_same(&vs / "conv", channels, channels, 3) }
    }

    /// (B, C, h, w) -> (B, C, 2h, 2w), or (B, C, size) when diffusers forwards an
    /// `upsample_size` (latents not divisible by the UNet's overall factor).
    pub fn forward(&self, x: &Tensor, size: Option<[i64; 2]>) -> Tensor {
        let up = match size {
            // F.interpolate(x, size=size, mode="nearest")
            Some(s) => x.upsample_nearest2d(s, None, None),
            // F.interpolate(x, scale_factor=2.0, mode="nearest")
            None => {
                let (_, _, h, w) = x.size4().expect("upsample input must be (B, C, h, w)");
                x.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0)
            }
        };
        self.conv.forward(&up)
    }
}
