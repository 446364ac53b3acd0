//! Algorithm 4 (§3.3, Eq. 8–9): the similarity transform T_θ that lays a reference subject mask
//! M_r (from a source photo) onto the subject mask M_g of a generated image, and the warps that
//! apply T_θ* to the reference image and mask.
//!
//! # Coordinates and the meaning of θ
//!
//! Each image gets *isotropic normalised coordinates*: the origin is the image centre, x points
//! right, y points down, and one unit is half of the image's **shorter** side. For an H×W image
//! with m = min(H, W), the centre of pixel (row i, column j) is at
//!
//! ```text
//!     x = (j + 0.5 − W/2) / (m/2),    y = (i + 0.5 − H/2) / (m/2)
//! ```
//!
//! so a square image spans [−1, 1]² (pixel centres as in `grid_sample(align_corners=False)`),
//! and a 48×80 one spans [−5/3, 5/3] × [−1, 1]. The same length in these units is the same
//! number of pixels in x and y, so a similarity stays a similarity in pixels, whatever the aspect
//! ratios of the two images.
//!
//! [`Similarity`] θ = (s, φ, tx, ty) maps a point p of the **reference** image to the point
//!
//! ```text
//!     p' = s · R(φ) · p + t,      R(φ) = [[cos φ, −sin φ], [sin φ, cos φ]],   t = (tx, ty)
//! ```
//!
//! of the **target** image (each in its own coordinates above). So the rotation and the scaling
//! are about the reference image's centre; t is where the reference centre lands, measured from
//! the target centre in units of half the target's shorter side: in target pixels the shift is
//! (tx · m'/2, ty · m'/2) with m' = min(H', W'). With y pointing down, φ > 0 turns clockwise on
//! screen. s = 1 maps the reference's shorter side onto the target's shorter side (so for two
//! images of one size, s is the scale in pixels). [`Similarity::pixel_matrix`] gives the same map
//! in pixel coordinates.
//!
//! # The objective, and why not Algorithm 4 read literally
//!
//! Algorithm 4 read literally sums, over the transformed reference points, the distance to the
//! nearest generated point. That one-sided sum is zero for *every* T_θ that puts M_r anywhere
//! inside M_g, so it is minimised by shrinking the reference into the target (and with an
//! imperfect M_g it strictly prefers to shrink away from its ragged edges). Eq. 9 (‖T_θ(M_r) −
//! M_g‖₁) cannot collapse but has no gradient once the masks do not overlap, and its gradient
//! lives on the boundary pixels only. [`fit`] therefore minimises, per start,
//!
//! ```text
//!     L(θ) = Σ_{p∈M_r} w(T p)·D_g(T p) / Σ w  +  mean_{q∈M_g} s·D_r(T⁻¹ q)  +  mean |T_θ(M_r) − M_g|
//!            (reference → target)              (target → reference)          (Eq. 9)
//! ```
//!
//! the chamfer distance in **both** directions plus Eq. 9. D_g, D_r are the exact Euclidean
//! distance transforms of the binarised masks (0 inside, distance to the nearest mask pixel
//! outside, in normalised units, continued outside the image by the distance to its frame),
//! sampled bilinearly, so the chamfer terms are smooth in θ and pull from any distance without
//! the aliasing of nearest-point matching between two pixel grids. The first term alone is the
//! collapsing literal objective (it is 0 when T(M_r) ⊂ M_g); the second is 0 only when
//! M_g ⊂ T(M_r); together they vanish only when the masks coincide. w is a soft indicator
//! (sigmoid, one target pixel wide) of the target frame: reference points that leave the
//! generated image are not penalised, so a subject cropped by the frame is still matched. The
//! Eq. 9 term warps the soft reference mask differentiably (`affine_grid` + `grid_sample`,
//! bilinear, zeros outside) and sharpens the fit to sub-pixel precision. Points are the mask
//! pixels (≥ 0.5), thinned on a regular grid to at most 1024 per mask; masks larger than
//! 128 pixels on the long side are area-downsampled for fitting (θ does not depend on the
//! resolution).
//!
//! # The start and the search
//!
//! Translation from the centroids, scale from the areas (s₀ = √(|M_g| / |M_r|) in normalised
//! units), and nine starting rotations φ₀ ∈ {−60°, −45°, …, 60°}, with t₀ = c_g − s₀R(φ₀)c_r so
//! the centroids coincide. All nine are refined together (a batch) by 200 Adam steps on
//! (ln s, φ, tx, ty) with a learning rate of 0.03 decayed to 0 by a cosine; the start with the
//! lowest final L wins (the first on ties). Rotations beyond about ±75° are not searched: the
//! subjects are assumed upright in both images. Everything runs on the CPU in f64 and is
//! deterministic: the same masks give the same θ, bit for bit.

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A similarity transform from reference to target coordinates (see the module docs):
/// p' = scale · R(rotation) · p + (tx, ty), in isotropic normalised coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Similarity {
    /// s > 0; 1 maps the reference's shorter side onto the target's shorter side.
    pub scale: f64,
    /// φ in radians; positive turns clockwise on screen (y points down).
    pub rotation: f64,
    /// Where the reference centre lands, from the target centre, in half target shorter sides.
    pub tx: f64,
    pub ty: f64,
}

