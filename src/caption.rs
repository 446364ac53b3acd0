//! Captions by BLIP (HiFi Tuner §3.4: Algorithm 3 starts from a caption of the photo I_r): a
//! BLIP captioner folder in transformers' layout — the model ([`BlipForConditionalGeneration`]),
//! its `BlipProcessor` (the image processor of `preprocessor_config.json` and the BERT WordPiece
//! tokenizer of `tokenizer.json` or `vocab.txt`) and its generation settings — and
//! [`Captioner::caption`], which is transformers'
//! `processor.decode(model.generate(**processor(image, prefix))[0], skip_special_tokens=True)`.

use crate::load::read_json;
use crate::models::blip::{BlipForConditionalGeneration, GenerationConfig, MaxLength};
// OpenAI CLIP's normalisation is BLIP's default too
use crate::models::clip::{pixel_values, CLIP_MEAN, CLIP_STD};
use anyhow::{anyhow, bail, Context, Result};
use image::imageops::FilterType;
use image::DynamicImage;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

/// transformers' `BlipImageProcessor` (its PIL algorithm, `BlipImageProcessorPil`): RGB, resize
/// to exactly (height, width) bicubic (no aspect kept, no crop), × `rescale_factor`, normalise.
///
/// As for CLIP (models::clip), the resize is the `image` crate's `CatmullRom` (PIL's bicubic
/// kernel, widened when downscaling) kept in f32 between its two passes where PIL rounds to 8
/// bit: close to PIL, not bit-identical (measured in tests/blip.rs).
#[derive(Debug, Clone, PartialEq)]
pub struct BlipImageProcessor {
    pub do_resize: bool,
    /// (height, width)
    pub size: (u32, u32),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

#[derive(Deserialize)]
#[serde(untagged)]
enum BlipSize {
    Int(i64),
    HeightWidth { height: i64, width: i64 },
}

#[derive(Deserialize)]
struct BlipPreprocessorFile {
    do_resize: Option<bool>,
    size: Option<BlipSize>,
    resample: Option<i64>,
    do_center_crop: Option<bool>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<[f64; 3]>,
    image_std: Option<[f64; 3]>,
}

impl BlipImageProcessor {
    /// The class defaults at the model's input side (384 for BLIP-base and -large).
    pub fn default_for(image_size: i64) -> Self {
        let s = image_size as u32;
        Self {
            do_resize: true,
            size: (s, s),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// `dir/preprocessor_config.json` when present, else [`Self::default_for`]; the output must
    /// be the vision model's `image_size` square.
    pub fn load(dir: &Path, image_size: i64) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let mut p = Self::default_for(image_size);
        if path.is_file() {
            let f: BlipPreprocessorFile = read_json(&path)?;
            let origin = path.display();
            if let Some(r) = f.resample {
                if r != 3 {
                    bail!("{origin}: resample {r} is not supported (only 3, bicubic, as BLIP uses)");
                }
            }
            if f.do_center_crop == Some(true) {
                bail!("{origin}: do_center_crop is not part of BLIP's processor");
            }
            p.do_resize = f.do_resize.unwrap_or(true);
            p.size = match f.size {
                None => p.size,
                Some(BlipSize::Int(s)) => (positive(s, &origin)?, positive(s, &origin)?),
                Some(BlipSize::HeightWidth { height, width }) => {
                    (positive(height, &origin)?, positive(width, &origin)?)
                }
            };
            p.do_rescale = f.do_rescale.unwrap_or(true);
            p.rescale_factor = f.rescale_factor.unwrap_or(p.rescale_factor);
            p.do_normalize = f.do_normalize.unwrap_or(true);
            p.mean = f.image_mean.unwrap_or(p.mean);
            p.std = f.image_std.unwrap_or(p.std);
            if p.std.contains(&0.0) {
                bail!("{origin}: image_std has a zero");
            }
            let s = image_size as u32;
            if !p.do_resize || p.size != (s, s) {
                bail!(
                    "{origin}: the processor gives {:?} (height, width) images; this BLIP vision model takes {s}×{s}",
                    p.size
                );
            }
        }
        Ok(p)
    }

    /// Image -> pixel values (3, height, width) f32 on the CPU.
    pub fn preprocess(&self, img: &DynamicImage) -> Result<Tensor> {
        let mut rgb = img.to_rgb8();
        let (w, h) = rgb.dimensions();
        if w == 0 || h == 0 {
            bail!("cannot preprocess an empty ({w}x{h}) image");
        }
        if self.do_resize {
            let (nh, nw) = self.size;
            rgb = image::imageops::resize(&rgb, nw, nh, FilterType::CatmullRom);
        }
        Ok(pixel_values(
            &rgb,
            self.do_rescale.then_some(self.rescale_factor),
            self.do_normalize.then_some((self.mean, self.std)),
        ))
    }
}

fn positive(v: i64, origin: &impl std::fmt::Display) -> Result<u32> {
    if v <= 0 || v > 100_000 {
        bail!("{origin}: size must be positive, got {v}");
    }
    Ok(v as u32)
}

/// The files of a BLIP captioner folder (for a hub id, what is downloaded).
pub const BLIP_FILES: crate::hub::FolderFiles<'static> = crate::hub::FolderFiles {
    what: "a BLIP captioner (BlipForConditionalGeneration)",
    required: &[&["config.json"], &["model.safetensors"], &["tokenizer.json", "vocab.txt"]],
    optional: &[
        "preprocessor_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ],
};

/// What one caption asks for (each `None`: the model's generation config, as transformers).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaptionOptions {
    /// Conditional captioning: the caption starts with this text (e.g. "a photography of").
    pub prefix: Option<String>,
    /// Beam search width (1: greedy).
    pub beams: Option<usize>,
    /// The caption's longest length in tokens, the [DEC] token and the prefix included
    /// (transformers' `max_length`).
    pub max_length: Option<usize>,
}

/// A caption and the token ids it was decoded from (prompt and final [SEP] included).
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    pub text: String,
    pub ids: Vec<i64>,
}

