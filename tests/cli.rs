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
    // ... and gives the prompt's own length, not the 77 tokens that were kept.
    let tok = hifi_tuner::tokenizer::ClipTokenizer::from_dir(&model.join("tokenizer")).unwrap();
    let n = tok.encode(&long).len();
    assert!(n > 77);
    assert!(stderr(&o).contains(&format!("is {n} tokens long")), "the warning gives {n}: {}", stderr(&o));
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

/// A clap refusal: exit code 2, an `error:` line naming the flag and `needle`, no panic.
fn assert_refused_at_parse(o: &Output, flag: &str, needle: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{flag}: expected a usage error, got {:?}; stderr: {e}", o.status);
    assert!(e.contains("error:") && e.contains(flag) && e.contains(needle), "{flag}: should say {needle:?}: {e}");
    assert!(!e.contains("panicked"), "{e}");
}

/// Bad numbers end in clap's usage error (exit code 2) naming the flag, before a model is
/// loaded or a file written. (Every flag of every subcommand is walked in-process by the unit
/// tests of `src/cli/args.rs`; here a few, as the user meets them.)
#[test]
fn bad_numbers_are_refused_when_the_command_line_is_parsed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let (model, o) = (model_dir("tiny-a"), s(&out).to_string());
    let m = s(&model);
    let gen = ["generate", "--model", m, "--prompt", "a", "--out", &o];
    let inv = ["invert", "--model", m, "--image", "x.png", "--caption", "a", "--out", &o];
    let learn = ["learn", "--model", m, "--images", "x", "--class-noun", "dog", "--out", &o];
    let cases: [(&[&str], &str, &str, &str); 5] = [
        (&gen, "--guidance", "nan", "not a finite number"),
        (&gen, "--guidance-lr", "-inf", "not a finite number"),
        (&gen, "--height", "1000000", "above the limit of 2048"),
        (&inv, "--guidance", "inf", "not a finite number"),
        (&learn, "--tokens", "100", "between 1 and 75"),
    ];
    for (base, flag, value, needle) in cases {
        let mut args: Vec<String> = base.iter().map(|a| a.to_string()).collect();
        args.push(format!("{flag}={value}")); // "--guidance-lr=-inf": a leading '-' is a value here
        let o = bin().args(&args).output().unwrap();
        assert_refused_at_parse(&o, flag, needle);
        assert!(!stderr(&o).contains("-23"), "{}", stderr(&o));
    }
    assert!(!out.exists(), "nothing written");
}

/// One NaN or inf in a weight file: refused at load time, naming the file and the key (a model
/// with one draws black images and exits 0 otherwise).
#[test]
fn non_finite_weights_are_refused_naming_the_file_and_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.png");
    for (component, file, value) in [
        ("unet", "diffusion_pytorch_model.safetensors", f32::NAN),
        ("vae", "diffusion_pytorch_model.safetensors", f32::INFINITY),
    ] {
        let m = copy_model("tiny-b", &tmp.path().join(component));
        let w = m.join(component).join(file);
        let mut t = tch::Tensor::read_safetensors(&w).unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        let (key, bad) = t.iter().find(|(_, v)| v.numel() > 4).map(|(k, v)| (k.clone(), v.copy())).unwrap();
        let _ = bad.view([-1]).get(3).fill_(value as f64);
        let t: Vec<(String, tch::Tensor)> =
            t.into_iter().map(|(k, v)| if k == key { (k, bad.shallow_clone()) } else { (k, v) }).collect();
        hifi_tuner::io::write_safetensors_atomic(&w, &t, &Default::default()).unwrap();
        let o = run(&[
            "generate",
            "--model",
            s(&m),
            "--prompt",
            "a dog",
            "--steps",
            "2",
            "--out",
            s(&out),
            "--device",
            "cpu",
        ]);
        assert_clean_error(&o, &format!("{component}/{file}"));
        let e = stderr(&o);
        assert!(e.contains(&format!("tensor {key} holds 1 NaN or infinite value")), "names the key {key}: {e}");
        assert!(!out.exists(), "nothing written on failure");
    }
}

/// Images are checked from their header before they are decoded: a 10⁵×10⁵ PNG (header only),
/// a 1×1, a 10000×10 and a 100×20 photo are clear errors naming the file and the limit.
#[test]
fn huge_tiny_and_elongated_images_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let huge = t.join("huge.png");
    std::fs::write(&huge, png_header_only(100_000, 100_000)).unwrap();
    let tiny = t.join("tiny.png");
    image::RgbImage::new(1, 1).save(&tiny).unwrap();
    let thin = t.join("thin.png");
    image::RgbImage::new(10000, 10).save(&thin).unwrap();
    let long = t.join("long.png");
    image::RgbImage::new(100, 20).save(&long).unwrap();
    let e = hifi_tuner::io::open_image(&huge).unwrap_err().to_string();
    assert!(e.contains("huge.png") && e.contains("100000x100000") && e.contains("16384"), "{e}");
    let out = t.join("m.png");
    let sam = model_dir("sam-tiny");
    for (img, needle) in
        [(&huge, "16384"), (&tiny, "at least 16 pixels"), (&thin, "at least 16 pixels"), (&long, "at most 4:1")]
    {
        let o = run(&[
            "sam",
            "--model",
            s(&sam),
            "--image",
            s(img),
            "--box",
            "0,0,5,5",
            "--out",
            s(&out),
            "--device",
            "cpu",
        ]);
        assert_clean_error(&o, needle);
        assert!(stderr(&o).contains(s(img)), "names the file: {}", stderr(&o));
    }
    let o = run(&[
        "invert",
        "--model",
        s(&model_dir("tiny-a")),
        "--image",
        s(&long),
        "--caption",
        "a cat",
        "--steps",
        "2",
        "--out",
        s(&t.join("inv")),
        "--device",
        "cpu",
    ]);
    assert_clean_error(&o, "long.png");
    assert!(!out.exists() && !t.join("inv").exists(), "nothing written");
}

/// A 75-byte PNG whose header claims `w`×`h` RGB pixels; its one IDAT chunk is an empty zlib
/// stream (any decoder that reads past the header fails).
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    let empty_zlib = [0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01];
    for (kind, data) in [(b"IHDR", &ihdr[..]), (b"IDAT", &empty_zlib[..]), (b"IEND", &[][..])] {
        out.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    }
    out
}

/// A write that fails (here: a full disk) names the destination, and leaves no temporary file.
#[test]
fn write_errors_name_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("subject.safetensors");
    let e = hifi_tuner::io::write_atomic(&dest, |_| Err(std::io::Error::from_raw_os_error(28).into())).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains(s(&dest)) && msg.contains("No space left on device"), "{msg}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "no temporary file left");
}

/// `score` on JPEGs without `--prompts` says where the prompts come from and what to pass.
#[test]
fn score_of_jpegs_without_prompts_asks_for_them() {
    let photos = fixtures().join("photos/dog");
    let o = run(&[
        "score",
        "--clip",
        "no-clip",
        "--dino",
        "no-dino",
        "--real",
        s(&photos),
        "--generated",
        s(&photos),
        "--device",
        "cpu",
    ]);
    assert_clean_error(&o, "--prompts");
    assert!(stderr(&o).contains("00.jpg is not a PNG"), "{}", stderr(&o));
}