impl Similarity {
    /// The identity (for two images of one size: every pixel stays where it is).
    pub const IDENTITY: Similarity = Similarity { scale: 1.0, rotation: 0.0, tx: 0.0, ty: 0.0 };

    /// `{"scale": s, "rotation": φ (radians), "tx": tx, "ty": ty}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"scale": self.scale, "rotation": self.rotation, "tx": self.tx, "ty": self.ty})
    }

    /// p' = s·R(φ)·p + t, both points in isotropic normalised coordinates.
    pub fn apply(&self, x: f64, y: f64) -> (f64, f64) {
        let (sn, cs) = self.rotation.sin_cos();
        (self.scale * (cs * x - sn * y) + self.tx, self.scale * (sn * x + cs * y) + self.ty)
    }

    /// The same map in pixel coordinates, as a 2×3 matrix A with (x', y') = A · (x, y, 1):
    /// x, y in reference pixels (origin at the top-left corner, pixel (i, j) centred at
    /// (j + 0.5, i + 0.5)) of a `ref_h`×`ref_w` image, x', y' in pixels of an `out_h`×`out_w`
    /// target.
    pub fn pixel_matrix(&self, ref_h: i64, ref_w: i64, out_h: i64, out_w: i64) -> [[f64; 3]; 2] {
        let (hr, wr, ho, wo) = (ref_h as f64, ref_w as f64, out_h as f64, out_w as f64);
        let (mr, mo) = (hr.min(wr) / 2.0, ho.min(wo) / 2.0);
        let (sn, cs) = self.rotation.sin_cos();
        // pixel → normalised: p = (x − W/2)/mr; normalised → pixel: x' = W'/2 + mo·p'.
        let k = self.scale * mo / mr;
        let a = [[k * cs, -k * sn], [k * sn, k * cs]];
        let (cx, cy) = (wr / 2.0, hr / 2.0);
        let bx = wo / 2.0 + mo * self.tx - (a[0][0] * cx + a[0][1] * cy);
        let by = ho / 2.0 + mo * self.ty - (a[1][0] * cx + a[1][1] * cy);
        [[a[0][0], a[0][1], bx], [a[1][0], a[1][1], by]]
    }

    /// The `affine_grid` matrix (align_corners = false) that samples a `ref_h`×`ref_w` input at
    /// T⁻¹ of each output pixel of an `out_h`×`out_w` output.
    fn grid_theta(&self, ref_h: i64, ref_w: i64, out_h: i64, out_w: i64) -> [[f64; 3]; 2] {
        let (sn, cs) = self.rotation.sin_cos();
        let inv = [[cs / self.scale, sn / self.scale], [-sn / self.scale, cs / self.scale]];
        let (di, dout) = (half_extents(ref_h, ref_w), half_extents(out_h, out_w));
        let t = [self.tx, self.ty];
        let mut m = [[0.0; 3]; 2];
        for i in 0..2 {
            for j in 0..2 {
                m[i][j] = inv[i][j] * dout[j] / di[i];
            }
            m[i][2] = -(inv[i][0] * t[0] + inv[i][1] * t[1]) / di[i];
        }
        m
    }
}

/// The result of [`fit`]: θ* and the objective L(θ*) of the module docs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Fit {
    pub theta: Similarity,
    pub loss: f64,
}

