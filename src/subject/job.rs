//! The `learn` job: photos → cached VAE latents → [`learn`](super::learn) with checkpoints,
//! a JSONL log and a progress bar → the subject folder.
//!
//! The subject folder holds `subject.safetensors` (HiFi) or, for TI, `learned_embeds.safetensors`
//! (diffusers) and `a1111/NAME.safetensors` (AUTOMATIC1111 / ComfyUI `emb_params`),
//! `train_log.jsonl`, `checkpoint.safetensors`, and the resized photos and masks it learned
//! from (`photos/`, `masks/`), so it is self-contained.

use super::data::{latent_masks, load_photos, MaskFit};
use super::file::{a1111_file_name, save_a1111_embedding, save_learned_embeds, Subject, MANIFEST_FILE, SUBJECT_FILE};
use super::learn::{LearnArgs, Objective, State, StepReport, TrainSet};
use super::{conditioning, ti, Mode};
use crate::io::{image_to_u8, mask_to_u8, write_atomic, write_safetensors_atomic, RgbImage};
use crate::load::{read_safetensors_finite, safetensors_metadata};
use crate::pipeline::{LoadOptions, StableDiffusion};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Caption templates (from textual inversion's `imagenet_templates_small`); `{}` is the class
/// noun (HiFi) or the TI tokens.
pub const TEMPLATES: [&str; 6] = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
];

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const LOG_FILE: &str = "train_log.jsonl";
const CHECKPOINT_FORMAT: &str = "hifi-tuner-checkpoint/1";
const CHECKPOINT_WHAT: &str = "hifi-tuner checkpoint";
/// The checkpoint metadata key of [`input_hashes`].
pub const INPUTS_KEY: &str = "inputs";

/// A `learn` invocation.
#[derive(Debug, Clone)]
pub struct LearnJob {
    pub model: PathBuf,
    /// `--config` / `--variant` for `model`.
    pub load: LoadOptions,
    pub images: PathBuf,
    pub masks: Option<PathBuf>,
    pub out: PathBuf,
    pub args: LearnArgs,
    /// Checkpoint every this many steps (0 = never).
    pub checkpoint_every: usize,
    /// Write the loss curve, and in hifi mode a preview image, every this many steps (0 = never).
    pub preview_every: usize,
    pub resume: bool,
    pub device: Device,
}

/// The captions for a run: [`TEMPLATES`] filled with the class noun (hifi) or the n tokens (ti).
pub fn captions(mode: Mode, class_noun: &str, token: &str, n: i64) -> Vec<String> {
    captions_from(&TEMPLATES, mode, class_noun, token, n)
}

/// [`captions`] from other templates (`{}` = the subject).
pub fn captions_from<S: AsRef<str>>(templates: &[S], mode: Mode, class_noun: &str, token: &str, n: i64) -> Vec<String> {
    let fill = match mode {
        Mode::Hifi => class_noun.to_string(),
        Mode::Ti => ti::expanded_tokens(token, n).join(" "),
    };
    templates.iter().map(|t| t.as_ref().replace("{}", &fill)).collect()
}

