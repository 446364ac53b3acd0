//! `learn` from the command line: both modes end to end, kill -9 and --resume equal to an
//! unbroken run, and each bad input refused with its file named and nothing half-written.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn learn_cmd(out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
    c.env_remove("RUST_BACKTRACE").args(["learn", "--model"]).arg(model_dir("tiny-a"));
    c.arg("--images").arg(fixtures().join("photos/dog"));
    c.args(["--class-noun", "dog", "--device", "cpu", "--seed", "3"]).arg("--out").arg(out);
    c.args(extra);
    c
}

fn with_masks(masks: &Path) -> Vec<String> {
    vec!["--masks".into(), masks.display().to_string()]
}

fn run(mut c: Command) -> Output {
    c.output().expect("the binary runs")
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_fails(o: &Output, needle: &str) {
    let e = err(o);
    assert_eq!(o.status.code(), Some(1), "expected failure: {e}");
    assert!(e.contains(needle), "error should mention {needle:?}: {e}");
    assert!(!e.contains("panicked"), "{e}");
}

const SMALL: [&str; 8] = ["--steps", "4", "--stepwise-steps", "1", "--ddim-steps", "3", "--tokens", "3"];

fn masks() -> PathBuf {
    fixtures().join("photos/dog-masks")
}

#[test]
fn hifi_learn_then_generate_with_subject() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("subj");
    let mut c = learn_cmd(&out, &SMALL);
    c.args(with_masks(&masks()));
    let o = run(c);
    assert!(o.status.success(), "{}", err(&o));
    for f in ["subject.safetensors", "train_log.jsonl", "checkpoint.safetensors", "photos/00.png", "masks/02.png"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4 + 3, "4 steps of c_s + 3 DDIM steps × 1");
    let s = hifi_tuner::subject::file::Subject::load(&out).unwrap();
    assert_eq!((s.n_tokens(), s.stepwise.len(), s.timesteps.len()), (3, 3, 3));
    let img = tmp.path().join("g.png");
    let o = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"))
        .args(["generate", "--model"])
        .arg(model_dir("tiny-a"))
        .args(["--prompt", "a dog on the beach", "--steps", "3", "--device", "cpu", "--subject"])
        .arg(&out)
        .arg("--out")
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", err(&o));
    assert!(img.is_file());
    // The HiFi folder given as --embedding points to --subject.
    let o = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"))
        .args(["generate", "--model"])
        .arg(model_dir("tiny-a"))
        .args(["--prompt", "a dog", "--steps", "2", "--device", "cpu", "--embedding"])
        .arg(&out)
        .arg("--out")
        .arg(tmp.path().join("e.png"))
        .output()
        .unwrap();
    assert_fails(&o, &format!("pass it as --subject {}", out.display()));
}

#[test]
fn ti_learn_exports_learned_embeds_that_generate_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ti");
    let o = run(learn_cmd(&out, &["--mode", "ti", "--token", "<dog-x>", "--tokens", "2", "--steps", "3"]));
    assert!(o.status.success(), "{}", err(&o));
    let file = out.join("learned_embeds.safetensors");
    let t = tch::Tensor::read_safetensors(&file).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!((t[0].0.as_str(), t[0].1.size()), ("<dog-x>", vec![2, 32]));
    let img = tmp.path().join("g.png");
    let generate = |flag: &str, what: &Path| {
        Command::new(env!("CARGO_BIN_EXE_hifi-tuner"))
            .args(["generate", "--model"])
            .arg(model_dir("tiny-a"))
            .args(["--prompt", "a photo of <dog-x> on the beach", "--steps", "2", "--device", "cpu", flag])
            .arg(what)
            .arg("--out")
            .arg(&img)
            .output()
            .unwrap()
    };
    let o = generate("--embedding", &file);
    assert!(o.status.success(), "{}", err(&o));
    // The TI folder given as --subject points to --embedding; as --embedding it means its file.
    std::fs::remove_file(&img).unwrap();
    let o = generate("--subject", &out);
    assert_fails(&o, &format!("--embedding {}", file.display()));
    assert!(!img.exists());
    let o = generate("--embedding", &out);
    assert!(o.status.success(), "{}", err(&o));
}

