use anyhow::{bail, Result};
use hifi_tuner::guidance::daam::MIN_CONTRAST;
use hifi_tuner::guidance::grounding::{check_contrast, heat_map, mask_from_heat, overlay};
use hifi_tuner::io::{load_rgb_u8, RgbImage};
use hifi_tuner::models::sam::SamModel;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A diffusers Stable Diffusion 1.x folder, a single-file .safetensors checkpoint, or a Hugging
    /// Face id org/name[@revision]: its cross-attention finds the subject.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    model_options: super::ModelOptions,
    /// A transformers SamModel folder: outlines the subject sharply. Without it the mask is the
    /// thresholded attention map (coarse).
    #[arg(long)]
    sam: Option<PathBuf>,
    /// The subject's class noun, e.g. "dog".
    #[arg(long)]
    class_noun: String,
    /// Photos (PNG or JPEG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Folder for STEM.png (white = subject) and STEM.overlay.png (the mask tinted over the photo).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    /// The least contrast of the class noun's attention (mean heat inside its hottest region over
    /// outside, at the finest level) for a photo to have a subject; below it the command stops
    /// with "no subject found". Lower it (1 accepts any photo) when you know the subject is there.
    #[arg(long, default_value_t = MIN_CONTRAST, value_parser = super::args::non_negative)]
    min_contrast: f64,
}

/// Computes every mask before writing any; prints the written mask paths.
pub fn run(a: Args) -> Result<()> {
    let device = super::parse_device(&a.device)?;
    let photos = a.images.iter().map(|p| load_rgb_u8(p)).collect::<Result<Vec<_>>>()?;
    let mut stems = std::collections::BTreeSet::new();
    for p in &a.images {
        if !stems.insert(stem(p)) {
            bail!("two images share the stem {:?}: masks are named by stem", stem(p));
        }
    }
    let sd = a.model_options.load(&a.model, device)?;
    let sam = a.sam.as_deref().map(|d| SamModel::load(d, device)).transpose()?;
    let masks = compute(&sd, sam.as_ref(), &photos, &a.images, &a.class_noun, a.min_contrast)?;
    hifi_tuner::io::create_dir_all(&a.out)?;
    for ((path, photo), mask) in a.images.iter().zip(&photos).zip(&masks) {
        let out = a.out.join(format!("{}.png", stem(path)));
        hifi_tuner::guidance::align::save_mask_png(mask, &out)?;
        RgbImage::from_hwc_u8(&overlay(photo, mask))?
            .save_png(&a.out.join(format!("{}.overlay.png", stem(path))), &[])?;
        println!("{}", out.display());
    }
    Ok(())
}

pub fn stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The subject masks of `photos` (H, W, 3 uint8), with a progress bar; warns once when coarse.
pub fn compute(
    sd: &hifi_tuner::pipeline::StableDiffusion,
    sam: Option<&SamModel>,
    photos: &[tch::Tensor],
    paths: &[PathBuf],
    class_noun: &str,
    min_contrast: f64,
) -> Result<Vec<tch::Tensor>> {
    if sam.is_none() {
        eprintln!("warning: no --sam: the masks are the thresholded attention maps, which are coarse");
    }
    let bar = hifi_tuner::progress::bar(photos.len() as u64, "masks");
    let started = Instant::now();
    let mut out = Vec::new();
    for (photo, path) in photos.iter().zip(paths) {
        let heat = heat_map(sd, photo, class_noun)?;
        bar.suspend(|| eprintln!("{}: attention contrast {:.3}", path.display(), heat.contrast));
        if let Err(e) = check_contrast(heat.contrast, min_contrast, &path.display().to_string()) {
            bail!(
                "{e:#}. If the {class_noun} is there, --min-contrast below the contrast shown masks it anyway (then \
                 check the mask)"
            );
        }
        let mask = mask_from_heat(sam, photo, &heat.map, path)?;
        out.push(mask);
        bar.inc(1);
    }
    bar.finish_and_clear();
    eprintln!("masks: {:.2}s per photo", started.elapsed().as_secs_f64() / photos.len().max(1) as f64);
    Ok(out)
}
