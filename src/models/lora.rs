//! Low-rank adapters on a linear layer, as peft's `lora.Linear`: y = W·x + b + (α/r)·B·(A·x),
//! A (r, in) "down", B (out, r) "up". Used on the attention projections that diffusers'
//! `train_dreambooth_lora.py` targets (the UNet's `to_q`, `to_k`, `to_v`, `to_out.0`; the text
//! encoder's `q_proj`, `k_proj`, `v_proj`, `out_proj`) while adapters are trained (`learn --mode
//! lora`). Inference with a finished LoRA file merges it into W instead ([`crate::lora`]).

use tch::{nn, nn::Module, Tensor};

/// One adapter: A (r, in), B (out, r) and the scale α/r.
#[derive(Debug)]
pub struct Adapter {
    /// A, `lora_A` / `lora_down`: (r, in).
    pub down: Tensor,
    /// B, `lora_B` / `lora_up`: (out, r).
    pub up: Tensor,
    /// α / r.
    pub scale: f64,
}

/// A linear layer that may carry an [`Adapter`]; without one it is exactly `nn::Linear`.
#[derive(Debug)]
pub struct LoraLinear {
    pub base: nn::Linear,
    /// The module path as the upstream library names it (`…attn2.to_q`,
    /// `text_model.encoder.layers.0.self_attn.q_proj`).
    pub name: String,
    pub adapter: Option<Adapter>,
}

impl LoraLinear {
    pub fn new(vs: nn::Path, in_dim: i64, out_dim: i64, c: nn::LinearConfig) -> Self {
        let name = vs.components().collect::<Vec<_>>().join(".");
        Self { base: nn::linear(vs, in_dim, out_dim, c), name, adapter: None }
    }

    /// (out, in)
    pub fn weight_shape(&self) -> (i64, i64) {
        let s = self.base.ws.size();
        (s[0], s[1])
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.base.forward(x);
        match &self.adapter {
            None => y,
            // peft: `result + lora_B(lora_A(x.to(A.dtype))) * scaling`, then back to the base
            // layer's dtype (fp32 adapters on half-precision weights).
            // (ordered for few, small ops: the scale multiplies the r-wide (…, r) activation;
            // kinds are converted only when they differ)
            Some(a) => {
                let h = if x.kind() == a.down.kind() {
                    x.matmul(&a.down.tr())
                } else {
                    x.to_kind(a.down.kind()).matmul(&a.down.tr())
                };
                let h = if a.scale == 1.0 { h } else { h * a.scale };
                let h = h.matmul(&a.up.tr());
                if y.kind() == h.kind() {
                    y + h
                } else {
                    (y.to_kind(h.kind()) + h).to_kind(y.kind())
                }
            }
        }
    }
}
