//! The `invert` and `replace` jobs: Algorithm 3 for one photo.
//!
//! `invert`: photo → x_0* → pivots (w = 1) → null-text optimisation → `inversion.safetensors`
//! (x_T*, φ*_t, timesteps, what it was made from), the photo as used, the reconstruction and a
//! per-step log. `replace`: the source caption c^r and the target c^g (the source word swapped
//! for the target word) run as one batch from x_T* with the per-step φ*_t, under the
//! prompt-to-prompt controller; with a learned subject the target's conditional branch is
//! [c^g, c_s^t] (Eq. 7).

use super::nti::{null_text_optimize, NtiConfig, NullTextInversion, StepLog};
use super::p2p::{align_tokens, PromptToPrompt};
use crate::attention::Chain;
use crate::guidance::daam::CrossAttnAggregator;
use crate::guidance::invert::ddim_invert;
use crate::io::{
    decoded_to_u8, file_sha256, image_to_u8, load_image_cover, write_bytes_atomic, write_safetensors_atomic,
};
use crate::load::{read_safetensors_finite, safetensors_metadata};
use crate::pipeline::{cfg, StableDiffusion, StepConditioning, TextCond};
use crate::subject::conditioning::{check_room, SubjectSteps};
use crate::subject::file::Subject;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub const INVERSION_FILE: &str = "inversion.safetensors";
pub const FORMAT: &str = "hifi-tuner-inversion/1";

/// What an inversion was made from; a reused inversion must match it.
#[derive(Debug, Clone, PartialEq)]
pub struct InversionMeta {
    /// The model folder, canonicalised.
    pub model: String,
    /// SHA-256 of the photo file.
    pub image_sha256: String,
    pub caption: String,
    /// Who wrote the caption when it was not typed ("blip DIR"); not compared on reuse.
    pub caption_source: Option<String>,
    pub height: i64,
    pub width: i64,
    pub steps: usize,
    pub guidance: f64,
    pub inner_steps: usize,
}

/// An inversion with its provenance.
pub struct Inversion {
    pub nti: NullTextInversion,
    pub meta: InversionMeta,
}

/// What `invert` is asked.
#[derive(Debug, Clone)]
pub struct InvertRequest {
    pub image: PathBuf,
    pub caption: String,
    /// Where the caption came from when not typed (e.g. "blip DIR"): stored in the inversion's
    /// metadata as `caption_source`.
    pub caption_source: Option<String>,
    pub steps: usize,
    /// Default: the model's default size.
    pub height: Option<i64>,
    pub width: Option<i64>,
    pub nti: NtiConfig,
}

/// The canonical model path recorded in an inversion.
pub fn model_id(sd: &StableDiffusion) -> String {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string();
    let mut id = canonical(&sd.source);
    // merged LoRAs change the weights: an inversion made without them (or with others) differs
    for l in &sd.loras {
        id.push_str(&format!(" + lora {}:{}", canonical(&l.path), l.scale));
    }
    id
}

/// What a request's inversion must match (the photo is hashed here).
pub fn expected_meta(sd: &StableDiffusion, req: &InvertRequest) -> Result<InversionMeta> {
    let (dh, dw) = sd.default_hw();
    Ok(InversionMeta {
        model: model_id(sd),
        image_sha256: file_sha256(&req.image)?,
        caption: req.caption.clone(),
        caption_source: req.caption_source.clone(),
        height: req.height.unwrap_or(dh),
        width: req.width.unwrap_or(dw),
        steps: req.steps,
        guidance: req.nti.guidance,
        inner_steps: req.nti.inner_steps,
    })
}

/// The result of `invert`: the inversion, the photo as used (1, H, W, 3) u8 and the
/// reconstruction (1, H, W, 3) u8.
pub struct Inverted {
    pub inversion: Inversion,
    pub source: Tensor,
    pub reconstruction: Tensor,
    pub seconds: f64,
    /// Seconds of the null-text optimisation alone.
    pub nti_seconds: f64,
}

