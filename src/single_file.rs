//! Single-file Stable Diffusion 1.x and 2.x checkpoints (the `v1-5-pruned-emaonly.safetensors` /
//! `v2-1_768-ema-pruned.safetensors` format of the original LDM code, Civitai fine-tunes):
//! original key names, converted in memory.
//!
//! A file holds the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.` and
//! the text encoder under `cond_stage_model.transformer.` (SD-1.x: OpenAI's CLIP in
//! transformers' names) or `cond_stage_model.model.` (SD-2.x: OpenCLIP ViT-H's names, converted
//! by [`open_clip_text_key`] as diffusers' `convert_open_clip_checkpoint` does: fused `in_proj`
//! split into q/k/v, the layers past the penultimate and the projection dropped). Each of our
//! modules is built from a config — the standard SD-1.x (v1-inference) ones in
//! `assets/configs/sd15/` or SD-2.1's (768-v) in `assets/configs/sd21/`, chosen by the text
//! encoder's keys ([`Family`]), or those of a diffusers folder given as `--config`, as diffusers'
//! `from_single_file(config=…)` — and every parameter name of the module is mapped to its LDM
//! name by [`ldm_unet_key`] / [`ldm_vae_key`] (the inverse of diffusers'
//! `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`). Loading is as strict as for a
//! folder: every parameter must be in the file with its shape, and every key of the file must be
//! used, or be in the known ignorable set ([`ignorable`]: the EMA copy `model_ema.*` and the
//! training buffers of LDM's DDPM).

use crate::load::{load_strict_tensors, read_json, read_safetensors, KeyAction};
use crate::models::unet::config::UNetConfig;
use crate::models::vae::VaeConfig;
use crate::models::{
    clip_text::ClipTextConfig, clip_text::ClipTextModel, unet::UNet2DConditionModel, vae::AutoencoderKL,
};
use crate::scheduler::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Device, Tensor};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const TEXT_PREFIX: &str = "cond_stage_model.transformer.";
/// SD-2.x's OpenCLIP text encoder (`FrozenOpenCLIPEmbedder`).
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's first text encoder (OpenAI CLIP ViT-L/14, transformers' names).
pub const XL_TEXT_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// SDXL's second text encoder (OpenCLIP ViT-bigG/14, OpenCLIP's names, with its projection).
pub const XL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// The model family of a single file, told by its text encoders' keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// OpenAI CLIP ViT-L/14 under `cond_stage_model.transformer.`.
    Sd1,
    /// OpenCLIP ViT-H/14 under `cond_stage_model.model.`.
    Sd2,
    /// CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 under `conditioner.embedders.{0,1}.`.
    Sdxl,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Sd1 => "Stable Diffusion 1.x",
            Family::Sd2 => "Stable Diffusion 2.x",
            Family::Sdxl => "SDXL",
        })
    }
}

impl Family {
    /// SDXL when any key is under `conditioner.embedders.`, SD-2.x when any is under
    /// [`OPEN_CLIP_PREFIX`], else SD-1.x.
    pub fn of_keys<'a>(keys: impl Iterator<Item = &'a str>) -> Self {
        let mut family = Family::Sd1;
        for k in keys {
            if k.starts_with("conditioner.embedders.") {
                return Family::Sdxl;
            }
            if k.starts_with(OPEN_CLIP_PREFIX) {
                family = Family::Sd2;
            }
        }
        family
    }

    /// The prefixes of its (CLIP, OpenCLIP) text encoder keys.
    fn text_prefixes(self) -> (&'static str, &'static str) {
        match self {
            Family::Sd1 | Family::Sd2 => (TEXT_PREFIX, OPEN_CLIP_PREFIX),
            Family::Sdxl => (XL_TEXT_PREFIX, XL_OPEN_CLIP_PREFIX),
        }
    }

    /// The family of a `.safetensors` file, from its header alone (no tensor is read).
    pub fn of_file(path: &Path) -> Result<Self> {
        refuse_pickle(path)?;
        let header = crate::load::safetensors_header(path)?;
        let keys = header
            .as_object()
            .with_context(|| format!("{}: the safetensors header is not an object", path.display()))?;
        Ok(Self::of_keys(keys.keys().map(String::as_str)))
    }
}

