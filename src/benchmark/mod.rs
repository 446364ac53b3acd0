//! The DreamBooth benchmark (HiFi Tuner Tables 1–2): units of (subject, method) = learn,
//! generate the prompts × images, score (DINO, CLIP-I, CLIP-T); sharded by unit index for
//! cluster arrays; merged by [`report`].
//!
//! # Methods (the rows of the paper's Table 2)
//!
//! | method | learn | generate |
//! |---|---|---|
//! | `ti` | textual inversion: n new tokens `<SUBJECT>_i` in the captions "a photo of a {tokens}" (…), initialised at the class noun's mean token embedding, plain MSE | prompt with "{0} {1}" → the tokens |
//! | `ti+mask` | as `ti`, loss masked by the subject masks (Eq. 5's M) | as `ti` |
//! | `ti+mask+reg` | HiFi mode: c_s in the last n (padding) positions of captions "a photo of a {class}" (…), initialised at φ_s, masked loss + w_s‖c_s − φ_s‖² (Eq. 6); no Algorithm 1 | prompt with "{0} {1}" → the class noun, c_s spliced in every step |
//! | `ti+mask+reg+stepwise` | as `ti+mask+reg`, then Algorithm 1 (I = `--stepwise-steps` per DDIM step) | c_s^t per step (Eq. 7) |
//! | `hifi` | as `ti+mask+reg+stepwise` | + reference guidance (§3.3, Algorithms 2 and 4, reference by DINO) for non-live subjects; live subjects (class cat or dog, DreamBooth's 9 live subjects) generate as `ti+mask+reg+stepwise` (the paper's rule) |
//!
//! | `db`, `db+guidance` | DreamBooth (every UNet weight) | "a sks CLASS …" on the fine-tuned model (+ reference guidance) |
//! | *`copy`* (reference) | nothing | image j of prompt p = the subject's photo (p·images_per_prompt + j) mod n_photos, resized to the generated size ([`copy_image`]): the ceiling |
//! | *`base`* (reference) | nothing | the class-noun prompt ([`class_prompt`]) on the base model, same seeds: the floor |
//!
//! "+reg" is thus the paper's parameter regularisation: the embedding lives in the padding
//! positions, starts at φ_s (the empty prompt's padding embeddings) and is pulled towards it.
//!
//! # Seeds
//!
//! Image j of prompt p uses seed `--seed + p · images_per_prompt + j`, one image per call, for
//! every method: the methods of a subject start from the same x_T.
//!
//! # Units on disk
//!
//! `RUN/units/SUBJECT/METHOD/` holds `images/pPP-J.png` (with the PNG `parameters` chunk),
//! `prompts.jsonl` (the CLIP-T prompt of each image), `subject/` (the learn folder), `real/`
//! (thumbnails of the real photos, for the report), `scores.json` and `log.txt`. It is built in
//! `RUN/units/SUBJECT/.METHOD.partial/` and renamed into place when complete, so a unit folder
//! exists only when finished: a rerun skips it; a killed unit leaves only the `.partial` folder,
//! which the rerun deletes and redoes. A failed unit (an error, or a panic inside it) writes
//! `RUN/units/SUBJECT/METHOD.error.txt` and the others go on.
//!
//! A unit runs under a lock (`RUN/units/SUBJECT/.METHOD.lock`, [`crate::outdir`]): shards may
//! share a run folder, but a second process never works on a unit another one holds; it
//! reports the holder. A rerun skips finished units only when they were made with its settings
//! (the `settings` of `scores.json`); otherwise it is refused before any work, or, with
//! `--redo-mismatched`, those units are redone.

pub mod report;
pub mod validity;

use crate::eval::metrics::{image_files, open_images, Evaluator, PromptLine};
use crate::guidance::job::{generate_guided, GuidedSubject, ReferenceOptions};
use crate::guidance::reference::GuidanceConfig;
use crate::io::{write_bytes_atomic, RgbImage};
use crate::pipeline::{GenerateRequest, LoadOptions, StableDiffusion};
use crate::subject::file::{Subject, SUBJECT_FILE};
use crate::subject::job::{captions, captions_from, learn, LearnJob};
use crate::subject::learn::LearnArgs;
use crate::subject::{conditioning, ti, Mode, Space};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Tensor};

/// The dataset's prompt and class file.
pub const PROMPTS_FILE: &str = "prompts_and_classes.txt";
/// Classes of DreamBooth's live subjects (no reference guidance, the live prompt list).
pub const LIVE_CLASSES: [&str; 2] = ["cat", "dog"];

/// A row of Table 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    #[serde(rename = "ti")]
    Ti,
    #[serde(rename = "ti+mask")]
    TiMask,
    #[serde(rename = "ti+mask+reg")]
    TiMaskReg,
    #[serde(rename = "ti+mask+reg+stepwise")]
    TiMaskRegStepwise,
    #[serde(rename = "hifi")]
    Hifi,
    /// Table 1's DreamBooth row: the whole UNet fine-tuned (`learn --mode dreambooth`).
    #[serde(rename = "db")]
    Db,
    /// "Ours (DreamBooth)": reference guidance on the fine-tuned model.
    #[serde(rename = "db+guidance")]
    DbGuidance,
    /// Reference row, the ceiling: no learning, each output a training photo copied unchanged
    /// (resized to the generated size).
    #[serde(rename = "copy")]
    Copy,
    /// Reference row, the floor: no learning, the base model on the class-noun prompt.
    #[serde(rename = "base")]
    Base,
    /// DreamBooth-LoRA (`learn --mode lora`): low-rank adapters on the attention projections.
    #[serde(rename = "lora")]
    Lora,
    /// "Ours (DreamBooth)" in the form people use: reference guidance on the LoRA subject.
    #[serde(rename = "lora+guidance")]
    LoraGuidance,
}

impl Method {
    /// All methods, in the stable order of units and tables (the reference rows last, so the
    /// unit indices of the other methods are those of runs made before they existed).
    /// (`lora`, `lora+guidance` came later, so they follow the reference rows here.)
    pub const ALL: [Method; 11] = [
        Method::Ti,
        Method::TiMask,
        Method::TiMaskReg,
        Method::TiMaskRegStepwise,
        Method::Hifi,
        Method::Db,
        Method::DbGuidance,
        Method::Copy,
        Method::Base,
        Method::Lora,
        Method::LoraGuidance,
    ];