/// Runs null-text inversion of one photo.
pub fn invert(sd: &StableDiffusion, req: &InvertRequest) -> Result<Inverted> {
    let started = Instant::now();
    req.nti.validate()?;
    let meta = expected_meta(sd, req)?;
    sd.check_size(meta.height, meta.width)?;
    let pixels = load_image_cover(&req.image, meta.height, meta.width)?; // (3, H, W) in [-1, 1]
    let sched = sd.scheduler(req.steps)?;
    let (cond, uncond, x0) = tch::no_grad(|| {
        let x0 = sd.vae.encode(&pixels.unsqueeze(0).to_device(sd.device)).mean * sd.vae.scaling_factor(); // (1, C, h, w)
                                                                                                          // φ as the plain pipeline builds it (SDXL: zeros, pooled too).
        (sd.encode_text(&req.caption), sd.encode_negative(None), x0)
    });
    let traj = ddim_invert(sd, &sched, &x0, &cond);
    let nti_started = Instant::now();
    let nti = null_text_optimize(sd, &sched, &traj, &cond, &uncond, &req.nti)?;
    let nti_seconds = nti_started.elapsed().as_secs_f64();
    let x0_rec = nti.x0.as_ref().expect("the optimisation ends at its reconstruction");
    let reconstruction = tch::no_grad(|| decoded_to_u8(&sd.decode(x0_rec)));
    Ok(Inverted {
        inversion: Inversion { nti, meta },
        source: image_to_u8(&pixels).unsqueeze(0),
        reconstruction,
        seconds: started.elapsed().as_secs_f64(),
        nti_seconds,
    })
}

/// Writes `DIR/inversion.safetensors`, `DIR/source.png`, `DIR/reconstruction.png` and
/// `DIR/inversion_log.jsonl`, each atomically.
pub fn save_inverted(dir: &Path, inv: &Inverted) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    save_inversion(&dir.join(INVERSION_FILE), &inv.inversion)?;
    crate::io::RgbImage::from_hwc_u8(&inv.source.get(0))?.save_png(&dir.join("source.png"), &[])?;
    crate::io::RgbImage::from_hwc_u8(&inv.reconstruction.get(0))?.save_png(&dir.join("reconstruction.png"), &[])?;
    let mut log = String::new();
    for (i, s) in inv.inversion.nti.log.iter().enumerate() {
        log.push_str(&step_log_line(i, s));
        log.push('\n');
    }
    write_bytes_atomic(&dir.join("inversion_log.jsonl"), log.as_bytes())
}

fn step_log_line(i: usize, s: &StepLog) -> String {
    serde_json::json!({
        "step": i,
        "t": s.t,
        "loss_first": s.losses.first().copied().unwrap_or(s.final_loss),
        "loss_last": s.losses.last().copied().unwrap_or(s.final_loss),
        "loss_final": s.final_loss,
        "inner_steps": s.losses.len(),
    })
    .to_string()
}

