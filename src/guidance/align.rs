//! Algorithm 4 (Eq. 8–9): fitting a similarity transform T_θ between two masks.
//! (Placeholder: centroid and area-ratio start only; the fitted version replaces it.)

use anyhow::{bail, Result};
use serde::Serialize;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Similarity {
    pub scale: f64,
    pub rotation: f64,
    pub tx: f64,
    pub ty: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct Fit {
    pub theta: Similarity,
    pub loss: f64,
}

fn stats(m: &Tensor) -> Result<(f64, f64, f64)> {
    let (h, w) = m.size2()?;
    let on = m.ge(0.5).to_kind(Kind::Float);
    let area = on.sum(Kind::Float).double_value(&[]);
    if area == 0.0 {
        bail!("empty mask");
    }
    let ys = Tensor::linspace(-1.0, 1.0, h, (Kind::Float, m.device())).view([h, 1]);
    let xs = Tensor::linspace(-1.0, 1.0, w, (Kind::Float, m.device())).view([1, w]);
    let cy = (&on * ys).sum(Kind::Float).double_value(&[]) / area;
    let cx = (&on * xs).sum(Kind::Float).double_value(&[]) / area;
    Ok((cx, cy, area / (h * w) as f64))
}

pub fn fit(reference: &Tensor, target: &Tensor) -> Result<Fit> {
    let (rx, ry, ra) = stats(reference)?;
    let (gx, gy, ga) = stats(target)?;
    let s = (ga / ra).sqrt();
    Ok(Fit { theta: Similarity { scale: s, rotation: 0.0, tx: gx - s * rx, ty: gy - s * ry }, loss: 0.0 })
}

pub fn warp(img: &Tensor, theta: &Similarity, out_h: i64, out_w: i64) -> Tensor {
    // Output coords p' → reference coords p = R^-1 (p' − t) / s.
    let (c, s) = (theta.rotation.cos(), theta.rotation.sin());
    let k = 1.0 / theta.scale;
    let a = [k * c, k * s, -k * (c * theta.tx + s * theta.ty), -k * s, k * c, -k * (-s * theta.tx + c * theta.ty)];
    let aff = Tensor::from_slice(&a.map(|v| v as f32)).view([1, 2, 3]).to_device(img.device());
    let grid = Tensor::affine_grid_generator(&aff, [1, img.size()[0], out_h, out_w], true);
    img.unsqueeze(0).grid_sampler(&grid, 0, 0, true).squeeze_dim(0)
}

pub fn warp_mask(mask: &Tensor, theta: &Similarity, out_h: i64, out_w: i64) -> Tensor {
    warp(&mask.unsqueeze(0), theta, out_h, out_w).squeeze_dim(0).ge(0.5).to_kind(Kind::Float)
}

pub fn iou(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.ge(0.5), b.ge(0.5));
    let i = a.logical_and(&b).sum(Kind::Float).double_value(&[]);
    let u = a.logical_or(&b).sum(Kind::Float).double_value(&[]);
    if u == 0.0 { 0.0 } else { i / u }
}