    /// The place of a method in the report's tables: the learned rows in [`Self::ALL`]'s order,
    /// then the reference rows.
    pub fn table_rank(self) -> usize {
        let learned = Self::ALL.into_iter().filter(|m| !m.reference());
        let order = learned.chain(Self::ALL.into_iter().filter(|m| m.reference()));
        order.into_iter().position(|m| m == self).unwrap_or(Self::ALL.len())
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Ti => "ti",
            Method::TiMask => "ti+mask",
            Method::TiMaskReg => "ti+mask+reg",
            Method::TiMaskRegStepwise => "ti+mask+reg+stepwise",
            Method::Hifi => "hifi",
            Method::Db => "db",
            Method::DbGuidance => "db+guidance",
            Method::Copy => "copy",
            Method::Base => "base",
            Method::Lora => "lora",
            Method::LoraGuidance => "lora+guidance",
        }
    }

    /// A reference row (`copy`, `base`): nothing learned; the ceiling and the floor of a table.
    pub fn reference(self) -> bool {
        matches!(self, Method::Copy | Method::Base)
    }

    /// A DreamBooth row (a fine-tuned model or LoRA per subject, not an embedding).
    pub fn dreambooth(self) -> bool {
        matches!(self, Method::Db | Method::DbGuidance | Method::Lora | Method::LoraGuidance)
    }

    /// A LoRA row.
    pub fn lora(self) -> bool {
        matches!(self, Method::Lora | Method::LoraGuidance)
    }

    /// Generated with reference guidance (for non-live subjects).
    pub fn guided(self) -> bool {
        matches!(self, Method::Hifi | Method::DbGuidance | Method::LoraGuidance)
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| format!("unknown method {s:?} (known: {})", Self::ALL.map(|m| m.name()).join(", ")))
    }

    pub fn mode(self) -> Mode {
        match self {
            Method::Ti | Method::TiMask => Mode::Ti,
            _ => Mode::Hifi,
        }
    }

    /// The masked loss, or (db+guidance) the reference mask M_r.
    pub fn needs_masks(self) -> bool {
        !matches!(self, Method::Ti | Method::Db | Method::Lora | Method::Copy | Method::Base)
    }

    pub fn stepwise(self) -> bool {
        matches!(self, Method::TiMaskRegStepwise | Method::Hifi)
    }

    /// One line for the report: what this method runs.
    pub fn describe(self) -> &'static str {
        match self {
            Method::Ti => "learn --mode ti (n new tokens in the caption, initialised at the class noun's mean embedding), unmasked MSE; prompt 'a <tokens> …'",
            Method::TiMask => "learn --mode ti with --masks: masked MSE; prompt 'a <tokens> …'",
            Method::TiMaskReg => "learn --mode hifi --stepwise-steps 0: c_s in the last n padding positions, initialised at φ_s, masked loss + w_s‖c_s − φ_s‖²; prompt 'a CLASS …' with c_s",
            Method::TiMaskRegStepwise => "learn --mode hifi (+ Algorithm 1, step-wise c_s^t); prompt 'a CLASS …' with c_s^t per step (Eq. 7)",
            Method::Hifi => "as ti+mask+reg+stepwise, generated with --reference-guidance (§3.3) for non-live subjects",
            Method::Db => "learn --mode dreambooth (every UNet weight, prior preservation, AdamW 5e-6); prompt 'a sks CLASS …' on the fine-tuned model",
            Method::DbGuidance => "as db, generated with --reference-guidance (§3.3; M_g from the token + class attention) for non-live subjects: the paper's 'Ours (DreamBooth)'",
            Method::Lora => "learn --mode lora (rank-r adapters on to_q, to_k, to_v, to_out.0; prior preservation, AdamW); prompt 'a sks CLASS …' with the LoRA merged",
            Method::LoraGuidance => "as lora, generated with --reference-guidance (§3.3; M_g from the token + class attention) for non-live subjects",
            Method::Copy => "reference row (the ceiling): nothing learned; image j of prompt p is the subject's photo (p·images_per_prompt + j) mod n_photos, copied unchanged (resized to the generated size, centre-cropped to its aspect)",
            Method::Base => "reference row (the floor): nothing learned; the base model on the class-noun prompt 'a CLASS …', same seeds and settings",
        }
    }
}

/// A subject of the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubjectInfo {
    pub name: String,
    pub class: String,
}

impl SubjectInfo {
    pub fn live(&self) -> bool {
        LIVE_CLASSES.contains(&self.class.as_str())
    }
}

/// A DreamBooth-layout dataset: one folder per subject and `prompts_and_classes.txt`.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    /// In the file's order.
    pub subjects: Vec<SubjectInfo>,
    /// Templates with `{0}` (unique token) and `{1}` (class), as in the file.
    pub object_prompts: Vec<String>,
    pub live_prompts: Vec<String>,
}

impl Dataset {
    /// Reads `root/prompts_and_classes.txt` (the DreamBooth repository's file: a
    /// `subject_name,class` table, then the "Object Prompts" and "Live Subject Prompts" lists of
    /// `'…'.format(unique_token, class_token)` lines) and checks each subject's folder.
    pub fn open(root: &Path) -> Result<Self> {
        let path = root.join(PROMPTS_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (a DreamBooth dataset has one folder per subject and {PROMPTS_FILE})",
                path.display()
            )
        })?;
        let mut subjects = Vec::new();
        let (mut object, mut live) = (Vec::new(), Vec::new());
        let mut in_table = false;
        let mut live_section = false;
        for line in text.lines() {
            let l = line.trim();
            if l == "subject_name,class" {
                in_table = true;
                continue;
            }
            if in_table {
                if let Some((name, class)) = l.split_once(',').filter(|_| !l.contains('\'')) {
                    subjects.push(SubjectInfo { name: name.trim().into(), class: class.trim().into() });
                    continue;
                }
                in_table = false;
            }
            let lower = l.to_ascii_lowercase();
            if lower.contains("prompts") && !l.contains('\'') {
                live_section = lower.contains("live");
                continue;
            }
            if let Some(start) = l.find('\'') {
                if let Some(end) = l[start + 1..].find('\'') {
                    let p = l[start + 1..start + 1 + end].to_string();
                    if live_section {
                        live.push(p)
                    } else {
                        object.push(p)
                    }
                }
            }
        }
        if subjects.is_empty() {
            bail!("{}: no `subject_name,class` table", path.display());
        }
        if object.is_empty() || live.is_empty() {
            bail!(
                "{}: expected an object and a live prompt list ('…'.format(unique_token, class_token) lines)",
                path.display()
            );
        }
        for s in &subjects {
            if !root.join(&s.name).is_dir() {
                bail!("{}: subject {} has no folder {}", path.display(), s.name, root.join(&s.name).display());
            }
        }
        Ok(Self { root: root.to_path_buf(), subjects, object_prompts: object, live_prompts: live })
    }

    pub fn prompts(&self, s: &SubjectInfo) -> &[String] {
        if s.live() {
            &self.live_prompts
        } else {
            &self.object_prompts
        }
    }
}

/// Fills a DreamBooth template: `{0} {1}` (and each placeholder alone) with `subject` (the TI
/// tokens, or the class noun for HiFi and for CLIP-T), `{1}` alone with the class.
pub fn fill_prompt(template: &str, subject: &str, class: &str) -> String {
    template.replace("{0} {1}", subject).replace("{0}", subject).replace("{1}", class)
}

