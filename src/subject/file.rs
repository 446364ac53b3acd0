//! `subject.safetensors` (hifi mode) and `learned_embeds.safetensors` (textual inversion).
//!
//! A subject file holds `c_s` (n, d), the step-wise `c_s_t` (T, n, d) with their DDIM
//! `timesteps` (T,) (absent when Algorithm 1 was skipped), and string metadata in the
//! safetensors header: format, mode, space, n_tokens, class_noun, captions (JSON), model,
//! ddim_steps, hidden_size.

use super::Space;
use crate::io::write_safetensors_atomic;
use crate::load::{read_safetensors_finite, safetensors_metadata};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub const FORMAT: &str = "hifi-tuner-subject/1";
pub const SUBJECT_FILE: &str = "subject.safetensors";
/// `dreambooth.json`, the manifest of a DreamBooth subject folder (`dreambooth::job`).
/// Named here, in the lower module, so that the `learn` job can refuse such a folder without
/// importing `dreambooth` (imports go one way: `dreambooth` → `subject`).
pub const MANIFEST_FILE: &str = "dreambooth.json";
/// The textual-inversion file of a `learn --mode ti` folder (diffusers' name).
pub const LEARNED_EMBEDS_FILE: &str = "learned_embeds.safetensors";
/// SDXL: the second text encoder's rows, beside [`LEARNED_EMBEDS_FILE`] (`textual_inversion_sdxl.py`).
pub const LEARNED_EMBEDS_2_FILE: &str = "learned_embeds_2.safetensors";

/// A learned subject: c_s and the step-wise c_s^t of Algorithm 1.
#[derive(Debug)]
pub struct Subject {
    /// c_s (n, d).
    pub c_s: Tensor,
    /// c_s^t for each DDIM timestep of `timesteps` (same order, T down to 1); empty when
    /// Algorithm 1 was skipped.
    pub stepwise: Vec<Tensor>,
    pub timesteps: Vec<i64>,
    pub space: Space,
    pub class_noun: String,
    pub captions: Vec<String>,
    pub model: String,
    pub ddim_steps: usize,
}

impl Subject {
    pub fn n_tokens(&self) -> i64 {
        self.c_s.size()[0]
    }

    /// Writes the file atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = vec![("c_s".to_string(), self.c_s.to_kind(Kind::Float).detach())];
        if !self.stepwise.is_empty() {
            tensors.push(("c_s_t".into(), Tensor::stack(&self.stepwise, 0).to_kind(Kind::Float).detach()));
            tensors.push(("timesteps".into(), Tensor::from_slice(&self.timesteps)));
        }
        let mut meta = BTreeMap::new();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("mode".into(), "hifi".into());
        meta.insert("space".into(), self.space.as_str().into());
        meta.insert("n_tokens".into(), self.n_tokens().to_string());
        meta.insert("hidden_size".into(), self.c_s.size()[1].to_string());
        meta.insert("class_noun".into(), self.class_noun.clone());
        meta.insert("captions".into(), serde_json::to_string(&self.captions)?);
        meta.insert("model".into(), self.model.clone());
        meta.insert("ddim_steps".into(), self.ddim_steps.to_string());
        write_safetensors_atomic(path, &tensors, &meta)
    }

    /// Reads a subject file, or the `subject.safetensors` inside a subject folder.
    pub fn load(path: &Path) -> Result<Self> {
        let path = resolve(path);
        let meta = safetensors_metadata(&path)?;
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            bail!("{} is not a hifi-tuner subject file (format {FORMAT} expected)", path.display());
        }
        let get = |k: &str| meta.get(k).with_context(|| format!("{}: metadata lacks {k}", path.display()));
        let tensors: BTreeMap<String, Tensor> = read_safetensors_finite(&path)?.into_iter().collect();
        let c_s = tensors.get("c_s").with_context(|| format!("{}: no c_s tensor", path.display()))?;
        let (stepwise, timesteps) = match (tensors.get("c_s_t"), tensors.get("timesteps")) {
            (Some(s), Some(t)) => (
                (0..s.size()[0]).map(|i| s.get(i)).collect(),
                Vec::<i64>::try_from(t).with_context(|| format!("{}: bad timesteps", path.display()))?,
            ),
            (None, None) => (vec![], vec![]),
            _ => bail!("{}: c_s_t and timesteps must come together", path.display()),
        };
        Ok(Self {
            c_s: c_s.shallow_clone(),
            stepwise,
            timesteps,
            space: Space::parse(get("space")?)?,
            class_noun: get("class_noun")?.clone(),
            captions: serde_json::from_str(get("captions")?)?,
            model: get("model")?.clone(),
            ddim_steps: get("ddim_steps")?.parse()?,
        })
    }

    /// c_s^t for each timestep of a sampling schedule: the learned one for the same timestep,
    /// else the learned one nearest in t (with a warning), else c_s.
    pub fn per_step(&self, schedule: &[i64]) -> Vec<Tensor> {
        if self.stepwise.is_empty() {
            return schedule.iter().map(|_| self.c_s.shallow_clone()).collect();
        }
        if schedule != self.timesteps.as_slice() {
            eprintln!(
                "warning: the subject was learned for {} DDIM steps; using the step-wise embedding of the nearest learned timestep",
                self.ddim_steps
            );
        }
        schedule
            .iter()
            .map(|&t| {
                let i = (0..self.timesteps.len()).min_by_key(|&i| (self.timesteps[i] - t).abs()).unwrap_or(0);
                self.stepwise[i].shallow_clone()
            })
            .collect()
    }
}

