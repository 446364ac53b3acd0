//! LoRA files: read (diffusers / PEFT and kohya, the formats diffusers' `load_lora_weights`,
//! AUTOMATIC1111 and ComfyUI load), merged into a model's weights at a scale, and written (by
//! `learn --mode lora`).
//!
//! - **diffusers / PEFT** (`pytorch_lora_weights.safetensors`): `unet.<module>.lora_A.weight`
//!   (A, (r, in)), `unet.<module>.lora_B.weight` (B, (out, r)), `text_encoder.<module>.…`, with
//!   diffusers' module paths; α from the `lora_adapter_metadata` JSON in the safetensors metadata
//!   (`unet.lora_alpha`, `unet.r`, …), else α = r (as diffusers, which then builds its
//!   `LoraConfig` with `lora_alpha = r`).
//! - **kohya** (sd-scripts; what A1111 and ComfyUI read natively): `lora_unet_<module with _>
//!   .lora_down.weight` (A), `.lora_up.weight` (B), `.alpha` (a scalar); the text encoder as
//!   `lora_te_…` (sd-scripts' SD-1 name) or `lora_te1_…` (what diffusers'
//!   `convert_state_dict_to_kohya` writes). Underscores are ambiguous, so a kohya name is
//!   resolved against the model's own module names.
//! - **SDXL**: diffusers' `text_encoder_2.…` and kohya's `lora_te1_…` / `lora_te2_…` for the two
//!   text encoders; sd-scripts names SDXL's UNet modules by the original (LDM) layout
//!   (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), which is read (besides the
//!   diffusers-style names) and written for SDXL ([`crate::single_file::ldm_unet_key`]).
//!
//! **Applied by merging** (W ← W + s·(α/r)·B·A, in float32 before any `--dtype` cast), as
//! diffusers' `fuse_lora(lora_scale=s)`: the result equals diffusers' unfused
//! `load_lora_weights` + `cross_attention_kwargs={"scale": s}` (W·x + s·(α/r)·B·A·x) up to float
//! rounding, costs nothing per step, and every command (guidance, inversion, replacement,
//! benchmark) sees an ordinary model. Linear and convolution weights of the UNet and the text
//! encoder are accepted (LoCon's 3×3 A with a 1×1 B merges as B·A reshaped); a key that names
//! no module of the model, a mis-shaped one, or an SDXL text_encoder_2 key on a model without
//! one is an error naming it. Training keeps the adapters apart instead ([`crate::models::lora`]).

use crate::load::{read_safetensors, safetensors_metadata};
use crate::models::lora::LoraLinear;
use crate::models::unet::config::UNetConfig;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

/// The diffusers / PEFT file name (`save_lora_weights`).
pub const PEFT_FILE: &str = "pytorch_lora_weights.safetensors";
/// The safetensors metadata key of diffusers' adapter configs.
pub const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";
pub const UNET_PREFIX: &str = "unet";
pub const TEXT_ENCODER_PREFIX: &str = "text_encoder";
pub const TEXT_ENCODER_2_PREFIX: &str = "text_encoder_2";

/// `--lora FILE[:SCALE]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
}

impl LoraSpec {
    /// `FILE` (scale 1) or `FILE:SCALE`; the file must exist and be safetensors.
    pub fn parse(s: &str) -> Result<Self> {
        let (path, scale) = match s.rsplit_once(':') {
            Some((p, sc)) if !p.is_empty() && sc.parse::<f64>().is_ok() => (p, sc.parse::<f64>()?),
            _ => (s, 1.0),
        };
        if !scale.is_finite() {
            bail!("--lora {s}: the scale must be a finite number");
        }
        let path = PathBuf::from(path);
        crate::single_file::refuse_pickle(&path)?;
        if !path.is_file() {
            bail!("--lora {}: no such file (expected a .safetensors LoRA, diffusers or kohya format)", path.display());
        }
        Ok(Self { path, scale })
    }
}

/// Which network a layer adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Component {
    pub fn prefix(self) -> &'static str {
        match self {
            Component::Unet => UNET_PREFIX,
            Component::TextEncoder => TEXT_ENCODER_PREFIX,
            Component::TextEncoder2 => TEXT_ENCODER_2_PREFIX,
        }
    }
}

/// The networks a LoRA merges into: the UNet and text encoder(s); on SDXL also the second
/// text encoder and the UNet's config, which names its modules in sd-scripts' (LDM) layout.
pub struct Networks<'a> {
    pub unet: &'a nn::VarStore,
    pub text_encoder: &'a nn::VarStore,
    pub text_encoder_2: Option<&'a nn::VarStore>,
    /// SDXL: the UNet's config, for kohya names in the LDM layout.
    pub unet_ldm: Option<&'a UNetConfig>,
}

