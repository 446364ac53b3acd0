//! `train-encoders`: the world's own DINO and CLIP, trained here from scratch, so that the
//! DreamBooth metrics (DINO, CLIP-I, CLIP-T; [`crate::eval::metrics`]) can be computed on world
//! images exactly as on real photos (`score --dino assets/world-dino --clip assets/world-clip`).
//!
//! - **world-DINO** (`--kind dino`): transformers' `ViTModel`, trained with InfoNCE (SimCLR's
//!   NT-Xent) between two views of the same object instance ([`super::training_object`] in two
//!   independent [`super::random_view`]s: scene, size, position, in-plane rotation), the other
//!   instances of the batch as negatives. A quarter of the instances are *siblings* of their
//!   neighbour — the same shape and colours with another pattern family, or the same shape in
//!   one shaded colour — hard negatives that only the pattern tells apart. The embedding trained
//!   is exactly the one the DINO score uses: the CLS token of the last hidden state after the
//!   final layernorm ([`crate::eval::dino`]), of images preprocessed by the same
//!   [`crate::eval::dino::preprocess`] (resize to round(S·256/224), centre crop S, ImageNet
//!   normalisation), L2-normalised.
//! - **world-CLIP** (`--kind clip`): transformers' `CLIPModel`, trained with CLIP's symmetric
//!   InfoNCE and a learned logit scale on world renders and captions: half the pairs are the
//!   base model's solid training samples ([`super::sample`], "a red ball on the beach"), half
//!   the encoders' training objects ("a striped ball on the beach", [`super::Family::adjective`]);
//!   caption parts are dropped at random ("a ball on the beach", "a red ball", "a ball", "on
//!   the beach"). Pairs with the same caption in a batch are all positives (soft targets). The
//!   image features are `get_image_features` of images preprocessed by the folder's
//!   `CLIPImageProcessor` ([`ClipImageProcessor`]), the text features `get_text_features` of
//!   77 padded ids — what CLIP-I and CLIP-T compute.
//!
//! Every image is augmented (independently per view) so that a generator's softer images are
//! in the encoders' domain: a down-up resampling through 16² or 32² (the world model's VAE
//! decodes 64² images from 16² latents), a Gaussian blur, small brightness / contrast /
//! saturation jitter, pixel noise, then 8-bit quantisation (scored images are PNGs).
//!
//! Each step's batch is a function of (seed, step) alone: the instances are
//! `step · batch + j`, their views and augmentation parameters come from [`Rng::for_item`]
//! streams of that index, the pixel noise from libtorch's generator seeded by
//! [`step_seed`]`(seed, phase, step)`. The checkpoint holds the weights and the AdamW moments,
//! so a resumed run is bit-identical to an unbroken one (same thread count). The model files
//! are written when training ends, each atomically, the weights last (a folder with
//! `model.safetensors` is complete); the checkpoint is then removed.

use super::{
    caption, random_view, render, sample, training_object, Object, Paint, Procedural, Render, Rng, COLOURS, PALETTE,
    SCENES, SHAPES, SIZE,
};
use crate::eval::dino::{resize_size, IMAGENET_MEAN, IMAGENET_STD};
use crate::io::{write_bytes_atomic, write_safetensors_atomic};
use crate::models::clip::{ClipConfig, ClipImageProcessor, ClipModel};
use crate::models::vit::{ViTConfig, ViTModel};
use crate::subject::adam::{checked_step, Trainable};
use crate::subject::learn::step_seed;
use crate::tokenizer::ClipTokenizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

pub const ARGS_FILE: &str = "train_encoders.json";
pub const LOG_FILE: &str = "train_log.jsonl";
pub const CHECKPOINT: &str = "checkpoint.safetensors";
pub const WEIGHTS: &str = "model.safetensors";
const CHECKPOINT_FORMAT: &str = "hifi-tuner-train-encoders-checkpoint/1";

/// Which encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    Dino,
    Clip,
}

impl std::str::FromStr for EncoderKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dino" => Ok(Self::Dino),
            "clip" => Ok(Self::Clip),
            o => bail!("--kind must be dino or clip, got {o:?}"),
        }
    }
}

