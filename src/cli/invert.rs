use anyhow::Result;
use hifi_tuner::replace::job::{invert, save_inverted, InvertRequest};
use hifi_tuner::replace::nti::NtiConfig;
use std::path::PathBuf;

/// What `invert` and `replace` share: the model, the photo, its caption and the NTI settings.
#[derive(clap::Args, Debug, Clone)]
pub struct InversionArgs {
    /// A diffusers Stable Diffusion 1.x folder, a single-file checkpoint or a Hugging Face id.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub model_options: super::ModelOptions,
    /// The photo (resized to cover --height × --width and centre-cropped).
    #[arg(long)]
    pub image: PathBuf,
    /// c^r: a caption of the photo, e.g. "a photo of a cat on a bench".
    #[arg(long)]
    pub caption: String,
    /// DDIM steps T.
    #[arg(long, default_value_t = 50, value_parser = super::args::ddim_steps)]
    pub steps: usize,
    /// w: the guidance scale the edit is generated with (NTI optimises φ_t for it; must be > 1).
    #[arg(long, default_value_t = 7.5, value_parser = super::args::guidance)]
    pub guidance: f64,
    /// K: Adam steps on φ_t per DDIM step (0 = plain DDIM inversion, the baseline).
    #[arg(long, default_value_t = 10)]
    pub inner_steps: usize,
    /// Default: the UNet's sample_size × the VAE factor.
    #[arg(long, value_parser = super::args::image_side)]
    pub height: Option<i64>,
    #[arg(long, value_parser = super::args::image_side)]
    pub width: Option<i64>,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl InversionArgs {
    pub fn request(&self) -> InvertRequest {
        InvertRequest {
            image: self.image.clone(),
            caption: self.caption.clone(),
            steps: self.steps,
            height: self.height,
            width: self.width,
            nti: NtiConfig { guidance: self.guidance, inner_steps: self.inner_steps, ..NtiConfig::default() },
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub inv: InversionArgs,
    /// Output folder: inversion.safetensors, source.png, reconstruction.png, inversion_log.jsonl.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let sd = a.inv.model_options.load(&a.inv.model, super::parse_device(&a.inv.device)?)?;
    let inv = invert(&sd, &a.inv.request())?;
    save_inverted(&a.out, &inv)?;
    eprintln!("inverted in {:.2}s, of which null-text optimisation {:.2}s", inv.seconds, inv.nti_seconds);
    println!("{}", a.out.display());
    Ok(())
}