/// The LDM (sd-scripts' SDXL) path of a UNet module: `down_blocks.1.attentions.0.…` →
/// `input_blocks.4.1.…`.
pub fn ldm_module(module: &str, cfg: &UNetConfig) -> Option<String> {
    crate::single_file::ldm_unet_key(&format!("{module}.weight"), cfg)?.strip_suffix(".weight").map(str::to_string)
}

/// Where a layer's module is named: a module path of the model (diffusers / PEFT) or a kohya
/// name with `_` for `.` (resolved against the model).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Module(String),
    Kohya(String),
}

/// One adapted layer of a file.
#[derive(Debug)]
pub struct LayerLora {
    pub component: Component,
    pub target: Target,
    /// A: (r, in[, kh, kw]).
    pub down: Tensor,
    /// B: (out, r[, 1, 1]).
    pub up: Tensor,
    pub alpha: f64,
    /// The file's keys of A and B (errors name them).
    pub down_key: String,
}

impl LayerLora {
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }
}

/// The layers of a LoRA file.
#[derive(Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    pub kohya: bool,
    pub layers: Vec<LayerLora>,
}

/// Reads a LoRA file (either format; see the module docs).
pub fn read(path: &Path) -> Result<LoraFile> {
    crate::single_file::refuse_pickle(path)?;
    let what = path.display();
    let tensors: BTreeMap<String, Tensor> = read_safetensors(path)?.into_iter().collect();
    if tensors.is_empty() {
        bail!("{what}: no tensors (expected a LoRA)");
    }
    if let Some(k) = tensors.keys().find(|k| k.contains("dora_scale") || k.contains("lora_magnitude_vector")) {
        bail!("{what}: {k} is a DoRA magnitude; DoRA is not supported (plain LoRA only)");
    }
    let kohya = tensors.keys().any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te"));
    let layers = if kohya { read_kohya(path, &tensors)? } else { read_peft(path, &tensors)? };
    for l in &layers {
        let (d, u) = (l.down.size(), l.up.size());
        if d.len() < 2 || u.len() < 2 || u[1] != d[0] || (u.len() == 4 && (u[2], u[3]) != (1, 1)) || d.len() != u.len()
        {
            bail!(
                "{what}: {} has shape {d:?} but its up weight has {u:?} (expected A (r, in) and B (out, r))",
                l.down_key
            );
        }
        if !(l.alpha.is_finite()) {
            bail!("{what}: the alpha of {} is not finite", l.down_key);
        }
    }
    Ok(LoraFile { path: path.to_path_buf(), kohya, layers })
}

