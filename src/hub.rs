//! What `--model` names: a diffusers folder, a single-file checkpoint, or a Hugging Face id
//! `org/name[@revision]` resolved from the local Hugging Face cache first and downloaded (with
//! the `hf-hub` crate) only when something is missing.
//!
//! The cache is the one `huggingface_hub` uses: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`, with `models--org--name/snapshots/COMMIT/…` and
//! `refs/REVISION` holding the commit. `HF_ENDPOINT` (default `https://huggingface.co`),
//! `HF_TOKEN` and `HF_HUB_OFFLINE=1` are honoured. Only the files the loader reads are fetched:
//! `model_index.json`, the component configs, the tokenizer files and one safetensors file per
//! network (the `fp16` variant when asked) — for SDXL also `text_encoder_2/` and `tokenizer_2/`.

use crate::single_file::refuse_pickle;
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// A parsed `--model` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A diffusers folder.
    Folder(PathBuf),
    /// A single-file SD-1.x checkpoint (`.safetensors`).
    SingleFile(PathBuf),
    /// A Hugging Face model id, with an optional revision (branch, tag or commit).
    Hub { repo: String, revision: Option<String> },
}

impl ModelSpec {
    /// An existing folder or file wins; otherwise `org/name[@revision]` is a hub id.
    pub fn parse(arg: &Path) -> Result<Self> {
        if arg.is_dir() {
            return Ok(Self::Folder(arg.to_path_buf()));
        }
        if arg.is_file() {
            refuse_pickle(arg)?;
            return Ok(Self::SingleFile(arg.to_path_buf()));
        }
        let s = arg.to_string_lossy();
        if let Some((repo, revision)) = parse_hub_id(&s) {
            return Ok(Self::Hub { repo, revision });
        }
        bail!(
            "--model {s} does not exist (no such folder or file), and is not a Hugging Face id (org/name or \
             org/name@revision). Expected a diffusers folder, a single-file .safetensors checkpoint, or a hub id"
        )
    }
}

/// `org/name[@revision]` with hub-valid names, or `None`.
pub fn parse_hub_id(s: &str) -> Option<(String, Option<String>)> {
    let (repo, revision) = match s.split_once('@') {
        Some((r, rev)) if !rev.is_empty() && !rev.contains(char::is_whitespace) => (r, Some(rev.to_string())),
        Some(_) => return None,
        None => (s, None),
    };
    let (org, name) = repo.split_once('/')?;
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.ends_with('.')
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (ok(org) && ok(name)).then(|| (repo.to_string(), revision))
}

/// The Hugging Face hub cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn cache_dir() -> Result<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = var("HF_HUB_CACHE") {
        return Ok(p);
    }
    if let Some(p) = var("HF_HOME") {
        return Ok(p.join("hub"));
    }
    let home = var("HOME").ok_or_else(|| anyhow!("cannot find the Hugging Face cache: set HF_HUB_CACHE or HF_HOME"))?;
    Ok(home.join(".cache/huggingface/hub"))
}

/// Whether `HF_HUB_OFFLINE` asks for no network (`1`, `true`, `yes`, `on`).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The weight file names of the three networks, full precision first.
const NETWORKS: [(&str, &str); 3] =
    [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")];

/// Files read besides the weights; the tokenizer needs vocab.json + merges.txt or tokenizer.json.
const CONFIGS: [&str; 5] = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
];
/// Optional files of each tokenizer folder.
const TOKENIZER_OPTIONAL: [&str; 3] = ["tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"];

/// What our loader reads from a repository: SD-1.x / 2.x's five components, and for SDXL
/// (`xl`) also `text_encoder_2/` and `tokenizer_2/`.
struct Layout {
    configs: Vec<String>,
    networks: Vec<(&'static str, &'static str)>,
    tokenizers: Vec<&'static str>,
}

impl Layout {
    fn new(xl: bool) -> Self {
        let mut configs: Vec<String> = CONFIGS.iter().map(|s| s.to_string()).collect();
        let mut networks = NETWORKS.to_vec();
        let mut tokenizers = vec!["tokenizer"];
        if xl {
            configs.push("text_encoder_2/config.json".into());
            networks.push(("text_encoder_2", "model"));
            tokenizers.push("tokenizer_2");
        }
        Self { configs, networks, tokenizers }
    }

    /// The layout of a snapshot folder: SDXL when its `model_index.json` lists `text_encoder_2`.
    fn of_snapshot(snapshot: &Path) -> Self {
        let index = std::fs::read_to_string(snapshot.join("model_index.json")).ok();
        let v: Option<serde_json::Value> = index.and_then(|t| serde_json::from_str(&t).ok());
        let xl = v.is_some_and(|v| crate::load::index_lists(&v, "text_encoder_2"));
        Self::new(xl)
    }
}

