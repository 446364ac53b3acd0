use anyhow::{bail, Context, Result};
use hifi_tuner::io::RgbImage;
use hifi_tuner::pipeline::{GenerateRequest, StableDiffusion};
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
}

pub fn run(a: Args) -> Result<()> {
    let device = super::parse_device(&a.device)?;
    let started = Instant::now();
    let sd = StableDiffusion::load(&a.model, device)?;
    let size = sd.default_size();
    let req = GenerateRequest {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        seed: a.seed,
        steps: a.steps,
        guidance: a.guidance,
        height: a.height.unwrap_or(size),
        width: a.width.unwrap_or(size),
        num_images: a.num_images,
    };
    let outs = output_paths(&a.out, a.seed, a.num_images)?;
    let images = sd.generate(&req)?;
    let params = parameters_text(&req, &a.model);
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
fn parameters_text(req: &GenerateRequest, model: &Path) -> String {
    let model_name = model
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .context("model name")
        .unwrap_or_else(|_| model.display().to_string());
    format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: DDIM, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        req.prompt,
        req.negative_prompt.as_deref().unwrap_or(""),
        req.steps,
        req.guidance,
        req.seed,
        req.width,
        req.height,
        model_name
    )
}
