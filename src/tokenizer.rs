//! CLIP byte-level BPE tokenizer, id-for-id with transformers 5.24.0's `CLIPTokenizer`: a thin
//! layer over the `tokenizers` crate (the engine under transformers' own tokenizer).
//!
//! The `tokenizers` pipeline is built exactly as transformers' `CLIPTokenizer.__init__` builds
//! it (checked against `tokenizers` 0.23.3, see `scripts/make_tokenizer_cases.py` and
//! `tests/tokenizer.rs`):
//!
//! - model: BPE from `vocab.json` + `merges.txt` (or the `model` of `tokenizer.json`), no
//!   dropout, `continuing_subword_prefix` `""`, `end_of_word_suffix` `"</w>"`, no `fuse_unk`;
//! - normaliser: `Sequence[NFC, Replace(\s+ → " "), Lowercase]`;
//! - pre-tokeniser: `Sequence[Split(CLIP regex, removed, invert), ByteLevel(add_prefix_space =
//!   false)]`, with the regex
//!   `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`;
//! - post-processor: `RobertaProcessing(eos, bos)` (`bos … eos`); decoder: ByteLevel, then
//!   `</w>` → space and trim, as transformers wraps `decode`.
//!
//! What stays here is transformers' part: which special tokens become added tokens, with which
//! flags and in which order (see [`ClipTokenizer::from_dir`]) — e.g. on SD-1.x folders
//! `<|startoftext|>` is normalised (so `<|STARTOFTEXT|>` is bos) but `<|endoftext|>` is not —
//! `model_max_length`, and `padding="max_length", truncation=True`
//! ([`ClipTokenizer::encode_padded`]). Added tokens (special tokens, textual-inversion tokens
//! from [`ClipTokenizer::add_tokens`]) are matched by the crate: non-normalised ones in the raw
//! text, case-sensitively; normalised ones in the normalised text, so `"Sks"` matches `sks`,
//! `SKS` and the `sks` inside `asks`.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{replace::ReplacePattern, Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{NormalizedString, Normalizer, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// `model_max_length` used when the config has none or an absurd one (transformers' "no limit"
/// placeholder is 1e30): the CLIP text encoder's 77 positions.
pub const DEFAULT_MODEL_MAX_LENGTH: usize = 77;

/// Values above this are treated as "no limit given" and replaced by
/// [`DEFAULT_MODEL_MAX_LENGTH`].
const MAX_SANE_MODEL_MAX_LENGTH: f64 = 1_000_000.0;

/// Names of the special-token attributes, in the order transformers registers them (this order
/// decides which flags win when two of them name the same token).
const SPECIAL_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// The pre-tokeniser split of transformers' `CLIPTokenizer` (matches are kept, the rest dropped).
const SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// BPE end-of-word suffix of CLIP's vocabulary.
const END_OF_WORD: &str = "</w>";

/// Result of [`ClipTokenizer::encode_padded`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly `model_max_length` ids: bos, content, eos, then pad ids.
    pub ids: Vec<i64>,
    /// Whether content tokens were dropped to fit (eos is always kept at the end).
    pub truncated: bool,
    /// Number of ids before padding (bos and eos included).
    pub n_tokens: usize,
}

/// A token matched in the text before BPE (special tokens, textual-inversion tokens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedToken {
    pub content: String,
    pub id: i64,
    /// Special tokens (bos/eos/unk/pad/…); does not change matching.
    pub special: bool,
    /// Matched in the normalised (NFC + lowercased) text against its normalised content, instead
    /// of case-sensitively in the raw text.
    pub normalized: bool,
    /// Strip whitespace left of the token (with CLIP whitespace never yields ids anyway).
    pub lstrip: bool,
    /// See `lstrip`.
    pub rstrip: bool,
    /// Only match when not preceded or followed by a word character (regex `\w`).
    pub single_word: bool,
}

/// An added-token description before it gets an id (a `tokenizers.AddedToken`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenSpec {
    content: String,
    special: bool,
    normalized: bool,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

impl TokenSpec {
    /// The crate's `AddedToken` with these flags.
    fn to_added(&self) -> tokenizers::AddedToken {
        tokenizers::AddedToken::from(self.content.clone(), self.special)
            .normalized(self.normalized)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .single_word(self.single_word)
    }

