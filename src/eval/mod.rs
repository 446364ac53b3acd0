//! Evaluation: DINO image embeddings (reference choice in Algorithm 2; the DINO metric later).

pub mod dino;
