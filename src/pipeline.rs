//! Classifier-free guided DDIM sampling: one loop for every conditioning the paper uses.
//!
//! The loop asks a [`StepConditioning`] for each step's `(c, φ)` pair — a fixed prompt or Eq. 7's
//! step-wise `[c, c_s^t]` — and may hand every attention call to a controller (DAAM maps).
//! Numerically it is diffusers' `StableDiffusionPipeline.__call__` with a `DDIMScheduler` and
//! η = 0. Algorithm 2 needs the two guidance branches apart and runs its own loop
//! ([`crate::guidance::reference`]) over the same [`StableDiffusion::eps_pair`] and [`cfg`].

use crate::attention::{reborrow, AttentionController};
use crate::hub::{self, ModelSpec};
use crate::load::ModelDir;
use crate::models::unet::config::PerLevel;
use crate::models::unet::AddedCond;
use crate::models::{clip_text::ClipTextModel, unet::UNet2DConditionModel, vae::AutoencoderKL};
use crate::scheduler::{DdimScheduler, SchedulerConfig};
use crate::single_file::{self, Configs};
use crate::tokenizer::ClipTokenizer;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The encoder hidden states of one step: `cond` = c (or [c, c_s^t]), `uncond` = φ; each
/// (B, 77, d). An SDXL model also takes `added` = (φ's, c's) [`AddedCond`] (pooled text embeds
/// and time ids); `None` for SD-1.x / 2.x.
pub struct StepCond {
    pub cond: Tensor,
    pub uncond: Tensor,
    pub added: Option<(AddedCond, AddedCond)>,
}

impl StepCond {
    /// (c, φ) of an SD-1.x / 2.x model (no added conditioning).
    pub fn new(cond: Tensor, uncond: Tensor) -> Self {
        Self { cond, uncond, added: None }
    }

    /// The unconditional branch's text: φ and, on SDXL, its pooled embeds.
    pub fn uncond_text(&self) -> TextCond {
        TextCond {
            hidden: self.uncond.shallow_clone(),
            pooled: self.added.as_ref().map(|(u, _)| u.text_embeds.shallow_clone()),
        }
    }

    /// The conditional branch's text: c and, on SDXL, its pooled embeds.
    pub fn cond_text(&self) -> TextCond {
        TextCond {
            hidden: self.cond.shallow_clone(),
            pooled: self.added.as_ref().map(|(_, c)| c.text_embeds.shallow_clone()),
        }
    }

    pub fn shallow_clone(&self) -> Self {
        Self {
            cond: self.cond.shallow_clone(),
            uncond: self.uncond.shallow_clone(),
            added: self.added.as_ref().map(|(u, c)| (u.shallow_clone(), c.shallow_clone())),
        }
    }
}

/// What conditions DDIM step `index` (timestep `t`).
pub trait StepConditioning {
    fn at(&mut self, index: usize, t: i64) -> Result<StepCond>;
}

/// The same (c, φ) at every step: plain text-to-image.
pub struct Fixed(pub StepCond);

impl StepConditioning for Fixed {
    fn at(&mut self, _index: usize, _t: i64) -> Result<StepCond> {
        Ok(self.0.shallow_clone())
    }
}

/// The text conditioning of one guidance branch: the encoder hidden states (B, 77, d) and, on
/// SDXL, the pooled `text_embeds` (B, P) that enter the UNet's added conditioning. φ of a
/// request ([`StableDiffusion::encode_negative`]), c_r of an inversion
/// ([`StableDiffusion::encode_text`]), and what reference guidance (φ_h) and null-text
/// inversion (φ_t) optimise.
pub struct TextCond {
    pub hidden: Tensor,
    pub pooled: Option<Tensor>,
}

impl TextCond {
    pub fn shallow_clone(&self) -> Self {
        Self { hidden: self.hidden.shallow_clone(), pooled: self.pooled.as_ref().map(Tensor::shallow_clone) }
    }

    /// A detached copy (the start of an optimised φ).
    pub fn detach_copy(&self) -> Self {
        Self { hidden: self.hidden.detach().copy(), pooled: self.pooled.as_ref().map(|p| p.detach().copy()) }
    }

    /// Rows repeated `n` times.
    pub fn repeat(&self, n: i64) -> Self {
        Self { hidden: self.hidden.repeat([n, 1, 1]), pooled: self.pooled.as_ref().map(|p| p.repeat([n, 1])) }
    }

