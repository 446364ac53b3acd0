//! [c, c_s]: splicing the subject embedding into the prompt's last n positions (§3.2), φ_s, and
//! the step-wise conditioning of Eq. 7.
//!
//! In the **input** space (default) c_s ∈ R^{n×d} replaces the last n *input token embeddings*
//! of the caption, then the text encoder runs: those positions are padding for any short
//! caption, identical to the empty prompt's, so c_s = φ_s gives exactly the caption's own
//! conditioning ("[c, c_s] = c if c_s is not optimized"). With causal attention c_s shapes only
//! the last n outputs, which also see the caption. In the **output** space c_s replaces the last
//! n rows of the encoder's output directly (no gradient through the encoder).
//!
//! On SDXL c_s is the pair (c_s for encoder 1, c_s for encoder 2) side by side, n × (d₁ + d₂):
//! in the input space each half replaces the last n input embeddings of its own encoder; in
//! the output space c_s replaces the last n rows of the concatenated penultimate states, which
//! is the same thing per half. φ_s is the empty prompt's pair, so ‖c_s − φ_s‖² regularises each
//! half to its own φ_s. The pooled `text_embeds` (taken at the caption's <eos>, before the last n
//! positions, under causal attention) do not see c_s.

use super::file::Subject;
use super::Space;
use crate::models::clip_text::ClipTextModel;
use crate::pipeline::{GenerateRequest, StableDiffusion, StepCond, StepConditioning, TextCond};
use crate::scheduler::DdimScheduler;
use anyhow::{bail, Result};
use tch::Tensor;

/// Replaces the last n rows of `x` (B, L, d) with `c_s` (n, d) → (B, L, d).
pub fn replace_last(x: &Tensor, c_s: &Tensor) -> Tensor {
    let (b, l, d) = x.size3().expect("(B, L, d)");
    let n = c_s.size()[0];
    let head = x.narrow(1, 0, l - n); // (B, L−n, d)
    Tensor::cat(&[head, c_s.unsqueeze(0).expand([b, n, d], false).to_kind(x.kind())], 1)
}

/// [c, c_s] for caption ids (B, 77): the UNet's encoder hidden states (B, 77, d).
pub fn splice(te: &ClipTextModel, ids: &Tensor, c_s: &Tensor, space: Space) -> Tensor {
    match space {
        Space::Input => te.forward_embeds(&replace_last(&te.token_embedding(ids), c_s)),
        Space::Output => replace_last(&te.forward(ids), c_s),
    }
}

/// φ_s: the last n rows of the empty prompt `empty_ids` (1, 77) in the given space (n, d).
pub fn phi_s(te: &ClipTextModel, empty_ids: &Tensor, n: i64, space: Space) -> Tensor {
    let x = match space {
        Space::Input => te.token_embedding(empty_ids),
        Space::Output => te.forward(empty_ids),
    }; // (1, 77, d)
    let l = x.size()[1];
    x.narrow(1, l - n, n).squeeze_dim(0).detach()
}

/// [c, c_s] for any model: each tokenizer's caption ids (B, 77) (one, or two for SDXL) →
/// (the UNet's encoder hidden states (B, 77, Σd), SDXL's pooled `text_embeds` (B, P)). For
/// SD-1.x / 2.x it is [`splice`], operation for operation.
pub fn splice_sd(sd: &StableDiffusion, ids: &[Tensor], c_s: &Tensor, space: Space) -> (Tensor, Option<Tensor>) {
    if !sd.is_xl() {
        return (splice(&sd.text_encoder, &ids[0], c_s, space), None);
    }
    match space {
        Space::Input => sd.encode_embeds(&replace_last(&sd.token_embeddings(ids), c_s), ids),
        Space::Output => {
            let (h, pooled) = sd.encode_ids(ids);
            (replace_last(&h, c_s), pooled)
        }
    }
}

/// φ_s for any model: the last n rows (n, Σd) of the empty prompt's ids (one per tokenizer) in
/// the given space; for SD-1.x / 2.x it is [`phi_s`].
pub fn phi_s_sd(sd: &StableDiffusion, empty_ids: &[Tensor], n: i64, space: Space) -> Tensor {
    if !sd.is_xl() {
        return phi_s(&sd.text_encoder, &empty_ids[0], n, space);
    }
    let x = match space {
        Space::Input => sd.token_embeddings(empty_ids),
        Space::Output => sd.encode_ids(empty_ids).0,
    }; // (1, 77, d₁ + d₂)
    let l = x.size()[1];
    x.narrow(1, l - n, n).squeeze_dim(0).detach()
}