/// Weight file names of a network in order of preference: with a `variant`, the variant first.
fn weight_names(component: &str, stem: &str, variant: Option<&str>) -> Vec<String> {
    let full = format!("{component}/{stem}.safetensors");
    let var = |v: &str| format!("{component}/{stem}.{v}.safetensors");
    match variant {
        Some(v) => vec![var(v), full],
        None => vec![full, var("fp16")],
    }
}

/// What is missing from a snapshot folder for our loader (empty: complete).
fn missing_files(snapshot: &Path, variant: Option<&str>) -> Vec<String> {
    let has = |f: &str| snapshot.join(f).is_file();
    let layout = Layout::of_snapshot(snapshot);
    let mut missing: Vec<String> = layout.configs.iter().filter(|f| !has(f)).cloned().collect();
    for t in &layout.tokenizers {
        if !(has(&format!("{t}/tokenizer.json")) || has(&format!("{t}/vocab.json")) && has(&format!("{t}/merges.txt")))
        {
            missing.push(format!("{t}/vocab.json + {t}/merges.txt (or {t}/tokenizer.json)"));
        }
    }
    for (component, stem) in &layout.networks {
        let names = weight_names(component, stem, variant);
        // With a variant asked for, only that file will do.
        let acceptable = if variant.is_some() { &names[..1] } else { &names[..] };
        if !acceptable.iter().any(|f| has(f)) {
            missing.push(acceptable.join(" or "));
        }
    }
    missing
}

/// The repo's folder in the cache: `models--org--name`.
pub fn repo_folder(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The cached snapshot of `repo` at `revision` (a commit hash, or a name under `refs/`), if any.
pub fn cached_snapshot(cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let folder = repo_folder(cache, repo);
    let is_hash = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_hash {
        revision.to_string()
    } else {
        std::fs::read_to_string(folder.join("refs").join(revision)).ok()?.trim().to_string()
    };
    let snap = folder.join("snapshots").join(commit);
    snap.is_dir().then_some(snap)
}

/// Resolves a hub id to a local diffusers folder (a cache snapshot), downloading what our
/// loader reads when it is not cached (unless `HF_HUB_OFFLINE=1`).
pub fn resolve(repo: &str, revision: Option<&str>, variant: Option<&str>) -> Result<PathBuf> {
    let cache = cache_dir()?;
    let rev = revision.unwrap_or("main");
    if let Some(snap) = cached_snapshot(&cache, repo, rev) {
        let missing = missing_files(&snap, variant);
        if missing.is_empty() {
            return Ok(snap);
        }
        if offline() {
            bail!(
                "{repo}@{rev}: the cached snapshot {} lacks {}; HF_HUB_OFFLINE=1 forbids downloading them \
                 (unset HF_HUB_OFFLINE, or fetch them with `huggingface-cli download {repo}`)",
                snap.display(),
                missing.join(", ")
            );
        }
    } else if offline() {
        bail!(
            "{repo}@{rev} is not in the Hugging Face cache {} (looked for {}), and HF_HUB_OFFLINE=1 forbids \
             downloading it: unset HF_HUB_OFFLINE, or point --model at a local folder or file",
            cache.display(),
            repo_folder(&cache, repo).join("refs").join(rev).display()
        );
    }
    download(&cache, repo, rev, variant)
}

/// The hub client's handle on `repo` at `rev` (`HF_ENDPOINT` and `HF_TOKEN` honoured, the
/// given cache), the endpoint, and the repository's file names.
fn open_repo(
    cache: &Path,
    repo: &str,
    rev: &str,
) -> Result<(hf_hub::api::sync::ApiRepo, String, std::collections::HashSet<String>)> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    let endpoint =
        std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()).unwrap_or_else(|| "https://huggingface.co".into());
    let mut builder = ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_endpoint(endpoint.trim_end_matches('/').to_string())
        .with_progress(true);
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().context("cannot set up the Hugging Face client")?;
    let handle = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, rev.to_string()));
    let info = handle.info().map_err(|e| anyhow!("{repo}@{rev}: cannot read the repository from {endpoint}: {e}"))?;
    let siblings = info.siblings.into_iter().map(|s| s.rfilename).collect();
    Ok((handle, endpoint, siblings))
}