    /// Batches stacked in order (all with or all without pooled embeds).
    pub fn cat(parts: &[&TextCond]) -> Self {
        let hidden = Tensor::cat(&parts.iter().map(|p| &p.hidden).collect::<Vec<_>>(), 0);
        let pooled: Option<Vec<&Tensor>> = parts.iter().map(|p| p.pooled.as_ref()).collect();
        Self { hidden, pooled: pooled.map(|p| Tensor::cat(&p, 0)) }
    }

    /// The tensors an optimiser moves: the hidden states, then the pooled embeds if any.
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        std::iter::once(&mut self.hidden).chain(self.pooled.as_mut()).collect()
    }

    /// Fresh leaves that require gradients, with the same values.
    pub fn leaves(&self) -> Self {
        let leaf = |t: &Tensor| t.detach().set_requires_grad(true);
        Self { hidden: leaf(&self.hidden), pooled: self.pooled.as_ref().map(leaf) }
    }

    /// The hidden states, then the pooled embeds if any (the order of [`tensors_mut`](Self::tensors_mut)).
    pub fn tensors(&self) -> Vec<&Tensor> {
        std::iter::once(&self.hidden).chain(self.pooled.as_ref()).collect()
    }
}

/// SD-1.x / 2.x conditioning: hidden states only.
impl From<Tensor> for TextCond {
    fn from(hidden: Tensor) -> Self {
        Self { hidden, pooled: None }
    }
}

impl From<&Tensor> for TextCond {
    fn from(hidden: &Tensor) -> Self {
        Self { hidden: hidden.shallow_clone(), pooled: None }
    }
}

impl From<&TextCond> for TextCond {
    fn from(t: &TextCond) -> Self {
        t.shallow_clone()
    }
}

/// Makes a per-step conditioning from (the scheduler, φ, images per prompt).
pub type MakeConditioning<'a> = dyn FnMut(&DdimScheduler, TextCond, i64) -> Result<Box<dyn StepConditioning + 'a>> + 'a;

/// One text-to-image request, with diffusers' argument meanings.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    /// `None` = the empty prompt as the unconditional branch.
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    pub height: i64,
    pub width: i64,
    pub num_images: i64,
}

impl GenerateRequest {
    /// A training preview (`learn --preview-every`): one square image of `prompt` at the fixed
    /// seed, steps and guidance of [`crate::progress::previews`].
    pub fn preview(prompt: String, size: i64) -> Self {
        use crate::progress::previews;
        Self {
            prompt,
            negative_prompt: None,
            seed: previews::SEED,
            steps: previews::STEPS,
            guidance: previews::GUIDANCE,
            height: size,
            width: size,
            num_images: 1,
        }
    }
}

/// Classifier-free guidance, the one rule of the whole crate: ε_u + w·(ε_c − ε_u) for w > 1, and
/// the conditional branch ε_c alone for w ≤ 1 (diffusers' `do_classifier_free_guidance =
/// guidance_scale > 1`). [`StableDiffusion::guided_eps`] skips the φ branch for w ≤ 1; every other
/// caller that has both branches goes through here, so all loops follow the same trajectory.
pub fn cfg(eps_u: &Tensor, eps_c: &Tensor, guidance: f64) -> Tensor {
    if guidance <= 1.0 {
        return eps_c.shallow_clone();
    }
    eps_u + guidance * (eps_c - eps_u)
}

/// How `--model` is loaded besides its path: `--config` and `--variant`.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// A diffusers folder whose component configs and tokenizer convert a single-file
    /// checkpoint (diffusers' `from_single_file(config=…)`); default: the standard SD-1.x ones.
    pub config: Option<PathBuf>,
    /// The weight variant to download for a hub id (e.g. `fp16`).
    pub variant: Option<String>,
    /// The networks' compute kind (`--dtype`, resolved by [`crate::precision::resolve`]);
    /// None = float32.
    pub dtype: Option<Kind>,
    /// LoRA files merged into the UNet and text encoder, in order, before the `dtype` cast
    /// (`--lora FILE[:SCALE]`; [`crate::lora`]).
    pub loras: Vec<crate::lora::LoraSpec>,
}

/// SDXL's second text encoder (OpenCLIP bigG as `CLIPTextModelWithProjection`), its tokenizer
/// (pad `"!"`), and the pipeline's `force_zeros_for_empty_prompt` from `model_index.json`.
pub struct XlParts {
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder_2: ClipTextModel,
    /// With no negative prompt, φ and its pooled embeds are zeros (diffusers' default for SDXL).
    pub force_zeros_for_empty_prompt: bool,
}

