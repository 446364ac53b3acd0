//! transformers' `BlipForConditionalGeneration`: the BLIP captioner that HiFi Tuner §3.4 uses
//! to caption the photo I_r before Algorithm 3 (the paper uses BLIP-2; see the README for what
//! BLIP-2 would take).
//!
//! # Parameter names
//!
//! Exactly as transformers 5.24 saves them (and as `Salesforce/blip-image-captioning-base` /
//! `-large` ship them):
//! - `vision_model.embeddings.{class_embedding (1, 1, d), patch_embedding (conv, kernel = stride
//!   = patch), position_embedding (1, 1+N, d)}`, `vision_model.encoder.layers.{i}.{layer_norm1,
//!   self_attn.qkv (fused q/k/v, 3d × d), self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}`,
//!   `vision_model.post_layernorm`;
//! - `text_decoder.bert.embeddings.{word_embeddings, position_embeddings, LayerNorm}`,
//!   `text_decoder.bert.encoder.layer.{i}.{attention, crossattention}.{self.{query, key,
//!   value}, output.{dense, LayerNorm}}`, `….intermediate.dense`, `….output.{dense, LayerNorm}`,
//!   `text_decoder.cls.predictions.{transform.dense, transform.LayerNorm, bias}`.
//!
//! The output projection `text_decoder.cls.predictions.decoder` is tied to the word embeddings
//! and its bias to `cls.predictions.bias` (`_tied_weights_keys`): transformers does not save
//! them; a file that has them (older conversions, a raw `state_dict()`) has them skipped, as
//! transformers' tying overrides them. `position_ids` buffers of older files are skipped too.
//! Every other key must be used and every shape must match (strict loader).
//!
//! # Numerics
//!
//! As transformers in `eval()`: dropout never applied; vision attention softmax(q·kᵀ·dh^-½)·v;
//! text self-attention causal (its −10000 additive mask and a −∞ mask give the same float32
//! softmax); cross-attention over every image token. The image is encoded once per caption and
//! each decoding step feeds only the newest token, reusing the cached keys / values of the
//! earlier ones (self-attention) and of the image (cross-attention), as transformers'
//! `EncoderDecoderCache` does.

use crate::load::{load_strict, read_json, require_positive, weight_file, KeyAction};
use crate::models::clip_text::Activation;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// `vision_config` of `BlipConfig` (`BlipVisionConfig`; defaults are the class's: BLIP-base).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlipVisionConfig {
    #[serde(default = "d768")]
    pub hidden_size: i64,
    #[serde(default = "d3072")]
    pub intermediate_size: i64,
    #[serde(default = "d12")]
    pub num_hidden_layers: i64,
    #[serde(default = "d12")]
    pub num_attention_heads: i64,
    #[serde(default = "d384")]
    pub image_size: i64,
    #[serde(default = "d16")]
    pub patch_size: i64,
    #[serde(default = "d3")]
    pub num_channels: i64,
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps_vision")]
    pub layer_norm_eps: f64,
}

/// `text_config` of `BlipConfig` (`BlipTextConfig`; defaults are the class's). The generation
/// keys older configs carry (`max_length`, `num_beams`, …) are read by [`GenerationConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlipTextConfig {
    #[serde(default = "d30524")]
    pub vocab_size: i64,
    #[serde(default = "d768")]
    pub hidden_size: i64,
    #[serde(default = "d768")]
    pub encoder_hidden_size: i64,
    #[serde(default = "d3072")]
    pub intermediate_size: i64,
    #[serde(default = "d12")]
    pub num_hidden_layers: i64,
    #[serde(default = "d8")]
    pub num_attention_heads: i64,
    #[serde(default = "d512")]
    pub max_position_embeddings: i64,
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps_text")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: i64,
    /// `[DEC]`: the first token of every caption.
    #[serde(default = "d_bos")]
    pub bos_token_id: i64,
    /// `[SEP]`: BLIP's `generate` stops on it (not on `eos_token_id`).
    #[serde(default = "d_sep")]
    pub sep_token_id: i64,
}

/// `config.json` of a BLIP captioner (`BlipConfig`; `model_type` "blip").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlipConfig {
    pub text_config: BlipTextConfig,
    pub vision_config: BlipVisionConfig,
}

