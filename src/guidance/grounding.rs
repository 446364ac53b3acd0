//! Subject masks without a second text-grounding model: Stable Diffusion's own cross-attention
//! tells where "{class noun}" is (the paper uses Grounding SAM for this), and SAM draws the
//! sharp outline.
//!
//! 1. **Heat map** ([`heat_map`]). The photo (stretched to the model's default size) is
//!    VAE-encoded, noised to x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε at [`TIMESTEPS`] (t = 200, 400, 600 of
//!    1000: late enough for the layout to be readable, early enough for the noise not to erase
//!    it) with the seeds [`SEEDS`] (0 and 1: two draws of ε average out one draw's accidents),
//!    and the UNet is run once per (t, seed) on "a photo of a {class}" (conditional branch
//!    only). The class noun's cross-attention is summed by the DAAM controller
//!    ([`CrossAttnAggregator`]), min–max normalised, and brought to the photo's size (bilinear).
//! 2. **Contrast** ([`check_contrast`]): min–max normalisation always leaves a region ≥ τ, so
//!    the raw heat's contrast (mean inside that region over mean outside, at the finest
//!    attention level: [`CrossAttnAggregator::contrast`]) must reach
//!    [`MIN_CONTRAST`](super::daam::MIN_CONTRAST) (or `--min-contrast`); below it the attention
//!    is too flat to point at anything: "no subject found".
//! 3. **Prompts** ([`prompts_from_heat`]): the largest 4-connected component of heat ≥ τ
//!    ([`THRESHOLD`], DAAM's 0.4) gives the box (its inclusive pixel extent); up to
//!    [`MAX_POINTS`] heat maxima inside it, at least 1/8 of the shorter side apart, give the
//!    positive points.
//! 4. **SAM** ([`sam_mask`]): the box (with the points) gets SAM's single-mask output, as SAM's
//!    authors recommend for a box ([`PixelPrompts::multimask`]); when that mask is not
//!    acceptable (step 5), SAM's three multimask candidates are tried.
//! 5. **Choice** ([`choose`]): a candidate is acceptable when it agrees with the heat region
//!    (IoU ≥ [`AGREE_IOU`] with the thresholded component) and covers at most
//!    [`MAX_AREA_RATIO`] × its area; of those, the best predicted IoU, except that a candidate
//!    within [`IOU_MARGIN`] of it that agrees better with the heat region wins. Its largest
//!    connected component is kept and its small holes filled ([`fill_holes`]: holes under
//!    [`MAX_HOLE_FRACTION`] of the mask; a ring's inside stays open). No acceptable candidate:
//!    "no subject found".
//!
//! Without SAM the mask is the thresholded component itself ([`heat_mask`]), which is coarse
//! (SD-1.5 attends at 8×8 … 64×64 latent cells).
//!
//! Every "no subject found" is an error naming the photo: `mask` and `learn --sam` stop on it;
//! reference guidance (M_g of I_g1) falls back to the plain image with a warning.

