use anyhow::{bail, Context, Result};
use hifi_tuner::io::RgbImage;
use hifi_tuner::pipeline::{GenerateRequest, StableDiffusion};
use hifi_tuner::subject::file::Subject;
use hifi_tuner::subject::ti;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A diffusers Stable Diffusion 1.x folder.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// DDIM steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale w.
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Default: the UNet's sample_size × the VAE factor.
    #[arg(long)]
    height: Option<i64>,
    #[arg(long)]
    width: Option<i64>,
    #[arg(long, default_value_t = 1)]
    num_images: i64,
    /// A .png file, or a folder (images are named SEED-INDEX.png).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    /// A learned subject (the folder from `learn` or its subject.safetensors): each step uses
    /// [c, c_s^t] (Eq. 7). The prompt describes the scene, e.g. "a teapot in the snow".
    #[arg(long)]
    subject: Option<PathBuf>,
    /// A textual-inversion file ({token: (n, d)}), as diffusers' load_textual_inversion reads.
    /// May be given several times.
    #[arg(long)]
    embedding: Vec<PathBuf>,
    /// Override the token of a single --embedding.
    #[arg(long)]
    token: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let device = super::parse_device(&a.device)?;
    let started = Instant::now();
    let mut sd = StableDiffusion::load(&a.model, device)?;
    if a.token.is_some() && a.embedding.len() != 1 {
        bail!("--token goes with exactly one --embedding");
    }
    let mut loaded = Vec::new();
    for e in &a.embedding {
        loaded.push(ti::load_embedding(&mut sd, e, a.token.as_deref())?);
    }
    let subject = a.subject.as_deref().map(Subject::load).transpose()?;
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
    let images = sd.generate_with(&req, subject.as_ref())?;
    let mut params = parameters_text(&a.prompt, &req, &a.model);
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
        .context("model name")
        .unwrap_or_else(|_| model.display().to_string());
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
