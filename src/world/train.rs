//! `train-base`: a small Stable-Diffusion-architecture model trained from scratch on the world
//! ([`super::sample`]), in our own stack, into a diffusers folder that diffusers also loads.
//!
//! 1. The text encoder is a frozen random tiny CLIP (the real BPE vocabulary; seeded), as in
//!    the prototype: the UNet learns to read its embeddings.
//! 2. The VAE: reconstruction MSE + `kl_weight`·KL(q(z|x) ‖ N(0, I)) on the posterior sample
//!    (as LDM's first stage, without its GAN and LPIPS terms). Afterwards the scaling factor is
//!    set to 1/std of the posterior means (LDM's rule), written into `vae/config.json`.
//! 3. The UNet: ε-prediction MSE on x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (x_0 = the posterior mean ×
//!    scaling factor, encoded once), the caption replaced by "" with probability
//!    `caption_dropout` (classifier-free guidance), AdamW with a linear warm-up, gradient-norm
//!    clipping — the DreamBooth loop's optimiser ([`crate::subject::adam`]).
//!
//! Each phase draws its batch (indices, ε, t, dropout) from a generator seeded by (seed, phase,
//! step) alone, and its checkpoint holds the weights and the AdamW moments: a resumed run is
//! bit-identical to an unbroken one (same thread count). The checkpoint is written atomically
//! over the previous one every `checkpoint_every` steps and removed when the phase ends.

use super::{caption, sample, COLOURS, N_COMBOS, SCENES, SHAPES, SIZE};
use crate::io::{write_bytes_atomic, write_var_store_atomic};
use crate::load::read_json;
use crate::models::clip_text::ClipTextModel;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::scheduler::{DdimScheduler, SchedulerConfig};
use crate::subject::adam::{checked_step, Trainable};
use crate::subject::learn::step_seed;
use crate::tokenizer::ClipTokenizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub const ARGS_FILE: &str = "train_base.json";
pub const LOG_FILE: &str = "train_log.jsonl";
const VAE_CHECKPOINT: &str = "vae-checkpoint.safetensors";
const UNET_CHECKPOINT: &str = "unet-checkpoint.safetensors";
const CHECKPOINT_FORMAT: &str = "hifi-tuner-train-base-checkpoint/1";
const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// Everything that determines the trained model (compared on `--resume`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainBaseArgs {
    /// The world's seed (the training images).
    pub world_seed: u64,
    /// Initialisation and batch draws.
    pub seed: u64,
    /// Training images rendered (and encoded) once.
    pub images: usize,
    pub vae_steps: usize,
    pub vae_batch: usize,
    pub vae_lr: f64,
    pub kl_weight: f64,
    pub unet_steps: usize,
    pub unet_batch: usize,
    pub unet_lr: f64,
    pub warmup: usize,
    pub caption_dropout: f64,
    /// Probability that a caption omits its colour ("a ball on the beach"), so that the class
    /// noun alone — the prompt HiFi Tuner's subject embedding is used with — is a caption the
    /// model knows, meaning an object of any colour.
    pub colour_dropout: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Component configs (JSON), the embedded world preset by default.
    pub unet_config: serde_json::Value,
    pub vae_config: serde_json::Value,
    pub text_encoder_config: serde_json::Value,
}

