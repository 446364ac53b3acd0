use anyhow::Result;
use hifi_tuner::world::encoders::{train_encoder, EncoderArgs, EncoderJob, EncoderKind};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// dino (a transformers ViTModel, instance contrastive) or clip (a CLIPModel, image–caption
    /// contrastive).
    #[arg(long)]
    kind: EncoderKind,
    /// The model folder to create, or to continue with --resume.
    #[arg(long)]
    out: PathBuf,
    /// Training steps (default: the shipped encoders').
    #[arg(long, value_parser = super::args::at_least_one)]
    steps: Option<usize>,
    /// Instances (dino: two views each; default 64) or image–caption pairs (clip; default 96)
    /// per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Peak learning rate (AdamW; linear warm-up, cosine decay to a tenth; default 1e-3).
    #[arg(long, value_parser = super::args::positive)]
    lr: Option<f64>,
    /// Warm-up steps (default 50).
    #[arg(long)]
    warmup: Option<usize>,
    /// dino: the NT-Xent temperature.
    #[arg(long, default_value_t = 0.1, value_parser = super::args::positive)]
    temperature: f64,
    /// dino: the floor of the scene curriculum (the probability that an instance's two views
    /// share their scene falls from 1 to this at half the steps; 1 = always the same scene).
    #[arg(long, default_value_t = 0.25, value_parser = super::args::fraction)]
    same_scene_floor: f64,
    /// Initialisation, views and augmentations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The world's seed (training objects and samples).
    #[arg(long, default_value_t = 0)]
    world_seed: u64,
    /// Checkpoint (weights + AdamW moments) every this many steps (0 = never).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// Continue the run in --out from its checkpoint (bit-identical to an unbroken run).
    #[arg(long)]
    resume: bool,
    /// Store the weights as float16 (default: clip yes, dino no); they load into float32.
    #[arg(long)]
    fp16: Option<bool>,
    /// The model's config.json to use instead of the shipped architecture (tests: smaller).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    device: String,
    /// libtorch's intra-op threads (0 = its default); a resumed run is bit-identical to an
    /// unbroken one with the same thread count.
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

pub fn run(a: Args) -> Result<()> {
    let mut args = EncoderArgs::default_for(a.kind);
    args.steps = a.steps.unwrap_or(args.steps);
    args.batch = a.batch.unwrap_or(args.batch);
    args.lr = a.lr.unwrap_or(args.lr);
    args.warmup = a.warmup.unwrap_or(args.warmup);
    args.temperature = a.temperature;
    args.same_scene_floor = a.same_scene_floor;
    args.seed = a.seed;
    args.world_seed = a.world_seed;
    if let Some(f) = a.fp16 {
        args.fp16 = f;
    }
    if let Some(p) = &a.config {
        args.config = hifi_tuner::load::read_json(p)?;
    }
    if a.threads > 0 {
        tch::set_num_threads(a.threads as i32);
    }
    let job = EncoderJob {
        out: a.out,
        args,
        checkpoint_every: a.checkpoint_every,
        resume: a.resume,
        device: super::parse_device(&a.device)?,
    };
    let out = train_encoder(&job)?;
    println!("{}", out.display());
    Ok(())
}