/// Half the width and height of an H×W image in isotropic normalised units: (W/m, H/m).
fn half_extents(h: i64, w: i64) -> [f64; 2] {
    let m = h.min(w) as f64;
    [w as f64 / m, h as f64 / m]
}

/// The 2×3 matrix as a (1, 2, 3) f64 tensor on `device`.
fn theta_tensor(m: &[[f64; 3]; 2], device: Device) -> Tensor {
    let flat: Vec<f64> = m.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([1, 2, 3]).to_device(device)
}

/// Warps an image (C, H, W) by θ into a (C, out_h, out_w) output: each output pixel takes the
/// reference value at T⁻¹ of its centre, bilinearly, zero outside the reference. Non-float
/// inputs are converted to f32; float kinds and the device are kept.
pub fn warp(img: &Tensor, theta: &Similarity, out_h: i64, out_w: i64) -> Tensor {
    warp_padded(img, theta, out_h, out_w, 0)
}

/// `padding`: grid_sample's padding mode, 0 zeros, 1 border.
fn warp_padded(img: &Tensor, theta: &Similarity, out_h: i64, out_w: i64, padding: i64) -> Tensor {
    let size = img.size();
    assert!(size.len() == 3, "warp: the image must be (C, H, W), got {size:?}");
    let (c, h, w) = (size[0], size[1], size[2]);
    let img = if img.is_floating_point() { img.shallow_clone() } else { img.to_kind(Kind::Float) };
    let th = theta_tensor(&theta.grid_theta(h, w, out_h, out_w), img.device()).to_kind(img.kind());
    let grid = Tensor::affine_grid_generator(&th, [1, c, out_h, out_w], false); // (1, out_h, out_w, 2)
    img.unsqueeze(0).grid_sampler(&grid, 0, padding, false).squeeze_dim(0) // (C, out_h, out_w)
}

/// [`warp`] for photos: outside the reference each output pixel takes the nearest edge pixel
/// (grid_sample's `padding_mode="border"`), so no zero (mid-grey in [-1, 1]) border appears.
pub fn warp_image(img: &Tensor, theta: &Similarity, out_h: i64, out_w: i64) -> Tensor {
    warp_padded(img, theta, out_h, out_w, 1)
}

/// Warps a mask (H, W) by θ into (out_h, out_w): bilinear as [`warp`], then ≥ 0.5 → 1.0, else 0.0
/// (same float kind as the input, f32 for other kinds).
pub fn warp_mask(mask: &Tensor, theta: &Similarity, out_h: i64, out_w: i64) -> Tensor {
    let size = mask.size();
    assert!(size.len() == 2, "warp_mask: the mask must be (H, W), got {size:?}");
    let w = warp(&mask.unsqueeze(0), theta, out_h, out_w).squeeze_dim(0);
    w.ge(0.5).to_kind(w.kind())
}

/// Intersection over union of two masks of one shape, each binarised at ≥ 0.5. Two empty masks
/// have IoU 1. Panics if the shapes differ.
pub fn iou(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "iou: the masks have different shapes");
    let (a, b) = (a.ge(0.5), b.to_device(a.device()).ge(0.5));
    let inter = a.logical_and(&b).sum(Kind::Int64).int64_value(&[]);
    let union = a.logical_or(&b).sum(Kind::Int64).int64_value(&[]);
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Reads a mask PNG (or any image the `image` crate reads) as an (H, W) f32 tensor in [0, 1]:
/// its luma, white = 1 = subject. Errors name the file.
pub fn load_mask_png(path: &Path) -> Result<Tensor> {
    let img = crate::io::open_image(path)?;
    let l = img.to_luma8();
    let (w, h) = (l.width() as i64, l.height() as i64);
    if w == 0 || h == 0 {
        bail!("mask {} has no pixels", path.display());
    }
    Ok(Tensor::from_slice(l.as_raw()).view([h, w]).to_kind(Kind::Float) / 255.0)
}