/// The augmentation of every training image (probabilities and ranges).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    /// Probability of a down-up resampling through 16² (area down, bilinear up), and through 32².
    pub resample_16: f64,
    pub resample_32: f64,
    /// Probability of a Gaussian blur, and its σ range (pixels).
    pub blur: f64,
    pub blur_sigma: [f64; 2],
    /// Brightness, contrast and saturation factors are drawn in [1 − x, 1 + x].
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    /// Probability of pixel noise, and the maximum of its σ (in [0, 1] units).
    pub noise: f64,
    pub noise_max: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            resample_16: 0.25,
            resample_32: 0.25,
            blur: 0.3,
            blur_sigma: [0.4, 1.2],
            brightness: 0.1,
            contrast: 0.1,
            saturation: 0.15,
            noise: 0.5,
            noise_max: 0.04,
        }
    }
}

/// Everything that determines the trained encoder (compared on `--resume`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderArgs {
    pub kind: EncoderKind,
    /// The world's seed (which training objects and samples).
    pub world_seed: u64,
    /// Initialisation, views, augmentations.
    pub seed: u64,
    pub steps: usize,
    /// Instances (DINO: two views each) or image–caption pairs (CLIP) per step.
    pub batch: usize,
    pub lr: f64,
    /// Linear warm-up steps, then cosine decay to `lr / 10`.
    pub warmup: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// NT-Xent temperature (DINO).
    pub temperature: f64,
    /// Fraction of DINO instances that are hard-negative siblings of their neighbour.
    pub siblings: f64,
    /// DINO's scene curriculum: the probability that an instance's second view is in the same
    /// scene as its first falls linearly from 1 at step 0 to this floor at half the steps (at
    /// first the positives differ in pose only, so the encoder learns the object before it
    /// must ignore the scene; without it, it collapses to a constant).
    pub same_scene_floor: f64,
    pub augment: Augment,
    /// Store the weights as float16.
    pub fp16: bool,
    /// The model's config.json (`ViTConfig` or `CLIPConfig`).
    pub config: serde_json::Value,
}

impl EncoderArgs {
    /// The shipped encoders' settings.
    pub fn default_for(kind: EncoderKind) -> Self {
        Self {
            kind,
            world_seed: 0,
            seed: 0,
            steps: 700,
            batch: if kind == EncoderKind::Dino { 64 } else { 96 },
            lr: 1e-3,
            warmup: 50,
            weight_decay: 0.05,
            max_grad_norm: 1.0,
            temperature: 0.1,
            siblings: 0.25,
            same_scene_floor: 0.25,
            augment: Augment::default(),
            fp16: kind == EncoderKind::Clip,
            config: default_config(kind),
        }
    }

    /// Checks everything before a file is written (builds the model from the config).
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            bail!("--steps must be at least 1");
        }
        if self.batch < 2 {
            bail!("--batch must be at least 2 (the other instances of a batch are the negatives)");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("--lr must be positive");
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            bail!("the temperature must be positive");
        }
        if !(0.0..=0.5).contains(&self.siblings) {
            bail!("the sibling fraction must be in [0, 0.5]");
        }
        if !(0.0..=1.0).contains(&self.same_scene_floor) {
            bail!("the same-scene floor must be in [0, 1]");
        }
        let model_type = match self.kind {
            EncoderKind::Dino => "vit",
            EncoderKind::Clip => "clip",
        };
        if self.config.get("model_type").and_then(|v| v.as_str()) != Some(model_type) {
            bail!(
                "--config: model_type must be {model_type:?} for --kind {} (got {})",
                model_type.replace("vit", "dino"),
                self.config.get("model_type").map_or("none".to_string(), |v| v.to_string())
            );
        }
        match self.kind {
            EncoderKind::Dino => {
                let cfg: ViTConfig =
                    serde_json::from_value(self.config.clone()).context("--config: not a ViTConfig")?;
                let (h, w) = cfg.image_size.hw();
                if h != w {
                    bail!("--config: image_size must be square (the DINO preprocessing crops a square)");
                }
                cfg.validate("--config")?;
            }
            EncoderKind::Clip => {
                let cfg: ClipConfig =
                    serde_json::from_value(self.config.clone()).context("--config: not a CLIPConfig")?;
                if cfg.text_config.max_position_embeddings < 77 {
                    bail!("--config: text_config.max_position_embeddings must be ≥ 77 (prompts are padded to 77 ids)");
                }
                if cfg.text_config.vocab_size != 49408 {
                    bail!("--config: text_config.vocab_size must be 49408 (the CLIP tokenizer's)");
                }
                ClipModel::new(cfg, Device::Cpu).context("--config")?;
            }
        }
        Ok(())
    }

    /// The probability that a DINO instance's two views share their scene at `step`.
    pub fn same_scene_at(&self, step: usize) -> f64 {
        let t = (step as f64 / (0.5 * self.steps as f64)).min(1.0);
        1.0 - t * (1.0 - self.same_scene_floor)
    }

    /// lr at `step`: linear warm-up, then cosine decay to lr / 10 at the last step.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        self.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
    }
}