/// A run killed with SIGKILL and resumed ends bit-identical to an unbroken one.
#[test]
fn killed_and_resumed_run_equals_unbroken_run() {
    let tmp = tempfile::tempdir().unwrap();
    let args =
        ["--steps", "6", "--stepwise-steps", "2", "--ddim-steps", "3", "--tokens", "3", "--checkpoint-every", "1"];
    let a = tmp.path().join("a");
    let mut c = learn_cmd(&a, &args);
    c.args(with_masks(&masks()));
    let o = run(c);
    assert!(o.status.success(), "{}", err(&o));

    let b = tmp.path().join("b");
    let mut c = learn_cmd(&b, &args);
    c.args(with_masks(&masks()));
    let at_step = |n: usize| {
        let lines = std::fs::read_to_string(b.join("train_log.jsonl")).map(|s| s.lines().count()).unwrap_or(0);
        lines >= n && b.join("checkpoint.safetensors").exists()
    };
    common::kill_when(&mut c, 300, Duration::from_secs(120), "step 4", || at_step(4), Duration::ZERO);
    assert!(!b.join("subject.safetensors").exists(), "killed before the end");
    let mut c = learn_cmd(&b, &args);
    c.args(with_masks(&masks())).arg("--resume");
    let o = run(c);
    assert!(o.status.success(), "{}", err(&o));
    let read = |d: &Path| std::fs::read(d.join("subject.safetensors")).unwrap();
    // The file names the photos' folder, equal for both runs.
    assert_eq!(read(&a), read(&b), "resumed result differs from the unbroken run");
    let log = std::fs::read_to_string(b.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 6 + 3 * 2, "the resumed log has each step once");

    // --resume with changed arguments is refused.
    let mut c = learn_cmd(
        &b,
        &["--steps", "6", "--stepwise-steps", "2", "--ddim-steps", "3", "--tokens", "3", "--lr", "0.1", "--resume"],
    );
    c.args(with_masks(&masks()));
    assert_fails(&run(c), "changed arguments");
}

/// "Extend": a finished run resumed with a larger `--steps` ends bit-identical to a run made
/// with those steps from the start (phase 0 continues from its saved optimiser; the step-wise
/// phases run again); fewer steps are refused, and `--preview-every` writes its files.
#[test]
fn a_finished_run_extended_equals_the_longer_run() {
    let tmp = tempfile::tempdir().unwrap();
    let args = |steps: &'static str| ["--steps", steps, "--stepwise-steps", "1", "--ddim-steps", "2", "--tokens", "3"];
    let long = tmp.path().join("long");
    let mut c = learn_cmd(&long, &args("6"));
    c.args(with_masks(&masks()));
    let o = run(c);
    assert!(o.status.success(), "{}", err(&o));

    let ext = tmp.path().join("ext");
    let mut c = learn_cmd(&ext, &args("4"));
    c.args(with_masks(&masks())).args(["--preview-every", "3"]);
    let o = run(c);
    assert!(o.status.success(), "{}", err(&o));
    assert!(ext.join("previews/step-000003.png").is_file() && ext.join("loss.svg").is_file());
    let mut c = learn_cmd(&ext, &args("6"));
    c.args(with_masks(&masks())).arg("--resume");
    let o = run(c);
    assert!(o.status.success(), "{}", err(&o));
    let read = |d: &Path| std::fs::read(d.join("subject.safetensors")).unwrap();
    assert_eq!(read(&long), read(&ext), "4 steps extended to 6 differ from 6 straight");
    let log = std::fs::read_to_string(ext.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 6 + 2, "the extended log has each step once");

    let mut c = learn_cmd(&ext, &args("5"));
    c.args(with_masks(&masks())).arg("--resume");
    assert_fails(&run(c), "not shrink");
}

