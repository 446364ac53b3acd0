//! Learning c_s (Eq. 5–6) and the step-wise c_s^t (Algorithm 1), or textual-inversion tokens.
//!
//! Phase 0 optimises c_s with x_t at uniform t ∈ [0, T_train); phase k = 1 … T (HiFi mode)
//! optimises c_s^{τ_k} for the k-th DDIM timestep τ_k (from T down), starting from the previous
//! phase's result (c_s^{T+1} = c_s), with a fresh Adam. Each step's randomness (photo, caption,
//! t, ε) is drawn from a generator seeded by (seed, phase, step) alone, so a run resumed from a
//! checkpoint is bit-identical to an unbroken one.
//!
//! On SDXL the parameter is the pair of both encoders' rows side by side (n × (d₁ + d₂), see
//! [`super::conditioning`]); the UNet also takes the captions' pooled `text_embeds` and the
//! `time_ids` of the square training size.

use super::adam::Adam;
use super::conditioning::{phi_s_sd, replace_last, splice_sd};
use super::{ti, Mode, Space};
use crate::models::unet::AddedCond;
use crate::pipeline::StableDiffusion;
use crate::scheduler::DdimScheduler;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Everything that determines a run's result (compared on `--resume`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearnArgs {
    pub mode: Mode,
    pub space: Space,
    pub n_tokens: i64,
    /// Textual-inversion token (TI mode).
    pub token: String,
    pub class_noun: String,
    pub captions: Vec<String>,
    pub steps: usize,
    pub lr: f64,
    /// w_s of Eq. 6.
    pub reg_weight: f64,
    /// I of Algorithm 1 (0 skips it).
    pub stepwise_steps: usize,
    pub ddim_steps: usize,
    pub batch_size: i64,
    pub seed: u64,
    pub masked: bool,
}

/// The training data: VAE latents of the photos (scaled, encoded once) and soft masks.
pub struct TrainSet {
    /// (N, C, h, w), already multiplied by the VAE scaling factor.
    pub latents: Tensor,
    /// (N, 1, h, w) in [0, 1], or None for an unmasked loss.
    pub masks: Option<Tensor>,
}

/// One step's random draw.
pub struct Batch {
    pub photo: Tensor,
    pub caption: Tensor,
    pub t: Tensor,
    pub noise: Tensor,
}

/// The loss parts of one step.
pub struct Losses {
    pub total: Tensor,
    pub denoise: Tensor,
    pub reg: Tensor,
}

/// Eq. 6 (HiFi) or the TI loss for one model, data set and caption set.
pub struct Objective<'a> {
    pub sd: &'a StableDiffusion,
    pub args: LearnArgs,
    pub data: TrainSet,
    /// Caption ids (K, 77).
    pub caption_ids: Tensor,
    /// SDXL: the captions' ids of the second tokenizer (K, 77).
    pub caption_ids_2: Option<Tensor>,
    /// SDXL: the `time_ids` (1, 6) of the square training size.
    pub time_ids: Option<Tensor>,
    /// φ_s (n, d) — HiFi mode; the initial value of c_s.
    pub phi_s: Tensor,
    /// The caption encodings (K, 77, d) for the output space (no gradient needed there), with
    /// SDXL's pooled embeds (K, P).
    caption_out: Option<(Tensor, Option<Tensor>)>,
    /// First id of the TI tokens (TI mode).
    pub ti_base: i64,
    pub sched: DdimScheduler,
}

/// ‖M ⊙ (ε̂ − ε)‖² normalised by the mask's weight Σ M · C, so that M = 1 is the plain mean
/// squared error (TI's loss). `eps`, `target`: (B, C, h, w); `mask`: (B, 1, h, w) in [0, 1].
pub fn masked_mse(eps: &Tensor, target: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let sq = (eps - target).square(); // (B, C, h, w)
    match mask {
        Some(m) => (sq * m).sum(Kind::Float) / (m.sum(Kind::Float) * eps.size()[1] as f64),
        None => sq.mean(Kind::Float),
    }
}

