//! The procedural world, its ground-truth score and `train-base` (weight-free: random tiny
//! networks; the shipped model's own test is `world_model.rs`).

mod common;

use common::fixtures;
use hifi_tuner::world::dataset::{
    baseline, ground_truth, ground_truth_dir, mean_colour, subject_photo, write_world, Baseline, PHOTO_SCENES,
    PROMPT_SCENES,
};
use hifi_tuner::world::score::{fidelity, render_tensors};
use hifi_tuner::world::{
    caption, held_out_combo, held_out_pattern, random_view, render, sample, training_object, Family, Object, Paint,
    Placement, Procedural, Rng, COLOURS, N_VALIDATION, PALETTE, SCENES, SHAPES, SIZE, SUBJECTS,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[test]
fn the_world_is_a_function_of_its_seed() {
    for i in [0u64, 1, 77, 12345] {
        let (a, b) = (sample(3, i), sample(3, i));
        assert_eq!((a.colour, a.shape, a.scene), (b.colour, b.shape, b.scene));
        assert_eq!(a.render, b.render, "sample {i} differs between two calls");
    }
    // item i does not depend on the items drawn before it, and other seeds give other images
    let later = sample(3, 77);
    let _ = sample(3, 5);
    assert_eq!(later.render, sample(3, 77).render);
    let differ = (0..8).filter(|&i| sample(3, i).render != sample(4, i).render).count();
    assert_eq!(differ, 8, "seeds 3 and 4 should give different images");
    // the dataset photos and the ground truth too
    assert_eq!(subject_photo(0, 1, 2), subject_photo(0, 1, 2));
    assert_eq!(ground_truth(0, SUBJECTS[0].object, 2), ground_truth(0, SUBJECTS[0].object, 2));
}

/// The nearest training colour of an RGB pixel by direction (shading scales a colour).
fn nearest_colour(p: [u8; 3]) -> usize {
    let unit = |c: [f32; 3]| {
        let n = (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt().max(1e-6);
        [c[0] / n, c[1] / n, c[2] / n]
    };
    let f = |c: [u8; 3]| [c[0] as f32, c[1] as f32, c[2] as f32];
    let q = unit(f(p));
    (0..COLOURS.len())
        .max_by(|&a, &b| {
            let d = |k: usize| {
                let c = unit(f(COLOURS[k].1));
                q[0] * c[0] + q[1] * c[1] + q[2] * c[2]
            };
            d(a).total_cmp(&d(b))
        })
        .unwrap()
}

#[test]
fn captions_masks_and_pixels_agree() {
    let mut seen_held_out = 0;
    for i in 0..200u64 {
        let s = sample(0, i);
        let cap = caption(s.colour, s.shape, s.scene);
        assert!(cap.contains(COLOURS[s.colour].0) && cap.contains(SHAPES[s.shape]) && cap.ends_with(SCENES[s.scene].1));
        seen_held_out += held_out_combo(s.colour, s.shape, s.scene) as usize;
        // the mask covers a plausible object: between a small star and the largest ball
        let full: Vec<usize> = (0..SIZE * SIZE).filter(|&k| s.render.mask[k] == 255).collect();
        assert!(full.len() > 60 && full.len() < 1400, "sample {i} ({cap}): {} object pixels", full.len());
        // the pixels under the mask have the caption's colour: at least 85 % of them are nearest
        // to it by direction (the rest: specular highlights, clamped bright faces)
        let right = full
            .iter()
            .filter(|&&k| {
                nearest_colour([s.render.rgb[3 * k], s.render.rgb[3 * k + 1], s.render.rgb[3 * k + 2]]) == s.colour
            })
            .count();
        assert!(
            right * 100 >= full.len() * 85,
            "sample {i} ({cap}): only {right}/{} pixels are {}",
            full.len(),
            COLOURS[s.colour].0
        );
        // outside the mask the object is absent: the same background without the object is
        // identical wherever the mask is 0 (and no shadow falls there)
    }
    assert_eq!(seen_held_out, 0, "held-out caption combinations must never be sampled");
    // "an" before a vowel
    assert_eq!(caption(1, 0, 0), "an orange ball on the grass");
}

#[test]
fn the_mask_is_exactly_where_the_object_changes_the_image() {
    // a transparent object would leave the render unchanged: compare renders with two
    // different paints at the same placement and background
    let place = Placement { cx: 30.0, cy: 33.0, r: 15.0, angle: 0.0 };
    for (shape, shape_name) in SHAPES.iter().enumerate() {
        for scene in [0usize, 2, 5, 7] {
            let a = render(Object { shape, paint: Paint::Solid(0) }, scene, place, 9);
            let b = render(Object { shape, paint: Paint::Solid(4) }, scene, place, 9);
            assert_eq!(a.mask, b.mask);
            for k in 0..SIZE * SIZE {
                let differs = (0..3).any(|c| a.rgb[3 * k + c] != b.rgb[3 * k + c]);
                if a.mask[k] == 0 {
                    assert!(!differs, "{shape_name} in {}: pixel {k} changed outside the mask", SCENES[scene].0);
                }
                if a.mask[k] == 255 {
                    assert!(
                        differs,
                        "{} in {}: pixel {k} inside the mask did not change",
                        SHAPES[shape], SCENES[scene].0
                    );
                }
            }
        }
    }
}

#[test]
fn the_dataset_folder_is_a_benchmark_dataset_with_ground_truth() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("w");
    write_world(&out, 0, 4, 16).unwrap();
    let ds = hifi_tuner::benchmark::Dataset::open(&out.join("dataset")).unwrap();
    assert_eq!(ds.subjects.len(), SUBJECTS.len());
    assert_eq!(ds.object_prompts.len(), PROMPT_SCENES.len());
    for (s, info) in SUBJECTS.iter().zip(&ds.subjects) {
        assert_eq!((s.name, SHAPES[s.object.shape]), (info.name.as_str(), info.class.as_str()));
        for k in 0..4 {
            assert!(out.join("dataset").join(s.name).join(format!("{k:02}.png")).is_file());
            let m = hifi_tuner::io::load_rgb_u8(&out.join("masks").join(s.name).join(format!("{k:02}.png"))).unwrap();
            assert!(m.gt(127).sum(tch::Kind::Int64).int64_value(&[]) > 3 * 100, "{} photo {k}: mask too small", s.name);
        }
    }
    // the prompts name new scenes, never the photos' scenes
    for (p, &scene) in ds.object_prompts.iter().zip(&PROMPT_SCENES) {
        assert!(p.ends_with(SCENES[scene].1), "{p}");
        assert!(!PHOTO_SCENES.contains(&scene));
    }
    assert_eq!(ground_truth_dir(&out.join("dataset")), Some(out.join("ground_truth")));
    assert_eq!(ground_truth_dir(&fixtures().join("photos")), None);
    // refuses to overwrite
    let e = write_world(&out, 0, 4, 0).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
}

#[test]
fn the_ground_truth_score_finds_the_subject_and_tells_patterns_apart() {
    let ball = SUBJECTS[0].object;
    let gt = ground_truth(0, ball, 1);
    let (gt_img, gt_mask) = render_tensors(&gt);
    // the ground truth against itself: 0 at scale 1 where it lies
    let f = fidelity(&gt_img, &gt_img, &gt_mask).unwrap();
    assert!(f.rmse < 1e-3 && f.hist > 0.999, "{f:?}");
    // the subject moved and shrunk in the same scene: found, and still close (the background
    // under the mask is not scored; the residue is resampling at another scale)
    let moved = render(ball, 1, Placement { cx: 22.0, cy: 40.0, r: 13.0, angle: 0.0 }, 5);
    let f_moved = fidelity(&render_tensors(&moved).0, &gt_img, &gt_mask).unwrap();
    // a plain blue ball at the same place (the class, not the subject) and another subject
    let plain = render(
        Object { shape: 0, paint: Paint::Solid(4) },
        1,
        Placement { cx: 22.0, cy: 40.0, r: 13.0, angle: 0.0 },
        5,
    );
    let f_plain = fidelity(&render_tensors(&plain).0, &gt_img, &gt_mask).unwrap();
    let other = render(SUBJECTS[3].object, 1, Placement { cx: 22.0, cy: 40.0, r: 13.0, angle: 0.0 }, 5);
    let f_other = fidelity(&render_tensors(&other).0, &gt_img, &gt_mask).unwrap();
    eprintln!("moved {f_moved:?}\nplain {f_plain:?}\nother {f_other:?}");
    assert!((f_moved.scale - 0.8).abs() < 0.11, "the match should be at ≈ 13/16: {f_moved:?}");
    assert!(
        f_moved.rmse < 0.6 * f_plain.rmse && f_moved.rmse < 0.6 * f_other.rmse,
        "{f_moved:?} {f_plain:?} {f_other:?}"
    );
    assert!(f_moved.hist > f_plain.hist + 0.2 && f_moved.hist > f_other.hist + 0.2);
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hifi-tuner"))
}

/// `train-base` with tiny networks (test configs), `images` training images.
fn train_cmd(out: &Path, vae_steps: usize, unet_steps: usize) -> Command {
    let mut c = bin();
    c.args(["train-base", "--device", "cpu", "--images", "48", "--vae-batch", "4", "--unet-batch", "4"])
        .args(["--vae-steps", &vae_steps.to_string(), "--unet-steps", &unet_steps.to_string()])
        .args(["--checkpoint-every", "3", "--warmup", "1", "--unet-lr", "1e-3"])
        .arg("--unet-config")
        .arg(fixtures().join("world/unet.json"))
        .arg("--vae-config")
        .arg(fixtures().join("world/vae.json"))
        .arg("--out")
        .arg(out);
    c
}

/// (phase, step, loss) of each log line.
fn losses(dir: &Path) -> Vec<(String, u64, f64)> {
    std::fs::read_to_string(dir.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["phase"].as_str().unwrap().to_string(), v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn a_few_training_steps_lower_both_losses_and_the_folder_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    common::run_ok(&mut train_cmd(&out, 24, 24));
    let l = losses(&out);
    for phase in ["vae", "unet"] {
        let v: Vec<f64> = l.iter().filter(|x| x.0 == phase).map(|x| x.2).collect();
        assert_eq!(v.len(), 24);
        // each batch is a fresh draw of images (and ε, t), so single steps are noisy: compare the
        // means of the first and the last 6 steps. At initialisation the VAE's loss is ≈ 1 (and
        // falls by half within 20 steps at lr 1e-3) and the UNet's ≈ 1.5 (ε has variance 1; the
        // random UNet's output adds to it), falling towards 1 at lr 1e-3 without warm-up.
        let first: f64 = v[..6].iter().sum::<f64>() / 6.0;
        let last: f64 = v[18..].iter().sum::<f64>() / 6.0;
        eprintln!("{phase}: {first:.4} → {last:.4}");
        assert!(last < 0.8 * first, "{phase}: the loss did not fall: {first} → {last}");
    }
    // a complete diffusers folder that our pipeline loads and samples from
    assert!(!out.join("vae-checkpoint.safetensors").exists() && !out.join("unet-checkpoint.safetensors").exists());
    let sd = hifi_tuner::pipeline::StableDiffusion::load(&out, tch::Device::Cpu).unwrap();
    let cfg: serde_json::Value = hifi_tuner::load::read_json(&out.join("vae/config.json")).unwrap();
    let sf = cfg["scaling_factor"].as_f64().unwrap();
    assert!(sf.is_finite() && sf > 0.0 && sf != 1.0, "the scaling factor is measured: {sf}");
    assert_eq!(sd.default_hw(), (64, 64));
}

#[test]
fn a_killed_train_base_run_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    common::run_ok(&mut train_cmd(&a, 5, 8));
    // b: killed in the UNet phase after its first checkpoint (step 3), then resumed
    let b = tmp.path().join("b");
    // (killed a step past the checkpoint, to be redone)
    let ckpt = b.join("unet-checkpoint.safetensors");
    let (limit, after) = (Duration::from_secs(300), Duration::from_millis(400));
    common::kill_when(&mut train_cmd(&b, 5, 8), 300, limit, "its UNet checkpoint", || ckpt.exists(), after);
    assert!(!b.join("unet/diffusion_pytorch_model.safetensors").exists(), "killed before the end");
    // resuming with other settings is refused
    let e = String::from_utf8_lossy(&train_cmd(&b, 5, 9).arg("--resume").output().unwrap().stderr).into_owned();
    assert!(e.contains("other arguments"), "{e}");
    common::run_ok(train_cmd(&b, 5, 8).arg("--resume"));
    let bytes = |d: &PathBuf, f: &str| std::fs::read(d.join(f)).unwrap();
    for f in ["vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors", "vae/config.json"]
    {
        assert!(bytes(&a, f) == bytes(&b, f), "{f}: the resumed run differs from the unbroken one");
    }
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 13, "each step logged once");
    assert_eq!(la, lb, "the logs (each step once) agree");
    // an existing folder without --resume is refused
    let e = String::from_utf8_lossy(&train_cmd(&a, 5, 8).output().unwrap().stderr).into_owned();
    assert!(e.contains("not empty"), "{e}");
}

