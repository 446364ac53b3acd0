//! `generate --reference-guidance`: the whole of §3.3 for one image.
//!
//! 1. I_g1 by Eq. 7 from x_T, with a [`CrossAttnAggregator`] collecting the subject tokens'
//!    cross-attention → M_g. Attention whose contrast is under `--min-contrast`
//!    ([`super::daam::MIN_CONTRAST`]) found no subject, and a degenerate M_g cannot guide: both
//!    fall back to the plain I_g1 with a warning.
//! 2. The reference photo: best DINO cosine to I_g1 (`--dino`), else best mask alignment.
//! 3. Algorithm 4: T_θ* maps M_r onto M_g → T_θ*(I_r), M_r*.
//! 4. DDIM inversion of T_θ*(I_r) under the reference caption (w = 1).
//! 5. Algorithm 2 from the same x_T → I_g2.

use super::align;
use super::daam::{degenerate, subject_tokens, word_positions, CrossAttnAggregator};
use super::grounding;
use super::invert::ddim_invert;
use super::reference::{guided_denoise, GuidanceConfig, GuidanceReport, Reference};
use crate::attention::Chain;
use crate::eval::dino::Dino;
use crate::io::{decoded_to_u8, image_to_u8, mask_to_u8, RgbImage};
use crate::models::sam::SamModel;
use crate::pipeline::{Fixed, GenerateRequest, StableDiffusion, StepConditioning, TextCond};
use crate::scheduler::DdimScheduler;
use crate::subject::conditioning::SubjectSteps;
use crate::subject::data::{load_photos, MaskFit, Photo};
use crate::subject::file::Subject;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Options of reference guidance.
#[derive(Debug, Clone)]
pub struct ReferenceOptions {
    pub guidance: GuidanceConfig,
    pub dino: Option<PathBuf>,
    /// c_r; default "a photo of a {class noun}".
    pub reference_caption: Option<String>,
    /// Photos and masks; default the subject folder's `photos/` and `masks/`.
    pub references: Option<PathBuf>,
    pub reference_masks: Option<PathBuf>,
    /// A transformers SamModel folder: M_g is SAM's mask of I_g1, prompted by I_g1's own
    /// attention ([`super::grounding`]); default: the thresholded attention map.
    pub sam: Option<PathBuf>,
    /// Folder for I_g1, M_g, the reference, T_θ*(I_r), M_r* and a strip.
    pub intermediates: Option<PathBuf>,
    /// The least contrast of the subject tokens' attention over I_g1 for M_g to be used
    /// ([`MIN_CONTRAST`](super::daam::MIN_CONTRAST) by default); below it guidance falls back to the plain image.
    pub min_contrast: f64,
}

/// The result: I_g2 (or I_g1 when guidance could not run) and timings.
pub struct Guided {
    /// (1, H, W, 3) uint8.
    pub image: Tensor,
    pub report: GuidanceReport,
    pub seconds: f64,
    /// Why guidance fell back to the plain image, if it did.
    pub fallback: Option<String>,
    /// The contrast of the subject words' attention over I_g1 ([`CrossAttnAggregator::contrast`]
    /// of the class noun; the DreamBooth token and class noun).
    pub contrast: f64,
}

/// The subject reference guidance draws: a learned embedding (Eq. 7's [c, c_s^t]) or a
/// DreamBooth model fine-tuned on "a {token} {class}" (the plain prompt on the fine-tuned
/// UNet: the paper's "Ours (DreamBooth)").
pub enum GuidedSubject<'a> {
    Embedding(&'a Subject),
    FineTuned { token: String, class_noun: String },
}