/// A BLIP captioner folder, loaded.
#[derive(Debug)]
pub struct Captioner {
    pub model: BlipForConditionalGeneration,
    pub processor: BlipImageProcessor,
    pub tokenizer: Tokenizer,
    pub generation: GenerationConfig,
    pub dir: PathBuf,
}

impl Captioner {
    /// Loads a BLIP folder or hub id `org/name[@revision]` (e.g.
    /// `Salesforce/blip-image-captioning-base`): config.json, model.safetensors,
    /// preprocessor_config.json, tokenizer.json or vocab.txt, generation_config.json if any; the
    /// weights in `kind`.
    pub fn load(arg: &Path, device: Device, kind: Kind) -> Result<Self> {
        if !arg.exists() && crate::hub::parse_hub_id(&arg.to_string_lossy()).is_none() {
            bail!("BLIP model folder {} does not exist", arg.display());
        }
        let dir = &crate::hub::resolve_folder(arg, &BLIP_FILES)?;
        let model = BlipForConditionalGeneration::load(dir, device, kind)?;
        let processor = BlipImageProcessor::load(dir, model.config.vision_config.image_size)?;
        let tokenizer = load_tokenizer(dir, model.config.text_config.bos_token_id)?;
        let vocab = tokenizer.get_vocab_size(true) as i64;
        if vocab > model.config.text_config.vocab_size {
            bail!(
                "{}: the tokenizer has {vocab} tokens, the model's vocab_size is {}",
                dir.display(),
                model.config.text_config.vocab_size
            );
        }
        let generation = GenerationConfig::load(dir)?;
        Ok(Self { model, processor, tokenizer, generation, dir: dir.to_path_buf() })
    }

    /// The ids a caption starts with: [DEC], then the prefix's word pieces (BLIP's `generate`:
    /// the processor's `[CLS] prefix [SEP]` with [CLS] replaced by [DEC] and [SEP] dropped).
    pub fn prompt_ids(&self, prefix: Option<&str>) -> Result<Vec<i64>> {
        let bos = self.model.config.text_config.bos_token_id;
        let Some(prefix) = prefix.filter(|p| !p.trim().is_empty()) else {
            return Ok(vec![bos]);
        };
        let enc =
            self.tokenizer.encode(prefix, true).map_err(|e| anyhow!("cannot tokenize the prefix {prefix:?}: {e}"))?;
        let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        if ids.len() < 2 {
            bail!("the prefix {prefix:?} tokenizes to {ids:?}, without [CLS] … [SEP]");
        }
        ids[0] = bos;
        ids.pop();
        Ok(ids)
    }

