//! The subject's region from the UNet's own cross-attention (DAAM-style; paper §3.4 uses the
//! same correlation): a controller that sums the cross-attention probabilities of the subject
//! tokens over layers, heads and steps, each map brought to latent size.
//!
//! Rule for the mask M_g: the aggregated map is min–max normalised to [0, 1] and thresholded at
//! [`THRESHOLD`] (0.4, DAAM's τ). Min–max rather than DAAM's divide-by-max, because the heat
//! never reaches zero (softmax rows are positive everywhere): divided by its maximum, a flat
//! map would pass τ everywhere and select the whole image.

use crate::attention::{AttentionController, AttnKind, AttnSite};
use crate::pipeline::StableDiffusion;
use tch::{Kind, Tensor};

/// τ: a latent cell belongs to the subject when its normalised heat is at least this.
pub const THRESHOLD: f64 = 0.4;

/// Smallest share of the image a usable M_g covers. Below 1 % (under 41 cells of a 64×64
/// latent) Algorithm 4 would blow a speck up into a scale it cannot trust.
pub const MIN_AREA: f64 = 0.01;
/// Largest share of the image a usable M_g covers. Above 70 % the "subject" is mostly frame, and
/// Algorithm 4 would scale the reference to fill the frame.
pub const MAX_AREA: f64 = 0.70;

/// Positions of a word's tokens in a prompt's padded ids (every occurrence).
pub fn word_positions(sd: &StableDiffusion, prompt: &str, word: &str) -> Vec<i64> {
    let ids = sd.tokenizer.encode_padded(prompt).ids;
    let w = sd.tokenizer.encode(word);
    let w = &w[1..w.len().saturating_sub(1)];
    let mut out = vec![];
    if !w.is_empty() {
        for s in 0..ids.len().saturating_sub(w.len()) {
            if &ids[s..s + w.len()] == w {
                out.extend((s..s + w.len()).map(|p| p as i64));
            }
        }
    }
    out
}

/// Token positions of the subject in a prompt's conditioning: the c_s^t rows (the last n) and
/// the class noun's tokens in the prompt.
pub fn subject_tokens(sd: &StableDiffusion, prompt: &str, class_noun: &str, n: i64) -> Vec<i64> {
    let l = sd.tokenizer.encode_padded(prompt).ids.len() as i64;
    let mut out: Vec<i64> = (l - n..l).collect();
    out.extend(word_positions(sd, prompt, class_noun));
    out
}

/// Why a 0/1 mask cannot guide: `"empty"`, `"the whole image"`, or its area outside
/// [`MIN_AREA`] … [`MAX_AREA`] of the image; `None` when it can.
pub fn degenerate(mask: &Tensor) -> Option<String> {
    let fraction = mask.sum(Kind::Double).double_value(&[]) / mask.numel().max(1) as f64; // exact for 0/1 cells
    if fraction == 0.0 {
        Some("empty".into())
    } else if fraction == 1.0 {
        Some("the whole image".into())
    } else if !(MIN_AREA..=MAX_AREA).contains(&fraction) {
        Some(format!(
            "{:.1} % of the image, outside the usable {:.0} %–{:.0} %",
            100.0 * fraction,
            100.0 * MIN_AREA,
            100.0 * MAX_AREA
        ))
    } else {
        None
    }
}

/// Sums cross-attention heat of chosen token positions at latent resolution.
pub struct CrossAttnAggregator {
    /// Token positions whose attention is summed (e.g. the c_s^t positions and the class noun).
    pub tokens: Vec<i64>,
    /// Latent size (h, w) every map is resized to.
    pub size: (i64, i64),
    /// With classifier-free guidance the UNet batch is [φ; c]: only the conditional half counts.
    pub cond_half: bool,
    /// Σ heat, (B, h, w), once a map has been seen.
    pub heat: Option<Tensor>,
    pub calls: usize,
}

impl CrossAttnAggregator {
    pub fn new(tokens: Vec<i64>, size: (i64, i64), cond_half: bool) -> Self {
        Self { tokens, size, cond_half, heat: None, calls: 0 }
    }

    /// The aggregated heat min–max normalised per image, (B, h, w) in [0, 1] (all zero for a
    /// flat map).
    pub fn normalised(&self) -> Option<Tensor> {
        let h = self.heat.as_ref()?;
        let min = h.amin([1, 2], true); // (B, 1, 1)
        let range = h.amax([1, 2], true) - &min;
        Some((h - &min) / range.clamp_min(1e-12))
    }

    /// M_g at latent size: normalised heat ≥ τ, as 0/1 floats (B, h, w).
    pub fn mask(&self) -> Option<Tensor> {
        self.normalised().map(|m| m.ge(THRESHOLD).to_kind(Kind::Float))
    }
}

impl AttentionController for CrossAttnAggregator {
    fn wants(&self, site: &AttnSite) -> bool {
        site.kind == AttnKind::Cross
    }

    fn on_probs(&mut self, site: &AttnSite, probs: Tensor) -> Tensor {
        tch::no_grad(|| {
            let b = probs.size()[0];
            let p = if self.cond_half { probs.narrow(0, b / 2, b - b / 2) } else { probs.shallow_clone() }; // (B', heads, HW, 77)
            let idx = Tensor::from_slice(&self.tokens).to_device(p.device());
            let heat = p.index_select(3, &idx).sum_dim_intlist(3, false, Kind::Float).mean_dim(1, false, Kind::Float); // (B', HW)
            let heat = heat.view([-1, 1, site.height, site.width]); // (B', 1, h, w)
            let heat = heat.upsample_bilinear2d([self.size.0, self.size.1], false, None, None).squeeze_dim(1); // (B', h_lat, w_lat)
            self.heat = Some(match &self.heat {
                Some(acc) => acc + heat,
                None => heat,
            });
            self.calls += 1;
        });
        probs
    }
}
