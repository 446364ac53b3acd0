//! Value parsers shared by the subcommands' flags: every number is checked when the command
//! line is parsed, before any model is loaded or any file written. A NaN or an infinity is
//! refused in every float flag (NaN slips past comparisons such as `w > 1` and turns every
//! image black); sizes and counts have bounds whose message says the limit and why.
//!
//! The end of the file sorts out `--subject` / `--embedding` arguments of the wrong kind.
//!
//! Use them as `#[arg(long, value_parser = args::positive)]`; clap names the flag in the error.

use std::path::{Path, PathBuf};

/// The largest `--height` / `--width` generated: 4× the 512 px Stable Diffusion 1.x is trained
/// at. Beyond it the model only repeats its content, and the cost grows fast: the first UNet
/// block's self-attention compares every latent cell with every other (65 536 cells of 8×8 px
/// at 2048², 4.3·10⁹ pairs per head).
pub const MAX_IMAGE_SIDE: i64 = 2048;
/// The most images of one run: they are denoised as one batch, so memory grows with their
/// number (run again with other seeds for more).
pub const MAX_NUM_IMAGES: i64 = 64;
/// The most DDIM steps: they are chosen among the model's 1000 training timesteps (SD-1.x).
pub const MAX_DDIM_STEPS: usize = 1000;
/// The most subject tokens: CLIP's 77 positions hold `<bos>`, the caption and `<eos>` too.
pub const MAX_SUBJECT_TOKENS: i64 = 75;

/// A finite number (every float parser starts here).
fn float(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !v.is_finite() {
        return Err(format!("{s} is not a finite number"));
    }
    Ok(v)
}

/// A finite number > 0 (learning rates, norms).
pub fn positive(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v <= 0.0 {
        return Err(format!("must be a positive number, got {s}"));
    }
    Ok(v)
}

/// A finite number ≥ 0 (loss weights, weight decay).
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v < 0.0 {
        return Err(format!("must be ≥ 0, got {s}"));
    }
    Ok(v)
}

/// A finite number in [0, 1] (fractions of the steps, probabilities).
pub fn fraction(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("must be a fraction in [0, 1], got {s}"));
    }
    Ok(v)
}

/// The classifier-free guidance scale w: finite and ≥ 0 (w ≤ 1 turns guidance off, as in
/// diffusers, so a negative w would silently mean 1).
pub fn guidance(s: &str) -> Result<f64, String> {
    let v = float(s)?;
    if v < 0.0 {
        return Err(format!("must be ≥ 0 (w ≤ 1 turns classifier-free guidance off), got {s}"));
    }
    Ok(v)
}

fn integer<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim().parse().map_err(|_| format!("{s:?} is not a whole number ≥ 0"))
}

/// A count ≥ 1.
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let v: usize = integer(s)?;
    if v == 0 {
        return Err("must be at least 1".into());
    }
    Ok(v)
}

/// A count ≥ 2 (`bench --learn-steps`: the first step warms up, the rest are timed).
pub fn at_least_two(s: &str) -> Result<usize, String> {
    let v: usize = integer(s)?;
    if v < 2 {
        return Err("must be at least 2 (the first is a warm-up)".into());
    }
    Ok(v)
}

/// `--height` / `--width` of a generated image: 1 ..= [`MAX_IMAGE_SIDE`] pixels.
pub fn image_side(s: &str) -> Result<i64, String> {
    let v: i64 = integer(s)?;
    if v < 1 {
        return Err("must be at least 1 pixel".into());
    }
    if v > MAX_IMAGE_SIDE {
        return Err(format!(
            "{v} pixels is above the limit of {MAX_IMAGE_SIDE}: Stable Diffusion 1.x is trained at 512 px, and the \
             cost grows with the square of the latent cells (the self-attention of a {MAX_IMAGE_SIDE}² image already \
             compares 65536 cells with each other)"
        ));
    }
    Ok(v)
}

/// `--num-images`: 1 ..= [`MAX_NUM_IMAGES`].
pub fn num_images(s: &str) -> Result<i64, String> {
    let v: i64 = integer(s)?;
    if !(1..=MAX_NUM_IMAGES).contains(&v) {
        return Err(format!(
            "must be between 1 and {MAX_NUM_IMAGES}, got {v}: the images are denoised as one batch, so memory grows \
             with their number (run again with another --seed for more)"
        ));
    }
    Ok(v)
}

/// DDIM steps: 1 ..= [`MAX_DDIM_STEPS`].
pub fn ddim_steps(s: &str) -> Result<usize, String> {
    let v: usize = integer(s)?;
    if !(1..=MAX_DDIM_STEPS).contains(&v) {
        return Err(format!(
            "must be between 1 and {MAX_DDIM_STEPS}, got {v}: DDIM takes its steps among the model's \
             {MAX_DDIM_STEPS} training timesteps"
        ));
    }
    Ok(v)
}