use super::daam::{subject_tokens, CrossAttnAggregator, THRESHOLD};
use crate::models::sam::{PixelPrompts, Prediction, SamModel};
use crate::pipeline::StableDiffusion;
use anyhow::{bail, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Diffusion timesteps (of 1000) the heat map averages over.
pub const TIMESTEPS: [i64; 3] = [200, 400, 600];
/// Seeds of the noise ε at each timestep.
pub const SEEDS: [u64; 2] = [0, 1];
/// At most this many positive points.
pub const MAX_POINTS: usize = 3;
/// A SAM candidate agrees with the heat map when its IoU with the heat region is at least this
/// (the heat region is a blurred, larger version of the subject, so a sharp mask of the right
/// object overlaps it well below 1; a mask of the background or a small part falls under 0.3).
pub const AGREE_IOU: f64 = 0.3;
/// A SAM candidate may cover at most this many times the heat region's area. The heat region
/// is blurred and mostly larger than the subject: on the world model the exact masks of the 40
/// held-out subject photos cover 0.16–1.21× their heat region's area. 2 leaves 1.65× room over
/// the largest, and refuses a candidate that swallows the background (the review's case: a
/// 95 % candidate for a 40 % region, 2.4×, IoU 0.42 ≥ [`AGREE_IOU`]).
pub const MAX_AREA_RATIO: f64 = 2.0;
/// Acceptable candidates whose predicted IoUs are within this of the best are near-ties,
/// decided by IoU with the heat region. SAM's IoU head regresses the true IoU; two candidates
/// a few hundredths apart (a whole object and its main part typically are) are not a
/// confident preference, while one 0.1 ahead is. A judgement, not measured: there is no SAM
/// that knows the world here.
pub const IOU_MARGIN: f64 = 0.05;
/// Holes of at most this fraction of the mask's area are filled, larger ones are kept. The
/// world ring's inside is 39–41 % of its mask; a mug handle's opening is some percent of a
/// mug; SAM's spurious holes are specks. The heat map cannot tell them apart instead: on all
/// 8 ring photos the ring's inside is as hot as the ring (mean normalised heat 0.43–0.66 vs
/// 0.50–0.68, above τ), since the heat is blurred.
pub const MAX_HOLE_FRACTION: f64 = 0.01;

/// The class noun's cross-attention over a photo.
#[derive(Debug)]
pub struct Heat {
    /// (H, W) in [0, 1]: the min–max normalised heat at the photo's size.
    pub map: Tensor,
    /// The raw heat's contrast ([`CrossAttnAggregator::contrast`]).
    pub contrast: f64,
}

/// The class noun's cross-attention over a photo (H, W, 3) uint8.
pub fn heat_map(sd: &StableDiffusion, photo: &Tensor, class_noun: &str) -> Result<Heat> {
    let (h, w, _) = photo.size3()?;
    let s = sd.default_size();
    let prompt = format!("a photo of a {class_noun}");
    let tokens = subject_tokens(sd, &prompt, class_noun, 0);
    if tokens.is_empty() {
        bail!("the class noun {class_noun:?} has no tokens");
    }
    let f = sd.vae_scale_factor();
    let x = photo.permute([2, 0, 1]).unsqueeze(0).to_kind(Kind::Float) / 127.5 - 1.0; // (1, 3, H, W) in [-1, 1]
    let x = x.upsample_bilinear2d([s, s], false, None, None).to_device(sd.device); // stretched to (S, S)
    let sched = sd.scheduler(1)?;
    tch::no_grad(|| -> Result<Heat> {
        let x0 = sd.vae.encode(&x).mean * sd.vae.scaling_factor(); // (1, 4, S/f, S/f)
                                                                   // SDXL: both encoders' states, and the pooled embeds + size ids as added conditioning.
        let text = sd.encode_text(&prompt);
        let mut daam = CrossAttnAggregator::new(tokens, (s / f, s / f), false);
        for &seed in &SEEDS {
            let eps = crate::rng::seeded(seed as i64, || Tensor::randn(x0.size(), (Kind::Float, Device::Cpu)))
                .to_device(sd.device);
            for &t in &TIMESTEPS {
                let xt = sched.add_noise(&x0, &eps, &Tensor::from_slice(&[t]));
                let _ = sd.eps(&xt, t, &text, Some(&mut daam));
            }
        }
        let heat = daam.normalised().expect("the UNet has cross-attention"); // (1, S/f, S/f)
        let contrast = daam.contrast().expect("the UNet has cross-attention")[0];
        let map = heat.unsqueeze(1).upsample_bilinear2d([h, w], false, None, None).squeeze().to_device(Device::Cpu);
        Ok(Heat { map, contrast })
    })
}

/// "No subject found in `what`" when the attention's contrast is below `min_contrast`
/// ([`MIN_CONTRAST`](super::daam::MIN_CONTRAST) by default).
pub fn check_contrast(contrast: f64, min_contrast: f64, what: &str) -> Result<()> {
    if contrast.is_nan() || contrast < min_contrast {
        bail!(
            "no subject found in {what}: the class noun's attention is nearly flat (contrast {contrast:.2}, \
             mean heat inside its hottest region over outside; at least {min_contrast} is needed)"
        );
    }
    Ok(())
}

/// A 0/1 mask (H, W) on the CPU as bytes, and back.
fn to_bytes(mask: &Tensor) -> (Vec<u8>, usize, usize) {
    let (h, w) = mask.size2().expect("(H, W)");
    let m = mask.to_device(Device::Cpu).ge(0.5).to_kind(Kind::Uint8).contiguous().view([-1]);
    (Vec::<u8>::try_from(&m).expect("bytes"), h as usize, w as usize)
}

fn from_bytes(v: &[u8], h: usize, w: usize) -> Tensor {
    Tensor::from_slice(v).view([h as i64, w as i64]).to_kind(Kind::Float)
}

/// Labels the 4-connected components of `v` (non-zero = in); returns (label per pixel, 0 =
/// out; sizes by label − 1).
fn components(v: &[u8], h: usize, w: usize) -> (Vec<u32>, Vec<usize>) {
    let mut label = vec![0u32; v.len()];
    let mut sizes = Vec::new();
    let mut stack = Vec::new();
    for start in 0..v.len() {
        if v[start] == 0 || label[start] != 0 {
            continue;
        }
        let id = sizes.len() as u32 + 1;
        let mut n = 0;
        label[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            n += 1;
            let (y, x) = (i / w, i % w);
            let mut visit = |j: usize| {
                if v[j] != 0 && label[j] == 0 {
                    label[j] = id;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        sizes.push(n);
    }
    (label, sizes)
}

/// The largest 4-connected component of a 0/1 mask (H, W) (ties: the first in raster order);
/// all zero for an empty mask.
pub fn largest_component(mask: &Tensor) -> Tensor {
    let (v, h, w) = to_bytes(mask);
    let (label, sizes) = components(&v, h, w);
    let Some(best) = (0..sizes.len()).max_by_key(|&i| (sizes[i], std::cmp::Reverse(i))) else {
        return mask.zeros_like().to_kind(Kind::Float).to_device(Device::Cpu);
    };
    let keep: Vec<u8> = label.iter().map(|&l| u8::from(l == best as u32 + 1)).collect();
    from_bytes(&keep, h, w)
}

/// Fills the small holes of a 0/1 mask (H, W): background components not 4-connected to the
/// border whose area is at most [`MAX_HOLE_FRACTION`] of the mask's. Larger holes are real (a
/// ring's inside, a mug's handle) and stay open.
pub fn fill_holes(mask: &Tensor) -> Tensor {
    let (v, h, w) = to_bytes(mask);
    let area = v.iter().filter(|&&b| b == 1).count();
    let inv: Vec<u8> = v.iter().map(|&b| 1 - b).collect();
    let (label, sizes) = components(&inv, h, w);
    let mut outside = std::collections::HashSet::new();
    for y in 0..h {
        for x in 0..w {
            if y == 0 || x == 0 || y + 1 == h || x + 1 == w {
                outside.insert(label[y * w + x]);
            }
        }
    }
    let small = |l: u32| l > 0 && sizes[l as usize - 1] as f64 <= MAX_HOLE_FRACTION * area as f64;
    let filled: Vec<u8> =
        (0..v.len()).map(|i| u8::from(v[i] == 1 || (!outside.contains(&label[i]) && small(label[i])))).collect();
    from_bytes(&filled, h, w)
}

/// The coarse mask: the largest component of heat ≥ τ, (H, W) 0/1.
pub fn heat_mask(heat: &Tensor) -> Tensor {
    largest_component(&heat.ge(THRESHOLD).to_kind(Kind::Float))
}

/// SAM prompts from a heat map (H, W) in [0, 1]: the box of the largest component of heat ≥ τ
/// (inclusive pixel extent x0, y0, x1, y1) and up to [`MAX_POINTS`] positive points at heat
/// maxima inside it, each at least min(H, W)/8 from the ones before (strongest first).
pub fn prompts_from_heat(heat: &Tensor) -> Result<PixelPrompts> {
    let region = heat_mask(heat);
    let (h, w) = region.size2()?;
    let idx = region.view([-1]).nonzero().squeeze_dim(1); // inside pixels
    if idx.numel() == 0 {
        bail!("the heat map has no region above {THRESHOLD}");
    }
    let (ys, xs) = (idx.divide_scalar_mode(w, "floor"), idx.remainder(w));
    let b = [xs.min(), ys.min(), xs.max(), ys.max()].map(|t| t.int64_value(&[]) as f64);
    let heat = heat.to_device(Device::Cpu).to_kind(Kind::Float).view([-1]);
    let vals = Vec::<f32>::try_from(&heat.index_select(0, &idx))?;
    let pos = Vec::<i64>::try_from(&idx)?;
    let mut order: Vec<usize> = (0..pos.len()).collect();
    order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]).then(pos[a].cmp(&pos[b])));
    let min_dist = h.min(w) as f64 / 8.0;
    let mut points: Vec<(f64, f64, i64)> = Vec::new();
    for i in order {
        let (x, y) = ((pos[i] % w) as f64, (pos[i] / w) as f64);
        if points.iter().all(|&(px, py, _)| ((px - x).powi(2) + (py - y).powi(2)).sqrt() >= min_dist) {
            points.push((x, y, 1));
            if points.len() == MAX_POINTS {
                break;
            }
        }
    }
    Ok(PixelPrompts { points, boxes: Some(b) })
}

/// IoU of two 0/1 masks of one shape.
fn iou(a: &Tensor, b: &Tensor) -> f64 {
    crate::guidance::align::iou(a, b)
}

/// The index of the candidate [`choose`] takes, or each candidate's (IoU with the heat
/// region, area over the region's) when none is acceptable.
fn pick(pred: &Prediction, region: &Tensor) -> std::result::Result<usize, Vec<(f64, f64)>> {
    let region_area = region.sum(Kind::Double).double_value(&[]);
    let k = pred.iou.len();
    let agree: Vec<f64> = (0..k).map(|i| iou(&pred.mask(i), region)).collect();
    let ratio: Vec<f64> =
        (0..k).map(|i| pred.mask(i).sum(Kind::Double).double_value(&[]) / region_area.max(1.0)).collect();
    let ok: Vec<usize> = (0..k).filter(|&i| agree[i] >= AGREE_IOU && ratio[i] <= MAX_AREA_RATIO).collect();
    let Some(top) = ok.iter().map(|&i| pred.iou[i]).max_by(f64::total_cmp) else {
        return Err(agree.into_iter().zip(ratio).collect());
    };
    Ok(ok
        .iter()
        .copied()
        .filter(|&i| pred.iou[i] >= top - IOU_MARGIN)
        .min_by(|&a, &b| agree[b].total_cmp(&agree[a]).then(pred.iou[b].total_cmp(&pred.iou[a])).then(a.cmp(&b)))
        .expect("the top candidate is within the margin"))
}

/// Candidate `i` as the subject's mask: its largest component, small holes filled.
fn outline(pred: &Prediction, i: usize) -> Tensor {
    fill_holes(&largest_component(&pred.mask(i)))
}

/// "IoU 0.42 at 2.37× its area, …" for the candidates of [`pick`].
fn describe(facts: &[(f64, f64)]) -> String {
    facts.iter().map(|(a, r)| format!("IoU {a:.2} at {r:.2}× its area")).collect::<Vec<_>>().join(", ")
}

/// What an acceptable candidate needs, for the errors.
fn needs() -> String {
    format!(
        "IoU ≥ {AGREE_IOU} with the region where the class noun's attention is ≥ {THRESHOLD}, and at most \
         {MAX_AREA_RATIO}× its area"
    )
}

/// Of SAM's candidates, the acceptable ones (IoU ≥ [`AGREE_IOU`] with the heat region, area at
/// most [`MAX_AREA_RATIO`] × its area); of those, the best predicted IoU, unless another within
/// [`IOU_MARGIN`] of it agrees better with the heat region (then that one; ties: the higher
/// predicted IoU, then the first). Returns its largest component with the small holes filled,
/// (H, W) 0/1. `what` names the photo in the error.
pub fn choose(pred: &Prediction, heat: &Tensor, what: &str) -> Result<Tensor> {
    match pick(pred, &heat_mask(heat)) {
        Ok(i) => Ok(outline(pred, i)),
        Err(facts) => bail!(
            "no subject found in {what}: none of SAM's {} masks agrees with the class noun's attention ({}; needs {})",
            facts.len(),
            describe(&facts),
            needs()
        ),
    }
}

/// SAM's mask of a photo for the prompts of a heat map: the single-mask output for the box (and
/// points) when [`choose`] accepts it, else the choice among SAM's multimask candidates.
pub fn sam_mask(sam: &SamModel, photo: &Tensor, heat: &Tensor, what: &str) -> Result<Tensor> {
    let prompts = prompts_from_heat(heat)?;
    let region = heat_mask(heat);
    let (emb, prepared) = sam.embed(photo)?;
    let single = sam.predict_embedded(&emb, &prepared, &prompts)?;
    let first = match pick(&single, &region) {
        Ok(i) => return Ok(outline(&single, i)),
        Err(facts) => facts,
    };
    let multi = sam.predict_embedded_with(&emb, &prepared, &prompts, true)?;
    match pick(&multi, &region) {
        Ok(i) => Ok(outline(&multi, i)),
        Err(facts) => bail!(
            "no subject found in {what}: neither SAM's mask for the box ({}) nor its {} alternatives ({}) agree with \
             the class noun's attention (needs {})",
            describe(&first),
            facts.len(),
            describe(&facts),
            needs()
        ),
    }
}

/// The subject mask (H, W) 0/1 of a photo (H, W, 3) uint8 from its heat map (H, W) in [0, 1]
/// ([`heat_map`], whose contrast the caller checked with [`check_contrast`]; or I_g1's own
/// attention): the thresholded region, or SAM's mask when given.
pub fn mask_from_heat(sam: Option<&SamModel>, photo: &Tensor, heat: &Tensor, path: &Path) -> Result<Tensor> {
    let what = path.display().to_string();
    let mask = match sam {
        None => heat_mask(heat),
        Some(sam) => sam_mask(sam, photo, heat, &what)?,
    };
    // Large masks are fine here (a close-up photo); a speck is not a subject.
    let fraction = mask.mean(Kind::Double).double_value(&[]);
    if fraction < super::daam::MIN_AREA {
        bail!("no subject found in {what}: its mask covers {:.2} % of the photo", 100.0 * fraction);
    }
    Ok(mask)
}

/// The photo tinted where the mask is (red, half strength): (H, W, 3) uint8.
pub fn overlay(photo: &Tensor, mask: &Tensor) -> Tensor {
    let p = photo.to_device(Device::Cpu).to_kind(Kind::Float); // (H, W, 3)
    let red = Tensor::from_slice(&[255f32, 0.0, 0.0]).view([1, 1, 3]);
    let m = mask.to_device(Device::Cpu).to_kind(Kind::Float).unsqueeze(-1); // (H, W, 1)
    let tinted = &p * 0.5 + red * 0.5;
    let inv: Tensor = 1.0 - &m;
    (&m * tinted + inv * &p).round().clamp(0.0, 255.0).to_kind(Kind::Uint8)
}