/// A folder means the subject file inside it.
pub fn resolve(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(SUBJECT_FILE)
    } else {
        path.to_path_buf()
    }
}

/// Writes `{token: (n, d)}`, the textual-inversion file of diffusers' `load_textual_inversion`
/// (`learned_embeds.safetensors`).
pub fn save_learned_embeds(path: &Path, token: &str, rows: &Tensor) -> Result<()> {
    write_safetensors_atomic(path, &[(token.to_string(), rows.to_kind(Kind::Float).detach())], &BTreeMap::new())
}

/// The keys of an SDXL embedding in AUTOMATIC1111 / ComfyUI's form: the rows for the first
/// (CLIP ViT-L) and the second (OpenCLIP bigG) text encoder.
pub const SDXL_L_KEY: &str = "clip_l";
pub const SDXL_G_KEY: &str = "clip_g";

/// An SDXL textual-inversion embedding: (token, rows for encoder 1 (n, d₁), rows for encoder 2
/// (n, d₂)). Read from A1111 / ComfyUI's one file `{"clip_l": (n, d₁), "clip_g": (n, d₂)}` (the
/// token is `token`, else the file stem), or diffusers' two files (`textual_inversion_sdxl.py`):
/// `learned_embeds.safetensors` `{token: (n, d₁)}` with `learned_embeds_2.safetensors`
/// `{token: (n, d₂)}` beside it — `path` may name the first file or their folder.
pub fn read_learned_embeds_xl(path: &Path, token: Option<&str>) -> Result<(String, Tensor, Tensor)> {
    let first = if path.is_dir() { path.join("learned_embeds.safetensors") } else { path.to_path_buf() };
    let tensors = read_safetensors_finite(&first)?;
    let get = |k: &str| tensors.iter().find(|(key, _)| key == k).map(|(_, t)| t.shallow_clone());
    if let (Some(l), Some(g)) = (get(SDXL_L_KEY), get(SDXL_G_KEY)) {
        let name = match token {
            Some(t) => t.to_string(),
            None => first
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .with_context(|| format!("{}: no file name to take the token from; pass --token", first.display()))?,
        };
        let two_d = |t: Tensor, k: &str| -> Result<Tensor> {
            let t = if t.dim() == 1 { t.unsqueeze(0) } else { t };
            if t.dim() != 2 {
                bail!("{}: {k} has shape {:?}, expected (n, d)", first.display(), t.size());
            }
            Ok(t.to_kind(Kind::Float))
        };
        let (l, g) = (two_d(l, SDXL_L_KEY)?, two_d(g, SDXL_G_KEY)?);
        if l.size()[0] != g.size()[0] {
            bail!(
                "{}: clip_l has {} vectors and clip_g {}; they must be as many",
                first.display(),
                l.size()[0],
                g.size()[0]
            );
        }
        if tensors.len() != 2 {
            let keys: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
            bail!("{}: an SDXL embedding holds clip_l and clip_g only, found keys {keys:?}", first.display());
        }
        return Ok((name, l, g));
    }
    let stem = first.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let second = first.with_file_name(format!("{stem}_2.safetensors"));
    if !second.is_file() {
        bail!(
            "{} is not an SDXL embedding: SDXL needs rows for both text encoders — one file {{\"clip_l\": (n, d₁), \
             \"clip_g\": (n, d₂)}} (AUTOMATIC1111 / ComfyUI), or diffusers' learned_embeds.safetensors with \
             learned_embeds_2.safetensors beside it ({} is missing)",
            first.display(),
            second.display()
        );
    }
    let (t1, l) = read_learned_embeds(&first, token)?;
    let (t2, g) = read_learned_embeds(&second, token)?;
    if t1 != t2 {
        bail!(
            "{} holds the token {t1:?} and {} the token {t2:?}; they must be the same",
            first.display(),
            second.display()
        );
    }
    if l.size()[0] != g.size()[0] {
        bail!(
            "{} has {} vectors and {} {}; they must be as many",
            first.display(),
            l.size()[0],
            second.display(),
            g.size()[0]
        );
    }
    Ok((t1, l, g))
}

