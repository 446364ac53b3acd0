//! Adam with its state in plain tensors, so a checkpoint can hold it and a resumed run continues
//! bit-identically (tch's `nn::Adam` keeps its state inside libtorch where it cannot be saved).
//! The update is PyTorch's `torch.optim.Adam` (no weight decay, no amsgrad).

use tch::Tensor;

#[derive(Debug)]
pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Updates taken so far.
    pub step: i64,
    /// First and second moment estimates, shaped like the parameter.
    pub m: Tensor,
    pub v: Tensor,
}

impl Adam {
    /// A fresh optimiser for a parameter shaped like `like`.
    pub fn new(like: &Tensor, lr: f64) -> Self {
        Self { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 0, m: like.zeros_like(), v: like.zeros_like() }
    }

    /// One update of `param` (a leaf requiring grad) from `grad`, in place, outside autograd.
    pub fn update(&mut self, param: &mut Tensor, grad: &Tensor) {
        tch::no_grad(|| {
            self.step += 1;
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
