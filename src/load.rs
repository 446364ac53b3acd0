//! The diffusers folder layout, typed configs and strict weight loading.
//!
//! Every parameter path is the one diffusers / transformers use, so a component's safetensors
//! file loads without renaming. Loading is strict: a key of the file that the model lacks, a
//! parameter the file lacks, or a shape that differs is an error naming the file and the key
//! (tch's own `VarStore::load` silently ignores extra keys).

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

/// Reads and parses a JSON file into a typed config, naming the file on error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid config", path.display()))
}

/// Checks that each named config value is positive; the error names the config file.
pub fn require_positive(origin: &str, values: &[(&str, i64)]) -> Result<()> {
    for (key, v) in values {
        if *v <= 0 {
            bail!("{origin}: {key} must be positive, got {v}");
        }
    }
    Ok(())
}

/// The safetensors weight file of a diffusers component folder (`unet/`, `vae/`, …).
///
/// Prefers the full-precision file; falls back to the `fp16` variant. Pickled `.bin` weights
/// are refused: they can run arbitrary code and we never load them.
pub fn weight_file(component_dir: &Path) -> Result<PathBuf> {
    const NAMES: [&str; 4] = [
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "model.fp16.safetensors",
    ];
    for name in NAMES {
        let p = component_dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let bins: Vec<String> = std::fs::read_dir(component_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".bin") || n.ends_with(".ckpt") || n.ends_with(".pt"))
                .collect()
        })
        .unwrap_or_default();
    if bins.is_empty() {
        bail!("no weights in {}: expected one of {}", component_dir.display(), NAMES.join(", "))
    }
    bail!(
        "{} has only pickled weights ({}); hifi-tuner reads safetensors only — convert them first",
        component_dir.display(),
        bins.join(", ")
    )
}

/// Reads every tensor of a safetensors file, with an error that names the file.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path).map_err(|e| {
        anyhow!("cannot read {} as safetensors (truncated or not a safetensors file?): {e}", path.display())
    })
}

/// [`read_safetensors`] for hifi-tuner's own files (subjects, embeddings, inversions,
/// checkpoints): every tensor must be finite ([`check_finite`]; the error names the file and
/// the first bad key).
pub fn read_safetensors_finite(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let tensors = read_safetensors(path)?;
    for (key, t) in &tensors {
        check_finite(t, &path.display().to_string(), key)?;
    }
    Ok(tensors)
}

/// What to do with one key of a weight file before it is matched against the model.
pub enum KeyAction {
    /// Load it under this (possibly renamed) name.
    Load(String),
    /// Load this converted value under this name (e.g. a legacy (C, C, 1, 1) projection loaded
    /// into a (C, C) linear weight).
    LoadValue(String, Tensor),
    /// A known key the model does not use (e.g. the `position_ids` buffer older
    /// transformers checkpoints carry). It is skipped, not reported as unused.
    Skip,
}

/// Loads `path` into `vs`, strictly: every variable of `vs` must be in the file with the same
/// shape, and every key of the file must be used (after `map_key`, which sees each key and its
/// value). Two keys of the file that land on the same variable are an error. Values are
/// converted to the dtype and device of the variables (fp16 files load into an fp32 model).
pub fn load_strict(vs: &nn::VarStore, path: &Path, map_key: &dyn Fn(&str, &Tensor) -> KeyAction) -> Result<()> {
    let file = read_safetensors(path)?;
    load_strict_tensors(vs, &path.display().to_string(), file, map_key)
        .map_err(|e| anyhow!("{e:#} (the model is built from its config.json)"))
}

/// [`load_strict`] on tensors already read; `what` names their origin in errors (e.g. a
/// single-file checkpoint and the component's key prefix).
pub fn load_strict_tensors(
    vs: &nn::VarStore,
    what: &str,
    file: Vec<(String, Tensor)>,
    map_key: &dyn Fn(&str, &Tensor) -> KeyAction,
) -> Result<()> {
    let mut vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut unused = Vec::new();
    let mut misshaped = Vec::new();
    for (key, value) in file {
        let (name, value) = match map_key(&key, &value) {
            KeyAction::Skip => continue,
            KeyAction::Load(name) => (name, value),
            KeyAction::LoadValue(name, v) => (name, v),
        };
        let Some(var) = vars.get_mut(&name) else {
            unused.push(key);
            continue;
        };
        if let Some(first) = seen.get(&name) {
            bail!("{what}: keys {first} and {key} both load into {name}");
        }
        if var.size() != value.size() {
            misshaped.push(format!("{key}: file {:?}, model {:?}", value.size(), var.size()));
            continue;
        }
        if !matches!(value.kind(), Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            bail!("{what}: tensor {key} has dtype {:?}, expected a float type", value.kind());
        }
        tch::no_grad(|| var.f_copy_(&value)).with_context(|| format!("{what}: cannot copy tensor {key}"))?;
        // Checked in the model's dtype and on its device (fast there; catches an fp32 value
        // that overflows fp16 too).
        check_finite(var, what, &key)?;
        seen.insert(name, key);
    }
    unused.sort();
    let missing: Vec<&String> = vars.keys().filter(|k| !seen.contains_key(*k)).collect();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("{} missing key(s): {}", missing.len(), preview(&missing)));
    }
    if !unused.is_empty() {
        problems.push(format!("{} unused key(s): {}", unused.len(), preview(&unused)));
    }
    if !misshaped.is_empty() {
        problems.push(format!("{} mis-shaped key(s): {}", misshaped.len(), preview(&misshaped)));
    }
    if !problems.is_empty() {
        bail!("{what} does not match the model: {}", problems.join("; "));
    }
    Ok(())
}

