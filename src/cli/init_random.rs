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
    /// tiny (a few MB, 64×64 images) or sd15 (Stable Diffusion 1.5 shapes, 512×512).
    #[arg(long, value_parser = ["tiny", "sd15"])]
    config: String,
    /// A CLIP tokenizer folder (vocab.json + merges.txt); copied into the model.
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

/// (component, config file name, JSON) for each preset.
fn preset(name: &str) -> [(&'static str, &'static str, &'static str); 4] {
    macro_rules! cfg {
        ($p:literal) => {
            [
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
    if name == "sd15" {
        cfg!("sd15")
    } else {
        cfg!("tiny")
    }
}

pub fn run(a: Args) -> Result<()> {
    if a.out.exists() && std::fs::read_dir(&a.out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("--out {} already exists and is not empty; refusing to overwrite it", a.out.display());
    }
    let tokenizer = ClipTokenizer::from_dir(&a.tokenizer)?;
    copy_tokenizer(&a.tokenizer, &a.out.join("tokenizer"))?;
    write_bytes_atomic(&a.out.join("model_index.json"), include_bytes!("../../assets/configs/model_index.json"))?;
    for (component, file, json) in preset(&a.config) {
        let mut v: Value = serde_json::from_str(json).context("embedded config")?;
        if component == "text_encoder" {
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

fn copy_tokenizer(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for name in ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        let src = from.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name)).with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    Ok(())
}