/// Checks that a caption leaves its last n positions to c_s (they must be padding).
pub fn check_room(n_tokens: usize, n: i64, max_len: i64, caption: &str) -> Result<()> {
    if n_tokens as i64 + n > max_len {
        bail!(
            "the caption {caption:?} takes {n_tokens} of CLIP's {max_len} positions (with <bos> and <eos>), which \
             leaves room for at most {} subject tokens, not {n}: lower --tokens",
            (max_len - n_tokens as i64).max(0)
        );
    }
    Ok(())
}

/// Eq. 7's conditioning: step t uses [c, c_s^t] in the conditional branch and φ in the
/// unconditional one. `per_step[i]` is c_s^t for DDIM step i (all equal to c_s when the file
/// has no step-wise embeddings).
pub struct SubjectSteps<'a> {
    pub sd: &'a StableDiffusion,
    /// The prompt's ids (1, 77), one per tokenizer.
    pub ids: Vec<Tensor>,
    pub per_step: Vec<Tensor>,
    pub space: Space,
    /// φ (or the negative prompt), (1, 77, d), with SDXL's pooled embeds (1, P).
    pub uncond: TextCond,
    /// SDXL: the image size of the `time_ids`; the model's default until set.
    pub size: (i64, i64),
    /// Images per prompt.
    pub batch: i64,
}

impl StepConditioning for SubjectSteps<'_> {
    fn at(&mut self, index: usize, _t: i64) -> Result<StepCond> {
        let Some(c_s) = self.per_step.get(index) else {
            bail!("no subject embedding for DDIM step {index}");
        };
        let (hidden, pooled) = splice_sd(self.sd, &self.ids, c_s, self.space);
        let (h, w) = self.size;
        Ok(self.sd.step_cond(&TextCond { hidden, pooled }.repeat(self.batch), &self.uncond.repeat(self.batch), h, w))
    }
}

impl<'a> SubjectSteps<'a> {
    /// Eq. 7's per-step conditioning for a prompt and a learned subject: checks the width of
    /// c_s against the text encoder(s) and that the prompt leaves the last n positions free.
    pub fn new(
        sd: &'a StableDiffusion,
        prompt: &str,
        subject: &Subject,
        sched: &DdimScheduler,
        uncond: impl Into<TextCond>,
        batch: i64,
    ) -> Result<Self> {
        let d = sd.cond_width();
        if subject.c_s.size()[1] != d {
            bail!(
                "the subject's embeddings have width {}, but this model's text conditioning has {d}{}",
                subject.c_s.size()[1],
                if sd.is_xl() { " (SDXL: both encoders side by side)" } else { "" }
            );
        }
        let ids = sd.tokenize_each(prompt);
        let n_tokens = sd.tokenizer.encode_padded(prompt).n_tokens;
        check_room(n_tokens, subject.n_tokens(), sd.tokenizer.model_max_length() as i64, prompt)?;
        let per_step = subject.per_step(&sched.timesteps).into_iter().map(|t| t.to_device(sd.device)).collect();
        let uncond: TextCond = uncond.into();
        if sd.is_xl() != uncond.pooled.is_some() {
            bail!(
                "internal: φ {} pooled embeds for {} model",
                if sd.is_xl() { "lacks" } else { "has" },
                if sd.is_xl() { "an SDXL" } else { "an SD-1.x / 2.x" }
            );
        }
        Ok(Self { sd, ids, per_step, space: subject.space, uncond, size: sd.default_hw(), batch })
    }

    /// For images of `height` × `width` (SDXL's `time_ids`; the model's default size until set).
    pub fn at_size(mut self, height: i64, width: i64) -> Self {
        self.size = (height, width);
        self
    }
}

/// Text-to-image, with a learned subject conditioning each step by Eq. 7:
/// x_{t−1} = F^(t)(x_t, [c, c_s^t], φ); without one, plain [`StableDiffusion::generate`].
pub fn generate(sd: &StableDiffusion, req: &GenerateRequest, subject: Option<&Subject>) -> Result<Tensor> {
    match subject {
        None => sd.generate(req),
        Some(s) => sd.generate_conditioned(req, &mut |sched, uncond, n| {
            Ok(Box::new(SubjectSteps::new(sd, &req.prompt, s, sched, uncond, n)?.at_size(req.height, req.width)))
        }),
    }
}