/// The shipped architectures (see the model cards in `assets/world-dino`, `assets/world-clip`).
pub fn default_config(kind: EncoderKind) -> serde_json::Value {
    match kind {
        EncoderKind::Dino => serde_json::json!({
            "architectures": ["ViTModel"],
            "model_type": "vit",
            "hidden_size": 96,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 384,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
            "image_size": 64,
            "patch_size": 8,
            "num_channels": 3,
            "qkv_bias": true,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02,
            "encoder_stride": 8,
            "dtype": "float32"
        }),
        EncoderKind::Clip => serde_json::json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": 64,
            "logit_scale_init_value": 2.6592,
            "initializer_factor": 1.0,
            "dtype": "float32",
            "text_config": {
                "model_type": "clip_text_model",
                "vocab_size": 49408,
                "hidden_size": 64,
                "intermediate_size": 256,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "max_position_embeddings": 77,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "attention_dropout": 0.0,
                "bos_token_id": 49406,
                "eos_token_id": 49407,
                "pad_token_id": 49407,
                "projection_dim": 64
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": 96,
                "intermediate_size": 384,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "image_size": 64,
                "patch_size": 8,
                "num_channels": 3,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "attention_dropout": 0.0,
                "projection_dim": 64
            }
        }),
    }
}

/// A `train-encoders` invocation.
pub struct EncoderJob {
    pub out: PathBuf,
    pub args: EncoderArgs,
    pub checkpoint_every: usize,
    pub resume: bool,
    pub device: Device,
}

/// The network being trained (one per run: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Net {
    Dino(ViTModel),
    Clip { model: ClipModel, tokenizer: ClipTokenizer, processor: ClipImageProcessor },
}

impl Net {
    fn new(a: &EncoderArgs, dev: Device) -> Result<Self> {
        let mut net = match a.kind {
            EncoderKind::Dino => Net::Dino(ViTModel::new(serde_json::from_value(a.config.clone())?, dev)?),
            EncoderKind::Clip => {
                let model = ClipModel::new(serde_json::from_value(a.config.clone())?, dev)?;
                let s = model.image_size();
                Net::Clip { model, tokenizer: ClipTokenizer::sd15()?, processor: ClipImageProcessor::default_for(s) }
            }
        };
        let seed = step_seed(a.seed, 0, 0);
        crate::rng::seeded(seed, || {
            for vs in net.stores_mut() {
                init_like_transformers(vs);
            }
        });
        Ok(net)
    }

    fn stores_mut(&mut self) -> Vec<&mut nn::VarStore> {
        match self {
            Net::Dino(m) => vec![&mut m.vs],
            Net::Clip { model, .. } => vec![&mut model.text.vs, &mut model.vs],
        }
    }

    fn stores(&self) -> Vec<&nn::VarStore> {
        match self {
            Net::Dino(m) => vec![&m.vs],
            Net::Clip { model, .. } => vec![&model.text.vs, &model.vs],
        }
    }

