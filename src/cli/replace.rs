use super::invert::InversionArgs;
use anyhow::{bail, Result};
use hifi_tuner::dreambooth::job::Manifest;
use hifi_tuner::io::heat_overlay;
use hifi_tuner::io::RgbImage;
use hifi_tuner::replace::job::{
    check_matches, expected_meta, find_word, invert, load_inversion, prepare_swap, replace, save_inverted,
    ReplaceRequest,
};
use hifi_tuner::subject::file::Subject;
use hifi_tuner::subject::ti;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Tensor;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    inv: InversionArgs,
    /// The word of the caption to replace (e.g. "cat").
    #[arg(long)]
    source_word: String,
    /// What replaces it (default: the subject's class noun, or the --embedding's token).
    #[arg(long)]
    target_word: Option<String>,
    /// A learned subject (a `learn` folder or its subject.safetensors): the target's
    /// conditioning is [c^g, c_s^t] (Eq. 7). A DreamBooth or LoRA subject folder instead
    /// supplies its model (OUT/model; the base model with its LoRA) and the target words
    /// "TOKEN CLASS" (e.g. "sks dog").
    #[arg(long)]
    subject: Option<PathBuf>,
    /// A textual-inversion file instead of --subject; its token becomes the target word.
    #[arg(long)]
    embedding: Option<PathBuf>,
    /// Override the token of --embedding.
    #[arg(long)]
    token: Option<String>,
    /// Reuse an `invert` result (checked against the model, photo, caption, size, steps and
    /// guidance); without it the photo is inverted first and the inversion saved as OUT-inversion/.
    #[arg(long)]
    inversion: Option<PathBuf>,
    /// Fraction of the steps, from the start, whose cross-attention is the source's (the paper: 1).
    #[arg(long, default_value_t = 1.0, value_parser = super::args::fraction)]
    cross_replace: f64,
    /// Fraction of the steps, from the start, whose coarse self-attention is the source's
    /// (prompt-to-prompt's self_replace_steps; the paper: 0).
    #[arg(long, default_value_t = 0.0, value_parser = super::args::fraction)]
    self_replace: f64,
    /// The edited photo (.png).
    #[arg(long)]
    out: PathBuf,
    /// Also write the source, the reconstruction, the result, the words' attention maps and a
    /// strip of them into OUT-intermediates/.
    #[arg(long)]
    save_intermediates: bool,
}

