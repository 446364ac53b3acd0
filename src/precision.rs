//! Compute precision (`--dtype auto|fp32|fp16|bf16`) and the mixed-precision rules.
//!
//! - The networks' weights and activations run in the chosen kind; every network casts its
//!   inputs to its own kind and returns float32, so what the algorithms hold — latents,
//!   scheduler arithmetic, the trainable c_s, c_s^t, φ_h, φ_t and their Adam state, losses —
//!   stays float32, and gradients flow through the casts.
//! - The VAE runs in float32 when the kind is fp16 and its config says `force_upcast` (SD's
//!   VAE overflows in fp16; diffusers upcasts it for the same reason). bf16 has float32's range,
//!   so the VAE runs in bf16 then, as in diffusers.
//! - Softmax is taken in float32 at hooked attention sites (the probabilities a controller sees).
//! - `auto` is fp16 on CUDA and fp32 on the CPU. fp16 on the CPU is refused: libtorch's CPU
//!   kernels lack or emulate many half-precision ops, so it would be slow and is not what a user
//!   wants there; bf16 runs on the CPU.

use anyhow::{bail, Result};
use tch::{Device, Kind};

/// The kind `--dtype` names on `device`.
pub fn resolve(dtype: &str, device: Device) -> Result<Kind> {
    let kind = match dtype {
        "auto" => {
            if device.is_cuda() {
                Kind::Half
            } else {
                Kind::Float
            }
        }
        "fp32" | "float32" => Kind::Float,
        "fp16" | "float16" => Kind::Half,
        "bf16" | "bfloat16" => Kind::BFloat16,
        other => bail!("--dtype must be auto, fp32, fp16 or bf16, got {other:?}"),
    };
    if kind == Kind::Half && !device.is_cuda() {
        bail!("--dtype fp16 needs a CUDA device: libtorch's CPU kernels do not run SD in fp16 usefully; use bf16 or fp32 on the CPU");
    }
    Ok(kind)
}

/// The VAE's kind for a compute kind: float32 instead of fp16 when the config asks for it.
pub fn vae_kind(compute: Kind, force_upcast: bool) -> Kind {
    if compute == Kind::Half && force_upcast {
        Kind::Float
    } else {
        compute
    }
}

/// A short name for logs and metadata.
pub fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "fp32",
        Kind::Half => "fp16",
        Kind::BFloat16 => "bf16",
        Kind::Double => "fp64",
        _ => "other",
    }
}