    /// A special token given as a plain string (`AddedToken(s, special=True)`: not normalised).
    fn special_str(content: &str) -> Self {
        TokenSpec {
            content: content.to_string(),
            special: true,
            normalized: false,
            lstrip: false,
            rstrip: false,
            single_word: false,
        }
    }

    /// Parses an `AddedToken` JSON object. `special` defaults to `default_special`, `normalized`
    /// to `!special` (the `tokenizers` defaults).
    fn from_json(v: &Map<String, Value>, default_special: bool, what: &str) -> Result<Self> {
        let content = v
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("{what}: expected an object with a string \"content\""))?;
        let flag = |name: &str, default: bool| -> Result<bool> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => bail!("{what}: \"{name}\" must be true or false, got {other}"),
            }
        };
        let special = flag("special", default_special)?;
        Ok(TokenSpec {
            content: content.to_string(),
            special,
            normalized: flag("normalized", !special)?,
            lstrip: flag("lstrip", false)?,
            rstrip: flag("rstrip", false)?,
            single_word: flag("single_word", false)?,
        })
    }
}

/// A special-token value as transformers holds it: a plain string or an `AddedToken`.
/// (Equality is Python's: str == str by text, AddedToken == AddedToken by all fields,
/// str != AddedToken.)
#[derive(Debug, Clone, PartialEq, Eq)]
enum TokenValue {
    Str(String),
    Tok(TokenSpec),
}

impl TokenValue {
    fn content(&self) -> &str {
        match self {
            TokenValue::Str(s) => s,
            TokenValue::Tok(t) => &t.content,
        }
    }

    /// Parses a special-token entry of `tokenizer_config.json` / `special_tokens_map.json`;
    /// `None` for JSON null.
    fn from_json(v: &Value, default_special: bool, what: &str) -> Result<Option<Self>> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(TokenValue::Str(s.clone()))),
            Value::Object(m) => Ok(Some(TokenValue::Tok(TokenSpec::from_json(m, default_special, what)?))),
            other => bail!("{what}: expected a string or an AddedToken object, got {other}"),
        }
    }
}

/// CLIP byte-level BPE tokenizer matching transformers 5.24.0 `CLIPTokenizer` on ids.
#[derive(Clone)]
pub struct ClipTokenizer {
    tk: Tokenizer,
    /// The added tokens as the crate holds them, by id (kept for [`Self::added_tokens`]).
    added: Vec<AddedToken>,
    bos_token: String,
    eos_token: String,
    pad_token: String,
    bos_id: i64,
    eos_id: i64,
    pad_id: i64,
    model_max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("added", &self.added)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("model_max_length", &self.model_max_length)
            .finish()
    }
}

/// BPE merges in rank order.
type Merges = Vec<(String, String)>;
/// Serialised added tokens `(id, token)`.
type SerializedAdded = Vec<(u64, TokenSpec)>;

/// Where the tokenizer files are read from: a folder, or the SD-1.x CLIP tokenizer built into
/// the binary (`assets/tokenizer/`, used for single-file checkpoints without `--config`).
#[derive(Clone, Copy)]
enum Files<'a> {
    Dir(&'a Path),
    /// `assets/tokenizer/`, with SD-2.x's `special_tokens_map.json` (pad `"!"`) when `sd2`.
    Builtin {
        sd2: bool,
    },
}

/// `assets/tokenizer/`: OpenAI's CLIP vocabulary and merges (MIT, see `assets/README.md`) with
/// the `tokenizer_config.json` and `special_tokens_map.json` of SD-1.x repositories.
const BUILTIN: [(&str, &str); 4] = [
    ("vocab.json", include_str!("../assets/tokenizer/vocab.json")),
    ("merges.txt", include_str!("../assets/tokenizer/merges.txt")),
    ("tokenizer_config.json", include_str!("../assets/tokenizer/tokenizer_config.json")),
    ("special_tokens_map.json", include_str!("../assets/tokenizer/special_tokens_map.json")),
];

/// SD-2.x's `special_tokens_map.json` (`assets/tokenizer-sd2/`): the same vocabulary, merges and
/// `tokenizer_config.json`, with pad `"!"` (id 0) as stabilityai/stable-diffusion-2-1 ships it.
const SD2_SPECIAL_TOKENS_MAP: &str = include_str!("../assets/tokenizer-sd2/special_tokens_map.json");

