//! Subcommands. No maths here: each parses its flags and calls the library.

mod align_mask;
pub mod args;
mod bench;
mod benchmark;
mod caption;
mod dino;
mod generate;
mod init_random;
mod invert;
mod learn;
mod mask;
mod replace;
mod report;
mod sam;
mod score;
mod serve;
mod tokenize;
mod train_base;
mod train_encoders;
mod world;
mod world_demo;
mod world_eval;
mod world_validity;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use hifi_tuner::pipeline::{LoadOptions, StableDiffusion};
use std::path::{Path, PathBuf};
use tch::Device;

#[derive(Parser, Debug)]
#[command(name = "hifi-tuner", version, about = "HiFi Tuner: subject-driven Stable Diffusion on libtorch")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Text-to-image with a Stable Diffusion 1.x model (DDIM, classifier-free guidance).
    Generate(generate::Args),
    /// Print the 77 input ids of a prompt as a JSON array.
    Tokenize(tokenize::Args),
    /// Learn a subject from its photos (HiFi Tuner §3.2, Algorithm 1) or a textual inversion.
    Learn(learn::Args),
    /// Caption images with BLIP (transformers' BlipForConditionalGeneration): one JSON line per
    /// image, {"image": PATH, "caption": TEXT}.
    Caption(caption::Args),
    /// Null-text inversion of a photo (paper Eq. 4, Algorithm 3): x_T* and the per-step φ*_t.
    Invert(invert::Args),
    /// Put a learned subject (or another word) into a photo in place of one of its objects
    /// (paper §3.4, Algorithm 3: null-text inversion + prompt-to-prompt).
    Replace(replace::Args),
    /// Algorithm 4 on two mask PNGs: fit T_θ mapping the reference mask onto the target; print θ.
    AlignMask(align_mask::Args),
    /// DINO ViT embeddings (CLS of the last hidden state) of images, one JSON array per image.
    Dino(dino::Args),
    /// Subject masks of photos from the model's own attention (and SAM with --sam): STEM.png and
    /// STEM.overlay.png.
    Mask(mask::Args),
    /// Segment Anything on one photo with a box and/or points: writes the best mask, prints the
    /// candidates' predicted IoUs.
    Sam(sam::Args),
    /// DreamBooth's DINO, CLIP-I and CLIP-T of generated images against a subject's photos (JSON).
    Score(score::Args),
    /// The DreamBooth benchmark: learn, generate and score each (subject, method) unit; shardable.
    Benchmark(benchmark::Args),
    /// Merge benchmark runs into report.html, results.csv, results.json and Markdown tables.
    Report(report::Args),
    /// Measure generate / learn / reference-guidance speeds on a model (prints JSON and ratios).
    Bench(bench::Args),
    /// Write a random-weight model in diffusers layout (tests, demos, speed runs).
    InitRandom(init_random::Args),
    /// The procedural world: its held-out subjects as a dataset with masks and ground truth.
    World(world::Args),
    /// Train a small SD-architecture model from scratch on the world (VAE, then UNet).
    TrainBase(train_base::Args),
    /// Train the world's own DINO (a ViTModel) or CLIP (a CLIPModel) from scratch, contrastively,
    /// for the DreamBooth metrics on world images.
    TrainEncoders(train_encoders::Args),
    /// How often a world model draws the colour, shape and scene its caption asks for (held-out
    /// caption combinations and seen ones), read back by a classifier trained on renders.
    WorldEval(world_eval::Args),
    /// The main job on a world model with ground truth: learn a held-out subject from 4 renders,
    /// draw it in 4 new scenes (plain and reference-guided), write a strip next to the truth.
    WorldDemo(world_demo::Args),
    /// Does each fidelity score (DINO, CLIP-I, CLIP-T, GT RMSE) rank a subject's true render above
    /// a blob, a plain shape, another subject, the base model's class image and a copied photo?
    WorldValidity(world_validity::Args),
    /// A local web app: upload photos, check masks, watch learning live, generate plain and
    /// reference-guided (one page and a JSON API, docs/api.md).
    Serve(serve::Args),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::InitRandom(a) => init_random::run(a),
        Command::Learn(a) => learn::run(a),
        Command::AlignMask(a) => align_mask::run(a),
        Command::Dino(a) => dino::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Score(a) => score::run(a),
        Command::Benchmark(a) => benchmark::run_cmd(a),
        Command::Report(a) => report::run(a),
        Command::Caption(a) => caption::run(a),
        Command::Invert(a) => invert::run(a),
        Command::Replace(a) => replace::run(a),
        Command::Sam(a) => sam::run(a),
        Command::Mask(a) => mask::run(a),
        Command::World(a) => world::run(a),
        Command::TrainBase(a) => train_base::run(a),
        Command::TrainEncoders(a) => train_encoders::run(a),
        Command::WorldEval(a) => world_eval::run(a),
        Command::WorldDemo(a) => world_demo::run(a),
        Command::WorldValidity(a) => world_validity::run(a),
        Command::Serve(a) => serve::run(a),
    }
}