/// LDM's DDPM buffers (noise schedule, loss weights): recomputed from the scheduler config.
const DDPM_BUFFERS: [&str; 13] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
];

/// Why a key of a single-file checkpoint is not loaded, for keys we know to skip.
pub fn ignorable(key: &str) -> Option<&'static str> {
    if key.starts_with("model_ema.") {
        Some("EMA copy of the UNet (model_ema.*)")
    } else if DDPM_BUFFERS.contains(&key) || key == "lvlb_weights" {
        Some("DDPM training buffer")
    } else if key.starts_with("first_stage_model.loss.") {
        Some("VAE training loss (LPIPS / discriminator)")
    } else if (key.starts_with(TEXT_PREFIX) || key.starts_with(XL_TEXT_PREFIX))
        && key.ends_with("embeddings.position_ids")
    {
        Some("position_ids buffer")
    } else if key == "cond_stage_model.model.text_projection" || key == "cond_stage_model.model.logit_scale" {
        Some("OpenCLIP's projection and logit scale (SD-2.x conditions on hidden states)")
    } else if key == "conditioner.embedders.1.model.logit_scale" {
        Some("OpenCLIP's logit scale")
    } else {
        None
    }
}

/// SDXL's second text encoder config, its tokenizer and `force_zeros_for_empty_prompt`.
pub struct XlConfigs {
    pub text_encoder_2: ClipTextConfig,
    pub tokenizer_2: ClipTokenizer,
    pub force_zeros_for_empty_prompt: bool,
}

/// The configs (and tokenizer) a single file is converted with.
pub struct Configs {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text_encoder: ClipTextConfig,
    pub scheduler: SchedulerConfig,
    pub tokenizer: ClipTokenizer,
    /// SDXL's second encoder; `None` for SD-1.x / 2.x.
    pub xl: Option<XlConfigs>,
    /// Where they come from, for messages.
    pub origin: String,
}

/// A config built into the binary: `assets/configs/PRESET/NAME`, parsed, or an error naming it.
macro_rules! builtin {
    ($preset:literal, $name:literal) => {
        serde_json::from_str(include_str!(concat!("../assets/configs/", $preset, "/", $name)))
            .with_context(|| concat!("built-in assets/configs/", $preset, "/", $name, " is not valid"))
    };
}

impl Configs {
    /// The standard SD-1.x (v1-inference) configs kept in `assets/configs/sd15/` and the CLIP
    /// tokenizer of `assets/tokenizer/`.
    pub fn sd15() -> Result<Self> {
        Ok(Self {
            unet: builtin!("sd15", "unet.json")?,
            vae: builtin!("sd15", "vae.json")?,
            text_encoder: builtin!("sd15", "text_encoder.json")?,
            scheduler: builtin!("sd15", "scheduler.json")?,
            tokenizer: ClipTokenizer::sd15()?,
            xl: None,
            origin: "the standard SD-1.x configs (assets/configs/sd15)".into(),
        })
    }

    /// SD-2.1's (768-v) configs kept in `assets/configs/sd21/` — the OpenCLIP ViT-H text encoder as
    /// transformers ships it (23 layers: SD-2 conditions on the penultimate), linear projections,
    /// per-level heads, `v_prediction` — and SD-2.x's tokenizer (pad `"!"`). An SD-2 *base*
    /// (512, ε-prediction) file needs `--config` of a folder that says `epsilon`.
    pub fn sd21() -> Result<Self> {
        Ok(Self {
            unet: builtin!("sd21", "unet.json")?,
            vae: builtin!("sd21", "vae.json")?,
            text_encoder: builtin!("sd21", "text_encoder.json")?,
            scheduler: builtin!("sd21", "scheduler.json")?,
            tokenizer: ClipTokenizer::sd2()?,
            xl: None,
            origin: "the standard SD-2.1 (768-v) configs (assets/configs/sd21)".into(),
        })
    }