fn d3() -> i64 {
    3
}
fn d8() -> i64 {
    8
}
fn d12() -> i64 {
    12
}
fn d16() -> i64 {
    16
}
fn d384() -> i64 {
    384
}
fn d512() -> i64 {
    512
}
fn d768() -> i64 {
    768
}
fn d3072() -> i64 {
    3072
}
fn d30524() -> i64 {
    30524
}
fn d_bos() -> i64 {
    30522
}
fn d_sep() -> i64 {
    102
}
fn d_gelu() -> String {
    "gelu".into()
}
fn d_eps_vision() -> f64 {
    1e-5
}
fn d_eps_text() -> f64 {
    1e-12
}

impl BlipConfig {
    /// Reads `config.json` and checks what this implementation supports; errors name the file.
    pub fn load(path: &Path) -> Result<Self> {
        let raw: serde_json::Value = read_json(path)?;
        let origin = path.display().to_string();
        if let Some(t) = raw.get("model_type").and_then(|v| v.as_str()) {
            if t != "blip" {
                bail!("{origin}: model_type is {t:?}; a BLIP captioner (BlipForConditionalGeneration) has \"blip\"");
            }
        }
        if raw.get("text_config").is_none() || raw.get("vision_config").is_none() {
            bail!("{origin}: not a BLIP config (it needs text_config and vision_config)");
        }
        let cfg: BlipConfig =
            serde_json::from_value(raw).with_context(|| format!("{origin} is not a valid BLIP config"))?;
        cfg.validate(&origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let (v, t) = (&self.vision_config, &self.text_config);
        Activation::from_config(&v.hidden_act, origin)?;
        Activation::from_config(&t.hidden_act, origin)?;
        require_positive(
            origin,
            &[
                ("vision_config.hidden_size", v.hidden_size),
                ("vision_config.intermediate_size", v.intermediate_size),
                ("vision_config.num_attention_heads", v.num_attention_heads),
                ("vision_config.image_size", v.image_size),
                ("vision_config.patch_size", v.patch_size),
                ("vision_config.num_channels", v.num_channels),
                ("text_config.vocab_size", t.vocab_size),
                ("text_config.hidden_size", t.hidden_size),
                ("text_config.intermediate_size", t.intermediate_size),
                ("text_config.num_attention_heads", t.num_attention_heads),
                ("text_config.max_position_embeddings", t.max_position_embeddings),
            ],
        )?;
        if v.num_hidden_layers < 0 || t.num_hidden_layers < 0 {
            bail!("{origin}: num_hidden_layers must be ≥ 0");
        }
        if v.hidden_size % v.num_attention_heads != 0 {
            bail!(
                "{origin}: vision hidden_size {} is not divisible by its {} heads",
                v.hidden_size,
                v.num_attention_heads
            );
        }
        if t.hidden_size % t.num_attention_heads != 0 {
            bail!(
                "{origin}: text hidden_size {} is not divisible by its {} heads",
                t.hidden_size,
                t.num_attention_heads
            );
        }
        if v.image_size < v.patch_size {
            bail!("{origin}: image_size {} is smaller than patch_size {}", v.image_size, v.patch_size);
        }
        // BlipConfig.__init__ sets text_config.encoder_hidden_size = vision_config.hidden_size
        if t.encoder_hidden_size != v.hidden_size {
            bail!(
                "{origin}: text_config.encoder_hidden_size {} ≠ vision_config.hidden_size {} (the decoder attends to the image tokens)",
                t.encoder_hidden_size,
                v.hidden_size
            );
        }
        for (name, id) in
            [("pad_token_id", t.pad_token_id), ("bos_token_id", t.bos_token_id), ("sep_token_id", t.sep_token_id)]
        {
            if id < 0 || id >= t.vocab_size {
                bail!("{origin}: text_config.{name} {id} is outside the vocabulary (vocab_size {})", t.vocab_size);
            }
        }
        Ok(())
    }

    /// Number of image tokens: 1 (class) + (image_size / patch_size)².
    pub fn image_tokens(&self) -> i64 {
        let g = self.vision_config.image_size / self.vision_config.patch_size;
        1 + g * g
    }
}

fn ln(vs: nn::Path, d: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(vs, vec![d], nn::LayerNormConfig { eps, ..Default::default() })
}

/// (B, L, heads·dh) -> (B, heads, L, dh)
fn split_heads(t: &Tensor, heads: i64) -> Tensor {
    let (b, l, d) = t.size3().expect("attention input must be (B, L, C)");
    t.view([b, l, heads, d / heads]).transpose(1, 2)
}

/// (B, heads, L, dh) -> (B, L, heads·dh)
fn merge_heads(t: &Tensor) -> Tensor {
    let (b, h, l, dh) = t.size4().expect("attention output must be (B, heads, L, dh)");
    t.transpose(1, 2).contiguous().reshape([b, l, h * dh])
}

/// `BlipEncoderLayer`: pre-norm self-attention (fused `qkv`) and MLP, each with a residual.
#[derive(Debug)]
struct VisionLayer {
    layer_norm1: nn::LayerNorm,
    qkv: nn::Linear,
    projection: nn::Linear,
    layer_norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
    act: Activation,
}

impl VisionLayer {
    fn new(vs: nn::Path, c: &BlipVisionConfig, act: Activation) -> Self {
        let d = c.hidden_size;
        let at = &vs / "self_attn";
        Self {
            layer_norm1: ln(&vs / "layer_norm1", d, c.layer_norm_eps),
            qkv: nn::linear(&at / "qkv", d, 3 * d, Default::default()),
            projection: nn::linear(&at / "projection", d, d, Default::default()),
            layer_norm2: ln(&vs / "layer_norm2", d, c.layer_norm_eps),
            fc1: nn::linear(&vs / "mlp" / "fc1", d, c.intermediate_size, Default::default()),
            fc2: nn::linear(&vs / "mlp" / "fc2", c.intermediate_size, d, Default::default()),
            heads: c.num_attention_heads,
            act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, l, d) = x.size3().expect("(B, L, d)");
        let dh = d / self.heads;
        // (B, L, 3, heads, dh) -> (3, B, heads, L, dh): transformers' reshape + permute
        let qkv =
            self.qkv.forward(&self.layer_norm1.forward(x)).reshape([b, l, 3, self.heads, dh]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let scale = (dh as f64).powf(-0.5);
        let o = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, false, Some(scale), false);
        let h = x + self.projection.forward(&merge_heads(&o));
        let m = self.fc2.forward(&self.act.apply(&self.fc1.forward(&self.layer_norm2.forward(&h))));
        h + m
    }
}

/// `BlipTextAttention`: `self.{query,key,value}` and `output.{dense,LayerNorm}` (post-norm,
/// residual inside), for self- or cross-attention.
#[derive(Debug)]
struct TextAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    dense: nn::Linear,
    layer_norm: nn::LayerNorm,
    heads: i64,
}

