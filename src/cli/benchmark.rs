use anyhow::{bail, Result};
use hifi_tuner::benchmark::{run, BenchmarkConfig, Method, Shard};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The Stable Diffusion 1.x model (folder, single file or Hugging Face id).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    model_options: super::ModelOptions,
    /// A DreamBooth-layout dataset: one folder per subject + prompts_and_classes.txt.
    #[arg(long)]
    dataset: PathBuf,
    /// Subject masks: DIR/SUBJECT/STEM.png (white = subject), needed by every method but ti.
    #[arg(long)]
    masks: Option<PathBuf>,
    /// A transformers CLIPModel folder (openai/clip-vit-base-patch32). Required for a DreamBooth
    /// dataset; a world dataset (`hifi-tuner world`) is scored against its ground truth without.
    #[arg(long)]
    clip: Option<PathBuf>,
    /// A transformers ViTModel folder (facebook/dino-vits16): the DINO metric and hifi's
    /// reference choice (without it, the reference is the best mask alignment). Checked and
    /// loaded before any unit runs.
    #[arg(long)]
    dino: Option<PathBuf>,
    /// The run folder (units are written to RUN/units/SUBJECT/METHOD/).
    #[arg(long)]
    out: PathBuf,
    /// Comma-separated subject names (default: all).
    #[arg(long, value_delimiter = ',')]
    subjects: Vec<String>,
    /// Comma-separated methods: ti, ti+mask, ti+mask+reg, ti+mask+reg+stepwise, hifi, db,
    /// db+guidance, lora, lora+guidance, and the reference rows copy (a training photo as the output: the ceiling)
    /// and base (the class-noun prompt on the base model: the floor) (default: all).
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
    /// The first N prompts of the object or live list.
    #[arg(long, default_value_t = 25, value_parser = super::args::at_least_one)]
    prompts: usize,
    #[arg(long, default_value_t = 4, value_parser = super::args::at_least_one)]
    images_per_prompt: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Adam steps of phase 0 (learn --steps).
    #[arg(long, default_value_t = 1000, value_parser = super::args::at_least_one)]
    learn_steps: usize,
    /// I of Algorithm 1 (the stepwise methods).
    #[arg(long, default_value_t = 10)]
    stepwise_steps: usize,
    #[arg(long, default_value_t = 5e-3, value_parser = super::args::positive)]
    lr: f64,
    /// w_s (the +reg methods).
    #[arg(long, default_value_t = 1e-3, value_parser = super::args::non_negative)]
    reg_weight: f64,
    /// n, the subject tokens (all methods).
    #[arg(long, default_value_t = 5, value_parser = super::args::subject_tokens)]
    tokens: i64,
    /// DreamBooth rows (db, db+guidance): fine-tuning steps.
    #[arg(long, default_value_t = 400, value_parser = super::args::at_least_one)]
    db_steps: usize,
    /// DreamBooth rows: the AdamW learning rate (diffusers' default for SD).
    #[arg(long, default_value_t = 5e-6, value_parser = super::args::positive)]
    db_lr: f64,
    /// DreamBooth and LoRA rows: class images for prior preservation (generated per unit).
    #[arg(long, default_value_t = 100)]
    db_class_images: usize,
    /// LoRA rows (lora, lora+guidance): training steps (diffusers' DreamBooth-LoRA recipe: 500).
    #[arg(long, default_value_t = 500, value_parser = super::args::at_least_one)]
    lora_steps: usize,
    /// LoRA rows: the AdamW learning rate of the adapters.
    #[arg(long, default_value_t = 1e-4, value_parser = super::args::positive)]
    lora_lr: f64,
    /// LoRA rows: the adapters' rank (α = rank).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i64).range(1..=1024))]
    lora_rank: i64,
    /// A learning caption template, `{}` = the subject (repeat the flag for several; default
    /// the six "a photo of a {}"-style ones). A world model knows only its own captions: use
    /// "a {}" there.
    #[arg(long = "caption-template")]
    caption_templates: Vec<String>,
    /// DDIM steps (generation and Algorithm 1).
    #[arg(long, default_value_t = 50, value_parser = super::args::ddim_steps)]
    steps: usize,
    #[arg(long, default_value_t = 7.5, value_parser = super::args::guidance)]
    guidance: f64,
    #[command(flatten)]
    reference: super::ReferenceGuidanceArgs,
    /// i/n: run the units whose index ≡ i (mod n). Default: SLURM_ARRAY_TASK_ID/COUNT, or
    /// JOB_COMPLETION_INDEX with --shards, or all units.
    #[arg(long)]
    shard: Option<String>,
    /// The shard count for a Kubernetes Indexed Job (JOB_COMPLETION_INDEX).
    #[arg(long)]
    shards: Option<usize>,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Redo the finished units of --out that were made with other settings (without it, such a
    /// rerun is refused).
    #[arg(long)]
    redo_mismatched: bool,
}

pub fn run_cmd(a: Args) -> Result<()> {
    let methods = if a.methods.is_empty() {
        Method::ALL.to_vec()
    } else {
        a.methods.iter().map(|m| Method::parse(m.trim())).collect::<Result<Vec<_>>>()?
    };
    let shard = Shard::resolve(a.shard.as_deref(), a.shards, &|k| std::env::var(k).ok())?;
    let device = super::parse_device(&a.device)?;
    let cfg = BenchmarkConfig {
        load: a.model_options.options(device)?,
        model: a.model,
        dataset: a.dataset,
        masks: a.masks,
        clip: a.clip,
        dino: a.dino,
        out: a.out,
        subjects: a.subjects.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        methods,
        prompts: a.prompts,
        images_per_prompt: a.images_per_prompt,
        seed: a.seed,
        learn_steps: a.learn_steps,
        stepwise_steps: a.stepwise_steps,
        lr: a.lr,
        reg_weight: a.reg_weight,
        tokens: a.tokens,
        caption_templates: a.caption_templates,
        db_steps: a.db_steps,
        db_lr: a.db_lr,
        db_class_images: a.db_class_images,
        lora_steps: a.lora_steps,
        lora_lr: a.lora_lr,
        lora_rank: a.lora_rank,
        steps: a.steps,
        guidance: a.guidance,
        t_start: a.reference.t_start,
        t_end: a.reference.t_end,
        guidance_steps: a.reference.guidance_steps,
        guidance_lr: a.reference.guidance_lr,
        shard,
        device,
        redo_mismatched: a.redo_mismatched,
    };
    let s = run(&cfg)?;
    let mean = if s.seconds_per_unit.is_empty() {
        0.0
    } else {
        s.seconds_per_unit.iter().sum::<f64>() / s.seconds_per_unit.len() as f64
    };
    let summary = serde_json::json!({"done": s.done, "skipped": s.skipped, "redone": s.redone,
        "failed": s.failed.iter().map(|(u, e)| serde_json::json!({"unit": u, "error": e})).collect::<Vec<_>>(),
        "busy": s.busy.iter().map(|(u, e)| serde_json::json!({"unit": u, "error": e})).collect::<Vec<_>>(),
        "mean_seconds_per_unit": mean, "shard": cfg.shard});
    println!("{summary}");
    if !s.failed.is_empty() {
        bail!("{} unit(s) failed (see RUN/units/SUBJECT/METHOD.error.txt); rerun to retry them", s.failed.len());
    }
    if !s.busy.is_empty() {
        bail!(
            "{} unit(s) were not run: another process holds them ({})",
            s.busy.len(),
            s.busy.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>().join("; ")
        );
    }
    Ok(())
}
