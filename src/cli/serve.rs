use anyhow::{Context, Result};
use hifi_tuner::serve::{run as serve, ServeConfig};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The app's folder: subjects/, jobs/ (each job's CLI output in jobs/ID/out/), created if
    /// missing. One server per folder.
    #[arg(long)]
    data: PathBuf,
    /// The Stable Diffusion model every job uses (a diffusers folder, a single-file checkpoint or
    /// a Hugging Face id). Default: the world model trained here (assets/world-model).
    #[arg(long, default_value = "assets/world-model")]
    model: PathBuf,
    /// A transformers SamModel folder: sharp subject masks (else the attention map, with a warning).
    #[arg(long)]
    sam: Option<PathBuf>,
    /// A DINO ViT folder: reference guidance chooses its reference photo with it.
    #[arg(long)]
    dino: Option<PathBuf>,
    /// The address to listen on. Anything but 127.0.0.1 / localhost / ::1 needs --token.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port (0: any free one; the server prints the address it took).
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// A secret every request must carry (Authorization: Bearer TOKEN, or open the page once with
    /// ?token=TOKEN: a cookie keeps it).
    #[arg(long, env = "HIFI_TUNER_TOKEN")]
    token: Option<String>,
    /// The device of the jobs.
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    super::parse_device(&a.device)?;
    let exe = std::env::current_exe().context("cannot find this program's own path (the jobs run it)")?;
    // absolute, so that the commands the app shows work from any folder
    let model = if a.model.exists() { a.model.canonicalize()? } else { a.model };
    serve(ServeConfig {
        data: a.data,
        model,
        sam: a.sam,
        dino: a.dino,
        host: a.host,
        port: a.port,
        token: a.token,
        device: a.device,
        exe,
    })
}