/// Writes an inversion file: `x_T` (1, C, h, w), `phi` (T, 77, d) in generation order (SDXL:
/// and `phi_pooled` (T, P)), `timesteps` (T,), and the provenance as metadata.
pub fn save_inversion(path: &Path, inv: &Inversion) -> Result<()> {
    let m = &inv.meta;
    let phi = TextCond::cat(&inv.nti.phi.iter().collect::<Vec<_>>());
    let mut tensors = vec![
        ("x_T".to_string(), inv.nti.x_t.to_kind(Kind::Float)),
        ("phi".to_string(), phi.hidden.to_kind(Kind::Float)), // (T, 77, d)
        ("timesteps".to_string(), Tensor::from_slice(&inv.nti.timesteps)),
    ];
    if let Some(p) = phi.pooled {
        tensors.push(("phi_pooled".to_string(), p.to_kind(Kind::Float))); // (T, P)
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("model".into(), m.model.clone());
    meta.insert("image_sha256".into(), m.image_sha256.clone());
    meta.insert("caption".into(), m.caption.clone());
    if let Some(src) = &m.caption_source {
        meta.insert("caption_source".into(), src.clone());
    }
    meta.insert("height".into(), m.height.to_string());
    meta.insert("width".into(), m.width.to_string());
    meta.insert("steps".into(), m.steps.to_string());
    meta.insert("guidance".into(), m.guidance.to_string());
    meta.insert("inner_steps".into(), m.inner_steps.to_string());
    write_safetensors_atomic(path, &tensors, &meta)
}

/// Reads an inversion folder (or file) written by [`save_inverted`].
pub fn load_inversion(path: &Path, device: Device) -> Result<Inversion> {
    let file = if path.is_dir() { path.join(INVERSION_FILE) } else { path.to_path_buf() };
    if !file.is_file() {
        bail!("no inversion at {}: expected {INVERSION_FILE} (written by `hifi-tuner invert`)", file.display());
    }
    let md = safetensors_metadata(&file)?;
    let get = |k: &str| md.get(k).cloned().with_context(|| format!("{}: metadata has no {k:?}", file.display()));
    if get("format")? != FORMAT {
        bail!("{} is not a hifi-tuner inversion (format {:?})", file.display(), md.get("format"));
    }
    let num = |k: &str| -> Result<f64> {
        get(k)?.parse::<f64>().with_context(|| format!("{}: metadata {k:?} is not a number", file.display()))
    };
    let meta = InversionMeta {
        model: get("model")?,
        image_sha256: get("image_sha256")?,
        caption: get("caption")?,
        caption_source: md.get("caption_source").cloned(),
        height: num("height")? as i64,
        width: num("width")? as i64,
        steps: num("steps")? as usize,
        guidance: num("guidance")?,
        inner_steps: num("inner_steps")? as usize,
    };
    let mut t: BTreeMap<String, Tensor> = read_safetensors_finite(&file)?.into_iter().collect();
    let mut take = |k: &str| t.remove(k).with_context(|| format!("{}: no tensor {k:?}", file.display()));
    let (x_t, phi, ts) = (take("x_T")?, take("phi")?, take("timesteps")?);
    let timesteps = Vec::<i64>::try_from(&ts.to_kind(Kind::Int64))?;
    if phi.dim() != 3 || phi.size()[0] as usize != timesteps.len() || timesteps.len() != meta.steps {
        bail!(
            "{}: phi is {:?} but there are {} timesteps and {} steps",
            file.display(),
            phi.size(),
            timesteps.len(),
            meta.steps
        );
    }
    let pooled = match t.remove("phi_pooled") {
        Some(p) if p.dim() != 2 || p.size()[0] != phi.size()[0] => {
            bail!("{}: phi_pooled is {:?} but phi is {:?}", file.display(), p.size(), phi.size())
        }
        Some(p) => p.to_device(device).split(1, 0).into_iter().map(Some).collect::<Vec<_>>(),
        None => (0..timesteps.len()).map(|_| None).collect(),
    };
    // T × (1, 77, d), with (1, P) on SDXL
    let phi: Vec<TextCond> = phi
        .to_device(device)
        .split(1, 0)
        .into_iter()
        .zip(pooled)
        .map(|(hidden, pooled)| TextCond { hidden, pooled })
        .collect();
    let x_t = x_t.to_device(device);
    Ok(Inversion { nti: NullTextInversion { x0: None, x_t, phi, timesteps, log: Vec::new() }, meta })
}

/// Refuses an inversion made from anything else than what is asked, naming each difference.
pub fn check_matches(found: &InversionMeta, want: &InversionMeta, path: &Path) -> Result<()> {
    let mut diffs = Vec::new();
    let mut cmp = |what: &str, a: String, b: String| {
        if a != b {
            diffs.push(format!("{what}: {a:?} there, {b:?} here"));
        }
    };
    cmp("model", found.model.clone(), want.model.clone());
    cmp("image (SHA-256)", found.image_sha256.clone(), want.image_sha256.clone());
    cmp("caption", found.caption.clone(), want.caption.clone());
    cmp("size", format!("{}x{}", found.width, found.height), format!("{}x{}", want.width, want.height));
    cmp("steps", found.steps.to_string(), want.steps.to_string());
    cmp("guidance", found.guidance.to_string(), want.guidance.to_string());
    if !diffs.is_empty() {
        bail!("the inversion in {} was made for another input — {}", path.display(), diffs.join("; "));
    }
    Ok(())
}

/// The byte range of the first whole-word, case-insensitive occurrence of `word` in `text`.
pub fn find_word(text: &str, word: &str) -> Option<(usize, usize)> {
    if word.trim().is_empty() {
        return None;
    }
    let re =
        regex::Regex::new(&format!(r"(?i)(?:^|[^\p{{L}}\p{{N}}])({})(?:$|[^\p{{L}}\p{{N}}])", regex::escape(word)))
            .ok()?;
    re.captures(text).and_then(|c| c.get(1)).map(|m| (m.start(), m.end()))
}

/// The words of a caption, for error messages.
fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric() && c != '<' && c != '>').to_string())
        .filter(|w| !w.is_empty())
        .collect()
}