#[test]
fn bad_inputs_are_refused_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let photos = fixtures().join("photos/dog");
    let go = |images: &Path, masks: Option<&Path>, out: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
        c.args(["learn", "--model"]).arg(model_dir("tiny-a")).arg("--images").arg(images);
        if let Some(m) = masks {
            c.arg("--masks").arg(m);
        }
        c.args(["--class-noun", "dog", "--steps", "1", "--stepwise-steps", "0", "--device", "cpu", "--out"])
            .arg(t.join(out));
        c.output().unwrap()
    };
    let empty = t.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_fails(&go(&empty, None, "o1"), "no images");

    let broken = t.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("00.jpg"), b"not a jpeg").unwrap();
    assert_fails(&go(&broken, None, "o2"), "00.jpg");

    // A mask without its image, and an image without its mask.
    let m = t.join("m1");
    std::fs::create_dir_all(&m).unwrap();
    for s in ["00", "01", "02", "07"] {
        std::fs::copy(masks().join("00.png"), m.join(format!("{s}.png"))).unwrap();
    }
    assert_fails(&go(&photos, Some(&m), "o3"), "07.png");
    std::fs::remove_file(m.join("02.png")).unwrap();
    std::fs::remove_file(m.join("07.png")).unwrap();
    assert_fails(&go(&photos, Some(&m), "o4"), "02.jpg");

    // An all-black mask, and one of another aspect ratio.
    let black = image::GrayImage::new(64, 64);
    black.save(m.join("02.png")).unwrap();
    assert_fails(&go(&photos, Some(&m), "o5"), "02.png");
    image::GrayImage::from_pixel(64, 32, image::Luma([255])).save(m.join("02.png")).unwrap();
    assert_fails(&go(&photos, Some(&m), "o6"), "aspect");
    for o in ["o1", "o2", "o3", "o4", "o5", "o6"] {
        assert!(!t.join(o).join("subject.safetensors").exists());
    }
}

#[test]
fn a_diverging_loss_stops_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nan");
    let o =
        run(learn_cmd(&out, &["--steps", "20", "--stepwise-steps", "0", "--lr", "1e30", "--checkpoint-every", "1"]));
    assert_fails(&o, "checkpoint");
    assert!(err(&o).contains("loss became"), "{}", err(&o));
    assert!(out.join("checkpoint.safetensors").exists());
    assert!(!out.join("subject.safetensors").exists());
}

/// One run per output folder (issue 18): a second `learn` (any mode) or `train-base` into a
/// folder another run holds is refused before it writes anything, naming the holder; the lock
/// file a dead run leaves behind blocks nobody, and a finished run removes it.
#[test]
fn a_folder_another_run_holds_is_refused_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("held");
    let lock = hifi_tuner::outdir::lock_dir(&out, "--out").unwrap(); // this test is the holder
    let holder = format!("pid {}", std::process::id());
    let lock_file = out.join(hifi_tuner::outdir::LOCK_FILE);
    let only_the_lock = || {
        let names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [hifi_tuner::outdir::LOCK_FILE], "nothing may be written next to the lock");
    };
    for mode in ["hifi", "ti", "dreambooth"] {
        let o = run(learn_cmd(&out, &["--mode", mode, "--steps", "1", "--stepwise-steps", "0"]));
        assert_fails(&o, "is in use by another run");
        assert!(err(&o).contains(&holder) && err(&o).contains(&out.display().to_string()), "{mode}: {}", err(&o));
        only_the_lock();
    }
    let o = run({
        let mut c = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
        c.args(["train-base", "--device", "cpu", "--images", "8", "--out"]).arg(&out);
        c
    });
    assert_fails(&o, &holder);
    only_the_lock();
    drop(lock);
    assert!(!out.exists(), "the folder the lock created is removed when left empty");

    // A lock file left by a run that died (no process holds its lock) blocks nobody.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(&lock_file, r#"{"pid": 999999, "host": "gone", "command": "hifi-tuner learn", "started": "?"}"#)
        .unwrap();
    let mut c = learn_cmd(&out, &SMALL);
    c.args(with_masks(&masks()));
    let o = run(c);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out.join("subject.safetensors").is_file());
    assert!(!lock_file.exists(), "a finished run removes its lock file");
}

/// `--resume` refuses photos or masks changed in place since the checkpoint (issue 18), naming
/// the file, before anything is written.
#[test]
fn resume_refuses_a_photo_or_mask_changed_since_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (photos, m) = (tmp.path().join("photos"), tmp.path().join("masks"));
    for (from, to) in [(fixtures().join("photos/dog"), &photos), (masks(), &m)] {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
    let out = tmp.path().join("subj");
    let go = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
        c.env_remove("RUST_BACKTRACE").args(["learn", "--model"]).arg(model_dir("tiny-a"));
        c.arg("--images").arg(&photos).arg("--masks").arg(&m);
        c.args(["--class-noun", "dog", "--device", "cpu", "--out"]).arg(&out).args(SMALL).args(extra);
        run(c)
    };
    let o = go(&[]);
    assert!(o.status.success(), "{}", err(&o));
    let kept = std::fs::read(out.join("photos/01.png")).unwrap();
    let meta = hifi_tuner::load::safetensors_metadata(&out.join("checkpoint.safetensors")).unwrap();
    assert!(meta["inputs"].contains("01.jpg"), "{}", meta["inputs"]);
    let o = go(&["--resume"]);
    assert!(o.status.success(), "unchanged inputs resume: {}", err(&o));

    // The photo 01.jpg changed in place (mirrored).
    let photo = photos.join("01.jpg");
    let original = std::fs::read(&photo).unwrap();
    image::open(&photo).unwrap().fliph().save(&photo).unwrap();
    let o = go(&["--resume"]);
    assert_fails(&o, &photo.display().to_string());
    assert!(err(&o).contains("changed since"), "{}", err(&o));
    assert_eq!(std::fs::read(out.join("photos/01.png")).unwrap(), kept, "nothing may be rewritten");
    std::fs::write(&photo, original).unwrap();

    // A mask changed in place.
    let mask = m.join("02.png");
    image::open(&mask).unwrap().fliph().save(&mask).unwrap();
    let o = go(&["--resume"]);
    assert_fails(&o, &mask.display().to_string());
    assert!(err(&o).contains("mask"), "{}", err(&o));
}

