use anyhow::Result;
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
    /// The subject's class noun, e.g. "dog" or "backpack".
    #[arg(long)]
    class_noun: String,
    /// The subject folder to write.
    #[arg(long)]
    out: PathBuf,
    /// hifi (the paper's method) or ti (classic textual inversion).
    #[arg(long, default_value = "hifi")]
    mode: String,
    /// Where c_s is spliced in (hifi): input (token embeddings) or output (encoder output).
    #[arg(long, default_value = "input")]
    space: String,
    /// n, the number of subject tokens.
    #[arg(long, default_value_t = 5)]
    tokens: i64,
    /// The new token (ti mode).
    #[arg(long, default_value = "<subject>")]
    token: String,
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    #[arg(long, default_value_t = 5e-3)]
    lr: f64,
    /// w_s, the weight of ‖c_s − φ_s‖² (Eq. 6).
    #[arg(long, default_value_t = 1e-3)]
    reg_weight: f64,
    /// I, Adam steps per DDIM step in Algorithm 1 (0 skips it).
    #[arg(long, default_value_t = 10)]
    stepwise_steps: usize,
    /// T, the DDIM steps the step-wise embeddings are learned for.
    #[arg(long, default_value_t = 50)]
    ddim_steps: usize,
    #[arg(long, default_value_t = 1)]
    batch_size: i64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a checkpoint every this many steps (0 = only at the end).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// Continue the run whose checkpoint is in --out.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(mut a: Args) -> Result<()> {
    let mode = Mode::parse(&a.mode)?;
    if let Some(sam) = a.sam.clone() {
        a.masks = Some(sam_masks(&a, &sam)?);
    }
    let space = Space::parse(&a.space)?;
    let job = LearnJob {
        args: LearnArgs {
            mode,
            space,
            n_tokens: a.tokens,
            token: a.token.clone(),
            class_noun: a.class_noun.clone(),
            captions: captions(mode, &a.class_noun, &a.token, a.tokens),
            steps: a.steps,
            lr: a.lr,
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
    let masks = super::mask::compute(&sd, Some(&sam), &photos, &paths, &a.class_noun)?;
    let dir = a.out.join("masks");
    std::fs::create_dir_all(&dir)?;
    for (p, m) in paths.iter().zip(&masks) {
        hifi_tuner::guidance::align::save_mask_png(m, &dir.join(format!("{}.png", super::mask::stem(p))))?;
    }
    eprintln!("computed the subject masks with SAM: {} (check them; pass --masks to use your own)", dir.display());
    Ok(dir)
}
