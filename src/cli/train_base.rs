use anyhow::Result;
use hifi_tuner::world::train::{train_base, TrainBaseArgs, TrainBaseJob};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model folder to create (diffusers layout), or to continue with --resume.
    #[arg(long)]
    out: PathBuf,
    /// The world's seed (training images).
    #[arg(long, default_value_t = 0)]
    world_seed: u64,
    /// Initialisation and batch draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training images, rendered once.
    #[arg(long, default_value_t = 16384)]
    images: usize,
    #[arg(long, default_value_t = 2000)]
    vae_steps: usize,
    #[arg(long, default_value_t = 16)]
    vae_batch: usize,
    #[arg(long, default_value_t = 7000)]
    unet_steps: usize,
    #[arg(long, default_value_t = 32)]
    unet_batch: usize,
    #[arg(long, default_value_t = 5e-4, value_parser = super::args::positive)]
    unet_lr: f64,
    /// Probability that a UNet training caption omits its colour ("a ball on the beach").
    #[arg(long, default_value_t = 0.3, value_parser = super::args::fraction)]
    colour_dropout: f64,
    /// Steps of the UNet's linear learning-rate warm-up.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Checkpoint (weights + AdamW moments) every this many steps of each phase (0 = never).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: usize,
    /// Continue the run in --out from its checkpoint (bit-identical to an unbroken run).
    #[arg(long)]
    resume: bool,
    /// Store the final weights as float16 (they load into float32 all the same).
    #[arg(long)]
    fp16: bool,
    /// The UNet preset's config.json to use instead (tests: smaller shapes).
    #[arg(long)]
    unet_config: Option<PathBuf>,
    /// The VAE's config.json to use instead.
    #[arg(long)]
    vae_config: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    let mut args = TrainBaseArgs::world_default();
    args.world_seed = a.world_seed;
    args.seed = a.seed;
    args.images = a.images;
    args.vae_steps = a.vae_steps;
    args.vae_batch = a.vae_batch;
    args.unet_steps = a.unet_steps;
    args.unet_batch = a.unet_batch;
    args.unet_lr = a.unet_lr;
    args.warmup = a.warmup;
    args.colour_dropout = a.colour_dropout;
    if let Some(p) = &a.unet_config {
        args.unet_config = hifi_tuner::load::read_json(p)?;
    }
    if let Some(p) = &a.vae_config {
        args.vae_config = hifi_tuner::load::read_json(p)?;
    }
    let job = TrainBaseJob {
        out: a.out,
        args,
        checkpoint_every: a.checkpoint_every,
        resume: a.resume,
        fp16: a.fp16,
        device: super::parse_device(&a.device)?,
    };
    let out = train_base(&job)?;
    println!("{}", out.display());
    Ok(())
}