    fn image_size(&self) -> i64 {
        match self {
            Net::Dino(m) => m.config.image_size.hw().0,
            Net::Clip { model, .. } => model.image_size(),
        }
    }
}

/// transformers' initialisation (`_init_weights` of ViT / CLIP, simplified): every weight
/// matrix, embedding and token ~ N(0, 0.02²) folded into ±2σ (`fmod`), biases 0, layer-norm
/// weights 1; `logit_scale` keeps its initial value (ln 1/0.07). Draws from the global
/// generator (call under [`crate::rng::seeded`]) in the sorted order of the names.
fn init_like_transformers(vs: &mut nn::VarStore) {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut t) in vars {
            if name == "logit_scale" {
                continue;
            }
            let value = if name.ends_with("bias") {
                t.zeros_like()
            } else if t.dim() == 1 && name.ends_with("weight") {
                t.ones_like() // layer norms (the only 1-D weights)
            } else {
                Tensor::randn(t.size(), (Kind::Float, Device::Cpu)).fmod(2.0) * 0.02
            };
            t.copy_(&value);
        }
    });
}

/// One image's augmentation, drawn from its item stream.
#[derive(Debug, Clone, Copy)]
struct AugDraw {
    resample: Option<i64>,
    blur_sigma: Option<f64>,
    brightness: f64,
    contrast: f64,
    saturation: f64,
    noise: f64,
}

impl AugDraw {
    fn draw(a: &Augment, rng: &mut Rng) -> Self {
        let u = |rng: &mut Rng| rng.uniform() as f64;
        let r = u(rng);
        let resample = if r < a.resample_16 {
            Some(16)
        } else if r < a.resample_16 + a.resample_32 {
            Some(32)
        } else {
            None
        };
        let blur = u(rng) < a.blur;
        let sigma = a.blur_sigma[0] + (a.blur_sigma[1] - a.blur_sigma[0]) * u(rng);
        let jitter = |rng: &mut Rng, x: f64| 1.0 - x + 2.0 * x * u(rng);
        let brightness = jitter(rng, a.brightness);
        let contrast = jitter(rng, a.contrast);
        let saturation = jitter(rng, a.saturation);
        let noisy = u(rng) < a.noise;
        let noise = a.noise_max * u(rng);
        Self {
            resample,
            blur_sigma: blur.then_some(sigma),
            brightness,
            contrast,
            saturation,
            noise: if noisy { noise } else { 0.0 },
        }
    }
}

/// Applies `d` to a render: (3, S, S) in [0, 1] → 8-bit RGB image. `noise` is N(0, 1) (3, S, S).
fn augment(r: &Render, d: &AugDraw, noise: &Tensor) -> image::DynamicImage {
    let s = SIZE as i64;
    let x = Tensor::from_slice(&r.rgb).view([s, s, 3]).permute([2, 0, 1]).to_kind(Kind::Float) / 255.0;
    let mut x = x.unsqueeze(0); // (1, 3, S, S)
    if let Some(k) = d.resample {
        x = x.adaptive_avg_pool2d([k, k]).upsample_bilinear2d([s, s], false, None, None);
    }
    if let Some(sigma) = d.blur_sigma {
        let taps: Vec<f32> = (-2..=2).map(|i: i32| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32).collect();
        let k = Tensor::from_slice(&taps);
        let k = &k / k.sum(Kind::Float);
        let w = k.view([1, 5]) * k.view([5, 1]); // (5, 5)
        let w = w.view([1, 1, 5, 5]).repeat([3, 1, 1, 1]);
        x = x.reflection_pad2d([2, 2, 2, 2]).conv2d(&w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 3);
    }
    // colour jitter (torchvision's order: brightness, contrast, saturation)
    let grey = |x: &Tensor| {
        let w = Tensor::from_slice(&[0.299f32, 0.587, 0.114]).view([1, 3, 1, 1]);
        (x * w).sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
    };
    x = (x * d.brightness).clamp(0.0, 1.0);
    let m = grey(&x).mean(Kind::Float);
    x = (&m + (&x - &m) * d.contrast).clamp(0.0, 1.0);
    let g = grey(&x);
    x = (&g + (&x - &g) * d.saturation).clamp(0.0, 1.0);
    if d.noise > 0.0 {
        x += noise.unsqueeze(0) * d.noise;
    }
    let u8s = (x.clamp(0.0, 1.0) * 255.0).round().to_kind(Kind::Uint8).squeeze_dim(0).permute([1, 2, 0]).contiguous();
    let mut bytes = vec![0u8; (s * s * 3) as usize];
    let n = bytes.len();
    u8s.copy_data_u8(&mut bytes, n);
    image::DynamicImage::ImageRgb8(image::RgbImage::from_raw(s as u32, s as u32, bytes).expect("64×64×3 bytes"))
}