/// A loaded Stable Diffusion 1.x, 2.x (ε- or v-prediction, by its scheduler config) or XL model.
pub struct StableDiffusion {
    /// Where the weights were read from: the diffusers folder (for a hub id, its cache
    /// snapshot) or the single file.
    pub source: PathBuf,
    /// The LoRAs merged into the weights at load (`--lora`), in order.
    pub loras: Vec<crate::lora::LoraSpec>,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    /// SDXL's second encoder; `None` for SD-1.x / 2.x.
    pub xl: Option<XlParts>,
}

impl StableDiffusion {
    /// Loads a model onto `device` (fp32): a diffusers folder, a single-file SD-1.x / 2.x checkpoint
    /// (with the standard configs) or a Hugging Face id `org/name[@revision]` (see
    /// [`ModelSpec::parse`]). [`load_with`](Self::load_with) takes `--config` / `--variant`.
    pub fn load(model: &Path, device: Device) -> Result<Self> {
        Self::load_with(model, &LoadOptions::default(), device)
    }

    /// [`load`](Self::load) with options.
    pub fn load_with(model: &Path, opts: &LoadOptions, device: Device) -> Result<Self> {
        let spec = ModelSpec::parse(model)?;
        if opts.variant.is_some() && !matches!(spec, ModelSpec::Hub { .. }) {
            bail!("--variant selects the weights downloaded for a Hugging Face id; {} is local", model.display());
        }
        let sd = match spec {
            ModelSpec::SingleFile(file) => Self::load_single_file(&file, opts.config.as_deref(), device),
            ModelSpec::Folder(root) => {
                refuse_config(&opts.config, &root)?;
                Self::load_folder(&root, device)
            }
            ModelSpec::Hub { repo, revision } => {
                refuse_config(&opts.config, model)?;
                Self::load_folder(&hub::resolve(&repo, revision.as_deref(), opts.variant.as_deref())?, device)
            }
        }?;
        let mut sd = sd;
        crate::lora::apply_all(&opts.loras, &sd.lora_networks())?;
        sd.loras = opts.loras.clone();
        if device.is_cuda() {
            tch::Cuda::cudnn_set_benchmark(true); // fixed shapes in every loop: let cuDNN pick its kernels once
        }
        Ok(sd.with_dtype(opts.dtype.unwrap_or(Kind::Float)))
    }

    /// Casts the networks to `kind` (the VAE to float32 instead of fp16 when its config says
    /// `force_upcast`); see [`crate::precision`].
    pub fn with_dtype(mut self, kind: Kind) -> Self {
        self.text_encoder.vs.set_kind(kind);
        if let Some(xl) = &mut self.xl {
            xl.text_encoder_2.vs.set_kind(kind);
        }
        self.unet.vs.set_kind(kind);
        self.vae.vs.set_kind(crate::precision::vae_kind(kind, self.vae.config.force_upcast));
        self
    }

    /// The networks' compute kind.
    pub fn dtype(&self) -> Kind {
        self.unet.kind()
    }

    /// Loads every component of a diffusers folder (SD-1.x / 2.x, or SDXL when it has
    /// `text_encoder_2/`).
    pub fn load_folder(root: &Path, device: Device) -> Result<Self> {
        let dir = ModelDir::open(root)?;
        let scheduler_config = SchedulerConfig::from_file(&dir.component("scheduler").join("scheduler_config.json"))?;
        let xl = match dir.xl()? {
            None => None,
            Some(force_zeros_for_empty_prompt) => Some(XlParts {
                tokenizer_2: ClipTokenizer::from_dir(&dir.component("tokenizer_2"))?,
                text_encoder_2: ClipTextModel::load(&dir.component("text_encoder_2"), device)?,
                force_zeros_for_empty_prompt,
            }),
        };
        let sd = Self {
            tokenizer: ClipTokenizer::from_dir(&dir.component("tokenizer"))?,
            text_encoder: ClipTextModel::load(&dir.component("text_encoder"), device)?,
            unet: UNet2DConditionModel::load(&dir.component("unet"), device)?,
            vae: AutoencoderKL::load(&dir.component("vae"), device)?,
            scheduler_config,
            source: dir.root,
            loras: vec![],
            device,
            xl,
        };
        sd.check_widths()?;
        Ok(sd.frozen())
    }