impl TrainBaseArgs {
    /// The shipped model's settings.
    pub fn world_default() -> Self {
        let cfg = |s: &str| serde_json::from_str(s).expect("embedded config");
        Self {
            world_seed: 0,
            seed: 0,
            images: 16384,
            vae_steps: 2000,
            vae_batch: 16,
            vae_lr: 1e-3,
            kl_weight: 1e-6,
            unet_steps: 7000,
            unet_batch: 32,
            unet_lr: 5e-4,
            warmup: 200,
            caption_dropout: 0.1,
            colour_dropout: 0.3,
            weight_decay: 1e-2,
            max_grad_norm: 1.0,
            unet_config: cfg(include_str!("../../assets/configs/world/unet.json")),
            vae_config: cfg(include_str!("../../assets/configs/world/vae.json")),
            text_encoder_config: cfg(include_str!("../../assets/configs/world/text_encoder.json")),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.images == 0 || self.vae_batch == 0 || self.unet_batch == 0 {
            bail!("--images and the batch sizes must be at least 1");
        }
        if !(self.vae_lr > 0.0 && self.unet_lr > 0.0) {
            bail!("learning rates must be positive");
        }
        if !(0.0..1.0).contains(&self.caption_dropout) || !(0.0..1.0).contains(&self.colour_dropout) {
            bail!("the caption and colour dropout rates must be in [0, 1)");
        }
        Ok(())
    }

    /// lr at `step` of the UNet phase: linear warm-up, then constant.
    pub fn unet_lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            self.unet_lr * (step + 1) as f64 / self.warmup as f64
        } else {
            self.unet_lr
        }
    }
}

/// A `train-base` invocation.
pub struct TrainBaseJob {
    pub out: PathBuf,
    pub args: TrainBaseArgs,
    pub checkpoint_every: usize,
    pub resume: bool,
    /// Store the final weights as float16 (the shipped model).
    pub fp16: bool,
    pub device: Device,
}

/// The rendered training set: (N, 3, 64, 64) uint8 images and the (N,) caption combination.
pub struct WorldImages {
    pub images: Tensor,
    pub combos: Tensor,
}

