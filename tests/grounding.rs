//! Grounding by the diffusion model itself (`guidance::grounding`): SAM prompts from a heat map,
//! the choice among SAM's candidates (agreement, area bound, near-ties), connected components,
//! hole filling and the attention's contrast. Synthetic inputs whose answers are known; CPU
//! only.

mod common;
use common::check_tol;

use hifi_tuner::guidance::grounding::{
    choose, fill_holes, largest_component, prompts_from_heat, AGREE_IOU, IOU_MARGIN, MAX_AREA_RATIO, MAX_HOLE_FRACTION,
};
use hifi_tuner::models::sam::Prediction;
use tch::{Device, Kind, Tensor};

fn zeros(h: i64, w: i64) -> Tensor {
    Tensor::zeros([h, w], (Kind::Float, Device::Cpu))
}

fn set(t: &Tensor, y: i64, x: i64, v: f64) {
    let _ = t.get(y).get(x).fill_(v);
}

fn rect(t: &Tensor, y0: i64, y1: i64, x0: i64, x1: i64, v: f64) {
    let _ = t.narrow(0, y0, y1 - y0).narrow(1, x0, x1 - x0).fill_(v);
}

/// A plateau (0.6 ≥ τ) over rows 10…29, columns 20…49 with four peaks, and a smaller blob
/// elsewhere: the box is the plateau's inclusive extent (not the blob's), the points are the
/// peaks strongest first, skipping the one closer than min(H, W)/8 = 7.5 px to a stronger one.
#[test]
fn box_and_points_come_from_the_largest_hot_region() {
    let heat = zeros(60, 80);
    rect(&heat, 10, 30, 20, 50, 0.6);
    rect(&heat, 50, 53, 5, 8, 0.8); // separate, smaller: not the subject
    set(&heat, 15, 25, 1.0);
    set(&heat, 25, 45, 0.95);
    set(&heat, 16, 26, 0.9); // 1.4 px from the strongest: suppressed
    set(&heat, 28, 35, 0.85);
    let p = prompts_from_heat(&heat).unwrap();
    assert_eq!(p.boxes, Some([20.0, 10.0, 49.0, 29.0]));
    assert_eq!(p.points, vec![(25.0, 15.0, 1), (45.0, 25.0, 1), (35.0, 28.0, 1)]);
    // Nothing above τ: an error, not a prompt.
    assert!(prompts_from_heat(&(zeros(8, 8) + 0.1)).is_err());
}

#[test]
fn largest_component_and_hole_filling() {
    let m = zeros(24, 24);
    rect(&m, 1, 21, 1, 21, 1.0); // 20×20 square …
    rect(&m, 5, 6, 5, 6, 0.0); // … with a 1-pixel hole (0.25 % of it: filled)
    rect(&m, 22, 24, 22, 24, 1.0); // a 2×2 speck
    let big = largest_component(&m);
    assert_eq!(big.sum(Kind::Float).double_value(&[]), 400.0 - 1.0);
    assert_eq!(big.double_value(&[22, 22]), 0.0);
    let filled = fill_holes(&big);
    assert_eq!(filled.sum(Kind::Float).double_value(&[]), 400.0);
    // A notch open to the border is not a hole.
    let notch = zeros(6, 6);
    rect(&notch, 0, 6, 0, 3, 1.0);
    let _ = notch.get(0).get(1).fill_(0.0);
    assert_eq!(fill_holes(&notch).double_value(&[0, 1]), 0.0);
}

