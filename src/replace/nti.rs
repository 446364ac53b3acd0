//! Null-text inversion (Mokady et al. 2023): the paper's Eq. 4 and the first two loops of
//! Algorithm 3.
//!
//! 1. *Pivotal inversion*: the photo's latent x_0* is inverted by DDIM with w = 1 under its
//!    caption c^r (Eq. 3, [`crate::guidance::invert`]): the pivots x_1* … x_T*.
//! 2. From x_T = x_T*, for t = T … 1: K Adam steps on φ_t (the unconditional encoder output,
//!    (1, 77, d)) minimising Eq. 4, ‖x*_{t−1} − F^(t)(x_t, c^r, φ_t)‖² (mean over the latent),
//!    under the *generation* guidance w. φ_t starts from φ*_{t+1} (φ_T from φ, the empty
//!    prompt). Then x_{t−1} = F^(t)(x_t, c^r, φ*_t): the trajectory an edit will follow, not the
//!    pivot.
//!
//! On SDXL φ_t is the unconditional branch's whole text conditioning, as φ_h of reference
//! guidance ([`crate::guidance::reference`]): both encoders' hidden states and the pooled
//! `text_embeds`, each optimised (Eq. 4 reads the whole latent, and the pooled embeds steer
//! every ResNet block through the added time embedding, so they take part in the fit).
//!
//! Defaults are the NTI authors' (`null_optimization` in their notebook): K = 10, a fresh Adam
//! per step with lr 1e-2·(1 − i/100) at sampling step i = 0 … T−1, and an early stop once a
//! step's loss (measured before its Adam update, then the update is still taken) falls below
//! 1e-5 + i·2e-5. The conditional ε_θ(x_t, t, c^r) does not depend on φ_t: it is computed once
//! per step, and only the φ_t branch takes gradients.

use crate::guidance::invert::Trajectory;
use crate::pipeline::{cfg, StableDiffusion, TextCond};
use crate::scheduler::DdimScheduler;
use crate::subject::adam::TextAdam;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// K, w and the NTI authors' learning-rate and early-stop schedules.
#[derive(Debug, Clone)]
pub struct NtiConfig {
    /// w: the classifier-free guidance scale the edit will be generated with.
    pub guidance: f64,
    /// K: Adam steps on φ_t per DDIM step (0 = plain DDIM inversion, the baseline).
    pub inner_steps: usize,
    /// lr at step i is `lr · (1 − i · lr_decay)`.
    pub lr: f64,
    pub lr_decay: f64,
    /// Early stop once the loss < `early_stop + i · early_stop_slope`.
    pub early_stop: f64,
    pub early_stop_slope: f64,
}

impl Default for NtiConfig {
    fn default() -> Self {
        Self { guidance: 7.5, inner_steps: 10, lr: 1e-2, lr_decay: 1e-2, early_stop: 1e-5, early_stop_slope: 2e-5 }
    }
}

impl NtiConfig {
    /// The learning rate of sampling step i.
    pub fn lr_at(&self, i: usize) -> f64 {
        self.lr * (1.0 - i as f64 * self.lr_decay)
    }

    /// The early-stop threshold of sampling step i.
    pub fn threshold_at(&self, i: usize) -> f64 {
        self.early_stop + i as f64 * self.early_stop_slope
    }

    /// With w ≤ 1 the guided ε is ε_c alone: φ_t gets no gradient and NTI cannot work.
    pub fn validate(&self) -> Result<()> {
        if self.inner_steps > 0 && self.guidance <= 1.0 {
            bail!(
                "null-text inversion needs --guidance > 1 (got {}): with w ≤ 1 the guided noise is the \
                 conditional branch alone, so the null-text embedding gets no gradient",
                self.guidance
            );
        }
        Ok(())
    }
}

/// What one DDIM step of the optimisation did.
#[derive(Debug, Clone)]
pub struct StepLog {
    pub t: i64,
    /// Eq. 4 before each Adam update taken at this step.
    pub losses: Vec<f64>,
    /// Eq. 4 at φ*_t, after the last update.
    pub final_loss: f64,
}

