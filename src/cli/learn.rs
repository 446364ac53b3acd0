use anyhow::{bail, Result};
use hifi_tuner::dreambooth::job::{learn as learn_dreambooth, DreamBoothJob};
use hifi_tuner::dreambooth::DreamBoothArgs;
use hifi_tuner::subject::job::{captions, learn, LearnJob};
use hifi_tuner::subject::learn::LearnArgs;
use hifi_tuner::subject::{Mode, Space};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A diffusers Stable Diffusion 1.x folder, a single-file .safetensors checkpoint, or a Hugging
    /// Face id org/name[@revision].
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    model_options: super::ModelOptions,
    /// Folder of the subject's photos (.jpg, .jpeg, .png).
    #[arg(long)]
    images: PathBuf,
    /// Folder of subject masks paired with the photos by file stem (white = subject).
    #[arg(long)]
    masks: Option<PathBuf>,
    /// A transformers SamModel folder: without --masks, compute the subject masks (the model's
    /// attention to the class noun prompts SAM), save them in the subject folder's masks/ and
    /// learn with them.
    #[arg(long, conflicts_with = "masks")]
    sam: Option<PathBuf>,
    /// With --sam: the least contrast of the class noun's attention for a photo to have a
    /// subject (as `mask --min-contrast`; default 1.32).
    #[arg(long, requires = "sam", value_parser = super::args::non_negative)]
    min_contrast: Option<f64>,
    /// The subject's class noun, e.g. "dog" or "backpack".
    #[arg(long)]
    class_noun: String,
    /// The subject folder to write.
    #[arg(long)]
    out: PathBuf,
    /// hifi (the paper's method), ti (classic textual inversion), dreambooth (full UNet
    /// fine-tuning with prior preservation, written as a diffusers folder OUT/model) or lora
    /// (DreamBooth with low-rank adapters on the attention projections, written as
    /// OUT/pytorch_lora_weights.safetensors for diffusers and OUT/a1111/NAME.safetensors for
    /// AUTOMATIC1111 / ComfyUI).
    #[arg(long, default_value = "hifi")]
    mode: String,
    /// Where c_s is spliced in (hifi): input (token embeddings) or output (encoder output).
    #[arg(long, default_value = "input")]
    space: String,
    /// n, the number of subject tokens.
    #[arg(long, default_value_t = 5, value_parser = super::args::subject_tokens)]
    tokens: i64,
    /// The new token (ti mode; default <subject>) or the rare word (dreambooth; default sks).
    #[arg(long)]
    token: Option<String>,
    /// Default: 1000 (hifi, ti), 400 (dreambooth), 500 (lora).
    #[arg(long, value_parser = super::args::at_least_one)]
    steps: Option<usize>,
    /// Default: 5e-3 (hifi, ti), 5e-6 (dreambooth), 1e-4 (lora).
    #[arg(long, value_parser = super::args::positive)]
    lr: Option<f64>,
    /// w_s, the weight of ‖c_s − φ_s‖² (Eq. 6).
    #[arg(long, default_value_t = 1e-3, value_parser = super::args::non_negative)]
    reg_weight: f64,
    /// I, Adam steps per DDIM step in Algorithm 1 (0 skips it).
    #[arg(long, default_value_t = 10)]
    stepwise_steps: usize,
    /// T, the DDIM steps the step-wise embeddings are learned for.
    #[arg(long, default_value_t = 50, value_parser = super::args::ddim_steps)]
    ddim_steps: usize,
    #[arg(long, default_value_t = 1, value_parser = super::args::num_images)]
    batch_size: i64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a checkpoint every this many steps (0 = only at the end).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// Every this many steps write OUT/loss.svg and OUT/previews/step-N.png, drawn at seed 0 with
    /// the state of step N (hifi: the class prompt with c_s; dreambooth / lora: the instance
    /// prompt; ti: the loss curve only) (0 = never).
    #[arg(long, default_value_t = 0)]
    preview_every: usize,
    /// Continue the run whose checkpoint is in --out.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value = "auto")]
    device: String,
    /// dreambooth: class images for prior preservation, generated into OUT/class_images/ (reused).
    #[arg(long, default_value_t = 100)]
    class_images: usize,
    /// dreambooth: DDIM steps of each class image.
    #[arg(long, default_value_t = 50, value_parser = super::args::ddim_steps)]
    class_steps: usize,
    /// dreambooth: the weight of the prior-preservation loss.
    #[arg(long, default_value_t = 1.0, value_parser = super::args::non_negative)]
    prior_weight: f64,
    /// dreambooth: no prior preservation (no class images).
    #[arg(long)]
    no_prior: bool,
    /// dreambooth: also fine-tune the text encoder.
    #[arg(long)]
    train_text_encoder: bool,
    /// dreambooth: AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 1e-2, value_parser = super::args::non_negative)]
    weight_decay: f64,
    /// dreambooth: clip the gradients' total L2 norm to this.
    #[arg(long, default_value_t = 1.0, value_parser = super::args::positive)]
    max_grad_norm: f64,
    /// dreambooth: gradient checkpointing of the UNet blocks (recomputed in the backward pass:
    /// less activation memory, one more forward). Default: on with CUDA, off on the CPU;
    /// `--gradient-checkpointing false` turns it off.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    gradient_checkpointing: Option<bool>,
    /// lora: the adapters' rank r.
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..=1024))]
    rank: Option<i64>,
    /// lora: α, the adapters' scale is α/r (default α = r).
    #[arg(long, value_parser = super::args::positive)]
    alpha: Option<f64>,
}