/// A phone photo stored sideways (64×32, EXIF Orientation = 6) is learned upright, and its mask,
/// drawn upright (32×64), is accepted.
#[test]
fn exif_orientation_is_applied_to_photos() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exif");
    let mut c = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
    c.args(["learn", "--model"]).arg(model_dir("tiny-a")).arg("--images").arg(fixtures().join("photos/exif"));
    c.arg("--masks").arg(fixtures().join("photos/exif-masks"));
    c.args(["--class-noun", "dog", "--steps", "1", "--stepwise-steps", "0", "--device", "cpu", "--out"]).arg(&out);
    let o = run(c);
    assert!(o.status.success(), "{}", err(&o));
    // The upright 32×64 photo, centre-cropped to tiny-a's 32×32: its top half red (left) and
    // green (right), its bottom half blue; the mask white at the top.
    let photo = image::open(out.join("photos/rotated.png")).unwrap().to_rgb8();
    let mask = image::open(out.join("masks/rotated.png")).unwrap().to_luma8();
    assert_eq!(photo.dimensions(), (32, 32));
    let near = |p: &image::Rgb<u8>, want: [u8; 3]| p.0.iter().zip(want).all(|(a, b)| a.abs_diff(b) <= 12);
    assert!(near(photo.get_pixel(4, 4), [220, 30, 30]), "top left is red: {:?}", photo.get_pixel(4, 4));
    assert!(near(photo.get_pixel(27, 4), [30, 200, 40]), "top right is green: {:?}", photo.get_pixel(27, 4));
    assert!(near(photo.get_pixel(16, 27), [30, 40, 220]), "bottom is blue: {:?}", photo.get_pixel(16, 27));
    assert_eq!((mask.get_pixel(16, 4).0[0], mask.get_pixel(16, 27).0[0]), (255, 0), "the mask is upright too");
}

/// Arguments refused by the library (not by the parser) are refused before the subject folder
/// is created: a caption that leaves no room for --tokens, and --resume of another run.
#[test]
fn arguments_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    // --tokens 75 passes the parser, but "a photo of a dog" needs 7 of CLIP's 77 positions.
    let out = tmp.path().join("t75");
    let o = run(learn_cmd(&out, &["--tokens", "75", "--steps", "1", "--stepwise-steps", "0"]));
    assert_fails(&o, "at most 70 subject tokens, not 75");
    assert!(!out.exists(), "nothing written");
    let o = run(learn_cmd(&out, &["--mode", "ti", "--tokens", "75", "--steps", "1"]));
    assert_fails(&o, "lower --tokens");
    assert!(!out.exists(), "nothing written");
    // --resume with other arguments leaves the folder as it was.
    let out = tmp.path().join("r");
    let args = ["--steps", "2", "--stepwise-steps", "0", "--checkpoint-every", "1", "--tokens", "2"];
    let o = run(learn_cmd(&out, &args));
    assert!(o.status.success(), "{}", err(&o));
    std::fs::remove_file(out.join("subject.safetensors")).unwrap();
    std::fs::remove_dir_all(out.join("photos")).unwrap();
    // (a larger --steps is "extend", allowed; another --lr is not)
    let o =
        run(learn_cmd(&out, &["--steps", "2", "--stepwise-steps", "0", "--tokens", "2", "--lr", "0.1", "--resume"]));
    assert_fails(&o, "changed arguments");
    assert!(!out.join("photos").exists(), "photos/ is not rewritten by a refused run");
}