/// n, the subject tokens: 1 ..= [`MAX_SUBJECT_TOKENS`].
pub fn subject_tokens(s: &str) -> Result<i64, String> {
    let v: i64 = integer(s)?;
    if !(1..=MAX_SUBJECT_TOKENS).contains(&v) {
        return Err(format!(
            "must be between 1 and {MAX_SUBJECT_TOKENS}, got {v}: CLIP's 77 positions also hold <bos>, the \
             caption and <eos>"
        ));
    }
    Ok(v)
}

/// What a folder or file given as `--subject` or `--embedding` holds, from its file names and
/// header alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Learned {
    /// A HiFi subject (`learn --mode hifi`): its subject.safetensors.
    Hifi,
    /// A textual inversion (`learn --mode ti`, or anyone's embedding file): the file.
    Ti(PathBuf),
    /// A DreamBooth subject folder (`learn --mode dreambooth`).
    DreamBooth,
    /// A `learn` folder whose run has not finished (a checkpoint, no result).
    Unfinished,
    /// Anything else: the loader's own error says what is wrong.
    Other,
}

pub fn learned_kind(path: &Path) -> Learned {
    use hifi_tuner::subject::file::{FORMAT, LEARNED_EMBEDS_FILE, SUBJECT_FILE};
    if path.is_dir() {
        if path.join(SUBJECT_FILE).is_file() {
            Learned::Hifi
        } else if path.join(hifi_tuner::dreambooth::job::MANIFEST_FILE).is_file() {
            Learned::DreamBooth
        } else if path.join(LEARNED_EMBEDS_FILE).is_file() {
            Learned::Ti(path.join(LEARNED_EMBEDS_FILE))
        } else if path.join(hifi_tuner::subject::job::CHECKPOINT_FILE).is_file() {
            Learned::Unfinished
        } else {
            Learned::Other
        }
    } else {
        match hifi_tuner::load::safetensors_metadata(path) {
            Ok(m) if m.get("format").map(String::as_str) == Some(FORMAT) => Learned::Hifi,
            // A one-tensor file without our format is how every TI embedding looks; a wrong
            // file is refused by the TI reader itself.
            Ok(m) if !m.contains_key("format") => Learned::Ti(path.to_path_buf()),
            _ => Learned::Other,
        }
    }
}

/// Refuses a `--subject` that is a textual inversion or an unfinished run, pointing to the
/// right flag (DreamBooth and LoRA subject folders are taken by `generate` and `replace`).
pub fn check_subject_arg(path: &Path) -> anyhow::Result<()> {
    let p = path.display();
    match learned_kind(path) {
        Learned::Ti(file) => anyhow::bail!(
            "--subject {p} is a textual-inversion embedding (learn --mode ti), not a HiFi subject: pass it as \
             --embedding {}",
            file.display()
        ),
        Learned::Unfinished => anyhow::bail!(
            "--subject {p} holds an unfinished learn run (a checkpoint, no result yet): continue it with \
             learn --resume --out {p}"
        ),
        _ => Ok(()),
    }
}

/// The textual-inversion file an `--embedding` names: the file itself, or the
/// learned_embeds.safetensors of a `learn --mode ti` folder. A HiFi or DreamBooth subject
/// given here is refused with a pointer to `--subject`.
pub fn embedding_file(path: &Path) -> anyhow::Result<PathBuf> {
    let p = path.display();
    match learned_kind(path) {
        Learned::Ti(file) => Ok(file),
        Learned::Hifi => {
            anyhow::bail!("--embedding {p} is a HiFi subject (learn --mode hifi), not a textual inversion: pass it as --subject {p}")
        }
        Learned::DreamBooth => anyhow::bail!(
            "--embedding {p} is a DreamBooth subject (learn --mode dreambooth), not a textual inversion: pass it as \
             --subject {p}"
        ),
        Learned::Unfinished => anyhow::bail!(
            "--embedding {p} holds an unfinished learn run (a checkpoint, no result yet): continue it with \
             learn --resume --out {p}"
        ),
        Learned::Other => Ok(path.to_path_buf()),
    }
}