    /// SDXL-base 1.0's configs kept in `assets/configs/sdxl/` (both text encoders, the UNet with
    /// `text_time`, the VAE with scaling factor 0.13025 and `force_upcast`, DDIM with SDXL's
    /// schedule), SD-1.x's tokenizer and SD-2.x's (pad `"!"`) as the second.
    pub fn sdxl() -> Result<Self> {
        Ok(Self {
            unet: builtin!("sdxl", "unet.json")?,
            vae: builtin!("sdxl", "vae.json")?,
            text_encoder: builtin!("sdxl", "text_encoder.json")?,
            scheduler: builtin!("sdxl", "scheduler.json")?,
            tokenizer: ClipTokenizer::sd15()?,
            xl: Some(XlConfigs {
                text_encoder_2: builtin!("sdxl", "text_encoder_2.json")?,
                tokenizer_2: ClipTokenizer::sd2()?,
                force_zeros_for_empty_prompt: true,
            }),
            origin: "the standard SDXL-base 1.0 configs (assets/configs/sdxl)".into(),
        })
    }

    /// The built-in configs of a family.
    pub fn builtin(family: Family) -> Result<Self> {
        match family {
            Family::Sd1 => Self::sd15(),
            Family::Sd2 => Self::sd21(),
            Family::Sdxl => Self::sdxl(),
        }
    }

    /// The component configs and tokenizer of a diffusers folder (`unet/config.json`, …,
    /// `scheduler/scheduler_config.json`, `tokenizer/`); its weights are not read.
    pub fn from_diffusers_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("--config {}: not a folder (expected a diffusers Stable Diffusion folder)", dir.display());
        }
        Ok(Self {
            unet: read_json(&dir.join("unet/config.json"))?,
            vae: read_json(&dir.join("vae/config.json"))?,
            text_encoder: read_json(&dir.join("text_encoder/config.json"))?,
            scheduler: SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?,
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            xl: match (crate::load::ModelDir { root: dir.to_path_buf() }).xl_if_indexed()? {
                None => None,
                Some(force_zeros_for_empty_prompt) => Some(XlConfigs {
                    text_encoder_2: read_json(&dir.join("text_encoder_2/config.json"))?,
                    tokenizer_2: ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?,
                    force_zeros_for_empty_prompt,
                }),
            },
            origin: format!("the configs of {}", dir.display()),
        })
    }
}

/// The three networks of a single-file checkpoint, loaded.
pub struct Loaded {
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub text_encoder: ClipTextModel,
    /// SDXL's second text encoder.
    pub text_encoder_2: Option<ClipTextModel>,
}

/// Refuses pickled checkpoints with directions to convert them.
pub fn refuse_pickle(path: &Path) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
        bail!(
            "{} is a pickled checkpoint: hifi-tuner never unpickles (it can run arbitrary code). Convert it to \
             safetensors first, where you trust the file, e.g. \
             `python -c \"import torch, safetensors.torch as s; sd = torch.load('{0}', map_location='cpu', \
             weights_only=True); sd = sd.get('state_dict', sd); s.save_file({{k: v.contiguous() for k, v in \
             sd.items() if isinstance(v, torch.Tensor)}}, 'model.safetensors')\"`, \
             or use a .safetensors release of the model",
            path.display()
        );
    }
    Ok(())
}

