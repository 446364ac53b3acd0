//! transformers' `CLIPTextModel`: the Stable Diffusion text encoder.
//!
//! Parameter paths are the classic ones SD checkpoints carry (`text_model.embeddings.…`,
//! `text_model.encoder.layers.{i}.…`, `text_model.final_layer_norm`). transformers 5 saves a
//! bare `CLIPTextModel` without the `text_model.` prefix; [`ClipTextModel::load`] accepts both
//! spellings (and skips the `position_ids` buffer older checkpoints carry).
//!
//! Numerics follow transformers 5.24 with its default attention implementation (`sdpa`): no
//! attention mask is built (`create_causal_mask` returns `None` for sdpa without padding mask),
//! and every layer calls `scaled_dot_product_attention(q, k, v, attn_mask=None,
//! is_causal=True, scale=head_dim**-0.5)` — so does this module, with the same explicit scale.
//!
//! For subject learning (textual inversion, HiFi Tuner §3) the encoder is split into
//! [`ClipTextModel::token_embedding`] (ids → input embeddings) and
//! [`ClipTextModel::forward_embeds`] (input embeddings → last hidden state), so gradients can
//! flow into the input embeddings; [`ClipTextModel::append_token_embeddings`] grows the
//! vocabulary for new placeholder tokens as diffusers' `load_textual_inversion` does.

use crate::load::{load_strict, read_json, require_positive, weight_file, KeyAction};
use crate::models::attention::encoder_self_attention;
use crate::models::lora::LoraLinear;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// The VarStore path of the token embedding matrix.
pub const TOKEN_EMBEDDING_KEY: &str = "text_model.embeddings.token_embedding.weight";
/// The (non-persistent in transformers ≥ 4.31, but present in older files) position-id buffer.
pub const POSITION_IDS_KEY: &str = "text_model.embeddings.position_ids";

/// `text_encoder/config.json` (transformers `CLIPTextConfig`). Defaults are those of
/// transformers' `CLIPTextConfig` class, used only where a key is absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: i64,
    #[serde(default = "d_hidden")]
    pub hidden_size: i64,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: i64,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: i64,
    /// `quick_gelu`, `gelu` (exact, erf), `gelu_new` (tanh formula, as transformers'
    /// `NewGELUActivation`) or `gelu_pytorch_tanh`.
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Must be 0 (dropout is not implemented).
    #[serde(default)]
    pub attention_dropout: f64,
    /// Unused here (the tokenizer owns the special tokens).
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<i64>,
    /// The width of `text_projection` (`CLIPTextModelWithProjection`; 512 when absent, as
    /// transformers' default).
    #[serde(default)]
    pub projection_dim: Option<i64>,
    /// `["CLIPTextModelWithProjection"]` builds the projection of the pooled output (SDXL's
    /// second encoder); anything else the plain `CLIPTextModel`.
    #[serde(default)]
    pub architectures: Vec<String>,
}

impl ClipTextConfig {
    /// Whether this is a `CLIPTextModelWithProjection` (has `text_projection`).
    pub fn with_projection(&self) -> bool {
        self.architectures.iter().any(|a| a == "CLIPTextModelWithProjection")
    }
}

fn d_vocab() -> i64 {
    49408
}
fn d_hidden() -> i64 {
    512
}
fn d_intermediate() -> i64 {
    2048
}
fn d_layers() -> i64 {
    12
}
fn d_heads() -> i64 {
    8
}
fn d_max_pos() -> i64 {
    77
}
fn d_act() -> String {
    "quick_gelu".to_string()
}
fn d_eps() -> f64 {
    1e-5
}

