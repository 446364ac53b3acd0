//! `generate --reference-guidance` end to end on tiny-a with a subject from `learn`.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
    c.env_remove("RUST_BACKTRACE");
    c
}

fn learn(out: &Path) {
    let o = bin()
        .args(["learn", "--model"])
        .arg(model_dir("tiny-a"))
        .arg("--images")
        .arg(fixtures().join("photos/dog"))
        .arg("--masks")
        .arg(fixtures().join("photos/dog-masks"))
        .args([
            "--class-noun",
            "dog",
            "--steps",
            "3",
            "--stepwise-steps",
            "1",
            "--ddim-steps",
            "6",
            "--device",
            "cpu",
            "--out",
        ])
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn guided(subject: &Path, out: &Path, extra: &[&str]) -> Output {
    guided_t(subject, out, ("5", "2"), extra)
}

fn guided_t(subject: &Path, out: &Path, (t_start, t_end): (&str, &str), extra: &[&str]) -> Output {
    bin()
        .args(["generate", "--model"])
        .arg(model_dir("tiny-a"))
        .args(["--prompt", "a dog on the beach", "--steps", "6", "--seed", "4", "--device", "cpu", "--subject"])
        .arg(subject)
        .args(["--reference-guidance", "--t-start", t_start, "--t-end", t_end, "--guidance-steps", "2"])
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn reference_guidance_end_to_end_is_deterministic_and_writes_intermediates() {
    let tmp = tempfile::tempdir().unwrap();
    let subject = tmp.path().join("dog");
    learn(&subject);
    let a = tmp.path().join("a.png");
    let o = guided(&subject, &a, &["--save-intermediates"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("mask alignment"), "without --dino the choice is by alignment: {err}");
    let dir = tmp.path().join("a-intermediates");
    for f in [
        "I_g1.png",
        "M_g.png",
        "reference.png",
        "reference_aligned.png",
        "M_r_star.png",
        "I_g2.png",
        "strip.png",
        "theta.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let b = tmp.path().join("b.png");
    let o = guided(&subject.join("subject.safetensors"), &b, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(image::open(&a).unwrap().to_rgb8(), image::open(&b).unwrap().to_rgb8(), "deterministic");
    // With DINO choosing the reference.
    let c = tmp.path().join("c.png");
    let o = guided(&subject, &c, &["--dino", fixtures().join("dino-tiny").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("DINO cosine"), "{err}");
}

/// Attention over I_g1 whose contrast is under `--min-contrast` finds no subject (the class
/// noun's attention on tiny-a here: 1.51, so a bar of 100 is missed for sure): M_g falls back
/// to the plain image with a warning that says why, and the image is still written. A bad
/// value is refused.
#[test]
fn flat_subject_attention_falls_back_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let subject = tmp.path().join("dog");
    learn(&subject);
    let out = tmp.path().join("flat.png");
    let o = guided(&subject, &tmp.path().join("nan.png"), &["--min-contrast", "nan"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--min-contrast") && err.contains("not a finite number"), "{err}");
    assert!(!tmp.path().join("nan.png").exists());
    let o = guided(&subject, &out, &["--min-contrast", "100"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("M_g: no subject found in I_g1") && err.contains("falling back to plain generation"), "{err}");
    assert!(out.is_file());
}

#[test]
fn bad_guidance_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let subject = tmp.path().join("dog");
    learn(&subject);
    let out = tmp.path().join("x.png");
    let o = guided_t(&subject, &out, ("2", "5"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--t-end"));
    // w ≤ 1: φ_h would get no gradient.
    let o = guided(&subject, &out, &["--guidance", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--guidance > 1"), "{err}");
    assert!(!out.exists());
    // A reference mask of another size than its photo.
    let masks = tmp.path().join("masks");
    std::fs::create_dir_all(&masks).unwrap();
    for s in ["00", "01", "02"] {
        image::GrayImage::from_pixel(32, 32, image::Luma([255])).save(masks.join(format!("{s}.png"))).unwrap();
    }
    let o = guided(
        &subject,
        &out,
        &[
            "--references",
            fixtures().join("photos/dog").to_str().unwrap(),
            "--reference-masks",
            masks.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("same size") && err.contains("00.png"), "{err}");
    assert!(!out.exists());
}
