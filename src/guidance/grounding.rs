//! Subject masks without a second text-grounding model: Stable Diffusion's own cross-attention
//! tells where "{class noun}" is (the paper uses Grounding SAM for this), and SAM draws the
//! sharp outline.
//!
//! 1. **Heat map.** The photo (stretched to the model's default size) is VAE-encoded, noised to
//!    x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε at [`TIMESTEPS`] (t = 200, 400, 600 of 1000: late enough for
//!    the layout to be readable, early enough for the noise not to erase it) with the seeds
//!    [`SEEDS`] (0 and 1: two draws of ε average out one draw's accidents), and the UNet is run
//!    once per (t, seed) on "a photo of a {class}" (conditional branch only). The class noun's
//!    cross-attention is summed by the DAAM controller ([`CrossAttnAggregator`]), min–max
//!    normalised, and brought to the photo's size (bilinear).
//! 2. **Prompts** ([`prompts_from_heat`]): the largest 4-connected component of heat ≥ τ
//!    ([`THRESHOLD`], DAAM's 0.4) gives the box (its inclusive pixel extent); up to
//!    [`MAX_POINTS`] heat maxima inside it, at least 1/8 of the shorter side apart, give the
//!    positive points.
//! 3. **Choice** ([`choose`]): of SAM's candidates, the best predicted IoU among those that
//!    agree with the heat region (IoU ≥ [`AGREE_IOU`] with the thresholded component); its
//!    largest connected component, holes filled. No agreeing candidate: "no subject found".
//!
//! Without SAM the mask is the thresholded component itself ([`heat_mask`]), which is coarse
//! (SD-1.5 attends at 8×8 … 64×64 latent cells).

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

/// The class noun's normalised cross-attention over a photo (H, W, 3) uint8 → (H, W) in [0, 1].
pub fn heat_map(sd: &StableDiffusion, photo: &Tensor, class_noun: &str) -> Result<Tensor> {
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
    tch::no_grad(|| -> Result<Tensor> {
        let x0 = sd.vae.encode(&x).mean * sd.vae.scaling_factor(); // (1, 4, S/f, S/f)
        let cond = sd.encode_prompt(&prompt);
        let mut daam = CrossAttnAggregator::new(tokens, (s / f, s / f), false);
        for &seed in &SEEDS {
            let eps = crate::rng::seeded(seed as i64, || Tensor::randn(x0.size(), (Kind::Float, Device::Cpu)))
                .to_device(sd.device);
            for &t in &TIMESTEPS {
                let xt = sched.add_noise(&x0, &eps, &Tensor::from_slice(&[t]));
                let _ = sd.unet.forward(&xt, &Tensor::from(t).to_device(sd.device), &cond, Some(&mut daam));
            }
        }
        let heat = daam.normalised().expect("the UNet has cross-attention"); // (1, S/f, S/f)
        Ok(heat.unsqueeze(1).upsample_bilinear2d([h, w], false, None, None).squeeze().to_device(Device::Cpu))
    })
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

/// Fills the holes of a 0/1 mask (H, W): background pixels not 4-connected to the border.
pub fn fill_holes(mask: &Tensor) -> Tensor {
    let (v, h, w) = to_bytes(mask);
    let inv: Vec<u8> = v.iter().map(|&b| 1 - b).collect();
    let (label, _) = components(&inv, h, w);
    let mut outside = std::collections::HashSet::new();
    for y in 0..h {
        for x in 0..w {
            if y == 0 || x == 0 || y + 1 == h || x + 1 == w {
                outside.insert(label[y * w + x]);
            }
        }
    }
    let filled: Vec<u8> = (0..v.len()).map(|i| u8::from(v[i] == 1 || !outside.contains(&label[i]))).collect();
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

/// Of SAM's candidates, the best predicted IoU among those agreeing with the heat region;
/// its largest component with holes filled, (H, W) 0/1. `what` names the photo in the error.
pub fn choose(pred: &Prediction, heat: &Tensor, what: &str) -> Result<Tensor> {
    let region = heat_mask(heat);
    let agree: Vec<usize> = (0..pred.iou.len()).filter(|&i| iou(&pred.mask(i), &region) >= AGREE_IOU).collect();
    let Some(&best) = agree.iter().max_by(|&&a, &&b| pred.iou[a].total_cmp(&pred.iou[b])) else {
        bail!(
            "no subject found in {what}: none of SAM's {} masks agrees with the class noun's attention (IoU ≥ {AGREE_IOU})",
            pred.iou.len()
        );
    };
    Ok(fill_holes(&largest_component(&pred.mask(best))))
}

/// The subject mask (H, W) 0/1 of a photo (H, W, 3) uint8: heat map, then SAM when given.
pub fn subject_mask(
    sd: &StableDiffusion,
    sam: Option<&SamModel>,
    photo: &Tensor,
    class_noun: &str,
    path: &Path,
) -> Result<Tensor> {
    let heat = heat_map(sd, photo, class_noun)?;
    mask_from_heat(sam, photo, &heat, path)
}

/// [`subject_mask`] from a heat map already computed (e.g. I_g1's own attention).
pub fn mask_from_heat(sam: Option<&SamModel>, photo: &Tensor, heat: &Tensor, path: &Path) -> Result<Tensor> {
    let what = path.display().to_string();
    let mask = match sam {
        None => heat_mask(heat),
        Some(sam) => {
            let prompts = prompts_from_heat(heat)?;
            let pred = sam.predict_with(photo, &prompts, true)?;
            choose(&pred, heat, &what)?
        }
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