/// A ring (the world's: an annulus of radii 0.55 r and r, r = 16 px) keeps its inside open: the
/// inside is about 40 % of the ring's area, far above [`MAX_HOLE_FRACTION`]. A pinhole in the
/// ring and a small hole in a square are filled; a hole just above the fraction is not.
#[test]
fn fill_holes_keeps_a_ring_open() {
    let (n, r) = (48i64, 16.0f64);
    let yy = Tensor::arange(n, (Kind::Float, Device::Cpu)).view([n, 1]) - 24.0;
    let xx = Tensor::arange(n, (Kind::Float, Device::Cpu)).view([1, n]) - 24.0;
    let d = (&yy * &yy + &xx * &xx).sqrt() / r;
    let ring = d.ge(0.55).logical_and(&d.le(1.0)).to_kind(Kind::Float);
    let area = ring.sum(Kind::Float).double_value(&[]);
    let inside = d.lt(0.55).to_kind(Kind::Float).sum(Kind::Float).double_value(&[]);
    assert!(inside / area > 0.4, "the inside is {inside} px of a {area} px ring");
    set(&ring, 24, 24 + 12, 0.0); // a pinhole in the band (d = 0.75)
    let filled = fill_holes(&ring);
    assert_eq!(filled.double_value(&[24, 24]), 0.0, "the ring's inside was filled");
    assert_eq!(filled.double_value(&[24, 36]), 1.0, "the pinhole was not filled");
    assert_eq!(filled.sum(Kind::Float).double_value(&[]), area);
    // A 20×20 square with a 1×3 hole (0.76 % of the mask's 397 px) is filled, with a 2×2 one
    // (4 px, 1.01 % of 396) it is not.
    for ((h, w), filled) in [((1, 3), true), ((2, 2), false)] {
        let m = zeros(24, 24);
        rect(&m, 2, 22, 2, 22, 1.0);
        rect(&m, 8, 8 + h, 8, 8 + w, 0.0);
        let hole = (h * w) as f64;
        assert_eq!(hole <= MAX_HOLE_FRACTION * (400.0 - hole), filled);
        let want = if filled { 400.0 } else { 400.0 - hole };
        assert_eq!(fill_holes(&m).sum(Kind::Float).double_value(&[]), want, "hole {h}×{w}");
    }
}

/// Three candidates: the best predicted IoU lies on the background, so the best *agreeing*
/// one is chosen; when none agrees, the error names the photo.
#[test]
fn the_best_agreeing_candidate_is_chosen() {
    let heat = zeros(20, 20);
    rect(&heat, 5, 15, 5, 15, 1.0);
    let cand = |y0, y1, x0, x1| {
        let l = zeros(20, 20) - 1.0;
        rect(&l, y0, y1, x0, x1, 1.0);
        l
    };
    let logits = Tensor::stack(&[cand(0, 4, 0, 20), cand(6, 14, 6, 14), cand(5, 15, 5, 10)], 0); // (3, 20, 20)
    let pred = Prediction { logits: logits.shallow_clone(), iou: vec![0.99, 0.8, 0.9] };
    // Candidate 2 (IoU 0.5 with the heat) agrees and beats candidate 1 (0.64) on predicted IoU
    // by more than the margin.
    const { assert!(AGREE_IOU <= 0.5 && IOU_MARGIN < 0.1) };
    let m = choose(&pred, &heat, "x.png").unwrap();
    assert!(m.equal(&cand(5, 15, 5, 10).gt(0.0).to_kind(Kind::Float)));
    let pred = Prediction { logits: logits.narrow(0, 0, 1), iou: vec![0.99] };
    let e = choose(&pred, &heat, "photos/x.png").unwrap_err().to_string();
    assert!(e.contains("no subject found in photos/x.png"), "{e}");
}

/// A logit map (−1 outside, +1 inside) with the rectangle rows y0..y1, columns x0..x1.
fn cand(h: i64, w: i64, y0: i64, y1: i64, x0: i64, x1: i64) -> Tensor {
    let l = zeros(h, w) - 1.0;
    rect(&l, y0, y1, x0, x1, 1.0);
    l
}

/// The case: the heat region covers 40 % of the photo, SAM's most confident candidate
/// 95 % (the subject and the background: IoU 0.42 with the region, which passes [`AGREE_IOU`]
/// alone). Its area, 2.4× the region's, exceeds [`MAX_AREA_RATIO`], so the subject's own
/// candidate wins; alone, the swallowing candidate is "no subject found", and the error says
/// why.
#[test]
fn a_candidate_that_swallows_the_background_is_refused() {
    let heat = zeros(20, 20);
    rect(&heat, 2, 18, 5, 15, 1.0); // 16 × 10 = 160 cells = 40 %
    let swallow = zeros(20, 20) + 1.0;
    rect(&swallow, 0, 1, 0, 20, -1.0); // 380 cells = 95 %
    let subject = cand(20, 20, 3, 17, 6, 14); // 14 × 8 = 112 cells, inside the region
    let logits = Tensor::stack(&[swallow.shallow_clone(), subject.shallow_clone()], 0);
    let pred = Prediction { logits, iou: vec![0.97, 0.80] };
    let iou_swallow = 160.0 / 380.0;
    assert!(iou_swallow >= AGREE_IOU && 380.0 / 160.0 > MAX_AREA_RATIO);
    let m = choose(&pred, &heat, "p.png").unwrap();
    assert!(m.equal(&subject.gt(0.0).to_kind(Kind::Float)));
    let alone = Prediction { logits: swallow.unsqueeze(0), iou: vec![0.97] };
    let e = choose(&alone, &heat, "photos/p.png").unwrap_err().to_string();
    assert!(e.contains("no subject found in photos/p.png") && e.contains("2.38× its area"), "{e}");
}

