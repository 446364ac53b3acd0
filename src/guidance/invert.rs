//! DDIM inversion (Eq. 3) with guidance w = 1: x_0* → x_1* → … → x_T*, each step
//! x*_t = F^-1(x*_{t−Δ}, ε_θ(x*_{t−Δ}, t, c_r)) (diffusers' `DDIMInverseScheduler` semantics).

use crate::pipeline::{StableDiffusion, TextCond};
use crate::scheduler::DdimScheduler;
use tch::Tensor;

/// The inverted trajectory of one latent, indexed like the sampling loop.
pub struct Trajectory {
    /// `latents[k]` = x* after k inversion steps: `latents[0]` = x_0*, `latents[T]` = x_T*.
    pub latents: Vec<Tensor>,
}

impl Trajectory {
    /// x* at the input of sampling step `i` (timestep `sched.timesteps[i]`).
    pub fn before_step(&self, i: usize) -> &Tensor {
        &self.latents[self.latents.len() - 1 - i]
    }
    /// x* at the output of sampling step `i` (the next timestep, or x_0* after the last).
    pub fn after_step(&self, i: usize) -> &Tensor {
        &self.latents[self.latents.len() - 2 - i]
    }
}

/// Inverts `x0` (B, C, h, w) under the text conditioning `cond` (B, 77, d) (SDXL: with its
/// pooled embeds, [`StableDiffusion::encode_text`]), w = 1.
pub fn ddim_invert(sd: &StableDiffusion, sched: &DdimScheduler, x0: &Tensor, cond: impl Into<TextCond>) -> Trajectory {
    let cond: TextCond = cond.into();
    tch::no_grad(|| {
        let bar = crate::progress::bar(sched.timesteps.len() as u64, "inverting");
        let mut latents = vec![x0.shallow_clone()];
        for t in sched.inverse_timesteps() {
            let x = latents.last().expect("x_0*");
            let eps = sd.eps(x, t, &cond, None);
            latents.push(sched.inverse_step(&eps, t, x));
            bar.inc(1);
        }
        bar.finish_and_clear();
        Trajectory { latents }
    })
}