/// Everything a benchmark run needs.
#[derive(Debug, Clone)]
pub struct BenchmarkConfig {
    pub model: PathBuf,
    pub load: LoadOptions,
    pub dataset: PathBuf,
    pub masks: Option<PathBuf>,
    /// CLIP and DINO encoders (the DreamBooth metrics; DINO also picks hifi's reference).
    /// Required for a DreamBooth dataset; optional on a world dataset, which is scored against
    /// its ground truth.
    pub clip: Option<PathBuf>,
    pub dino: Option<PathBuf>,
    pub out: PathBuf,
    /// Empty = all.
    pub subjects: Vec<String>,
    pub methods: Vec<Method>,
    pub prompts: usize,
    pub images_per_prompt: usize,
    pub seed: u64,
    pub learn_steps: usize,
    pub stepwise_steps: usize,
    pub lr: f64,
    pub reg_weight: f64,
    pub tokens: i64,
    /// DreamBooth rows: fine-tuning steps and class images (prior preservation).
    pub db_steps: usize,
    pub db_class_images: usize,
    pub db_lr: f64,
    /// LoRA rows: steps, learning rate and rank (prior preservation as the DreamBooth rows).
    pub lora_steps: usize,
    pub lora_lr: f64,
    pub lora_rank: i64,
    /// Learning captions (`{}` = the subject); default [`crate::subject::job::TEMPLATES`].
    pub caption_templates: Vec<String>,
    /// DDIM steps of generation (and of Algorithm 1's schedule).
    pub steps: usize,
    pub guidance: f64,
    pub t_start: usize,
    pub t_end: usize,
    pub guidance_steps: usize,
    pub guidance_lr: f64,
    pub shard: Shard,
    pub device: Device,
    /// Redo the finished units whose recorded settings differ from this run's (else such a
    /// run is refused).
    pub redo_mismatched: bool,
}

/// This process's share of the units: those with index ≡ `index` (mod `count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// `--shard i/n`.
    pub fn parse(s: &str) -> Result<Self> {
        let (i, n) = s.split_once('/').with_context(|| format!("--shard must be i/n, got {s:?}"))?;
        let (i, n): (usize, usize) = (
            i.trim().parse().with_context(|| format!("--shard {s:?}: bad index"))?,
            n.trim().parse().with_context(|| format!("--shard {s:?}: bad count"))?,
        );
        Self::new(i, n, "--shard")
    }

    fn new(index: usize, count: usize, origin: &str) -> Result<Self> {
        if count == 0 || index >= count {
            bail!("{origin}: shard {index} of {count} is out of range (0 ≤ i < n)");
        }
        Ok(Self { index, count })
    }

    /// The shard from `--shard`, else Slurm's array variables (`SLURM_ARRAY_TASK_ID` −
    /// `SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT`), else a Kubernetes Indexed Job's
    /// `JOB_COMPLETION_INDEX` with `--shards n`, else everything. `env` reads a variable.
    /// `--shards n` given next to another source of the count (`--shard i/m`, a Slurm array)
    /// must agree with it.
    pub fn resolve(flag: Option<&str>, shards: Option<usize>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let agree = |s: Self, origin: &str| -> Result<Self> {
            match shards {
                Some(n) if n != s.count => {
                    bail!("--shards {n} conflicts with {origin}, which splits the units into {} shards", s.count)
                }
                _ => Ok(s),
            }
        };
        if let Some(s) = flag {
            return agree(Self::parse(s)?, &format!("--shard {s}"));
        }
        let num = |k: &str| -> Result<Option<usize>> {
            env(k).map(|v| v.trim().parse::<usize>().with_context(|| format!("{k}={v:?} is not a number"))).transpose()
        };
        if let (Some(id), Some(count)) = (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?) {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let s = Self::new(
                id.checked_sub(min).context("SLURM_ARRAY_TASK_ID < SLURM_ARRAY_TASK_MIN")?,
                count,
                "Slurm array",
            )?;
            return agree(s, &format!("the Slurm array (SLURM_ARRAY_TASK_COUNT={count})"));
        }
        if let Some(i) = num("JOB_COMPLETION_INDEX")? {
            let n = shards.context(
                "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job): pass --shards N (the Job's completions)",
            )?;
            return Self::new(i, n, "JOB_COMPLETION_INDEX");
        }
        if let Some(n) = shards {
            bail!("--shards {n} without --shard, a Slurm array or JOB_COMPLETION_INDEX");
        }
        Ok(Self::ALL)
    }

    pub fn takes(&self, unit_index: usize) -> bool {
        unit_index % self.count == self.index
    }
}

/// One (subject, method) unit.
#[derive(Debug, Clone)]
pub struct Unit {
    pub index: usize,
    pub subject: SubjectInfo,
    pub method: Method,
}

/// All units in the stable order: method-major (methods in [`Method::ALL`] order, whatever the
/// flag order), subjects by name within a method. With `--shard i/n`, unit k = m·S + s goes to
/// shard k mod n: for n = S (a 30-task array on DreamBooth's 30 subjects) task i runs every
/// method of subject i, so tasks carry equal work (a subject-major order would give the tasks
/// ≡ 4 mod 5 all the expensive `hifi` units).
pub fn units(dataset: &Dataset, subjects: &[String], methods: &[Method]) -> Result<Vec<Unit>> {
    for s in subjects {
        if !dataset.subjects.iter().any(|d| &d.name == s) {
            bail!("--subjects: {s:?} is not in {}", dataset.root.join(PROMPTS_FILE).display());
        }
    }
    let mut subs: Vec<&SubjectInfo> =
        dataset.subjects.iter().filter(|s| subjects.is_empty() || subjects.contains(&s.name)).collect();
    subs.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::new();
    for m in Method::ALL.into_iter().filter(|m| methods.contains(m)) {
        for s in &subs {
            out.push(Unit { index: out.len(), subject: (*s).clone(), method: m });
        }
    }
    Ok(out)
}

/// The image as RGB, shrunk to fit `max`×`max` if larger (never enlarged).
pub fn shrink(img: &image::DynamicImage, max: u32) -> image::RgbImage {
    if img.width() > max || img.height() > max {
        img.thumbnail(max, max).to_rgb8()
    } else {
        img.to_rgb8()
    }
}

/// The final folder of a unit.
pub fn unit_dir(run: &Path, subject: &str, method: Method) -> PathBuf {
    run.join("units").join(subject).join(method.name())
}

fn partial_dir(run: &Path, subject: &str, method: Method) -> PathBuf {
    run.join("units").join(subject).join(format!(".{}.partial", method.name()))
}

fn lock_path(run: &Path, subject: &str, method: Method) -> PathBuf {
    run.join("units").join(subject).join(format!(".{}.lock", method.name()))
}

/// `f()`, with a panic inside it (a libtorch error surfaces as one in tch) turned into an error
/// like any other, so that one unit's bug fails that unit only.
pub fn catch_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(no message)".into());
            bail!("panicked: {msg}")
        }
    }
}

/// For a finished unit (its `scores.json` exists): None when it was made with this run's
/// settings, else the settings that differ (old → new).
fn finished_with_other_settings(cfg: &BenchmarkConfig, u: &Unit) -> Result<Option<Vec<String>>> {
    let f = unit_dir(&cfg.out, &u.subject.name, u.method).join("scores.json");
    if !f.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
    let have: UnitScores =
        serde_json::from_str(&text).with_context(|| format!("{} is not a unit's scores.json", f.display()))?;
    let (_, _, want) = unit_settings(cfg, &u.subject, u.method)?;
    let changed = crate::outdir::changed_settings(&have.settings, &want);
    Ok((!changed.is_empty()).then_some(changed))
}