/// Writes a mask (H, W) as an 8-bit grayscale PNG, atomically: value v ↦ round(255·clamp(v, 0, 1)).
pub fn save_mask_png(mask: &Tensor, path: &Path) -> Result<()> {
    let (h, w) = mask.size2().context("save_mask_png: the mask must be (H, W)")?;
    let px = (mask.to_device(Device::Cpu).to_kind(Kind::Float).clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .contiguous()
        .view([-1]);
    let mut pixels = vec![0u8; (h * w) as usize];
    px.f_copy_data(&mut pixels, (h * w) as usize)?;
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header()?;
        wr.write_image_data(&pixels)?;
    }
    crate::io::write_bytes_atomic(path, &out)
}

/// Longest side at which masks are fitted; larger ones are area-downsampled.
const FIT_MAX_SIDE: i64 = 128;
/// At most this many points per mask in the chamfer terms.
const MAX_POINTS: usize = 1024;
/// Adam steps, learning rate (cosine-decayed to 0) and starting rotations (degrees).
const STEPS: usize = 200;
const LR: f64 = 0.03;
const START_DEGREES: [f64; 9] = [-60.0, -45.0, -30.0, -15.0, 0.0, 15.0, 30.0, 45.0, 60.0];

/// One mask prepared for fitting, at fitting resolution (h, w), in isotropic units of its
/// original size.
struct Prepared {
    /// Soft mask (h, w), f64.
    soft: Tensor,
    h: i64,
    w: i64,
    /// Half extents (W/m, H/m) of the original image.
    half: [f64; 2],
    /// Thinned mask points (N, 2), (x, y).
    points: Tensor,
    /// Distance transform (h, w) in normalised units: 0 inside, distance to the mask outside.
    dist: Tensor,
    centroid: [f64; 2],
    /// Area in squared normalised units.
    area: f64,
}

impl Prepared {
    fn new(mask: &Tensor, which: &str) -> Result<Self> {
        let size = mask.size();
        ensure!(size.len() == 2, "the {which} mask must be (H, W), got {size:?}");
        let (hh, ww) = (size[0], size[1]);
        ensure!(hh > 0 && ww > 0, "the {which} mask has no pixels");
        let m = mask.to_device(Device::Cpu).to_kind(Kind::Double);
        let (h, w, soft) = if hh.max(ww) > FIT_MAX_SIDE {
            let f = FIT_MAX_SIDE as f64 / hh.max(ww) as f64;
            let (h, w) = (((hh as f64 * f).round() as i64).max(1), ((ww as f64 * f).round() as i64).max(1));
            (h, w, m.view([1, 1, hh, ww]).adaptive_avg_pool2d([h, w]).view([h, w]))
        } else {
            (hh, ww, m)
        };
        let soft = soft.contiguous();
        let mut vals = vec![0f64; (h * w) as usize];
        soft.view([-1]).copy_data(&mut vals, (h * w) as usize);
        let on: Vec<bool> = vals.iter().map(|&v| v >= 0.5).collect();
        let count = on.iter().filter(|&&b| b).count();
        if count == 0 {
            bail!("the {which} mask is empty: no pixel is ≥ 0.5 (white = subject)");
        }
        let half = half_extents(hh, ww);
        let px = [2.0 * half[0] / w as f64, 2.0 * half[1] / h as f64]; // one fit pixel, normalised
        let coord = |i: i64, j: i64| [(j as f64 + 0.5) * px[0] - half[0], (i as f64 + 0.5) * px[1] - half[1]];
        let (mut cx, mut cy) = (0.0, 0.0);
        for i in 0..h {
            for j in 0..w {
                if on[(i * w + j) as usize] {
                    let c = coord(i, j);
                    cx += c[0];
                    cy += c[1];
                }
            }
        }
        let centroid = [cx / count as f64, cy / count as f64];
        // Thin on a regular grid of stride k so that at most MAX_POINTS remain.
        let mut k = ((count as f64 / MAX_POINTS as f64).sqrt().ceil() as i64).max(1);
        let points = loop {
            let mut pts = Vec::new();
            for i in (k / 2..h).step_by(k as usize) {
                for j in (k / 2..w).step_by(k as usize) {
                    if on[(i * w + j) as usize] {
                        pts.extend_from_slice(&coord(i, j));
                    }
                }
            }
            if pts.is_empty() {
                // A mask thinner than the stride: keep all its pixels (count ≤ MAX_POINTS·k²).
                for i in 0..h {
                    for j in 0..w {
                        if on[(i * w + j) as usize] {
                            pts.extend_from_slice(&coord(i, j));
                        }
                    }
                }
                break pts;
            }
            if pts.len() / 2 <= MAX_POINTS {
                break pts;
            }
            k += 1;
        };
        let n = (points.len() / 2) as i64;
        let points = Tensor::from_slice(&points).view([n, 2]);
        let unit = 0.5 * (px[0] + px[1]);
        let dist: Vec<f64> = distance_transform(&on, h as usize, w as usize).into_iter().map(|d| d * unit).collect();
        let dist = Tensor::from_slice(&dist).view([h, w]);
        Ok(Self { soft, h, w, half, points, dist, centroid, area: count as f64 * px[0] * px[1] })
    }