/// A UNet phase whose loss becomes NaN (here at lr 1e30) stops with an error that says its last
/// checkpoint (all finite) is kept, and writes no model.
#[test]
fn a_diverging_train_base_run_stops_and_keeps_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let o = bin()
        .args(["train-base", "--device", "cpu", "--images", "48", "--vae-batch", "4", "--unet-batch", "4"])
        .args(["--vae-steps", "1", "--unet-steps", "6", "--checkpoint-every", "1", "--warmup", "1"])
        .args(["--unet-lr", "1e30", "--unet-config"])
        .arg(fixtures().join("world/unet.json"))
        .arg("--vae-config")
        .arg(fixtures().join("world/vae.json"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("loss became NaN") && err.contains("last good checkpoint"), "{err}");
    let ckpt = out.join("unet-checkpoint.safetensors");
    assert!(ckpt.is_file() && hifi_tuner::load::read_safetensors_finite(&ckpt).is_ok(), "a finite checkpoint is kept");
    assert!(!out.join("unet/diffusion_pytorch_model.safetensors").exists(), "no model is written");
}

/// The held-out subjects: 15 (5 for choosing settings, 10 for the tables), each of its own
/// pattern (family + colour pair); the encoders' training objects never carry one of them, and
/// are told apart by their index.
#[test]
fn held_out_subjects_never_occur_in_the_encoders_training_objects() {
    assert_eq!((SUBJECTS.len(), N_VALIDATION), (15, 5));
    let keys: Vec<_> = SUBJECTS.iter().map(|s| s.object.pattern_key().expect("every subject is patterned")).collect();
    for (i, k) in keys.iter().enumerate() {
        assert!(!keys[..i].contains(k), "{} repeats a pattern", SUBJECTS[i].name);
        assert!(held_out_pattern(&SUBJECTS[i].object));
    }
    // the five validation subjects and the ten test subjects cover every shape class
    for shape in 0..SHAPES.len() {
        assert_eq!(SUBJECTS[..N_VALIDATION].iter().filter(|s| s.object.shape == shape).count(), 1);
        assert_eq!(SUBJECTS[N_VALIDATION..].iter().filter(|s| s.object.shape == shape).count(), 2);
    }
    let mut families = std::collections::BTreeSet::new();
    let mut solid = 0;
    for i in 0..4000u64 {
        let o = training_object(7, i);
        assert_eq!(o, training_object(7, i), "object {i} is not a function of (seed, index)");
        assert!(!held_out_pattern(&o), "training object {i} is a held-out pattern: {o:?}");
        match o.paint {
            Paint::Procedural(p) => {
                assert_ne!(p.colours[0], p.colours[1]);
                assert!(p.colours.iter().all(|&c| c < PALETTE.len()));
                families.insert(p.family);
            }
            Paint::Solid(_) => solid += 1,
            other => panic!("unexpected paint {other:?}"),
        }
    }
    assert_eq!(families.len(), Family::ALL.len(), "every family occurs");
    assert!((350..650).contains(&solid), "about one in eight is a plain colour: {solid}");
}