impl TextAttention {
    fn new(vs: nn::Path, c: &BlipTextConfig, kv_dim: i64) -> Self {
        let d = c.hidden_size;
        let s = &vs / "self";
        Self {
            query: nn::linear(&s / "query", d, d, Default::default()),
            key: nn::linear(&s / "key", kv_dim, d, Default::default()),
            value: nn::linear(&s / "value", kv_dim, d, Default::default()),
            dense: nn::linear(&vs / "output" / "dense", d, d, Default::default()),
            layer_norm: ln(&vs / "output" / "LayerNorm", d, c.layer_norm_eps),
            heads: c.num_attention_heads,
        }
    }

    /// Keys and values of `src` (B, M, kv_dim) -> ((B, heads, M, dh), (B, heads, M, dh)).
    fn kv(&self, src: &Tensor) -> (Tensor, Tensor) {
        (split_heads(&self.key.forward(src), self.heads), split_heads(&self.value.forward(src), self.heads))
    }

    /// `x` (B, L, d) attends to `k`, `v` (B, heads, M, dh); `causal` masks key j > query i
    /// (only used without earlier cached tokens, where L = M).
    fn attend(&self, x: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Tensor {
        let q = split_heads(&self.query.forward(x), self.heads);
        let o = Tensor::scaled_dot_product_attention::<Tensor>(&q, k, v, None, 0.0, causal, None, false);
        self.layer_norm.forward(&(self.dense.forward(&merge_heads(&o)) + x))
    }
}

/// `BlipTextLayer` of the decoder: causal self-attention, cross-attention to the image, FFN.
#[derive(Debug)]
struct TextLayer {
    attention: TextAttention,
    crossattention: TextAttention,
    intermediate: nn::Linear,
    output: nn::Linear,
    output_ln: nn::LayerNorm,
    act: Activation,
}

/// The cached keys / values of one decoder layer: the tokens fed so far (self-attention) and
/// the image (cross-attention, computed once per caption). Each (B, heads, ·, dh).
#[derive(Debug)]
pub struct LayerCache {
    self_kv: Option<(Tensor, Tensor)>,
    cross_kv: (Tensor, Tensor),
}

impl LayerCache {
    /// Keeps row `index[j]` of every cached tensor in row j (beam search's reordering).
    fn reorder(&mut self, index: &Tensor) {
        if let Some((k, v)) = &self.self_kv {
            self.self_kv = Some((k.index_select(0, index), v.index_select(0, index)));
        }
        let (k, v) = &self.cross_kv;
        self.cross_kv = (k.index_select(0, index), v.index_select(0, index));
    }
}

/// The decoder's cache across its layers, and how many tokens it holds.
#[derive(Debug)]
pub struct DecoderCache {
    layers: Vec<LayerCache>,
    len: i64,
}

impl DecoderCache {
    /// Reorders the rows (beams) of the cache: row j becomes the old row `index[j]`.
    pub fn reorder(&mut self, index: &[i64]) {
        let dev = self.layers.first().map(|l| l.cross_kv.0.device()).unwrap_or(Device::Cpu);
        let idx = Tensor::from_slice(index).to_device(dev);
        for l in &mut self.layers {
            l.reorder(&idx);
        }
    }

