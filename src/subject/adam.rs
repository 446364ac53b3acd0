//! Adam with its state in plain tensors, so a checkpoint can hold it and a resumed run continues
//! bit-identically (tch's `nn::Adam` keeps its state inside libtorch where it cannot be saved).
//! The update is PyTorch's `torch.optim.Adam` (no amsgrad); with `weight_decay` > 0 it is
//! `torch.optim.AdamW` (decoupled decay: θ ← θ·(1 − lr·λ) before the Adam step). Also
//! [`clip_grad_norm`], `torch.nn.utils.clip_grad_norm_`.

use tch::Tensor;

#[derive(Debug)]
pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay λ (AdamW); 0 = plain Adam.
    pub weight_decay: f64,
    /// Updates taken so far.
    pub step: i64,
    /// First and second moment estimates, shaped like the parameter.
    pub m: Tensor,
    pub v: Tensor,
}

impl Adam {
    /// A fresh optimiser for a parameter shaped like `like`.
    pub fn new(like: &Tensor, lr: f64) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 0,
            m: like.zeros_like(),
            v: like.zeros_like(),
        }
    }

    /// One update of `param` (a leaf requiring grad) from `grad`, in place, outside autograd.
    pub fn update(&mut self, param: &mut Tensor, grad: &Tensor) {
        tch::no_grad(|| {
            self.step += 1;
            if self.weight_decay != 0.0 {
                let _ = param.g_mul_scalar_(1.0 - self.lr * self.weight_decay);
            }
            self.m = &self.m * self.beta1 + grad * (1.0 - self.beta1);
            self.v = &self.v * self.beta2 + grad * grad * (1.0 - self.beta2);
            let bc1 = 1.0 - self.beta1.powi(self.step as i32);
            let bc2 = 1.0 - self.beta2.powi(self.step as i32);
            let denom = self.v.sqrt() / bc2.sqrt() + self.eps;
            let delta = &self.m / denom * (-self.lr / bc1);
            let _ = param.g_add_(&delta);
        });
    }
}