/// Runs a `learn` job to the end; returns the path of the written subject or embedding file.
pub fn learn(job: &LearnJob) -> Result<PathBuf> {
    validate(job)?;
    let _lock = crate::outdir::lock_dir(&job.out, "--out")?;
    if job.out.join(MANIFEST_FILE).exists() {
        bail!("--out {} already holds another subject (a DreamBooth model); choose another --out", job.out.display());
    }
    let ckpt_path = checkpoint_path(&job.out, job.resume)?;
    let identity = identity(job)?;
    let mut sd = StableDiffusion::load_with(&job.model, &job.load, job.device)?;
    let photos = load_photos(&job.images, job.masks.as_deref(), sd.default_size() as u32, MaskFit::SameAspect)?;
    let inputs = input_hashes(&photos)?;
    let saved_steps = if job.resume {
        // before anything is written: the checkpoint must come from these arguments and inputs
        // (--steps may grow: "extend")
        let meta = checkpoint_metadata_extending(
            &ckpt_path,
            CHECKPOINT_FORMAT,
            CHECKPOINT_WHAT,
            &identity,
            Some(&inputs),
            true,
        )?;
        saved_steps(&ckpt_path, &meta)?
    } else {
        job.args.steps
    };
    let args = &job.args;
    let (ti_base, init_ti) = if args.mode == Mode::Ti { setup_ti(&mut sd, args)? } else { (0, None) };
    let caption_ids = caption_ids(&sd, args)?;
    let data = tch::no_grad(|| encode(&sd, &photos));
    // Everything that can be refused (the schedule, a checkpoint of another run) is checked
    // before the first file is written.
    let obj = Objective::new(&sd, args.clone(), data, caption_ids, ti_base)?;
    let mut state = if job.resume {
        let mut s = read_checkpoint(&ckpt_path, &identity, &inputs, args.lr, job.device)?;
        if args.steps > saved_steps {
            // extend: past phase 0, back to its end (the step-wise phases run again from c_s)
            super::learn::rewind_to_phase0(&mut s, saved_steps)
                .with_context(|| format!("cannot extend {}", ckpt_path.display()))?;
        }
        s
    } else {
        State::new(init_ti.as_ref().unwrap_or(&obj.phi_s), args.lr)
    };
    std::fs::create_dir_all(&job.out).with_context(|| format!("cannot create {}", job.out.display()))?;
    save_photos(&job.out, &photos)?;
    let log_path = job.out.join(LOG_FILE);
    let mut log = open_log(&log_path, obj.global_step(state.phase, state.step))?;
    let bar = crate::progress::bar(obj.total_steps() as u64, "learning");
    bar.set_position(obj.global_step(state.phase, state.step) as u64);
    let delay = step_delay();
    let started = Instant::now();
    let result = super::learn::run(&obj, &mut state, |state, r| {
        let g = obj.global_step(state.phase, state.step);
        write_log(&mut log, &obj, r, g - 1, started.elapsed().as_secs_f64())
            .with_context(|| format!("cannot write {}", log_path.display()))?;
        bar.set_position(g as u64);
        bar.set_message(format!("loss {:.4}", r.loss));
        if job.checkpoint_every > 0 && g % job.checkpoint_every == 0 {
            write_checkpoint(&ckpt_path, state, &identity, &inputs)?;
        }
        if job.preview_every > 0 && g % job.preview_every == 0 {
            write_preview(&sd, job, state, g)?;
        }
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        Ok(())
    });
    bar.finish_and_clear();
    if let Err(e) = result {
        return Err(stopped(e, &ckpt_path, "learning"));
    }
    write_checkpoint(&ckpt_path, &state, &identity, &inputs)?;
    write_result(job, &obj, &state)
}

/// `--preview-every`: the class prompt drawn at a fixed seed with the current c_s (φ during
/// phase 0, c_s after it; the step-wise c_s^t only in the final subject), and the loss curve.
/// Textual inversion's rows live in the text encoder's table, which the step does not write, so
/// its runs get the loss curve only.
fn write_preview(sd: &StableDiffusion, job: &LearnJob, state: &State, step: usize) -> Result<()> {
    use crate::progress::previews;
    previews::write_loss_svg(&job.out.join(LOG_FILE), &job.out)?;
    let args = &job.args;
    if args.mode != Mode::Hifi {
        return Ok(());
    }
    let c_s = if state.phase == 0 { &state.param } else { state.c_s.as_ref().unwrap_or(&state.param) };
    let subject = Subject {
        c_s: c_s.detach().to_device(Device::Cpu),
        stepwise: vec![],
        timesteps: vec![],
        space: args.space,
        class_noun: args.class_noun.clone(),
        captions: vec![],
        model: String::new(),
        ddim_steps: previews::STEPS,
    };
    let req = crate::pipeline::GenerateRequest::preview(format!("a photo of a {}", args.class_noun), sd.default_size());
    let images = tch::no_grad(|| conditioning::generate(sd, &req, Some(&subject)))?;
    previews::save(&job.out, step, &images.get(0), &req.prompt)
}