/// A word swap: c^r, c^g and where the word's tokens are.
#[derive(Debug, Clone)]
pub struct WordSwap {
    pub source_caption: String,
    pub target_caption: String,
    /// First token position of the word (after BOS).
    pub start: usize,
    pub n_source: usize,
    pub n_target: usize,
}

/// Builds c^g from c^r by replacing the first whole-word occurrence of `source_word` with
/// `target_word`, and locates both words' tokens.
pub fn swap_word(sd: &StableDiffusion, caption: &str, source_word: &str, target_word: &str) -> Result<WordSwap> {
    let Some((a, b)) = find_word(caption, source_word) else {
        bail!(
            "the source word {source_word:?} is not in the caption {caption:?} (its words: {})",
            words(caption).join(", ")
        );
    };
    if target_word.trim().is_empty() {
        bail!("the target word is empty");
    }
    let content = |s: &str| -> Vec<i64> {
        let ids = sd.tokenizer.encode(s);
        ids[1..ids.len() - 1].to_vec()
    };
    let start = 1 + content(&caption[..a]).len();
    let target_caption = format!("{}{}{}", &caption[..a], target_word, &caption[b..]);
    let (src_ids, tgt_ids) = (content(&caption[a..b]), content(target_word));
    // The word's tokens must stand where we say in both captions (CLIP splits at word
    // boundaries, so they do; this guards the assumption).
    for (text, ids, what) in [(caption, &src_ids, "source"), (target_caption.as_str(), &tgt_ids, "target")] {
        let all = sd.tokenizer.encode_padded(text).ids;
        if all.len() < start + ids.len() || &all[start..start + ids.len()] != ids.as_slice() {
            bail!("could not locate the {what} word's tokens in {text:?}");
        }
    }
    Ok(WordSwap {
        source_caption: caption.to_string(),
        target_caption,
        start,
        n_source: src_ids.len(),
        n_target: tgt_ids.len(),
    })
}

/// What `replace` is asked, beyond the inversion.
#[derive(Debug, Clone)]
pub struct ReplaceRequest {
    pub source_word: String,
    /// Default: the subject's class noun.
    pub target_word: Option<String>,
    /// The fraction of steps, from the start, with replaced cross-attention.
    pub cross_replace: f64,
    /// The fraction of steps, from the start, with injected self-attention.
    pub self_replace: f64,
}

/// The word swap of a request, checked: the source word is in the caption, and the target
/// caption leaves the last n positions to the subject.
pub fn prepare_swap(
    sd: &StableDiffusion,
    caption: &str,
    req: &ReplaceRequest,
    subject: Option<&Subject>,
) -> Result<WordSwap> {
    let target_word = match (&req.target_word, subject) {
        (Some(w), _) => w.clone(),
        (None, Some(s)) => s.class_noun.clone(),
        (None, None) => bail!("without --subject, --target-word is required"),
    };
    let swap = swap_word(sd, caption, &req.source_word, &target_word)?;
    if let Some(s) = subject {
        let n_tokens = sd.tokenizer.encode_padded(&swap.target_caption).n_tokens;
        check_room(n_tokens, s.n_tokens(), sd.tokenizer.model_max_length() as i64, &swap.target_caption)?;
    }
    Ok(swap)
}

/// The result of `replace`.
pub struct Replaced {
    /// (1, H, W, 3) u8: the edited photo.
    pub image: Tensor,
    /// (1, H, W, 3) u8: the source row of the same batch (the reconstruction).
    pub reconstruction: Tensor,
    /// Final latents of the batch (2, C, h, w): [source; target].
    pub latents: Tensor,
    /// Normalised cross-attention of the source word (row 0) and of [w_g, c_s] (row 1), (h, w).
    pub maps: Vec<Tensor>,
    pub swap: WordSwap,
    pub edited_calls: usize,
}