/// Downloads the files our loader reads into the cache; returns the snapshot folder.
fn download(cache: &Path, repo: &str, rev: &str, variant: Option<&str>) -> Result<PathBuf> {
    let (handle, endpoint, siblings) = open_repo(cache, repo, rev)?;
    let layout = Layout::new(siblings.contains("text_encoder_2/config.json"));
    let mut wanted: Vec<String> = Vec::new();
    for f in &layout.configs {
        if !siblings.contains(f) {
            bail!(
                "{repo}@{rev} is not a diffusers Stable Diffusion repository: it has no {f} (for a single-file \
                 checkpoint, download the .safetensors and pass its path)"
            );
        }
        wanted.push(f.clone());
    }
    for t in &layout.tokenizers {
        wanted.extend(TOKENIZER_OPTIONAL.iter().map(|f| format!("{t}/{f}")).filter(|f| siblings.contains(f)));
        let has_json = siblings.contains(&format!("{t}/tokenizer.json"));
        for f in ["vocab.json", "merges.txt"].map(|f| format!("{t}/{f}")) {
            if siblings.contains(&f) {
                wanted.push(f);
            } else if !has_json {
                bail!("{repo}@{rev}: the tokenizer has neither {f} nor {t}/tokenizer.json");
            }
        }
    }
    for (component, stem) in &layout.networks {
        let names = weight_names(component, stem, variant);
        let acceptable = if variant.is_some() { &names[..1] } else { &names[..] };
        let Some(f) = acceptable.iter().find(|f| siblings.contains(f.as_str())) else {
            bail!(
                "{repo}@{rev}: no safetensors weights for {component} (looked for {}); pickled .bin weights are \
                 never loaded",
                acceptable.join(", ")
            );
        };
        wanted.push(f.clone());
    }
    let mut snapshot = None;
    for f in &wanted {
        let path = handle.get(f).map_err(|e| anyhow!("{repo}@{rev}: cannot download {f} from {endpoint}: {e}"))?;
        // `…/snapshots/COMMIT/<f>`: strip the file's own components.
        let mut root = path.clone();
        for _ in Path::new(f).components() {
            root.pop();
        }
        snapshot.get_or_insert(root);
    }
    let snap = snapshot.ok_or_else(|| anyhow!("{repo}@{rev}: nothing to download"))?;
    let missing = missing_files(&snap, variant);
    if !missing.is_empty() {
        bail!("{repo}@{rev}: after downloading, {} still lacks {}", snap.display(), missing.join(", "));
    }
    Ok(snap)
}

/// The files of a transformers model folder: each entry of `required` lists alternatives (one
/// must be there; the first the repository has is fetched), `optional` ones are fetched when
/// the repository has them.
#[derive(Debug, Clone, Copy)]
pub struct FolderFiles<'a> {
    /// What the folder is, for errors ("a BLIP captioner").
    pub what: &'a str,
    pub required: &'a [&'a [&'a str]],
    pub optional: &'a [&'a str],
}

impl FolderFiles<'_> {
    fn missing(&self, snapshot: &Path) -> Vec<String> {
        self.required
            .iter()
            .filter(|alts| !alts.iter().any(|f| snapshot.join(f).is_file()))
            .map(|alts| alts.join(" or "))
            .collect()
    }
}

/// A local folder, or a hub id `org/name[@revision]` resolved to a cache snapshot holding
/// `files` (downloaded when missing, unless `HF_HUB_OFFLINE=1`) — for transformers folders
/// (BLIP), as [`resolve`] is for diffusers ones.
pub fn resolve_folder(arg: &Path, files: &FolderFiles) -> Result<PathBuf> {
    if arg.is_dir() {
        return Ok(arg.to_path_buf());
    }
    let s = arg.to_string_lossy();
    let Some((repo, revision)) = parse_hub_id(&s) else {
        bail!("{s} is not a folder, nor a Hugging Face id (org/name or org/name@revision) of {}", files.what);
    };
    let cache = cache_dir()?;
    let rev = revision.as_deref().unwrap_or("main");
    if let Some(snap) = cached_snapshot(&cache, &repo, rev) {
        let missing = files.missing(&snap);
        if missing.is_empty() {
            return Ok(snap);
        }
        if offline() {
            bail!(
                "{repo}@{rev}: the cached snapshot {} lacks {}; HF_HUB_OFFLINE=1 forbids downloading them",
                snap.display(),
                missing.join(", ")
            );
        }
    } else if offline() {
        bail!(
            "{repo}@{rev} is not in the Hugging Face cache {}, and HF_HUB_OFFLINE=1 forbids downloading it: \
             unset HF_HUB_OFFLINE, or give a local folder",
            cache.display()
        );
    }
    download_folder(&cache, &repo, rev, files)
}

fn download_folder(cache: &Path, repo: &str, rev: &str, files: &FolderFiles) -> Result<PathBuf> {
    let (handle, endpoint, siblings) = open_repo(cache, repo, rev)?;
    let mut wanted: Vec<&str> = Vec::new();
    for alts in files.required {
        let Some(f) = alts.iter().find(|f| siblings.contains(**f)) else {
            bail!(
                "{repo}@{rev} is not {}: it has no {} (pickled .bin weights are never loaded)",
                files.what,
                alts.join(" or ")
            );
        };
        wanted.push(f);
    }
    wanted.extend(files.optional.iter().filter(|f| siblings.contains(**f)));
    let mut snapshot = None;
    for f in wanted {
        let path = handle.get(f).map_err(|e| anyhow!("{repo}@{rev}: cannot download {f} from {endpoint}: {e}"))?;
        snapshot.get_or_insert_with(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    snapshot.ok_or_else(|| anyhow!("{repo}@{rev}: nothing to download"))
}