    /// Samples the distance transform at points (X, Y), each (S, N), bilinearly; outside the
    /// outermost pixel centres the value there plus the distance to them. → (S, N).
    fn sample_dist(&self, x: &Tensor, y: &Tensor) -> Tensor {
        let (ex, ey) = (self.half[0] * (1.0 - 1.0 / self.w as f64), self.half[1] * (1.0 - 1.0 / self.h as f64));
        let (xc, yc) = (x.clamp(-ex, ex), y.clamp(-ey, ey));
        let outside = ((x - &xc).square() + (y - &yc).square() + 1e-12).sqrt();
        let s = x.size()[0];
        let grid = Tensor::stack(&[&xc / self.half[0], &yc / self.half[1]], -1).unsqueeze(1); // (S, 1, N, 2)
        let field = self.dist.view([1, 1, self.h, self.w]).expand([s, 1, self.h, self.w], false);
        let v = field.grid_sampler(&grid, 0, 1, false); // (S, 1, 1, N), border padding
        v.view([s, -1]) + outside
    }
}

/// Exact Euclidean distance transform (Felzenszwalb & Huttenlocher): for each pixel, the
/// distance in pixels to the nearest `on` pixel (0 on them). `on` must have a true entry.
fn distance_transform(on: &[bool], h: usize, w: usize) -> Vec<f64> {
    const FAR: f64 = 1e20;
    let mut g: Vec<f64> = on.iter().map(|&b| if b { 0.0 } else { FAR }).collect();
    let n = h.max(w);
    let (mut f, mut d, mut v, mut z) = (vec![0.0; n], vec![0.0; n], vec![0usize; n], vec![0.0; n + 1]);
    for j in 0..w {
        for i in 0..h {
            f[i] = g[i * w + j];
        }
        edt_1d(&f[..h], &mut d[..h], &mut v, &mut z);
        for i in 0..h {
            g[i * w + j] = d[i];
        }
    }
    for i in 0..h {
        f[..w].copy_from_slice(&g[i * w..(i + 1) * w]);
        edt_1d(&f[..w], &mut d[..w], &mut v, &mut z);
        g[i * w..(i + 1) * w].copy_from_slice(&d[..w]);
    }
    g.into_iter().map(f64::sqrt).collect()
}

/// Squared distance transform of a sampled function in 1-D: d[q] = min_p (q − p)² + f[p].
fn edt_1d(f: &[f64], d: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    let sq = |q: usize| (q * q) as f64;
    let mut k = 0usize;
    v[0] = 0;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    for q in 1..n {
        let mut s;
        loop {
            let p = v[k];
            s = ((f[q] + sq(q)) - (f[p] + sq(p))) / (2.0 * (q as f64 - p as f64));
            if s <= z[k] && k > 0 {
                k -= 1;
            } else {
                break;
            }
        }
        k += 1;
        v[k] = q;
        z[k] = s;
        z[k + 1] = f64::INFINITY;
    }
    k = 0;
    for (q, dq) in d.iter_mut().enumerate() {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        let dp = q as f64 - p as f64;
        *dq = dp * dp + f[p];
    }
}