/// Algorithm 3's last loop: x_{t−1} = F̃^(t)(x_t, c^r, [c^g, c_s^t], φ*_t) for t = T … 1,
/// source and target in one batch from x_T*.
pub fn replace(
    sd: &StableDiffusion,
    inversion: &Inversion,
    req: &ReplaceRequest,
    subject: Option<&Subject>,
) -> Result<Replaced> {
    let m = &inversion.meta;
    if m.guidance <= 1.0 {
        bail!("replacement needs --guidance > 1 (got {}): null-text inversion has no gradient otherwise", m.guidance);
    }
    for (name, f) in [("--cross-replace", req.cross_replace), ("--self-replace", req.self_replace)] {
        if !(0.0..=1.0).contains(&f) {
            bail!("{name} must be a fraction in [0, 1], got {f}");
        }
    }
    let swap = prepare_swap(sd, &m.caption, req, subject)?;
    let sched = sd.scheduler(m.steps)?;
    if sched.timesteps != inversion.nti.timesteps {
        bail!("the inversion's timesteps differ from this model's scheduler at {} steps", m.steps);
    }
    let max_len = sd.tokenizer.model_max_length();
    let n_subject = subject.map(|s| s.n_tokens()).unwrap_or(0) as usize;
    if inversion.nti.phi.iter().any(|p| p.pooled.is_some() != sd.is_xl()) {
        bail!(
            "the inversion's null-text embeddings {} pooled embeds, but {} is {}an SDXL model",
            if sd.is_xl() { "lack" } else { "carry" },
            sd.source.display(),
            if sd.is_xl() { "" } else { "not " }
        );
    }
    let size = (m.height, m.width);
    // The target's conditional branch per step: [c^g, c_s^t] or c^g.
    // (Their unconditional half is unused: φ*_t replaces it.)
    let empty = tch::no_grad(|| sd.encode_negative(None));
    let mut target_steps: Box<dyn StepConditioning + '_> = match subject {
        Some(s) => Box::new(SubjectSteps::new(sd, &swap.target_caption, s, &sched, &empty, 1)?.at_size(size.0, size.1)),
        None => {
            let c = tch::no_grad(|| sd.encode_text(&swap.target_caption));
            Box::new(crate::pipeline::Fixed(sd.step_cond(&c, &empty, size.0, size.1)))
        }
    };
    let alignment = align_tokens(max_len, swap.start, swap.n_source, swap.n_target);
    let mut exceptions: Vec<usize> = (swap.start..swap.start + swap.n_target).collect();
    exceptions.extend(max_len - n_subject..max_len);
    let n = sched.timesteps.len();
    let frac_steps = |f: f64| ((f * n as f64) + 1e-9).floor() as usize;
    let x_t = &inversion.nti.x_t;
    let (h, w) = (x_t.size()[2], x_t.size()[3]);
    let mut p2p = PromptToPrompt::new(
        &alignment,
        &exceptions,
        frac_steps(req.cross_replace),
        frac_steps(req.self_replace),
        h * w,
        sd.device,
    );
    let source_tokens: Vec<i64> = (swap.start..swap.start + swap.n_source).map(|p| p as i64).collect();
    let target_tokens: Vec<i64> = exceptions.iter().map(|&p| p as i64).collect();
    // The conditional rows are [source; target]: the source word's map is row 0 of the first,
    // [w_g, c_s]'s row 1 of the second.
    let mut source_map = CrossAttnAggregator::new(source_tokens, (h, w), true);
    let mut target_map = CrossAttnAggregator::new(target_tokens, (h, w), true);
    let latents = tch::no_grad(|| -> Result<Tensor> {
        let c_r = sd.encode_text(&swap.source_caption); // (1, 77, d)
        let bar = crate::progress::bar(n as u64, "replacing");
        let mut x = Tensor::cat(&[x_t, x_t], 0); // (2, C, h, w): [source; target]
        for (i, &t) in sched.timesteps.iter().enumerate() {
            let c_g = target_steps.at(i, t)?.cond_text(); // (1, 77, d)
            let phi = &inversion.nti.phi[i]; // (1, 77, d)
            let c = sd.step_cond(&TextCond::cat(&[&c_r, &c_g]), &TextCond::cat(&[phi, phi]), size.0, size.1);
            p2p.step = i;
            let mut chain = Chain(vec![&mut source_map, &mut target_map, &mut p2p]);
            let (eps_u, eps_c) = sd.eps_pair(&x, t, &c, Some(&mut chain));
            x = sched.step(&cfg(&eps_u, &eps_c, m.guidance), t, &x);
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(x)
    })?;
    let images = tch::no_grad(|| decoded_to_u8(&sd.decode(&latents))); // (2, H, W, 3)
    let maps = [(&source_map, 0), (&target_map, 1)]
        .into_iter()
        .filter_map(|(agg, row)| agg.normalised().map(|m| m.get(row)))
        .collect(); // each (h, w)
    Ok(Replaced {
        image: images.narrow(0, 1, 1),
        reconstruction: images.narrow(0, 0, 1),
        latents,
        maps,
        swap,
        edited_calls: p2p.edited,
    })
}