fn read_peft(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<Vec<LayerLora>> {
    let what = path.display();
    // diffusers' adapter metadata: {"unet.lora_alpha": 8, "unet.r": 4, …} as JSON
    let meta = safetensors_metadata(path)?;
    let adapter: serde_json::Value = match meta.get(ADAPTER_METADATA_KEY) {
        Some(s) => serde_json::from_str(s).with_context(|| format!("{what}: {ADAPTER_METADATA_KEY} is not JSON"))?,
        None => serde_json::Value::Null,
    };
    let mut layers = Vec::new();
    for (key, down) in tensors {
        if key.ends_with(".lora_B.weight") {
            continue;
        }
        let Some(module_key) = key.strip_suffix(".lora_A.weight") else {
            bail!(
                "{what}: unknown key {key} (expected diffusers / PEFT keys unet.<module>.lora_A.weight / .lora_B.weight, \
                 or kohya keys lora_unet_… / lora_te_…)"
            );
        };
        let (component, module) = if let Some(m) = module_key.strip_prefix("unet.") {
            (Component::Unet, m)
        } else if let Some(m) = module_key.strip_prefix("text_encoder_2.") {
            (Component::TextEncoder2, m)
        } else if let Some(m) = module_key.strip_prefix("text_encoder.") {
            (Component::TextEncoder, m)
        } else {
            bail!("{what}: {key} is neither unet.… nor text_encoder.… / text_encoder_2.… (a diffusers LoRA has these prefixes)");
        };
        let up_key = format!("{module_key}.lora_B.weight");
        let up = tensors.get(&up_key).with_context(|| format!("{what}: {key} has no {up_key}"))?;
        let r = down.size()[0];
        let p = component.prefix();
        let pattern = adapter.get(format!("{p}.alpha_pattern")).and_then(|v| v.as_object());
        if let Some(pat) = pattern.filter(|m| !m.is_empty()) {
            bail!("{what}: per-layer alphas ({p}.alpha_pattern: {pat:?}) are not supported");
        }
        let alpha = match adapter.get(format!("{p}.lora_alpha")).and_then(|v| v.as_f64()) {
            Some(a) => {
                let meta_r = adapter.get(format!("{p}.r")).and_then(|v| v.as_i64());
                if meta_r.is_some_and(|mr| mr != r) {
                    bail!("{what}: {key} has rank {r} but the metadata says {p}.r = {}", meta_r.unwrap_or(0));
                }
                a
            }
            None => r as f64,
        };
        layers.push(LayerLora {
            component,
            target: Target::Module(module.to_string()),
            down: down.shallow_clone(),
            up: up.shallow_clone(),
            alpha,
            down_key: key.clone(),
        });
    }
    // every B belongs to an A
    for key in tensors.keys().filter(|k| k.ends_with(".lora_B.weight")) {
        let a = key.replace(".lora_B.weight", ".lora_A.weight");
        if !tensors.contains_key(&a) {
            bail!("{what}: {key} has no {a}");
        }
    }
    Ok(layers)
}

fn read_kohya(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<Vec<LayerLora>> {
    let what = path.display();
    let mut layers = Vec::new();
    for (key, t) in tensors {
        let (name, part) = key.split_once('.').with_context(|| format!("{what}: unknown key {key}"))?;
        let (component, rest) = if let Some(r) = name.strip_prefix("lora_unet_") {
            (Component::Unet, r)
        } else if let Some(r) = name.strip_prefix("lora_te1_").or_else(|| name.strip_prefix("lora_te_")) {
            (Component::TextEncoder, r)
        } else if let Some(r) = name.strip_prefix("lora_te2_") {
            (Component::TextEncoder2, r)
        } else {
            bail!("{what}: unknown key {key} (expected lora_unet_…, lora_te_… or SDXL's lora_te1_… / lora_te2_… in a kohya LoRA)");
        };
        match part {
            "lora_down.weight" => {}
            "lora_up.weight" | "alpha" => {
                if !tensors.contains_key(&format!("{name}.lora_down.weight")) {
                    bail!("{what}: {key} has no {name}.lora_down.weight");
                }
                continue;
            }
            _ => bail!("{what}: unknown key {key} (expected .lora_down.weight, .lora_up.weight or .alpha)"),
        }
        let up_key = format!("{name}.lora_up.weight");
        let up = tensors.get(&up_key).with_context(|| format!("{what}: {key} has no {up_key}"))?;
        let alpha = match tensors.get(&format!("{name}.alpha")) {
            Some(a) if a.numel() == 1 => a.to_kind(Kind::Double).view([-1]).double_value(&[0]),
            Some(a) => bail!("{what}: {name}.alpha has shape {:?}, expected a scalar", a.size()),
            None => t.size()[0] as f64,
        };
        layers.push(LayerLora {
            component,
            target: Target::Kohya(rest.to_string()),
            down: t.shallow_clone(),
            up: up.shallow_clone(),
            alpha,
            down_key: key.clone(),
        });
    }
    Ok(layers)
}

/// A module path of a file as our networks name it: transformers 5 saves the text encoder
/// without its `text_model.` level (`encoder.layers.0.…`, what diffusers 0.42 writes), older
/// versions with it; both name the same module.
pub fn module_path(component: Component, module: &str) -> String {
    match component {
        Component::TextEncoder | Component::TextEncoder2 if !module.starts_with("text_model.") => {
            format!("text_model.{module}")
        }
        _ => module.to_string(),
    }
}

/// The kohya name of a module path: `.` → `_`.
pub fn kohya_name(module: &str) -> String {
    module.replace('.', "_")
}

/// Merges `file` at `scale` into the networks' weights (in place, without gradient):
/// W ← W + scale·(α/r)·B·A for each layer. Everything is checked before anything changes.
pub fn merge(file: &LoraFile, scale: f64, nets: &Networks) -> Result<()> {
    let what = file.path.display();
    if nets.text_encoder_2.is_none() {
        if let Some(l) = file.layers.iter().find(|l| l.component == Component::TextEncoder2) {
            bail!(
                "{what}: {} adapts a second text encoder: this is an SDXL LoRA, and the model is SD-1.x / 2.x",
                l.down_key
            );
        }
    }
    let mut vars =
        vec![(Component::Unet, nets.unet.variables()), (Component::TextEncoder, nets.text_encoder.variables())];
    if let Some(te2) = nets.text_encoder_2 {
        vars.push((Component::TextEncoder2, te2.variables()));
    }
    let modules =
        |c: Component| -> &HashMap<String, Tensor> { &vars.iter().find(|(k, _)| *k == c).expect("present").1 };
    // kohya names of each component's modules (those with a weight)
    let kohya: Vec<(Component, HashMap<String, String>)> = vars
        .iter()
        .map(|(c, v)| {
            let mut m: HashMap<String, String> = HashMap::new();
            for module in v.keys().filter_map(|k| k.strip_suffix(".weight")) {
                m.insert(kohya_name(module), module.to_string());
                // the text encoder also without `text_model.` (peft's conversion of a
                // transformers-5 state dict)
                if let Some(short) = module.strip_prefix("text_model.") {
                    m.insert(kohya_name(short), module.to_string());
                }
                // SDXL's UNet also by its LDM path (sd-scripts' SDXL names)
                if let (Component::Unet, Some(cfg)) = (c, nets.unet_ldm) {
                    if let Some(ldm) = ldm_module(module, cfg) {
                        m.insert(kohya_name(&ldm), module.to_string());
                    }
                }
            }
            (*c, m)
        })
        .collect();
    let mut plan = Vec::new();
    for l in &file.layers {
        let module = match &l.target {
            Target::Module(m) => module_path(l.component, m),
            Target::Kohya(k) => {
                let map = &kohya.iter().find(|(c, _)| *c == l.component).expect("present").1;
                match map.get(k) {
                    Some(m) => m.clone(),
                    None => bail!(
                        "{what}: {} names no module of the model's {} (a {} module path, with _ for ., is \
                         expected)",
                        l.down_key,
                        l.component.prefix(),
                        l.component.prefix()
                    ),
                }
            }
        };
        let Some(w) = modules(l.component).get(&format!("{module}.weight")) else {
            bail!("{what}: {} names no module of the model's {} ({module})", l.down_key, l.component.prefix());
        };
        let (ws, d, u) = (w.size(), l.down.size(), l.up.size());
        let fits = ws.len() == d.len() && ws[0] == u[0] && ws[1] == d[1] && ws[2..] == d[2..];
        if !fits {
            bail!(
                "{what}: {} (A {d:?}, B {u:?}) does not fit {}.{module}.weight {ws:?} (a LoRA for another model or \
                 architecture?)",
                l.down_key,
                l.component.prefix()
            );
        }
        plan.push((w.shallow_clone(), l));
    }
    tch::no_grad(|| {
        for (mut w, l) in plan {
            let r = l.rank() as f64;
            let dev = w.device();
            let a = l.down.to_kind(Kind::Float).to_device(dev).flatten(1, -1); // (r, in·k·k)
            let b = l.up.to_kind(Kind::Float).to_device(dev).flatten(1, -1); // (out, r)
            let delta = (b.matmul(&a) * (scale * l.alpha / r)).view(w.size().as_slice());
            let merged = w.to_kind(Kind::Float) + delta;
            w.copy_(&merged.to_kind(w.kind()));
        }
    });
    Ok(())
}

/// Reads and merges each `--lora` into the networks.
pub fn apply_all(specs: &[LoraSpec], nets: &Networks) -> Result<()> {
    for s in specs {
        let f = read(&s.path)?;
        merge(&f, s.scale, nets)?;
        eprintln!(
            "LoRA {} ({} layers, {} format) merged at scale {}",
            s.path.display(),
            f.layers.len(),
            if f.kohya { "kohya" } else { "diffusers" },
            s.scale
        );
    }
    Ok(())
}

/// A trained adapter to write: its component, the module path and A, B.
pub struct Trained<'a> {
    pub component: Component,
    /// As our networks name it (`text_model.encoder.…` for the text encoder).
    pub module: String,
    pub down: &'a Tensor,
    pub up: &'a Tensor,
}

/// The adapters of `layers` (those that carry one), as [`Trained`].
pub fn trained_of<'a>(component: Component, layers: &'a [&'a mut LoraLinear]) -> Vec<Trained<'a>> {
    layers
        .iter()
        .filter_map(|l| {
            l.adapter.as_ref().map(|a| Trained { component, module: l.name.clone(), down: &a.down, up: &a.up })
        })
        .collect()
}

/// The diffusers / PEFT key of a trained A or B: `unet.<module>.lora_A.weight`; the text
/// encoder's without `text_model.` (`text_encoder.encoder.layers.0.self_attn.q_proj.…`), as
/// diffusers 0.42 on transformers 5 saves and loads them (files with it are read too).
pub fn peft_key(component: Component, module: &str, up: bool) -> String {
    let module = match component {
        Component::TextEncoder | Component::TextEncoder2 => module.strip_prefix("text_model.").unwrap_or(module),
        Component::Unet => module,
    };
    format!("{}.{module}.lora_{}.weight", component.prefix(), if up { "B" } else { "A" })
}

/// peft's `target_modules` entry of a module path: its last name (`to_out.0` for diffusers'
/// output projection).
fn target_name(module: &str) -> &str {
    if module.ends_with("to_out.0") {
        "to_out.0"
    } else {
        module.rsplit('.').next().unwrap_or(module)
    }
}

/// Writes `pytorch_lora_weights.safetensors` as diffusers' `save_lora_weights` does (float32,
/// `format: pt`, the adapter configs in `lora_adapter_metadata`), atomically.
pub fn write_peft(path: &Path, layers: &[Trained], rank: i64, alpha: f64) -> Result<()> {
    let mut tensors = Vec::new();
    let mut targets: BTreeMap<&str, std::collections::BTreeSet<&str>> = BTreeMap::new();
    for l in layers {
        tensors.push((peft_key(l.component, &l.module, false), cpu_f32(l.down)));
        tensors.push((peft_key(l.component, &l.module, true), cpu_f32(l.up)));
        targets.entry(l.component.prefix()).or_default().insert(target_name(&l.module));
    }
    let mut adapter = serde_json::Map::new();
    for (p, t) in &targets {
        // the fields diffusers' `LoraConfig(**metadata)` needs (peft's names)
        adapter.insert(format!("{p}.r"), rank.into());
        adapter.insert(format!("{p}.lora_alpha"), alpha.into());
        adapter.insert(format!("{p}.target_modules"), serde_json::json!(t));
        adapter.insert(format!("{p}.init_lora_weights"), "gaussian".into());
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(ADAPTER_METADATA_KEY.to_string(), serde_json::to_string_pretty(&adapter)?);
    crate::io::write_safetensors_atomic(path, &tensors, &meta)
}

/// Writes the kohya file AUTOMATIC1111 and ComfyUI load (`lora_unet_…`, `lora_te_…` as
/// sd-scripts names SD-1 text-encoder layers; `.lora_down.weight`, `.lora_up.weight`, `.alpha`;
/// `ss_network_dim` / `ss_network_alpha` metadata as sd-scripts writes), atomically. For SDXL
/// (`unet_ldm` = its UNet's config) the UNet's modules take their LDM paths and the text
/// encoders `lora_te1_` / `lora_te2_`, as sd-scripts' `sdxl_train_network.py` writes.
pub fn write_kohya(
    path: &Path,
    layers: &[Trained],
    rank: i64,
    alpha: f64,
    base_model: &str,
    unet_ldm: Option<&UNetConfig>,
) -> Result<()> {
    let mut tensors = Vec::new();
    for l in layers {
        let (prefix, module) = match (l.component, unet_ldm) {
            (Component::Unet, None) => ("lora_unet", l.module.clone()),
            (Component::Unet, Some(cfg)) => (
                "lora_unet",
                ldm_module(&l.module, cfg).with_context(|| format!("{} has no LDM name in SDXL's UNet", l.module))?,
            ),
            (Component::TextEncoder, None) => ("lora_te", l.module.clone()),
            (Component::TextEncoder, Some(_)) => ("lora_te1", l.module.clone()),
            (Component::TextEncoder2, _) => ("lora_te2", l.module.clone()),
        };
        let name = format!("{prefix}_{}", kohya_name(&module));
        tensors.push((format!("{name}.lora_down.weight"), cpu_f32(l.down)));
        tensors.push((format!("{name}.lora_up.weight"), cpu_f32(l.up)));
        tensors.push((format!("{name}.alpha"), Tensor::from(alpha as f32)));
    }
    let (version, architecture) = match unet_ldm {
        None => ("sd_v1", "stable-diffusion-v1/lora"),
        Some(_) => ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    };
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("ss_network_module".to_string(), "networks.lora".to_string());
    meta.insert("ss_network_dim".to_string(), rank.to_string());
    meta.insert("ss_network_alpha".to_string(), format_alpha(alpha));
    meta.insert("ss_base_model_version".to_string(), version.to_string());
    meta.insert("ss_sd_model_name".to_string(), base_model.to_string());
    meta.insert("modelspec.architecture".to_string(), architecture.to_string());
    crate::io::write_safetensors_atomic(path, &tensors, &meta)
}

fn format_alpha(a: f64) -> String {
    if a.fract() == 0.0 {
        format!("{a:.1}")
    } else {
        a.to_string()
    }
}

fn cpu_f32(t: &Tensor) -> Tensor {
    t.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous()
}