/// The objective of the module docs for a batch of parameters (S, 4) = (ln s, φ, tx, ty) → (S,).
fn objective_batch(r: &Prepared, g: &Prepared, p: &Tensor) -> Tensor {
    let nb = p.size()[0];
    let s = p.select(1, 0).exp(); // (S,)
    let phi = p.select(1, 1);
    let (tx, ty) = (p.select(1, 2), p.select(1, 3));
    let (c, sn) = (phi.cos(), phi.sin());
    let col = |t: &Tensor| t.unsqueeze(1); // (S, 1)

    // Reference → target: transformed reference points against the target's distance field,
    // weighted by a soft indicator of the target frame.
    let (x, y) = (r.points.select(1, 0).unsqueeze(0), r.points.select(1, 1).unsqueeze(0)); // (1, N)
    let xt = col(&s) * (col(&c) * &x - col(&sn) * &y) + col(&tx); // (S, N)
    let yt = col(&s) * (col(&sn) * &x + col(&c) * &y) + col(&ty);
    let tau = g.half[0] / g.w as f64 + g.half[1] / g.h as f64; // one target fit pixel
    let wgt = ((-xt.abs() + g.half[0]) / tau).sigmoid() * ((-yt.abs() + g.half[1]) / tau).sigmoid();
    let a = (g.sample_dist(&xt, &yt) * &wgt).sum_dim_intlist([1i64].as_slice(), false, Kind::Double)
        / wgt.sum_dim_intlist([1i64].as_slice(), false, Kind::Double).clamp_min(1e-9);

    // Target → reference: target points mapped back by T⁻¹ against the reference's distance
    // field; × s turns reference units into target units.
    let (qx, qy) = (g.points.select(1, 0).unsqueeze(0) - col(&tx), g.points.select(1, 1).unsqueeze(0) - col(&ty));
    let u = (col(&c) * &qx + col(&sn) * &qy) / col(&s); // (S, M)
    let v = (col(&c) * &qy - col(&sn) * &qx) / col(&s);
    let b = r.sample_dist(&u, &v).mean_dim([1i64].as_slice(), false, Kind::Double) * &s;

    // Eq. 9: L1 between the soft reference warped by T_θ and the target, over target pixels.
    let (di, dout) = (r.half, g.half);
    let is = s.reciprocal();
    let inv = [[&c * &is, &sn * &is], [-(&sn * &is), &c * &is]];
    let t = [&tx, &ty];
    let mut rows = Vec::new();
    for i in 0..2 {
        let m0 = &inv[i][0] * (dout[0] / di[i]);
        let m1 = &inv[i][1] * (dout[1] / di[i]);
        let m2 = -(&inv[i][0] * t[0] + &inv[i][1] * t[1]) / di[i];
        rows.push(Tensor::stack(&[m0, m1, m2], -1)); // (S, 3)
    }
    let th = Tensor::stack(&rows, 1); // (S, 2, 3)
    let grid = Tensor::affine_grid_generator(&th, [nb, 1, g.h, g.w], false); // (S, h', w', 2)
    let src = r.soft.view([1, 1, r.h, r.w]).expand([nb, 1, r.h, r.w], false);
    let warped = src.grid_sampler(&grid, 0, 0, false).view([nb, g.h, g.w]);
    let e = (warped - g.soft.unsqueeze(0)).abs().mean_dim([1i64, 2].as_slice(), false, Kind::Double);

    a + b + e
}

fn params_of(t: &Similarity) -> [f64; 4] {
    [t.scale.ln(), t.rotation, t.tx, t.ty]
}

/// The objective L(θ) of the module docs (what [`fit`] minimises) for masks of any sizes.
pub fn objective(reference: &Tensor, target: &Tensor, theta: &Similarity) -> Result<f64> {
    ensure!(theta.scale > 0.0 && theta.scale.is_finite(), "the scale must be positive, got {}", theta.scale);
    let (r, g) = (Prepared::new(reference, "reference")?, Prepared::new(target, "target")?);
    let p = Tensor::from_slice(&params_of(theta)).view([1, 4]);
    Ok(tch::no_grad(|| objective_batch(&r, &g, &p)).double_value(&[0]))
}

