//! DreamBooth's metrics (Ruiz et al. 2023, §4.1), as HiFi Tuner's Tables 1–2 report them.
//!
//! - **DINO**: the mean, over every (generated, real) pair, of the cosine between their DINO
//!   CLS embeddings ([`crate::eval::dino`]).
//! - **CLIP-I**: the same with CLIP image embeddings (`get_image_features`).
//! - **CLIP-T**: the mean, over generated images, of the cosine between the image's CLIP image
//!   embedding and the CLIP text embedding (`get_text_features`) of its prompt. The benchmark
//!   passes the prompt with the subject placeholder replaced by the class noun
//!   ("a dog in the snow"), so every method is scored against the same text.
//!
//! Cosines are computed in f64 as torch's `cosine_similarity`: a·b / max(‖a‖‖b‖, 1e-8).

use crate::eval::dino::Dino;
use crate::models::clip::Clip;
use crate::tokenizer::ClipTokenizer;
use anyhow::{bail, Context, Result};
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The cosine of every row of `a` (n, d) with every row of `b` (m, d): (n, m), f64 on the CPU.
pub fn cosine_matrix(a: &Tensor, b: &Tensor) -> Tensor {
    let a = a.detach().to_device(Device::Cpu).to_kind(Kind::Double);
    let b = b.detach().to_device(Device::Cpu).to_kind(Kind::Double);
    let na = a.norm_scalaropt_dim(2.0, [1i64].as_slice(), false); // (n,)
    let nb = b.norm_scalaropt_dim(2.0, [1i64].as_slice(), false); // (m,)
    let denom = na.unsqueeze(1).matmul(&nb.unsqueeze(0)).clamp_min(1e-8); // (n, m)
    a.matmul(&b.transpose(0, 1)) / denom
}

/// Mean cosine over all pairs (row i of `generated`, row j of `real`): DINO and CLIP-I.
pub fn mean_pairwise_cosine(generated: &Tensor, real: &Tensor) -> f64 {
    cosine_matrix(generated, real).mean(Kind::Double).double_value(&[])
}

/// Mean cosine of row i of `a` with row i of `b` (n, d each): CLIP-T.
pub fn mean_paired_cosine(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size()[0], b.size()[0], "paired cosine of {:?} and {:?}", a.size(), b.size());
    cosine_matrix(a, b).diagonal(0, 0, 1).mean(Kind::Double).double_value(&[])
}

/// The scores of a set of generated images against a subject's real photos.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
    pub n_generated: usize,
    pub n_real: usize,
}

/// The models behind the metrics: CLIP (with its tokenizer) and DINO.
pub struct Evaluator {
    pub clip: Clip,
    pub dino: Dino,
    pub tokenizer: ClipTokenizer,
}

impl Evaluator {
    /// `clip_dir`: a transformers `CLIPModel` folder; its tokenizer files are used when present
    /// (`vocab.json` + `merges.txt` or `tokenizer.json`), else the built-in CLIP tokenizer (the
    /// same BPE). `dino_dir`: a `ViTModel` folder.
    pub fn load(clip_dir: &Path, dino_dir: &Path, device: Device) -> Result<Self> {
        let clip = Clip::load(clip_dir, device)?;
        let dino = Dino::load(dino_dir, device)?;
        let has_tok = clip_dir.join("tokenizer.json").is_file() || clip_dir.join("vocab.json").is_file();
        let tokenizer = if has_tok { ClipTokenizer::from_dir(clip_dir)? } else { ClipTokenizer::sd15()? };
        Ok(Self { clip, dino, tokenizer })
    }

    /// CLIP text features of prompts (n, P) (77 ids each, truncated as transformers does).
    pub fn text_features(&self, prompts: &[String]) -> Result<Tensor> {
        let rows: Vec<Tensor> =
            prompts.iter().map(|p| Tensor::from_slice(&self.tokenizer.encode_padded(p).ids)).collect();
        tch::no_grad(|| self.clip.model.text_features(&Tensor::stack(&rows, 0)))
    }