impl Files<'_> {
    fn builtin(sd2: bool, name: &str) -> Option<&'static str> {
        if sd2 && name == "special_tokens_map.json" {
            return Some(SD2_SPECIAL_TOKENS_MAP);
        }
        BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }

    /// The file's name in messages.
    fn label(&self, name: &str) -> String {
        match self {
            Files::Dir(d) => d.join(name).display().to_string(),
            Files::Builtin { sd2: true } if name == "special_tokens_map.json" => {
                format!("<built-in assets/tokenizer-sd2/{name}>")
            }
            Files::Builtin { .. } => format!("<built-in assets/tokenizer/{name}>"),
        }
    }

    /// The folder in messages.
    fn folder(&self) -> String {
        match self {
            Files::Dir(d) => d.display().to_string(),
            Files::Builtin { .. } => "<built-in assets/tokenizer>".into(),
        }
    }

    /// The text of a file, `None` when it does not exist.
    fn read(&self, name: &str) -> Result<Option<String>> {
        match self {
            Files::Dir(d) => {
                let path = d.join(name);
                if !path.is_file() {
                    return Ok(None);
                }
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
                Ok(Some(text))
            }
            Files::Builtin { sd2 } => Ok(Files::builtin(*sd2, name).map(str::to_string)),
        }
    }

    fn exists(&self, name: &str) -> bool {
        match self {
            Files::Dir(d) => d.join(name).is_file(),
            Files::Builtin { sd2 } => Files::builtin(*sd2, name).is_some(),
        }
    }
}

/// Reads a JSON file that must hold an object, if it exists.
fn read_optional_object(files: Files, name: &str) -> Result<Option<Map<String, Value>>> {
    let Some(text) = files.read(name)? else { return Ok(None) };
    let what = files.label(name);
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => bail!("{what}: expected a JSON object"),
        Err(e) => bail!("{what} is not valid JSON: {e}"),
    }
}

/// Parses a `{token: id}` vocabulary object.
fn parse_vocab(v: &Map<String, Value>, what: &str) -> Result<Vocab> {
    let mut vocab = Vocab::with_capacity(v.len());
    for (token, id) in v {
        let id = id
            .as_u64()
            .filter(|&i| i <= u32::MAX as u64)
            .ok_or_else(|| anyhow!("{what}: id of token {token:?} must be a non-negative integer, got {id}"))?;
        vocab.insert(token.clone(), id as u32);
    }
    Ok(vocab)
}

/// Reads `vocab.json` + `merges.txt`.
fn read_vocab_merges(files: Files) -> Result<(Vocab, Merges, String)> {
    for name in ["vocab.json", "merges.txt"] {
        if !files.exists(name) {
            bail!(
                "tokenizer folder {}: missing {name} (expected vocab.json + merges.txt, or tokenizer.json)",
                files.folder()
            );
        }
    }
    let vocab_obj = read_optional_object(files, "vocab.json")?
        .ok_or_else(|| anyhow!("cannot read {}", files.label("vocab.json")))?;
    let vocab = parse_vocab(&vocab_obj, &files.label("vocab.json"))?;
    let merges_what = files.label("merges.txt");
    let text = files.read("merges.txt")?.ok_or_else(|| anyhow!("cannot read {merges_what}"))?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        // Same rule as `tokenizers`: "#version" lines are skipped, every other line (blank lines
        // included) must be exactly two symbols separated by one space.
        if line.starts_with("#version") {
            continue;
        }
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 2 {
            bail!(
                "{merges_what}: line {}: malformed merge {line:?} (expected two symbols separated by one space)",
                i + 1
            );
        }
        merges.push((parts[0].to_string(), parts[1].to_string()));
    }
    Ok((vocab, merges, merges_what))
}