/// A unit's arguments: `learn`'s (the HiFi / TI rows), DreamBooth's (the db rows), and the
/// settings recorded in its `scores.json` (everything its result depends on; `learn` is null for
/// the reference rows, which learn nothing).
pub fn unit_settings(
    cfg: &BenchmarkConfig,
    s: &SubjectInfo,
    m: Method,
) -> Result<(LearnArgs, Option<crate::dreambooth::DreamBoothArgs>, serde_json::Value)> {
    let masks = if m.needs_masks() { cfg.masks.as_ref().map(|r| r.join(&s.name)) } else { None };
    let guided = m.guided() && !s.live();
    let token = format!("<{}>", s.name);
    let mode = m.mode();
    let args = LearnArgs {
        mode,
        space: Space::Input,
        n_tokens: cfg.tokens,
        token: token.clone(),
        class_noun: s.class.clone(),
        captions: if cfg.caption_templates.is_empty() {
            captions(mode, &s.class, &token, cfg.tokens)
        } else {
            captions_from(&cfg.caption_templates, mode, &s.class, &token, cfg.tokens)
        },
        steps: cfg.learn_steps,
        lr: cfg.lr,
        reg_weight: if mode == Mode::Hifi { cfg.reg_weight } else { 0.0 },
        stepwise_steps: if m.stepwise() { cfg.stepwise_steps } else { 0 },
        ddim_steps: cfg.steps,
        batch_size: 1,
        seed: cfg.seed,
        masked: masks.is_some(),
    };
    let db_args = m.dreambooth().then(|| {
        let mut d = if m.lora() {
            let mut d = crate::dreambooth::DreamBoothArgs::new_lora("sks", &s.class);
            d.steps = cfg.lora_steps;
            d.lr = cfg.lora_lr;
            d.lora = Some(crate::dreambooth::LoraArgs { rank: cfg.lora_rank, alpha: cfg.lora_rank as f64 });
            d
        } else {
            let mut d = crate::dreambooth::DreamBoothArgs::new("sks", &s.class);
            d.steps = cfg.db_steps;
            d.lr = cfg.db_lr;
            d
        };
        d.class_images = cfg.db_class_images;
        d.class_steps = cfg.steps;
        d.seed = cfg.seed;
        if let Some(t) = cfg.caption_templates.first() {
            d.class_prompt = t.replace("{}", &s.class); // the class images in the captions' language
        }
        d
    });
    let mut settings = serde_json::json!({
        "method": m.name(), "describe": m.describe(),
        "learn": if m.reference() {
            serde_json::Value::Null // nothing is learned
        } else if let Some(d) = &db_args {
            serde_json::to_value(d)?
        } else {
            serde_json::to_value(&args)?
        },
        "guided": guided,
        "generate": {"steps": cfg.steps, "guidance": cfg.guidance, "seed": cfg.seed,
                     "prompts": cfg.prompts, "images_per_prompt": cfg.images_per_prompt},
        "reference_guidance": guided.then(|| serde_json::json!({"t_start": cfg.t_start, "t_end": cfg.t_end,
                     "guidance_steps": cfg.guidance_steps, "guidance_lr": cfg.guidance_lr, "dino": cfg.dino})),
        "model": cfg.model, "dataset": cfg.dataset, "masks": masks,
    });
    // --dtype / --variant / --config, recorded only when not the defaults (older runs lack them)
    let l = &cfg.load;
    if l.dtype.is_some_and(|k| k != tch::Kind::Float) || l.variant.is_some() || l.config.is_some() {
        settings["load"] = serde_json::json!({"dtype": l.dtype.map(|k| format!("{k:?}")), "variant": l.variant,
            "config": l.config});
    }
    Ok((args, db_args, settings))
}

/// The settings of method `m` in this run with the subject left out (those of a placeholder
/// object subject `{subject}` of class `{class}`): equal for every unit of the method, and what
/// `report` compares between the units it averages.
pub fn method_settings(cfg: &BenchmarkConfig, m: Method) -> Result<serde_json::Value> {
    let placeholder = SubjectInfo { name: "{subject}".into(), class: "{class}".into() };
    Ok(unit_settings(cfg, &placeholder, m)?.2)
}

fn error_file(run: &Path, subject: &str, method: Method) -> PathBuf {
    run.join("units").join(subject).join(format!("{}.error.txt", method.name()))
}

/// `scores.json` of a unit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnitScores {
    pub subject: String,
    pub method: String,
    pub class: String,
    pub live: bool,
    pub guided: bool,
    pub dino: Option<f64>,
    pub clip_i: Option<f64>,
    pub clip_t: Option<f64>,
    /// World datasets: the mean ground-truth fidelity ([`crate::world::score`]): masked RMSE
    /// (lower is better) and colour-histogram intersection (higher is better).
    #[serde(default)]
    pub gt_rmse: Option<f64>,
    #[serde(default)]
    pub gt_hist: Option<f64>,
    pub n_generated: usize,
    pub n_real: usize,
    /// Image file names under `images/`, in prompt order.
    pub images: Vec<String>,
    pub seconds: serde_json::Value,
    pub settings: serde_json::Value,
    /// The method's settings with the subject left out ([`method_settings`]): what `report`
    /// requires to agree between the units it averages. Null in units of older versions.
    #[serde(default)]
    pub method_settings: serde_json::Value,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub done: Vec<String>,
    pub skipped: Vec<String>,
    pub failed: Vec<(String, String)>,
    /// Units another process holds (its lock): (unit, who).
    pub busy: Vec<(String, String)>,
    /// Finished units redone because their settings differed (`redo_mismatched`).
    pub redone: Vec<String>,
    pub seconds_per_unit: Vec<f64>,
}

/// What runs one unit: [`run_unit`], or (tests) a stand-in.
pub type UnitRunner<'a> =
    dyn FnMut(&BenchmarkConfig, &Dataset, &Unit, Option<&Evaluator>, Option<&Path>) -> Result<()> + 'a;

/// Runs this shard's units (skipping finished ones), with a bar over units.
pub fn run(cfg: &BenchmarkConfig) -> Result<RunSummary> {
    run_with(cfg, &mut run_unit)
}

