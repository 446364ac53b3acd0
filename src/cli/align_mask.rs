use anyhow::{bail, Result};
use hifi_tuner::guidance::align::{fit, iou, load_mask_png, save_mask_png, warp, warp_mask};
use hifi_tuner::io::RgbImage;
use std::path::PathBuf;
use tch::Kind;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The reference subject mask M_r (white = subject), e.g. from a source photo.
    #[arg(long)]
    reference: PathBuf,
    /// The target mask M_g of the generated image.
    #[arg(long)]
    target: PathBuf,
    /// Where to write T_θ*(M_r), at the target's size, as a grayscale PNG (0 or 255).
    #[arg(long)]
    out: PathBuf,
    /// Also warp this reference photo by T_θ* (to the target's size; black outside) ...
    #[arg(long, requires = "image_out")]
    image: Option<PathBuf>,
    /// ... and write it here as an RGB PNG.
    #[arg(long, requires = "image")]
    image_out: Option<PathBuf>,
}

/// Prints `{"scale", "rotation" (radians), "tx", "ty", "loss", "iou"}` on one line; θ's
/// conventions are in `hifi_tuner::guidance::align`.
pub fn run(a: Args) -> Result<()> {
    let reference = load_mask_png(&a.reference)?;
    let target = load_mask_png(&a.target)?;
    for (m, p) in [(&reference, &a.reference), (&target, &a.target)] {
        if m.ge(0.5).any().int64_value(&[]) == 0 {
            bail!("mask {} is empty: no pixel is ≥ 0.5 (white = subject)", p.display());
        }
    }
    let f = fit(&reference, &target)?;
    let (h, w) = (target.size()[0], target.size()[1]);
    let aligned = warp_mask(&reference, &f.theta, h, w);
    let quality = iou(&aligned, &target);
    if let (Some(img_path), Some(img_out)) = (&a.image, &a.image_out) {
        let img = hifi_tuner::io::open_image(img_path)?.to_rgb8();
        let (iw, ih) = (img.width() as i64, img.height() as i64);
        let t = tch::Tensor::from_slice(img.as_raw()).view([ih, iw, 3]).permute([2, 0, 1]).to_kind(Kind::Float);
        let out = warp(&t, &f.theta, h, w).clamp(0.0, 255.0).round().to_kind(Kind::Uint8).permute([1, 2, 0]);
        RgbImage::from_hwc_u8(&out.contiguous())?.save_png(img_out, &[])?;
    }
    save_mask_png(&aligned, &a.out)?;
    let mut j = f.theta.to_json();
    j["loss"] = f.loss.into();
    j["iou"] = quality.into();
    println!("{}", serde_json::to_string(&j)?);
    Ok(())
}