/// Mixes (seed, phase, step) into one generator seed (splitmix64 finaliser).
pub fn step_seed(seed: u64, phase: u64, step: u64) -> i64 {
    let mut z = seed ^ phase.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

impl<'a> Objective<'a> {
    /// `caption_ids` (K, 77) must leave the last n positions as padding (HiFi) or contain the
    /// TI tokens, whose ids start at `ti_base` (TI).
    pub fn new(
        sd: &'a StableDiffusion,
        args: LearnArgs,
        data: TrainSet,
        caption_ids: Tensor,
        ti_base: i64,
    ) -> Result<Self> {
        let caption_ids_2 = match &sd.xl {
            None => None,
            Some(xl) => {
                let rows: Vec<Tensor> =
                    args.captions.iter().map(|c| Tensor::from_slice(&xl.tokenizer_2.encode_padded(c).ids)).collect();
                Some(Tensor::stack(&rows, 0).to_device(sd.device))
            }
        };
        let empty = sd.tokenize_each("");
        let phi_s = tch::no_grad(|| phi_s_sd(sd, &empty, args.n_tokens, args.space));
        let all_ids: Vec<Tensor> = std::iter::once(caption_ids.shallow_clone())
            .chain(caption_ids_2.iter().map(|t| t.shallow_clone()))
            .collect();
        let caption_out =
            (args.mode == Mode::Hifi && args.space == Space::Output).then(|| tch::no_grad(|| sd.encode_ids(&all_ids)));
        let sched = sd.scheduler(args.ddim_steps)?;
        sched.check_trainable()?;
        // SDXL's size ids: the photos' square size (original = target, no crop).
        let size = data.latents.size()[2] * sd.vae_scale_factor();
        let time_ids = sd.is_xl().then(|| sd.add_time_ids(size, size));
        Ok(Self { sd, args, data, caption_ids, caption_ids_2, time_ids, phi_s, caption_out, ti_base, sched })
    }

    /// The draw of step `step` of `phase`: photos, captions, t (uniform, or `fixed_t`), ε.
    pub fn draw(&self, phase: u64, step: u64, fixed_t: Option<i64>) -> Batch {
        let b = self.args.batch_size;
        let cpu = (Kind::Int64, Device::Cpu);
        let n = self.data.latents.size()[0];
        let k = self.caption_ids.size()[0];
        let n_train = self.sched.config.num_train_timesteps;
        let mut shape = self.data.latents.size();
        shape[0] = b;
        let (photo, caption, t, noise) = crate::rng::seeded(step_seed(self.args.seed, phase, step), || {
            let photo = Tensor::randint(n, [b], cpu);
            let caption = Tensor::randint(k, [b], cpu);
            let t = match fixed_t {
                Some(t) => Tensor::full([b], t, cpu),
                None => Tensor::randint(n_train, [b], cpu),
            };
            (photo, caption, t, Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)))
        });
        let dev = self.sd.device;
        Batch {
            photo: photo.to_device(dev),
            caption: caption.to_device(dev),
            t: t.to_device(dev),
            noise: noise.to_device(dev),
        }
    }

    /// The UNet conditioning for parameter `p` and caption indices: the encoder hidden states
    /// and, for SDXL, the pooled `text_embeds`.
    pub fn conditioning(&self, p: &Tensor, caption: &Tensor) -> (Tensor, Option<Tensor>) {
        let mut ids = vec![self.caption_ids.index_select(0, caption)]; // (B, 77) each
        if let Some(c2) = &self.caption_ids_2 {
            ids.push(c2.index_select(0, caption));
        }
        match (self.args.mode, &self.caption_out) {
            (Mode::Hifi, Some((c, pooled))) => {
                (replace_last(&c.index_select(0, caption), p), pooled.as_ref().map(|t| t.index_select(0, caption)))
            }
            (Mode::Hifi, None) => splice_sd(self.sd, &ids, p, self.args.space),
            (Mode::Ti, _) => self.sd.encode_embeds(&ti::embed_with_learned_each(self.sd, &ids, self.ti_base, p), &ids),
        }
    }

    /// ε_θ(x_t, t, [c, c_s]) for a batch, x_t drawn from q(x_t | x_0) with the batch's ε.
    pub fn predict(&self, p: &Tensor, b: &Batch) -> Tensor {
        let x0 = self.data.latents.index_select(0, &b.photo);
        let x_t = self.sched.add_noise(&x0, &b.noise, &b.t);
        let (c, pooled) = self.conditioning(p, &b.caption);
        let added = match (pooled, &self.time_ids) {
            (Some(text_embeds), Some(t)) => {
                let time_ids = t.repeat([text_embeds.size()[0], 1]);
                Some(AddedCond { text_embeds, time_ids })
            }
            _ => None,
        };
        self.sd.unet.forward_added(&x_t, &b.t, &c, added.as_ref(), None)
    }

    /// What [`predict`](Self::predict) regresses onto: ε, or v for a v-prediction model
    /// ([`DdimScheduler::training_target`]).
    pub fn target(&self, b: &Batch) -> Tensor {
        let x0 = self.data.latents.index_select(0, &b.photo);
        self.sched.training_target(&x0, &b.noise, &b.t).expect("checked trainable in Objective::new")
    }

    /// Eq. 6: ‖M ⊙ (ε_θ(x_t, [c, c_s]) − ε)‖² + w_s‖c_s − φ_s‖² (TI: the first term only; v in
    /// place of ε for a v-prediction model).
    pub fn loss(&self, p: &Tensor, b: &Batch) -> Losses {
        let mask = self.data.masks.as_ref().map(|m| m.index_select(0, &b.photo));
        let denoise = masked_mse(&self.predict(p, b), &self.target(b), mask.as_ref());
        let reg = match self.args.mode {
            Mode::Hifi => (p - &self.phi_s).square().sum(Kind::Float) * self.args.reg_weight,
            Mode::Ti => Tensor::zeros([], (Kind::Float, p.device())),
        };
        Losses { total: &denoise + &reg, denoise, reg }
    }

    /// (number of steps, fixed timestep) of a phase: phase 0 is the global c_s, phase k ≥ 1
    /// the k-th DDIM timestep of Algorithm 1.
    pub fn phase_plan(&self, phase: usize) -> (usize, Option<i64>) {
        if phase == 0 {
            (self.args.steps, None)
        } else {
            (self.args.stepwise_steps, Some(self.sched.timesteps[phase - 1]))
        }
    }

    /// Steps done before position (phase, step), over all phases.
    pub fn global_step(&self, phase: usize, step: usize) -> usize {
        if phase == 0 {
            step
        } else {
            self.args.steps + (phase - 1) * self.args.stepwise_steps + step
        }
    }

    /// Steps of the whole run.
    pub fn total_steps(&self) -> usize {
        self.global_step(self.n_phases(), 0)
    }

    /// Phases in the run: 1, or 1 + T with Algorithm 1.
    pub fn n_phases(&self) -> usize {
        if self.args.mode == Mode::Hifi && self.args.stepwise_steps > 0 {
            1 + self.sched.timesteps.len()
        } else {
            1
        }
    }
}

