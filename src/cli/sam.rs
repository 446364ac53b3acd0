use anyhow::{bail, Context, Result};
use hifi_tuner::guidance::align::save_mask_png;
use hifi_tuner::io::load_rgb_u8;
use hifi_tuner::models::sam::{PixelPrompts, SamModel};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A transformers SamModel folder (config.json + model.safetensors), e.g. facebook/sam-vit-base.
    #[arg(long)]
    model: PathBuf,
    /// The photo (PNG or JPEG).
    #[arg(long)]
    image: PathBuf,
    /// A box around the subject: x0,y0,x1,y1 in pixels of the photo.
    #[arg(long, value_name = "X0,Y0,X1,Y1")]
    r#box: Option<String>,
    /// A point on the subject: x,y in pixels (repeatable).
    #[arg(long, value_name = "X,Y")]
    point: Vec<String>,
    /// A point on the background: x,y in pixels (repeatable).
    #[arg(long, value_name = "X,Y")]
    negative_point: Vec<String>,
    /// Where to write the best mask (by predicted IoU) as a grayscale PNG (0 or 255).
    #[arg(long)]
    out: PathBuf,
    /// SAM's outputs: `on` = its three candidate masks, `off` = its single mask (transformers'
    /// `multimask_output`); `auto` = single when a box is given, three for points alone (the SAM
    /// authors' recommendation).
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    multimask: String,
    #[arg(long, default_value = "auto")]
    device: String,
}

fn numbers<const N: usize>(s: &str, flag: &str) -> Result<[f64; N]> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{flag} {s:?}: expected {N} comma-separated numbers"))?;
    let arr: [f64; N] =
        v.try_into().map_err(|_| anyhow::anyhow!("{flag} {s:?}: expected {N} comma-separated numbers"))?;
    if arr.iter().any(|x| !x.is_finite()) {
        bail!("{flag} {s:?}: numbers must be finite");
    }
    Ok(arr)
}

/// Refuses a box or point that lies wholly outside a photo of `w` × `h` pixels: a box must
/// overlap [0, w] × [0, h] with positive area, a point lie within it.
fn check_inside(prompts: &PixelPrompts, w: i64, h: i64, image: &std::path::Path) -> Result<()> {
    let (w, h) = (w as f64, h as f64);
    if let Some(b) = prompts.boxes {
        if b[2] <= 0.0 || b[3] <= 0.0 || b[0] >= w || b[1] >= h {
            bail!(
                "--box {},{},{},{} lies wholly outside {} ({} × {} pixels, x in 0…{}, y in 0…{})",
                b[0],
                b[1],
                b[2],
                b[3],
                image.display(),
                w,
                h,
                w,
                h
            );
        }
    }
    for &(x, y, label) in &prompts.points {
        if !(0.0..=w).contains(&x) || !(0.0..=h).contains(&y) {
            let flag = if label == 1 { "--point" } else { "--negative-point" };
            bail!("{flag} {x},{y} lies outside {} ({} × {} pixels)", image.display(), w, h);
        }
    }
    Ok(())
}

/// Prints the candidates' predicted IoUs as a JSON array; writes the best candidate.
pub fn run(a: Args) -> Result<()> {
    let mut prompts = PixelPrompts::default();
    for (list, label, flag) in [(&a.point, 1, "--point"), (&a.negative_point, 0, "--negative-point")] {
        for p in list {
            let [x, y] = numbers::<2>(p, flag)?;
            prompts.points.push((x, y, label));
        }
    }
    if let Some(b) = &a.r#box {
        let b = numbers::<4>(b, "--box")?;
        if b[2] <= b[0] || b[3] <= b[1] {
            bail!("--box {b:?}: x1 must exceed x0 and y1 exceed y0");
        }
        prompts.boxes = Some(b);
    }
    if prompts.points.is_empty() && prompts.boxes.is_none() {
        bail!("give SAM a prompt: --box, --point or --negative-point");
    }
    let image = load_rgb_u8(&a.image)?;
    let (h, w, _) = image.size3()?;
    check_inside(&prompts, w, h, &a.image)?;
    let multimask = match a.multimask.as_str() {
        "on" => true,
        "off" => false,
        _ => prompts.multimask(),
    };
    let sam = SamModel::load(&a.model, super::parse_device(&a.device)?)?;
    let started = Instant::now();
    let pred = sam.predict_with(&image, &prompts, multimask)?;
    eprintln!("SAM: {:.3}s", started.elapsed().as_secs_f64());
    save_mask_png(&pred.mask(pred.best()), &a.out)?;
    println!("{}", serde_json::to_string(&pred.iou)?);
    Ok(())
}
