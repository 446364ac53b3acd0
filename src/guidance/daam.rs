//! The subject's region from the UNet's own cross-attention (DAAM-style; paper §3.4 uses the
//! same correlation): a controller that sums the cross-attention probabilities of the subject
//! tokens over layers, heads and steps, each map brought to latent size.
//!
//! Rule for the mask M_g: the aggregated map is min–max normalised to [0, 1] and thresholded at
//! [`THRESHOLD`] (0.4, DAAM's τ). Min–max rather than DAAM's divide-by-max, because the heat
//! never reaches zero (softmax rows are positive everywhere): divided by its maximum, a flat
//! map would pass τ everywhere and select the whole image.
//!
//! Min–max normalisation always leaves a region ≥ τ, however flat or misplaced the attention is.
//! So the aggregated map also has a **contrast** ([`CrossAttnAggregator::contrast`]): the mean raw
//! heat inside that region over the mean outside it. Below [`MIN_CONTRAST`] no subject was found.

use crate::attention::{AttentionController, AttnKind, AttnSite};
use crate::pipeline::StableDiffusion;
use tch::{Kind, Tensor};

/// τ: a latent cell belongs to the subject when its normalised heat is at least this.
pub const THRESHOLD: f64 = 0.4;

/// Least contrast ([`CrossAttnAggregator::contrast`]) of attention that found a subject.
///
/// Chosen on the world model (`assets/world-model`, finest level 16×16, "a photo of a
/// {shape}"; docs/experiments.md, "When is there no subject?"): blank, grey, black, white
/// and noise photos give 1.12–1.31 (25 photo × noun pairs; grey ≤ 1.28); photos with the
/// subject 1.33–2.46 (the 40 held-out subject photos) and 1.28–2.80 (40 plain training
/// renders, 2 of them under 1.32); generated images 1.26–3.08, and the class noun's attention
/// over I_g1 of the five learned world subjects 1.33–3.51 (M_g). 1.32 refuses every blank
/// photo and 2 of 80 photos with a subject. Empty world scenes overlap (1.15–1.79: the sky's
/// clouds pass for a ball). Not measured on SD-1.5 (no weights here); `--min-contrast`
/// (`mask`, `learn --sam`, `generate --reference-guidance`) overrides it.
pub const MIN_CONTRAST: f64 = 1.32;

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
    /// Σ heat of the finest level only (the sites with the most cells), at its own resolution,
    /// with that resolution: what [`contrast`](Self::contrast) reads.
    pub fine: Option<((i64, i64), Tensor)>,
    pub calls: usize,
}

/// (B, h, w) min–max normalised per image to [0, 1] (all zero for a flat map).
fn min_max(h: &Tensor) -> Tensor {
    let min = h.amin([1, 2], true); // (B, 1, 1)
    let range = h.amax([1, 2], true) - &min;
    (h - &min) / range.clamp_min(1e-12)
}

impl CrossAttnAggregator {
    pub fn new(tokens: Vec<i64>, size: (i64, i64), cond_half: bool) -> Self {
        Self { tokens, size, cond_half, heat: None, fine: None, calls: 0 }
    }

    /// The aggregated heat min–max normalised per image, (B, h, w) in [0, 1] (all zero for a
    /// flat map).
    pub fn normalised(&self) -> Option<Tensor> {
        self.heat.as_ref().map(min_max)
    }

    /// M_g at latent size: normalised heat ≥ τ, as 0/1 floats (B, h, w).
    pub fn mask(&self) -> Option<Tensor> {
        self.normalised().map(|m| m.ge(THRESHOLD).to_kind(Kind::Float))
    }

    /// Per image, on the finest level's heat ([`fine`](Self::fine)): the mean raw heat of the
    /// cells whose min–max normalised heat is ≥ τ over the mean of the others (≥ 1; exactly 1
    /// for a flat map, which has no such cells).
    ///
    /// The finest level rather than the sum of all: the coarse levels (8×8 and below) have a
    /// blob of high contrast on any photo, a blank one included, so the sum's contrast barely
    /// tells a photo with the subject from one without (measured on the world model, see
    /// [`MIN_CONTRAST`]); at the finest level a blank photo's attention is nearly flat.
    pub fn contrast(&self) -> Option<Vec<f64>> {
        let h = self.fine.as_ref()?.1.to_kind(Kind::Double);
        let inside = min_max(&h).ge(THRESHOLD).to_kind(Kind::Double); // (B, h, w)
        let outside = 1.0 - &inside;
        let mean = |m: &Tensor| {
            (&h * m).sum_dim_intlist(&[1i64, 2][..], false, Kind::Double)
                / m.sum_dim_intlist(&[1i64, 2][..], false, Kind::Double)
        };
        let (i, o) = (mean(&inside), mean(&outside));
        let n_in = inside.sum_dim_intlist(&[1i64, 2][..], false, Kind::Double);
        let c = (i / o).where_self(&n_in.gt(0.0), &n_in.ones_like());
        Vec::<f64>::try_from(c.to_device(tch::Device::Cpu)).ok()
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
            let res = (site.height, site.width);
            self.fine = match self.fine.take() {
                Some((r, acc)) if r == res => Some((r, acc + heat.squeeze_dim(1))),
                Some((r, acc)) if r.0 * r.1 >= res.0 * res.1 => Some((r, acc)),
                _ => Some((res, heat.squeeze_dim(1))),
            };
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
