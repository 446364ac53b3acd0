//! Does a fidelity score rank the truth first? (issue 19, item 4.)
//!
//! For each subject of the world and each prompt scene, the **truth** — the subject's own
//! render in that scene ([`crate::world::dataset::ground_truth`]) — is scored exactly as the
//! benchmark scores a generated image (DINO and CLIP-I: mean cosine to the subject's 4 photos;
//! CLIP-T: cosine to the prompt with the class noun, "a ball on the beach"), next to what a
//! score must rank below it, each in the same scene:
//!
//! | candidate | what it is | must lose on |
//! |---|---|---|
//! | `blob` | a flat disc of the subject's mean colour, in the truth's place and background | DINO |
//! | `shape` | the subject's shape, shaded, in its mean colour (no pattern) | DINO |
//! | `other subject` | another subject's truth (same split) | DINO |
//! | `base` | the base model's image of the class-noun prompt ("a ball on the beach") | DINO |
//! | `copy` | a photo of the subject (photo p mod 4), unchanged: another scene | CLIP-T |
//!
//! and `copy` is the ceiling of DINO (the photos are the reference), as "real images" are in
//! DreamBooth's table. [`summarize`] gives, per candidate and metric, the truth's win rate and
//! the mean margin (truth − candidate). GT RMSE (the template match, [`crate::world::score`]) is
//! computed for every candidate too, so its own blind spots show beside DINO's.

use crate::eval::metrics::{mean_paired_cosine, mean_pairwise_cosine, Evaluator};
use crate::pipeline::{GenerateRequest, StableDiffusion};
use crate::world::dataset::{baseline, ground_truth, subject_photo, Baseline, PROMPT_SCENES};
use crate::world::score::{fidelity, render_tensors};
use crate::world::{Render, SCENES, SHAPES, SIZE, SUBJECTS};
use anyhow::{Context, Result};
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The candidates besides the truth, in table order.
pub const CANDIDATES: [&str; 5] = ["blob", "shape", "other subject", "base", "copy"];

/// How the base model draws its class-noun images.
#[derive(Clone, Copy)]
pub struct BaseImages<'a> {
    pub sd: &'a StableDiffusion,
    pub steps: usize,
    pub guidance: f64,
    /// Image of prompt p uses seed `seed + p` (as the benchmark's first image of each prompt).
    pub seed: u64,
}

/// One scored image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub subject: String,
    pub prompt: usize,
    /// "truth" or one of [`CANDIDATES`].
    pub candidate: String,
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
    /// Template-match RMSE against the truth (0 for the truth itself).
    pub gt_rmse: f64,
}

fn to_image(r: &Render) -> Result<DynamicImage> {
    let img = image::RgbImage::from_raw(SIZE as u32, SIZE as u32, r.rgb.clone()).context("render size")?;
    Ok(DynamicImage::ImageRgb8(img))
}

/// The CLIP-T prompt of prompt scene `scene` for class `class`: the benchmark's scored prompt
/// (the world's template "a {0} {1} on the beach" with the class noun for "{0} {1}").
pub fn class_prompt(class: &str, scene: usize) -> String {
    format!("a {class} {}", SCENES[scene].1)
}

