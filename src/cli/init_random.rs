use anyhow::{bail, Context, Result};
use hifi_tuner::io::{write_bytes_atomic, write_var_store_atomic};
use hifi_tuner::load::read_json;
use hifi_tuner::models::{clip_text::ClipTextModel, unet::UNet2DConditionModel, vae::AutoencoderKL};
use hifi_tuner::tokenizer::ClipTokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// tiny (a few MB, 64×64 images), sd15 (Stable Diffusion 1.5 shapes, 512×512), sd2
    /// (SD-2.1's: OpenCLIP-H text encoder, v-prediction, 768×768), tiny-xl (tiny's widths in
    /// SDXL's structure, two text encoders) or sdxl (SDXL-base shapes, 1024×1024).
    #[arg(long, value_parser = ["tiny", "sd15", "sd2", "tiny-xl", "sdxl"])]
    config: String,
    /// A CLIP tokenizer folder (vocab.json + merges.txt); copied into the model (SD-2.x and the
    /// second SDXL tokenizer pad with "!", as theirs do).
    #[arg(long)]
    tokenizer: PathBuf,
    /// The model folder to create (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Store the weights as float16 (halves the size; they load into float32 all the same).
    #[arg(long)]
    fp16: bool,
}

/// One preset: its folder under `assets/configs/` and whether it is SDXL.
struct Preset {
    /// (component, config file name, JSON)
    configs: Vec<(&'static str, &'static str, &'static str)>,
    xl: bool,
    /// Whether `tokenizer/` pads with "!" (SD-2.x).
    pad_bang: bool,
}

fn preset(name: &str) -> Preset {
    macro_rules! cfg {
        ($p:literal) => {
            vec![
                ("unet", "config.json", include_str!(concat!("../../assets/configs/", $p, "/unet.json"))),
                ("vae", "config.json", include_str!(concat!("../../assets/configs/", $p, "/vae.json"))),
                (
                    "text_encoder",
                    "config.json",
                    include_str!(concat!("../../assets/configs/", $p, "/text_encoder.json")),
                ),
                (
                    "scheduler",
                    "scheduler_config.json",
                    include_str!(concat!("../../assets/configs/", $p, "/scheduler.json")),
                ),
            ]
        };
    }
    macro_rules! xl {
        ($p:literal) => {{
            let mut c = cfg!($p);
            c.push((
                "text_encoder_2",
                "config.json",
                include_str!(concat!("../../assets/configs/", $p, "/text_encoder_2.json")),
            ));
            Preset { configs: c, xl: true, pad_bang: false }
        }};
    }
    match name {
        "sd15" => Preset { configs: cfg!("sd15"), xl: false, pad_bang: false },
        "sd2" => Preset { configs: cfg!("sd21"), xl: false, pad_bang: true },
        "tiny-xl" => xl!("tiny-xl"),
        "sdxl" => xl!("sdxl"),
        _ => Preset { configs: cfg!("tiny"), xl: false, pad_bang: false },
    }
}

pub fn run(a: Args) -> Result<()> {
    if a.out.exists() && std::fs::read_dir(&a.out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("--out {} already exists and is not empty; refusing to overwrite it", a.out.display());
    }
    ClipTokenizer::from_dir(&a.tokenizer)?; // a bad tokenizer is named before anything is written
    let p = preset(&a.config);
    copy_tokenizer(&a.tokenizer, &a.out.join("tokenizer"), p.pad_bang)?;
    if p.xl {
        copy_tokenizer(&a.tokenizer, &a.out.join("tokenizer_2"), true)?;
        write_bytes_atomic(
            &a.out.join("model_index.json"),
            include_bytes!("../../assets/configs/model_index_xl.json"),
        )?;
    } else {
        write_bytes_atomic(&a.out.join("model_index.json"), include_bytes!("../../assets/configs/model_index.json"))?;
    }
    for (component, file, json) in p.configs {
        let mut v: Value = serde_json::from_str(json).context("embedded config")?;
        if component.starts_with("text_encoder") {
            let tok = if component == "text_encoder_2" { "tokenizer_2" } else { "tokenizer" };
            let tokenizer = ClipTokenizer::from_dir(&a.out.join(tok))?;
            v["vocab_size"] = tokenizer.vocab_size().into();
            v["bos_token_id"] = tokenizer.bos_id().into();
            v["eos_token_id"] = tokenizer.eos_id().into();
            v["pad_token_id"] = tokenizer.pad_id().into();
        }
        let dir = a.out.join(component);
        write_bytes_atomic(&dir.join(file), serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    let cfg = |c: &str| a.out.join(c).join("config.json");
    let dev = Device::Cpu;
    hifi_tuner::rng::seeded(a.seed as i64, || -> Result<()> {
        write_var_store_atomic(
            &ClipTextModel::new(read_json(&cfg("text_encoder"))?, dev)?.vs,
            &a.out.join("text_encoder/model.safetensors"),
            a.fp16,
        )?;
        if p.xl {
            write_var_store_atomic(
                &ClipTextModel::new(read_json(&cfg("text_encoder_2"))?, dev)?.vs,
                &a.out.join("text_encoder_2/model.safetensors"),
                a.fp16,
            )?;
        }
        write_var_store_atomic(
            &AutoencoderKL::new(read_json(&cfg("vae"))?, dev)?.vs,
            &a.out.join("vae/diffusion_pytorch_model.safetensors"),
            a.fp16,
        )?;
        write_var_store_atomic(
            &UNet2DConditionModel::new(read_json(&cfg("unet"))?, dev)?.vs,
            &a.out.join("unet/diffusion_pytorch_model.safetensors"),
            a.fp16,
        )
    })?;
    eprintln!("wrote a {} model with RANDOM weights (seed {}) to {}", a.config, a.seed, a.out.display());
    println!("{}", a.out.display());
    Ok(())
}

/// Copies the tokenizer files; with `pad_bang`, the pad token becomes "!" (SD-2.x's and SDXL's
/// second tokenizer's `special_tokens_map.json`).
fn copy_tokenizer(from: &Path, to: &Path, pad_bang: bool) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for name in ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        let src = from.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name)).with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    if pad_bang {
        let map = to.join("special_tokens_map.json");
        let mut v: Value = if map.is_file() { read_json(&map)? } else { Value::Object(Default::default()) };
        v["pad_token"] = "!".into();
        write_bytes_atomic(&map, serde_json::to_string_pretty(&v)?.as_bytes())?;
        let cfg = to.join("tokenizer_config.json");
        if cfg.is_file() {
            let mut c: Value = read_json(&cfg)?;
            if c.get("added_tokens_decoder").is_some() || c.get("pad_token").is_some() {
                c["pad_token"] = "!".into();
                write_bytes_atomic(&cfg, serde_json::to_string_pretty(&c)?.as_bytes())?;
            }
        }
    }
    Ok(())
}