pub fn run(mut a: Args) -> Result<()> {
    let started = Instant::now();
    if !a.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        bail!("--out must be a .png file, got {}", a.out.display());
    }
    if a.subject.is_some() && a.embedding.is_some() {
        bail!("give either --subject or --embedding, not both");
    }
    if let Some(s) = &a.subject {
        super::args::check_subject_arg(s)?;
    }
    // a DreamBooth / LoRA subject: its model (and LoRAs) replace --model, as in `generate`
    let fine_tuned = match a.subject.as_deref().filter(|s| s.is_dir()) {
        Some(dir) => Manifest::read(dir)?.map(|m| (dir.to_path_buf(), m)),
        None => None,
    };
    if let Some((dir, m)) = &fine_tuned {
        let done = m.finished_file(dir);
        if !done.is_file() {
            bail!("{} is missing (was the training interrupted? continue it with learn --resume)", done.display());
        }
        let (model, loras) = m.model_and_loras(dir);
        let same = |x: &Path, y: &Path| x.canonicalize().ok().zip(y.canonicalize().ok()).is_some_and(|(x, y)| x == y);
        if !same(&model, &a.inv.model) {
            eprintln!(
                "note: {} is a {} subject: {} is used, not {}",
                dir.display(),
                m.mode,
                model.display(),
                a.inv.model.display()
            );
        }
        a.inv.model = model;
        a.inv.model_options.lora.extend(loras);
    }
    let embedding = a.embedding.as_deref().map(super::args::embedding_file).transpose()?;
    let device = super::parse_device(&a.inv.device)?;
    // c^r: typed, captioned by BLIP, or (with --inversion and neither) the inversion's own
    let reused = match &a.inversion {
        Some(dir) => Some(load_inversion(dir, device)?),
        None => None,
    };
    let (caption, caption_source) = match (&reused, &a.inv.caption, &a.inv.captioner) {
        (Some(inv), None, None) => {
            eprintln!("caption (from the inversion): {:?}", inv.meta.caption);
            (inv.meta.caption.clone(), inv.meta.caption_source.clone())
        }
        _ => a.inv.caption(device)?,
    };
    let mut sd = a.inv.model_options.load(&a.inv.model, device)?;
    let subject = match &fine_tuned {
        Some(_) => None,
        None => a.subject.as_deref().map(Subject::load).transpose()?,
    };
    let loaded = embedding.as_deref().map(|e| ti::load_embedding(&mut sd, e, a.token.as_deref())).transpose()?;
    let target_word = match (&a.target_word, &subject, &loaded, &fine_tuned) {
        (Some(w), _, _, _) => Some(w.clone()),
        (None, _, _, Some((_, m))) => Some(format!("{} {}", m.token, m.class_noun)),
        (None, Some(s), _, _) => Some(s.class_noun.clone()),
        (None, None, Some(l), _) => Some(l.token.clone()),
        (None, None, None, None) => bail!("without --subject or --embedding, --target-word is required"),
    };
    let target_word = target_word.map(|w| ti::convert_prompt(&sd, &w, loaded.as_slice()));
    let req = ReplaceRequest {
        source_word: a.source_word.clone(),
        target_word,
        cross_replace: a.cross_replace,
        self_replace: a.self_replace,
    };
    // Everything that can be refused is checked before any work or any file.
    let inv_req = a.inv.request(&caption, caption_source.clone());
    inv_req.nti.validate()?;
    if let (Some(src), None) = (&caption_source, find_word(&caption, &a.source_word)) {
        // a caption the user did not write: say so, and how to go on
        bail!(
            "the source word {:?} is not in the photo's caption {caption:?}, which {src} wrote: choose \
             --source-word among its words, or give --caption",
            a.source_word
        );
    }
    let swap = prepare_swap(&sd, &caption, &req, subject.as_ref())?;
    let want = expected_meta(&sd, &inv_req)?;
    sd.check_size(want.height, want.width)?;
    let (inversion, source) = match reused {
        Some(inv) => {
            let dir = a.inversion.as_deref().expect("reused inversions come from --inversion");
            check_matches(&inv.meta, &want, dir)?;
            let source = hifi_tuner::io::load_image_cover(&a.inv.image, want.height, want.width)?;
            (inv, hifi_tuner::io::image_to_u8(&source).unsqueeze(0))
        }
        None => {
            let inv = invert(&sd, &inv_req)?;
            let dir = sibling(&a.out, "inversion");
            save_inverted(&dir, &inv)?;
            eprintln!(
                "inverted in {:.2}s (null-text {:.2}s), saved in {}",
                inv.seconds,
                inv.nti_seconds,
                dir.display()
            );
            (inv.inversion, inv.source)
        }
    };
    let r = replace(&sd, &inversion, &req, subject.as_ref())?;
    let params = format!(
        "{}\nSource: {}\nSteps: {}, Sampler: DDIM, CFG scale: {}, Cross replace: {}, Self replace: {}, Model: {}{}",
        swap.target_caption,
        swap.source_caption,
        want.steps,
        want.guidance,
        a.cross_replace,
        a.self_replace,
        a.inv.model.display(),
        a.subject.as_ref().map(|s| format!(", Subject: {}", s.display())).unwrap_or_default()
    );
    RgbImage::from_hwc_u8(&r.image.get(0))?.save_png(&a.out, &[("parameters", &params)])?;
    if a.save_intermediates {
        let dir = sibling(&a.out, "intermediates");
        hifi_tuner::io::create_dir_all(&dir)?;
        let (src, rec, res) = (source.get(0), r.reconstruction.get(0), r.image.get(0));
        let mut strip: Vec<Tensor> = vec![src.shallow_clone(), rec.shallow_clone()];
        for (name, img) in [("source.png", &src), ("reconstruction.png", &rec), ("result.png", &res)] {
            RgbImage::from_hwc_u8(img)?.save_png(&dir.join(name), &[])?;
        }
        for (k, (name, base)) in [("map-source-word.png", &src), ("map-target-words.png", &res)].into_iter().enumerate()
        {
            if let Some(m) = r.maps.get(k) {
                let o = heat_overlay(base, m);
                RgbImage::from_hwc_u8(&o)?.save_png(&dir.join(name), &[])?;
                strip.push(o);
            }
        }
        strip.push(res.shallow_clone());
        RgbImage::from_hwc_u8(&Tensor::cat(&strip, 1))?.save_png(&dir.join("strip.png"), &[])?;
    }
    eprintln!(
        "replaced {:?} with {:?} in {:.2}s",
        a.source_word,
        req.target_word.as_deref().unwrap_or(""),
        started.elapsed().as_secs_f64()
    );
    println!("{}", a.out.display());
    Ok(())
}

/// OUT-{what}/ next to the output image.
fn sibling(out: &Path, what: &str) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!("{stem}-{what}"))
}
