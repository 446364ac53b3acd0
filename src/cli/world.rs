use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The folder to create: dataset/, masks/, ground_truth/, samples/, world.json.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Photos per held-out subject (renders in its photo scenes, with masks).
    #[arg(long, default_value_t = 4)]
    photos: usize,
    /// Training samples on the contact sheet samples/sheet.png (0 = none).
    #[arg(long, default_value_t = 64)]
    samples: usize,
}

pub fn run(a: Args) -> Result<()> {
    hifi_tuner::world::dataset::write_world(&a.out, a.seed, a.photos, a.samples)?;
    println!("{}", a.out.display());
    Ok(())
}
