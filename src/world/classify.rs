//! Does a model trained on the world follow its prompts? A small CNN, trained on fresh renders
//! (every caption combination, a world seed the base model never saw), names an image's
//! colour, shape and scene; [`prompt_following`] generates images for caption combinations and
//! counts how often the classifier reads back what the caption asked for — on the combinations
//! held out of training ([`super::held_out_combo`]) and on seen ones.
//!
//! The CNN is our own measuring instrument, not an upstream network, so its parameter names
//! are ours. Its accuracy on held-out renders is reported with the rates: a rate is only as
//! good as the instrument.

use super::{caption, render, Object, Paint, Placement, Rng, COLOURS, SCENES, SHAPES, SIZE};
use crate::pipeline::{GenerateRequest, StableDiffusion};
use anyhow::Result;
use serde::Serialize;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// The world seed of the classifier's renders (distinct from any training world).
const CLASSIFIER_WORLD: u64 = 0x000C_1A55;

pub struct Classifier {
    _vs: nn::VarStore,
    body: nn::Sequential,
    colour: nn::Linear,
    shape: nn::Linear,
    scene: nn::Linear,
}

/// A render of any combination (held-out ones included): (colour, shape, scene, image bytes).
fn any_sample(seed: u64, index: u64) -> (usize, usize, usize, Vec<u8>) {
    let mut rng = Rng::for_item(seed, 3, index);
    let (c, s, e) = (rng.below(COLOURS.len()), rng.below(SHAPES.len()), rng.below(SCENES.len()));
    let place = Placement::draw(&mut rng);
    let bg = (rng.uniform() * 1e9) as u64 ^ index << 20;
    (c, s, e, render(Object { shape: s, paint: Paint::Solid(c) }, e, place, bg).rgb)
}

/// (B, 3, 64, 64) in [-1, 1] and the three label vectors of renders `from..from+n`.
fn batch(from: u64, n: usize, dev: Device) -> (Tensor, [Tensor; 3]) {
    let mut px = Vec::with_capacity(n * SIZE * SIZE * 3);
    let (mut a, mut b, mut c) = (vec![], vec![], vec![]);
    for i in 0..n as u64 {
        let (col, sh, sc, rgb) = any_sample(CLASSIFIER_WORLD, from + i);
        px.extend_from_slice(&rgb);
        a.push(col as i64);
        b.push(sh as i64);
        c.push(sc as i64);
    }
    let s = SIZE as i64;
    let x = Tensor::from_slice(&px).view([n as i64, s, s, 3]).permute([0, 3, 1, 2]).to_kind(Kind::Float) / 127.5 - 1.0;
    let l = |v: Vec<i64>| Tensor::from_slice(&v).to_device(dev);
    (x.to_device(dev), [l(a), l(b), l(c)])
}

impl Classifier {
    /// Trains the classifier (`steps` Adam steps at batch 64; seeded, so the same every time).
    pub fn train(steps: usize, dev: Device) -> Result<(Self, f64)> {
        let vs = nn::VarStore::new(dev);
        let p = vs.root();
        let conv = |i, o, s, name: &str| {
            nn::conv2d(&p / name, i, o, 3, nn::ConvConfig { stride: s, padding: 1, ..Default::default() })
        };
        let (body, colour, shape, scene) = crate::rng::seeded(7, || {
            let body = nn::seq()
                .add(conv(3, 32, 1, "c1"))
                .add_fn(|x| x.relu())
                .add(conv(32, 64, 2, "c2"))
                .add_fn(|x| x.relu())
                .add(conv(64, 64, 2, "c3"))
                .add_fn(|x| x.relu())
                .add(conv(64, 128, 2, "c4"))
                .add_fn(|x| x.relu())
                .add_fn(|x| x.mean_dim([2i64, 3].as_slice(), false, Kind::Float)); // (B, 128)
            let lin = |n, name: &str| nn::linear(&p / name, 128, n, Default::default());
            (
                body,
                lin(COLOURS.len() as i64, "colour"),
                lin(SHAPES.len() as i64, "shape"),
                lin(SCENES.len() as i64, "scene"),
            )
        });
        let me = Self { _vs: vs, body, colour, shape, scene };
        let mut opt = nn::Adam::default().build(&me._vs, 2e-3)?;
        let bar = crate::progress::bar(steps as u64, "classifier");
        for step in 0..steps {
            let (x, y) = batch(step as u64 * 64, 64, dev);
            let (a, b, c) = me.logits(&x);
            let loss = a.cross_entropy_for_logits(&y[0])
                + b.cross_entropy_for_logits(&y[1])
                + c.cross_entropy_for_logits(&y[2]);
            opt.backward_step(&loss);
            bar.inc(1);
        }
        bar.finish_and_clear();
        // accuracy (all three right) on 512 renders it never saw
        let (x, y) = batch(1 << 40, 512, dev);
        let pred = tch::no_grad(|| me.predict(&x));
        let ok = pred[0].eq_tensor(&y[0]).logical_and(&pred[1].eq_tensor(&y[1])).logical_and(&pred[2].eq_tensor(&y[2]));
        let acc = ok.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        Ok((me, acc))
    }

