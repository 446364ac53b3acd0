use anyhow::{bail, Result};
use hifi_tuner::dreambooth::job::Manifest;
use hifi_tuner::guidance::job::{generate_guided, GuidedSubject, ReferenceOptions};
use hifi_tuner::guidance::reference::GuidanceConfig;
use hifi_tuner::io::RgbImage;
use hifi_tuner::pipeline::GenerateRequest;
use hifi_tuner::subject::file::{resolve, Subject};
use hifi_tuner::subject::ti;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A diffusers Stable Diffusion 1.x folder, a single-file .safetensors checkpoint, or a Hugging
    /// Face id org/name[@revision]. Not needed with a DreamBooth --subject (its OUT/model is used).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    model_options: super::ModelOptions,
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// DDIM steps.
    #[arg(long, default_value_t = 50, value_parser = super::args::ddim_steps)]
    steps: usize,
    /// Classifier-free guidance scale w.
    #[arg(long, default_value_t = 7.5, value_parser = super::args::guidance)]
    guidance: f64,
    /// Default: the UNet's sample_size × the VAE factor (at most 2048).
    #[arg(long, value_parser = super::args::image_side)]
    height: Option<i64>,
    #[arg(long, value_parser = super::args::image_side)]
    width: Option<i64>,
    /// Images of this run (at most 64), denoised as one batch.
    #[arg(long, default_value_t = 1, value_parser = super::args::num_images)]
    num_images: i64,
    /// A .png file, or a folder (images are named SEED-INDEX.png).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    /// A learned subject (the folder from `learn` or its subject.safetensors): each step uses
    /// [c, c_s^t] (Eq. 7). The prompt describes the scene, e.g. "a teapot in the snow". A
    /// DreamBooth subject folder instead supplies its fine-tuned model (OUT/model); its prompt
    /// carries the token, e.g. "a sks dog on the beach".
    #[arg(long)]
    subject: Option<PathBuf>,
    /// A textual-inversion file ({token: (n, d)}), as diffusers' load_textual_inversion reads.
    /// May be given several times.
    #[arg(long)]
    embedding: Vec<PathBuf>,
    /// Override the token of a single --embedding.
    #[arg(long)]
    token: Option<String>,
    /// Reference-guided generation (paper §3.3, Algorithms 2 and 4); needs --subject.
    #[arg(long)]
    reference_guidance: bool,
    #[command(flatten)]
    reference: super::ReferenceGuidanceArgs,
    /// DINO ViT folder (Hugging Face ViTModel layout) to choose the reference photo.
    #[arg(long)]
    dino: Option<PathBuf>,
    /// The caption c_r used to invert the reference (default "a photo of a CLASS").
    #[arg(long)]
    reference_caption: Option<String>,
    /// Reference photos (default: the subject folder's photos/).
    #[arg(long)]
    references: Option<PathBuf>,
    /// With --reference-guidance: a transformers SamModel folder; M_g becomes SAM's mask of I_g1,
    /// prompted by I_g1's own attention (default: the thresholded attention map).
    #[arg(long, requires = "reference_guidance")]
    sam: Option<PathBuf>,
    /// Reference masks (default: the subject folder's masks/).
    #[arg(long)]
    reference_masks: Option<PathBuf>,
    /// Also write I_g1, M_g, the reference, T_θ*(I_r), M_r* and a strip next to the output.
    #[arg(long)]
    save_intermediates: bool,
    /// With --reference-guidance: the least contrast of the subject's attention over I_g1 for M_g
    /// to be used (as `mask --min-contrast`; default 1.32); below it guidance falls back to the
    /// plain image with a warning.
    #[arg(long, requires = "reference_guidance", value_parser = super::args::non_negative)]
    min_contrast: Option<f64>,
}