    pub fn len(&self) -> i64 {
        self.len
    }

    /// A copy sharing the cached tensors (decoding into it leaves `self` as it was).
    pub fn fork(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| LayerCache {
                self_kv: l.self_kv.as_ref().map(|(k, v)| (k.shallow_clone(), v.shallow_clone())),
                cross_kv: (l.cross_kv.0.shallow_clone(), l.cross_kv.1.shallow_clone()),
            })
            .collect();
        Self { layers, len: self.len }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl TextLayer {
    fn new(vs: nn::Path, c: &BlipTextConfig, act: Activation) -> Self {
        let d = c.hidden_size;
        Self {
            attention: TextAttention::new(&vs / "attention", c, d),
            crossattention: TextAttention::new(&vs / "crossattention", c, c.encoder_hidden_size),
            intermediate: nn::linear(&vs / "intermediate" / "dense", d, c.intermediate_size, Default::default()),
            output: nn::linear(&vs / "output" / "dense", c.intermediate_size, d, Default::default()),
            output_ln: ln(&vs / "output" / "LayerNorm", d, c.layer_norm_eps),
            act,
        }
    }

    /// `x` (B, L, d): the newest L tokens; `cache` holds the earlier ones and the image.
    fn forward(&self, x: &Tensor, cache: &mut LayerCache) -> Tensor {
        let (k, v) = self.attention.kv(x);
        let causal = cache.self_kv.is_none() && x.size()[1] > 1;
        let (k, v) = match cache.self_kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2)),
            None => (k, v),
        };
        let h = self.attention.attend(x, &k, &v, causal);
        cache.self_kv = Some((k, v));
        let (ck, cv) = &cache.cross_kv;
        let h = self.crossattention.attend(&h, ck, cv, false);
        let m = self.output.forward(&self.act.apply(&self.intermediate.forward(&h)));
        self.output_ln.forward(&(m + h))
    }
}

/// transformers' `BlipForConditionalGeneration` (vision model + BERT text decoder).
#[derive(Debug)]
pub struct BlipForConditionalGeneration {
    pub vs: nn::VarStore,
    pub config: BlipConfig,
    // vision
    class_embedding: Tensor,
    position_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    vision_layers: Vec<VisionLayer>,
    post_layernorm: nn::LayerNorm,
    // text decoder
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    embeddings_ln: nn::LayerNorm,
    text_layers: Vec<TextLayer>,
    transform_dense: nn::Linear,
    transform_ln: nn::LayerNorm,
    output_bias: Tensor,
    text_act: Activation,
}

impl BlipForConditionalGeneration {
    /// A randomly initialised model of this config (tests, benchmarks at real shapes).
    pub fn new(config: BlipConfig, device: Device) -> Result<Self> {
        config.validate("BLIP config")?;
        crate::rng::exclusive(|| Ok::<_, anyhow::Error>(Self::build(config, device)))
    }