/// A sibling of `o` (a hard negative): the same shape and colours in another pattern family, or
/// the same shape in one shaded colour; never a held-out subject's pattern.
fn sibling(o: Object, rng: &mut Rng) -> Object {
    loop {
        let paint = match o.paint {
            Paint::Procedural(p) if rng.uniform() < 0.7 => {
                let family = super::Family::ALL[rng.below(super::Family::ALL.len())];
                Paint::Procedural(Procedural { family, ..p })
            }
            Paint::Procedural(p) => Paint::Rgb(PALETTE[p.colours[rng.below(2)]].1),
            Paint::Solid(c) => Paint::Solid((c + 1 + rng.below(COLOURS.len() - 1)) % COLOURS.len()),
            _ => Paint::Solid(rng.below(COLOURS.len())),
        };
        let s = Object { shape: o.shape, paint };
        if s != o && !super::held_out_pattern(&s) {
            return s;
        }
    }
}

/// Runs `f(i)` for i in 0..n on up to `threads` threads; results in order.
fn par_map<T: Send>(n: usize, threads: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = threads.clamp(1, n.max(1));
    let chunk = n.div_ceil(threads);
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                sc.spawn(move || (t * chunk..((t + 1) * chunk).min(n)).map(f).collect::<Vec<T>>())
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("render thread")).collect()
    })
}

fn render_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(4)
}

/// The DINO batch of `step`: (2B, 3, S, S) pixel values, views 1 of the B instances, then
/// views 2.
fn dino_batch(a: &EncoderArgs, step: usize, image_size: i64) -> Result<Tensor> {
    let b = a.batch;
    let p_same = a.same_scene_at(step);
    let every = if a.siblings > 0.0 { (1.0 / a.siblings).round() as usize } else { usize::MAX };
    let renders = par_map(2 * b, render_threads(), |k| {
        let (view, j) = (k / b, k % b);
        let index = (step * b + j) as u64;
        let object = if every != usize::MAX && j % every == every - 1 && j > 0 {
            // a sibling of the previous instance
            let prev = training_object(a.world_seed, index - 1);
            sibling(prev, &mut Rng::for_item(a.seed, 20, index))
        } else {
            training_object(a.world_seed, index)
        };
        let mut rng = Rng::for_item(a.seed, 21 + view as u64, index);
        let (mut scene, place, bg) = random_view(&mut rng);
        let aug = AugDraw::draw(&a.augment, &mut rng);
        if view == 1 && (rng.uniform() as f64) < p_same {
            scene = random_view(&mut Rng::for_item(a.seed, 21, index)).0;
        }
        (render(object, scene, place, bg), aug)
    });
    let s = SIZE as i64;
    let noise = crate::rng::seeded(step_seed(a.seed, 1, step as u64), || {
        Tensor::randn([2 * b as i64, 3, s, s], (Kind::Float, Device::Cpu))
    });
    let px = renders
        .iter()
        .enumerate()
        .map(|(k, (r, d))| crate::eval::dino::preprocess(&augment(r, d, &noise.get(k as i64)), image_size))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&px, 0))
}

/// The caption words of an object: its adjective (colour or pattern family).
fn adjective(o: &Object) -> &'static str {
    match o.paint {
        Paint::Solid(c) => COLOURS[c].0,
        Paint::Procedural(p) => p.family.adjective(),
        _ => "",
    }
}

