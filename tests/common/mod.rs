//! Helpers shared by the integration tests: fixture paths, reference tensors, tolerances.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// The diffusers folder of a tiny fixture model (`tiny-a`, `tiny-b`).
pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// Every tensor of a safetensors file, by name.
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_iter().collect()
}

/// The reference tensors recorded by the fixture scripts for `name` (`{name}.ref.safetensors`).
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    read_tensors(&fixtures().join(format!("{name}.ref.safetensors")))
}

/// One reference tensor, with a message naming the file when the key is missing.
pub fn reference_tensor(name: &str, key: &str) -> Tensor {
    reference(name).remove(key).unwrap_or_else(|| panic!("{name}.ref.safetensors has no key {key}"))
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