pub fn run(mut a: Args) -> Result<()> {
    let db = a.mode == "dreambooth" || a.mode == "lora";
    if !db {
        if a.train_text_encoder {
            bail!("--train-text-encoder applies to --mode dreambooth and lora only (got --mode {})", a.mode);
        }
        if a.gradient_checkpointing.is_some() {
            bail!("--gradient-checkpointing applies to --mode dreambooth and lora only (got --mode {})", a.mode);
        }
    }
    if a.mode != "lora" && (a.rank.is_some() || a.alpha.is_some()) {
        bail!("--rank and --alpha apply to --mode lora only (got --mode {})", a.mode);
    }
    // SAM's masks go into --out: lock it first (the job takes the lock again, re-entrantly)
    let _lock = a.sam.is_some().then(|| hifi_tuner::outdir::lock_dir(&a.out, "--out")).transpose()?;
    if let Some(sam) = a.sam.clone() {
        a.masks = Some(sam_masks(&a, &sam)?);
    }
    if db {
        return run_dreambooth(a);
    }
    let mode = Mode::parse(&a.mode)
        .map_err(|_| anyhow::anyhow!("--mode must be hifi, ti, dreambooth or lora, got {:?}", a.mode))?;
    let token = a.token.clone().unwrap_or_else(|| "<subject>".into());
    let space = Space::parse(&a.space)?;
    let job = LearnJob {
        args: LearnArgs {
            mode,
            space,
            n_tokens: a.tokens,
            token: token.clone(),
            class_noun: a.class_noun.clone(),
            captions: captions(mode, &a.class_noun, &token, a.tokens),
            steps: a.steps.unwrap_or(1000),
            lr: a.lr.unwrap_or(5e-3),
            reg_weight: a.reg_weight,
            stepwise_steps: if mode == Mode::Hifi { a.stepwise_steps } else { 0 },
            ddim_steps: a.ddim_steps,
            batch_size: a.batch_size,
            seed: a.seed,
            masked: a.masks.is_some(),
        },
        load: a.model_options.options(super::parse_device(&a.device)?)?,
        model: a.model,
        images: a.images,
        masks: a.masks,
        out: a.out,
        checkpoint_every: a.checkpoint_every,
        preview_every: a.preview_every,
        resume: a.resume,
        device: super::parse_device(&a.device)?,
    };
    if mode == Mode::Hifi && job.masks.is_none() {
        eprintln!("warning: no --masks: the loss is not masked, so c_s may also learn the backgrounds");
    }
    let started = Instant::now();
    let path = learn(&job)?;
    eprintln!("learned in {:.1}s", started.elapsed().as_secs_f64());
    println!("{}", path.display());
    Ok(())
}

