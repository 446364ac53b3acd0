use anyhow::Result;
use hifi_tuner::eval::metrics::{image_files, open_images, prompts_for, read_prompts, Evaluator};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A transformers CLIPModel folder (e.g. openai/clip-vit-base-patch32).
    #[arg(long)]
    clip: PathBuf,
    /// A transformers ViTModel folder (e.g. facebook/dino-vits16).
    #[arg(long)]
    dino: PathBuf,
    /// Folder of the subject's real photos.
    #[arg(long)]
    real: PathBuf,
    /// Folder of generated images (their prompts are read from the PNG `parameters` chunk).
    #[arg(long)]
    generated: PathBuf,
    /// JSON lines {"image": file name, "prompt": text}; overrides the PNG chunks.
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    let device = super::parse_device(&a.device)?;
    let real_paths = image_files(&a.real)?;
    let gen_paths = image_files(&a.generated)?;
    let lines = a.prompts.as_deref().map(read_prompts).transpose()?;
    let prompts = prompts_for(&gen_paths, lines.as_deref(), a.prompts.as_deref())?;
    let (real, generated) = (open_images(&real_paths)?, open_images(&gen_paths)?);
    let ev = Evaluator::load(&a.clip, &a.dino, device)?;
    let s = ev.score(&real, &generated, &prompts)?;
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}