/// The optimisation state: where the run is and everything needed to continue it.
#[derive(Debug)]
pub struct State {
    pub phase: usize,
    pub step: usize,
    /// The parameter being optimised (c_s, c_s^t, or the TI rows), (n, d).
    pub param: Tensor,
    pub adam: Adam,
    /// c_s once phase 0 is done.
    pub c_s: Option<Tensor>,
    /// Phase 0's optimiser as it ended (kept with c_s): a finished run resumed with more
    /// `--steps` continues phase 0 from here exactly as a longer run would have.
    pub adam0: Option<Adam>,
    /// c_s^t of the finished step-wise phases, from t = T down.
    pub stepwise: Vec<Tensor>,
}

impl State {
    pub fn new(init: &Tensor, lr: f64) -> Self {
        let param = init.detach().copy();
        Self { phase: 0, step: 0, adam: Adam::new(&param, lr), param, c_s: None, adam0: None, stepwise: vec![] }
    }
}

/// What a step reports.
pub struct StepReport {
    pub phase: usize,
    pub step: usize,
    pub loss: f64,
    pub denoise: f64,
    pub reg: f64,
}

/// One Adam step of the current phase; moves `state` to the next step (and phase).
pub fn train_step(obj: &Objective, state: &mut State) -> Result<StepReport> {
    let (n_steps, fixed_t) = obj.phase_plan(state.phase);
    let batch = obj.draw(state.phase as u64, state.step as u64, fixed_t);
    let p = state.param.detach().set_requires_grad(true);
    let l = obj.loss(&p, &batch);
    let loss = l.total.double_value(&[]);
    if !loss.is_finite() {
        bail!("the loss became {loss} at phase {} step {}: stopping (lower --lr?)", state.phase, state.step);
    }
    let grad = Tensor::run_backward(&[&l.total], &[&p], false, false).remove(0);
    state.adam.update(&mut state.param, &grad);
    // A finite loss can still give an infinite gradient or an overflowing update: stop before
    // such a parameter reaches a checkpoint.
    if !bool::try_from(state.param.isfinite().all())? {
        bail!(
            "the embedding became NaN or infinite at phase {} step {} (loss {loss}): stopping (lower --lr?)",
            state.phase,
            state.step
        );
    }
    let report = StepReport {
        phase: state.phase,
        step: state.step,
        loss,
        denoise: l.denoise.double_value(&[]),
        reg: l.reg.double_value(&[]),
    };
    state.step += 1;
    if state.step >= n_steps {
        finish_phase(obj, state);
    }
    Ok(report)
}

