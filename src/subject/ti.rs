//! Classic textual inversion (Gal et al.), the paper's baseline: n new tokens `<name>`,
//! `<name>_1`, … whose input embeddings are learned; and using such embeddings at generation
//! exactly as diffusers' `load_textual_inversion` + `maybe_convert_prompt` do.

use super::file::{read_learned_embeds, read_learned_embeds_xl};
use crate::models::clip_text::ClipTextModel;
use crate::pipeline::StableDiffusion;
use anyhow::{bail, Result};
use std::path::Path;
use tch::Tensor;

/// The token strings of an n-vector embedding, as diffusers names them:
/// `<name>`, `<name>_1`, …, `<name>_{n−1}`.
pub fn expanded_tokens(token: &str, n: i64) -> Vec<String> {
    std::iter::once(token.to_string()).chain((1..n).map(|i| format!("{token}_{i}"))).collect()
}

/// A textual-inversion embedding loaded into a model.
#[derive(Debug, Clone)]
pub struct LoadedToken {
    pub token: String,
    pub n: i64,
    pub ids: Vec<i64>,
}

/// Loads a `learned_embeds.safetensors` into the tokenizer and text encoder, as diffusers'
/// `load_textual_inversion`: the n tokens are added to the tokenizer and their rows appended
/// to the token-embedding matrix. On SDXL the embedding has a part per encoder
/// ([`read_learned_embeds_xl`]) and each is loaded into its own tokenizer and encoder, as
/// diffusers' docs load one (`load_textual_inversion(…, text_encoder=…_2, tokenizer=…_2)`).
pub fn load_embedding(sd: &mut StableDiffusion, path: &Path, token: Option<&str>) -> Result<LoadedToken> {
    if sd.xl.is_some() {
        return load_embedding_xl(sd, path, token);
    }
    let (token, rows) = read_learned_embeds(path, token)?;
    let d = sd.text_encoder.hidden_size();
    if rows.size()[1] != d {
        bail!(
            "{}: embedding {token} has width {}, but this model's text encoder has {d}",
            path.display(),
            rows.size()[1]
        );
    }
    let n = rows.size()[0];
    let names = expanded_tokens(&token, n);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let ids = sd.tokenizer.add_tokens(&refs)?;
    let te_ids = sd.text_encoder.append_token_embeddings(&rows.to_device(sd.device))?;
    if ids != te_ids {
        bail!("tokenizer and text encoder disagree on the new token ids ({ids:?} vs {te_ids:?})");
    }
    Ok(LoadedToken { token, n, ids })
}

fn load_embedding_xl(sd: &mut StableDiffusion, path: &Path, token: Option<&str>) -> Result<LoadedToken> {
    let (token, rows_1, rows_2) = read_learned_embeds_xl(path, token)?;
    let xl = sd.xl.as_mut().expect("an SDXL model");
    for (what, rows, d) in
        [("clip_l", &rows_1, sd.text_encoder.hidden_size()), ("clip_g", &rows_2, xl.text_encoder_2.hidden_size())]
    {
        if rows.size()[1] != d {
            bail!(
                "{}: the {what} part of embedding {token} has width {}, but its text encoder has {d}",
                path.display(),
                rows.size()[1]
            );
        }
    }
    let n = rows_1.size()[0];
    let names = expanded_tokens(&token, n);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let ids = sd.tokenizer.add_tokens(&refs)?;
    let te_ids = sd.text_encoder.append_token_embeddings(&rows_1.to_device(sd.device))?;
    let ids_2 = xl.tokenizer_2.add_tokens(&refs)?;
    let te_ids_2 = xl.text_encoder_2.append_token_embeddings(&rows_2.to_device(sd.device))?;
    if ids != te_ids || ids_2 != te_ids_2 {
        bail!(
            "tokenizers and text encoders disagree on the new token ids ({ids:?}, {te_ids:?}; {ids_2:?}, {te_ids_2:?})"
        );
    }
    Ok(LoadedToken { token, n, ids })
}

/// diffusers' `maybe_convert_prompt`: a multi-vector token that the prompt contains is
/// replaced (every occurrence, as `str.replace`) by `token token_1 … token_{n−1}`.
pub fn convert_prompt(sd: &StableDiffusion, prompt: &str, loaded: &[LoadedToken]) -> String {
    let ids = sd.tokenizer.encode(prompt);
    let mut out = prompt.to_string();
    for l in loaded {
        if l.n > 1 && ids.contains(&l.ids[0]) {
            out = out.replace(&l.token, &expanded_tokens(&l.token, l.n).join(" "));
        }
    }
    out
}

/// Input token embeddings (B, L, d) of `ids` where ids ≥ `base` index rows of `learned`
/// (n, d) instead of the embedding matrix — textual inversion's trainable tokens, without
/// touching the text encoder's weights. Gradients flow to `learned`.
pub fn embed_with_learned(sd: &StableDiffusion, ids: &Tensor, base: i64, learned: &Tensor) -> Tensor {
    embed_with_learned_in(&sd.text_encoder, ids, base, learned)
}

fn embed_with_learned_in(te: &ClipTextModel, ids: &Tensor, base: i64, learned: &Tensor) -> Tensor {
    let known = te.token_embedding(&ids.clamp_max(base - 1)); // (B, L, d)
    let (b, l, d) = known.size3().expect("(B, L, d)");
    let rows = learned.index_select(0, &(ids - base).clamp_min(0).view([-1])).view([b, l, d]); // (B, L, d)
    let is_new = ids.ge(base).unsqueeze(-1); // (B, L, 1)
    rows.where_self(&is_new, &known)
}

/// [`embed_with_learned`] for every encoder of the model: `ids` holds each tokenizer's ids, and
/// `learned` (n, Σd) each encoder's rows side by side (SDXL: encoder 1's d₁ columns, then
/// encoder 2's). The new tokens have the same ids in both tokenizers (`base` on).
pub fn embed_with_learned_each(sd: &StableDiffusion, ids: &[Tensor], base: i64, learned: &Tensor) -> Tensor {
    let Some(xl) = &sd.xl else {
        return embed_with_learned(sd, &ids[0], base, learned);
    };
    let d1 = sd.text_encoder.hidden_size();
    let d2 = xl.text_encoder_2.hidden_size();
    let parts = [
        embed_with_learned_in(&sd.text_encoder, &ids[0], base, &learned.narrow(1, 0, d1)),
        embed_with_learned_in(&xl.text_encoder_2, &ids[1], base, &learned.narrow(1, d1, d2)),
    ];
    Tensor::cat(&parts, -1)
}