pub fn run(mut a: Args) -> Result<()> {
    let device = super::parse_device(&a.device)?;
    let started = Instant::now();
    if let Some(s) = &a.subject {
        super::args::check_subject_arg(s)?;
    }
    a.embedding = a.embedding.iter().map(|e| super::args::embedding_file(e)).collect::<Result<_>>()?;
    let dreambooth = match a.subject.as_deref().filter(|s| s.is_dir()) {
        Some(dir) => Manifest::read(dir)?.map(|m| (dir.to_path_buf(), m)),
        None => None,
    };
    let model = match (&dreambooth, &a.model) {
        (Some((dir, m)), given) => {
            if let Some(g) = given {
                eprintln!(
                    "note: {} is a DreamBooth subject: its fine-tuned model (from {}) is used, not {}",
                    dir.display(),
                    m.model,
                    g.display()
                );
            }
            if !a.embedding.is_empty() {
                bail!("--embedding does not combine with a DreamBooth --subject");
            }
            if !a.prompt.split(|c: char| !c.is_alphanumeric()).any(|w| w == m.token) {
                eprintln!(
                    "warning: the prompt does not contain the subject's token {:?} (e.g. \"a {} {} on the beach\")",
                    m.token, m.token, m.class_noun
                );
            }
            let (model, loras) = m.model_and_loras(dir);
            a.model_options.lora.extend(loras);
            model
        }
        (None, Some(g)) => g.clone(),
        (None, None) => bail!("--model is required (except with a DreamBooth --subject, which brings its own)"),
    };
    if let Some((dir, m)) = &dreambooth {
        let done = m.finished_file(dir);
        if !done.is_file() {
            bail!("{} is missing (was the training interrupted? continue it with learn --resume)", done.display());
        }
    }
    let mut sd = a.model_options.load(&model, device)?;
    if a.token.is_some() && a.embedding.len() != 1 {
        bail!("--token goes with exactly one --embedding");
    }
    let mut loaded = Vec::new();
    for e in &a.embedding {
        loaded.push(ti::load_embedding(&mut sd, e, a.token.as_deref())?);
    }
    let subject = match (&dreambooth, a.subject.as_deref()) {
        (None, Some(p)) => Some(Subject::load(p)?),
        _ => None,
    };
    if let Some(s) = &subject {
        let same = |p: &str| Path::new(p).canonicalize().ok() == model.canonicalize().ok();
        if !same(&s.model) {
            eprintln!("warning: the subject was learned with the model {}, not {}", s.model, model.display());
        }
    }
    let (dh, dw) = sd.default_hw();
    let req = GenerateRequest {
        prompt: ti::convert_prompt(&sd, &a.prompt, &loaded),
        negative_prompt: a.negative_prompt.as_deref().map(|n| ti::convert_prompt(&sd, n, &loaded)),
        seed: a.seed,
        steps: a.steps,
        guidance: a.guidance,
        height: a.height.unwrap_or(dh),
        width: a.width.unwrap_or(dw),
        num_images: a.num_images,
    };
    let outs = output_paths(&a.out, a.seed, a.num_images)?;
    let images = if a.reference_guidance {
        let Some(dir) = a.subject.as_deref() else {
            bail!("--reference-guidance needs --subject");
        };
        let (guided, subject_dir) = match (&dreambooth, subject.as_ref()) {
            (Some((d, m)), _) => {
                (GuidedSubject::FineTuned { token: m.token.clone(), class_noun: m.class_noun.clone() }, d.clone())
            }
            (None, Some(s)) => {
                (GuidedSubject::Embedding(s), resolve(dir).parent().map(Path::to_path_buf).unwrap_or_default())
            }
            (None, None) => bail!("--reference-guidance needs --subject"),
        };
        let opt = ReferenceOptions {
            guidance: GuidanceConfig {
                t_start: a.reference.t_start,
                t_end: a.reference.t_end,
                steps: a.reference.guidance_steps,
                lr: a.reference.guidance_lr,
                substitute: true,
            },
            dino: a.dino.clone(),
            reference_caption: a.reference_caption.clone(),
            references: a.references.clone(),
            reference_masks: a.reference_masks.clone(),
            sam: a.sam.clone(),
            intermediates: a.save_intermediates.then(|| intermediates_dir(&outs[0])),
            min_contrast: a.min_contrast.unwrap_or(hifi_tuner::guidance::daam::MIN_CONTRAST),
        };
        let g = generate_guided(&sd, &req, &guided, &subject_dir, &opt)?;
        if g.fallback.is_none() {
            eprintln!(
                "reference guidance: {:.2}s, of which φ_h optimisation {:.2}s (subject attention contrast {:.2})",
                g.seconds, g.report.phi_h_seconds, g.contrast
            );
        }
        g.image
    } else {
        hifi_tuner::subject::conditioning::generate(&sd, &req, subject.as_ref())?
    };
    let mut params = parameters_text(&a.prompt, &req, &model);
    if let Some(s) = &a.subject {
        params.push_str(&format!(", Subject: {}", s.display()));
    }
    for e in &a.embedding {
        params.push_str(&format!(", Embedding: {}", e.display()));
    }
    for (i, path) in outs.iter().enumerate() {
        let img = RgbImage::from_hwc_u8(&images.get(i as i64))?;
        img.save_png(path, &[("parameters", &params)])?;
        println!("{}", path.display());
    }
    eprintln!("generated {} image(s) in {:.2}s", outs.len(), started.elapsed().as_secs_f64());
    Ok(())
}

/// `OUT-intermediates/` next to the first output image.
fn intermediates_dir(out: &Path) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!("{stem}-intermediates"))
}

/// FILE.png for one image; FILE-INDEX.png for several; DIR/SEED-INDEX.png for a folder.
fn output_paths(out: &Path, seed: u64, n: i64) -> Result<Vec<PathBuf>> {
    let is_png = out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png && out.exists() && !out.is_dir() {
        bail!("--out {} exists and is neither a folder nor a .png file", out.display());
    }
    Ok((0..n)
        .map(|i| {
            if !is_png {
                out.join(format!("{seed}-{i}.png"))
            } else if n == 1 {
                out.to_path_buf()
            } else {
                let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                out.with_file_name(format!("{stem}-{i}.png"))
            }
        })
        .collect())
}

/// The PNG `parameters` text chunk, in AUTOMATIC1111's layout.
fn parameters_text(prompt: &str, req: &GenerateRequest, model: &Path) -> String {
    let model_name = model
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| model.display().to_string());
    format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: DDIM, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        prompt,
        req.negative_prompt.as_deref().unwrap_or(""),
        req.steps,
        req.guidance,
        req.seed,
        req.width,
        req.height,
        model_name
    )
}
