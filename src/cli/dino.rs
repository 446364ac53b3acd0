use anyhow::Result;
use hifi_tuner::eval::dino::Dino;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A transformers ViTModel folder (config.json + model.safetensors), e.g. facebook/dino-vits16.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Images (PNG or JPEG); one JSON array of `hidden_size` floats is printed per image, one
    /// per line, in this order.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let device = super::parse_device(&a.device)?;
    // Read every image before printing anything, so an unreadable one leaves no partial output.
    let images = a.images.iter().map(|p| hifi_tuner::io::open_image(p)).collect::<Result<Vec<_>>>()?;
    let dino = Dino::load(&a.model, device)?;
    let emb = dino.embed_images(&images)?.to_device(tch::Device::Cpu); // (n, d)
    let mut out = String::new();
    for i in 0..images.len() as i64 {
        let row = Vec::<f32>::try_from(emb.get(i).contiguous())?;
        out.push_str(&serde_json::to_string(&row)?);
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}