    /// DINO, CLIP-I and CLIP-T of `generated` (with one prompt each) against `real`.
    pub fn score(&self, real: &[DynamicImage], generated: &[DynamicImage], prompts: &[String]) -> Result<Scores> {
        if real.is_empty() {
            bail!("no real photos to score against");
        }
        if generated.is_empty() {
            bail!("no generated images to score");
        }
        if prompts.len() != generated.len() {
            bail!("{} prompts for {} generated images", prompts.len(), generated.len());
        }
        let dino = mean_pairwise_cosine(&self.dino.embed_images(generated)?, &self.dino.embed_images(real)?);
        let gen_clip = self.clip.embed_images(generated)?;
        let clip_i = mean_pairwise_cosine(&gen_clip, &self.clip.embed_images(real)?);
        let clip_t = mean_paired_cosine(&gen_clip, &self.text_features(prompts)?);
        Ok(Scores { dino, clip_i, clip_t, n_generated: generated.len(), n_real: real.len() })
    }
}

/// The image files (.jpg, .jpeg, .png) of a folder, sorted by name.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot read the folder {}", dir.display()))?;
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    let e = e.to_ascii_lowercase();
                    e == "jpg" || e == "jpeg" || e == "png"
                })
        })
        .collect();
    out.sort();
    if out.is_empty() {
        bail!("no images (.jpg, .jpeg, .png) in {}", dir.display());
    }
    Ok(out)
}

/// Opens images, naming the file on error.
pub fn open_images(paths: &[PathBuf]) -> Result<Vec<DynamicImage>> {
    paths.iter().map(|p| crate::io::open_image(p)).collect()
}

/// The prompt of an AUTOMATIC1111-style `parameters` text: everything before the
/// `Negative prompt:` line (or, without one, before the last line starting with `Steps:`).
pub fn prompt_of_parameters(params: &str) -> String {
    if let Some((p, _)) = params.split_once("\nNegative prompt:") {
        return p.to_string();
    }
    match params.rfind("\nSteps:") {
        Some(i) => params[..i].to_string(),
        None => params.to_string(),
    }
}

/// The prompt stored in a PNG's `parameters` chunk (as `generate` writes it).
pub fn png_prompt(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut magic = [0u8; 8];
    let is_png = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|_| magic == *b"\x89PNG\r\n\x1a\n")
        .unwrap_or(false);
    if !is_png && path.is_file() {
        bail!(
            "{} is not a PNG, so it carries no prompt (a generated image's prompt is read from its PNG `parameters` \
             chunk): pass --prompts FILE, JSON lines {{\"image\": \"{}\", \"prompt\": \"...\"}}",
            path.display(),
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        );
    }
    let text = crate::io::png_text(path)?;
    let params = text.iter().find(|(k, _)| k == "parameters").with_context(|| {
        format!("{} has no `parameters` text chunk with its prompt (pass --prompts)", path.display())
    })?;
    Ok(prompt_of_parameters(&params.1))
}

/// A `--prompts` file: JSON lines `{"image": name, "prompt": text}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptLine {
    pub image: String,
    pub prompt: String,
}

/// Reads a prompts file (JSON lines), naming the file and line on error.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptLine>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!("{}:{}: expected {{\"image\": name, \"prompt\": text}}", path.display(), i + 1)
            })
        })
        .collect()
}

/// The prompt of each generated image: from `prompts` (matched by file name) when given, else
/// from the PNG's `parameters` chunk.
pub fn prompts_for(images: &[PathBuf], prompts: Option<&[PromptLine]>, origin: Option<&Path>) -> Result<Vec<String>> {
    images
        .iter()
        .map(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match prompts {
                Some(lines) => lines.iter().find(|l| l.image == name).map(|l| l.prompt.clone()).with_context(|| {
                    format!(
                        "{} has no prompt for the image {name}",
                        origin.map(|o| o.display().to_string()).unwrap_or_default()
                    )
                }),
                None => png_prompt(p),
            }
        })
        .collect()
}