/// Computes the photos' subject masks with SAM into `OUT/masks/` and returns that folder.
fn sam_masks(a: &Args, sam: &std::path::Path) -> Result<PathBuf> {
    let device = super::parse_device(&a.device)?;
    let paths: Vec<PathBuf> = hifi_tuner::subject::data::images_by_stem(&a.images)?.into_values().collect();
    if paths.is_empty() {
        anyhow::bail!("no images (.jpg, .jpeg, .png) in {}", a.images.display());
    }
    let photos = paths.iter().map(|p| hifi_tuner::io::load_rgb_u8(p)).collect::<Result<Vec<_>>>()?;
    let sd = a.model_options.load(&a.model, device)?;
    let sam = hifi_tuner::models::sam::SamModel::load(sam, device)?;
    let min_contrast = a.min_contrast.unwrap_or(hifi_tuner::guidance::daam::MIN_CONTRAST);
    let masks = super::mask::compute(&sd, Some(&sam), &photos, &paths, &a.class_noun, min_contrast)?;
    let dir = a.out.join("masks");
    hifi_tuner::io::create_dir_all(&dir)?;
    for (p, m) in paths.iter().zip(&masks) {
        hifi_tuner::guidance::align::save_mask_png(m, &dir.join(format!("{}.png", super::mask::stem(p))))?;
    }
    eprintln!("computed the subject masks with SAM: {} (check them; pass --masks to use your own)", dir.display());
    Ok(dir)
}

fn run_dreambooth(a: Args) -> Result<()> {
    let device = super::parse_device(&a.device)?;
    let token = a.token.as_deref().unwrap_or("sks");
    let lora = a.mode == "lora";
    let mut args =
        if lora { DreamBoothArgs::new_lora(token, &a.class_noun) } else { DreamBoothArgs::new(token, &a.class_noun) };
    // default on with CUDA for DreamBooth; LoRA's frozen half-precision weights keep it off
    // unless asked (it needs float32 weights)
    args.gradient_checkpointing = a.gradient_checkpointing.unwrap_or(device.is_cuda() && !lora);
    if let Some(l) = args.lora.as_mut() {
        l.rank = a.rank.unwrap_or(l.rank);
        l.alpha = a.alpha.unwrap_or(l.rank as f64);
    }
    args.steps = a.steps.unwrap_or(args.steps);
    args.lr = a.lr.unwrap_or(args.lr);
    args.weight_decay = a.weight_decay;
    args.max_grad_norm = a.max_grad_norm;

    args.prior_weight = (!a.no_prior).then_some(a.prior_weight);
    args.class_images = a.class_images;
    args.class_steps = a.class_steps;
    args.train_text_encoder = a.train_text_encoder;
    args.masked = a.masks.is_some();
    args.seed = a.seed;
    if a.batch_size != 1 {
        bail!("--mode {} trains with batch size 1 (as the paper), got --batch-size {}", a.mode, a.batch_size);
    }
    // DreamBooth trains fp32 weights: --dtype auto means fp32 here, on every device; LoRA trains
    // fp32 adapters on frozen weights of the --dtype (auto: fp16 on CUDA, fp32 on the CPU).
    let mut load = a.model_options.options(device)?;
    if a.model_options.dtype == "auto" && !lora {
        load.dtype = Some(tch::Kind::Float);
    }
    let job = DreamBoothJob {
        model: a.model,
        load,
        images: a.images,
        masks: a.masks,
        out: a.out,
        args,
        checkpoint_every: a.checkpoint_every,
        preview_every: a.preview_every,
        resume: a.resume,
        device,
    };
    let started = Instant::now();
    let path = learn_dreambooth(&job)?;
    eprintln!("{} in {:.1}s", if lora { "adapters trained" } else { "fine-tuned" }, started.elapsed().as_secs_f64());
    println!("{}", path.display());
    Ok(())
}
