//! Typed attention hooks.
//!
//! The UNet hands every attention call to an optional `&mut dyn AttentionController`, together
//! with an [`AttnSite`] that says where the call is. A controller that does not
//! [`want`](AttentionController::wants) a site costs nothing: that call takes the fused
//! `scaled_dot_product_attention` path and the output is bit-identical to running with no
//! controller. For a wanted site the probabilities softmax(QKᵀ/√d) are materialised, handed to
//! [`on_probs`](AttentionController::on_probs), and what it returns is multiplied with V.
//! Paper uses: DAAM-style subject maps (§3.4, reference guidance), prompt-to-prompt attention
//! replacement (Algorithm 3).

use tch::Tensor;

/// Which part of the UNet an attention call is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    Down,
    Mid,
    Up,
}

/// Self-attention (keys from the image) or cross-attention (keys from the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttnKind {
    SelfAttn,
    Cross,
}

/// Where an attention call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttnSite {
    pub place: Place,
    /// Index of the block in `down_blocks` / `up_blocks` (0 for mid).
    pub block: usize,
    /// Index of the `Transformer2DModel` within the block (`attentions.{i}`).
    pub attention: usize,
    /// Index of the `BasicTransformerBlock` within it (`transformer_blocks.{j}`).
    pub layer: usize,
    pub kind: AttnKind,
    /// Spatial size of the queries (latent resolution at this level).
    pub height: i64,
    pub width: i64,
}

/// Receives the attention calls of one UNet forward.
pub trait AttentionController {
    /// Whether this site's probabilities should be materialised and passed to `on_probs`.
    fn wants(&self, site: &AttnSite) -> bool;
    /// Called with the probabilities (B, heads, HW, N_keys) of a wanted site; returns the
    /// probabilities to use (return `probs` unchanged to only observe).
    fn on_probs(&mut self, site: &AttnSite, probs: Tensor) -> Tensor;
}

/// A controller that asks for nothing: the UNet output is bit-identical to having none.
#[derive(Debug, Default)]
pub struct NoOp;

impl AttentionController for NoOp {
    fn wants(&self, _site: &AttnSite) -> bool {
        false
    }
    fn on_probs(&mut self, _site: &AttnSite, probs: Tensor) -> Tensor {
        probs
    }
}

/// Reborrows an optional controller for one call, so the same controller can be handed to
/// successive calls (`Option::as_deref_mut` would keep it borrowed for its whole lifetime).
pub fn reborrow<'s>(ctrl: &'s mut Option<&mut dyn AttentionController>) -> Option<&'s mut dyn AttentionController> {
    match ctrl {
        Some(c) => Some(&mut **c),
        None => None,
    }
}

/// Several controllers on the same calls, in order: a site is materialised when any of them
/// wants it, and each one that wants it sees what the previous one returned (put observers
/// before editors to record the unedited maps).
pub struct Chain<'a>(pub Vec<&'a mut dyn AttentionController>);

impl AttentionController for Chain<'_> {
    fn wants(&self, site: &AttnSite) -> bool {
        self.0.iter().any(|c| c.wants(site))
    }
    fn on_probs(&mut self, site: &AttnSite, probs: Tensor) -> Tensor {
        let mut p = probs;
        for c in self.0.iter_mut() {
            if c.wants(site) {
                p = c.on_probs(site, p);
            }
        }
        p
    }
}
