//! The `sam` and `mask` subcommands, `learn --sam` without masks and
//! `generate --reference-guidance --sam`, on the tiny fixtures (random weights: these check the
//! plumbing, files and errors, not mask quality, which needs real weights — scripts/mask_iou.py).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
    c.env_remove("RUST_BACKTRACE");
    c
}

fn dog(i: u32) -> PathBuf {
    fixtures().join(format!("photos/dog/{i:02}.jpg"))
}

fn mask_cmd(out: &Path, sam: bool, images: &[PathBuf]) -> Output {
    let mut c = bin();
    c.args(["mask", "--model"])
        .arg(model_dir("tiny-a"))
        .args(["--class-noun", "dog", "--device", "cpu", "--out"])
        .arg(out);
    if sam {
        c.arg("--sam").arg(model_dir("sam-tiny"));
    }
    c.args(images).output().unwrap()
}

fn rgb(p: &Path) -> image::RgbImage {
    image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8()
}

#[test]
fn mask_writes_masks_and_overlays() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("masks");
    let o = mask_cmd(&out, true, &[dog(0), dog(1)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    for i in [0, 1] {
        let photo = rgb(&dog(i));
        let m = image::open(out.join(format!("{i:02}.png"))).unwrap().to_luma8();
        let ov = rgb(&out.join(format!("{i:02}.overlay.png")));
        assert_eq!((m.dimensions(), ov.dimensions()), (photo.dimensions(), photo.dimensions()));
        assert!(m.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
        let inside = m.pixels().filter(|p| p.0[0] == 255).count();
        assert!(inside > 0, "the mask must mark the subject (≥ 1 % or the command fails)");
        // The overlay is the photo outside the mask and tinted inside it.
        for ((mp, op), pp) in m.pixels().zip(ov.pixels()).zip(photo.pixels()) {
            if mp.0[0] == 0 {
                assert_eq!(op, pp);
            } else {
                assert_eq!(op.0[0], ((pp.0[0] as f32 + 255.0) / 2.0).round_ties_even() as u8);
                // libtorch rounds half to even
            }
        }
    }
    // Without SAM: the coarse attention mask, with a warning.
    let out2 = tmp.path().join("coarse");
    let o = mask_cmd(&out2, false, &[dog(0)]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("coarse"));
    assert!(out2.join("00.png").is_file() && out2.join("00.overlay.png").is_file());
}

#[test]
fn bad_inputs_name_the_file_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken.png");
    std::fs::write(&broken, b"not a png").unwrap();
    let out = tmp.path().join("out");
    let o = mask_cmd(&out, true, &[dog(0), broken.clone()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("broken.png"), "{err}");
    assert!(!out.exists(), "nothing may be written");
    // A missing SAM folder.
    let o = bin()
        .args(["sam", "--model"])
        .arg(tmp.path().join("no-sam"))
        .arg("--image")
        .arg(dog(0))
        .args(["--box", "1,2,30,40", "--out"])
        .arg(tmp.path().join("m.png"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-sam"));
    // A malformed box.
    let o = bin()
        .args(["sam", "--model"])
        .arg(model_dir("sam-tiny"))
        .arg("--image")
        .arg(dog(0))
        .args(["--box", "1,2,3", "--out"])
        .arg(tmp.path().join("m.png"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("--box"));
    assert!(!tmp.path().join("m.png").exists());
}

/// `sam` prints the candidates' predicted IoUs; they match transformers' for the same prompts
/// (the fixture's "both" case) up to the pre-processing's rare 1/255 roundings (5e-3). A box
/// gets SAM's single output by default, the three with `--multimask on`.
#[test]
fn sam_prints_iou_and_writes_the_best_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.png");
    for (flag, key, n) in [("auto", "both.single.iou_scores", 1), ("on", "both.iou_scores", 3)] {
        let o = bin()
            .args(["sam", "--model"])
            .arg(model_dir("sam-tiny"))
            .arg("--image")
            .arg(fixtures().join("sam/photo-small.png"))
            .args(["--box", "8,10,33,41", "--point", "20,25", "--device", "cpu", "--multimask", flag, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got: Vec<f64> = serde_json::from_slice(&o.stdout).unwrap();
        let want = Vec::<f64>::try_from(reference_tensor("sam", key).to_kind(tch::Kind::Double).view([-1])).unwrap();
        assert_eq!(got.len(), n, "--multimask {flag}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 5e-3, "--multimask {flag}: {got:?} vs {want:?}");
        }
        assert_eq!(image::open(&out).unwrap().to_luma8().dimensions(), (48, 40));
    }
}

/// A box wholly outside the photo (48 × 40) is refused before SAM runs, naming the box and the
/// photo's size; so is a point outside it. Nothing is written.
#[test]
fn sam_refuses_a_box_outside_the_photo() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.png");
    for (arg, needle) in [
        ("--box=60,10,90,30", "--box 60,10,90,30 lies wholly outside"),
        ("--box=-30,-20,-1,-1", "--box -30,-20,-1,-1 lies wholly outside"),
        ("--box=10,40,20,50", "--box 10,40,20,50 lies wholly outside"),
        ("--point=50,3", "--point 50,3 lies outside"),
    ] {
        let o = bin()
            .args(["sam", "--model"])
            .arg(model_dir("sam-tiny"))
            .arg("--image")
            .arg(fixtures().join("sam/photo-small.png"))
            .args([arg, "--device", "cpu", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{arg}: {err}");
        assert!(err.contains(needle) && err.contains("photo-small.png") && err.contains("48 × 40"), "{err}");
        assert!(!out.exists());
    }
    // A box that only partly overlaps the photo is fine.
    let o = bin()
        .args(["sam", "--model"])
        .arg(model_dir("sam-tiny"))
        .arg("--image")
        .arg(fixtures().join("sam/photo-small.png"))
        .args(["--box", "30,20,90,80", "--device", "cpu", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `learn --sam` on photos alone computes and keeps the masks, then guidance uses SAM for M_g.
#[test]
fn learn_with_sam_then_guided_generation_with_sam() {
    let tmp = tempfile::tempdir().unwrap();
    let subject = tmp.path().join("dog");
    let o = bin()
        .args(["learn", "--model"])
        .arg(model_dir("tiny-a"))
        .arg("--images")
        .arg(fixtures().join("photos/dog"))
        .arg("--sam")
        .arg(model_dir("sam-tiny"))
        .args(["--class-noun", "dog", "--steps", "2", "--stepwise-steps", "1", "--ddim-steps", "6", "--device", "cpu"])
        .arg("--out")
        .arg(&subject)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("computed the subject masks with SAM"), "{err}");
    assert!(!err.contains("no --masks"), "the loss must be masked: {err}");
    for s in ["00", "01", "02"] {
        assert!(subject.join("masks").join(format!("{s}.png")).is_file());
    }
    let out = tmp.path().join("g.png");
    let o = bin()
        .args(["generate", "--model"])
        .arg(model_dir("tiny-a"))
        .args(["--prompt", "a dog on the beach", "--steps", "6", "--seed", "4", "--device", "cpu", "--subject"])
        .arg(&subject)
        .args(["--reference-guidance", "--t-start", "5", "--t-end", "2", "--guidance-steps", "1", "--sam"])
        .arg(model_dir("sam-tiny"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(out.is_file());
    // With random SAM weights M_g tends to be degenerate (whole image), so the run may fall back
    // to I_g1; either way it must have reached M_g through SAM without an error.
    assert!(err.contains("reference guidance:") || err.contains("M_g"), "{err}");
}
