//! The DDIM sampler step F^(t) (paper Eq. 1), its inverse F^-1 (Eq. 3) and the DDPM forward
//! process used in training, configured from `scheduler/scheduler_config.json`.
//!
//! The arithmetic mirrors diffusers' `DDIMScheduler` / `DDIMInverseScheduler` operation for
//! operation in float32 (the ᾱ table is built with the same torch ops), so results agree with
//! diffusers to the last few ulps.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The keys of `scheduler_config.json` that DDIM uses (others are ignored).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "d_train_steps")]
    pub num_train_timesteps: i64,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "d_true")]
    pub clip_sample: bool,
    #[serde(default = "d_one")]
    pub clip_sample_range: f64,
    #[serde(default = "d_true")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: i64,
    #[serde(default = "d_prediction")]
    pub prediction_type: String,
    #[serde(default = "d_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

fn d_train_steps() -> i64 {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_beta_schedule() -> String {
    "linear".into()
}
fn d_true() -> bool {
    true
}
fn d_one() -> f64 {
    1.0
}
fn d_prediction() -> String {
    "epsilon".into()
}
fn d_spacing() -> String {
    "leading".into()
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = crate::load::read_json(path)?;
        cfg.validate().with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if !matches!(self.beta_schedule.as_str(), "linear" | "scaled_linear" | "squaredcos_cap_v2") {
            bail!("beta_schedule {:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)", self.beta_schedule);
        }
        if self.trained_betas.is_some() {
            bail!("trained_betas is not supported");
        }
        if !matches!(self.prediction_type.as_str(), "epsilon" | "v_prediction" | "sample") {
            bail!("prediction_type {:?} is not supported", self.prediction_type);
        }
        if !matches!(self.timestep_spacing.as_str(), "leading" | "trailing" | "linspace") {
            bail!("timestep_spacing {:?} is not supported", self.timestep_spacing);
        }
        if self.thresholding || self.rescale_betas_zero_snr {
            bail!("thresholding and rescale_betas_zero_snr are not supported");
        }
        if self.num_train_timesteps < 1 {
            bail!("num_train_timesteps must be positive");
        }
        Ok(())
    }
}

/// DDIM (η = 0) over a fixed set of inference timesteps.
#[derive(Debug)]
pub struct DdimScheduler {
    pub config: SchedulerConfig,
    /// ᾱ_t for t = 0 … num_train_timesteps−1, float32 on the CPU, as diffusers computes it.
    alphas_cumprod: Tensor,
    /// ᾱ used past the end of the schedule (1 or ᾱ_0, by `set_alpha_to_one`).
    final_alpha_cumprod: Tensor,
    /// The inference timesteps, from T down (diffusers' `timesteps`).
    pub timesteps: Vec<i64>,
}

impl DdimScheduler {
    /// A scheduler with `num_inference_steps` timesteps.
    pub fn new(config: SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.validate()?;
        let n = config.num_train_timesteps;
        let opts = (Kind::Float, Device::Cpu);
        let betas = match config.beta_schedule.as_str() {
            "linear" => Tensor::linspace(config.beta_start, config.beta_end, n, opts),
            "scaled_linear" => {
                Tensor::linspace(config.beta_start.sqrt(), config.beta_end.sqrt(), n, opts).pow_tensor_scalar(2)
            }
            _ => cosine_betas(n),
        };
        let alphas: Tensor = 1.0 - betas;
        let alphas_cumprod = alphas.cumprod(0, Kind::Float);
        let final_alpha_cumprod = if config.set_alpha_to_one { Tensor::from(1.0f32) } else { alphas_cumprod.get(0) };
        let mut s = Self { config, alphas_cumprod, final_alpha_cumprod, timesteps: vec![] };
        s.set_timesteps(num_inference_steps)?;
        Ok(s)
    }