/// The number of NaN or ±inf values of a tensor, when it has any.
///
/// The fast path is a float32 sum: any NaN or ±inf makes it NaN or ±inf, so a finite sum proves
/// every value finite. It costs 0.04 s per 10⁸ float32 values on 2 CPU threads (a tenth of
/// copying them; `isfinite().all()` takes 1 s); only a non-finite sum (a bad value, or finite
/// values overflowing float32) pays for the exact count.
pub fn non_finite(value: &Tensor) -> Option<i64> {
    if value.numel() == 0 || !value.is_floating_point() {
        return None;
    }
    if value.sum(Kind::Float).double_value(&[]).is_finite() {
        return None;
    }
    let bad = value.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
    (bad > 0).then_some(bad)
}

/// Refuses a loaded tensor holding NaN or ±inf: a model with one draws black images without
/// any other sign. Cheaper than the copy that loads it ([`non_finite`]); the error names the
/// file (`what`) and the key (the first bad one, in the file's order).
pub fn check_finite(value: &Tensor, what: &str, key: &str) -> Result<()> {
    if let Some(bad) = non_finite(value) {
        bail!(
            "{what}: tensor {key} holds {bad} NaN or infinite value(s) (the file is damaged, or was saved from a \
             training run that diverged)"
        );
    }
    Ok(())
}

fn preview<T: std::fmt::Display>(items: &[T]) -> String {
    const SHOWN: usize = 8;
    let mut s: Vec<String> = items.iter().take(SHOWN).map(|k| k.to_string()).collect();
    if items.len() > SHOWN {
        s.push(format!("… and {} more", items.len() - SHOWN));
    }
    s.join(", ")
}

/// A diffusers Stable Diffusion folder: `model_index.json` and the component subfolders.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
}

impl ModelDir {
    /// The components a Stable Diffusion pipeline needs.
    pub const COMPONENTS: [&'static str; 5] = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"];

    /// Checks the layout: `model_index.json` and every component folder.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            bail!("model folder {} does not exist", root.display());
        }
        if !root.join("model_index.json").is_file() {
            bail!(
                "{} is not a diffusers Stable Diffusion folder: model_index.json not found \
                 (expected model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/)",
                root.display()
            );
        }
        for c in Self::COMPONENTS {
            if !root.join(c).is_dir() {
                bail!("{}: missing component folder {c}/", root.display());
            }
        }
        Ok(Self { root: root.to_path_buf() })
    }

    pub fn component(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// [`xl`](Self::xl) for a `--config` folder, which may lack `model_index.json` (then
    /// `force_zeros_for_empty_prompt` is SDXL's default, true).
    pub fn xl_if_indexed(&self) -> Result<Option<bool>> {
        if self.root.join("model_index.json").is_file() {
            return self.xl();
        }
        Ok(self.root.join("text_encoder_2").is_dir().then_some(true))
    }

    /// SDXL's layout: `Some(force_zeros_for_empty_prompt)` (default true, as
    /// `StableDiffusionXLPipeline`) when `model_index.json` lists `text_encoder_2` or the folder
    /// has `text_encoder_2/`; then `tokenizer_2/` must be there too. `None` for SD-1.x / 2.x.
    pub fn xl(&self) -> Result<Option<bool>> {
        let index_path = self.root.join("model_index.json");
        let index: serde_json::Value = read_json(&index_path)?;
        if !index_lists(&index, "text_encoder_2") && !self.root.join("text_encoder_2").is_dir() {
            return Ok(None);
        }
        for c in ["text_encoder_2", "tokenizer_2"] {
            if !self.root.join(c).is_dir() {
                bail!(
                    "{}: missing component folder {c}/ (an SDXL folder has text_encoder/, text_encoder_2/, tokenizer/, \
                     tokenizer_2/, unet/, vae/ and scheduler/)",
                    self.root.display()
                );
            }
        }
        let force_zeros = match index.get("force_zeros_for_empty_prompt") {
            None | Some(serde_json::Value::Null) => true,
            Some(v) => v.as_bool().with_context(|| {
                format!("{}: force_zeros_for_empty_prompt must be true or false, got {v}", index_path.display())
            })?,
        };
        Ok(Some(force_zeros))
    }
}

/// Whether a `model_index.json` lists `component` (a `[library, class]` entry that is not
/// `[null, null]`).
pub fn index_lists(index: &serde_json::Value, component: &str) -> bool {
    index.get(component).is_some_and(|v| v.as_array().is_some_and(|a| a.iter().any(|x| !x.is_null())))
}

/// The string metadata (`__metadata__`) of a safetensors file's header.
pub fn safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let v = safetensors_header(path)?;
    let mut out = HashMap::new();
    if let Some(m) = v.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in m {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.to_string());
            }
        }
    }
    Ok(out)
}

/// The JSON header of a safetensors file (tensor names → dtype, shape, offsets, and
/// `__metadata__`), read without reading any tensor.
pub fn safetensors_header(path: &Path) -> Result<serde_json::Value> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(|| format!("{} is too short to be safetensors", path.display()))?;
    let len = u64::from_le_bytes(len);
    let file_len = f.metadata()?.len();
    if len > 100_000_000 || len + 8 > file_len {
        bail!("{}: corrupt safetensors header (length {len})", path.display());
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)?;
    serde_json::from_slice(&header).with_context(|| format!("{}: safetensors header is not JSON", path.display()))
}