/// `--device cpu|cuda|auto` (auto = CUDA when present).
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!("--device cuda: no CUDA device is available");
            }
            Device::Cuda(0)
        }
        "auto" => Device::cuda_if_available(),
        other => bail!("--device must be cpu, cuda or auto, got {other:?}"),
    })
}

/// The options next to every `--model` that names a Stable Diffusion model (a diffusers folder,
/// a single-file `.safetensors` checkpoint, or a Hugging Face id `org/name[@revision]`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ModelOptions {
    /// For a single-file checkpoint: take the component configs and the tokenizer from this
    /// diffusers folder (default: the standard SD-1.x ones built in).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// For a Hugging Face id: the weight variant to download (e.g. fp16).
    #[arg(long)]
    pub variant: Option<String>,
    /// Compute precision of the networks: auto (fp16 on CUDA, fp32 on the CPU), fp32, fp16
    /// (CUDA only) or bf16. Trainable embeddings, their optimiser state and the scheduler stay
    /// fp32; the VAE stays fp32 under fp16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// A LoRA (diffusers / PEFT or kohya .safetensors, as A1111 / ComfyUI use) merged into the
    /// UNet and text encoder at SCALE (default 1): FILE[:SCALE]. May be given several times.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = args::lora_spec)]
    pub lora: Vec<hifi_tuner::lora::LoraSpec>,
}

impl ModelOptions {
    pub fn options(&self, device: Device) -> Result<LoadOptions> {
        let dtype = hifi_tuner::precision::resolve(&self.dtype, device)?;
        Ok(LoadOptions {
            config: self.config.clone(),
            variant: self.variant.clone(),
            dtype: Some(dtype),
            loras: self.lora.clone(),
        })
    }

    /// Loads `--model` with these options.
    pub fn load(&self, model: &Path, device: Device) -> Result<StableDiffusion> {
        StableDiffusion::load_with(model, &self.options(device)?, device)
    }
}

/// Algorithm 2's settings, shared by `generate --reference-guidance` and `benchmark`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReferenceGuidanceArgs {
    /// t_s: the DDIM step (counted T … 1) where the reference latents are substituted.
    #[arg(long, default_value_t = 40, value_parser = args::ddim_steps)]
    pub t_start: usize,
    /// t_e: the last DDIM step of the φ_h optimisation.
    #[arg(long, default_value_t = 10, value_parser = args::ddim_steps)]
    pub t_end: usize,
    /// J: Adam steps on φ_h per guided DDIM step.
    #[arg(long, default_value_t = 10)]
    pub guidance_steps: usize,
    /// The learning rate of the φ_h optimisation.
    #[arg(long, default_value_t = 1e-2, value_parser = args::positive)]
    pub guidance_lr: f64,
}