    /// diffusers' `set_timesteps`, for the three `timestep_spacing` rules.
    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let n = self.config.num_train_timesteps;
        if steps == 0 || steps as i64 > n {
            bail!("number of inference steps must be between 1 and {n}, got {steps}");
        }
        let k = steps as i64;
        self.timesteps = match self.config.timestep_spacing.as_str() {
            "linspace" => (0..k)
                .rev()
                .map(|i| {
                    // np.linspace: i·step with step = (n−1)/(k−1), the last value exactly n−1
                    let v =
                        if i == k - 1 { (n - 1) as f64 } else { i as f64 * ((n - 1) as f64 / (k - 1).max(1) as f64) };
                    v.round_ties_even() as i64
                })
                .collect(),
            "leading" => (0..k).rev().map(|i| i * (n / k) + self.config.steps_offset).collect(),
            _ => {
                // np.round(np.arange(n, 0, -n / k)) - 1
                let ratio = n as f64 / k as f64;
                (0..k).map(|i| (n as f64 - i as f64 * ratio).round_ties_even() as i64 - 1).collect()
            }
        };
        Ok(())
    }

    pub fn num_inference_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// Distance between consecutive timesteps as diffusers' step uses it.
    fn stride(&self) -> i64 {
        self.config.num_train_timesteps / self.timesteps.len() as i64
    }

    /// ᾱ_t as a 0-dim float32 tensor; t < 0 gives the final ᾱ.
    pub fn alpha_cumprod(&self, t: i64) -> Tensor {
        if t >= 0 {
            self.alphas_cumprod.get(t)
        } else {
            self.final_alpha_cumprod.shallow_clone()
        }
    }

    /// (x̂_0, ε̂) from the model output at ᾱ_t, by `prediction_type`.
    fn predict(&self, model_output: &Tensor, sample: &Tensor, alpha_t: &Tensor) -> (Tensor, Tensor) {
        let beta_t: Tensor = 1.0 - alpha_t;
        let (x0, eps) = match self.config.prediction_type.as_str() {
            "epsilon" => {
                let x0 = (sample - beta_t.pow_tensor_scalar(0.5) * model_output) / alpha_t.pow_tensor_scalar(0.5);
                (x0, model_output.shallow_clone())
            }
            "sample" => {
                let eps = (sample - alpha_t.pow_tensor_scalar(0.5) * model_output) / beta_t.pow_tensor_scalar(0.5);
                (model_output.shallow_clone(), eps)
            }
            _ => {
                let x0 = alpha_t.pow_tensor_scalar(0.5) * sample - beta_t.pow_tensor_scalar(0.5) * model_output;
                let eps = alpha_t.pow_tensor_scalar(0.5) * model_output + beta_t.pow_tensor_scalar(0.5) * sample;
                (x0, eps)
            }
        };
        (x0, eps)
    }

    /// The DDIM update from noise level ᾱ_from to ᾱ_to (η = 0): predict (x̂_0, ε̂) at ᾱ_from,
    /// clip x̂_0 if configured, and recombine at ᾱ_to: √ᾱ_to·x̂_0 + √(1−ᾱ_to)·ε̂.
    fn ddim_move(&self, model_output: &Tensor, sample: &Tensor, alpha_from: &Tensor, alpha_to: &Tensor) -> Tensor {
        let (mut x0, eps) = self.predict(model_output, sample, alpha_from);
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r, r);
        }
        let beta_to: Tensor = 1.0 - alpha_to;
        let direction = beta_to.pow_tensor_scalar(0.5) * eps;
        alpha_to.pow_tensor_scalar(0.5) * x0 + direction
    }

    /// F^(t) (Eq. 1): one deterministic DDIM step x_t -> x_{t-1} (η = 0), as
    /// `DDIMScheduler.step(model_output, t, sample, eta=0).prev_sample`.
    pub fn step(&self, model_output: &Tensor, t: i64, sample: &Tensor) -> Tensor {
        self.ddim_move(model_output, sample, &self.alpha_cumprod(t), &self.alpha_cumprod(t - self.stride()))
    }

    /// The timesteps of an inversion, from 1 up to T (diffusers' `DDIMInverseScheduler`).
    pub fn inverse_timesteps(&self) -> Vec<i64> {
        self.timesteps.iter().rev().copied().collect()
    }

    /// F^-1 (Eq. 3): one DDIM inversion step towards noise, as
    /// `DDIMInverseScheduler.step(model_output, t, sample).prev_sample`: `sample` is at the
    /// previous timestep t − stride (ᾱ of 1 or ᾱ_0 before the start, by `set_alpha_to_one`),
    /// `model_output` is ε_θ(sample, t), and the result is at t.
    pub fn inverse_step(&self, model_output: &Tensor, t: i64, sample: &Tensor) -> Tensor {
        let from = (t - self.stride()).min(self.config.num_train_timesteps - 1);
        self.ddim_move(model_output, sample, &self.alpha_cumprod(from), &self.alpha_cumprod(t))
    }

    /// ᾱ_t for every training timestep (T_train,).
    pub fn alphas_cumprod_table(&self) -> &Tensor {
        &self.alphas_cumprod
    }

    /// The DDPM forward process q(x_t | x_0): √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, per sample (`t`: (B,)),
    /// as `DDPMScheduler.add_noise`.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Tensor {
        let a = self.alphas_cumprod.to_device(x0.device()).index_select(0, &t.to_device(x0.device()));
        let shape: Vec<i64> = std::iter::once(-1).chain(std::iter::repeat_n(1, x0.dim() - 1)).collect();
        let sqrt_a = a.pow_tensor_scalar(0.5).view(shape.as_slice());
        let b: Tensor = 1.0 - &a;
        let sqrt_b = b.pow_tensor_scalar(0.5).view(shape.as_slice());
        sqrt_a * x0 + sqrt_b * noise
    }
}

impl DdimScheduler {
    /// Refuses a `prediction_type` that the training losses cannot target (the diffusers
    /// training scripts' rule: `epsilon` and `v_prediction` only).
    pub fn check_trainable(&self) -> Result<()> {
        match self.config.prediction_type.as_str() {
            "epsilon" | "v_prediction" => Ok(()),
            p => bail!("training supports prediction_type epsilon and v_prediction (scheduler_config.json), not {p:?}"),
        }
    }

    /// The network's training target for x_t = [`add_noise`](Self::add_noise)`(x_0, ε, t)`: ε, or
    /// v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0 for `v_prediction` (`DDPMScheduler.get_velocity`; SD-2.x's
    /// 768 models). Every loss we optimise (Eq. 6, TI, DreamBooth, LoRA) regresses onto this.
    pub fn training_target(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.check_trainable()?;
        if self.config.prediction_type == "epsilon" {
            return Ok(noise.shallow_clone());
        }
        let a = self.alphas_cumprod.to_device(x0.device()).index_select(0, &t.to_device(x0.device()));
        let shape: Vec<i64> = std::iter::once(-1).chain(std::iter::repeat_n(1, x0.dim() - 1)).collect();
        let sqrt_a = a.pow_tensor_scalar(0.5).view(shape.as_slice());
        let b: Tensor = 1.0 - &a;
        let sqrt_b = b.pow_tensor_scalar(0.5).view(shape.as_slice());
        Ok(sqrt_a * noise - sqrt_b * x0)
    }
}

/// `betas_for_alpha_bar` with the cosine ᾱ (squaredcos_cap_v2), max β 0.999.
fn cosine_betas(n: i64) -> Tensor {
    let f = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    let betas: Vec<f32> = (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - f(t2) / f(t1)).min(0.999) as f32
        })
        .collect();
    Tensor::from_slice(&betas)
}