/// Loads a single-file SD-1.x / 2.x / XL checkpoint with `configs` (which must be of the same
/// family). Prints a note when EMA weights or other known keys are skipped.
pub fn load(path: &Path, configs: &Configs, device: Device) -> Result<Loaded> {
    refuse_pickle(path)?;
    let what = path.display().to_string();
    let tensors = read_safetensors(path)?;
    let family = Family::of_keys(tensors.iter().map(|(k, _)| k.as_str()));
    let (clip_prefix, open_clip_prefix) = family.text_prefixes();
    let (mut unet_t, mut vae_t, mut text_t, mut open_clip_t) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut skipped: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut unknown = Vec::new();
    for (key, value) in tensors {
        if let Some(why) = ignorable(&key) {
            *skipped.entry(why).or_default() += 1;
        } else if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
            unet_t.push((rest.to_string(), value));
        } else if let Some(rest) = key.strip_prefix(VAE_PREFIX) {
            vae_t.push((rest.to_string(), value));
        } else if let Some(rest) = key.strip_prefix(clip_prefix) {
            text_t.push((rest.to_string(), value));
        } else if let Some(rest) = key.strip_prefix(open_clip_prefix) {
            open_clip_t.push((rest.to_string(), value));
        } else {
            unknown.push(key);
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        bail!(
            "{what}: {} key(s) that belong to no {family} component: {} (expected {UNET_PREFIX}*, {VAE_PREFIX}*, \
             {clip_prefix}* or {open_clip_prefix}*, or model_ema.* / DDPM buffers, which are skipped)",
            unknown.len(),
            preview(&unknown)
        );
    }
    if family != Family::Sdxl && !text_t.is_empty() && !open_clip_t.is_empty() {
        bail!(
            "{what} holds two text encoders, {} tensors of SD-1.x's CLIP ({TEXT_PREFIX}*) and {} of SD-2.x's OpenCLIP \
             ({OPEN_CLIP_PREFIX}*); a Stable Diffusion 1.x / 2.x checkpoint has one",
            text_t.len(),
            open_clip_t.len()
        );
    }
    let text_missing = match family {
        Family::Sdxl => text_t.is_empty() || open_clip_t.is_empty(),
        _ => text_t.is_empty() && open_clip_t.is_empty(),
    };
    if unet_t.is_empty() || vae_t.is_empty() || text_missing {
        bail!(
            "{what} is not a full {family} checkpoint: it has {} UNet ({UNET_PREFIX}*), {} VAE ({VAE_PREFIX}*), {} \
             CLIP ({clip_prefix}*) and {} OpenCLIP ({open_clip_prefix}*) tensors",
            unet_t.len(),
            vae_t.len(),
            text_t.len(),
            open_clip_t.len()
        );
    }
    let hint = format!("(converted with {})", configs.origin);
    match (family, &configs.xl) {
        (Family::Sdxl, None) => bail!(
            "{what} is an SDXL checkpoint (conditioner.embedders.*) but {} are not SDXL's: give --config an SDXL \
             folder, or leave --config out for the built-in SDXL-base configs",
            configs.origin
        ),
        (Family::Sd1 | Family::Sd2, Some(_)) => bail!(
            "{what} is a {family} checkpoint but {} are SDXL's: give --config a folder of the same family",
            configs.origin
        ),
        _ => {}
    }
    // The OpenCLIP encoder in transformers' names: SD-2.x's (past-penultimate layers and the
    // projection dropped) is the only text encoder; SDXL's is the second, projection kept.
    let mut text_2 = None;
    if !open_clip_t.is_empty() {
        let (cfg, xl) = match &configs.xl {
            Some(x) => (&x.text_encoder_2, true),
            None => (&configs.text_encoder, false),
        };
        let (converted, dropped) = open_clip_to_transformers(open_clip_t, cfg, xl)
            .with_context(|| format!("{what}: converting the OpenCLIP text encoder {hint}"))?;
        if dropped > 0 {
            let why = "OpenCLIP layers past the penultimate (SD-2.x conditions on the penultimate layer)";
            *skipped.entry(why).or_default() += dropped;
        }
        if xl {
            text_2 = Some(converted);
        } else {
            text_t = converted;
        }
    }
    for (why, n) in &skipped {
        eprintln!("note: {what}: skipped {n} key(s): {why}");
    }

    let unet = UNet2DConditionModel::new(configs.unet.clone(), device)?;
    let map = name_map(&unet.vs, |k| ldm_unet_key(k, &configs.unet))?;
    load_strict_tensors(&unet.vs, &format!("{what} [{UNET_PREFIX}*]"), unet_t, &|k, _| lookup(&map, k))
        .with_context(|| format!("loading the UNet {hint}"))?;

    let vae = AutoencoderKL::new(configs.vae.clone(), device)?;
    let map = name_map(&vae.vs, |k| ldm_vae_key(k, &configs.vae))?;
    load_strict_tensors(&vae.vs, &format!("{what} [{VAE_PREFIX}*]"), vae_t, &|k, v| match lookup(&map, k) {
        // LDM's mid-block attention q/k/v/proj_out are 1×1 convs (C, C, 1, 1); ours are linear (C, C).
        KeyAction::Load(name)
            if v.dim() == 4 && name.contains(".mid_block.attentions.") && !name.contains("group_norm") =>
        {
            KeyAction::LoadValue(name, v.flatten(1, 3))
        }
        other => other,
    })
    .with_context(|| format!("loading the VAE {hint}"))?;

    let text_what = if family == Family::Sd2 { open_clip_prefix } else { clip_prefix };
    let text_encoder = ClipTextModel::new(configs.text_encoder.clone(), device)?;
    load_strict_tensors(&text_encoder.vs, &format!("{what} [{text_what}*]"), text_t, &|k, _| {
        // Older checkpoints lack the `text_model.` level (transformers < 4.22).
        KeyAction::Load(if k.starts_with("text_model.") { k.to_string() } else { format!("text_model.{k}") })
    })
    .with_context(|| format!("loading the text encoder {hint}"))?;
    let text_encoder_2 = match (text_2, &configs.xl) {
        (Some(t), Some(x)) => {
            let te2 = ClipTextModel::new(x.text_encoder_2.clone(), device)?;
            load_strict_tensors(&te2.vs, &format!("{what} [{XL_OPEN_CLIP_PREFIX}*]"), t, &|k, _| {
                KeyAction::Load(k.to_string())
            })
            .with_context(|| format!("loading the second text encoder {hint}"))?;
            Some(te2)
        }
        _ => None,
    };
    Ok(Loaded { unet, vae, text_encoder, text_encoder_2 })
}