/// Scores the truth and every candidate for `subjects` (indices into [`SUBJECTS`]) in every
/// prompt scene of the world with seed `world_seed`. Without `base`, the `base` candidate is
/// left out.
pub fn measure(ev: &Evaluator, base: Option<BaseImages>, world_seed: u64, subjects: &[usize]) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    let mut base_cache: BTreeMap<(usize, usize), (DynamicImage, Render)> = BTreeMap::new();
    let bar = crate::progress::bar((subjects.len() * PROMPT_SCENES.len()) as u64, "validity");
    for &si in subjects {
        let s = SUBJECTS[si];
        let class = SHAPES[s.object.shape];
        let photos: Vec<Render> = (0..4).map(|k| subject_photo(world_seed, si, k)).collect();
        let real: Vec<DynamicImage> = photos.iter().map(to_image).collect::<Result<_>>()?;
        // the photos' embeddings once per subject (what `Evaluator::score` computes per call)
        let (real_dino, real_clip) = (ev.dino.embed_images(&real)?, ev.clip.embed_images(&real)?);
        for (p, &scene) in PROMPT_SCENES.iter().enumerate() {
            let truth = ground_truth(world_seed, s.object, scene);
            let (gt_img, gt_mask) = render_tensors(&truth);
            let mut named: Vec<(String, DynamicImage, Render)> =
                vec![("truth".into(), to_image(&truth)?, truth.clone())];
            for b in Baseline::ALL {
                let r = baseline(world_seed, si, scene, b);
                named.push((b.name().into(), to_image(&r)?, r));
            }
            if let Some(b) = base {
                let key = (s.object.shape, p);
                if let std::collections::btree_map::Entry::Vacant(slot) = base_cache.entry(key) {
                    let (h, w) = b.sd.default_hw();
                    let req = GenerateRequest {
                        prompt: class_prompt(class, scene),
                        negative_prompt: None,
                        seed: b.seed + p as u64,
                        steps: b.steps,
                        guidance: b.guidance,
                        height: h,
                        width: w,
                        num_images: 1,
                    };
                    let img = crate::io::RgbImage::from_hwc_u8(&b.sd.generate(&req)?.get(0))?;
                    let dynamic = DynamicImage::ImageRgb8(
                        image::RgbImage::from_raw(img.width, img.height, img.pixels.clone()).context("image size")?,
                    )
                    .resize_exact(SIZE as u32, SIZE as u32, image::imageops::FilterType::Triangle);
                    let render = Render { rgb: dynamic.to_rgb8().into_raw(), mask: vec![0; SIZE * SIZE] };
                    slot.insert((dynamic, render));
                }
                let (d, r) = &base_cache[&key];
                named.push(("base".into(), d.clone(), r.clone()));
            }
            let copy = photos[p % photos.len()].clone();
            named.push(("copy".into(), to_image(&copy)?, copy));
            let text = ev.text_features(&[class_prompt(class, scene)])?;
            for (name, img, r) in named {
                let one = std::slice::from_ref(&img);
                let clip = ev.clip.embed_images(one)?;
                let dino = mean_pairwise_cosine(&ev.dino.embed_images(one)?, &real_dino);
                let f = fidelity(&render_tensors(&r).0, &gt_img, &gt_mask)?;
                cases.push(Case {
                    subject: s.name.to_string(),
                    prompt: p,
                    candidate: name,
                    dino,
                    clip_i: mean_pairwise_cosine(&clip, &real_clip),
                    clip_t: mean_paired_cosine(&clip, &text),
                    gt_rmse: f.rmse,
                });
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(cases)
}

/// The truth against one candidate on one metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ordering {
    pub candidate: String,
    pub metric: String,
    /// (subject, prompt) pairs compared.
    pub n: usize,
    /// Share of pairs where the truth is better (higher; lower for GT RMSE).
    pub truth_wins: f64,
    /// Mean of truth − candidate (candidate − truth for GT RMSE: positive = the truth better).
    pub mean_margin: f64,
    /// Mean score of the truth and of the candidate.
    pub truth_mean: f64,
    pub candidate_mean: f64,
}

fn metric(c: &Case, m: &str) -> f64 {
    match m {
        "DINO" => c.dino,
        "CLIP-I" => c.clip_i,
        "CLIP-T" => c.clip_t,
        _ => c.gt_rmse,
    }
}

/// The metrics in table order; GT RMSE is lower-is-better.
pub const METRICS: [&str; 4] = ["DINO", "CLIP-I", "CLIP-T", "GT RMSE"];

/// Win rates and margins of the truth over each candidate, per metric.
pub fn summarize(cases: &[Case]) -> Vec<Ordering> {
    let mut out = Vec::new();
    for cand in CANDIDATES {
        for m in METRICS {
            let lower_better = m == "GT RMSE";
            let mut pairs = Vec::new();
            for t in cases.iter().filter(|c| c.candidate == "truth") {
                if let Some(c) =
                    cases.iter().find(|c| c.candidate == cand && c.subject == t.subject && c.prompt == t.prompt)
                {
                    pairs.push((metric(t, m), metric(c, m)));
                }
            }
            if pairs.is_empty() {
                continue;
            }
            let n = pairs.len();
            let margin = |(t, c): &(f64, f64)| if lower_better { c - t } else { t - c };
            out.push(Ordering {
                candidate: cand.into(),
                metric: m.into(),
                n,
                truth_wins: pairs.iter().filter(|p| margin(p) > 0.0).count() as f64 / n as f64,
                mean_margin: pairs.iter().map(margin).sum::<f64>() / n as f64,
                truth_mean: pairs.iter().map(|p| p.0).sum::<f64>() / n as f64,
                candidate_mean: pairs.iter().map(|p| p.1).sum::<f64>() / n as f64,
            });
        }
    }
    out
}

/// The Markdown table of [`summarize`]: one row per candidate, per metric "win rate (mean
/// margin)".
pub fn markdown(orderings: &[Ordering]) -> String {
    let mut s = String::from("| the truth against | n |");
    for m in METRICS {
        s.push_str(&format!(" {m}: truth wins (margin) |"));
    }
    s.push_str("\n|---|---|");
    for _ in METRICS {
        s.push_str("---|");
    }
    s.push('\n');
    for cand in CANDIDATES {
        let rows: Vec<&Ordering> = orderings.iter().filter(|o| o.candidate == cand).collect();
        let Some(first) = rows.first() else { continue };
        s.push_str(&format!("| {cand} | {} |", first.n));
        for m in METRICS {
            match rows.iter().find(|o| o.metric == m) {
                Some(o) => s.push_str(&format!(" {:.0} % ({:+.3}) |", 100.0 * o.truth_wins, o.mean_margin)),
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s
}

/// Mean of each metric per candidate (the truth too): the levels behind the margins.
pub fn means(cases: &[Case]) -> String {
    let mut s = String::from("| image | n |");
    for m in METRICS {
        s.push_str(&format!(" {m} |"));
    }
    s.push_str("\n|---|---|");
    for _ in METRICS {
        s.push_str("---|");
    }
    s.push('\n');
    for cand in std::iter::once("truth").chain(CANDIDATES) {
        let rows: Vec<&Case> = cases.iter().filter(|c| c.candidate == cand).collect();
        if rows.is_empty() {
            continue;
        }
        s.push_str(&format!("| {cand} | {} |", rows.len()));
        for m in METRICS {
            s.push_str(&format!(" {:.3} |", rows.iter().map(|c| metric(c, m)).sum::<f64>() / rows.len() as f64));
        }
        s.push('\n');
    }
    s
}
