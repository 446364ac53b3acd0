//! # hifi-tuner
//!
//! A reference implementation of *HiFi Tuner: High-Fidelity Subject-Driven Fine-Tuning for
//! Diffusion Models* (arXiv 2312.00079) on libtorch (tch).
//!
//! Map from the paper to the code:
//!
//! | paper | module |
//! |---|---|
//! | Stable Diffusion v1.x text encoder, UNet, VAE | [`models`] |
//! | CLIP BPE tokenizer | [`tokenizer`] |
//! | DDIM step F^(t) (Eq. 1) and its inverse F^-1 (Eq. 3) | [`scheduler`] |
//! | attention hooks (DAAM maps §3.4, prompt-to-prompt) | [`attention`] |
//! | classifier-free guided sampling, one loop for all conditionings | [`pipeline`] |
//! | diffusers folder layout, typed configs, strict weight loading | [`load`] |
//! | images, PNG metadata, atomic writes | [`io`] |

pub mod attention;
pub mod eval;
pub mod guidance;
pub mod io;
pub mod load;
pub mod models;
pub mod pipeline;
pub mod progress;
pub mod rng;
pub mod scheduler;
pub mod subject;
pub mod tokenizer;

pub use anyhow::{Error, Result};