impl GuidedSubject<'_> {
    fn class_noun(&self) -> &str {
        match self {
            GuidedSubject::Embedding(s) => &s.class_noun,
            GuidedSubject::FineTuned { class_noun, .. } => class_noun,
        }
    }

    /// The token positions whose attention's contrast says whether I_g1 shows the subject: the
    /// prompt's words for it (the class noun; the DreamBooth token and class noun), not the
    /// learned c_s^t rows, whose attention is diffuse (the world model's learned pyramid: 1.10–1.23
    /// with them, though I_g1 shows it; see docs/experiments.md). All of [`tokens`](Self::tokens)
    /// when the prompt lacks the class noun.
    fn contrast_tokens(&self, sd: &StableDiffusion, prompt: &str) -> Vec<i64> {
        let words = match self {
            GuidedSubject::Embedding(s) => word_positions(sd, prompt, &s.class_noun),
            GuidedSubject::FineTuned { .. } => self.tokens(sd, prompt),
        };
        if words.is_empty() {
            self.tokens(sd, prompt)
        } else {
            words
        }
    }

    /// The token positions whose cross-attention makes M_g.
    fn tokens(&self, sd: &StableDiffusion, prompt: &str) -> Vec<i64> {
        match self {
            GuidedSubject::Embedding(s) => subject_tokens(sd, prompt, &s.class_noun, s.n_tokens()),
            GuidedSubject::FineTuned { token, class_noun } => {
                let mut t = word_positions(sd, prompt, token);
                t.extend(word_positions(sd, prompt, class_noun));
                t
            }
        }
    }

    fn steps<'s>(
        &self,
        sd: &'s StableDiffusion,
        prompt: &str,
        sched: &DdimScheduler,
        uncond: &TextCond,
        size: (i64, i64),
    ) -> Result<Box<dyn StepConditioning + 's>> {
        Ok(match self {
            GuidedSubject::Embedding(s) => {
                Box::new(SubjectSteps::new(sd, prompt, s, sched, uncond, 1)?.at_size(size.0, size.1))
            }
            GuidedSubject::FineTuned { .. } => {
                let cond = tch::no_grad(|| sd.encode_text(prompt));
                Box::new(Fixed(sd.step_cond(&cond, uncond, size.0, size.1)))
            }
        })
    }
}

