//! The Stable Diffusion v1.x networks, each configured from its diffusers `config.json` and
//! named exactly as diffusers / transformers name their parameters.

pub mod attention;
pub mod blip;
pub mod clip;
pub mod clip_text;
pub mod lora;
pub mod sam;
pub mod unet;
pub mod vae;
pub mod vit;
