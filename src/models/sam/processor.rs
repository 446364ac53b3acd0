//! `SamProcessor`'s pre- and post-processing, with the model's input side S (1024 for ViT-B) in
//! place of the processor's `size`/`pad_size`:
//!
//! - resize so that the longer side is S (the shorter one `int(side · S / longest + 0.5)`) with
//!   PIL's `BILINEAR` on 8-bit pixels (antialiased when shrinking; here libtorch's
//!   `_upsample_bilinear2d_aa` on uint8, PIL's filter with its fixed-point weights: measured to
//!   differ from PIL by 1 in under 0.1 % of the pixels), rescale by 1/255,
//!   normalise by the ImageNet mean/std, pad with zeros at the bottom and right to S × S;
//! - prompt coordinates (x, y) in pixels of the original image, scaled by new/old per axis;
//! - `post_process_masks`: low-resolution logits → bilinear to S × S → crop the unpadded part →
//!   bilinear to the original size → `> 0`.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// A photo prepared for SAM.
#[derive(Debug)]
pub struct Prepared {
    /// (1, 3, S, S)
    pub pixel_values: Tensor,
    /// (height, width) of the photo.
    pub original: (i64, i64),
    /// (height, width) after the resize, before the padding.
    pub reshaped: (i64, i64),
}

/// `_get_preprocess_shape`: (h, w) with the longer side `longest`.
pub fn preprocess_shape((h, w): (i64, i64), longest: i64) -> (i64, i64) {
    let scale = longest as f64 / h.max(w) as f64;
    ((h as f64 * scale + 0.5) as i64, (w as f64 * scale + 0.5) as i64)
}

/// Pre-processing for a model of input side `s`: `image` is (H, W, 3) uint8.
pub fn preprocess(image: &Tensor, s: i64) -> Result<Prepared> {
    let (h, w, c) = image.size3()?;
    if c != 3 || image.kind() != Kind::Uint8 || h == 0 || w == 0 {
        bail!("SAM needs an (H, W, 3) 8-bit RGB image, got {:?} {:?}", image.size(), image.kind());
    }
    let (nh, nw) = preprocess_shape((h, w), s);
    let dev = image.device();
    // (1, 3, H, W) uint8 on the CPU, where libtorch's uint8 AA path (PIL's fixed-point filter) runs.
    let x = image.to_device(tch::Device::Cpu).permute([2, 0, 1]).unsqueeze(0);
    let x =
        if (nh, nw) == (h, w) { x } else { Tensor::internal_upsample_bilinear2d_aa(&x, [nh, nw], false, None, None) };
    let x = x.to_device(dev).to_kind(Kind::Float); // 0…255
    let mean = Tensor::from_slice(&MEAN).view([1, 3, 1, 1]).to_device(dev);
    let std = Tensor::from_slice(&STD).view([1, 3, 1, 1]).to_device(dev);
    let x = (x / 255.0 - mean) / std;
    let pixel_values = x.constant_pad_nd([0, s - nw, 0, s - nh]); // (1, 3, S, S), zeros bottom/right
    Ok(Prepared { pixel_values, original: (h, w), reshaped: (nh, nw) })
}

/// `_normalize_coordinates`: (…, 2) x, y in original pixels → the resized frame.
pub fn normalize_coords(xy: &Tensor, original: (i64, i64), s: i64) -> Tensor {
    let (nh, nw) = preprocess_shape(original, s);
    let f = Tensor::from_slice(&[nw as f64 / original.1 as f64, nh as f64 / original.0 as f64])
        .to_kind(Kind::Float)
        .to_device(xy.device());
    xy.to_kind(Kind::Float) * f
}

/// `post_process_masks(binarize=False)`: logits (1, K, m, m) → (1, K, H, W) logits at the
/// original size; `> 0` gives the masks.
pub fn post_process_logits(masks: &Tensor, p: &Prepared, s: i64) -> Tensor {
    let m = masks.upsample_bilinear2d([s, s], false, None, None); // (1, K, S, S)
    let m = m.narrow(2, 0, p.reshaped.0).narrow(3, 0, p.reshaped.1); // the unpadded part
    m.upsample_bilinear2d([p.original.0, p.original.1], false, None, None)
}