    fn build(config: BlipConfig, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let (vc, tc) = (&config.vision_config, &config.text_config);
        let vact = Activation::parse(&vc.hidden_act).expect("validated");
        let tact = Activation::parse(&tc.hidden_act).expect("validated");
        let vm = &root / "vision_model";
        let emb = &vm / "embeddings";
        let init = nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        let d = vc.hidden_size;
        let class_embedding = emb.var("class_embedding", &[1, 1, d], init);
        let position_embedding = emb.var("position_embedding", &[1, config.image_tokens(), d], init);
        let p = vc.patch_size;
        let patch_embedding = nn::conv2d(
            &emb / "patch_embedding",
            vc.num_channels,
            d,
            p,
            nn::ConvConfig { stride: p, ..Default::default() },
        );
        let vision_layers =
            (0..vc.num_hidden_layers).map(|i| VisionLayer::new(&vm / "encoder" / "layers" / i, vc, vact)).collect();
        let post_layernorm = ln(&vm / "post_layernorm", d, vc.layer_norm_eps);

        let td = &root / "text_decoder";
        let bert = &td / "bert";
        let temb = &bert / "embeddings";
        let dt = tc.hidden_size;
        let word_embeddings = (&temb / "word_embeddings").var("weight", &[tc.vocab_size, dt], init);
        let position_embeddings =
            (&temb / "position_embeddings").var("weight", &[tc.max_position_embeddings, dt], init);
        let embeddings_ln = ln(&temb / "LayerNorm", dt, tc.layer_norm_eps);
        let text_layers =
            (0..tc.num_hidden_layers).map(|i| TextLayer::new(&bert / "encoder" / "layer" / i, tc, tact)).collect();
        let pred = &td / "cls" / "predictions";
        let transform_dense = nn::linear(&pred / "transform" / "dense", dt, dt, Default::default());
        let transform_ln = ln(&pred / "transform" / "LayerNorm", dt, tc.layer_norm_eps);
        let output_bias = pred.var("bias", &[tc.vocab_size], nn::Init::Const(0.0));
        Self {
            vs,
            config,
            class_embedding,
            position_embedding,
            patch_embedding,
            vision_layers,
            post_layernorm,
            word_embeddings,
            position_embeddings,
            embeddings_ln,
            text_layers,
            transform_dense,
            transform_ln,
            output_bias,
            text_act: tact,
        }
    }

    /// Loads `dir/config.json` and `dir/model.safetensors` strictly (see the module docs), in
    /// `kind` (float32, or half precision where `--dtype` asks).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        if !dir.is_dir() {
            bail!("BLIP model folder {} does not exist", dir.display());
        }
        let config = BlipConfig::load(&dir.join("config.json"))?;
        let mut model = crate::rng::exclusive(|| Self::build(config, device));
        let weights = weight_file(dir)?;
        load_strict(&model.vs, &weights, &|key, _| match key {
            "text_decoder.cls.predictions.decoder.weight" | "text_decoder.cls.predictions.decoder.bias" => {
                KeyAction::Skip
            }
            k if k.ends_with("position_ids") => KeyAction::Skip,
            k => KeyAction::Load(k.to_string()),
        })?;
        if kind != Kind::Float {
            model.vs.set_kind(kind);
        }
        Ok(model)
    }

    pub fn kind(&self) -> Kind {
        self.word_embeddings.kind()
    }

    /// `pixel_values` (B, C, S, S) -> the image tokens (B, 1+N, d_vision) after
    /// `post_layernorm` (transformers' `vision_model(...).last_hidden_state`).
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let vc = &self.config.vision_config;
        let (b, c, h, w) = pixel_values
            .size4()
            .with_context(|| format!("pixel values must be (B, C, H, W), got {:?}", pixel_values.size()))?;
        if c != vc.num_channels || h != vc.image_size || w != vc.image_size {
            bail!(
                "pixel values are {c}×{h}×{w}; this BLIP vision model takes {}×{s}×{s}",
                vc.num_channels,
                s = vc.image_size
            );
        }
        let x = pixel_values.to_device(self.vs.device()).to_kind(self.kind());
        let d = vc.hidden_size;
        let patches = self.patch_embedding.forward(&x).flatten(2, -1).transpose(1, 2); // (B, N, d)
        let cls = self.class_embedding.expand([b, 1, d], false);
        let mut hs = Tensor::cat(&[cls, patches], 1) + &self.position_embedding; // (B, 1+N, d)
        for layer in &self.vision_layers {
            hs = layer.forward(&hs);
        }
        Ok(self.post_layernorm.forward(&hs))
    }

    /// A fresh decoder cache for `image_embeds` (B, M, d_vision): the image's keys / values in
    /// every cross-attention layer, no tokens yet.
    pub fn new_cache(&self, image_embeds: &Tensor) -> DecoderCache {
        let e = image_embeds.to_kind(self.kind());
        let layers =
            self.text_layers.iter().map(|l| LayerCache { self_kv: None, cross_kv: l.crossattention.kv(&e) }).collect();
        DecoderCache { layers, len: 0 }
    }

    /// Feeds `ids` (B, L) after the `cache.len()` tokens already in the cache; returns the
    /// logits of the L positions (B, L, vocab) in float32 and extends the cache.
    pub fn decode(&self, ids: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        let (_, l) = ids.size2().context("token ids must be (B, L)")?;
        let max = self.config.text_config.max_position_embeddings;
        if cache.len + l > max {
            bail!("a caption of {} tokens is longer than the decoder's max_position_embeddings {max}", cache.len + l);
        }
        let dev = self.vs.device();
        let pos = Tensor::arange_start(cache.len, cache.len + l, (Kind::Int64, dev));
        let ids = ids.to_device(dev);
        let mut h = self.embeddings_ln.forward(
            &(self.word_embeddings.index_select(0, &ids.flatten(0, -1)).view([ids.size()[0], l, -1])
                + self.position_embeddings.index_select(0, &pos).unsqueeze(0)),
        );
        for (layer, c) in self.text_layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward(&h, c);
        }
        cache.len += l;
        let t = self.transform_ln.forward(&self.text_act.apply(&self.transform_dense.forward(&h)));
        Ok((t.matmul(&self.word_embeddings.tr()) + &self.output_bias).to_kind(Kind::Float))
    }

    /// Teacher-forced logits of `ids` (B, L) given the image (transformers' `forward(...).logits`).
    pub fn logits(&self, pixel_values: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let e = self.image_embeds(pixel_values)?;
        let mut cache = self.new_cache(&e);
        self.decode(ids, &mut cache)
    }
}

