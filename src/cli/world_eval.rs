use anyhow::Result;
use hifi_tuner::pipeline::StableDiffusion;
use hifi_tuner::world::classify::{prompt_following, Classifier};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model (a diffusers folder; the shipped world model by default).
    #[arg(long, default_value = "assets/world-model")]
    model: std::path::PathBuf,
    #[command(flatten)]
    opts: super::ModelOptions,
    /// Images per caption combination.
    #[arg(long, default_value_t = 2)]
    per_caption: usize,
    #[arg(long, default_value_t = 25, value_parser = super::args::ddim_steps)]
    steps: usize,
    #[arg(long, default_value_t = 5.0, value_parser = super::args::guidance)]
    guidance: f64,
    /// Training steps of the colour / shape / scene classifier.
    #[arg(long, default_value_t = 800)]
    classifier_steps: usize,
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    let dev = super::parse_device(&a.device)?;
    let (clf, acc) = Classifier::train(a.classifier_steps, dev)?;
    eprintln!("classifier: {:.1} % of held-out renders right on all three", 100.0 * acc);
    let sd: StableDiffusion = a.opts.load(&a.model, dev)?;
    let r = prompt_following(&sd, &clf, acc, a.per_caption, a.steps, a.guidance)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}