/// The key AUTOMATIC1111 / ComfyUI embedding safetensors hold the vectors under.
pub const A1111_KEY: &str = "emb_params";

/// The file name AUTOMATIC1111 and ComfyUI will know the embedding by (they use the file stem as
/// the prompt word): the token without `<`/`>`, other characters outside `[A-Za-z0-9._-]` → `-`.
pub fn a1111_file_name(token: &str) -> String {
    let stem: String = token
        .trim_matches(|c| c == '<' || c == '>')
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .collect();
    let stem = if stem.is_empty() { "embedding".to_string() } else { stem };
    format!("{stem}.safetensors")
}

/// Writes an SDXL embedding as AUTOMATIC1111 / ComfyUI read it: `{"clip_l": (n, d₁),
/// "clip_g": (n, d₂)}`; the header records the token as `name`.
pub fn save_a1111_embedding_xl(path: &Path, token: &str, clip_l: &Tensor, clip_g: &Tensor) -> Result<()> {
    let mut meta = BTreeMap::new();
    meta.insert("name".to_string(), token.to_string());
    let rows = [
        (SDXL_L_KEY.to_string(), clip_l.to_kind(Kind::Float).detach()),
        (SDXL_G_KEY.to_string(), clip_g.to_kind(Kind::Float).detach()),
    ];
    write_safetensors_atomic(path, &rows, &meta)
}

/// Writes `{"emb_params": (n, d)}`, the safetensors embedding AUTOMATIC1111 reads from its
/// `embeddings/` folder and ComfyUI from `models/embeddings/` (the prompt word is the file stem).
/// The header records the token as `name`.
pub fn save_a1111_embedding(path: &Path, token: &str, rows: &Tensor) -> Result<()> {
    let mut meta = BTreeMap::new();
    meta.insert("name".to_string(), token.to_string());
    write_safetensors_atomic(path, &[(A1111_KEY.to_string(), rows.to_kind(Kind::Float).detach())], &meta)
}

/// Reads a textual-inversion file: diffusers' single `{token: (n, d)}` entry, AUTOMATIC1111's /
/// ComfyUI's `{"emb_params": (n, d)}`, or a converted A1111 `.pt` (`string_to_param.*`, with
/// any `string_to_token.*` ignored). The token is `token` when given; otherwise the key for the
/// diffusers format, and the file stem for the A1111 formats (as A1111 and ComfyUI name them;
/// diffusers would register the literal token `emb_params`).
pub fn read_learned_embeds(path: &Path, token: Option<&str>) -> Result<(String, Tensor)> {
    let tensors = read_safetensors_finite(path)?;
    let keys: Vec<String> = tensors.iter().map(|(k, _)| k.clone()).collect();
    if keys.iter().any(|k| k == SDXL_L_KEY) && keys.iter().any(|k| k == SDXL_G_KEY) {
        bail!(
            "{} is an SDXL embedding ({{\"clip_l\", \"clip_g\"}}: one part per text encoder); it needs an SDXL model",
            path.display()
        );
    }
    let mut params: Vec<(String, Tensor)> =
        tensors.into_iter().filter(|(k, _)| !k.starts_with("string_to_token.")).collect();
    if params.len() != 1 {
        bail!(
            "{}: a textual-inversion file holds one embedding — {{token: (n, d)}} (diffusers), {{\"emb_params\": (n, d)}} \
             (AUTOMATIC1111 / ComfyUI) or string_to_param.* — found keys {keys:?}",
            path.display()
        );
    }
    let (key, mut rows) = params.remove(0);
    if rows.dim() == 1 {
        rows = rows.unsqueeze(0);
    }
    if rows.dim() != 2 {
        bail!("{}: embedding {key} has shape {:?}, expected (n, d)", path.display(), rows.size());
    }
    let a1111 = key == A1111_KEY || key.starts_with("string_to_param.");
    let name = match token {
        Some(t) => t.to_string(),
        None if a1111 => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .with_context(|| format!("{}: no file name to take the token from; pass --token", path.display()))?,
        None => key,
    };
    Ok((name, rows.to_kind(Kind::Float)))
}