/// How a caption is decoded: transformers' `GenerationConfig` fields that BLIP captioning uses.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// The longest caption in tokens, the prompt ([DEC] and any prefix) included.
    pub max_length: MaxLength,
    pub num_beams: usize,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
}

/// transformers' rule for the length limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxLength {
    /// Total tokens (`max_length` given or in the model's config).
    Total(usize),
    /// Tokens after the prompt (`max_new_tokens`).
    New(usize),
    /// Nothing set: 20 new tokens, capped at `max_position_embeddings` (transformers 5's
    /// "model-agnostic default").
    Default,
}

/// `early_stopping` of beam search: `False` (transformers' heuristic), `True`, or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    Heuristic,
    Always,
    Never,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_length: MaxLength::Default,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
        }
    }
}

impl GenerationConfig {
    /// As transformers reads it: `dir/generation_config.json` when present, else the
    /// generation keys of `config.json`'s `text_config` (older checkpoints such as
    /// `Salesforce/blip-image-captioning-base` carry `max_length: 20` there). Settings this
    /// implementation does not apply (sampling, repetition penalties, minimum lengths, …) are
    /// refused when they differ from their neutral value, naming the file.
    pub fn load(dir: &Path) -> Result<Self> {
        let gen = dir.join("generation_config.json");
        let (path, v) = if gen.is_file() {
            (gen.clone(), read_json::<serde_json::Value>(&gen)?)
        } else {
            let p = dir.join("config.json");
            let raw: serde_json::Value = read_json(&p)?;
            (p, raw.get("text_config").cloned().unwrap_or(serde_json::Value::Null))
        };
        Self::from_json(&v, &path.display().to_string())
    }

