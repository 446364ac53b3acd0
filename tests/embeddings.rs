//! Textual-inversion files in the three layouts `--embedding` reads: diffusers'
//! `{token: (n, d)}`, AUTOMATIC1111's / ComfyUI's `{"emb_params": (n, d)}`, and a converted A1111
//! `.pt` (`string_to_param.*`), round-tripped against the diffusers fixture.

mod common;

use common::*;
use hifi_tuner::io::write_safetensors_atomic;
use hifi_tuner::pipeline::StableDiffusion;
use hifi_tuner::subject::file::{a1111_file_name, read_learned_embeds, save_a1111_embedding, save_learned_embeds};
use hifi_tuner::subject::ti::{convert_prompt, load_embedding};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use tch::{Device, Kind, Tensor};

const PROMPT: &str = "a photo of <sks-toy> on a table";

/// The prompt's text embeddings on tiny-a with one embedding file loaded.
fn embeds(file: &Path, token: Option<&str>) -> (String, Tensor) {
    let mut sd = StableDiffusion::load(&model_dir("tiny-a"), Device::Cpu).unwrap();
    let l = load_embedding(&mut sd, file, token).unwrap();
    let prompt = convert_prompt(&sd, PROMPT, std::slice::from_ref(&l));
    (l.token, tch::no_grad(|| sd.encode_prompt(&prompt)))
}

fn diffusers_file() -> std::path::PathBuf {
    fixtures().join("ti/learned_embeds.safetensors")
}

#[test]
fn a1111_round_trip() {
    let (token, rows) = read_learned_embeds(&diffusers_file(), None).unwrap();
    assert_eq!((token.as_str(), rows.size()), ("<sks-toy>", vec![2, 32]));
    let tmp = tempfile::tempdir().unwrap();
    let a1111 = tmp.path().join(a1111_file_name(&token));
    assert_eq!(a1111.file_name().unwrap(), "sks-toy.safetensors");
    save_a1111_embedding(&a1111, &token, &rows).unwrap();
    let t = Tensor::read_safetensors(&a1111).unwrap();
    assert_eq!((t.len(), t[0].0.as_str()), (1, "emb_params"));
    assert!(t[0].1.equal(&rows));

    // Read back: the token is the file stem, as A1111 and ComfyUI name it…
    let (stem, back) = read_learned_embeds(&a1111, None).unwrap();
    assert_eq!(stem, "sks-toy");
    assert!(back.equal(&rows));
    // …or --token; then the prompt embeddings are the diffusers file's exactly.
    let (_, want) = embeds(&diffusers_file(), None);
    let (tok, got) = embeds(&a1111, Some("<sks-toy>"));
    assert_eq!(tok, "<sks-toy>");
    assert!(got.equal(&want));
    // Without --token the prompt must name the stem: "<sks-toy>" is then plain text.
    let (tok, other) = embeds(&a1111, None);
    assert_eq!(tok, "sks-toy");
    assert!(!other.equal(&want));

    // And back to diffusers' format.
    let again = tmp.path().join("learned_embeds.safetensors");
    save_learned_embeds(&again, "<sks-toy>", &back).unwrap();
    let (tok, rows2) = read_learned_embeds(&again, None).unwrap();
    assert_eq!(tok, "<sks-toy>");
    assert!(rows2.equal(&rows));
}

#[test]
fn converted_a1111_pt_layout() {
    let (_, rows) = read_learned_embeds(&diffusers_file(), None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("toy.safetensors");
    let tensors = vec![
        ("string_to_param.*".to_string(), rows.to_kind(Kind::Half)),
        ("string_to_token.*".to_string(), Tensor::from_slice(&[265i64])),
    ];
    write_safetensors_atomic(&path, &tensors, &BTreeMap::new()).unwrap();
    let (tok, back) = read_learned_embeds(&path, None).unwrap();
    assert_eq!(tok, "toy");
    assert_eq!(back.kind(), Kind::Float);
    assert!(back.equal(&rows.to_kind(Kind::Half).to_kind(Kind::Float)));
    // Two embeddings in one file are refused with the keys listed.
    let bad = tmp.path().join("two.safetensors");
    let two = vec![("a".to_string(), rows.shallow_clone()), ("b".to_string(), rows.shallow_clone())];
    write_safetensors_atomic(&bad, &two, &BTreeMap::new()).unwrap();
    let err = format!("{:#}", read_learned_embeds(&bad, None).unwrap_err());
    assert!(err.contains("emb_params") && err.contains("\"a\""), "{err}");
}

/// `learn --mode ti` writes both files; `generate` draws the same image from either.
#[test]
fn learn_ti_writes_a1111_file_that_generate_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ti");
    let exe = env!("CARGO_BIN_EXE_hifi-tuner");
    let o = Command::new(exe)
        .args(["learn", "--model"])
        .arg(model_dir("tiny-a"))
        .arg("--images")
        .arg(fixtures().join("photos/dog"))
        .args(["--class-noun", "dog", "--mode", "ti", "--token", "<dog-x>", "--tokens", "2", "--steps", "2"])
        .args(["--device", "cpu", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let diffusers = out.join("learned_embeds.safetensors");
    let a1111 = out.join("a1111/dog-x.safetensors");
    let (_, d) = read_learned_embeds(&diffusers, None).unwrap();
    let (stem, a) = read_learned_embeds(&a1111, None).unwrap();
    assert_eq!(stem, "dog-x");
    assert!(a.equal(&d));
    let png = |file: &Path, extra: &[&str], name: &str| {
        let path = tmp.path().join(name);
        let o = Command::new(exe)
            .args(["generate", "--model"])
            .arg(model_dir("tiny-a"))
            .args(["--prompt", "a photo of <dog-x>", "--steps", "2", "--device", "cpu", "--embedding"])
            .arg(file)
            .args(extra)
            .arg("--out")
            .arg(&path)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        image::open(&path).unwrap().to_rgb8().into_raw()
    };
    assert_eq!(png(&diffusers, &[], "d.png"), png(&a1111, &["--token", "<dog-x>"], "a.png"));
}
