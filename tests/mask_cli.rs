//! The `sam` and `mask` subcommands, `learn --sam` without masks and
//! `generate --reference-guidance --sam`, on the tiny fixtures (random weights: these check the
//! plumbing, files and errors) and on the world model (`assets/world-model`), whose attention
//! finds the world's shapes: "no subject found" on a blank photo, and mask quality against the
//! world's exact masks.
//!
//! The random tiny-a's attention is nearly flat on any photo (contrast 1.28, under
//! `MIN_CONTRAST`), so the SAM path runs on it with `--min-contrast 1`. The random SAM proposes
//! about the whole photo: on the dog photos that is 2.5× the heat region and refused; on a
//! uniform photo the heat region covers 54–59 % of it and the whole photo (1.7–1.8×) is
//! accepted, which is what the success paths use.

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

fn mask_cmd(out: &Path, sam: bool, images: &[PathBuf], extra: &[&str]) -> Output {
    let mut c = bin();
    c.args(["mask", "--model"])
        .arg(model_dir("tiny-a"))
        .args(["--class-noun", "dog", "--device", "cpu", "--out"])
        .arg(out)
        .args(extra);
    if sam {
        c.arg("--sam").arg(model_dir("sam-tiny"));
    }
    c.args(images).output().unwrap()
}

/// 64×64 photos of one colour each (tan, blue, white) in `dir`.
fn uniform_photos(dir: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    [("tan", [180u8, 140, 100]), ("blue", [40, 60, 160]), ("white", [255, 255, 255])]
        .iter()
        .map(|(name, c)| {
            let p = dir.join(format!("{name}.png"));
            let pixels = (0..64 * 64).flat_map(|_| *c).collect();
            hifi_tuner::io::RgbImage { width: 64, height: 64, pixels }.save_png(&p, &[]).unwrap();
            p
        })
        .collect()
}

fn rgb(p: &Path) -> image::RgbImage {
    image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8()
}

/// With SAM (tiny-a, `--min-contrast 1`, uniform photos: see the module docs): masks and
/// overlays for every photo. Without SAM, on the world model and a world photo: the coarse
/// attention mask, with a warning.
#[test]
fn mask_writes_masks_and_overlays() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("masks");
    let photos = uniform_photos(&tmp.path().join("photos"))[..2].to_vec();
    let o = mask_cmd(&out, true, &photos, &["--min-contrast", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    for path in &photos {
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let photo = rgb(path);
        let m = image::open(out.join(format!("{stem}.png"))).unwrap().to_luma8();
        let ov = rgb(&out.join(format!("{stem}.overlay.png")));
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
    let (_, ball, _) = world_photos(tmp.path(), 0).remove(0);
    let o = world_mask(&[&ball], "ball", &out2, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("coarse"));
    assert!(out2.join("quartered_ball.png").is_file() && out2.join("quartered_ball.overlay.png").is_file());
}

/// On the dog photos the random tiny-a finds no subject (flat attention), and with
/// `--min-contrast 1` the random SAM's masks swallow the background (2.5× the heat region):
/// both are "no subject found", naming the photo, with nothing written.
#[test]
fn mask_refuses_photos_without_a_subject_in_either_step() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("masks");
    let photo = dog(0);
    let o = mask_cmd(&out, true, std::slice::from_ref(&photo), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("no subject found in {}", photo.display())) && err.contains("nearly flat"), "{err}");
    let o = mask_cmd(&out, true, std::slice::from_ref(&photo), &["--min-contrast", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("no subject found in {}", photo.display())), "{err}");
    assert!(err.contains("neither SAM's mask for the box") && err.contains("× its area"), "{err}");
    assert!(!out.exists(), "nothing may be written");
}

#[test]
fn bad_inputs_name_the_file_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken.png");
    std::fs::write(&broken, b"not a png").unwrap();
    let out = tmp.path().join("out");
    let o = mask_cmd(&out, true, &[dog(0), broken.clone()], &[]);
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
            check_tol(&format!("--multimask {flag}: printed vs stored"), (g - w).abs(), 5e-3);
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