/// The transformers name (`text_model.…`) of an OpenCLIP text-encoder key (after
/// `cond_stage_model.model.`), as diffusers' `convert_open_clip_checkpoint` maps it; `in_proj_*`
/// keys map to the `self_attn.` prefix their q/k/v parts go under. `None` for an unknown key.
pub fn open_clip_text_key(key: &str) -> Option<String> {
    let simple = [
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        ("ln_final.weight", "text_model.final_layer_norm.weight"),
        ("ln_final.bias", "text_model.final_layer_norm.bias"),
    ];
    if let Some((_, ours)) = simple.iter().find(|(k, _)| *k == key) {
        return Some(ours.to_string());
    }
    let (i, rest) = indexed(key, "transformer.resblocks.")?;
    const PARTS: [(&str, &str); 7] = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("attn.in_proj_weight", "self_attn."),
        ("attn.in_proj_bias", "self_attn."),
    ];
    let (ldm, ours) = PARTS.iter().find(|(p, _)| rest.starts_with(p))?;
    let tail = &rest[ldm.len()..];
    if ldm.starts_with("attn.in_proj") && !tail.is_empty() {
        return None;
    }
    Some(format!("text_model.encoder.layers.{i}.{ours}{tail}"))
}

/// OpenCLIP text-encoder tensors (after its prefix) in transformers' names, the fused
/// `in_proj` (3d, d) split into q, k, v in that order. SD-2.x (`xl` false): resblocks at or past
/// the config's `num_hidden_layers` are dropped (SD-2's 24th, unused: it conditions on the
/// penultimate layer), and their count returned. SDXL (`xl` true): every layer is kept and
/// `text_projection` (d, P) becomes `text_projection.weight` (P, d), as diffusers transposes it.
/// Unknown keys keep a marked name, so that the strict load reports them.
fn open_clip_to_transformers(
    tensors: Vec<(String, Tensor)>,
    cfg: &crate::models::clip_text::ClipTextConfig,
    xl: bool,
) -> Result<(Vec<(String, Tensor)>, usize)> {
    let d = cfg.hidden_size;
    let mut out = Vec::with_capacity(tensors.len() + 64);
    let mut dropped = 0;
    for (key, value) in tensors {
        if xl && key == "text_projection" {
            out.push(("text_projection.weight".to_string(), value.tr().contiguous()));
            continue;
        }
        if let Some((i, _)) = indexed(&key, "transformer.resblocks.") {
            if !xl && i as i64 >= cfg.num_hidden_layers {
                dropped += 1;
                continue;
            }
        }
        let Some(name) = open_clip_text_key(&key) else {
            out.push((format!("<unmapped> {key}"), value));
            continue;
        };
        let kind = if key.ends_with("in_proj_weight") {
            "weight"
        } else if key.ends_with("in_proj_bias") {
            "bias"
        } else {
            out.push((name, value));
            continue;
        };
        if value.size().first() != Some(&(3 * d)) {
            bail!(
                "{key} has shape {:?}; the fused q/k/v projection of a text encoder of hidden size {d} \
                 must have {} rows",
                value.size(),
                3 * d
            );
        }
        for (j, part) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            out.push((format!("{name}{part}.{kind}"), value.narrow(0, j as i64 * d, d).contiguous()));
        }
    }
    Ok((out, dropped))
}