/// AdamW as `torch.optim.AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay)`.
pub fn adamw(like: &Tensor, lr: f64, weight_decay: f64) -> Adam {
    Adam { weight_decay, ..Adam::new(like, lr) }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` (L2, `foreach=False`): the total norm
/// ‖(‖g_1‖, …, ‖g_k‖)‖ before clipping; every gradient is multiplied, in place, by
/// min(1, max_norm / (total + 1e-6)).
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        for g in grads.iter_mut() {
            let _ = g.g_mul_(&coef);
        }
        total.double_value(&[])
    })
}

/// Backward of `loss` into `params`, [`clip_grad_norm`] at `max_norm`, and one update of each
/// parameter by its optimiser, in place; returns the gradients' total norm before clipping.
pub fn step_all(params: &mut [Tensor], adam: &mut [Adam], loss: &Tensor, max_norm: f64) -> anyhow::Result<f64> {
    let refs: Vec<&Tensor> = params.iter().collect();
    let grads = Tensor::run_backward(&[loss], &refs, false, false);
    update_all(params, adam, grads, max_norm)
}

/// One step of a from-scratch training loop (`train-base`, `train-encoders`): the loss must be
/// finite (else "the {what} became … (lower {lr_flag}?)", with the checkpoint at `ckpt` named as
/// kept), every optimiser takes `lr` (None: as set), then backward + clip + update
/// ([`step_all`]). Returns (loss, gradient norm before clipping).
#[allow(clippy::too_many_arguments)]
pub fn checked_step(
    params: &mut [Tensor],
    adam: &mut [Adam],
    loss: &Tensor,
    lr: Option<f64>,
    max_norm: f64,
    step: usize,
    what: &str,
    lr_flag: &str,
    ckpt: &std::path::Path,
) -> anyhow::Result<(f64, f64)> {
    let value = loss.double_value(&[]);
    if !value.is_finite() {
        let e = anyhow::anyhow!("the {what} became {value} at step {step} (lower {lr_flag}?)");
        return Err(crate::subject::job::stopped(e, ckpt, "training"));
    }
    if let Some(lr) = lr {
        for ad in adam.iter_mut() {
            ad.lr = lr;
        }
    }
    let gn = step_all(params, adam, loss, max_norm).map_err(|e| crate::subject::job::stopped(e, ckpt, "training"))?;
    Ok((value, gn))
}

/// [`clip_grad_norm`] of the given gradients at `max_norm` and one update of each parameter by
/// its optimiser; returns the gradients' total norm before clipping.
pub fn update_all(params: &mut [Tensor], adam: &mut [Adam], grads: Vec<Tensor>, max_norm: f64) -> anyhow::Result<f64> {
    // A parameter the loss does not reach (an undefined gradient: SDXL's text encoder 1 past
    // its penultimate layer) is left alone, as PyTorch skips a `.grad` of None in
    // `clip_grad_norm_` and in the optimiser's step (no decay either).
    let (reached, mut defined): (Vec<usize>, Vec<Tensor>) =
        grads.into_iter().enumerate().filter(|(_, g)| g.defined()).unzip();
    let norm = clip_grad_norm(&mut defined, max_norm);
    if !norm.is_finite() {
        anyhow::bail!("the gradient norm became {norm}");
    }
    for (i, g) in reached.into_iter().zip(&defined) {
        adam[i].update(&mut params[i], g);
    }
    Ok(norm)
}

/// Writes `param.NAME`, `adam.m.NAME`, `adam.v.NAME` for every parameter, with `meta` plus the
/// optimisers' step count (`adam.step`), atomically over the previous checkpoint.
pub fn write_adam_checkpoint(
    path: &std::path::Path,
    names: &[String],
    params: &[Tensor],
    adam: &[Adam],
    mut meta: std::collections::BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let mut t = Vec::with_capacity(names.len() * 3);
    for (name, p) in names.iter().zip(params) {
        // A weight that overflowed must not replace the last good checkpoint.
        if let Some(bad) = crate::load::non_finite(p) {
            anyhow::bail!(
                "the weight {name} became NaN or infinite ({bad} values): {} was not written",
                path.display()
            );
        }
    }
    for ((name, p), a) in names.iter().zip(params).zip(adam) {
        t.push((format!("param.{name}"), p.detach()));
        t.push((format!("adam.m.{name}"), a.m.shallow_clone()));
        t.push((format!("adam.v.{name}"), a.v.shallow_clone()));
    }
    meta.insert("adam.step".into(), adam.first().map_or(0, |a| a.step).to_string());
    crate::io::write_safetensors_atomic(path, &t, &meta)
}

/// Restores the weights (in place) and the optimiser moments written by
/// [`write_adam_checkpoint`]; `meta` is the checkpoint's metadata (already checked).
pub fn read_adam_checkpoint(
    path: &std::path::Path,
    meta: &std::collections::HashMap<String, String>,
    names: &[String],
    params: &mut [Tensor],
    adam: &mut [Adam],
) -> anyhow::Result<()> {
    use anyhow::Context;
    let adam_step: i64 = meta.get("adam.step").with_context(|| format!("{}: no adam.step", path.display()))?.parse()?;
    let mut t: std::collections::BTreeMap<String, Tensor> =
        crate::load::read_safetensors_finite(path)?.into_iter().collect();
    for ((name, p), a) in names.iter().zip(params.iter_mut()).zip(adam.iter_mut()) {
        let mut take = |k: String| t.remove(&k).with_context(|| format!("{}: no {k}", path.display()));
        let value = take(format!("param.{name}"))?;
        tch::no_grad(|| p.f_copy_(&value)).with_context(|| format!("{}: cannot restore {name}", path.display()))?;
        a.m = take(format!("adam.m.{name}"))?.to_device(p.device());
        a.v = take(format!("adam.v.{name}"))?.to_device(p.device());
        a.step = adam_step;
    }
    Ok(())
}

/// The trainable weights of a from-scratch training run (`train-base`'s phases,
/// `train-encoders`) and their AdamW states, in a fixed (sorted by name) order, with the step
/// reached: what its checkpoint holds.
pub struct Trainable {
    pub names: Vec<String>,
    pub tensors: Vec<Tensor>,
    pub adam: Vec<Adam>,
    pub step: usize,
}

impl Trainable {
    /// The variables of `stores` (unfrozen), each with AdamW at `lr` and the weight decay
    /// `decay(tensor)`.
    pub fn new(stores: Vec<&mut tch::nn::VarStore>, lr: f64, decay: impl Fn(&Tensor) -> f64) -> Self {
        let mut v: Vec<(String, Tensor)> = Vec::new();
        for vs in stores {
            vs.unfreeze();
            v.extend(vs.variables());
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let adam = v.iter().map(|(_, t)| adamw(t, lr, decay(t))).collect();
        let (names, tensors): (Vec<String>, Vec<Tensor>) = v.into_iter().unzip();
        Self { names, tensors, adam, step: 0 }
    }

    /// Writes the checkpoint (weights, moments, `format`, the step, the run's arguments
    /// `identity`, and `extra` metadata) atomically.
    pub fn checkpoint(
        &self,
        path: &std::path::Path,
        format: &str,
        extra: &[(&str, &str)],
        identity: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("format".to_string(), format.to_string());
        for (k, v) in extra {
            meta.insert(k.to_string(), v.to_string());
        }
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert("args".to_string(), serde_json::to_string(identity)?);
        write_adam_checkpoint(path, &self.names, &self.tensors, &self.adam, meta)
    }

    /// Reads a checkpoint of `format` (`what` names it in errors) made with the arguments
    /// `identity` back into the weights, moments and step.
    pub fn restore(
        &mut self,
        path: &std::path::Path,
        format: &str,
        what: &str,
        identity: &serde_json::Value,
    ) -> anyhow::Result<()> {
        use anyhow::Context;
        let meta = crate::subject::job::checkpoint_metadata(path, format, what, identity, None)?;
        read_adam_checkpoint(path, &meta, &self.names, &mut self.tensors, &mut self.adam)?;
        self.step = meta.get("step").context("checkpoint: no step")?.parse()?;
        Ok(())
    }
}

/// Adam over an optimised text conditioning (φ_h of Eq. 10, φ_t of Eq. 4): one [`Adam`] per
/// tensor — the hidden states and, on SDXL, the pooled embeds. Adam is elementwise, so this is
/// one Adam over both.
pub struct TextAdam(Vec<Adam>);

impl TextAdam {
    pub fn new(phi: &crate::pipeline::TextCond, lr: f64) -> Self {
        Self(phi.tensors().into_iter().map(|t| Adam::new(t, lr)).collect())
    }

    /// Backpropagates `loss` into `leaves` (made by [`TextCond::leaves`](crate::pipeline::TextCond::leaves)
    /// from `phi`) and takes one step on `phi`.
    pub fn step(&mut self, phi: &mut crate::pipeline::TextCond, leaves: &crate::pipeline::TextCond, loss: &Tensor) {
        let grads = Tensor::run_backward(&[loss], &leaves.tensors(), false, false);
        for ((p, a), g) in phi.tensors_mut().into_iter().zip(&mut self.0).zip(&grads) {
            a.update(p, g);
        }
    }
}