/// [`run`] with `unit` running each unit (in its lock, with errors and panics caught: a failed
/// unit's `.partial` folder is removed and its error written).
pub fn run_with(cfg: &BenchmarkConfig, unit: &mut UnitRunner) -> Result<RunSummary> {
    if cfg.prompts == 0 || cfg.images_per_prompt == 0 {
        bail!("--prompts and --images-per-prompt must be at least 1");
    }
    if cfg.methods.is_empty() {
        bail!("--methods is empty");
    }
    let dataset = Dataset::open(&cfg.dataset)?;
    let world = world_ground_truth(&cfg.dataset)?;
    if world.is_none() && (cfg.clip.is_none() || cfg.dino.is_none()) {
        bail!("a DreamBooth dataset is scored with CLIP and DINO: pass --clip and --dino (only a world dataset, scored against its ground truth, can go without)");
    }
    let all = units(&dataset, &cfg.subjects, &cfg.methods)?;
    // Bad input is refused before any unit runs and before anything is written under --out.
    if let Some(gt) = &world {
        check_ground_truth(gt, &dataset, &all, cfg.prompts)?;
    }
    let evaluator = load_encoders(cfg)?;
    let mine: Vec<&Unit> = all.iter().filter(|u| cfg.shard.takes(u.index)).collect();
    // Finished units made with other settings are refused (or, with `redo_mismatched`, redone)
    // before anything is written.
    let mut mismatched = Vec::new();
    for u in &mine {
        if let Some(changed) = finished_with_other_settings(cfg, u)? {
            mismatched.push((format!("{}/{}", u.subject.name, u.method.name()), changed));
        }
    }
    if !mismatched.is_empty() && !cfg.redo_mismatched {
        let list: Vec<String> = mismatched.iter().take(5).map(|(n, c)| format!("{n} ({})", c.join(", "))).collect();
        bail!(
            "--out {} holds {} finished unit(s) made with other settings than this run's: {}{}; pass \
             --redo-mismatched to redo them, or choose another --out",
            cfg.out.display(),
            mismatched.len(),
            list.join("; "),
            if mismatched.len() > 5 { "; …" } else { "" }
        );
    }
    std::fs::create_dir_all(cfg.out.join("units")).with_context(|| format!("cannot create {}", cfg.out.display()))?;
    eprintln!(
        "benchmark: {} unit(s) in all, {} in shard {}/{}",
        all.len(),
        mine.len(),
        cfg.shard.index,
        cfg.shard.count
    );
    let mut summary = RunSummary::default();
    let nest = crate::progress::Nest::new(mine.len() as u64, "units");
    for u in mine {
        let name = format!("{}/{}", u.subject.name, u.method.name());
        nest.bar.set_message(name.clone());
        let dir = unit_dir(&cfg.out, &u.subject.name, u.method);
        // one process per unit: shards of one run may share the folder, never a unit
        std::fs::create_dir_all(dir.parent().context("unit folder")?)?;
        let _lock = match crate::outdir::lock_file(
            &lock_path(&cfg.out, &u.subject.name, u.method),
            &format!("benchmark unit {name}"),
        ) {
            Ok(l) => l,
            Err(e) => {
                nest.bar.println(format!("{name}: not run: {e:#}"));
                summary.busy.push((name, format!("{e:#}")));
                nest.bar.inc(1);
                continue;
            }
        };
        let redo = mismatched.iter().any(|(n, _)| n == &name);
        if dir.join("scores.json").is_file() && !redo {
            summary.skipped.push(name);
            nest.bar.inc(1);
            continue;
        }
        let started = Instant::now();
        let err_path = error_file(&cfg.out, &u.subject.name, u.method);
        match catch_panic(|| unit(cfg, &dataset, u, evaluator.as_ref(), world.as_deref())) {
            Ok(()) => {
                if redo {
                    summary.redone.push(name.clone());
                }
                let _ = std::fs::remove_file(&err_path);
                summary.seconds_per_unit.push(started.elapsed().as_secs_f64());
                nest.bar.println(format!("{name}: done in {:.1}s", started.elapsed().as_secs_f64()));
                summary.done.push(name);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                nest.bar.println(format!("{name}: FAILED: {msg}"));
                write_bytes_atomic(&err_path, format!("{msg}\n").as_bytes())?;
                let _ = std::fs::remove_dir_all(partial_dir(&cfg.out, &u.subject.name, u.method));
                summary.failed.push((name, msg));
            }
        }
        nest.bar.inc(1);
    }
    drop(nest);
    Ok(summary)
}

/// The ground truth of a world dataset (`hifi-tuner world --out W`: `W/world.json` next to the
/// `--dataset W/dataset`): `W/ground_truth`; None for a DreamBooth dataset. A world dataset
/// whose `ground_truth/` is missing is an error naming the folder.
pub fn world_ground_truth(dataset: &Path) -> Result<Option<PathBuf>> {
    if let Some(gt) = crate::world::dataset::ground_truth_dir(dataset) {
        return Ok(Some(gt));
    }
    let Some(root) = dataset.parent() else { return Ok(None) };
    let info = root.join(crate::world::dataset::WORLD_FILE);
    if info.is_file() {
        bail!(
            "--dataset {} is a world dataset ({} exists), but its ground truth {} is missing: it is what a \
             world dataset is scored against (write the dataset again with `hifi-tuner world`)",
            dataset.display(),
            info.display(),
            root.join("ground_truth").display()
        );
    }
    Ok(None)
}

/// Every subject of `units` has the ground truth of the prompts a unit generates
/// (`gt/SUBJECT/pPP.png` and `pPP.mask.png`); else an error naming the folder and the files.
pub fn check_ground_truth(gt: &Path, dataset: &Dataset, units: &[Unit], prompts: usize) -> Result<()> {
    let mut seen: Vec<&str> = Vec::new();
    for u in units {
        if seen.contains(&u.subject.name.as_str()) {
            continue;
        }
        seen.push(&u.subject.name);
        let dir = gt.join(&u.subject.name);
        let n = dataset.prompts(&u.subject).len().min(prompts);
        let missing: Vec<String> = (0..n)
            .flat_map(|p| [format!("p{p:02}.png"), format!("p{p:02}.mask.png")])
            .filter(|f| !dir.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            bail!(
                "the world dataset's ground truth {} lacks {} of subject {} (each of its {n} prompt(s) needs \
                 pPP.png and pPP.mask.png){}",
                dir.display(),
                missing.iter().take(4).cloned().collect::<Vec<_>>().join(", "),
                u.subject.name,
                if dir.is_dir() { "" } else { ": the folder does not exist" }
            );
        }
    }
    Ok(())
}