/// `--lora FILE[:SCALE]`: an existing .safetensors file (pickles refused by name), a finite scale.
pub fn lora_spec(s: &str) -> Result<hifi_tuner::lora::LoraSpec, String> {
    hifi_tuner::lora::LoraSpec::parse(s).map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_numbers_and_out_of_range_values_are_refused() {
        for p in [float, positive, non_negative, fraction, guidance] {
            for bad in ["nan", "NaN", "inf", "-inf", "infinity", "1e999", "x"] {
                assert!(p(bad).is_err(), "{bad} accepted");
            }
        }
        assert_eq!(float("-2.5"), Ok(-2.5));
        assert!(positive("0").is_err() && positive("-1e-3").is_err());
        assert_eq!(positive("1e-2"), Ok(1e-2));
        assert!(non_negative("-0.1").is_err());
        assert_eq!(non_negative("0"), Ok(0.0));
        assert!(fraction("1.5").is_err() && fraction("-0.1").is_err());
        assert_eq!(fraction("1"), Ok(1.0));
        assert!(guidance("-1").is_err());
        assert_eq!(guidance("7.5"), Ok(7.5));
        assert!(image_side("1000000").unwrap_err().contains("2048"));
        assert!(image_side("0").is_err() && image_side("-8").is_err());
        assert_eq!(image_side("512"), Ok(512));
        assert!(num_images("0").is_err() && num_images("65").is_err());
        assert!(ddim_steps("0").is_err() && ddim_steps("1001").is_err());
        assert_eq!(ddim_steps("50"), Ok(50));
        assert!(subject_tokens("100").unwrap_err().contains("75"));
        assert!(at_least_one("0").is_err());
        assert!(at_least_two("1").is_err() && at_least_two("2") == Ok(2));
    }

    /// Does `hifi-tuner SUB --LONG=VALUE` get past the flag's value parser? (Other errors, such
    /// as the missing required flags, come after it and count as accepted.)
    fn accepts(sub: &str, long: &str, value: &str) -> bool {
        use clap::error::ErrorKind;
        use clap::Parser;
        match crate::cli::Cli::try_parse_from(["hifi-tuner", sub, &format!("--{long}={value}")]) {
            Ok(_) => true,
            Err(e) => !matches!(e.kind(), ErrorKind::ValueValidation | ErrorKind::InvalidValue),
        }
    }

    /// Walks every flag of every subcommand: each one that takes a decimal number (accepts 0.5
    /// and refuses a word) refuses NaN and ±inf. A float flag added later is covered too.
    #[test]
    fn every_float_flag_of_every_subcommand_refuses_non_finite_numbers() {
        use clap::CommandFactory;
        let cli = crate::cli::Cli::command();
        let mut floats = Vec::new();
        for sub in cli.get_subcommands() {
            let name = sub.get_name();
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if !arg.get_action().takes_values() {
                    continue;
                }
                if accepts(name, long, "0.5") && !accepts(name, long, "word") {
                    for bad in ["nan", "NaN", "inf", "-inf", "infinity", "1e999"] {
                        assert!(!accepts(name, long, bad), "{name} --{long} accepts {bad}");
                    }
                    floats.push(format!("{name} --{long}"));
                }
            }
        }
        // The walk is not vacuous: it finds the float flags the issue names, and more.
        for f in [
            "generate --guidance",
            "generate --guidance-lr",
            "invert --guidance",
            "replace --guidance",
            "replace --cross-replace",
            "replace --self-replace",
            "learn --lr",
            "learn --reg-weight",
            "learn --prior-weight",
            "learn --weight-decay",
            "learn --max-grad-norm",
            "benchmark --lr",
            "benchmark --db-lr",
            "benchmark --guidance",
            "train-base --unet-lr",
            "train-base --colour-dropout",
            "world-demo --guidance",
            "world-eval --guidance",
        ] {
            assert!(floats.iter().any(|x| x == f), "{f} not found among the float flags {floats:?}");
        }
    }

    /// Fractions, sizes and counts refuse their out-of-range values at parse time.
    #[test]
    fn ranges_are_checked_at_parse_time() {
        for (sub, long, bad, good) in [
            ("replace", "cross-replace", "1.5", "1"),
            ("replace", "self-replace", "-0.1", "0"),
            ("generate", "height", "1000000", "512"),
            ("generate", "width", "0", "64"),
            ("invert", "height", "4096", "2048"),
            ("generate", "num-images", "65", "64"),
            ("generate", "steps", "1001", "1000"),
            ("generate", "guidance", "-1", "0"),
            ("learn", "steps", "0", "1"),
            ("learn", "tokens", "76", "75"),
            ("learn", "ddim-steps", "0", "1"),
            ("learn", "lr", "0", "1e-9"),
            ("learn", "reg-weight", "-1", "0"),
            ("benchmark", "tokens", "0", "1"),
            ("bench", "learn-steps", "1", "2"),
            ("benchmark", "images-per-prompt", "0", "1"),
            ("train-base", "colour-dropout", "1.1", "0.9"),
        ] {
            assert!(!accepts(sub, long, bad), "{sub} --{long} accepts {bad}");
            assert!(accepts(sub, long, good), "{sub} --{long} refuses {good}");
        }
    }
}