fn preview(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(8).map(String::as_str).collect();
    let more = items.len().saturating_sub(8);
    let tail = if more > 0 { format!(", … and {more} more") } else { String::new() };
    format!("{}{tail}", shown.join(", "))
}

/// LDM name → our name, from every variable of `vs`.
fn name_map(vs: &tch::nn::VarStore, inverse: impl Fn(&str) -> Option<String>) -> Result<HashMap<String, String>> {
    let mut map = HashMap::new();
    for name in vs.variables().into_keys() {
        let ldm = inverse(&name).with_context(|| format!("parameter {name} has no single-file (LDM) name"))?;
        map.insert(ldm, name);
    }
    Ok(map)
}

/// A key with no counterpart stays as it is: it is then reported as unused, by its name.
fn lookup(map: &HashMap<String, String>, key: &str) -> KeyAction {
    KeyAction::Load(map.get(key).cloned().unwrap_or_else(|| format!("<unmapped> {key}")))
}

/// Splits `"blocks.3.rest"` after `prefix` into (3, "rest").
fn indexed<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (i, rest) = rest.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// diffusers resnet names → LDM `ResBlock` names.
fn ldm_resnet(rest: &str) -> String {
    const MAP: [(&str, &str); 6] = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("time_emb_proj.", "emb_layers.1."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("conv_shortcut.", "skip_connection."),
    ];
    for (ours, ldm) in MAP {
        if let Some(tail) = rest.strip_prefix(ours) {
            return format!("{ldm}{tail}");
        }
    }
    rest.to_string()
}