/// Reads the BPE model (through the crate) and the serialised added tokens of a
/// `tokenizer.json`. Its normaliser/pre-tokeniser/post-processor are not read, and the BPE
/// options are reset: transformers' `CLIPTokenizer` rebuilds its own pipeline and only takes
/// vocab, merges and added tokens from the file.
fn read_tokenizer_json(files: Files, unk: &str) -> Result<(BPE, SerializedAdded)> {
    let what = files.label("tokenizer.json");
    let root = read_optional_object(files, "tokenizer.json")?.ok_or_else(|| anyhow!("cannot read {what}"))?;
    let mut model = root
        .get("model")
        .and_then(Value::as_object)
        .cloned()
        .ok_or_else(|| anyhow!("{what}: expected a \"model\" object"))?;
    match model.get("type").and_then(Value::as_str) {
        Some("BPE") | None => {}
        Some(other) => bail!("{what}: model.type is {other:?}, expected \"BPE\" (CLIP byte-level BPE)"),
    }
    let has_unk = model.get("vocab").and_then(Value::as_object).is_some_and(|v| v.contains_key(unk));
    for (k, v) in [
        ("type", Value::from("BPE")),
        ("dropout", Value::Null),
        ("unk_token", if has_unk { Value::from(unk) } else { Value::Null }),
        ("continuing_subword_prefix", Value::from("")),
        ("end_of_word_suffix", Value::from(END_OF_WORD)),
        ("fuse_unk", Value::from(false)),
        ("byte_fallback", Value::from(false)),
        ("ignore_merges", Value::from(false)),
    ] {
        model.insert(k.to_string(), v);
    }
    // Through text: the crate's BPE deserialiser borrows its strings.
    let bpe: BPE = serde_json::from_str(&Value::Object(model).to_string())
        .map_err(|e| anyhow!("{what}: model is not a valid BPE (vocab {{token: id}}, merges): {e}"))?;
    let mut added = Vec::new();
    if let Some(list) = root.get("added_tokens") {
        let list = list.as_array().ok_or_else(|| anyhow!("{what}: expected \"added_tokens\" to be a list"))?;
        for (i, t) in list.iter().enumerate() {
            let ctx = format!("{what}: added_tokens[{i}]");
            let obj = t.as_object().ok_or_else(|| anyhow!("{ctx}: expected an object"))?;
            let id = obj
                .get("id")
                .and_then(Value::as_u64)
                .ok_or_else(|| anyhow!("{ctx}: expected a non-negative integer \"id\""))?;
            added.push((id, TokenSpec::from_json(obj, false, &ctx)?));
        }
    }
    Ok((bpe, added))
}

/// Builds the BPE model from `vocab.json` + `merges.txt`, checking every merge against the
/// vocabulary first (so the error names the file, the merge and the symbol).
fn bpe_from_vocab_merges(files: Files, unk: &str) -> Result<BPE> {
    let (vocab, merges, merges_what) = read_vocab_merges(files)?;
    for (rank, (a, b)) in merges.iter().enumerate() {
        for s in [a.clone(), b.clone(), format!("{a}{b}")] {
            if !vocab.contains_key(&s) {
                bail!("{merges_what}: merge #{} ({a:?} {b:?}): {s:?} is not in the vocabulary", rank + 1);
            }
        }
    }
    let has_unk = vocab.contains_key(unk);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(END_OF_WORD.to_string());
    if has_unk {
        builder = builder.unk_token(unk.to_string());
    }
    builder.build().map_err(|e| anyhow!("{merges_what}: cannot build the BPE model: {e}"))
}

/// The CLIP normaliser (`Sequence[NFC, Replace(\s+ → " "), Lowercase]`).
fn clip_normalizer() -> NormalizerWrapper {
    let replace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").expect("the \\s+ pattern compiles");
    NormSequence::new(vec![NFC.into(), replace.into(), Lowercase.into()]).into()
}

/// CLIP's normaliser as the crate applies it: NFC, `\s+` → `" "`, lowercase.
pub fn normalize(text: &str) -> String {
    let mut s = NormalizedString::from(text);
    // NFC, a regex replace without look-arounds and lowercasing cannot fail.
    clip_normalizer().normalize(&mut s).expect("the CLIP normaliser does not fail");
    s.get().to_string()
}

