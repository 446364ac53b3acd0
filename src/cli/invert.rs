use anyhow::{bail, Result};
use hifi_tuner::caption::{CaptionOptions, Captioner};
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
    /// c^r: a caption of the photo, e.g. "a photo of a cat on a bench" (or --captioner).
    #[arg(long, conflicts_with = "captioner")]
    pub caption: Option<String>,
    /// Caption the photo with this BLIP captioner instead of --caption (a transformers
    /// BlipForConditionalGeneration folder or a hub id such as
    /// Salesforce/blip-image-captioning-large; greedy decoding, float32). The caption is printed
    /// and stored in the inversion.
    #[arg(long)]
    pub captioner: Option<PathBuf>,
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
    /// c^r: `--caption`, or the photo captioned by `--captioner` (printed on stderr), with where
    /// it came from (`None`: typed).
    pub fn caption(&self, device: tch::Device) -> Result<(String, Option<String>)> {
        match (&self.caption, &self.captioner) {
            (Some(c), _) if c.trim().is_empty() => bail!("--caption is empty"),
            (Some(c), _) => Ok((c.clone(), None)),
            (None, Some(dir)) => {
                // the photo first: a bad one is refused by name before the captioner loads
                let img = hifi_tuner::io::open_image(&self.image)?;
                let captioner = Captioner::load(dir, device, tch::Kind::Float)?;
                let c = captioner.caption(&img, &CaptionOptions::default())?;
                if c.text.is_empty() {
                    bail!("BLIP ({}) gave {} an empty caption: give --caption", dir.display(), self.image.display());
                }
                eprintln!("caption (BLIP, {}): {:?}", dir.display(), c.text);
                Ok((c.text, Some(format!("blip {}", dir.display()))))
            }
            (None, None) => bail!("give the photo's caption with --caption, or a BLIP captioner with --captioner"),
        }
    }

    pub fn request(&self, caption: &str, caption_source: Option<String>) -> InvertRequest {
        InvertRequest {
            image: self.image.clone(),
            caption: caption.to_string(),
            caption_source,
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
    let device = super::parse_device(&a.inv.device)?;
    let (caption, source) = a.inv.caption(device)?;
    let sd = a.inv.model_options.load(&a.inv.model, device)?;
    let inv = invert(&sd, &a.inv.request(&caption, source))?;
    save_inverted(&a.out, &inv)?;
    eprintln!("inverted in {:.2}s, of which null-text optimisation {:.2}s", inv.seconds, inv.nti_seconds);
    println!("{}", a.out.display());
    Ok(())
}
