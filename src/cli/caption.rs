use anyhow::{bail, Result};
use hifi_tuner::caption::{CaptionOptions, Captioner};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A BLIP captioner: a transformers BlipForConditionalGeneration folder or a Hugging Face id
    /// (e.g. Salesforce/blip-image-captioning-base or -large).
    #[arg(long)]
    model: PathBuf,
    /// Images (PNG or JPEG); one JSON line {"image": PATH, "caption": TEXT} per image, in order.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Conditional captioning: the caption starts with this text (e.g. "a photography of").
    #[arg(long)]
    prefix: Option<String>,
    /// Beam search width (1: greedy decoding, as transformers' default).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=32))]
    beams: Option<u32>,
    /// The longest caption in tokens, [DEC] and the prefix included (transformers' max_length;
    /// default: the model's generation config, else 20 new tokens).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=512))]
    max_length: Option<u32>,
    /// Precision of the captioner: auto (fp16 on CUDA, fp32 on the CPU), fp32, fp16 or bf16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    let device = super::parse_device(&a.device)?;
    let kind = hifi_tuner::precision::resolve(&a.dtype, device)?;
    if a.prefix.as_deref().is_some_and(|p| p.trim().is_empty()) {
        bail!("--prefix is empty (leave it out for unconditional captions)");
    }
    // Read every image before loading the model or printing anything: a bad one is refused by
    // name and leaves no partial output.
    let images = a.images.iter().map(|p| hifi_tuner::io::open_image(p)).collect::<Result<Vec<_>>>()?;
    let captioner = Captioner::load(&a.model, device, kind)?;
    let opts = CaptionOptions {
        prefix: a.prefix.clone(),
        beams: a.beams.map(|b| b as usize),
        max_length: a.max_length.map(|n| n as usize),
    };
    let bar = hifi_tuner::progress::bar(images.len() as u64, "captions");
    let mut out = String::new();
    for (path, img) in a.images.iter().zip(&images) {
        let c = captioner.caption(img, &opts).map_err(|e| e.context(format!("captioning {}", path.display())))?;
        // {"image": …, "caption": …} in this order (serde_json's maps would sort the keys)
        let (p, t) = (serde_json::to_string(&path.display().to_string())?, serde_json::to_string(&c.text)?);
        out.push_str(&format!("{{\"image\": {p}, \"caption\": {t}}}"));
        out.push('\n');
        bar.inc(1);
    }
    bar.finish_and_clear();
    print!("{out}");
    Ok(())
}
