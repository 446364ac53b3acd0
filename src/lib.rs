//! # hifi-tuner
//!
//! A reference implementation of *HiFi Tuner: High-Fidelity Subject-Driven Fine-Tuning for
//! Diffusion Models* (arXiv 2312.00079) on libtorch (tch).
//!
//! Map from the paper to the code:
//!
//! | paper | module |
//! |---|---|
//! | Stable Diffusion 1.x / 2.x / XL text encoders (CLIP, OpenCLIP as transformers ships it; SDXL's penultimate states and pooled `text_embeds`), UNet (SDXL's `text_time` micro-conditioning), VAE | [`models`], [`models::clip_text`], [`models::unet`] |
//! | CLIP BPE tokenizer (on the `tokenizers` crate) | [`tokenizer`] |
//! | DDIM step F^(t) (Eq. 1) and its inverse F^-1 (Eq. 3); the training target ε or v (v-prediction, SD-2.x) of Eq. 6 and every other loss | [`scheduler`] |
//! | attention hooks (DAAM maps §3.4, prompt-to-prompt) | [`attention`] |
//! | classifier-free guided sampling, one loop for all conditionings; SDXL's two encoders, `add_time_ids`, `force_zeros_for_empty_prompt` | [`pipeline`] |
//! | diffusers folder layout, typed configs, strict weight loading | [`load`] |
//! | single-file SD-1.x / 2.x checkpoints (LDM and OpenCLIP key names), converted in memory | [`single_file`] |
//! | `--model` forms: folder, single file, Hugging Face id (cache, downloads) | [`hub`] |
//! | images, PNG metadata, atomic writes | [`io`] |
//! | output folders: one run at a time (an `flock` lock naming its holder), settings compared | [`outdir`] |
//! | §3.2: [c, c_s], φ_s, Eq. 5–6 (masked, regularised loss), Eq. 7 (SDXL: c_s as the pair for both encoders, side by side) | [`subject::conditioning`], [`subject::learn`] |
//! | Algorithm 1 (step-wise c_s^t), checkpoints, the `learn` job | [`subject::learn`], [`subject::job`] |
//! | Eq. 7 sampling with a subject ([c, c_s^t] per step) | [`subject::conditioning`] |
//! | textual inversion (the baseline; `learned_embeds.safetensors`) | [`subject::ti`], [`subject::file`] |
//! | §3.3: M_g from cross-attention (DAAM) | [`guidance::daam`] |
//! | Algorithm 4, Eq. 8–9 (mask alignment T_θ) | [`guidance::align`] |
//! | DDIM inversion with w = 1 (Eq. 3) | [`guidance::invert`] |
//! | Algorithm 2, Eq. 10 (reference-guided denoising; SDXL: φ_h = hidden states + pooled embeds, [`pipeline::TextCond`]) | [`guidance::reference`], [`guidance::job`] |
//! | DINO ViT-S/16 embeddings (reference choice, DINO metric) | [`eval::dino`], [`models::vit`] |
//! | SAM (masks of the photos, M_g, M_r): transformers' `SamModel` + `SamProcessor` | [`models::sam`] |
//! | Grounding SAM's role, by the UNet's own attention: heat map → box, points → SAM mask | [`guidance::grounding`] |
//! | CLIP ViT-B/32 (transformers `CLIPModel`, `CLIPImageProcessor`) | [`models::clip`] |
//! | DreamBooth metrics: DINO, CLIP-I, CLIP-T (Tables 1–2) | [`eval::metrics`] |
//! | the DreamBooth benchmark: Table 2's methods, units, shards (Slurm, Kubernetes) | [`benchmark`] |
//! | the report (HTML, CSV, JSON, Markdown; means with bootstrap intervals over subjects, paired differences of the ablation steps) | [`benchmark::report`] |
//! | do the fidelity scores rank a subject's true render above a blob, a plain shape, another subject, the base model's image, a copied photo? (`world-validity`) | [`benchmark::validity`] |
//! | §3.4: the caption of I_r that Algorithm 3 starts from (BLIP: transformers' `BlipForConditionalGeneration`, greedy / beam search, `BlipProcessor`) | [`caption`], [`models::blip`] |
//! | §3.4, Eq. 4: null-text inversion (the first two loops of Algorithm 3; SDXL: φ_t = hidden states + pooled embeds) | [`replace::nti`] |
//! | Algorithm 3's F̃: prompt-to-prompt attention control, token alignment | [`replace::p2p`] |
//! | Algorithm 3: subject replacement, the `invert` and `replace` jobs | [`replace::job`] |
//! | §4 "Ours (DreamBooth)": full UNet fine-tuning, prior preservation, AdamW + clipping, the model folder (SDXL: the UNet, both encoders frozen) | [`dreambooth`], [`dreambooth::job`] |
//! | LoRA files (diffusers / PEFT, kohya for A1111 / ComfyUI; SDXL: `text_encoder_2`, `lora_te2_`, sd-scripts' LDM UNet names): read, merged at a scale (`--lora`), written | [`lora`] |
//! | LoRA adapters on the attention projections while they train (peft's `lora.Linear`) | [`models::lora`] |
//! | gradient checkpointing of the UNet blocks (hand-chained backward; DreamBooth) | [`models::unet::checkpoint`] |
//! | the procedural world: shapes × colours × scenes, captions, masks, held-out patterned subjects | [`world`] |
//! | its ground truth as a benchmark dataset; the template-matched ground-truth fidelity | [`world::dataset`], [`world::score`] |
//! | a small SD-architecture model trained from scratch on it (VAE, then UNet; `train-base`) | [`world::train`] |
//! | the world's own DINO and CLIP for the DreamBooth metrics, trained contrastively here (`train-encoders`) | [`world::encoders`] |
//! | does a world model follow its prompts? (a classifier of colour, shape, scene) | [`world::classify`] |
//! | seeded draws (tch has no per-call generator) | [`rng`] |
//! | `--dtype`: half precision, mixed-precision rules | [`precision`] |
//! | nested progress bars (units over learn / generate); training previews and the loss curve (`learn --preview-every`) | [`progress`], [`progress::previews`] |
//! | the local web app (`serve`): one embedded page, the JSON API (`docs/api.md`), token and file-path safety | [`serve`] |
//! | its subjects (uploads decoded before they are kept) and its job queue (one CLI run at a time, state on disk, interrupted → resume / extend) | [`serve::subjects`], [`serve::jobs`] |
//!
//! Layers: `models` → `pipeline` (and `caption`, BLIP over `models::blip`) → algorithms (`subject`, `guidance`, `replace`, `eval`,
//! `dreambooth`, `world`) → `benchmark` (runs the algorithms per unit; scores world datasets
//! with `world::score`) and `serve` (runs them as CLI child processes, one at a time) → the CLI
//! (`src/cli`); imports go down only.

pub mod attention;
pub mod benchmark;
pub mod caption;
pub mod dreambooth;
pub mod eval;
pub mod guidance;
pub mod hub;
pub mod io;
pub mod load;
pub mod lora;
pub mod models;
pub mod outdir;
pub mod pipeline;
pub mod precision;
pub mod progress;
pub mod replace;
pub mod rng;
pub mod scheduler;
pub mod serve;
pub mod single_file;
pub mod subject;
pub mod tokenizer;
pub mod world;

pub use anyhow::{Error, Result};