fn validate(job: &LearnJob) -> Result<()> {
    let a = &job.args;
    if a.n_tokens < 1 {
        bail!("--tokens must be at least 1");
    }
    if a.steps < 1 {
        bail!("--steps must be at least 1 (0 would write the initial embedding, unlearned)");
    }
    if a.ddim_steps < 1 {
        bail!("--ddim-steps must be at least 1");
    }
    if !(a.lr > 0.0 && a.lr.is_finite()) {
        bail!("--lr must be a positive number");
    }
    if a.batch_size < 1 {
        bail!("--batch-size must be at least 1");
    }
    if a.reg_weight < 0.0 || !a.reg_weight.is_finite() {
        bail!("--reg-weight must be ≥ 0");
    }
    if a.class_noun.trim().is_empty() {
        bail!("--class-noun must not be empty");
    }
    Ok(())
}

/// Adds the TI tokens; returns their first id and the initial rows (the class noun's mean
/// token embedding, repeated n times).
pub fn setup_ti(sd: &mut StableDiffusion, args: &LearnArgs) -> Result<(i64, Option<Tensor>)> {
    // The class noun's mean input embedding, per encoder (SDXL: both, side by side).
    let noun_rows = |tok: &crate::tokenizer::ClipTokenizer, te: &crate::models::clip_text::ClipTextModel| {
        let noun_ids: Vec<i64> = tok.encode(&args.class_noun);
        let inner = &noun_ids[1..noun_ids.len() - 1]; // without bos / eos
        if inner.is_empty() {
            bail!("--class-noun {:?} has no tokens", args.class_noun);
        }
        Ok(tch::no_grad(|| {
            let ids = Tensor::from_slice(inner).view([1, -1]).to_device(sd.device);
            te.token_embedding(&ids).squeeze_dim(0).mean_dim(0, true, Kind::Float)
            // (1, d)
        }))
    };
    let mut rows = noun_rows(&sd.tokenizer, &sd.text_encoder)?;
    if let Some(xl) = &sd.xl {
        rows = Tensor::cat(&[rows, noun_rows(&xl.tokenizer_2, &xl.text_encoder_2)?], 1);
        // (1, d₁ + d₂)
    }
    let names = ti::expanded_tokens(&args.token, args.n_tokens);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let base = sd.text_encoder.vocab_size();
    let ids = sd.tokenizer.add_tokens(&refs)?;
    if ids.first() != Some(&base) {
        bail!("the tokenizer's new ids {ids:?} do not follow the text encoder's vocabulary ({base})");
    }
    if let Some(xl) = &mut sd.xl {
        let base_2 = xl.text_encoder_2.vocab_size();
        let ids_2 = xl.tokenizer_2.add_tokens(&refs)?;
        if base_2 != base || ids_2 != ids {
            bail!(
                "SDXL's second tokenizer gives the new tokens ids {ids_2:?} (vocabulary {base_2}), the first {ids:?} \
                 ({base}); textual inversion here needs them equal"
            );
        }
    }
    Ok((base, Some(rows.repeat([args.n_tokens, 1]))))
}

/// The captions' ids (K, 77); HiFi captions must leave the last n positions as padding.
pub fn caption_ids(sd: &StableDiffusion, args: &LearnArgs) -> Result<Tensor> {
    let mut rows = Vec::new();
    for c in &args.captions {
        let enc = sd.tokenizer.encode_padded(c);
        let max = sd.tokenizer.model_max_length();
        if args.mode == Mode::Hifi {
            conditioning::check_room(enc.n_tokens, args.n_tokens, max as i64, c)?;
        } else if enc.truncated {
            bail!(
                "the caption {c:?} is {} tokens long with its {} subject tokens (--tokens), but CLIP holds {max} \
                 (with <bos> and <eos>): lower --tokens",
                sd.tokenizer.encode(c).len(),
                args.n_tokens
            );
        }
        rows.push(Tensor::from_slice(&enc.ids));
    }
    Ok(Tensor::stack(&rows, 0).to_device(sd.device))
}

