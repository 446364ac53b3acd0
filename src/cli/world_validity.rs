//! `world-validity`: does each fidelity score rank the true render above blobs, plain shapes,
//! other subjects, the base model's class image (DINO) and a copied photo (CLIP-T)?

use anyhow::{bail, Result};
use hifi_tuner::benchmark::validity::{markdown, means, measure, summarize, BaseImages};
use hifi_tuner::eval::metrics::Evaluator;
use hifi_tuner::io::write_bytes_atomic;
use hifi_tuner::world::{N_VALIDATION, SUBJECTS};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The world's DINO (a transformers `ViTModel` folder).
    #[arg(long, default_value = "assets/world-dino")]
    dino: PathBuf,
    /// The world's CLIP (a transformers `CLIPModel` folder with its tokenizer).
    #[arg(long, default_value = "assets/world-clip")]
    clip: PathBuf,
    /// The base model, for the class-noun images ("a ball on the beach"); `none` leaves that
    /// candidate out.
    #[arg(long, default_value = "assets/world-model")]
    model: String,
    #[command(flatten)]
    opts: super::ModelOptions,
    /// Which subjects: `test` (the 10 of the reported tables), `validation` (the 5 for choosing
    /// settings) or `all`.
    #[arg(long, default_value = "test")]
    split: String,
    /// The world's seed (as `hifi-tuner world --seed`).
    #[arg(long, default_value_t = 0)]
    world_seed: u64,
    #[arg(long, default_value_t = 25, value_parser = super::args::ddim_steps)]
    steps: usize,
    #[arg(long, default_value_t = 5.0, value_parser = super::args::guidance)]
    guidance: f64,
    /// Seed of the base model's image of prompt 0 (prompt p: seed + p).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write cases.json and validity.md here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    let subjects: Vec<usize> = match a.split.as_str() {
        "test" => (N_VALIDATION..SUBJECTS.len()).collect(),
        "validation" => (0..N_VALIDATION).collect(),
        "all" => (0..SUBJECTS.len()).collect(),
        other => bail!("--split must be test, validation or all, got {other:?}"),
    };
    let dev = super::parse_device(&a.device)?;
    let ev = Evaluator::load(&a.clip, &a.dino, dev)?;
    let sd = if a.model == "none" { None } else { Some(a.opts.load(std::path::Path::new(&a.model), dev)?) };
    let base = sd.as_ref().map(|sd| BaseImages { sd, steps: a.steps, guidance: a.guidance, seed: a.seed });
    let cases = measure(&ev, base, a.world_seed, &subjects)?;
    let table = format!(
        "Split `{}`, world seed {}: {} subjects × 4 prompt scenes.\n\n{}\nMeans:\n\n{}",
        a.split,
        a.world_seed,
        subjects.len(),
        markdown(&summarize(&cases)),
        means(&cases)
    );
    if let Some(out) = &a.out {
        write_bytes_atomic(&out.join("cases.json"), serde_json::to_string_pretty(&cases)?.as_bytes())?;
        write_bytes_atomic(&out.join("validity.md"), table.as_bytes())?;
    }
    println!("{table}");
    Ok(())
}