/// Renders `n` training samples of the world `seed` (with a progress bar).
pub fn render_set(seed: u64, n: usize) -> WorldImages {
    let bar = crate::progress::bar(n as u64, "render");
    let mut pixels = Vec::with_capacity(n * SIZE * SIZE * 3);
    let mut combos = Vec::with_capacity(n);
    for i in 0..n {
        let s = sample(seed, i as u64);
        pixels.extend_from_slice(&s.render.rgb);
        combos.push(super::combo(s.colour, s.shape, s.scene) as i64);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let s = SIZE as i64;
    // (N, H, W, 3) → (N, 3, H, W)
    let images = Tensor::from_slice(&pixels).view([n as i64, s, s, 3]).permute([0, 3, 1, 2]).contiguous();
    WorldImages { images, combos: Tensor::from_slice(&combos) }
}

/// uint8 (B, 3, H, W) → float in [-1, 1].
fn to_unit(images: &Tensor, device: Device) -> Tensor {
    images.to_device(device).to_kind(Kind::Float) / 127.5 - 1.0
}

#[allow(clippy::too_many_arguments)]
/// A training log line (`global_step` counts the VAE's steps, then the UNet's).
fn log(
    f: &mut std::fs::File,
    phase: &str,
    global: usize,
    step: usize,
    loss: f64,
    extra: serde_json::Value,
    lr: f64,
    t: f64,
) -> Result<()> {
    let mut v = serde_json::json!({ "global_step": global, "phase": phase, "step": step, "loss": loss, "lr": lr, "seconds": t });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    writeln!(f, "{v}")?;
    Ok(())
}

/// Runs the job (or resumes it) to the end; returns the model folder.
pub fn train_base(job: &TrainBaseJob) -> Result<PathBuf> {
    let a = &job.args;
    a.validate()?;
    let out = &job.out;
    let identity = serde_json::to_value(a)?;
    let args_path = out.join(ARGS_FILE);
    let _lock = crate::outdir::lock_dir(out, "--out")?;
    crate::outdir::check_run_start(out, &args_path, &identity, job.resume, "train-base")?;
    if !job.resume {
        write_skeleton(out, a, job.fp16)?;
        write_bytes_atomic(&args_path, serde_json::to_string_pretty(&identity)?.as_bytes())?;
    }
    let dev = job.device;
    let world = render_set(a.world_seed, a.images);
    let log_path = out.join(LOG_FILE);
    let started = Instant::now();

    // -- the VAE
    let vae_weights = out.join("vae").join(WEIGHTS);
    if !vae_weights.is_file() {
        let mut vae = crate::rng::seeded(a.seed as i64, || {
            AutoencoderKL::new(serde_json::from_value(a.vae_config.clone())?, dev)
        })?;
        let mut tr = Trainable::new(vec![&mut vae.vs], a.vae_lr, |_| a.weight_decay);
        let ckpt = out.join(VAE_CHECKPOINT);
        if ckpt.is_file() {
            tr.restore(&ckpt, CHECKPOINT_FORMAT, "train-base checkpoint", &identity)?;
        }
        // the log keeps the lines before the step the run continues from
        let mut logf = crate::subject::job::open_log(&log_path, tr.step)?;
        let n = a.images as i64;
        let delay = crate::subject::job::step_delay();
        let bar = crate::progress::bar(a.vae_steps as u64, "vae");
        bar.set_position(tr.step as u64);
        while tr.step < a.vae_steps {
            let (idx, noise) = crate::rng::seeded(step_seed(a.seed, 1, tr.step as u64), || {
                let idx = Tensor::randint(n, [a.vae_batch as i64], (Kind::Int64, Device::Cpu));
                let l = vae.latent_channels();
                let h = (SIZE as i64) / vae.downscale_factor();
                (idx, Tensor::randn([a.vae_batch as i64, l, h, h], (Kind::Float, Device::Cpu)))
            });
            let x = to_unit(&world.images.index_select(0, &idx), dev);
            let post = vae.encode(&x);
            let z = post.sample_with_noise(&noise.to_device(dev));
            let rec = vae.decode(&z);
            let mse = (&rec - &x).square().mean(Kind::Float);
            // KL(N(μ, σ²) ‖ N(0, 1)) summed over latent elements, averaged over the batch (LDM)
            let kl = ((post.mean.square() + post.logvar.exp() - 1.0 - &post.logvar) * 0.5)
                .sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float)
                .mean(Kind::Float);
            let loss = &mse + &kl * a.kl_weight;
            let (tensors, adam) = (&mut tr.tensors, &mut tr.adam);
            let (value, gn) = checked_step(
                tensors,
                adam,
                &loss,
                None,
                a.max_grad_norm,
                tr.step,
                "VAE loss",
                "the learning rate",
                &ckpt,
            )?;
            let extra =
                serde_json::json!({ "mse": mse.double_value(&[]), "kl": kl.double_value(&[]), "grad_norm": gn });
            log(&mut logf, "vae", tr.step, tr.step, value, extra, a.vae_lr, started.elapsed().as_secs_f64())
                .with_context(|| format!("cannot write {}", log_path.display()))?;
            tr.step += 1;
            bar.set_position(tr.step as u64);
            bar.set_message(format!("mse {:.4}", mse.double_value(&[])));
            if job.checkpoint_every > 0 && tr.step.is_multiple_of(job.checkpoint_every) && tr.step < a.vae_steps {
                tr.checkpoint(&ckpt, CHECKPOINT_FORMAT, &[("phase", "vae")], &identity)?;
            }
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
        }
        bar.finish_and_clear();
        // LDM's scaling factor: 1 / std of the posterior means on (up to) 1024 training images
        let k = a.images.min(1024) as i64;
        let std = tch::no_grad(|| vae.encode(&to_unit(&world.images.narrow(0, 0, k), dev)).mean.std(true));
        let mut cfg = a.vae_config.clone();
        cfg["scaling_factor"] = (1.0 / std.double_value(&[])).into();
        write_bytes_atomic(&out.join("vae/config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
        write_var_store_atomic(&vae.vs, &vae_weights, job.fp16)?;
        let _ = std::fs::remove_file(&ckpt);
        eprintln!("VAE trained ({} steps)", a.vae_steps);
    }

    // -- the UNet
    let unet_weights = out.join("unet").join(WEIGHTS);
    if !unet_weights.is_file() {
        let vae = AutoencoderKL::load(&out.join("vae"), dev)?;
        let latents = encode_all(&vae, &world.images, dev);
        drop(vae);
        let contexts = caption_contexts(out, dev)?;
        let sched_cfg: SchedulerConfig = read_json(&out.join("scheduler/scheduler_config.json"))?;
        let n_train = sched_cfg.num_train_timesteps;
        let sched = DdimScheduler::new(sched_cfg, 1)?;
        let mut unet = crate::rng::seeded(a.seed as i64 + 1, || {
            UNet2DConditionModel::new(serde_json::from_value(a.unet_config.clone())?, dev)
        })?;
        let mut tr = Trainable::new(vec![&mut unet.vs], a.unet_lr, |_| a.weight_decay);
        let ckpt = out.join(UNET_CHECKPOINT);
        if ckpt.is_file() {
            tr.restore(&ckpt, CHECKPOINT_FORMAT, "train-base checkpoint", &identity)?;
        }
        let mut logf = crate::subject::job::open_log(&log_path, a.vae_steps + tr.step)?;
        let n = a.images as i64;
        let b = a.unet_batch as i64;
        let shape = [b, latents.size()[1], latents.size()[2], latents.size()[3]];
        let colourless = N_COMBOS as i64; // + shape·8 + scene
        let empty = colourless + (SHAPES.len() * SCENES.len()) as i64;
        let delay = crate::subject::job::step_delay();
        let bar = crate::progress::bar(a.unet_steps as u64, "unet");
        bar.set_position(tr.step as u64);
        while tr.step < a.unet_steps {
            let (idx, noise, t, drop, no_colour) = crate::rng::seeded(step_seed(a.seed, 2, tr.step as u64), || {
                let cpu = (Kind::Int64, Device::Cpu);
                let idx = Tensor::randint(n, [b], cpu);
                let noise = Tensor::randn(shape, (Kind::Float, Device::Cpu));
                let t = Tensor::randint(n_train, [b], cpu);
                let drop = Tensor::rand([b], (Kind::Float, Device::Cpu)).lt(a.caption_dropout);
                let no_colour = Tensor::rand([b], (Kind::Float, Device::Cpu)).lt(a.colour_dropout);
                (idx, noise, t, drop, no_colour)
            });
            // the caption of each sample: its combination, its colour-free caption, or ""
            let combos = world.combos.index_select(0, &idx);
            let per_colour = (SHAPES.len() * SCENES.len()) as i64;
            let combos = combos.where_self(&no_colour.logical_not(), &(combos.remainder(per_colour) + colourless));
            let combos = combos.where_self(&drop.logical_not(), &Tensor::from(empty));
            let x0 = latents.index_select(0, &idx.to_device(dev));
            let (noise, t) = (noise.to_device(dev), t.to_device(dev));
            let x_t = sched.add_noise(&x0, &noise, &t);
            let ctx = contexts.index_select(0, &combos.to_device(dev));
            let pred = unet.forward(&x_t, &t, &ctx, None);
            let loss = (&pred - &noise).square().mean(Kind::Float);
            let lr = a.unet_lr_at(tr.step);
            let (tensors, adam) = (&mut tr.tensors, &mut tr.adam);
            let (value, gn) = checked_step(
                tensors,
                adam,
                &loss,
                Some(lr),
                a.max_grad_norm,
                tr.step,
                "UNet loss",
                "--unet-lr",
                &ckpt,
            )?;
            let extra = serde_json::json!({ "grad_norm": gn });
            log(&mut logf, "unet", a.vae_steps + tr.step, tr.step, value, extra, lr, started.elapsed().as_secs_f64())
                .with_context(|| format!("cannot write {}", log_path.display()))?;
            tr.step += 1;
            bar.set_position(tr.step as u64);
            bar.set_message(format!("loss {value:.4}"));
            if job.checkpoint_every > 0 && tr.step.is_multiple_of(job.checkpoint_every) && tr.step < a.unet_steps {
                tr.checkpoint(&ckpt, CHECKPOINT_FORMAT, &[("phase", "unet")], &identity)?;
            }
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
        }
        bar.finish_and_clear();
        write_var_store_atomic(&unet.vs, &unet_weights, job.fp16)?;
        let _ = std::fs::remove_file(&ckpt);
        eprintln!("UNet trained ({} steps)", a.unet_steps);
    }
    Ok(out.clone())
}

/// The posterior means × scaling factor of every training image (N, C, h, w), in batches of 256.
pub fn encode_all(vae: &AutoencoderKL, images: &Tensor, dev: Device) -> Tensor {
    tch::no_grad(|| {
        let n = images.size()[0];
        let mut out = Vec::new();
        let mut i = 0;
        while i < n {
            let k = (n - i).min(256);
            out.push(vae.encode(&to_unit(&images.narrow(0, i, k), dev)).mean * vae.scaling_factor());
            i += k;
        }
        Tensor::cat(&out, 0)
    })
}

/// The frozen text encoder's hidden states for every caption combination, then the colour-free
/// captions ("a {shape} {scene}", shape-major), then "": (N_COMBOS + 40 + 1, 77, d).
pub fn caption_contexts(model: &Path, dev: Device) -> Result<Tensor> {
    let tok = ClipTokenizer::from_dir(&model.join("tokenizer"))?;
    let te = ClipTextModel::load(&model.join("text_encoder"), dev)?;
    let mut texts = Vec::with_capacity(N_COMBOS + 1);
    for c in 0..COLOURS.len() {
        for s in 0..SHAPES.len() {
            for e in 0..SCENES.len() {
                debug_assert_eq!(texts.len(), super::combo(c, s, e));
                texts.push(caption(c, s, e));
            }
        }
    }
    for shape in SHAPES {
        for (_, phrase) in SCENES {
            texts.push(format!("a {shape} {phrase}"));
        }
    }
    texts.push(String::new());
    let ids: Vec<Tensor> = texts.iter().map(|t| Tensor::from_slice(&tok.encode_padded(t).ids)).collect();
    let ids = Tensor::stack(&ids, 0).to_device(dev);
    Ok(tch::no_grad(|| te.forward(&ids)))
}

/// The folder's fixed parts: `model_index.json`, configs, the tokenizer and the random frozen
/// text encoder.
fn write_skeleton(out: &Path, a: &TrainBaseArgs, fp16: bool) -> Result<()> {
    write_bytes_atomic(&out.join("model_index.json"), include_bytes!("../../assets/configs/model_index.json"))?;
    write_bytes_atomic(
        &out.join("scheduler/scheduler_config.json"),
        include_bytes!("../../assets/configs/world/scheduler.json"),
    )?;
    for (name, text) in [
        ("vocab.json", include_str!("../../assets/tokenizer/vocab.json")),
        ("merges.txt", include_str!("../../assets/tokenizer/merges.txt")),
        ("tokenizer_config.json", include_str!("../../assets/tokenizer/tokenizer_config.json")),
        ("special_tokens_map.json", include_str!("../../assets/tokenizer/special_tokens_map.json")),
    ] {
        write_bytes_atomic(&out.join("tokenizer").join(name), text.as_bytes())?;
    }
    for (dir, cfg) in [("unet", &a.unet_config), ("vae", &a.vae_config), ("text_encoder", &a.text_encoder_config)] {
        write_bytes_atomic(&out.join(dir).join("config.json"), serde_json::to_string_pretty(cfg)?.as_bytes())?;
    }
    let te = crate::rng::seeded(a.seed as i64 + 2, || {
        ClipTextModel::new(serde_json::from_value(a.text_encoder_config.clone())?, Device::Cpu)
    })?;
    write_var_store_atomic(&te.vs, &out.join("text_encoder/model.safetensors"), fp16)
}