/// An error of the crate as an `anyhow` error.
fn tk_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{e}")
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` when present (as transformers prefers it),
    /// else `vocab.json` + `merges.txt`; plus the optional `tokenizer_config.json` and
    /// `special_tokens_map.json`.
    ///
    /// Special tokens are set up as transformers 5.24 does it:
    /// - bos/eos/unk/sep/pad/cls/mask come from `tokenizer_config.json`, overridden key by key
    ///   by `special_tokens_map.json` (SD-2.x's pad `"!"` lives there); missing ones default to
    ///   `<|startoftext|>` (bos) and `<|endoftext|>` (eos, unk, pad). When
    ///   `tokenizer_config.json` has `added_tokens_decoder`, `special_tokens_map.json` is not read.
    /// - Added tokens, in order: `added_tokens_decoder` (or else `tokenizer.json`'s
    ///   `added_tokens`) by id, then each special token not already listed, then
    ///   `extra_special_tokens` (or `additional_special_tokens`). A plain-string special token is
    ///   a non-normalised special token; an object keeps its flags. When a content is listed
    ///   twice, the later flags win. A token in the vocabulary keeps its id; others get the next
    ///   free id (the crate's `add_tokens`).
    /// - `model_max_length` from `tokenizer_config.json`; 77 when absent or above 1e6.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("tokenizer folder {} does not exist", dir.display());
        }
        Self::from_files(Files::Dir(dir))
    }

    /// The SD-1.x CLIP tokenizer kept in the repository (`assets/tokenizer/`, built into the
    /// binary): what single-file checkpoints use without `--config`.
    pub fn sd15() -> Result<Self> {
        Self::from_files(Files::Builtin { sd2: false })
    }

    /// SD-2.x's tokenizer: [`sd15`](Self::sd15)'s files with pad `"!"` (id 0) — what
    /// single-file SD-2.x checkpoints use without `--config`.
    pub fn sd2() -> Result<Self> {
        Self::from_files(Files::Builtin { sd2: true })
    }

    fn from_files(files: Files) -> Result<Self> {
        let tc = read_optional_object(files, "tokenizer_config.json")?.unwrap_or_default();
        let has_atd = tc.contains_key("added_tokens_decoder");
        let stm = if has_atd { None } else { read_optional_object(files, "special_tokens_map.json")? };

        // Special-token values: tokenizer_config.json, then special_tokens_map.json per key.
        let tc_what = files.label("tokenizer_config.json");
        let stm_what = files.label("special_tokens_map.json");
        let mut values: HashMap<&str, TokenValue> = HashMap::new();
        for key in SPECIAL_KEYS {
            if let Some(v) = tc.get(key) {
                if let Some(v) = TokenValue::from_json(v, false, &format!("{tc_what}: {key}"))? {
                    values.insert(key, v);
                }
            }
            if let Some(v) = stm.as_ref().and_then(|m| m.get(key)) {
                if let Some(v) = TokenValue::from_json(v, true, &format!("{stm_what}: {key}"))? {
                    values.insert(key, v);
                }
            }
        }
        for (key, default) in [
            ("bos_token", "<|startoftext|>"),
            ("eos_token", "<|endoftext|>"),
            ("unk_token", "<|endoftext|>"),
            ("pad_token", "<|endoftext|>"),
        ] {
            values.entry(key).or_insert_with(|| TokenValue::Str(default.to_string()));
        }
        let content_of = |key: &str| values.get(key).map(|v| v.content().to_string()).unwrap_or_default();
        let unk = content_of("unk_token");

        let (bpe, tj_added) = if files.exists("tokenizer.json") {
            let (bpe, added) = read_tokenizer_json(files, &unk)?;
            (bpe, Some(added))
        } else {
            (bpe_from_vocab_merges(files, &unk)?, None)
        };

        let mut extras: Vec<TokenValue> = Vec::new();
        for key in ["extra_special_tokens", "additional_special_tokens"] {
            let (list, from_stm, file) = match stm.as_ref().and_then(|m| m.get(key)) {
                Some(v) => (Some(v), true, &stm_what),
                None => (tc.get(key), false, &tc_what),
            };
            if let Some(list) = list.and_then(Value::as_array) {
                for (i, t) in list.iter().enumerate() {
                    if let Some(t) = TokenValue::from_json(t, from_stm, &format!("{file}: {key}[{i}]"))? {
                        extras.push(t);
                    }
                }
            }
            if !extras.is_empty() {
                break;
            }
        }

        // The serialised added tokens.
        let mut decoder_tokens: SerializedAdded = Vec::new();
        if has_atd {
            let atd = tc
                .get("added_tokens_decoder")
                .and_then(Value::as_object)
                .ok_or_else(|| anyhow!("{tc_what}: expected added_tokens_decoder to be an object {{id: token}}"))?;
            for (id, t) in atd {
                let ctx = format!("{tc_what}: added_tokens_decoder[{id}]");
                let id: u64 = id.parse().map_err(|_| anyhow!("{ctx}: the key must be an integer id"))?;
                let obj = t.as_object().ok_or_else(|| anyhow!("{ctx}: expected an AddedToken object"))?;
                decoder_tokens.push((id, TokenSpec::from_json(obj, false, &ctx)?));
            }
        } else if let Some(a) = tj_added {
            decoder_tokens = a;
        }
        decoder_tokens.sort_by_key(|(id, _)| *id);

        let decoder_contents: HashSet<String> = decoder_tokens.iter().map(|(_, t)| t.content.clone()).collect();
        let mut to_add: Vec<TokenValue> = decoder_tokens.into_iter().map(|(_, t)| TokenValue::Tok(t)).collect();
        for v in SPECIAL_KEYS.iter().filter_map(|k| values.get(k)).chain(extras.iter()) {
            if !decoder_contents.contains(v.content()) && !to_add.contains(v) {
                to_add.push(v.clone());
            }
        }
        let named: HashSet<&str> = values.values().map(TokenValue::content).collect();

        let mut tk = Tokenizer::new(bpe);
        // The normaliser first: the crate normalises `normalized` added tokens when they are added.
        tk.with_normalizer(Some(clip_normalizer())).map_err(tk_err)?;
        let split = Split::new(SplitPattern::Regex(SPLIT_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| anyhow!("CLIP split regex: {e}"))?;
        tk.with_pre_tokenizer(Some(PreSequence::new(vec![split.into(), ByteLevel::new(false, true, true).into()])));
        tk.with_decoder(Some(ByteLevelDecoder::default()));
        // One by one, in transformers' order: later flags for the same content win.
        for v in to_add {
            let spec = match v {
                TokenValue::Str(s) => TokenSpec::special_str(&s),
                TokenValue::Tok(mut t) => {
                    if !t.special && named.contains(t.content.as_str()) {
                        t.special = true;
                    }
                    t
                }
            };
            tk.add_tokens([spec.to_added()]).map_err(tk_err)?;
        }
        let id_of = |name: &str, key: &str| {
            tk.token_to_id(name)
                .map(i64::from)
                .ok_or_else(|| anyhow!("tokenizer folder {}: {key} {name:?} has no id", files.folder()))
        };
        let (bos_token, eos_token, pad_token) =
            (content_of("bos_token"), content_of("eos_token"), content_of("pad_token"));
        let bos_id = id_of(&bos_token, "bos_token")?;
        let eos_id = id_of(&eos_token, "eos_token")?;
        let pad_id = id_of(&pad_token, "pad_token")?;
        tk.with_post_processor(Some(
            RobertaProcessing::new((eos_token.clone(), eos_id as u32), (bos_token.clone(), bos_id as u32))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        let mut tok = ClipTokenizer {
            tk,
            added: Vec::new(),
            bos_token,
            eos_token,
            pad_token,
            bos_id,
            eos_id,
            pad_id,
            model_max_length: model_max_length(&tc, &tc_what)?,
        };
        tok.refresh_added();
        Ok(tok)
    }

    /// Mirrors the crate's added vocabulary into `self.added` (by id).
    fn refresh_added(&mut self) {
        let mut added: Vec<AddedToken> = self
            .tk
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| AddedToken {
                content: t.content,
                id: id as i64,
                special: t.special,
                normalized: t.normalized,
                lstrip: t.lstrip,
                rstrip: t.rstrip,
                single_word: t.single_word,
            })
            .collect();
        added.sort_by_key(|t| t.id);
        self.added = added;
    }

    /// Adds new tokens (textual inversion), like `tokenizer.add_tokens([...])` in diffusers'
    /// `load_textual_inversion`: they get ids `vocab_size()`, `vocab_size() + 1`, … and are
    /// matched in the normalised text (case-insensitively, anywhere, also inside words).
    ///
    /// Errors, adding nothing, when a token is empty, repeated in `tokens`, or already in the
    /// vocabulary or among the added tokens (as diffusers refuses it).
    pub fn add_tokens(&mut self, tokens: &[&str]) -> Result<Vec<i64>> {
        let mut seen = HashSet::new();
        for &t in tokens {
            if t.is_empty() {
                bail!("cannot add an empty token");
            }
            if self.token_to_id(t).is_some() {
                bail!("token {t:?} already in tokenizer vocabulary; choose a different token name");
            }
            if !seen.insert(t) {
                bail!("token {t:?} given twice");
            }
        }
        let added: Vec<tokenizers::AddedToken> =
            tokens.iter().map(|&t| tokenizers::AddedToken::from(t, false).normalized(true)).collect();
        self.tk.add_tokens(added).map_err(tk_err)?;
        self.refresh_added();
        tokens.iter().map(|t| self.token_to_id(t).ok_or_else(|| anyhow!("token {t:?} was not added"))).collect()
    }

    /// Encodes with the crate. The pipeline built in [`Self::from_dir`] has no failing step: the
    /// regexes have no look-arounds (no backtracking limit) and the unknown token is only set
    /// when the vocabulary has it.
    fn ids(&self, text: &str, with_bos_eos: bool) -> Vec<i64> {
        let enc = self.tk.encode(text, with_bos_eos).expect("the CLIP pipeline does not fail");
        enc.get_ids().iter().map(|&i| i64::from(i)).collect()
    }

    /// Token ids of `text` without bos/eos.
    pub fn encode_content(&self, text: &str) -> Vec<i64> {
        self.ids(text, false)
    }

    /// `bos`, the ids of `text`, `eos`: no padding, no truncation
    /// (`tokenizer(text).input_ids`).
    pub fn encode(&self, text: &str) -> Vec<i64> {
        self.ids(text, true)
    }

    /// Exactly `model_max_length` ids, as
    /// `tokenizer(text, padding="max_length", max_length=model_max_length, truncation=True)`:
    /// content cut to `model_max_length - 2` tokens, then `bos … eos`, then pad ids.
    pub fn encode_padded(&self, text: &str) -> Encoded {
        let max = self.model_max_length;
        let mut content = self.encode_content(text);
        let room = max.saturating_sub(2);
        let truncated = content.len() > room;
        content.truncate(room);
        let mut ids = Vec::with_capacity(max);
        ids.push(self.bos_id);
        ids.extend(content);
        ids.push(self.eos_id);
        let n_tokens = ids.len();
        ids.resize(max, self.pad_id);
        Encoded { ids, truncated, n_tokens }
    }

    /// Best-effort text of `ids` (for debugging), like `tokenizer.decode(ids)`: the crate's
    /// ByteLevel decoding, then `</w>` → space, trimmed; special tokens kept, unknown ids
    /// skipped.
    pub fn decode(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        let text = self.tk.decode(&ids, false).unwrap_or_default();
        text.replace(END_OF_WORD, " ").trim().to_string()
    }

    /// Number of distinct tokens, added tokens included (`len(tokenizer)`), i.e. the number of
    /// rows the text encoder's token embedding needs.
    pub fn vocab_size(&self) -> usize {
        self.tk.get_vocab_size(true)
    }

    /// Id of a token string (added tokens first, then the model vocabulary; `"dog</w>"`, not
    /// `"dog"`, for a whole word).
    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.tk.token_to_id(token).map(i64::from)
    }

    /// Token string of an id: an added token as it was added (`"Sks"`; the crate would give its
    /// normalised form), else the model's, in byte-level form (`"Ã©</w>"` for `é`).
    pub fn id_to_token(&self, id: i64) -> Option<String> {
        if let Ok(i) = self.added.binary_search_by_key(&id, |t| t.id) {
            return Some(self.added[i].content.clone());
        }
        u32::try_from(id).ok().and_then(|id| self.tk.id_to_token(id))
    }

    /// Sequence length of [`encode_padded`](Self::encode_padded) (77 for CLIP).
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    pub fn bos_id(&self) -> i64 {
        self.bos_id
    }

    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    /// Pad id: 49407 (`<|endoftext|>`) on SD-1.x, 0 (`!`) on SD-2.x.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    pub fn pad_token(&self) -> &str {
        &self.pad_token
    }

    /// The added tokens (special tokens and textual-inversion tokens), by id.
    pub fn added_tokens(&self) -> &[AddedToken] {
        &self.added
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tk
    }
}

/// `model_max_length` of `tokenizer_config.json`.
fn model_max_length(tc: &Map<String, Value>, what: &str) -> Result<usize> {
    match tc.get("model_max_length") {
        None | Some(Value::Null) => Ok(DEFAULT_MODEL_MAX_LENGTH),
        Some(v) => {
            let x = v.as_f64().ok_or_else(|| anyhow!("{what}: model_max_length must be a number, got {v}"))?;
            if !x.is_finite() || x > MAX_SANE_MODEL_MAX_LENGTH {
                Ok(DEFAULT_MODEL_MAX_LENGTH)
            } else if x >= 2.0 && x.fract() == 0.0 {
                Ok(x as usize)
            } else {
                bail!("{what}: model_max_length must be an integer >= 2 (room for bos and eos), got {v}")
            }
        }
    }
}