/// Near-ties in predicted IoU (within [`IOU_MARGIN`]) go to the candidate that agrees better
/// with the heat region; a clear lead in predicted IoU still wins.
#[test]
fn near_ties_go_to_the_candidate_that_agrees_best() {
    let heat = zeros(20, 20);
    rect(&heat, 4, 16, 4, 16, 1.0); // 144 cells
    let part = cand(20, 20, 4, 16, 4, 9); // the left part: IoU 60/144 = 0.42
    let whole = cand(20, 20, 5, 15, 5, 15); // IoU 100/144 = 0.69
    let logits = Tensor::stack(&[part.shallow_clone(), whole.shallow_clone()], 0);
    let close = Prediction { logits: logits.shallow_clone(), iou: vec![0.90, 0.90 - IOU_MARGIN / 2.0] };
    assert!(choose(&close, &heat, "p.png").unwrap().equal(&whole.gt(0.0).to_kind(Kind::Float)));
    let clear = Prediction { logits, iou: vec![0.90, 0.90 - 2.0 * IOU_MARGIN] };
    assert!(choose(&clear, &heat, "p.png").unwrap().equal(&part.gt(0.0).to_kind(Kind::Float)));
}

/// The contrast reads the finest level only: a coarse (4×4) level with a sharp blob over a flat
/// fine (8×8) level is "flat" (contrast 1), though the summed map has a region ≥ τ; a fine
/// level with a 2×2 block of 0.5 over 0.1 elsewhere has contrast 0.5 / 0.1 = 5.
#[test]
fn contrast_is_read_at_the_finest_level() {
    use hifi_tuner::attention::{AttentionController, AttnKind, AttnSite, Place};
    use hifi_tuner::guidance::daam::CrossAttnAggregator;
    let site = |n: i64| AttnSite {
        place: Place::Down,
        block: 0,
        attention: 0,
        layer: 0,
        kind: AttnKind::Cross,
        height: n,
        width: n,
    };
    // (B = 1, heads 1, n², 77): token 3 gets `map` (n × n), the rest of each row goes to token 0.
    let probs = |map: &Tensor| -> Tensor {
        let n2 = map.numel() as i64;
        let p = Tensor::zeros([1, 1, n2, 77], (Kind::Float, Device::Cpu));
        p.narrow(3, 3, 1).copy_(&map.view([1, 1, n2, 1]));
        p.narrow(3, 0, 1).copy_(&(map.neg() + 1.0).view([1, 1, n2, 1]));
        p
    };
    let mut agg = CrossAttnAggregator::new(vec![3], (8, 8), false);
    let coarse = zeros(4, 4) + 0.1;
    set(&coarse, 1, 1, 0.9);
    let _ = agg.on_probs(&site(4), probs(&coarse));
    let _ = agg.on_probs(&site(8), probs(&(zeros(8, 8) + 0.1)));
    assert!(agg.mask().unwrap().sum(Kind::Float).double_value(&[]) > 0.0, "the summed map has a region");
    assert_eq!(agg.contrast().unwrap(), vec![1.0]);
    let mut agg = CrossAttnAggregator::new(vec![3], (8, 8), false);
    let fine = zeros(8, 8) + 0.1;
    rect(&fine, 2, 4, 5, 7, 0.5);
    let _ = agg.on_probs(&site(8), probs(&fine));
    let _ = agg.on_probs(&site(4), probs(&(zeros(4, 4) + 0.1)));
    let c = agg.contrast().unwrap()[0];
    check_tol("contrast of the fine map", (c - 5.0).abs(), 1e-5);
}
