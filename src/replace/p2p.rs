//! Prompt-to-prompt (Hertz et al. 2022) as an [`AttentionController`]: Algorithm 3's F̃.
//!
//! Source (c^r) and target (c^g, or [c^g, c_s^t]) run as one batch per step, as the P2P
//! authors do, so no attention map is kept across steps and memory does not grow with T. With
//! classifier-free guidance the UNet batch is `[φ*_t; φ*_t; c_src; c_tgt]`; only the
//! conditional half is edited, the unconditional one (φ*_t) is left alone.
//!
//! - **Cross-attention** (the first `cross_steps` steps): the target's probabilities are the
//!   source's, column by column through the token alignment ([`align_tokens`]), except the
//!   exception set — the target word's tokens w_g and the c_s^t positions — which keep their
//!   own. Rows are not renormalised (as in P2P).
//! - **Self-attention** (the first `self_steps` steps, P2P's `self_replace_steps`): the
//!   target's self-attention probabilities are replaced by the source's at the coarse sites
//!   only: at most 1/4 of the latent's cells as queries ([`SELF_MAX_QUERY_SHARE`]), i.e. 32×32
//!   and below for SD at 512², the rule of the authors' null-text inversion notebook
//!   (`null_text_w_ptp.ipynb`: `att_replace.shape[2] <= 32 ** 2`), which `replace` follows since
//!   it edits an NTI inversion. (Their text-to-image notebook `prompt-to-prompt_stable.ipynb`
//!   uses `≤ 16²`.) That injects the source's layout: with 0.4 the target keeps the
//!   photo's composition and pose more closely, at the cost of shape changes (a cat → a dog
//!   keeps the cat's outline); 0 (the paper's choice) lets the new subject take its own shape.

use crate::attention::{AttentionController, AttnKind, AttnSite};
use tch::{Device, Tensor};

/// Self-attention is replaced at sites with at most this share of the latent's cells as
/// queries: 1/4 (32² of SD-1.x's 64² latent at 512², `null_text_w_ptp.ipynb`'s `≤ 32²`).
pub const SELF_MAX_QUERY_SHARE: i64 = 4;

/// Alignment of the target prompt's token positions to the source's when one word of
/// `n_src` tokens starting at position `start` is replaced by one of `n_tgt` tokens.
///
/// Position j of the target takes the source's position:
/// - j (< start): the words before the swap;
/// - none for the new word's tokens (they keep their own attention);
/// - j − n_tgt + n_src after it: the words after the swap keep their alignment, and so does
///   the padding. Padding gets the same shift: the target's k-th padding slot takes the
///   source's k-th padding slot. When the target is shorter, its last n_src − n_tgt slots
///   have no source slot and keep their own attention; when it is longer, the source's last
///   n_tgt − n_src slots are unused.
pub fn align_tokens(len: usize, start: usize, n_src: usize, n_tgt: usize) -> Vec<Option<usize>> {
    (0..len)
        .map(|j| {
            if j < start {
                Some(j)
            } else if j < start + n_tgt {
                None
            } else {
                Some(j - n_tgt + n_src).filter(|&s| s < len)
            }
        })
        .collect()
}

/// The controller of one edit.
pub struct PromptToPrompt {
    /// (L,) int64: the source column each target column takes.
    gather: Tensor,
    /// (L,) bool: target columns that keep their own probabilities.
    keep_own: Tensor,
    /// Cross-attention is replaced at steps i < `cross_steps`.
    pub cross_steps: usize,
    /// Self-attention is replaced at steps i < `self_steps`.
    pub self_steps: usize,
    /// Self-attention is replaced only at sites with at most this many query cells.
    pub self_max_queries: i64,
    /// The current DDIM step (set by the sampling loop).
    pub step: usize,
    /// Calls that were edited (for tests and logs).
    pub edited: usize,
}

impl PromptToPrompt {
    /// `alignment` from [`align_tokens`]; `exceptions` are target positions that keep their
    /// own attention in any case (w_g, the c_s^t positions); `latent_cells` = h·w of the latent.
    pub fn new(
        alignment: &[Option<usize>],
        exceptions: &[usize],
        cross_steps: usize,
        self_steps: usize,
        latent_cells: i64,
        device: Device,
    ) -> Self {
        let gather: Vec<i64> = alignment.iter().enumerate().map(|(j, s)| s.unwrap_or(j) as i64).collect();
        let keep: Vec<bool> =
            alignment.iter().enumerate().map(|(j, s)| s.is_none() || exceptions.contains(&j)).collect();
        Self {
            gather: Tensor::from_slice(&gather).to_device(device),
            keep_own: Tensor::from_slice(&keep).to_device(device),
            cross_steps,
            self_steps,
            self_max_queries: latent_cells / SELF_MAX_QUERY_SHARE,
            step: 0,
            edited: 0,
        }
    }

    /// Target columns that keep their own probabilities.
    pub fn keeps_own(&self) -> Vec<bool> {
        Vec::<bool>::try_from(&self.keep_own.to_device(Device::Cpu)).expect("bool vector")
    }
}

impl AttentionController for PromptToPrompt {
    fn wants(&self, site: &AttnSite) -> bool {
        match site.kind {
            AttnKind::Cross => self.step < self.cross_steps,
            AttnKind::SelfAttn => self.step < self.self_steps && site.height * site.width <= self.self_max_queries,
        }
    }

    /// `probs` (4, heads, N, M): rows [u_src, u_tgt, c_src, c_tgt]; returns it with c_tgt edited.
    fn on_probs(&mut self, site: &AttnSite, probs: Tensor) -> Tensor {
        let b = probs.size()[0];
        assert_eq!(b, 4, "prompt-to-prompt expects the batch [φ; φ; c_src; c_tgt], got {b} rows");
        let src = probs.get(2); // (heads, N, M)
        let new_tgt = match site.kind {
            AttnKind::SelfAttn => src,
            AttnKind::Cross => {
                let mapped = src.index_select(-1, &self.gather); // (heads, N, L)
                probs.get(3).where_self(&self.keep_own, &mapped)
            }
        };
        self.edited += 1;
        Tensor::cat(&[probs.narrow(0, 0, 3), new_tgt.unsqueeze(0).to_kind(probs.kind())], 0)
    }
}
