//! Helpers shared by the integration tests: fixture paths, reference tensors, tolerances.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// The diffusers folder of a tiny fixture model (`tiny-a`, `tiny-b`).
pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// The reference tensors recorded by `scripts/make_fixtures.py` for a model.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let p = fixtures().join(format!("{name}.ref.safetensors"));
    Tensor::read_safetensors(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).into_iter().collect()
}

/// The string metadata of a reference file.
pub fn reference_meta(name: &str) -> HashMap<String, String> {
    hifi_tuner::load::safetensors_metadata(&fixtures().join(format!("{name}.ref.safetensors"))).unwrap()
}

/// max |a − b|.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Asserts max |a − b| ≤ rel · max(1, max |b|), the tolerance the parity tests state.
pub fn assert_close(a: &Tensor, b: &Tensor, rel: f64, what: &str) {
    let scale = b.to_kind(Kind::Double).abs().max().double_value(&[]).max(1.0);
    let d = max_abs_diff(a, b);
    assert!(d <= rel * scale, "{what}: max |diff| {d:.3e} exceeds {rel:.0e} × {scale:.3}");
}

pub const MODELS: [&str; 2] = ["tiny-a", "tiny-b"];