/// A caption with parts dropped at random: "a red ball on the beach", "a ball on the beach",
/// "a red ball", "a ball", "on the beach".
fn dropped_caption(adj: &str, shape: usize, scene: usize, rng: &mut Rng) -> String {
    let keep_noun = rng.uniform() < 0.9;
    let keep_adj = rng.uniform() < 0.6;
    let keep_scene = rng.uniform() < 0.75;
    if !keep_noun {
        return SCENES[scene].1.to_string();
    }
    let mut words: Vec<&str> = Vec::new();
    if keep_adj && !adj.is_empty() {
        words.push(adj);
    }
    words.push(SHAPES[shape]);
    let article = if words[0].starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    let mut text = format!("{article} {}", words.join(" "));
    if keep_scene {
        text.push(' ');
        text.push_str(SCENES[scene].1);
    }
    text
}

/// The CLIP batch of `step`: pixel values (B, 3, S, S) and captions.
fn clip_batch(a: &EncoderArgs, step: usize, processor: &ClipImageProcessor) -> Result<(Tensor, Vec<String>)> {
    let b = a.batch;
    let items = par_map(b, render_threads(), |j| {
        let index = (step * b + j) as u64;
        let mut rng = Rng::for_item(a.seed, 30, index);
        let (r, text) = if j % 2 == 0 {
            let s = sample(a.world_seed, index);
            let text = if rng.uniform() < 0.3 {
                caption(s.colour, s.shape, s.scene)
            } else {
                dropped_caption(COLOURS[s.colour].0, s.shape, s.scene, &mut rng)
            };
            (s.render, text)
        } else {
            let o = training_object(a.world_seed, index);
            let (scene, place, bg) = random_view(&mut rng);
            let text = dropped_caption(adjective(&o), o.shape, scene, &mut rng);
            (render(o, scene, place, bg), text)
        };
        (r, AugDraw::draw(&a.augment, &mut rng), text)
    });
    let s = SIZE as i64;
    let noise = crate::rng::seeded(step_seed(a.seed, 1, step as u64), || {
        Tensor::randn([b as i64, 3, s, s], (Kind::Float, Device::Cpu))
    });
    let mut px = Vec::with_capacity(b);
    let mut texts = Vec::with_capacity(b);
    for (k, (r, d, t)) in items.into_iter().enumerate() {
        px.push(processor.preprocess(&augment(&r, &d, &noise.get(k as i64)))?);
        texts.push(t);
    }
    Ok((Tensor::stack(&px, 0), texts))
}

/// L2-normalised rows (F.normalize, eps 1e-12).
fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2.0, [1i64].as_slice(), true).clamp_min(1e-12)
}

/// SimCLR's NT-Xent over 2B L2-normalised embeddings (views 1, then views 2).
pub fn nt_xent(z: &Tensor, temperature: f64) -> Tensor {
    let n = z.size()[0];
    let b = n / 2;
    let sim = z.matmul(&z.transpose(0, 1)) / temperature;
    let eye = Tensor::eye(n, (Kind::Float, z.device()));
    let sim = sim - eye * 1e9;
    let targets = (Tensor::arange(n, (Kind::Int64, z.device())) + b).remainder(n);
    sim.log_softmax(1, Kind::Float).gather(1, &targets.unsqueeze(1), false).mean(Kind::Float).neg()
}

/// CLIP's symmetric InfoNCE with soft targets: `same` (B, B) marks pairs with equal captions.
pub fn clip_loss(img: &Tensor, txt: &Tensor, logit_scale: &Tensor, same: &Tensor) -> Tensor {
    let scale = logit_scale.clamp_max(100f64.ln()).exp();
    let logits = img.matmul(&txt.transpose(0, 1)) * scale;
    let target = same / same.sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
    let ce = |l: &Tensor| (l.log_softmax(1, Kind::Float) * &target).sum(Kind::Float).neg() / img.size()[0] as f64;
    (ce(&logits) + ce(&logits.transpose(0, 1))) * 0.5
}