/// Refuses an encoder folder that is not what `flag` needs: missing, without `config.json`, or
/// whose `config.json` names another `model_type` (a CLIP folder given as `--dino`).
fn check_model_folder(flag: &str, dir: &Path, model_type: &str, what: &str) -> Result<()> {
    if !dir.is_dir() {
        bail!("{flag} {}: no such folder (expected {what})", dir.display());
    }
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        bail!("{flag} {}: no config.json in the folder (expected {what})", dir.display());
    }
    let text =
        std::fs::read_to_string(&cfg_path).with_context(|| format!("{flag}: cannot read {}", cfg_path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{flag} {}: config.json is not JSON (expected {what})", dir.display()))?;
    if let Some(t) = v.get("model_type").and_then(|t| t.as_str()) {
        if t != model_type {
            bail!(
                "{flag} {}: its config.json says model_type {t:?}, not {model_type:?} (expected {what})",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Checks `--dino` and `--clip` and loads them, before any unit runs: the evaluator when both
/// are given (the DreamBooth metrics), else None (`--dino` alone is still loaded once, to refuse
/// a folder that hifi's reference choice could not use).
fn load_encoders(cfg: &BenchmarkConfig) -> Result<Option<Evaluator>> {
    const VIT: &str = "a transformers ViTModel folder: config.json + model.safetensors, e.g. facebook/dino-vits16";
    const CLIP: &str = "a transformers CLIPModel folder: config.json + model.safetensors (+ tokenizer files), e.g. openai/clip-vit-base-patch32";
    if let Some(d) = &cfg.dino {
        check_model_folder("--dino", d, "vit", VIT)?;
    }
    if let Some(c) = &cfg.clip {
        check_model_folder("--clip", c, "clip", CLIP)?;
    }
    match (&cfg.clip, &cfg.dino) {
        (Some(c), Some(d)) => Ok(Some(Evaluator::load(c, d, cfg.device).with_context(|| {
            format!("cannot load the encoders --clip {} ({CLIP}) and --dino {} ({VIT})", c.display(), d.display())
        })?)),
        (None, Some(d)) => {
            crate::eval::dino::Dino::load(d, cfg.device)
                .with_context(|| format!("cannot load --dino {} ({VIT})", d.display()))?;
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// One unit, built in its `.partial` folder and renamed into place; scored by `ev` (DINO,
/// CLIP) when given and against the ground truth in `gt` (a world's `ground_truth/`) when given.
///
/// What differs between methods is one function per family ([`family`]): it learns (or not)
/// and produces the images through [`UnitBuild`], which holds the parts they share (the
/// `.partial` folder, prompts, seeds, the images with their `parameters` chunk); scoring and the
/// rename into place are [`UnitBuild::finish`]. A new method is a [`Method`] variant and, if no
/// family fits, a new function.
pub fn run_unit(
    cfg: &BenchmarkConfig,
    dataset: &Dataset,
    u: &Unit,
    ev: Option<&Evaluator>,
    gt: Option<&Path>,
) -> Result<()> {
    let mut b = UnitBuild::start(cfg, dataset, u)?;
    let phases = family(u.method)(&mut b)?;
    b.finish(phases, ev, gt)
}

/// A family's function: learns (or not) and makes the unit's images.
type FamilyFn = fn(&mut UnitBuild) -> Result<Phases>;

/// The function that makes a method's images.
fn family(m: Method) -> FamilyFn {
    match m {
        Method::Ti | Method::TiMask | Method::TiMaskReg | Method::TiMaskRegStepwise | Method::Hifi => embedding_unit,
        Method::Db | Method::DbGuidance | Method::Lora | Method::LoraGuidance => dreambooth_unit,
        Method::Copy => copy_unit,
        Method::Base => base_unit,
    }
}

/// Seconds a family spent learning and making its images (the `seconds` of `scores.json`).
struct Phases {
    learn: f64,
    generate: f64,
}

/// One image of a unit: prompt `p`, image `j`, its seed, its template and the CLIP-T prompt.
struct Slot {
    p: usize,
    j: usize,
    seed: u64,
    template: String,
    scored_prompt: String,
}

/// A unit under construction in its `.partial` folder: what every method family shares.
struct UnitBuild<'a> {
    cfg: &'a BenchmarkConfig,
    dataset: &'a Dataset,
    s: &'a SubjectInfo,
    m: Method,
    /// `RUN/units/SUBJECT/.METHOD.partial`.
    tmp: PathBuf,
    /// The subject's photos.
    photos: PathBuf,
    /// The subject's masks, for the methods that need them.
    masks: Option<PathBuf>,
    /// Reference guidance runs (a guided method, a non-live subject).
    guided: bool,
    args: LearnArgs,
    db_args: Option<crate::dreambooth::DreamBoothArgs>,
    settings: serde_json::Value,
    log: String,
    prompt_lines: Vec<PromptLine>,
    names: Vec<String>,
    started: Instant,
}

impl<'a> UnitBuild<'a> {
    /// Removes the `.partial` folder of an interrupted run, checks the masks, creates `images/`.
    fn start(cfg: &'a BenchmarkConfig, dataset: &'a Dataset, u: &'a Unit) -> Result<Self> {
        let (s, m) = (&u.subject, u.method);
        let tmp = partial_dir(&cfg.out, &s.name, m);
        if tmp.exists() {
            eprintln!("{}/{}: removing the unfinished {} of an interrupted run", s.name, m.name(), tmp.display());
            std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
        }
        let masks = if m.needs_masks() {
            let Some(root) = &cfg.masks else {
                bail!("method {} needs subject masks: pass --masks DIR (DIR/{}/STEM.png)", m.name(), s.name);
            };
            let d = root.join(&s.name);
            if !d.is_dir() {
                bail!("method {} needs subject masks, but {} does not exist", m.name(), d.display());
            }
            Some(d)
        } else {
            None
        };
        crate::io::create_dir_all(&tmp.join("images"))?;
        let (args, db_args, settings) = unit_settings(cfg, s, m)?;
        let log = format!("settings: {settings}\n");
        Ok(Self {
            cfg,
            dataset,
            s,
            m,
            tmp,
            photos: dataset.root.join(&s.name),
            masks,
            guided: m.guided() && !s.live(),
            args,
            db_args,
            settings,
            log,
            prompt_lines: Vec::new(),
            names: Vec::new(),
            started: Instant::now(),
        })
    }

    /// The learn folder (`subject/`).
    fn subject_dir(&self) -> PathBuf {
        self.tmp.join("subject")
    }

    /// The unit's images in order: the first `--prompts` templates × `--images-per-prompt`, image
    /// j of prompt p with seed `--seed + p · images_per_prompt + j`.
    fn slots(&self) -> Vec<Slot> {
        let (cfg, s) = (self.cfg, self.s);
        let mut out = Vec::new();
        for (p, tpl) in self.dataset.prompts(s).iter().take(cfg.prompts).enumerate() {
            for j in 0..cfg.images_per_prompt {
                out.push(Slot {
                    p,
                    j,
                    seed: cfg.seed + (p * cfg.images_per_prompt + j) as u64,
                    template: tpl.clone(),
                    scored_prompt: fill_prompt(tpl, &s.class, &s.class),
                });
            }
        }
        out
    }

    /// Writes a slot's image (`images/pPP-J.png` with its `parameters` chunk) and its CLIP-T
    /// prompt.
    fn save(&mut self, slot: &Slot, image: &RgbImage, params: &str) -> Result<()> {
        let name = format!("p{:02}-{}.png", slot.p, slot.j);
        image.save_png(&self.tmp.join("images").join(&name), &[("parameters", params)])?;
        self.prompt_lines.push(PromptLine { image: name.clone(), prompt: slot.scored_prompt.clone() });
        self.names.push(name);
        Ok(())
    }

    /// Generates every slot with `sd` (the model at `model`), at its default size, one image per
    /// call: `gen_prompt` turns a template into the prompt given to the model, `image` makes the
    /// image of a request (with the unit's log, for notes).
    fn generate(
        &mut self,
        sd: &StableDiffusion,
        model: &Path,
        gen_prompt: impl Fn(&str) -> String,
        mut image: impl FnMut(&GenerateRequest, &Slot, &mut String) -> Result<Tensor>,
    ) -> Result<()> {
        let (h, w) = sd.default_hw();
        let slots = self.slots();
        let bar = crate::progress::bar(slots.len() as u64, "generating");
        for slot in &slots {
            let prompt = gen_prompt(&slot.template);
            let req = GenerateRequest {
                prompt: prompt.clone(),
                negative_prompt: None,
                seed: slot.seed,
                steps: self.cfg.steps,
                guidance: self.cfg.guidance,
                height: h,
                width: w,
                num_images: 1,
            };
            let img = image(&req, slot, &mut self.log)?;
            let params = format!(
                "{prompt}\nNegative prompt: \nSteps: {}, Sampler: DDIM, CFG scale: {}, Seed: {}, Size: {w}x{h}, Model: {}, Method: {}",
                self.cfg.steps,
                self.cfg.guidance,
                slot.seed,
                model.display(),
                self.m.name()
            );
            self.save(slot, &RgbImage::from_hwc_u8(&img.get(0))?, &params)?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(())
    }

    /// Writes `prompts.jsonl`, scores the saved PNGs (as `score` would read them), writes the
    /// real photos' thumbnails, `log.txt` and `scores.json`, and renames the unit into place.
    fn finish(mut self, phases: Phases, ev: Option<&Evaluator>, gt: Option<&Path>) -> Result<()> {
        let (cfg, s, m, tmp) = (self.cfg, self.s, self.m, self.tmp.clone());
        let jsonl: String =
            self.prompt_lines.iter().map(|l| serde_json::to_string(l).map(|s| s + "\n")).collect::<Result<_, _>>()?;
        write_bytes_atomic(&tmp.join("prompts.jsonl"), jsonl.as_bytes())?;
        let t2 = Instant::now();
        let real_paths = image_files(&self.photos)?;
        let real = open_images(&real_paths)?;
        let gen_paths: Vec<PathBuf> = self.names.iter().map(|n| tmp.join("images").join(n)).collect();
        let generated = open_images(&gen_paths)?;
        let prompts: Vec<String> = self.prompt_lines.iter().map(|l| l.prompt.clone()).collect();
        let sc = ev.map(|ev| ev.score(&real, &generated, &prompts)).transpose()?;
        let (mut gt_rmse, mut gt_hist) = (None, None);
        if let Some(gt) = gt {
            let mut fid = Vec::new();
            for name in &self.names {
                let p = &name[..3]; // "pPP"
                let f = crate::world::dataset::score_file(&tmp.join("images").join(name), &gt.join(&s.name), p)?;
                self.log.push_str(&format!(
                    "{name}: ground truth rmse {:.4} hist {:.4} (scale {}, at {},{})\n",
                    f.rmse, f.hist, f.scale, f.x, f.y
                ));
                fid.push(f);
            }
            let n = fid.len().max(1) as f64;
            gt_rmse = Some(fid.iter().map(|f| f.rmse).sum::<f64>() / n);
            gt_hist = Some(fid.iter().map(|f| f.hist).sum::<f64>() / n);
        }
        for (i, img) in real.iter().enumerate() {
            let t = shrink(img, 128);
            let rgb = RgbImage { width: t.width(), height: t.height(), pixels: t.into_raw() };
            rgb.save_png(&tmp.join("real").join(format!("{i:02}.png")), &[])?;
        }
        let score_s = t2.elapsed().as_secs_f64();
        let total = self.started.elapsed().as_secs_f64();
        let n_images = self.names.len();
        let scores = UnitScores {
            subject: s.name.clone(),
            method: m.name().into(),
            class: s.class.clone(),
            live: s.live(),
            guided: self.guided,
            dino: sc.as_ref().map(|x| x.dino),
            clip_i: sc.as_ref().map(|x| x.clip_i),
            clip_t: sc.as_ref().map(|x| x.clip_t),
            gt_rmse,
            gt_hist,
            n_generated: generated.len(),
            n_real: real.len(),
            images: std::mem::take(&mut self.names),
            seconds: serde_json::json!({"learn": phases.learn, "generate": phases.generate, "score": score_s, "total": total}),
            settings: self.settings.clone(),
            method_settings: method_settings(cfg, m)?,
        };
        self.log.push_str(&format!(
            "generated {n_images} image(s) in {:.2}s; scored in {score_s:.2}s: {}\n",
            phases.generate,
            report::METRICS
                .iter()
                .map(|m| format!("{} {}", m.key, report::fmt(m.of(&scores))))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        write_bytes_atomic(&tmp.join("log.txt"), self.log.as_bytes())?;
        write_bytes_atomic(&tmp.join("scores.json"), serde_json::to_string_pretty(&scores)?.as_bytes())?;
        let dest = unit_dir(&cfg.out, &s.name, m);
        if dest.exists() {
            // a folder without scores.json cannot come from a finished unit, and one with it is
            // redone only when its settings differ (`redo_mismatched`): replace it
            std::fs::remove_dir_all(&dest).with_context(|| format!("cannot remove {}", dest.display()))?;
        }
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
        Ok(())
    }
}

/// Reference guidance's options for subject `s`.
fn reference_options(cfg: &BenchmarkConfig, s: &SubjectInfo) -> ReferenceOptions {
    ReferenceOptions {
        guidance: GuidanceConfig {
            t_start: cfg.t_start,
            t_end: cfg.t_end,
            steps: cfg.guidance_steps,
            lr: cfg.guidance_lr,
            substitute: true,
        },
        dino: cfg.dino.clone(),
        // c_r in the captions' language (the first template with the class noun)
        reference_caption: cfg.caption_templates.first().map(|t| t.replace("{}", &s.class)),
        references: None,
        reference_masks: None,
        intermediates: None,
        sam: None,
        min_contrast: crate::guidance::daam::MIN_CONTRAST,
    }
}

/// A reference-guided image (§3.3) of `subject` (learned in `subject_dir`), a fall-back to
/// plain generation noted in `log`.
fn guided_image(
    sd: &StableDiffusion,
    req: &GenerateRequest,
    subject: &GuidedSubject,
    subject_dir: &Path,
    opt: &ReferenceOptions,
    slot: &Slot,
    log: &mut String,
) -> Result<Tensor> {
    let g = generate_guided(sd, req, subject, subject_dir, opt)?;
    if let Some(why) = g.fallback {
        log.push_str(&format!("p{:02}-{}: reference guidance fell back to plain generation: {why}\n", slot.p, slot.j));
    }
    Ok(g.image)
}

/// `ti` … `hifi`: learn an embedding (TI tokens, or HiFi's c_s), generate on the base model with
/// it (`hifi`: with reference guidance for a non-live subject).
fn embedding_unit(b: &mut UnitBuild) -> Result<Phases> {
    let (cfg, s, m) = (b.cfg, b.s, b.m);
    let t0 = Instant::now();
    let subject_dir = b.subject_dir();
    let job = LearnJob {
        model: cfg.model.clone(),
        load: cfg.load.clone(),
        images: b.photos.clone(),
        masks: b.masks.clone(),
        out: subject_dir.clone(),
        args: b.args.clone(),
        checkpoint_every: 0,
        preview_every: 0,
        resume: false,
        device: cfg.device,
    };
    let learned = learn(&job).with_context(|| format!("learning {} ({})", s.name, m.name()))?;
    let learn_s = t0.elapsed().as_secs_f64();
    b.log.push_str(&format!("learned {} in {learn_s:.2}s\n", learned.display()));
    let t1 = Instant::now();
    let mut sd = StableDiffusion::load_with(&cfg.model, &cfg.load, cfg.device)?;
    sd.require_not_xl("benchmark")?;
    let (subject, loaded) = match m.mode() {
        Mode::Ti => (None, Some(ti::load_embedding(&mut sd, &learned, None)?)),
        Mode::Hifi => (Some(Subject::load(&subject_dir.join(SUBJECT_FILE))?), None),
    };
    let gen_prompt = |tpl: &str| match &loaded {
        Some(l) => ti::convert_prompt(&sd, &fill_prompt(tpl, &l.token, &s.class), std::slice::from_ref(l)),
        None => fill_prompt(tpl, &s.class, &s.class),
    };
    let opt = b.guided.then(|| reference_options(cfg, s));
    b.generate(&sd, &cfg.model, gen_prompt, |req, slot, log| match (&opt, subject.as_ref()) {
        (Some(opt), Some(subject)) => {
            guided_image(&sd, req, &GuidedSubject::Embedding(subject), &subject_dir, opt, slot, log)
        }
        (Some(_), None) => bail!("{}: reference guidance needs a learned subject", m.name()),
        (None, subject) => conditioning::generate(&sd, req, subject),
    })?;
    let gen_s = t1.elapsed().as_secs_f64();
    Ok(Phases { learn: learn_s, generate: gen_s })
}

/// `db`, `db+guidance`: fine-tune the whole UNet (DreamBooth), generate "a sks CLASS …" on the
/// fine-tuned model (`db+guidance`: with reference guidance for a non-live subject).
fn dreambooth_unit(b: &mut UnitBuild) -> Result<Phases> {
    let (cfg, s, m) = (b.cfg, b.s, b.m);
    let d = b.db_args.clone().with_context(|| format!("{}: no DreamBooth arguments", m.name()))?;
    let t0 = Instant::now();
    let subject_dir = b.subject_dir();
    // DreamBooth trains float32 weights whatever --dtype says (LoRA: float32 adapters on
    // weights of the --dtype)
    let mut load = cfg.load.clone();
    if d.lora.is_none() {
        load.dtype = Some(tch::Kind::Float);
    }
    let job = crate::dreambooth::job::DreamBoothJob {
        model: cfg.model.clone(),
        load,
        images: b.photos.clone(),
        masks: b.masks.clone(),
        out: subject_dir.clone(),
        args: d.clone(),
        checkpoint_every: 0,
        preview_every: 0,
        resume: false,
        device: cfg.device,
    };
    let learned = crate::dreambooth::job::learn(&job).with_context(|| format!("learning {} ({})", s.name, m.name()))?;
    let learn_s = t0.elapsed().as_secs_f64();
    b.log.push_str(&format!("learned {} in {learn_s:.2}s\n", learned.display()));
    // generated on the fine-tuned model (LoRA: the base model with the adapters merged)
    let t1 = Instant::now();
    let sd = match &d.lora {
        Some(_) => {
            let mut load = cfg.load.clone();
            load.loras.push(crate::lora::LoraSpec { path: learned.clone(), scale: 1.0 });
            StableDiffusion::load_with(&cfg.model, &load, cfg.device)?
        }
        None => StableDiffusion::load_with(&learned, &cfg.load, cfg.device)?,
    };
    let gen_prompt = |tpl: &str| fill_prompt(tpl, &format!("{} {}", d.token, s.class), &s.class);
    let opt = b.guided.then(|| reference_options(cfg, s));
    let subject = GuidedSubject::FineTuned { token: d.token.clone(), class_noun: s.class.clone() };
    b.generate(&sd, &learned, gen_prompt, |req, slot, log| match &opt {
        Some(opt) => guided_image(&sd, req, &subject, &subject_dir, opt, slot, log),
        None => conditioning::generate(&sd, req, None),
    })?;
    let gen_s = t1.elapsed().as_secs_f64();
    Ok(Phases { learn: learn_s, generate: gen_s })
}

/// The prompt of the `base` row: the template with the subject replaced by the class noun only
/// ("a {0} {1} on the beach" → "a ball on the beach"), spaces collapsed.
pub fn class_prompt(template: &str, class: &str) -> String {
    fill_prompt(template, class, class).split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `base` (the floor): nothing learned; the base model on the class-noun prompt, with the seeds
/// and generation settings of the other rows.
fn base_unit(b: &mut UnitBuild) -> Result<Phases> {
    let (cfg, s) = (b.cfg, b.s);
    let t1 = Instant::now();
    let sd = StableDiffusion::load_with(&cfg.model, &cfg.load, cfg.device)?;
    sd.require_not_xl("benchmark")?;
    b.generate(&sd, &cfg.model, |tpl| class_prompt(tpl, &s.class), |req, _, _| conditioning::generate(&sd, req, None))?;
    Ok(Phases { learn: 0.0, generate: t1.elapsed().as_secs_f64() })
}

/// The `copy` row's image: a photo unchanged but for its size, `w`×`h` (scaled to cover, then
/// centre-cropped to that aspect; a photo of that size already is returned as it is).
pub fn copy_image(photo: &image::DynamicImage, w: u32, h: u32) -> RgbImage {
    let t = if (photo.width(), photo.height()) == (w, h) {
        photo.to_rgb8()
    } else {
        photo.resize_to_fill(w, h, image::imageops::FilterType::CatmullRom).to_rgb8()
    };
    RgbImage { width: t.width(), height: t.height(), pixels: t.into_raw() }
}

/// `copy` (the ceiling): nothing learned; image j of prompt p is the subject's photo
/// (p · images_per_prompt + j) mod n_photos, at the generated size ([`copy_image`]).
fn copy_unit(b: &mut UnitBuild) -> Result<Phases> {
    let cfg = b.cfg;
    let t1 = Instant::now();
    // the size the model generates (the other rows' images)
    let (h, w) = StableDiffusion::load_with(&cfg.model, &cfg.load, cfg.device)?.default_hw();
    let photos = image_files(&b.photos)?;
    for slot in b.slots() {
        let k = (slot.p * cfg.images_per_prompt + slot.j) % photos.len();
        let image = copy_image(&crate::io::open_image(&photos[k])?, w as u32, h as u32);
        let params = format!(
            "{}\nNegative prompt: \nCopy of: {}, Size: {w}x{h}, Method: {}",
            slot.scored_prompt,
            photos[k].display(),
            b.m.name()
        );
        b.save(&slot, &image, &params)?;
    }
    Ok(Phases { learn: 0.0, generate: t1.elapsed().as_secs_f64() })
}