/// Runs §3.3 for `req` (one image) with a learned subject whose folder is `subject_dir`.
pub fn generate_guided(
    sd: &StableDiffusion,
    req: &GenerateRequest,
    subject: &GuidedSubject,
    subject_dir: &Path,
    opt: &ReferenceOptions,
) -> Result<Guided> {
    if req.num_images != 1 {
        bail!("reference guidance makes one image at a time (--num-images 1)");
    }
    sd.check_size(req.height, req.width)?;
    let sched = sd.scheduler(req.steps)?;
    opt.guidance.validate(req.steps)?;
    super::reference::check_guidance_scale(req.guidance)?;
    let started = Instant::now();
    let photos = reference_photos(subject_dir, opt, sd.default_size())?;
    // φ as the plain pipeline builds it (SDXL: zeros, pooled too, for no negative prompt).
    let uncond = tch::no_grad(|| sd.encode_negative(req.negative_prompt.as_deref()));
    let size = (req.height, req.width);
    let x_t = sd.initial_latents(req.seed, 1, req.height, req.width);
    let (h, w) = (x_t.size()[2], x_t.size()[3]);
    // 1. I_g1 and M_g.
    let tokens = subject.tokens(sd, &req.prompt);
    if tokens.is_empty() {
        bail!("the prompt {:?} does not name the subject ({}): M_g needs its tokens", req.prompt, subject.class_noun());
    }
    let mut daam = CrossAttnAggregator::new(tokens, (h, w), req.guidance > 1.0);
    let mut words = CrossAttnAggregator::new(subject.contrast_tokens(sd, &req.prompt), (h, w), req.guidance > 1.0);
    let x0_g1 = tch::no_grad(|| -> Result<Tensor> {
        let mut steps = subject.steps(sd, &req.prompt, &sched, &uncond, size)?;
        let mut both = Chain(vec![&mut daam, &mut words]);
        sd.denoise(x_t.shallow_clone(), &sched, steps.as_mut(), req.guidance, Some(&mut both))
    })?;
    let i_g1 = tch::no_grad(|| decoded_to_u8(&sd.decode(&x0_g1)));
    let contrast = words.contrast().context("no cross-attention was recorded")?[0];
    let plain = |why: String| {
        eprintln!("warning: {why}; falling back to plain generation");
        Guided {
            image: i_g1.shallow_clone(),
            report: GuidanceReport::default(),
            seconds: started.elapsed().as_secs_f64(),
            fallback: Some(why),
            contrast,
        }
    };
    // 1b. Is there a subject in I_g1 at all? (Flat attention: M_g would be noise.)
    if let Err(e) = grounding::check_contrast(contrast, opt.min_contrast, "I_g1") {
        return Ok(plain(format!("M_g: {e:#}")));
    }
    let (m_g, m_g_img) = match &opt.sam {
        None => {
            let m_g = daam.mask().context("no cross-attention was recorded")?; // (1, h, w)
            let m_g_img = m_g.unsqueeze(1).upsample_nearest2d([req.height, req.width], None, None).squeeze(); // (H, W)
            (m_g, m_g_img.to_device(Device::Cpu)) // on the CPU with the photos
        }
        Some(dir) => {
            let sam = SamModel::load(dir, sd.device)?;
            let heat = daam.normalised().context("no cross-attention was recorded")?; // (1, h, w)
            let heat = heat.unsqueeze(1).upsample_bilinear2d([req.height, req.width], false, None, None).squeeze(); // (H, W)
            match grounding::mask_from_heat(Some(&sam), &i_g1.get(0), &heat, Path::new("I_g1")) {
                Ok(m) => {
                    let lat = m.view([1, 1, req.height, req.width]).adaptive_avg_pool2d([h, w]).ge(0.5); // (1, 1, h, w)
                    (lat.to_kind(Kind::Float).squeeze_dim(1), m)
                }
                Err(e) => return Ok(plain(format!("M_g: {e:#}"))),
            }
        }
    };
    if let Some(what) = degenerate(&m_g) {
        return Ok(plain(format!("the generated subject mask M_g is {what}")));
    }
    // 2. Reference choice.
    let (r, fitted) = choose_reference(sd, &photos, &i_g1, &m_g_img, opt)?;
    let photo = &photos[r];
    let m_r = photo.mask.as_ref().context("reference photo without mask")?.squeeze_dim(0);
    // 3. Algorithm 4 (already run when it chose the reference).
    let fit = match fitted {
        Some(f) => f,
        None => align::fit(&m_r, &m_g_img)?,
    };
    // Edge pixels outside the photo: a zero (mid-grey) border would enter the inversion.
    let warped = align::warp_image(&photo.image, &fit.theta, req.height, req.width); // (3, H, W) in [-1, 1]
    let m_r_star = align::warp_mask(&m_r, &fit.theta, req.height, req.width); // (H, W)
    let m_lat = m_r_star.view([1, 1, req.height, req.width]).adaptive_avg_pool2d([h, w]).ge(0.5).to_kind(Kind::Float);
    if m_lat.sum(Kind::Float).double_value(&[]) == 0.0 {
        return Ok(plain("the aligned reference mask M_r* is empty at latent size".into()));
    }
    // 4. Inversion of T_θ*(I_r) under c_r, w = 1.
    let caption = opt.reference_caption.clone().unwrap_or_else(|| format!("a photo of a {}", subject.class_noun()));
    let traj = tch::no_grad(|| {
        let x0 = sd.vae.encode(&warped.unsqueeze(0).to_device(sd.device)).mean * sd.vae.scaling_factor();
        ddim_invert(sd, &sched, &x0, sd.encode_text(&caption))
    });
    // 5. Algorithm 2.
    let mut steps = subject.steps(sd, &req.prompt, &sched, &uncond, size)?;
    let (x0, report) = guided_denoise(
        sd,
        &sched,
        x_t,
        steps.as_mut(),
        req.guidance,
        &Reference { traj: &traj, mask: &m_lat.to_device(sd.device) },
        &opt.guidance,
    )?;
    let image = tch::no_grad(|| decoded_to_u8(&sd.decode(&x0)));
    if let Some(dir) = &opt.intermediates {
        let reference = image_to_u8(
            &photo.image.unsqueeze(0).upsample_bilinear2d([req.height, req.width], false, None, None).squeeze_dim(0),
        );
        let parts = [
            ("I_g1", i_g1.get(0)),
            ("M_g", mask_to_u8(&m_g_img)),
            ("reference", reference),
            ("reference_aligned", image_to_u8(&warped)),
            ("M_r_star", mask_to_u8(&m_r_star)),
            ("I_g2", image.get(0)),
        ];
        save_intermediates(dir, &parts)?;
        let facts = serde_json::json!({
            "reference": photo.path.display().to_string(), "theta": fit.theta, "align_loss": fit.loss,
            "eq10_losses": report.losses, "phi_h_seconds": report.phi_h_seconds,
        });
        crate::io::write_bytes_atomic(&dir.join("theta.json"), serde_json::to_string_pretty(&facts)?.as_bytes())?;
    }
    Ok(Guided { image, report, seconds: started.elapsed().as_secs_f64(), fallback: None, contrast })
}

