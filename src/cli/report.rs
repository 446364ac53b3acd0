use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Benchmark run folders (their units are merged; shards may come from different machines).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Where report.html, results.csv and results.json go (default: the first run).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Merge units made with different settings (other models, steps, learning rates, …);
    /// without it the report refuses to average them.
    #[arg(long)]
    allow_mixed_settings: bool,
}

pub fn run(a: Args) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| a.runs[0].clone());
    let md = hifi_tuner::benchmark::report::write(&a.runs, &out, a.allow_mixed_settings)?;
    print!("{md}");
    eprintln!("wrote {}", out.join("report.html").display());
    Ok(())
}