/// VAE latents (mean of the posterior × scaling factor, encoded once) and latent masks.
pub fn encode(sd: &StableDiffusion, photos: &[super::data::Photo]) -> TrainSet {
    let latents = sd.vae.encode(&photo_batch(sd, photos)).mean * sd.vae.scaling_factor(); // (N, C, h, w)
    let (h, w) = (latents.size()[2], latents.size()[3]);
    TrainSet { latents, masks: photo_masks(photos, h, w, sd.device) }
}

/// The photos as one batch (N, 3, S, S) in [-1, 1] on the model's device.
pub fn photo_batch(sd: &StableDiffusion, photos: &[super::data::Photo]) -> Tensor {
    let imgs: Vec<Tensor> = photos.iter().map(|p| p.image.shallow_clone()).collect();
    Tensor::stack(&imgs, 0).to_device(sd.device)
}

/// The photos' masks at latent size (N, 1, h, w) on `device`; `None` unless every photo has one.
pub fn photo_masks(photos: &[super::data::Photo], h: i64, w: i64, device: Device) -> Option<Tensor> {
    let m: Option<Vec<Tensor>> = photos.iter().map(|p| p.mask.as_ref().map(|m| m.shallow_clone())).collect();
    m.map(|m| latent_masks(&Tensor::stack(&m, 0), h, w).to_device(device))
}

/// Keeps the resized photos and masks next to the result.
pub(crate) fn save_photos(out: &Path, photos: &[super::data::Photo]) -> Result<()> {
    for p in photos {
        let stem = p.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        RgbImage::from_hwc_u8(&image_to_u8(&p.image))?
            .save_png(&out.join("photos").join(format!("{stem}.png")), &[])?;
        if let Some(m) = &p.mask {
            RgbImage::from_hwc_u8(&mask_to_u8(&m.squeeze_dim(0)))?
                .save_png(&out.join("masks").join(format!("{stem}.png")), &[])?;
        }
    }
    Ok(())
}

/// What a checkpoint must agree with to be resumed: the arguments and the inputs' paths.
fn identity(job: &LearnJob) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(&job.args)?;
    let o = v.as_object_mut().context("args")?;
    o.insert("model".into(), job.model.display().to_string().into());
    o.insert("images".into(), job.images.display().to_string().into());
    o.insert("masks".into(), job.masks.as_ref().map(|m| m.display().to_string()).into());
    Ok(v)
}

