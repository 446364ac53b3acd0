//! Algorithm 2: reference-guided denoising. From the same x_T as the plain image: at t = t_s
//! set φ_h = φ and x_t\[M_r*\] = x_t*\[M_r*\]; every step x_{t−1} = F^(t)(x_t, [c, c_s^t], φ); for
//! t_e ≤ t ≤ t_s take J Adam steps on φ_h minimising Eq. 10,
//! ‖x*_{t−1}\[M_r*\] − F^(t)(x_t, [c, c_s^t], φ_h)\[M_r*\]‖², then set
//! x_{t−1}\[M_r*\] = F^(t)(x_t, [c, c_s^t], φ_h)\[M_r*\]. φ_h carries over between steps; each step
//! starts a fresh Adam (as null-text inversion does). The conditional branch ε_θ(x_t, c) is
//! computed once per step; only the φ_h branch takes gradients.
//!
//! On SDXL φ_h is the unconditional branch's whole text conditioning: both encoders' hidden
//! states (1, 77, d₁ + d₂) *and* the pooled `text_embeds` (1, P), which reach every ResNet
//! block through the added time embedding. Both are optimised: they are what φ is on SDXL
//! (with `force_zeros_for_empty_prompt` both start at zero), and Eq. 10 only reads M_r*, so the
//! pooled embeds' global reach changes nothing outside the mask.

use super::invert::Trajectory;
use crate::pipeline::{cfg, StableDiffusion, StepConditioning, TextCond};
use crate::scheduler::DdimScheduler;
use crate::subject::adam::TextAdam;
use anyhow::{bail, Result};
use std::time::Instant;
use tch::{Kind, Tensor};

/// t_s, t_e (paper's t, counted T … 1), J and the learning rate.
#[derive(Debug, Clone)]
pub struct GuidanceConfig {
    pub t_start: usize,
    pub t_end: usize,
    pub steps: usize,
    pub lr: f64,
    /// Substitute x_t\[M_r*\] = x_t*\[M_r*\] at t_s (off only in tests).
    pub substitute: bool,
}

/// What the guided pass did.
#[derive(Debug, Default)]
pub struct GuidanceReport {
    /// Eq. 10 before each Adam step, per guided DDIM step.
    pub losses: Vec<Vec<f64>>,
    /// Seconds spent optimising φ_h.
    pub phi_h_seconds: f64,
}

impl GuidanceConfig {
    pub fn validate(&self, n_steps: usize) -> Result<()> {
        if self.t_end > self.t_start {
            bail!("--t-end ({}) must not exceed --t-start ({})", self.t_end, self.t_start);
        }
        if self.t_start > n_steps || self.t_end < 1 {
            bail!(
                "--t-start and --t-end must lie in 1 … {n_steps} (the DDIM steps), got {} and {}",
                self.t_start,
                self.t_end
            );
        }
        Ok(())
    }
}

/// Eq. 10 optimises φ_h through the unconditional branch of cfg(ε_h, ε_c, w) = ε_h + w·(ε_c − ε_h),
/// whose derivative in ε_h is (1 − w): at w = 1 it is zero and for w < 1 guidance uses ε_c alone
/// ([`cfg`]), so φ_h would never move and Algorithm 2 would silently do nothing. Refused.
pub fn check_guidance_scale(guidance: f64) -> Result<()> {
    if guidance <= 1.0 {
        bail!(
            "reference guidance needs --guidance > 1 (got {guidance}): with w ≤ 1 the guided step uses the \
             conditional branch only, so φ_h gets no gradient and Eq. 10 would do nothing"
        );
    }
    Ok(())
}

/// Eq. 10 over the masked cells (mean, so its scale does not depend on the mask's size).
fn eq10(f: &Tensor, target: &Tensor, mask: &Tensor) -> Tensor {
    ((f - target) * mask).square().sum(Kind::Float) / (mask.sum(Kind::Float) * f.size()[1] as f64).clamp_min(1.0)
}

/// x_t\[M\] = x_t*\[M\]: cells inside the mask (≥ 0.5) from `x_star`, the rest untouched.
pub fn substitute(x: &Tensor, x_star: &Tensor, mask: &Tensor) -> Tensor {
    x_star.where_self(&mask.ge(0.5), x)
}

/// The aligned, inverted reference: its DDIM trajectory x_0* … x_T* and M_r* at latent size
/// (1, 1, h, w), 0/1.
pub struct Reference<'a> {
    pub traj: &'a Trajectory,
    pub mask: &'a Tensor,
}

/// Algorithm 2 from `x_t` (= x_T) with the per-step conditioning `cond` and guidance scale w.
pub fn guided_denoise(
    sd: &StableDiffusion,
    sched: &DdimScheduler,
    x_t: Tensor,
    cond: &mut dyn StepConditioning,
    guidance: f64,
    reference: &Reference,
    gc: &GuidanceConfig,
) -> Result<(Tensor, GuidanceReport)> {
    let Reference { traj, mask } = *reference;
    let n = sched.timesteps.len();
    gc.validate(n)?;
    check_guidance_scale(guidance)?;
    let bar = crate::progress::bar(n as u64, "guided");
    let mut report = GuidanceReport::default();
    let (mut x, mut phi_h): (Tensor, Option<TextCond>) = (x_t, None);
    let mut phi_h_moved = false;
    for (i, &t) in sched.timesteps.iter().enumerate() {
        let paper_t = n - i; // T … 1
        let c = cond.at(i, t)?;
        if paper_t == gc.t_start {
            phi_h = Some(c.uncond_text().detach_copy());
            if gc.substitute {
                x = substitute(&x, traj.before_step(i), mask);
            }
        }
        let (eps_u, eps_c) = tch::no_grad(|| sd.eps_pair(&x, t, &c, None));
        let mut x_prev = tch::no_grad(|| sched.step(&cfg(&eps_u, &eps_c, guidance), t, &x));
        if let (Some(p), true) = (phi_h.as_mut(), gc.t_end <= paper_t && paper_t <= gc.t_start) {
            let started = Instant::now();
            let target = traj.after_step(i);
            let f_h = |p: &TextCond| sched.step(&cfg(&sd.eps(&x, t, p, None), &eps_c, guidance), t, &x);
            let mut adam = TextAdam::new(p, gc.lr);
            // Losses are kept on the device and read once the step is done: no host sync
            // inside the J Adam steps.
            let mut step_losses = Vec::with_capacity(gc.steps);
            for _ in 0..gc.steps {
                let leaves = p.leaves();
                let loss = eq10(&f_h(&leaves), target, mask);
                step_losses.push(loss.detach());
                adam.step(p, &leaves, &loss);
                phi_h_moved = true;
            }
            if phi_h_moved {
                let f = tch::no_grad(|| f_h(p));
                x_prev = substitute(&x_prev, &f, mask); // x_{t−1}[M] = F(x_t, φ_h)[M]
            }
            report.losses.push(step_losses.iter().map(|l| l.double_value(&[])).collect());
            report.phi_h_seconds += started.elapsed().as_secs_f64();
        }
        x = x_prev;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((x, report))
}
