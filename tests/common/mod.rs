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
#[track_caller]
pub fn assert_close(a: &Tensor, b: &Tensor, rel: f64, what: &str) {
    let scale = b.to_kind(Kind::Double).abs().max().double_value(&[]).max(1.0);
    let d = max_abs_diff(a, b);
    check_tol(what, d, rel * scale);
}

/// Asserts `observed ≤ bound` for a difference that comes from float rounding (kernels, batch
/// layout, thread count), and records it for `make test-portable`: with `HIFI_TOL_LOG` set, one
/// line `max <TAB> file:line <TAB> test <TAB> what <TAB> observed <TAB> bound` is appended to
/// that file, and `scripts/tolerance_margins.py` reports the smallest margin bound / observed
/// of each check over the CPU-capability × thread-count runs (it must stay ≥ 5).
#[track_caller]
pub fn check_tol(what: &str, observed: f64, bound: f64) {
    record("max", what, observed, bound, std::panic::Location::caller());
    assert!(observed <= bound, "{what}: {observed:.3e} exceeds the tolerance {bound:.3e}");
}

/// Asserts `observed ≥ floor` for an effect that must stand out of the rounding (an edit moves
/// the latents, two branches differ), recorded like [`check_tol`] (margin observed / floor).
#[track_caller]
pub fn check_min(what: &str, observed: f64, floor: f64) {
    record("min", what, observed, floor, std::panic::Location::caller());
    assert!(observed >= floor, "{what}: {observed:.3e} is below {floor:.3e}");
}

fn record(kind: &str, what: &str, observed: f64, bound: f64, at: &std::panic::Location) {
    let Ok(path) = std::env::var("HIFI_TOL_LOG") else { return };
    use std::io::Write;
    let test = std::thread::current().name().unwrap_or("?").to_string();
    let what = what.replace(['\t', '\n'], " ");
    let line = format!("{kind}\t{}:{}\t{test}\t{what}\t{observed:e}\t{bound:e}\n", at.file(), at.line());
    // One write per line with O_APPEND: lines from concurrent test binaries do not interleave.
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("HIFI_TOL_LOG");
    f.write_all(line.as_bytes()).expect("HIFI_TOL_LOG");
}

pub const MODELS: [&str; 3] = ["tiny-a", "tiny-b", "tiny-sd2"];

/// Runs `c` slowed down (`HIFI_TUNER_STEP_DELAY_MS=delay_ms` between its steps) and kills it
/// (SIGKILL) once `ready()` holds and `after` more has passed: the "killed mid-run" half of the
/// resume tests. Fails if it is not ready within `limit`, or ends before it could be killed.
pub fn kill_when(
    c: &mut std::process::Command,
    delay_ms: u64,
    limit: std::time::Duration,
    what: &str,
    ready: impl Fn() -> bool,
    after: std::time::Duration,
) {
    c.env("HIFI_TUNER_STEP_DELAY_MS", delay_ms.to_string());
    let mut child = c.stderr(std::process::Stdio::null()).spawn().unwrap();
    let started = std::time::Instant::now();
    while !ready() {
        assert!(started.elapsed() < limit, "the run never reached {what}");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(after);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Runs `c`, fails with its stderr unless it succeeds; returns the stderr.
pub fn run_ok(c: &mut std::process::Command) -> String {
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "failed: {err}");
    err
}

/// The `hifi-tuner` binary of this build, without RUST_BACKTRACE (errors read as users see them).
pub fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
    c.env_remove("RUST_BACKTRACE");
    c
}

/// A finished command's stderr, as text.
pub fn err(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
pub fn assert_ok(o: &std::process::Output) {
    assert!(o.status.success(), "{}", err(o));
}

/// The command failed as a refused input does (exit 1, no panic) and said `needle`.
#[track_caller]
pub fn assert_fails(o: &std::process::Output, needle: &str) {
    let e = err(o);
    assert_eq!(o.status.code(), Some(1), "expected failure: {e}");
    assert!(e.contains(needle), "error should mention {needle:?}: {e}");
    assert!(!e.contains("panicked"), "{e}");
}

/// A PNG's pixels as RGB bytes.
pub fn png_rgb(path: &Path) -> Vec<u8> {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8().into_raw()
}

/// Two uint8 image batches are the same image for the pipeline-parity tests: in 8-bit levels,
/// a mean |diff| ≤ 0.1 and a maximum of one level (a rounding flip at .5).
#[track_caller]
pub fn assert_same_image(ours: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(ours.size(), want.size(), "{what}");
    let diff = (ours.to_kind(Kind::Float) - want.to_kind(Kind::Float)).abs();
    let mean = diff.mean(Kind::Double).double_value(&[]);
    let max = diff.max().double_value(&[]);
    assert!(mean <= 0.1 && max <= 1.0, "{what}: mean |diff| {mean} max {max} (8-bit levels)");
}