    fn from_json(v: &serde_json::Value, origin: &str) -> Result<Self> {
        let mut g = Self::default();
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        let uint = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .with_context(|| format!("{origin}: {k} must be a count, got {x}")),
            }
        };
        if let Some(n) = uint("max_new_tokens")? {
            g.max_length = MaxLength::New(n);
        } else if let Some(n) = uint("max_length")? {
            g.max_length = MaxLength::Total(n);
        }
        if let Some(n) = uint("num_beams")? {
            g.num_beams = n.max(1);
        }
        if let Some(x) = get("length_penalty") {
            g.length_penalty = x.as_f64().with_context(|| format!("{origin}: length_penalty must be a number"))?;
        }
        g.early_stopping = match get("early_stopping") {
            None | Some(serde_json::Value::Bool(false)) => EarlyStopping::Heuristic,
            Some(serde_json::Value::Bool(true)) => EarlyStopping::Always,
            Some(serde_json::Value::String(s)) if s == "never" => EarlyStopping::Never,
            Some(x) => bail!("{origin}: early_stopping must be true, false or \"never\", got {x}"),
        };
        // (key, neutral value): anything else changes the tokens and is not implemented
        let neutral: [(&str, serde_json::Value); 10] = [
            ("do_sample", false.into()),
            ("min_length", 0.into()),
            ("min_new_tokens", serde_json::Value::Null),
            ("repetition_penalty", 1.0.into()),
            ("no_repeat_ngram_size", 0.into()),
            ("encoder_no_repeat_ngram_size", 0.into()),
            ("num_beam_groups", 1.into()),
            ("diversity_penalty", 0.0.into()),
            ("bad_words_ids", serde_json::Value::Null),
            ("forced_eos_token_id", serde_json::Value::Null),
        ];
        for (k, want) in neutral {
            if let Some(x) = get(k) {
                let same = match (x.as_f64(), want.as_f64()) {
                    (Some(a), Some(b)) => a == b,
                    _ => *x == want,
                };
                if !same {
                    bail!("{origin}: {k} = {x} is not supported by hifi-tuner's BLIP decoding (only greedy and beam search)");
                }
            }
        }
        Ok(g)
    }

    /// The total token limit for a prompt of `prompt_len` tokens, as transformers' generate
    /// resolves it.
    pub fn total_length(&self, prompt_len: usize, max_position_embeddings: usize) -> usize {
        match self.max_length {
            MaxLength::Total(n) => n,
            MaxLength::New(n) => n + prompt_len,
            MaxLength::Default => (20 + prompt_len).min(max_position_embeddings),
        }
    }
}

impl BlipForConditionalGeneration {
    /// transformers' `BlipForConditionalGeneration.generate` for one image: `image_embeds`
    /// (1, M, d) from [`Self::image_embeds`], `prompt` the token ids that start the caption
    /// ([DEC], then the prefix's tokens). Greedy when `num_beams` is 1, else beam search as
    /// transformers 5's vectorised `_beam_search`. Returns the whole sequence, the prompt and
    /// the final [SEP] (when reached) included.
    pub fn generate(&self, image_embeds: &Tensor, prompt: &[i64], g: &GenerationConfig) -> Result<Vec<i64>> {
        let tc = &self.config.text_config;
        if prompt.is_empty() {
            bail!("the caption's prompt is empty (it starts with [DEC])");
        }
        let max_len = g.total_length(prompt.len(), tc.max_position_embeddings as usize);
        if max_len <= prompt.len() {
            bail!("max length {max_len} leaves no room after the {} prompt token(s)", prompt.len());
        }
        if max_len as i64 > tc.max_position_embeddings {
            bail!(
                "max length {max_len} is longer than the decoder's max_position_embeddings {}",
                tc.max_position_embeddings
            );
        }
        if image_embeds.size()[0] != 1 {
            bail!("generate captions one image at a time");
        }
        tch::no_grad(|| {
            if g.num_beams <= 1 {
                self.greedy(image_embeds, prompt, max_len)
            } else {
                self.beam_search(image_embeds, prompt, max_len, g)
            }
        })
    }

    fn greedy(&self, image_embeds: &Tensor, prompt: &[i64], max_len: usize) -> Result<Vec<i64>> {
        let sep = self.config.text_config.sep_token_id;
        let mut cache = self.new_cache(image_embeds);
        let mut seq = prompt.to_vec();
        let mut feed = Tensor::from_slice(prompt).unsqueeze(0);
        loop {
            let logits = self.decode(&feed, &mut cache)?; // (1, L, V)
            let next = logits.select(1, -1).argmax(-1, false).int64_value(&[0]);
            seq.push(next);
            if next == sep || seq.len() >= max_len {
                return Ok(seq);
            }
            feed = Tensor::from_slice(&[next]).unsqueeze(0);
        }
    }