fn write_checkpoint(path: &Path, s: &State, identity: &serde_json::Value, inputs: &serde_json::Value) -> Result<()> {
    let mut t = vec![
        ("param".to_string(), s.param.detach()),
        ("adam.m".into(), s.adam.m.shallow_clone()),
        ("adam.v".into(), s.adam.v.shallow_clone()),
    ];
    if let Some(c) = &s.c_s {
        t.push(("c_s".into(), c.shallow_clone()));
    }
    if let Some(a) = &s.adam0 {
        t.push(("adam0.m".into(), a.m.shallow_clone()));
        t.push(("adam0.v".into(), a.v.shallow_clone()));
    }
    if !s.stepwise.is_empty() {
        t.push(("c_s_t".into(), Tensor::stack(&s.stepwise, 0)));
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".into(), CHECKPOINT_FORMAT.into());
    meta.insert("phase".into(), s.phase.to_string());
    meta.insert("step".into(), s.step.to_string());
    meta.insert("adam.step".into(), s.adam.step.to_string());
    if let Some(a) = &s.adam0 {
        meta.insert("adam0.step".into(), a.step.to_string());
    }
    meta.insert("args".into(), serde_json::to_string(identity)?);
    meta.insert(INPUTS_KEY.into(), serde_json::to_string(inputs)?);
    write_safetensors_atomic(path, &t, &meta)
}

fn read_checkpoint(
    path: &Path,
    identity: &serde_json::Value,
    inputs: &serde_json::Value,
    lr: f64,
    device: Device,
) -> Result<State> {
    let meta = checkpoint_metadata_extending(path, CHECKPOINT_FORMAT, CHECKPOINT_WHAT, identity, Some(inputs), true)?;
    let t: BTreeMap<String, Tensor> =
        read_safetensors_finite(path)?.into_iter().map(|(k, v)| (k, v.to_device(device))).collect();
    let get = |k: &str| t.get(k).map(|x| x.shallow_clone()).with_context(|| format!("{}: no {k}", path.display()));
    let num =
        |k: &str| -> Result<i64> { Ok(meta.get(k).with_context(|| format!("{}: no {k}", path.display()))?.parse()?) };
    let param = get("param")?;
    let mut adam = super::adam::Adam::new(&param, lr);
    adam.m = get("adam.m")?;
    adam.v = get("adam.v")?;
    adam.step = num("adam.step")?;
    let adam0 = match (t.get("adam0.m"), t.get("adam0.v")) {
        (Some(m), Some(v)) => {
            let c_s = get("c_s")?;
            let mut a = super::adam::Adam::new(&c_s, lr);
            a.m = m.shallow_clone();
            a.v = v.shallow_clone();
            a.step = num("adam0.step")?;
            Some(a)
        }
        _ => None,
    };
    let stepwise = match t.get("c_s_t") {
        Some(s) => (0..s.size()[0]).map(|i| s.get(i)).collect(),
        None => vec![],
    };
    Ok(State {
        phase: num("phase")? as usize,
        step: num("step")? as usize,
        param,
        adam,
        c_s: t.get("c_s").map(|c| c.shallow_clone()),
        adam0,
        stepwise,
    })
}

/// Opens the log for appending, keeping only entries before `from_step` (a resumed run
/// rewrites what the interrupted run logged after its checkpoint).
pub(crate) fn open_log(path: &Path, from_step: usize) -> Result<std::fs::File> {
    let kept: Vec<String> = match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("global_step").and_then(|g| g.as_u64()))
                    .is_some_and(|g| (g as usize) < from_step)
            })
            .map(str::to_string)
            .collect(),
        Err(_) => vec![],
    };
    write_atomic(path, |f| {
        for l in &kept {
            writeln!(f, "{l}")?;
        }
        Ok(())
    })?;
    std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("cannot open {}", path.display()))
}

fn write_log(f: &mut std::fs::File, obj: &Objective, r: &StepReport, global: usize, seconds: f64) -> Result<()> {
    let line = serde_json::json!({
        "global_step": global, "phase": r.phase, "step": r.step, "loss": r.loss,
        "loss_denoise": r.denoise, "loss_reg": r.reg, "lr": obj.args.lr, "seconds": seconds,
    });
    writeln!(f, "{line}")?;
    Ok(())
}