/// Pose varies between a subject's photos (rotation, size, position, scene), and no photo is
/// in the pose of the ground truth; a rotation turns the pattern with the object.
#[test]
fn subject_photos_vary_in_pose_and_rotation_turns_the_pattern() {
    for (si, subject) in SUBJECTS.iter().enumerate() {
        let photos: Vec<_> = (0..4).map(|k| subject_photo(0, si, k)).collect();
        for (k, p) in photos.iter().enumerate() {
            let area = p.mask.iter().filter(|&&m| m >= 128).count();
            assert!(area > 150, "{} photo {k}: object too small ({area} px)", subject.name);
            for q in &photos[..k] {
                assert_ne!(p.mask, q.mask, "{} photos share a pose", subject.name);
            }
        }
    }
    // a striped object: rotating by 90° turns its stripes (the column profile becomes the row
    // profile of the upright one, up to the rasterisation of the edges)
    let stripes = Object {
        shape: 0,
        paint: Paint::Procedural(Procedural { family: Family::Stripes, colours: [4, 7], angle: 0.0, period: 0.4 }),
    };
    let place = Placement { cx: 32.0, cy: 32.0, r: 20.0, angle: 0.0 };
    let upright = render(stripes, 2, place, 3);
    let turned = render(stripes, 2, Placement { angle: std::f32::consts::FRAC_PI_2, ..place }, 3);
    assert_eq!(upright.mask, turned.mask, "a ball's outline does not change when it turns");
    // blue vs white along the middle row and a column (stripes 8 px wide: 3 changes in 30 px)
    let blue = |r: &hifi_tuner::world::Render, x: usize, y: usize| {
        let i = (y * SIZE + x) * 3;
        r.rgb[i + 2] as i32 > 2 * r.rgb[i] as i32 + 20 // blue whatever its shading; white is grey
    };
    let changes = |f: &dyn Fn(usize) -> bool| (17..47).filter(|&t| f(t) != f(t + 1)).count();
    assert!(changes(&|x| blue(&upright, x, 32)) >= 3, "upright stripes cross the middle row");
    // (x = 36: the middle column itself is a stripe boundary)
    assert!(changes(&|y| blue(&upright, 36, y)) <= 1, "upright stripes run along a column");
    assert!(changes(&|y| blue(&turned, 36, y)) >= 3, "turned stripes cross a column");
    // a view for the encoders stays inside the image
    let mut rng = Rng::new(1);
    for _ in 0..200 {
        let (scene, p, _) = random_view(&mut rng);
        assert!(scene < SCENES.len() && p.r >= 9.0 && p.cx - p.r >= 1.0 && p.cx + p.r <= SIZE as f32 - 1.0);
    }
}

