//! Evaluation: DINO image embeddings (reference choice in Algorithm 2) and DreamBooth's metrics
//! (DINO, CLIP-I, CLIP-T) on top of them and CLIP.

pub mod dino;
pub mod metrics;