/// The MLP activation (transformers' `ACT2FN[hidden_act]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`
    QuickGelu,
    /// exact GELU, `torch.nn.functional.gelu`
    Gelu,
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` written out as transformers does
    GeluNew,
    /// `torch.nn.functional.gelu(x, approximate="tanh")`
    GeluPytorchTanh,
}

impl Activation {
    /// The activation of a config's `hidden_act`, or an error naming the config file.
    pub fn from_config(name: &str, origin: &str) -> Result<Self> {
        Self::parse(name).with_context(|| {
            format!("{origin}: hidden_act {name:?} is not supported (supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)")
        })
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" => Some(Self::GeluNew),
            "gelu_pytorch_tanh" => Some(Self::GeluPytorchTanh),
            _ => None,
        }
    }

    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Self::QuickGelu => x * (x * 1.702).sigmoid(),
            Self::Gelu => x.gelu("none"),
            Self::GeluNew => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                (x * 0.5) * (((x + x.pow_tensor_scalar(3.0) * 0.044715) * c).tanh() + 1.0)
            }
            Self::GeluPytorchTanh => x.gelu("tanh"),
        }
    }
}

impl ClipTextConfig {
    /// Checks the values this implementation supports; `origin` names the file for errors.
    pub fn validate(&self, origin: &str) -> Result<Activation> {
        let act = Activation::from_config(&self.hidden_act, origin)?;
        require_positive(
            origin,
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_attention_heads", self.num_attention_heads),
                ("max_position_embeddings", self.max_position_embeddings),
            ],
        )?;
        if self.num_hidden_layers < 0 {
            bail!("{origin}: num_hidden_layers must be ≥ 0, got {}", self.num_hidden_layers);
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            bail!(
                "{origin}: hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if self.attention_dropout != 0.0 {
            bail!("{origin}: attention_dropout {} is not supported (only 0.0)", self.attention_dropout);
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            bail!("{origin}: layer_norm_eps must be positive, got {}", self.layer_norm_eps);
        }
        Ok(act)
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

/// `CLIPAttention`: causal multi-head self-attention with biased q/k/v/out projections.
#[derive(Debug)]
struct ClipAttention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    out_proj: LoraLinear,
    heads: i64,
    head_dim: i64,
    scale: f64,
    causal: bool,
}

impl ClipAttention {
    fn new(vs: nn::Path, dims: &EncoderDims) -> Self {
        let d = dims.hidden_size;
        let head_dim = d / dims.heads;
        Self {
            q_proj: LoraLinear::new(&vs / "q_proj", d, d, Default::default()),
            k_proj: LoraLinear::new(&vs / "k_proj", d, d, Default::default()),
            v_proj: LoraLinear::new(&vs / "v_proj", d, d, Default::default()),
            out_proj: LoraLinear::new(&vs / "out_proj", d, d, Default::default()),
            heads: dims.heads,
            head_dim,
            // transformers: `self.scale = self.head_dim**-0.5`, passed to sdpa explicitly.
            scale: (head_dim as f64).powf(-0.5),
            causal: dims.causal,
        }
    }

    fn projections_mut(&mut self) -> [&mut LoraLinear; 4] {
        [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj, &mut self.out_proj]
    }

    /// `x`: (B, L, d) -> (B, L, d)
    fn forward(&self, x: &Tensor) -> Tensor {
        let (q, k, v) = (&self.q_proj, &self.k_proj, &self.v_proj);
        let out = encoder_self_attention(x, q, k, v, self.heads, self.head_dim, self.causal, self.scale); // (B, L, d)
        self.out_proj.forward(&out)
    }
}

/// The shape of a CLIP encoder (text: causal; vision: not).
#[derive(Debug, Clone, Copy)]
pub(crate) struct EncoderDims {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub heads: i64,
    pub layer_norm_eps: f64,
    pub causal: bool,
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP, each with a residual (shared by
/// [`crate::models::clip`]'s vision tower).
#[derive(Debug)]
pub(crate) struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    layer_norm2: nn::LayerNorm,
    act: Activation,
}

impl ClipEncoderLayer {
    pub(crate) fn new(vs: nn::Path, dims: &EncoderDims, act: Activation) -> Self {
        let ln = nn::LayerNormConfig { eps: dims.layer_norm_eps, ..Default::default() };
        let d = dims.hidden_size;
        Self {
            self_attn: ClipAttention::new(&vs / "self_attn", dims),
            layer_norm1: nn::layer_norm(&vs / "layer_norm1", vec![d], ln),
            fc1: nn::linear(&vs / "mlp" / "fc1", d, dims.intermediate_size, Default::default()),
            fc2: nn::linear(&vs / "mlp" / "fc2", dims.intermediate_size, d, Default::default()),
            layer_norm2: nn::layer_norm(&vs / "layer_norm2", vec![d], ln),
            act,
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let h = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        let m = self.fc2.forward(&self.act.apply(&self.fc1.forward(&self.layer_norm2.forward(&h))));
        h + m
    }
}

/// transformers' `CLIPTextModel` (last hidden state only; no pooling, no projection).
#[derive(Debug)]
pub struct ClipTextModel {
    pub vs: nn::VarStore,
    pub config: ClipTextConfig,
    /// (vocab, d), the variable [`TOKEN_EMBEDDING_KEY`] of `vs`.
    token_embedding: Tensor,
    /// (max_position_embeddings, d)
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: nn::LayerNorm,
    /// `text_projection` (d → projection_dim, no bias) of a `CLIPTextModelWithProjection`.
    text_projection: Option<nn::Linear>,
}

/// What SDXL takes from a text encoder (diffusers' `encode_prompt` with `clip_skip=None`).
pub struct PenultimateAndPooled {
    /// `hidden_states[-2]`: the input of the last layer, without `final_layer_norm` (B, L, d).
    pub penultimate: Tensor,
    /// `text_embeds`: the projected pooled output (B, projection_dim); `None` without
    /// `text_projection`.
    pub text_embeds: Option<Tensor>,
}

impl ClipTextModel {
    /// The self-attention projections `q_proj`, `k_proj`, `v_proj`, `out_proj` of every layer:
    /// the LoRA targets of diffusers' `train_dreambooth_lora.py --train_text_encoder`.
    pub fn lora_targets_mut(&mut self) -> Vec<&mut LoraLinear> {
        self.layers.iter_mut().flat_map(|l| l.self_attn.projections_mut()).collect()
    }

    /// A randomly initialised model (embeddings ~ N(0, 0.02²) as transformers; tch defaults
    /// elsewhere).
    pub fn new(config: ClipTextConfig, device: Device) -> Result<Self> {
        Self::build(config, device, "text_encoder config")
    }

    pub(crate) fn build(config: ClipTextConfig, device: Device, origin: &str) -> Result<Self> {
        // tch initialises every variable at random: no other thread may draw meanwhile
        crate::rng::exclusive(|| Self::build_unlocked(config, device, origin))
    }

    fn build_unlocked(config: ClipTextConfig, device: Device, origin: &str) -> Result<Self> {
        let act = config.validate(origin)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root() / "text_model";
        let d = config.hidden_size;
        let emb = &root / "embeddings";
        let init = nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        let token_embedding = (&emb / "token_embedding").var("weight", &[config.vocab_size, d], init);
        let position_embedding =
            (&emb / "position_embedding").var("weight", &[config.max_position_embeddings, d], init);
        let dims = EncoderDims {
            hidden_size: d,
            intermediate_size: config.intermediate_size,
            heads: config.num_attention_heads,
            layer_norm_eps: config.layer_norm_eps,
            causal: true,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&root / "encoder" / "layers" / i, &dims, act))
            .collect();
        let final_layer_norm = nn::layer_norm(
            &root / "final_layer_norm",
            vec![d],
            nn::LayerNormConfig { eps: config.layer_norm_eps, ..Default::default() },
        );
        let text_projection = config.with_projection().then(|| {
            let p = config.projection_dim.unwrap_or(512);
            nn::linear(vs.root() / "text_projection", d, p, nn::LinearConfig { bias: false, ..Default::default() })
        });
        Ok(Self { vs, config, token_embedding, position_embedding, layers, final_layer_norm, text_projection })
    }

    /// Loads `dir/config.json` and the weights of `dir` (strict). Keys may carry the
    /// `text_model.` prefix (SD checkpoints) or not (transformers 5 `save_pretrained`); the
    /// `position_ids` buffer of old checkpoints is skipped.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let config: ClipTextConfig = read_json(&cfg_path)?;
        let model = Self::build(config, device, &cfg_path.display().to_string())?;
        let weights = weight_file(dir)?;
        load_strict(&model.vs, &weights, &|key, _| {
            // `text_projection` sits beside `text_model` (CLIPTextModelWithProjection).
            let name = if key.starts_with("text_model.") || key.starts_with("text_projection.") {
                key.to_string()
            } else {
                format!("text_model.{key}")
            };
            if name == POSITION_IDS_KEY {
                KeyAction::Skip
            } else {
                KeyAction::Load(name)
            }
        })?;
        Ok(model)
    }

    pub fn hidden_size(&self) -> i64 {
        self.config.hidden_size
    }

    /// The current vocabulary size (grows with [`Self::append_token_embeddings`]).
    pub fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    pub fn max_position_embeddings(&self) -> i64 {
        self.config.max_position_embeddings
    }

    /// The token embedding matrix (vocab, d) — the VarStore variable itself (shallow clone).
    pub fn token_embedding_weight(&self) -> Tensor {
        self.token_embedding.shallow_clone()
    }

    /// `ids` (B, L) int64 -> input token embeddings (B, L, d), without positions.
    pub fn token_embedding(&self, ids: &Tensor) -> Tensor {
        self.f_token_embedding(ids).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Fallible [`Self::token_embedding`]: checks dtype and id range.
    pub fn f_token_embedding(&self, ids: &Tensor) -> Result<Tensor> {
        if ids.kind() != Kind::Int64 {
            bail!("token ids must be int64, got {:?}", ids.kind());
        }
        if ids.dim() != 2 {
            bail!("token ids must be (B, L), got {:?}", ids.size());
        }
        if ids.numel() > 0 {
            let lo = ids.min().int64_value(&[]);
            let hi = ids.max().int64_value(&[]);
            if lo < 0 || hi >= self.config.vocab_size {
                bail!("token id out of range [0, {}): min {lo}, max {hi}", self.config.vocab_size);
            }
        }
        // nn.Embedding(padding_idx=None) -> padding_idx -1, no scale_grad_by_freq, dense grad.
        // Returned in float32 whatever the weights' kind (mixed precision: embeddings that are
        // spliced or trained stay float32; forward_embeds casts them back).
        Ok(Tensor::embedding(&self.token_embedding, &ids.to_device(self.vs.device()), -1, false, false)
            .to_kind(Kind::Float))
    }

    /// `ids` (B, L) int64 -> last hidden state (B, L, d) after `final_layer_norm`.
    /// Identical to `forward_embeds(&token_embedding(ids))`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        self.f_forward(ids).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn f_forward(&self, ids: &Tensor) -> Result<Tensor> {
        let embeds = self.f_token_embedding(ids)?;
        self.f_forward_embeds(&embeds)
    }

    /// Input embeddings (B, L, d) -> last hidden state (B, L, d): adds the position
    /// embeddings of positions 0..L, runs the causal encoder and `final_layer_norm`.
    /// Differentiable with respect to `input_embeds`.
    pub fn forward_embeds(&self, input_embeds: &Tensor) -> Tensor {
        self.f_forward_embeds(input_embeds).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn f_forward_embeds(&self, input_embeds: &Tensor) -> Result<Tensor> {
        let mut h = self.with_positions(input_embeds)?;
        for layer in &self.layers {
            h = layer.forward(&h);
        }
        Ok(self.final_layer_norm.forward(&h).to_kind(Kind::Float))
    }

    /// Input embeddings (B, L, d), checked, in the weights' kind, plus the position embeddings
    /// of positions 0..L: the encoder's first hidden state.
    fn with_positions(&self, input_embeds: &Tensor) -> Result<Tensor> {
        let (_, l, d) = input_embeds
            .size3()
            .with_context(|| format!("input embeddings must be (B, L, d), got {:?}", input_embeds.size()))?;
        if d != self.config.hidden_size {
            bail!("input embeddings have width {d}, the text encoder {}", self.config.hidden_size);
        }
        if l > self.config.max_position_embeddings {
            bail!("sequence length {l} exceeds max_position_embeddings {}", self.config.max_position_embeddings);
        }
        let positions = self.position_embedding.narrow(0, 0, l).unsqueeze(0); // (1, L, d)
        Ok(input_embeds.to_kind(self.vs.kind()) + positions)
    }

    /// SDXL's view of a prompt: the penultimate hidden state and, with `text_projection`, the
    /// projected pooled output — transformers' `hidden_states[-2]` and `text_embeds`. The pooled
    /// token is transformers' choice: `argmax(ids)` when the config's `eos_token_id` is the
    /// legacy 2 (SDXL's configs; the eos has the largest id), else the first `eos_token_id`.
    pub fn penultimate_and_pooled(&self, ids: &Tensor) -> Result<PenultimateAndPooled> {
        let embeds = self.f_token_embedding(ids)?;
        self.penultimate_and_pooled_embeds(&embeds, ids)
    }

    /// [`penultimate_and_pooled`](Self::penultimate_and_pooled) from input embeddings (B, L, d)
    /// (e.g. with learned rows spliced in); `ids` only tell the pooled position. Differentiable
    /// with respect to `input_embeds`.
    pub fn penultimate_and_pooled_embeds(&self, input_embeds: &Tensor, ids: &Tensor) -> Result<PenultimateAndPooled> {
        let n = self.layers.len();
        if n < 2 {
            bail!("the text encoder has {n} layer(s); a penultimate hidden state needs at least 2");
        }
        let mut h = self.with_positions(input_embeds)?;
        for layer in &self.layers[..n - 1] {
            h = layer.forward(&h);
        }
        let penultimate = h.to_kind(Kind::Float);
        let text_embeds = match &self.text_projection {
            None => None,
            Some(proj) => {
                let last = self.final_layer_norm.forward(&self.layers[n - 1].forward(&h)); // (B, L, d)
                let ids = ids.to_device(last.device());
                let eos = self.config.eos_token_id.unwrap_or(2);
                let pos =
                    if eos == 2 { ids.argmax(-1, false) } else { ids.eq(eos).to_kind(Kind::Int).argmax(-1, false) };
                let b = ids.size()[0];
                let pooled = last.index(&[Some(Tensor::arange(b, (Kind::Int64, last.device()))), Some(pos)]); // (B, d)
                Some(proj.forward(&pooled).to_kind(Kind::Float))
            }
        };
        Ok(PenultimateAndPooled { penultimate, text_embeds })
    }

    /// Appends `rows` (n, d) to the token embedding matrix and returns their new ids
    /// (`old_vocab..old_vocab+n`), as `tokenizer.add_tokens` + `resize_token_embeddings` + row
    /// copy in diffusers' `load_textual_inversion`. The VarStore variable
    /// [`TOKEN_EMBEDDING_KEY`] is replaced by the grown matrix (same trainability and
    /// optimizer group), so saving, freezing and optimisers created afterwards see it;
    /// `config.vocab_size` is updated.
    pub fn append_token_embeddings(&mut self, rows: &Tensor) -> Result<Vec<i64>> {
        let d = self.config.hidden_size;
        let (n, rd) = rows.size2().with_context(|| format!("embedding rows must be (n, d), got {:?}", rows.size()))?;
        if rd != d {
            bail!("embedding rows have width {rd}, the text encoder {d}");
        }
        let old_vocab = self.config.vocab_size;
        let old = self.token_embedding.shallow_clone();
        let grown =
            tch::no_grad(|| Tensor::cat(&[old.detach(), rows.detach().to_kind(old.kind()).to_device(old.device())], 0)); // (old_vocab + n, d)
        let grown = grown.set_requires_grad(old.requires_grad());
        {
            let mut vars =
                self.vs.variables_.lock().map_err(|_| anyhow::anyhow!("text encoder VarStore lock poisoned"))?;
            let Some(slot) = vars.named_variables.get_mut(TOKEN_EMBEDDING_KEY) else {
                bail!("internal: {TOKEN_EMBEDDING_KEY} is not in the text encoder's VarStore");
            };
            *slot = grown.shallow_clone();
            let old_ptr = old.data_ptr();
            for var in vars.trainable_variables.iter_mut() {
                if var.tensor.data_ptr() == old_ptr {
                    var.tensor = grown.shallow_clone();
                }
            }
        }
        self.token_embedding = grown;
        self.config.vocab_size = old_vocab + n;
        Ok((old_vocab..old_vocab + n).collect())
    }
}