/// `learn --sam` on photos alone: on the dog photos the random model finds no subject, an
/// error naming the first photo, with no masks written; on uniform photos with
/// `--min-contrast 1` it computes and keeps the masks (see the module docs), then guidance uses
/// SAM for M_g.
#[test]
fn learn_with_sam_then_guided_generation_with_sam() {
    let tmp = tempfile::tempdir().unwrap();
    let subject = tmp.path().join("dog");
    let learn = |images: &Path, extra: &[&str]| {
        bin()
            .args(["learn", "--model"])
            .arg(model_dir("tiny-a"))
            .arg("--images")
            .arg(images)
            .arg("--sam")
            .arg(model_dir("sam-tiny"))
            .args(["--class-noun", "dog", "--steps", "2", "--stepwise-steps", "1", "--ddim-steps", "6"])
            .args(["--device", "cpu"])
            .args(extra)
            .arg("--out")
            .arg(&subject)
            .output()
            .unwrap()
    };
    let o = learn(&fixtures().join("photos/dog"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("no subject found in {}", dog(0).display())), "{err}");
    assert!(!subject.join("masks").exists(), "no masks may be written");
    let photos = tmp.path().join("photos");
    uniform_photos(&photos);
    let o = learn(&photos, &["--min-contrast", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("computed the subject masks with SAM"), "{err}");
    assert!(!err.contains("no --masks"), "the loss must be masked: {err}");
    for s in ["tan", "blue", "white"] {
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

/// The shipped world model (`assets/world-model`): its attention knows the world's shapes.
fn world_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world-model")
}

/// Writes photo `k` of each of the five validation subjects of the world into `dir` (`NAME.png`); returns (class noun,
/// photo path, exact mask as 0/1 bytes) per subject.
fn world_photos(dir: &Path, k: usize) -> Vec<(&'static str, PathBuf, Vec<u8>)> {
    use hifi_tuner::world::{dataset, N_VALIDATION, SHAPES, SUBJECTS};
    SUBJECTS[..N_VALIDATION]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let r = dataset::subject_photo(0, i, k);
            let path = dir.join(format!("{}.png", s.name));
            dataset::rgb_image(&r).save_png(&path, &[]).unwrap();
            (SHAPES[s.object.shape], path, r.mask.iter().map(|&m| u8::from(m >= 128)).collect())
        })
        .collect()
}

fn world_mask(images: &[&Path], class_noun: &str, out: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["mask", "--model"])
        .arg(world_model())
        .args(["--class-noun", class_noun, "--device", "cpu"])
        .args(extra)
        .arg("--out")
        .arg(out)
        .args(images)
        .output()
        .unwrap()
}

/// A blank grey photo has no subject: the attention of "ball" on it is nearly flat (contrast
/// 1.25 on the world model, under `MIN_CONTRAST`), so `mask` says "no subject found", naming the
/// photo, and writes nothing, not even the masks of the good photos given with it. Today's
/// 58 % mask comes back only when asked for with `--min-contrast 1`.
#[test]
fn mask_on_a_blank_photo_says_no_subject_found() {
    let tmp = tempfile::tempdir().unwrap();
    let grey = tmp.path().join("grey.png");
    hifi_tuner::io::RgbImage { width: 64, height: 64, pixels: vec![128; 64 * 64 * 3] }.save_png(&grey, &[]).unwrap();
    let ball = world_photos(tmp.path(), 0).remove(0);
    assert_eq!(ball.0, "ball");
    let out = tmp.path().join("masks");
    let o = world_mask(&[&ball.1, &grey], "ball", &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("no subject found in {}", grey.display())) && err.contains("contrast"), "{err}");
    assert!(err.contains("--min-contrast"), "the error says how to override: {err}");
    assert!(!out.exists(), "nothing may be written");
    let o = world_mask(&[&grey], "ball", &out, &["--min-contrast", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("grey.png").is_file());
    let o = world_mask(&[&grey], "ball", &tmp.path().join("x"), &["--min-contrast", "nan"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--min-contrast"));
}

/// Mask quality where the truth is known (docs/experiments.md, "Mask quality against the exact masks"): `mask`
/// (attention only: there is no SAM that knows the world) on photo 0 of each of the five
/// validation subjects (photos turned 11–52° since issue 19), IoU against the world's exact
/// masks. Measured: ball 0.899, cube 0.297, pyramid 0.195, ring 0.523, star 0.656, mean 0.514.
/// The floor, 0.45 on the mean, is 0.064 under it: the heat maps move by ~1e-5 between CPUs
/// and thread counts, which can flip a few boundary pixels of masks of hundreds, far less than
/// that; a mask that ignores the photo (the noun's attention on a grey photo, its prior) scored
/// 0.18 on the upright photos, so attention of the wrong tokens or a broken heat map falls far
/// below it. None of the five may be refused.
#[test]
fn mask_quality_on_the_world_subjects_holds() {
    const FLOOR: f64 = 0.45;
    let tmp = tempfile::tempdir().unwrap();
    let mut ious = vec![];
    for (noun, photo, truth) in world_photos(tmp.path(), 0) {
        let out = tmp.path().join(format!("out-{noun}"));
        let o = world_mask(&[&photo], noun, &out, &[]);
        assert!(o.status.success(), "{noun}: {}", String::from_utf8_lossy(&o.stderr));
        let m = image::open(out.join(photo.file_name().unwrap())).unwrap().to_luma8();
        let (inter, union) = m.pixels().zip(&truth).fold((0, 0), |(i, u), (p, &t)| {
            let p = u8::from(p.0[0] >= 128);
            (i + (p & t) as usize, u + (p | t) as usize)
        });
        let iou = inter as f64 / union as f64;
        eprintln!("{noun}: IoU {iou:.3}");
        ious.push(iou);
    }
    let mean = ious.iter().sum::<f64>() / ious.len() as f64;
    eprintln!("mean IoU {mean:.3}");
    assert!(mean >= FLOOR, "mean mask IoU on the world {mean:.3} < {FLOOR} ({ious:?})");
}