    /// `decode(ids, skip_special_tokens=True)`, stripped.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let text = self.tokenizer.decode(&ids, true).map_err(|e| anyhow!("cannot decode caption ids: {e}"))?;
        Ok(text.trim().to_string())
    }

    /// Preprocessed pixel values -> caption.
    pub fn caption_pixels(&self, pixel_values: &Tensor, opts: &CaptionOptions) -> Result<Caption> {
        let mut g = self.generation.clone();
        if let Some(b) = opts.beams {
            if b == 0 {
                bail!("--beams must be at least 1");
            }
            g.num_beams = b;
        }
        if let Some(n) = opts.max_length {
            g.max_length = MaxLength::Total(n);
        }
        let prompt = self.prompt_ids(opts.prefix.as_deref())?;
        let embeds = tch::no_grad(|| self.model.image_embeds(&pixel_values.unsqueeze(0)))?;
        let ids = self.model.generate(&embeds, &prompt, &g)?;
        Ok(Caption { text: self.decode(&ids)?, ids })
    }

    /// An image -> its caption.
    pub fn caption(&self, img: &DynamicImage, opts: &CaptionOptions) -> Result<Caption> {
        self.caption_pixels(&self.processor.preprocess(img)?, opts)
    }

    /// The image file at `path` (read with EXIF orientation applied) -> its caption; errors
    /// name the file.
    pub fn caption_file(&self, path: &Path, opts: &CaptionOptions) -> Result<Caption> {
        let img = crate::io::open_image(path)?;
        self.caption(&img, opts).with_context(|| format!("captioning {}", path.display()))
    }
}

/// `tokenizer.json` (what transformers saves), else a BERT WordPiece tokenizer built from
/// `vocab.txt` as transformers' `BertTokenizer` builds it (lower-casing per
/// `tokenizer_config.json`'s `do_lower_case`, default true), with BLIP's `[DEC]` (bos) and
/// `[ENC]` added after the vocabulary when it lacks them.
pub fn load_tokenizer(dir: &Path, bos_id: i64) -> Result<Tokenizer> {
    let json = dir.join("tokenizer.json");
    let tk = if json.is_file() {
        Tokenizer::from_file(&json).map_err(|e| anyhow!("{}: not a tokenizer file: {e}", json.display()))?
    } else {
        let vocab = dir.join("vocab.txt");
        if !vocab.is_file() {
            bail!("{}: no tokenizer.json or vocab.txt (a BLIP folder has its BERT tokenizer)", dir.display());
        }
        bert_from_vocab(dir, &vocab)?
    };
    match tk.token_to_id("[DEC]") {
        Some(id) if i64::from(id) == bos_id => Ok(tk),
        Some(id) => bail!("{}: the tokenizer's [DEC] is id {id}, the model's bos_token_id is {bos_id}", dir.display()),
        None => bail!("{}: the tokenizer has no [DEC] token (BLIP's caption start)", dir.display()),
    }
}

/// transformers' `BertTokenizer` pipeline from a `vocab.txt` (hand-assembled from the
/// `tokenizers` crate's parts: the crate has no BERT preset for a bare vocabulary file).
fn bert_from_vocab(dir: &Path, vocab: &Path) -> Result<Tokenizer> {
    use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::bert::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::bert::BertProcessing;
    use tokenizers::AddedToken;
    let origin = vocab.display();
    let lower = {
        let cfg = dir.join("tokenizer_config.json");
        if cfg.is_file() {
            let v: serde_json::Value = read_json(&cfg)?;
            v.get("do_lower_case").and_then(|x| x.as_bool()).unwrap_or(true)
        } else {
            true
        }
    };
    let wp = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| anyhow!("{origin}: not a WordPiece vocabulary: {e}"))?;
    let mut tk = Tokenizer::new(wp);
    tk.with_normalizer(Some(BertNormalizer::new(true, true, None, lower))).map_err(|e| anyhow!("{origin}: {e}"))?;
    tk.with_pre_tokenizer(Some(BertPreTokenizer));
    tk.with_decoder(Some(WordPieceDecoder::new("##".into(), true)));
    let id = |t: &str| tk.token_to_id(t).with_context(|| format!("{origin}: the vocabulary has no {t}"));
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    tk.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
    let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tk.add_special_tokens(specials).map_err(|e| anyhow!("{origin}: {e}"))?;
    Ok(tk)
}