/// The LDM name (after `model.diffusion_model.`) of a UNet parameter, the inverse of diffusers'
/// `convert_ldm_unet_checkpoint`. Transformer blocks keep their names.
pub fn ldm_unet_key(name: &str, cfg: &UNetConfig) -> Option<String> {
    let n = cfg.num_levels();
    let layers = cfg.layers_per_block.resolve("layers_per_block", n).ok()?;
    let simple = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    for (ours, ldm) in simple {
        if let Some(tail) = name.strip_prefix(ours) {
            return Some(format!("{ldm}{tail}"));
        }
    }
    if let Some((b, rest)) = indexed(name, "down_blocks.") {
        let base = 1 + layers[..b].iter().map(|l| *l as usize + 1).sum::<usize>();
        if let Some((j, r)) = indexed(rest, "resnets.") {
            return Some(format!("input_blocks.{}.0.{}", base + j, ldm_resnet(r)));
        }
        if let Some((j, r)) = indexed(rest, "attentions.") {
            return Some(format!("input_blocks.{}.1.{r}", base + j));
        }
        if let Some(r) = rest.strip_prefix("downsamplers.0.conv.") {
            return Some(format!("input_blocks.{}.0.op.{r}", base + *layers.get(b)? as usize));
        }
        return None;
    }
    if let Some(rest) = name.strip_prefix("mid_block.") {
        return match indexed(rest, "resnets.") {
            Some((0, r)) => Some(format!("middle_block.0.{}", ldm_resnet(r))),
            Some((1, r)) => Some(format!("middle_block.2.{}", ldm_resnet(r))),
            Some(_) => None,
            None => indexed(rest, "attentions.").filter(|(i, _)| *i == 0).map(|(_, r)| format!("middle_block.1.{r}")),
        };
    }
    if let Some((b, rest)) = indexed(name, "up_blocks.") {
        let up_layers = |i: usize| layers[n - 1 - i] as usize + 1;
        let base = (0..b).map(up_layers).sum::<usize>();
        if let Some((j, r)) = indexed(rest, "resnets.") {
            return Some(format!("output_blocks.{}.0.{}", base + j, ldm_resnet(r)));
        }
        if let Some((j, r)) = indexed(rest, "attentions.") {
            return Some(format!("output_blocks.{}.1.{r}", base + j));
        }
        if let Some(r) = rest.strip_prefix("upsamplers.0.conv.") {
            let slot = if cfg.up_has_attention(b) { 2 } else { 1 };
            return Some(format!("output_blocks.{}.{slot}.conv.{r}", base + up_layers(b) - 1));
        }
    }
    None
}

/// The LDM name (after `first_stage_model.`) of a VAE parameter, the inverse of diffusers'
/// `convert_ldm_vae_checkpoint`.
pub fn ldm_vae_key(name: &str, cfg: &VaeConfig) -> Option<String> {
    let n = cfg.block_out_channels.len();
    let (side, rest) = name.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return matches!(side, "quant_conv" | "post_quant_conv").then(|| name.to_string());
    }
    let resnet = |r: &str| r.replacen("conv_shortcut.", "nin_shortcut.", 1);
    let mapped = if let Some(tail) = rest.strip_prefix("conv_norm_out.") {
        format!("norm_out.{tail}")
    } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        rest.to_string()
    } else if let Some(mid) = rest.strip_prefix("mid_block.") {
        match (indexed(mid, "resnets."), indexed(mid, "attentions.")) {
            (Some((0, r)), _) => format!("mid.block_1.{}", resnet(r)),
            (Some((1, r)), _) => format!("mid.block_2.{}", resnet(r)),
            (None, Some((0, r))) => {
                let (layer, tail) = r.rsplit_once('.')?;
                let ldm = match layer {
                    "group_norm" => "norm",
                    "to_q" | "query" => "q",
                    "to_k" | "key" => "k",
                    "to_v" | "value" => "v",
                    "to_out.0" | "proj_attn" => "proj_out",
                    _ => return None,
                };
                format!("mid.attn_1.{ldm}.{tail}")
            }
            _ => return None,
        }
    } else if let Some((b, r)) = indexed(rest, "down_blocks.") {
        if let Some((j, rr)) = indexed(r, "resnets.") {
            format!("down.{b}.block.{j}.{}", resnet(rr))
        } else {
            format!("down.{b}.downsample.conv.{}", r.strip_prefix("downsamplers.0.conv.")?)
        }
    } else if let Some((b, r)) = indexed(rest, "up_blocks.") {
        let level = n.checked_sub(1 + b)?;
        if let Some((j, rr)) = indexed(r, "resnets.") {
            format!("up.{level}.block.{j}.{}", resnet(rr))
        } else {
            format!("up.{level}.upsample.conv.{}", r.strip_prefix("upsamplers.0.conv.")?)
        }
    } else {
        return None;
    };
    Some(format!("{side}.{mapped}"))
}
