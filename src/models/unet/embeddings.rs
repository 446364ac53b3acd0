//! The timestep embedding: diffusers' sinusoidal `Timesteps` and the `TimestepEmbedding` MLP.

use tch::{nn, nn::Module, Kind, Tensor};

/// diffusers' `get_timestep_embedding` (scale 1, max_period 10000): for `half = dim / 2`,
/// `freq_k = exp(-ln(10000)·k / (half - shift))` and the embedding is `[sin(t·f), cos(t·f)]`,
/// or `[cos, sin]` with `flip_sin_to_cos`; an odd `dim` is zero-padded. `timesteps`: (B,) of
/// any numeric kind; returns (B, dim) fp32.
pub fn timestep_embedding(timesteps: &Tensor, dim: i64, flip_sin_to_cos: bool, shift: f64) -> Tensor {
    let half = dim / 2;
    let exponent = Tensor::arange(half, (Kind::Float, timesteps.device())) * -(10000f64.ln());
    let freqs = (exponent / (half as f64 - shift)).exp(); // (half,)
    let args = timesteps.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0); // (B, half)
    let (first, second) = if flip_sin_to_cos { (args.cos(), args.sin()) } else { (args.sin(), args.cos()) };
    let emb = Tensor::cat(&[first, second], -1); // (B, 2·half)
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// `time_embedding`: `linear_2(silu(linear_1(t_emb)))`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    pub linear_1: nn::Linear,
    pub linear_2: nn::Linear,
}

impl TimestepEmbedding {
    pub fn new(vs: nn::Path, in_dim: i64, embed_dim: i64) -> Self {
        Self {
            linear_1: nn::linear(&vs / "linear_1", in_dim, embed_dim, Default::default()),
            linear_2: nn::linear(&vs / "linear_2", embed_dim, embed_dim, Default::default()),
        }
    }

    /// (B, in_dim) -> (B, embed_dim)
    pub fn forward(&self, t_emb: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(t_emb).silu())
    }
}