    /// The widths the components must agree on: the UNet's `cross_attention_dim` is the text
    /// encoder's hidden size (SDXL: the sum of both), and SDXL's `add_embedding` takes the
    /// second encoder's `projection_dim` + 6 × `addition_time_embed_dim`.
    fn check_widths(&self) -> Result<()> {
        let src = self.source.display();
        let cross = match &self.unet.config.cross_attention_dim {
            PerLevel::One(c) => *c,
            PerLevel::Each(v) => v[0],
        };
        let te = self.text_encoder.hidden_size();
        match &self.xl {
            None => {
                if cross != te {
                    bail!(
                        "{src}: unet/config.json's cross_attention_dim {cross} does not match text_encoder/config.json's \
                         hidden_size {te}"
                    );
                }
                if self.unet.needs_added_cond() {
                    bail!(
                        "{src}: the UNet has addition_embed_type \"text_time\" (SDXL) but there is no text_encoder_2/ \
                         (an SDXL folder has text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/)"
                    );
                }
            }
            Some(xl) => {
                let te2 = xl.text_encoder_2.hidden_size();
                if cross != te + te2 {
                    bail!(
                        "{src}: unet/config.json's cross_attention_dim {cross} is not text_encoder's hidden_size {te} + \
                         text_encoder_2's {te2}"
                    );
                }
                let Some((dim, d_in)) = self.unet.config.text_time() else {
                    bail!("{src}: an SDXL folder's UNet must have addition_embed_type \"text_time\"");
                };
                if !xl.text_encoder_2.config.with_projection() {
                    bail!(
                        "{src}: text_encoder_2/config.json must be a CLIPTextModelWithProjection (its `architectures`)"
                    );
                }
                let p = xl.text_encoder_2.config.projection_dim.unwrap_or(512);
                if d_in != p + 6 * dim {
                    bail!(
                        "{src}: unet/config.json's projection_class_embeddings_input_dim {d_in} is not text_encoder_2's \
                         projection_dim {p} + 6 × addition_time_embed_dim {dim}"
                    );
                }
            }
        }
        Ok(())
    }