/// Fits θ* so that T_θ*(reference) lies on target (both (H, W) masks in [0, 1], any sizes, any
/// device; fitting runs on the CPU). See the module docs for the objective and the search. An
/// empty mask (no pixel ≥ 0.5) is an error naming it.
pub fn fit(reference: &Tensor, target: &Tensor) -> Result<Fit> {
    let r = Prepared::new(reference, "reference")?;
    let g = Prepared::new(target, "target")?;
    let s0 = (g.area / r.area).sqrt();
    let mut init = Vec::new();
    for deg in START_DEGREES {
        let phi = deg.to_radians();
        let (sn, cs) = phi.sin_cos();
        let (cr, cg) = (r.centroid, g.centroid);
        let t = [cg[0] - s0 * (cs * cr[0] - sn * cr[1]), cg[1] - s0 * (sn * cr[0] + cs * cr[1])];
        init.extend_from_slice(&[s0.ln(), phi, t[0], t[1]]);
    }
    let n = START_DEGREES.len() as i64;
    let p = Tensor::from_slice(&init).view([n, 4]).set_requires_grad(true);
    // Adam (β = 0.9, 0.999, ε = 1e-8) on all starts at once: the losses are independent, so the
    // gradient of their sum is each start's own gradient.
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    let mut m1 = Tensor::zeros([n, 4], (Kind::Double, Device::Cpu));
    let mut m2 = Tensor::zeros([n, 4], (Kind::Double, Device::Cpu));
    for step in 0..STEPS {
        let lr = LR * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / STEPS as f64).cos());
        let loss = objective_batch(&r, &g, &p).sum(Kind::Double);
        let grad = Tensor::run_backward(&[&loss], &[&p], false, false).remove(0);
        tch::no_grad(|| {
            m1 = &m1 * b1 + &grad * (1.0 - b1);
            m2 = &m2 * b2 + grad.square() * (1.0 - b2);
            let t = (step + 1) as i32;
            let mhat = &m1 / (1.0 - b1.powi(t));
            let vhat = &m2 / (1.0 - b2.powi(t));
            let mut pv = p.shallow_clone();
            pv -= mhat / (vhat.sqrt() + eps) * lr;
        });
    }
    let losses = tch::no_grad(|| objective_batch(&r, &g, &p));
    let mut lv = vec![0f64; n as usize];
    losses.copy_data(&mut lv, n as usize);
    let mut best = 0;
    for (i, l) in lv.iter().enumerate() {
        if *l < lv[best] || lv[best].is_nan() {
            best = i;
        }
    }
    let mut q = [0f64; 4];
    p.detach().select(0, best as i64).copy_data(&mut q, 4);
    ensure!(lv[best].is_finite() && q.iter().all(|v| v.is_finite()), "mask alignment diverged (loss {})", lv[best]);
    Ok(Fit { theta: Similarity { scale: q[0].exp(), rotation: q[1], tx: q[2], ty: q[3] }, loss: lv[best] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_transform_matches_brute_force() {
        let (h, w) = (7usize, 9usize);
        let on: Vec<bool> = (0..h * w).map(|k| k % 11 == 3 || k == 40).collect();
        let d = distance_transform(&on, h, w);
        for i in 0..h {
            for j in 0..w {
                let mut best = f64::INFINITY;
                for a in 0..h {
                    for b in 0..w {
                        if on[a * w + b] {
                            let dd = ((i as f64 - a as f64).powi(2) + (j as f64 - b as f64).powi(2)).sqrt();
                            best = best.min(dd);
                        }
                    }
                }
                assert!((d[i * w + j] - best).abs() < 1e-9, "({i},{j}): {} vs {best}", d[i * w + j]);
            }
        }
    }

    #[test]
    fn pixel_matrix_agrees_with_apply() {
        let t = Similarity { scale: 1.3, rotation: 0.4, tx: 0.2, ty: -0.1 };
        let (hr, wr, ho, wo) = (40i64, 60i64, 48i64, 80i64);
        let a = t.pixel_matrix(hr, wr, ho, wo);
        let (px, py) = (13.5f64, 29.5f64);
        let mr = hr.min(wr) as f64 / 2.0;
        let mo = ho.min(wo) as f64 / 2.0;
        let (x, y) = ((px - wr as f64 / 2.0) / mr, (py - hr as f64 / 2.0) / mr);
        let (xn, yn) = t.apply(x, y);
        let (ex, ey) = (wo as f64 / 2.0 + xn * mo, ho as f64 / 2.0 + yn * mo);
        let (gx, gy) = (a[0][0] * px + a[0][1] * py + a[0][2], a[1][0] * px + a[1][1] * py + a[1][2]);
        assert!((gx - ex).abs() < 1e-9 && (gy - ey).abs() < 1e-9, "{gx},{gy} vs {ex},{ey}");
    }
}