/// One step's loss.
fn step_loss(
    net: &Net,
    a: &EncoderArgs,
    step: usize,
    dev: Device,
    ids: &mut HashMap<String, Tensor>,
) -> Result<Tensor> {
    match net {
        Net::Dino(m) => {
            let px = dino_batch(a, step, m.config.image_size.hw().0)?.to_device(dev);
            let z = normalize(&m.f_forward(&px)?.select(1, 0));
            Ok(nt_xent(&z, a.temperature))
        }
        Net::Clip { model, tokenizer, processor } => {
            let (px, texts) = clip_batch(a, step, processor)?;
            let rows: Vec<Tensor> = texts
                .iter()
                .map(|t| {
                    ids.entry(t.clone())
                        .or_insert_with(|| Tensor::from_slice(&tokenizer.encode_padded(t).ids))
                        .shallow_clone()
                })
                .collect();
            let ids_t = Tensor::stack(&rows, 0).to_device(dev);
            let same: Vec<f32> =
                texts.iter().flat_map(|x| texts.iter().map(move |y| f32::from(u8::from(x == y)))).collect();
            let n = texts.len() as i64;
            let same = Tensor::from_slice(&same).view([n, n]).to_device(dev);
            let img = normalize(&model.image_features(&px.to_device(dev))?);
            let txt = normalize(&model.text_features(&ids_t)?);
            Ok(clip_loss(&img, &txt, &model.logit_scale, &same))
        }
    }
}

/// Runs the job (or resumes it) to the end; returns the model folder.
pub fn train_encoder(job: &EncoderJob) -> Result<PathBuf> {
    let a = &job.args;
    a.validate()?;
    let out = &job.out;
    let identity = serde_json::to_value(a)?;
    let args_path = out.join(ARGS_FILE);
    crate::outdir::check_run_start(out, &args_path, &identity, job.resume, "train-encoders")?;
    let _lock = crate::outdir::lock_dir(out, "--out")?;
    if out.join(WEIGHTS).is_file() {
        eprintln!("{} is already trained ({} steps)", out.display(), a.steps);
        return Ok(out.clone());
    }
    if !job.resume {
        write_bytes_atomic(&args_path, serde_json::to_string_pretty(&identity)?.as_bytes())?;
    }
    let dev = job.device;
    let mut net = Net::new(a, dev)?;
    let mut tr = Trainable::new(net.stores_mut(), a.lr, |t| {
        // no weight decay on biases, norms, embeddings' 1-D vectors and the logit scale
        if t.dim() >= 2 {
            a.weight_decay
        } else {
            0.0
        }
    });
    let ckpt = out.join(CHECKPOINT);
    if job.resume && ckpt.is_file() {
        tr.restore(&ckpt, CHECKPOINT_FORMAT, "train-encoders checkpoint", &identity)?;
    }
    let log_path = out.join(LOG_FILE);
    let mut logf = crate::subject::job::open_log(&log_path, tr.step)?;
    let delay = crate::subject::job::step_delay();
    let label = match a.kind {
        EncoderKind::Dino => "world-dino",
        EncoderKind::Clip => "world-clip",
    };
    let bar = crate::progress::bar(a.steps as u64, label);
    bar.set_position(tr.step as u64);
    let started = Instant::now();
    // seconds already spent before a resume (the log's last line)
    let before = last_seconds(&log_path).unwrap_or(0.0);
    let mut ids = HashMap::new();
    while tr.step < a.steps {
        let loss = step_loss(&net, a, tr.step, dev, &mut ids)?;
        let lr = a.lr_at(tr.step);
        let (value, gn) = checked_step(
            &mut tr.tensors,
            &mut tr.adam,
            &loss,
            Some(lr),
            a.max_grad_norm,
            tr.step,
            "loss",
            "--lr",
            &ckpt,
        )?;
        let seconds = before + started.elapsed().as_secs_f64();
        let line = serde_json::json!({
            "global_step": tr.step, "step": tr.step, "loss": value, "lr": lr, "grad_norm": gn, "seconds": seconds
        });
        writeln!(logf, "{line}").with_context(|| format!("cannot write {}", log_path.display()))?;
        tr.step += 1;
        bar.set_position(tr.step as u64);
        bar.set_message(format!("loss {value:.4}"));
        if job.checkpoint_every > 0 && tr.step.is_multiple_of(job.checkpoint_every) && tr.step < a.steps {
            tr.checkpoint(&ckpt, CHECKPOINT_FORMAT, &[], &identity)?;
        }
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
    }
    bar.finish_and_clear();
    write_model(out, a, &net)?;
    let _ = std::fs::remove_file(&ckpt);
    eprintln!("{label} trained ({} steps)", a.steps);
    Ok(out.clone())
}