/// The validity baselines are in the ground truth's scene, place and background: only the
/// object differs (a flat blob or a one-colour shape of the subject's mean colour, or another
/// subject of the same split).
#[test]
fn baselines_share_the_ground_truths_scene_and_differ_in_the_object() {
    for si in [0usize, 7, 14] {
        let gt = ground_truth(0, SUBJECTS[si].object, 1);
        let mean = mean_colour(&gt);
        for b in Baseline::ALL {
            let r = baseline(0, si, 1, b);
            let both: Vec<usize> = (0..SIZE * SIZE).filter(|&i| gt.mask[i] == 0 && r.mask[i] == 0).collect();
            let outside = |r: &hifi_tuner::world::Render| -> Vec<u8> {
                both.iter().flat_map(|&i| r.rgb[i * 3..i * 3 + 3].to_vec()).collect()
            };
            assert!(both.len() > 2000, "{}: too little shared background", b.name());
            assert_eq!(outside(&r), outside(&gt), "{}: the background differs", b.name());
            assert_ne!(r.rgb, gt.rgb, "{} is the ground truth itself", b.name());
        }
        // the blob is one flat colour: every fully covered pixel is the mean colour
        let blob = baseline(0, si, 1, Baseline::Blob);
        for i in (0..SIZE * SIZE).filter(|&i| blob.mask[i] == 255) {
            assert_eq!(&blob.rgb[i * 3..i * 3 + 3], &mean, "blob pixel {i}");
        }
        let other = baseline(0, si, 1, Baseline::Other);
        let same_split = |j: usize| (j < N_VALIDATION) == (si < N_VALIDATION);
        let j = SUBJECTS.iter().position(|s| ground_truth(0, s.object, 1) == other).unwrap();
        assert!(j != si && same_split(j), "subject {si}: the other subject is {j}");
    }
}

