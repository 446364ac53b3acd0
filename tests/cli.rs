//! The command line as a user meets it: outputs, PNG metadata, and bad input that must end in a
//! clear one-line error (never a panic or a backtrace) with nothing half-written.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
    c.env_remove("RUST_BACKTRACE");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed run: exit code 1, an `error:` line mentioning `needle`, no panic.
fn assert_clean_error(o: &Output, needle: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected a failure, got {:?}; stderr: {e}", o.status);
    assert!(e.contains("error:") && e.contains(needle), "stderr should name {needle:?}: {e}");
    assert!(!e.contains("panicked") && !e.contains("stack backtrace"), "panic: {e}");
}

/// Copies a fixture model into a temp folder so a test can damage it.
fn copy_model(name: &str, to: &Path) -> PathBuf {
    let dst = to.join(name);
    copy_dir(&model_dir(name), &dst);
    dst
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &p);
        } else {
            std::fs::copy(e.path(), &p).unwrap();
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn tokenize_prints_the_77_ids() {
    let o = run(&["tokenize", "--model", s(&model_dir("tiny-a")), "a photo of a sks dog"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ids: Vec<i64> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(&ids[..8], &[49406, 320, 1125, 539, 320, 48136, 1929, 49407]);
    assert!(ids[8..].iter().all(|&i| i == 49407), "padded with <|endoftext|>");
}

#[test]
fn generate_writes_diffusers_image_with_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("img.png");
    let m = reference_meta("tiny-a");
    let o = run(&[
        "generate",
        "--model",
        s(&model_dir("tiny-a")),
        "--prompt",
        &m["prompt"],
        "--negative-prompt",
        &m["negative_prompt"],
        "--seed",
        &m["seed"],
        "--steps",
        &m["steps"],
        "--guidance",
        &m["guidance"],
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(&out).unwrap().to_rgb8();
    let expect = &reference("tiny-a")["gen.image_u8"];
    let expect = Vec::<u8>::try_from(&expect.view([-1])).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32), "default size = sample_size × VAE factor");
    let diff: f64 =
        img.as_raw().iter().zip(&expect).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>() / expect.len() as f64;
    assert!(diff <= 0.1, "mean |diff| {diff} levels");
    let text = hifi_tuner::io::png_text(&out).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").expect("parameters chunk").1;
    assert!(params.starts_with(&m["prompt"]), "{params}");
    for part in [
        format!("Negative prompt: {}", m["negative_prompt"]),
        format!("Seed: {}", m["seed"]),
        "Steps: 8".into(),
        "CFG scale: 7.5".into(),
    ] {
        assert!(params.contains(&part), "{params} lacks {part}");
    }
}

#[test]
fn bad_model_folders_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.png");
    let gen = |model: &Path| {
        run(&[
            "generate",
            "--model",
            s(model),
            "--prompt",
            "a dog",
            "--steps",
            "2",
            "--out",
            s(&out),
            "--device",
            "cpu",
        ])
    };
    assert_clean_error(&gen(tmp.path()), "model_index.json");
    assert_clean_error(&gen(&tmp.path().join("nope")), "does not exist");

    let m = copy_model("tiny-a", tmp.path());
    std::fs::remove_dir_all(m.join("vae")).unwrap();
    assert_clean_error(&gen(&m), "vae");

    let m = copy_model("tiny-b", &tmp.path().join("t"));
    let w = m.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(&gen(&m), "diffusion_pytorch_model.safetensors");
    assert!(!out.exists(), "nothing written on failure");
}

#[test]
fn bad_sizes_and_long_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.png");
    let model = model_dir("tiny-b");
    let o = run(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "a",
        "--height",
        "30",
        "--width",
        "32",
        "--steps",
        "1",
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    assert_clean_error(&o, "multiples of 4");
    let long = "a watercolor of mountains and rivers ".repeat(20);
    let o = run(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        &long,
        "--steps",
        "1",
        "--height",
        "16",
        "--width",
        "16",
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("truncated"), "a warning says the prompt was truncated: {}", stderr(&o));
    assert!(out.is_file());
}

#[test]
fn init_random_writes_a_loadable_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rnd");
    let tok = fixtures().join("tokenizers/clip");
    let o = run(&["init-random", "--config", "tiny", "--tokenizer", s(&tok), "--out", s(&dir), "--seed", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let out = tmp.path().join("r.png");
    let o = run(&[
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "a dog",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Refuses to overwrite.
    let o = run(&["init-random", "--config", "tiny", "--tokenizer", s(&tok), "--out", s(&dir)]);
    assert_clean_error(&o, "not empty");
}