/// The result: where sampling starts and the per-step null-text embeddings.
pub struct NullTextInversion {
    /// x_T* (1, C, h, w).
    pub x_t: Tensor,
    /// φ*_t for each sampling step, in generation order (the largest t first), each (1, 77, d)
    /// (SDXL: with pooled embeds (1, P)).
    pub phi: Vec<TextCond>,
    pub timesteps: Vec<i64>,
    pub log: Vec<StepLog>,
    /// x_0 at the end of the NTI trajectory: the reconstruction's latent (1, C, h, w); None for an
    /// inversion read from a file (which holds x_T* and φ*_t only).
    pub x0: Option<Tensor>,
}

/// Eq. 4 at one step: mean (x*_{t−1} − F^(t)(x_t, c^r, φ_t))², with ε_c = ε_θ(x_t, t, c^r)
/// given (it does not depend on φ_t). Differentiable in `phi` (1, 77, d) (and SDXL's pooled embeds).
#[allow(clippy::too_many_arguments)]
pub fn nti_loss(
    sd: &StableDiffusion,
    sched: &DdimScheduler,
    x: &Tensor,
    t: i64,
    eps_c: &Tensor,
    phi: &TextCond,
    target: &Tensor,
    guidance: f64,
) -> Tensor {
    let x_prev = step_with(sd, sched, x, t, eps_c, phi, guidance);
    (x_prev - target).square().mean(Kind::Float)
}

/// F^(t)(x_t, c^r, φ) from the precomputed ε_c.
fn step_with(
    sd: &StableDiffusion,
    sched: &DdimScheduler,
    x: &Tensor,
    t: i64,
    eps_c: &Tensor,
    phi: &TextCond,
    guidance: f64,
) -> Tensor {
    let eps_u = sd.eps(x, t, phi, None);
    sched.step(&cfg(&eps_u, eps_c, guidance), t, x)
}

/// Null-text optimisation along the pivots `traj` (from [`crate::guidance::invert::ddim_invert`]
/// under `cond` = c^r (1, 77, d)), starting from `uncond` = φ (1, 77, d); on SDXL each with its
/// pooled embeds.
pub fn null_text_optimize(
    sd: &StableDiffusion,
    sched: &DdimScheduler,
    traj: &Trajectory,
    cond: impl Into<TextCond>,
    uncond: impl Into<TextCond>,
    config: &NtiConfig,
) -> Result<NullTextInversion> {
    let (cond, uncond): (TextCond, TextCond) = (cond.into(), uncond.into());
    config.validate()?;
    let n = sched.timesteps.len();
    if traj.latents.len() != n + 1 {
        bail!("the inversion has {} latents, but {n} DDIM steps need {}", traj.latents.len(), n + 1);
    }
    let bar = crate::progress::bar(n as u64, "null-text inversion");
    let x_t = traj.before_step(0).shallow_clone();
    let mut x = x_t.shallow_clone();
    let mut phi = uncond.detach_copy();
    let (mut phis, mut log) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (i, &t) in sched.timesteps.iter().enumerate() {
        let target = traj.after_step(i); // x*_{t−1}
        let eps_c = tch::no_grad(|| sd.eps(&x, t, &cond, None));
        let mut adam = TextAdam::new(&phi, config.lr_at(i));
        let mut losses = Vec::with_capacity(config.inner_steps);
        for _ in 0..config.inner_steps {
            let leaves = phi.leaves();
            let loss = nti_loss(sd, sched, &x, t, &eps_c, &leaves, target, config.guidance);
            adam.step(&mut phi, &leaves, &loss);
            let value = loss.double_value(&[]);
            losses.push(value);
            if value < config.threshold_at(i) {
                break; // the authors stop after taking the update
            }
        }
        let x_prev = tch::no_grad(|| step_with(sd, sched, &x, t, &eps_c, &phi, config.guidance));
        let final_loss = tch::no_grad(|| (&x_prev - target).square().mean(Kind::Float).double_value(&[]));
        phis.push(phi.detach_copy());
        log.push(StepLog { t, losses, final_loss });
        x = x_prev;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(NullTextInversion { x_t, phi: phis, timesteps: sched.timesteps.clone(), log, x0: Some(x) })
}