/// Ends a phase: phase 0's result is c_s, later ones c_s^t; the next phase starts from it
/// with a fresh Adam (Algorithm 1: c_s^t starts at c_s^{t+1}).
pub fn finish_phase(obj: &Objective, state: &mut State) {
    let done = state.param.detach().copy();
    if state.phase == 0 {
        state.c_s = Some(done);
        let fresh = Adam::new(&state.param, obj.args.lr);
        state.adam0 = Some(std::mem::replace(&mut state.adam, fresh));
    } else {
        state.stepwise.push(done);
    }
    state.phase += 1;
    state.step = 0;
    state.adam = Adam::new(&state.param, obj.args.lr);
}

/// "Extend": moves a state that has finished phase 0 (made with `old_steps` of it) back to
/// phase 0's end — c_s with phase 0's optimiser — so that a run with more `--steps` continues
/// it; the step-wise phases, which start from c_s, run again. Errors when the state keeps no
/// phase-0 optimiser (an older checkpoint).
pub fn rewind_to_phase0(state: &mut State, old_steps: usize) -> Result<()> {
    if state.phase == 0 {
        return Ok(());
    }
    let (Some(c_s), Some(adam0)) = (state.c_s.take(), state.adam0.take()) else {
        bail!("this checkpoint keeps no phase-0 optimiser state (an older version wrote it): it cannot be extended");
    };
    state.param = c_s;
    state.adam = adam0;
    state.phase = 0;
    state.step = old_steps;
    state.stepwise.clear();
    Ok(())
}

/// Runs to the end, calling `after_step` after each step (checkpoints, logs, progress).
pub fn run(
    obj: &Objective,
    state: &mut State,
    mut after_step: impl FnMut(&State, &StepReport) -> Result<()>,
) -> Result<()> {
    if state.phase == 0 && obj.args.steps == 0 {
        finish_phase(obj, state);
    }
    while state.phase < obj.n_phases() {
        let report = train_step(obj, state)?;
        after_step(state, &report)?;
    }
    Ok(())
}
