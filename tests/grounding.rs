//! Grounding by the diffusion model itself (`guidance::grounding`): SAM prompts from a heat map,
//! the choice among SAM's candidates, connected components and hole filling. Synthetic inputs
//! whose answers are known; CPU only.

use hifi_tuner::guidance::grounding::{choose, fill_holes, largest_component, prompts_from_heat, AGREE_IOU};
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
    let m = zeros(12, 12);
    rect(&m, 1, 8, 1, 8, 1.0); // 7×7 square …
    rect(&m, 3, 6, 3, 6, 0.0); // … with a 3×3 hole
    rect(&m, 10, 12, 10, 12, 1.0); // a 2×2 speck
    let big = largest_component(&m);
    assert_eq!(big.sum(Kind::Float).double_value(&[]), 49.0 - 9.0);
    assert_eq!(big.double_value(&[10, 10]), 0.0);
    let filled = fill_holes(&big);
    assert_eq!(filled.sum(Kind::Float).double_value(&[]), 49.0);
    // A notch open to the border is not a hole.
    let notch = zeros(6, 6);
    rect(&notch, 0, 6, 0, 3, 1.0);
    let _ = notch.get(0).get(1).fill_(0.0);
    assert_eq!(fill_holes(&notch).double_value(&[0, 1]), 0.0);
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
    // Candidate 2 (IoU 0.5 with the heat) agrees and beats candidate 1 (0.64) on predicted IoU.
    const { assert!(AGREE_IOU <= 0.5) };
    let m = choose(&pred, &heat, "x.png").unwrap();
    assert!(m.equal(&cand(5, 15, 5, 10).gt(0.0).to_kind(Kind::Float)));
    let pred = Prediction { logits: logits.narrow(0, 0, 1), iou: vec![0.99] };
    let e = choose(&pred, &heat, "photos/x.png").unwrap_err().to_string();
    assert!(e.contains("no subject found in photos/x.png"), "{e}");
}