fn write_result(job: &LearnJob, obj: &Objective, state: &State) -> Result<PathBuf> {
    let args = &job.args;
    match args.mode {
        Mode::Ti => {
            let path = job.out.join(super::file::LEARNED_EMBEDS_FILE);
            let a1111 = job.out.join("a1111").join(a1111_file_name(&args.token));
            crate::io::create_dir_all(&job.out.join("a1111"))?;
            match &obj.sd.xl {
                None => {
                    save_learned_embeds(&path, &args.token, &state.param)?;
                    // The same vectors for AUTOMATIC1111 / ComfyUI: copy this file into their embeddings folder.
                    save_a1111_embedding(&a1111, &args.token, &state.param)?;
                }
                Some(_) => {
                    // SDXL, as textual_inversion_sdxl.py writes it (one file per encoder) and as
                    // A1111 / ComfyUI read it ({"clip_l", "clip_g"}).
                    let d1 = obj.sd.text_encoder.hidden_size();
                    let d = state.param.size()[1];
                    let (l, g) = (state.param.narrow(1, 0, d1), state.param.narrow(1, d1, d - d1));
                    save_learned_embeds(&path, &args.token, &l)?;
                    save_learned_embeds(&job.out.join(super::file::LEARNED_EMBEDS_2_FILE), &args.token, &g)?;
                    super::file::save_a1111_embedding_xl(&a1111, &args.token, &l, &g)?;
                }
            }
            Ok(path)
        }
        Mode::Hifi => {
            let c_s = state.c_s.as_ref().context("phase 0 did not finish")?;
            let subject = Subject {
                c_s: c_s.to_device(Device::Cpu),
                stepwise: state.stepwise.iter().map(|t| t.to_device(Device::Cpu)).collect(),
                timesteps: if state.stepwise.is_empty() { vec![] } else { obj.sched.timesteps.clone() },
                space: args.space,
                class_noun: args.class_noun.clone(),
                captions: args.captions.clone(),
                model: job.model.display().to_string(),
                ddim_steps: args.ddim_steps,
            };
            let path = job.out.join(SUBJECT_FILE);
            subject.save(&path)?;
            Ok(path)
        }
    }
}

/// The checkpoint of a run in `out`: refused when one is there without `--resume` (another
/// run's), or missing with it.
pub(crate) fn checkpoint_path(out: &Path, resume: bool) -> Result<PathBuf> {
    let path = out.join(CHECKPOINT_FILE);
    if !resume && path.exists() {
        bail!(
            "{} already holds a run ({CHECKPOINT_FILE}); pass --resume to continue it or choose another --out",
            out.display()
        );
    }
    if resume && !path.exists() {
        bail!("--resume: no {CHECKPOINT_FILE} in {}", out.display());
    }
    Ok(path)
}