    fn logits(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let h = self.body.forward(x);
        (self.colour.forward(&h), self.shape.forward(&h), self.scene.forward(&h))
    }

    /// The (colour, shape, scene) indices of images (B, 3, 64, 64) in [-1, 1].
    pub fn predict(&self, x: &Tensor) -> [Tensor; 3] {
        let (a, b, c) = self.logits(x);
        [a.argmax(-1, false), b.argmax(-1, false), c.argmax(-1, false)]
    }
}

/// The rates of one group of captions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rates {
    pub images: usize,
    pub colour: f64,
    pub shape: f64,
    pub scene: f64,
    pub all_three: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptFollowing {
    /// The classifier's all-three accuracy on renders.
    pub classifier_accuracy: f64,
    pub held_out: Rates,
    pub seen: Rates,
    pub steps: usize,
    pub guidance: f64,
}

/// Generates `per_caption` images (seeds 0..) of every held-out combination and of as many
/// seen ones (every 7th), and scores them with `clf`.
pub fn prompt_following(
    sd: &StableDiffusion,
    clf: &Classifier,
    classifier_accuracy: f64,
    per_caption: usize,
    steps: usize,
    guidance: f64,
) -> Result<PromptFollowing> {
    let mut held = vec![];
    let mut seen = vec![];
    let mut k = 0;
    for c in 0..COLOURS.len() {
        for s in 0..SHAPES.len() {
            for e in 0..SCENES.len() {
                if super::held_out_combo(c, s, e) {
                    held.push((c, s, e));
                } else {
                    if k % 7 == 0 {
                        seen.push((c, s, e));
                    }
                    k += 1;
                }
            }
        }
    }
    let bar = crate::progress::bar(((held.len() + seen.len()) * per_caption) as u64, "prompt following");
    let rate = |combos: &[(usize, usize, usize)]| -> Result<Rates> {
        let mut r = Rates::default();
        let (h, w) = sd.default_hw();
        for &(c, s, e) in combos {
            for seed in 0..per_caption as u64 {
                let req = GenerateRequest {
                    prompt: caption(c, s, e),
                    negative_prompt: None,
                    seed,
                    steps,
                    guidance,
                    height: h,
                    width: w,
                    num_images: 1,
                };
                let img = sd.generate(&req)?; // (1, H, W, 3) uint8
                let x = img.permute([0, 3, 1, 2]).to_kind(Kind::Float) / 127.5 - 1.0;
                let p = tch::no_grad(|| clf.predict(&x.to_device(sd.device)));
                let got =
                    [p[0].int64_value(&[0]) as usize, p[1].int64_value(&[0]) as usize, p[2].int64_value(&[0]) as usize];
                r.images += 1;
                r.colour += (got[0] == c) as i32 as f64;
                r.shape += (got[1] == s) as i32 as f64;
                r.scene += (got[2] == e) as i32 as f64;
                r.all_three += (got == [c, s, e]) as i32 as f64;
                bar.inc(1);
            }
        }
        let n = r.images.max(1) as f64;
        r.colour /= n;
        r.shape /= n;
        r.scene /= n;
        r.all_three /= n;
        Ok(r)
    };
    let held_out = rate(&held)?;
    let seen = rate(&seen)?;
    bar.finish_and_clear();
    Ok(PromptFollowing { classifier_accuracy, held_out, seen, steps, guidance })
}
