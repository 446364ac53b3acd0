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
