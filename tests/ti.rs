//! Textual-inversion embeddings used exactly as diffusers' `load_textual_inversion` +
//! `maybe_convert_prompt` + `StableDiffusionPipeline` do (fixture: scripts/make_ti_fixture.py).

mod common;

use common::*;
use hifi_tuner::pipeline::{GenerateRequest, StableDiffusion};
use hifi_tuner::subject::ti::{convert_prompt, load_embedding, LoadedToken};
use std::process::Command;
use tch::{Device, Kind};

fn meta() -> std::collections::HashMap<String, String> {
    reference_meta("ti")
}

fn loaded() -> (StableDiffusion, Vec<LoadedToken>) {
    let mut sd = StableDiffusion::load(&model_dir("tiny-a"), Device::Cpu).unwrap();
    let a = load_embedding(&mut sd, &fixtures().join("ti/learned_embeds.safetensors"), None).unwrap();
    let b = load_embedding(&mut sd, &fixtures().join("ti/single.safetensors"), None).unwrap();
    (sd, vec![a, b])
}

#[test]
fn tokens_ids_and_prompt_conversion_match_diffusers() {
    let (sd, l) = loaded();
    let r = reference("ti");
    let m = meta();
    let ids: Vec<i64> = l.iter().flat_map(|t| t.ids.clone()).collect();
    assert_eq!(ids, Vec::<i64>::try_from(&r["ti.added_ids"]).unwrap());
    let converted = convert_prompt(&sd, &m["prompt"], &l);
    assert_eq!(converted, m["converted_prompt"]);
    assert!(sd.tokenize(&converted).equal(&r["ti.cond_ids"]));
    tch::no_grad(|| assert_close(&sd.encode_prompt(&converted), &r["ti.cond_embeds"], 1e-4, "TI prompt embeddings"));
    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        converted: Option<String>,
        ids: Vec<i64>,
    }
    let plain: Vec<Case> = serde_json::from_str(&m["added_token_cases"]).unwrap();
    for c in plain {
        assert_eq!(sd.tokenizer.encode_padded(&c.text).ids, c.ids, "{:?}", c.text);
    }
    let conv: Vec<Case> = serde_json::from_str(&m["convert_cases"]).unwrap();
    for c in conv {
        let got = convert_prompt(&sd, &c.text, &l);
        assert_eq!(Some(&got), c.converted.as_ref(), "{:?}", c.text);
        assert_eq!(sd.tokenizer.encode_padded(&got).ids, c.ids, "{:?}", c.text);
    }
}

#[test]
fn generate_with_embeddings_matches_diffusers_via_the_cli() {
    let m = meta();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ti.png");
    let o = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"))
        .args(["generate", "--model"])
        .arg(model_dir("tiny-a"))
        .args(["--prompt", &m["prompt"], "--negative-prompt", &m["negative_prompt"], "--seed", &m["seed"]])
        .args(["--steps", &m["steps"], "--guidance", &m["guidance"], "--device", "cpu", "--embedding"])
        .arg(fixtures().join("ti/learned_embeds.safetensors"))
        .arg("--embedding")
        .arg(fixtures().join("ti/single.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&out).unwrap().to_rgb8();
    let expect = Vec::<u8>::try_from(&reference("ti")["ti.image_u8"].view([-1])).unwrap();
    let diffs: Vec<f64> = img.as_raw().iter().zip(&expect).map(|(a, b)| (*a as f64 - *b as f64).abs()).collect();
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let max = diffs.iter().cloned().fold(0.0, f64::max);
    assert!(mean <= 0.1 && max <= 1.0, "mean |diff| {mean}, max {max} levels");
}

#[test]
fn library_generation_matches_final_latents() {
    let (sd, l) = loaded();
    let m = meta();
    let r = reference("ti");
    let req = GenerateRequest {
        prompt: convert_prompt(&sd, &m["prompt"], &l),
        negative_prompt: Some(m["negative_prompt"].clone()),
        seed: m["seed"].parse().unwrap(),
        steps: m["steps"].parse().unwrap(),
        guidance: m["guidance"].parse().unwrap(),
        height: 32,
        width: 32,
        num_images: 1,
    };
    let img = sd.generate(&req).unwrap();
    let d = (img.to_kind(Kind::Float) - r["ti.image_u8"].to_kind(Kind::Float)).abs().max().double_value(&[]);
    assert!(d <= 1.0, "max |diff| {d} levels");
}