    /// The networks a LoRA merges into ([`crate::lora::merge`]).
    pub fn lora_networks(&self) -> crate::lora::Networks<'_> {
        crate::lora::Networks {
            unet: &self.unet.vs,
            text_encoder: &self.text_encoder.vs,
            text_encoder_2: self.xl.as_ref().map(|x| &x.text_encoder_2.vs),
            unet_ldm: self.xl.as_ref().map(|_| &self.unet.config),
        }
    }

    /// Whether this is an SDXL model.
    pub fn is_xl(&self) -> bool {
        self.xl.is_some()
    }

    /// Refuses an SDXL model for what is not built for it yet, naming it.
    pub fn require_not_xl(&self, what: &str) -> Result<()> {
        if self.is_xl() {
            bail!(
                "{what} does not support SDXL models yet ({} is SDXL): it needs SD-1.x or SD-2.x (every other \
                 command runs on SDXL)",
                self.source.display()
            );
        }
        Ok(())
    }

    /// Loads a single-file checkpoint (LDM key names), converted with the configs and tokenizer
    /// of the diffusers folder `config`, or the standard SD-1.x, SD-2.1 or SDXL-base ones (by its
    /// text encoders' keys).
    pub fn load_single_file(file: &Path, config: Option<&Path>, device: Device) -> Result<Self> {
        let configs = match config {
            Some(dir) => Configs::from_diffusers_dir(dir)?,
            None => Configs::builtin(single_file::Family::of_file(file)?)?,
        };
        let nets = single_file::load(file, &configs, device)?;
        let xl = match (configs.xl, nets.text_encoder_2) {
            (Some(x), Some(text_encoder_2)) => Some(XlParts {
                tokenizer_2: x.tokenizer_2,
                text_encoder_2,
                force_zeros_for_empty_prompt: x.force_zeros_for_empty_prompt,
            }),
            _ => None,
        };
        let sd = Self {
            tokenizer: configs.tokenizer,
            text_encoder: nets.text_encoder,
            unet: nets.unet,
            vae: nets.vae,
            scheduler_config: configs.scheduler,
            source: file.to_path_buf(),
            loras: vec![],
            device,
            xl,
        };
        sd.check_widths()?;
        Ok(sd.frozen())
    }

    fn frozen(mut self) -> Self {
        let sd = &mut self;
        // The networks are never trained here: only embeddings are (subject learning, TI).
        sd.text_encoder.vs.freeze();
        if let Some(xl) = &mut sd.xl {
            xl.text_encoder_2.vs.freeze();
        }
        sd.unet.vs.freeze();
        sd.vae.vs.freeze();
        self
    }

    /// Pixels per latent cell (2^(VAE levels − 1)).
    pub fn vae_scale_factor(&self) -> i64 {
        self.vae.downscale_factor()
    }

    /// diffusers' default (height, width): the UNet's `sample_size` (an int, or [h, w]) × the
    /// VAE factor; 64 latent cells when the config has none.
    pub fn default_hw(&self) -> (i64, i64) {
        let f = self.vae_scale_factor();
        match &self.unet.config.sample_size {
            Some(PerLevel::One(s)) => (s * f, s * f),
            Some(PerLevel::Each(v)) if v.len() == 2 => (v[0] * f, v[1] * f),
            _ => (64 * f, 64 * f),
        }
    }

    /// The square training resolution: the shorter default side.
    pub fn default_size(&self) -> i64 {
        let (h, w) = self.default_hw();
        h.min(w)
    }

    /// Refuses sizes the VAE cannot map to whole latent cells.
    pub fn check_size(&self, height: i64, width: i64) -> Result<()> {
        let f = self.vae_scale_factor();
        if height <= 0 || width <= 0 || height % f != 0 || width % f != 0 {
            bail!("height and width must be positive multiples of {f} for this model, got {height}x{width}");
        }
        Ok(())
    }

    pub fn scheduler(&self, steps: usize) -> Result<DdimScheduler> {
        DdimScheduler::new(self.scheduler_config.clone(), steps)
    }

    /// Token ids (1, 77) of a prompt, padded; a prompt longer than the encoder's window is
    /// truncated with a warning, as diffusers does.
    pub fn tokenize(&self, text: &str) -> Tensor {
        tokenize_with(&self.tokenizer, text, true).to_device(self.device)
    }

    /// The text conditioning c (1, 77, d) of a prompt: the text encoder's last hidden state;
    /// SDXL: both encoders' penultimate hidden states, concatenated (see [`encode_prompt_xl`](Self::encode_prompt_xl)).
    pub fn encode_prompt(&self, text: &str) -> Tensor {
        match &self.xl {
            None => self.text_encoder.forward(&self.tokenize(text)),
            Some(_) => self.encode_prompt_xl(text).0,
        }
    }

    /// SDXL's `encode_prompt` for one prompt (`clip_skip=None`): (the penultimate hidden states
    /// of encoder 1 and encoder 2 concatenated (1, 77, d₁ + d₂), encoder 2's pooled, projected
    /// `text_embeds` (1, P)). Each encoder reads its own tokenizer's ids.
    pub fn encode_prompt_xl(&self, text: &str) -> (Tensor, Tensor) {
        assert!(self.xl.is_some(), "encode_prompt_xl needs an SDXL model");
        let (h, pooled) = self.encode_ids(&self.tokenize_each(text));
        (h, pooled.expect("text_encoder_2 has text_projection (checked at load)"))
    }

    /// The width of the UNet's text conditioning: d, or d₁ + d₂ for SDXL (the rows of c_s).
    pub fn cond_width(&self) -> i64 {
        self.encoder_widths().iter().sum()
    }

    /// The text encoders' widths, in order (one, or two for SDXL).
    pub fn encoder_widths(&self) -> Vec<i64> {
        let mut w = vec![self.text_encoder.hidden_size()];
        if let Some(xl) = &self.xl {
            w.push(xl.text_encoder_2.hidden_size());
        }
        w
    }

    /// A prompt's ids (1, 77) from each tokenizer (SDXL's second pads with "!").
    pub fn tokenize_each(&self, text: &str) -> Vec<Tensor> {
        let mut ids = vec![self.tokenize(text)];
        if let Some(xl) = &self.xl {
            ids.push(tokenize_with(&xl.tokenizer_2, text, false).to_device(self.device));
        }
        ids
    }

    fn encoders(&self) -> Vec<&ClipTextModel> {
        std::iter::once(&self.text_encoder).chain(self.xl.as_ref().map(|x| &x.text_encoder_2)).collect()
    }

    /// Input token embeddings of each encoder's ids, side by side: (B, L, Σd).
    pub fn token_embeddings(&self, ids: &[Tensor]) -> Tensor {
        let parts: Vec<Tensor> = self.encoders().iter().zip(ids).map(|(te, i)| te.token_embedding(i)).collect();
        if parts.len() == 1 {
            return parts.into_iter().next().expect("one part");
        }
        Tensor::cat(&parts, -1)
    }

    /// The UNet's text conditioning from input embeddings (B, L, Σd), each encoder reading its
    /// own slice: the last hidden state (SD-1.x / 2.x), or SDXL's penultimate states side by side
    /// with encoder 2's pooled `text_embeds` (at the pooled position of its `ids`).
    /// Differentiable with respect to `embeds`.
    pub fn encode_embeds(&self, embeds: &Tensor, ids: &[Tensor]) -> (Tensor, Option<Tensor>) {
        let Some(xl) = &self.xl else {
            return (self.text_encoder.forward_embeds(embeds), None);
        };
        let d1 = self.text_encoder.hidden_size();
        let d2 = xl.text_encoder_2.hidden_size();
        let e1 = embeds.narrow(-1, 0, d1);
        let e2 = embeds.narrow(-1, d1, d2);
        let o1 = self.text_encoder.penultimate_and_pooled_embeds(&e1, &ids[0]).unwrap_or_else(|e| panic!("{e:#}"));
        let o2 = xl.text_encoder_2.penultimate_and_pooled_embeds(&e2, &ids[1]).unwrap_or_else(|e| panic!("{e:#}"));
        (Tensor::cat(&[o1.penultimate, o2.penultimate], -1), o2.text_embeds)
    }

    /// [`encode_embeds`](Self::encode_embeds) of the ids' own embeddings.
    pub fn encode_ids(&self, ids: &[Tensor]) -> (Tensor, Option<Tensor>) {
        if self.xl.is_none() {
            return (self.text_encoder.forward(&ids[0]), None);
        }
        self.encode_embeds(&self.token_embeddings(ids), ids)
    }

    /// SDXL's added conditioning for pooled embeds (B, P) at an image size.
    pub fn added_cond(&self, pooled: Tensor, height: i64, width: i64) -> AddedCond {
        let b = pooled.size()[0];
        AddedCond { text_embeds: pooled, time_ids: self.add_time_ids(height, width).repeat([b, 1]) }
    }

    /// [`added_cond`](Self::added_cond) at the image size of `latents` (B, C, h, w): the
    /// latent's size × the VAE's factor.
    pub fn added_cond_for(&self, pooled: Tensor, latents: &Tensor) -> AddedCond {
        let f = self.vae_scale_factor();
        self.added_cond(pooled, latents.size()[2] * f, latents.size()[3] * f)
    }

    /// φ for a negative prompt (`None`: none given) as the pipelines build it: the empty
    /// prompt's encoding; SDXL with `force_zeros_for_empty_prompt` and no negative prompt:
    /// zeros, pooled embeds too. φ (1, 77, d) with, on SDXL, its pooled embeds (1, P).
    pub fn encode_negative(&self, negative: Option<&str>) -> TextCond {
        match &self.xl {
            Some(xl) if negative.is_none() && xl.force_zeros_for_empty_prompt => {
                let len = self.tokenizer.model_max_length() as i64;
                let p = xl.text_encoder_2.config.projection_dim.unwrap_or(512);
                let opts = (Kind::Float, self.device);
                TextCond {
                    hidden: Tensor::zeros([1, len, self.cond_width()], opts),
                    pooled: Some(Tensor::zeros([1, p], opts)),
                }
            }
            _ => self.encode_text(negative.unwrap_or("")),
        }
    }

    /// A prompt's text conditioning (1, 77, d): [`encode_prompt`](Self::encode_prompt), with
    /// SDXL's pooled embeds (1, P).
    pub fn encode_text(&self, text: &str) -> TextCond {
        match &self.xl {
            None => TextCond { hidden: self.encode_prompt(text), pooled: None },
            Some(_) => {
                let (hidden, pooled) = self.encode_prompt_xl(text);
                TextCond { hidden, pooled: Some(pooled) }
            }
        }
    }

    /// The per-step conditioning of a conditional and an unconditional text for images of
    /// `height` × `width` (SDXL's `time_ids`); both of the same batch.
    pub fn step_cond(&self, cond: &TextCond, uncond: &TextCond, height: i64, width: i64) -> StepCond {
        let added = match (&cond.pooled, &uncond.pooled) {
            (Some(c), Some(u)) => Some((
                self.added_cond(u.shallow_clone(), height, width),
                self.added_cond(c.shallow_clone(), height, width),
            )),
            _ => None,
        };
        StepCond { cond: cond.hidden.shallow_clone(), uncond: uncond.hidden.shallow_clone(), added }
    }

    /// ε_θ(x_t, t, text) of one branch; SDXL's `time_ids` are those of x's image size (the
    /// latent's × the VAE's factor). Differentiable in `text`.
    pub fn eps(&self, x: &Tensor, t: i64, text: &TextCond, ctrl: Option<&mut dyn AttentionController>) -> Tensor {
        let added = text.pooled.as_ref().map(|p| self.added_cond_for(p.shallow_clone(), x));
        self.unet.forward_added(x, &Tensor::from(t).to_device(self.device), &text.hidden, added.as_ref(), ctrl)
    }

    /// SDXL's `add_time_ids` for an image of `height` × `width` with diffusers' defaults
    /// (original size = target size = (height, width), crop top-left (0, 0)): (1, 6) float32.
    pub fn add_time_ids(&self, height: i64, width: i64) -> Tensor {
        let ids = [height, width, 0, 0, height, width].map(|v| v as f32);
        Tensor::from_slice(&ids).view([1, 6]).to_device(self.device)
    }

    /// x_T exactly as diffusers draws it with `generator=torch.Generator("cpu").manual_seed(seed)`:
    /// one CPU `randn` of shape (n, C, H/f, W/f), moved to the device (DDIM's σ_init is 1).
    pub fn initial_latents(&self, seed: u64, n: i64, height: i64, width: i64) -> Tensor {
        let f = self.vae_scale_factor();
        let c = self.unet.config.in_channels;
        crate::rng::seeded(seed as i64, || Tensor::randn([n, c, height / f, width / f], (Kind::Float, Device::Cpu)))
            .to_device(self.device)
    }

    /// (ε_θ(x_t, t, φ), ε_θ(x_t, t, c)) from one UNet call on the batch [φ; c], as diffusers
    /// evaluates classifier-free guidance.
    pub fn eps_pair(
        &self,
        x: &Tensor,
        t: i64,
        c: &StepCond,
        ctrl: Option<&mut dyn AttentionController>,
    ) -> (Tensor, Tensor) {
        let ts = Tensor::from(t).to_device(self.device);
        let xx = Tensor::cat(&[x, x], 0); // (2B, C, h, w)
        let ctx = Tensor::cat(&[&c.uncond, &c.cond], 0); // (2B, 77, d)
        let added = c.added.as_ref().map(|(u, k)| AddedCond::cat(u, k));
        let eps = self.unet.forward_added(&xx, &ts, &ctx, added.as_ref(), ctrl).chunk(2, 0);
        (eps[0].shallow_clone(), eps[1].shallow_clone())
    }

    /// ε̃ = [`cfg`]`(ε_θ(x_t, t, φ), ε_θ(x_t, t, c), w)`; for w ≤ 1 that is the conditional branch
    /// alone, so only it is evaluated.
    pub fn guided_eps(
        &self,
        x: &Tensor,
        t: i64,
        c: &StepCond,
        guidance: f64,
        ctrl: Option<&mut dyn AttentionController>,
    ) -> Tensor {
        if guidance <= 1.0 {
            let added = c.added.as_ref().map(|(_, k)| k);
            return self.unet.forward_added(x, &Tensor::from(t).to_device(self.device), &c.cond, added, ctrl);
        }
        let (eps_u, eps_c) = self.eps_pair(x, t, c, ctrl);
        cfg(&eps_u, &eps_c, guidance)
    }

    /// The DDIM loop x_T → x_0 (Eq. 1 at every step; Eq. 7 when `cond` is step-wise).
    pub fn denoise(
        &self,
        x_t: Tensor,
        sched: &DdimScheduler,
        cond: &mut dyn StepConditioning,
        guidance: f64,
        mut ctrl: Option<&mut dyn AttentionController>,
    ) -> Result<Tensor> {
        let bar = crate::progress::bar(sched.timesteps.len() as u64, "denoising");
        let mut x = x_t;
        for (i, &t) in sched.timesteps.iter().enumerate() {
            let c = cond.at(i, t)?;
            let eps = self.guided_eps(&x, t, &c, guidance, reborrow(&mut ctrl));
            x = sched.step(&eps, t, &x);
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(x)
    }

    /// Latents → raw decoder output (B, 3, H, W) in about [-1, 1] (latents / scaling_factor).
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        self.vae.decode(&(latents / self.vae.scaling_factor()))
    }

    /// Text-to-image as `StableDiffusionPipeline(prompt, negative_prompt, num_inference_steps,
    /// guidance_scale, height, width, num_images_per_prompt, generator)`; returns (B, H, W, 3)
    /// uint8 images. SDXL: `StableDiffusionXLPipeline(…)` with a `DDIMScheduler` and diffusers'
    /// defaults for everything else (original and target size = (height, width), no crop,
    /// `guidance_rescale` 0, no `denoising_end`).
    pub fn generate(&self, req: &GenerateRequest) -> Result<Tensor> {
        self.generate_conditioned(req, &mut |_, uncond, n| {
            let cond = self.encode_text(&req.prompt).repeat(n);
            Ok(Box::new(Fixed(self.step_cond(&cond, &uncond.repeat(n), req.height, req.width))))
        })
    }

    /// [`generate`](Self::generate) with a per-step conditioning made by `make(scheduler, φ, n)`
    /// for the conditional branch (e.g. Eq. 7's [c, c_s^t]: [`crate::subject::generate`]).
    pub fn generate_conditioned<'a>(
        &'a self,
        req: &GenerateRequest,
        make: &mut MakeConditioning<'a>,
    ) -> Result<Tensor> {
        self.check_size(req.height, req.width)?;
        if req.num_images < 1 {
            bail!("the number of images must be at least 1");
        }
        tch::no_grad(|| {
            let sched = self.scheduler(req.steps)?;
            let n = req.num_images;
            let uncond = self.encode_negative(req.negative_prompt.as_deref());
            let x_t = self.initial_latents(req.seed, n, req.height, req.width);
            let mut steps = make(&sched, uncond, n)?;
            let x0 = self.denoise(x_t, &sched, steps.as_mut(), req.guidance, None)?;
            let images = self.decode(&x0);
            // NaN would be written as a black image and the run would look fine.
            if !bool::try_from(images.isfinite().all())? {
                bail!(
                    "the generated image holds NaN or infinite values (guidance scale {} too large, or a damaged \
                     model or subject?); nothing was written",
                    req.guidance
                );
            }
            Ok(crate::io::decoded_to_u8(&images))
        })
    }
}