/// The validity summary: win rates and margins of the truth over each candidate, by hand.
#[test]
fn validity_summary_counts_wins_and_margins() {
    use hifi_tuner::benchmark::validity::{markdown, summarize, Case};
    let case = |s: &str, p: usize, c: &str, dino: f64, clip_t: f64, rmse: f64| Case {
        subject: s.into(),
        prompt: p,
        candidate: c.into(),
        dino,
        clip_i: dino,
        clip_t,
        gt_rmse: rmse,
    };
    let cases = vec![
        case("a", 0, "truth", 0.8, 0.30, 0.0),
        case("a", 0, "blob", 0.5, 0.35, 0.2),
        case("a", 1, "truth", 0.7, 0.30, 0.0),
        case("a", 1, "blob", 0.75, 0.20, 0.3),
        case("b", 0, "truth", 0.9, 0.25, 0.0),
        case("b", 0, "blob", 0.6, 0.20, 0.1),
        case("b", 0, "copy", 0.95, 0.28, 0.4),
    ];
    let o = summarize(&cases);
    let get = |c: &str, m: &str| o.iter().find(|x| x.candidate == c && x.metric == m).unwrap();
    let d = get("blob", "DINO");
    assert_eq!(d.n, 3);
    assert!((d.truth_wins - 2.0 / 3.0).abs() < 1e-12, "{d:?}");
    assert!((d.mean_margin - (0.3 - 0.05 + 0.3) / 3.0).abs() < 1e-12, "{d:?}");
    let t = get("blob", "CLIP-T");
    assert!((t.truth_wins - 2.0 / 3.0).abs() < 1e-12 && (t.mean_margin - (-0.05 + 0.1 + 0.05) / 3.0).abs() < 1e-12);
    // GT RMSE is lower-is-better: the margin is candidate − truth
    let r = get("blob", "GT RMSE");
    assert!((r.truth_wins - 1.0).abs() < 1e-12 && (r.mean_margin - 0.2).abs() < 1e-12, "{r:?}");
    let c = get("copy", "DINO");
    assert_eq!((c.n, c.truth_wins), (1, 0.0));
    assert!(o.iter().all(|x| x.candidate != "shape"), "no shape cases, no rows");
    let md = markdown(&o);
    assert!(md.contains("| blob | 3 | 67 % (+0.183) |"), "{md}");
}