fn last_seconds(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let v: serde_json::Value = serde_json::from_str(text.lines().last()?).ok()?;
    v.get("seconds")?.as_f64()
}

/// The model folder's files: config, processor, tokenizer (CLIP), then the weights.
fn write_model(out: &Path, a: &EncoderArgs, net: &Net) -> Result<()> {
    let json = |v: &serde_json::Value| -> Result<Vec<u8>> { Ok(serde_json::to_string_pretty(v)?.into_bytes()) };
    let mut config = a.config.clone();
    let s = net.image_size();
    let processor = match a.kind {
        EncoderKind::Dino => {
            config["architectures"] = serde_json::json!(["ViTModel"]);
            config["model_type"] = "vit".into();
            dino_processor_config(s)
        }
        EncoderKind::Clip => {
            config["architectures"] = serde_json::json!(["CLIPModel"]);
            config["model_type"] = "clip".into();
            for (name, text) in [
                ("vocab.json", include_str!("../../assets/tokenizer/vocab.json")),
                ("merges.txt", include_str!("../../assets/tokenizer/merges.txt")),
                ("tokenizer_config.json", include_str!("../../assets/tokenizer/tokenizer_config.json")),
                ("special_tokens_map.json", include_str!("../../assets/tokenizer/special_tokens_map.json")),
            ] {
                write_bytes_atomic(&out.join(name), text.as_bytes())?;
            }
            serde_json::json!({
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": true, "size": {"shortest_edge": s}, "resample": 3,
                "do_center_crop": true, "crop_size": {"height": s, "width": s},
                "do_rescale": true, "rescale_factor": 1.0 / 255.0,
                "do_normalize": true, "image_mean": crate::models::clip::CLIP_MEAN,
                "image_std": crate::models::clip::CLIP_STD, "do_convert_rgb": true
            })
        }
    };
    // float32 in memory whatever the storage (transformers' dtype="auto" reads this)
    config["dtype"] = "float32".into();
    write_bytes_atomic(&out.join("config.json"), &json(&config)?)?;
    write_bytes_atomic(&out.join("preprocessor_config.json"), &json(&processor)?)?;
    let mut vars: Vec<(String, Tensor)> = Vec::new();
    for vs in net.stores() {
        for (k, t) in vs.variables() {
            vars.push((k, if a.fp16 { t.detach().to_kind(Kind::Half) } else { t.detach() }));
        }
    }
    write_safetensors_atomic(&out.join(WEIGHTS), &vars, &Default::default())
}

/// An f32 constant as the shortest f64 decimal that rounds to it (0.485, not 0.48500001430511475).
fn decimal(v: f32) -> f64 {
    v.to_string().parse().expect("a float's decimal")
}

/// transformers' `BitImageProcessor` doing what [`crate::eval::dino::preprocess`] does (the
/// DINO evaluation transform): shortest edge → round(S·256/224) bicubic, centre crop S,
/// ImageNet mean / std.
pub fn dino_processor_config(s: i64) -> serde_json::Value {
    serde_json::json!({
        "image_processor_type": "BitImageProcessor",
        "do_resize": true, "size": {"shortest_edge": resize_size(s)}, "resample": 3,
        "do_center_crop": true, "crop_size": {"height": s, "width": s},
        "do_rescale": true, "rescale_factor": 1.0 / 255.0,
        "do_normalize": true, "image_mean": IMAGENET_MEAN.map(decimal), "image_std": IMAGENET_STD.map(decimal),
        "do_convert_rgb": true
    })
}