/// Token ids (1, 77) on the CPU; a truncated prompt is reported when `warn`.
fn tokenize_with(tokenizer: &ClipTokenizer, text: &str, warn: bool) -> Tensor {
    let enc = tokenizer.encode_padded(text);
    if enc.truncated && warn {
        // enc.n_tokens counts what was kept; the warning gives the prompt's own length.
        eprintln!(
            "warning: the prompt is {} tokens long (with <bos> and <eos>); CLIP can only handle {} — the rest was \
             truncated",
            tokenizer.encode(text).len(),
            tokenizer.model_max_length()
        );
    }
    Tensor::from_slice(&enc.ids).view([1, -1])
}

/// `--config` only applies to single-file checkpoints.
fn refuse_config(config: &Option<PathBuf>, model: &Path) -> Result<()> {
    if let Some(c) = config {
        bail!(
            "--config {} applies to single-file checkpoints; {} is a diffusers folder or hub id, which carries its own \
             configs",
            c.display(),
            model.display()
        );
    }
    Ok(())
}

/// The tokenizer `--model` implies, without loading any weights: a diffusers folder's
/// `tokenizer/` (or a tokenizer folder itself), a single file's (`--config`'s or the built-in
/// SD-1.x one), or a hub snapshot's.
pub fn load_tokenizer(model: &Path, opts: &LoadOptions) -> Result<ClipTokenizer> {
    match ModelSpec::parse(model)? {
        ModelSpec::Folder(dir) if !dir.join("tokenizer").is_dir() => ClipTokenizer::from_dir(&dir),
        ModelSpec::Folder(dir) => ClipTokenizer::from_dir(&ModelDir::open(&dir)?.component("tokenizer")),
        ModelSpec::SingleFile(file) => match &opts.config {
            Some(c) => ClipTokenizer::from_dir(&c.join("tokenizer")),
            None => match single_file::Family::of_file(&file)? {
                single_file::Family::Sd1 | single_file::Family::Sdxl => ClipTokenizer::sd15(),
                single_file::Family::Sd2 => ClipTokenizer::sd2(),
            },
        },
        ModelSpec::Hub { repo, revision } => {
            let snap = hub::resolve(&repo, revision.as_deref(), opts.variant.as_deref())?;
            ClipTokenizer::from_dir(&snap.join("tokenizer"))
        }
    }
}