/// `HIFI_TUNER_STEP_DELAY_MS`: a pause after each training step, so that tests can kill a run
/// mid-way.
pub(crate) fn step_delay() -> Option<std::time::Duration> {
    let ms = std::env::var("HIFI_TUNER_STEP_DELAY_MS").ok()?.parse::<u64>().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// The `--steps` a checkpoint was made with (its saved arguments).
fn saved_steps(path: &Path, meta: &HashMap<String, String>) -> Result<usize> {
    let args: serde_json::Value = serde_json::from_str(meta.get("args").map(String::as_str).unwrap_or("null"))?;
    args.get("steps")
        .and_then(serde_json::Value::as_u64)
        .map(|s| s as usize)
        .with_context(|| format!("{}: no steps in its arguments", path.display()))
}

/// A training loop's error, saying what became of its checkpoint (`what` = "learning", …).
pub fn stopped(e: anyhow::Error, ckpt_path: &Path, what: &str) -> anyhow::Error {
    let kept = if ckpt_path.exists() {
        format!("the last good checkpoint {} is kept", ckpt_path.display())
    } else {
        "no checkpoint was written yet".into()
    };
    e.context(format!("{what} stopped; {kept}"))
}

/// A checkpoint's metadata, after checking its format, that it was made with the same
/// arguments (`identity`; a mismatch names each changed argument) and, for runs that read
/// photos, from the same photos and masks (`inputs`, [`input_hashes`]; a mismatch names the
/// file).
pub fn checkpoint_metadata(
    path: &Path,
    format: &str,
    what: &str,
    identity: &serde_json::Value,
    inputs: Option<&serde_json::Value>,
) -> Result<HashMap<String, String>> {
    checkpoint_metadata_extending(path, format, what, identity, inputs, false)
}

/// [`checkpoint_metadata`]; with `steps_may_grow`, `identity`'s `steps` may exceed the saved
/// one ("extend by N steps": the schedule is constant, so a run continued to more steps is the
/// longer run); fewer steps is still refused.
pub fn checkpoint_metadata_extending(
    path: &Path,
    format: &str,
    what: &str,
    identity: &serde_json::Value,
    inputs: Option<&serde_json::Value>,
    steps_may_grow: bool,
) -> Result<HashMap<String, String>> {
    let meta = safetensors_metadata(path)?;
    if meta.get("format").map(String::as_str) != Some(format) {
        bail!("{} is not a {what}", path.display());
    }
    let mut saved: serde_json::Value = serde_json::from_str(meta.get("args").map(String::as_str).unwrap_or("null"))?;
    if steps_may_grow {
        let steps = |v: &serde_json::Value| v.get("steps").and_then(serde_json::Value::as_u64);
        if let (Some(old), Some(new)) = (steps(&saved), steps(identity)) {
            if new < old {
                bail!("--resume with --steps {new}: {} was made for {old} steps; --steps can grow on --resume (extend), not shrink", path.display());
            }
            saved["steps"] = new.into();
        }
    }
    if &saved != identity {
        bail!(
            "--resume with changed arguments ({}); {} was made with other settings",
            crate::outdir::changed_settings(&saved, identity).join(", "),
            path.display()
        );
    }
    match (inputs, meta.get(INPUTS_KEY)) {
        (None, _) => {}
        (Some(inputs), Some(text)) => check_inputs(path, &serde_json::from_str(text)?, inputs)?,
        (Some(_), None) => eprintln!(
            "warning: {} records no hashes of its photos (an older version wrote it): cannot check that they are unchanged",
            path.display()
        ),
    }
    Ok(meta)
}

/// The SHA-256 of each photo and mask a run learns from, by path:
/// `{"photos": {PATH: HEX}, "masks": {PATH: HEX}}`. Stored in the checkpoints, so that
/// `--resume` refuses inputs changed since (a resumed run would mix the old and the new).
pub fn input_hashes(photos: &[super::data::Photo]) -> Result<serde_json::Value> {
    let mut p = serde_json::Map::new();
    let mut m = serde_json::Map::new();
    for photo in photos {
        p.insert(photo.path.display().to_string(), crate::io::file_sha256(&photo.path)?.into());
        if let Some(mp) = &photo.mask_path {
            m.insert(mp.display().to_string(), crate::io::file_sha256(mp)?.into());
        }
    }
    Ok(serde_json::json!({"photos": p, "masks": m}))
}

/// The first 12 hex digits of a hash, for messages.
fn short_hash(h: &serde_json::Value) -> String {
    h.as_str().unwrap_or("?").chars().take(12).collect::<String>() + "…"
}

/// Refuses inputs that differ from those the checkpoint `path` recorded, naming the first file.
fn check_inputs(path: &Path, saved: &serde_json::Value, now: &serde_json::Value) -> Result<()> {
    for (kind, one) in [("photos", "photo"), ("masks", "mask")] {
        let empty = serde_json::Map::new();
        let (was, is) = (saved[kind].as_object().unwrap_or(&empty), now[kind].as_object().unwrap_or(&empty));
        let fix = "restore it, or start a new run (without --resume, in another --out)";
        for (file, hash) in is {
            match was.get(file) {
                Some(h) if h == hash => {}
                Some(h) => bail!(
                    "--resume: the {one} {file} changed since {} was written (SHA-256 {} then, {} now); a resumed run \
                     would mix the two: {fix}",
                    path.display(),
                    short_hash(h),
                    short_hash(hash),
                ),
                None => bail!(
                    "--resume: the {one} {file} is new: {} was made without it; remove it, or start a new run \
                     (without --resume, in another --out)",
                    path.display()
                ),
            }
        }
        if let Some(file) = was.keys().find(|f| !is.contains_key(*f)) {
            bail!("--resume: the {one} {file} that {} was made from is gone; {fix}", path.display());
        }
    }
    Ok(())
}