    /// Beam search for one image, step for step as transformers 5.24's `_beam_search` (batch 1):
    /// 2·num_beams candidates per step; the best num_beams that did not stop keep running; a
    /// candidate among the top num_beams that stops ([SEP] or max length) joins the finished
    /// list with score sum(log p) / generated_len^length_penalty; the early-stop heuristic of
    /// `early_stopping`.
    fn beam_search(
        &self,
        image_embeds: &Tensor,
        prompt: &[i64],
        max_len: usize,
        g: &GenerationConfig,
    ) -> Result<Vec<i64>> {
        const NEG: f32 = -1.0e9;
        let sep = self.config.text_config.sep_token_id;
        let n = g.num_beams;
        let k = 2 * n; // beams_to_keep: max(2, 1 + one eos) · num_beams
        let lp = g.length_penalty;
        let prompt_len = prompt.len();
        let e = image_embeds.expand([n as i64, -1, -1], false).contiguous();
        let mut cache = self.new_cache(&e);
        let mut running: Vec<Vec<i64>> = vec![prompt.to_vec(); n];
        let mut running_scores: Vec<f32> = (0..n).map(|i| if i == 0 { 0.0 } else { NEG }).collect();
        // finished slots: (sequence, score, finished?)
        let mut finished: Vec<(Vec<i64>, f32, bool)> = vec![(prompt.to_vec(), NEG, false); n];
        let mut heuristic_unsatisfied = true;
        let mut feed = Tensor::from_slice(&prompt.repeat(n)).view([n as i64, prompt_len as i64]);
        let mut cur_len = prompt_len;
        loop {
            let logits = self.decode(&feed, &mut cache)?.select(1, -1); // (n, V)
            let log_probs = logits.log_softmax(-1, Kind::Float);
            let v = log_probs.size()[1] as usize;
            let lp_vec: Vec<f32> = Vec::<f32>::try_from(log_probs.flatten(0, -1).to_device(Device::Cpu))?;
            // accumulated log-probs of every (beam, token), in f32 as torch adds them
            let acc: Vec<f32> = lp_vec.iter().enumerate().map(|(i, x)| x + running_scores[i / v]).collect();
            let top = top_k(&acc, k);
            // the K candidates
            let cands: Vec<(f32, usize, Vec<i64>, bool)> = top
                .iter()
                .map(|&(score, idx)| {
                    let (beam, tok) = (idx / v, (idx % v) as i64);
                    let mut s = running[beam].clone();
                    s.push(tok);
                    let hits = tok == sep || s.len() >= max_len;
                    (score, beam, s, hits)
                })
                .collect();
            // next running beams: the best n that did not stop
            let adj: Vec<f32> = cands.iter().map(|c| if c.3 { c.0 + NEG } else { c.0 }).collect();
            let next = top_k(&adj, n);
            let parents: Vec<i64> = next.iter().map(|&(_, i)| cands[i].1 as i64).collect();
            running = next.iter().map(|&(_, i)| cands[i].2.clone()).collect();
            running_scores = next.iter().map(|&(s, _)| s).collect();
            // finished beams
            let denom = ((cur_len + 1 - prompt_len) as f64).powf(lp) as f32;
            let all_done = finished.iter().all(|f| f.2);
            let mut merged: Vec<(Vec<i64>, f32, bool)> = finished.clone();
            for (j, c) in cands.iter().enumerate() {
                let just_finished = c.3 && j < n;
                let mut s = c.0 / denom;
                if all_done && g.early_stopping == EarlyStopping::Always {
                    s += NEG;
                }
                if !heuristic_unsatisfied {
                    s += NEG;
                }
                if !just_finished {
                    s += NEG;
                }
                merged.push((c.2.clone(), s, just_finished));
            }
            let scores: Vec<f32> = merged.iter().map(|m| m.1).collect();
            finished = top_k(&scores, n).iter().map(|&(_, i)| merged[i].clone()).collect();
            cache.reorder(&parents);
            cur_len += 1;
            // early-stop heuristic (sticky once satisfied)
            let best_len = if g.early_stopping == EarlyStopping::Never && lp > 0.0 {
                max_len - prompt_len
            } else {
                cur_len - prompt_len
            };
            let best_running = running_scores[0] / (best_len as f64).powf(lp) as f32;
            let min_finished = finished.iter().map(|f| f.1).fold(f32::INFINITY, f32::min);
            let improvable = finished.iter().any(|f| best_running > if f.2 { min_finished } else { NEG });
            heuristic_unsatisfied = heuristic_unsatisfied && improvable;
            let open_beam = !(finished.iter().all(|f| f.2) && g.early_stopping == EarlyStopping::Always);
            let continuable = !cands.iter().all(|c| c.3);
            if !(heuristic_unsatisfied && open_beam && continuable) {
                break;
            }
            let last: Vec<i64> = running.iter().map(|s| *s.last().expect("non-empty")).collect();
            feed = Tensor::from_slice(&last).unsqueeze(1);
        }
        Ok(finished.swap_remove(0).0)
    }
}

/// The `k` largest values with their indices, largest first (ties: the lower index first).
fn top_k(values: &[f32], k: usize) -> Vec<(f32, usize)> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.into_iter().map(|i| (values[i], i)).collect()
}