fn reference_photos(subject_dir: &Path, opt: &ReferenceOptions, size: i64) -> Result<Vec<Photo>> {
    let images = opt.references.clone().unwrap_or_else(|| subject_dir.join("photos"));
    let masks = opt.reference_masks.clone().unwrap_or_else(|| subject_dir.join("masks"));
    if !masks.is_dir() {
        bail!("reference guidance needs the subject's masks: {} does not exist (learn with --masks, or pass --reference-masks)", masks.display());
    }
    load_photos(&images, Some(&masks), size as u32, MaskFit::SameSize)
}

/// Index of the reference photo: best DINO cosine to I_g1, else best alignment IoU with M_g
/// (then with its fitted transform).
fn choose_reference(
    sd: &StableDiffusion,
    photos: &[Photo],
    i_g1: &Tensor,
    m_g: &Tensor,
    opt: &ReferenceOptions,
) -> Result<(usize, Option<align::Fit>)> {
    if let Some(dir) = &opt.dino {
        let dino = Dino::load(dir, sd.device)?;
        let query = to_dynamic(&i_g1.get(0))?;
        let cands = photos.iter().map(|p| crate::io::open_photo(&p.path)).collect::<Result<Vec<_>>>()?;
        let (best, sims) = dino.most_similar(&query, &cands)?;
        eprintln!("reference: {} (DINO cosine {:.3})", photos[best].path.display(), sims[best]);
        return Ok((best, None));
    }
    let mut best: Option<(usize, f64, align::Fit)> = None;
    for (i, p) in photos.iter().enumerate() {
        let m = p.mask.as_ref().context("reference photo without mask")?.squeeze_dim(0);
        let fit = align::fit(&m, m_g)?;
        let iou = align::iou(&align::warp_mask(&m, &fit.theta, m_g.size()[0], m_g.size()[1]), m_g);
        if best.as_ref().is_none_or(|b| iou > b.1) {
            best = Some((i, iou, fit));
        }
    }
    let (i, iou, fit) = best.context("no reference photos")?;
    eprintln!("no --dino: chose reference {} by mask alignment (IoU {iou:.3})", photos[i].path.display());
    Ok((i, Some(fit)))
}

fn to_dynamic(hwc: &Tensor) -> Result<image::DynamicImage> {
    let img = RgbImage::from_hwc_u8(hwc)?;
    let buf = image::RgbImage::from_raw(img.width, img.height, img.pixels).context("image buffer")?;
    Ok(image::DynamicImage::ImageRgb8(buf))
}

fn save_intermediates(dir: &Path, parts: &[(&str, Tensor)]) -> Result<()> {
    for (name, t) in parts {
        RgbImage::from_hwc_u8(t)?.save_png(&dir.join(format!("{name}.png")), &[])?;
    }
    let strip = Tensor::cat(&parts.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>(), 1); // (H, 6W, 3)
    RgbImage::from_hwc_u8(&strip)?.save_png(&dir.join("strip.png"), &[])
}
