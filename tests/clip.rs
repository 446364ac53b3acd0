//! CLIP (transformers `CLIPModel`, `CLIPImageProcessor`) parity and the metric definitions.
//! References: `scripts/make_clip_fixture.py`.

mod common;

use common::*;
use hifi_tuner::eval::metrics::{
    cosine_matrix, mean_paired_cosine, mean_pairwise_cosine, prompt_of_parameters, Evaluator,
};
use hifi_tuner::models::clip::{Clip, ClipImageProcessor, ClipModel};
use image::DynamicImage;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn clip_dir() -> PathBuf {
    fixtures().join("clip-tiny")
}

fn image_from_hwc(t: &Tensor) -> DynamicImage {
    let (h, w, _) = t.size3().unwrap();
    let raw = Vec::<u8>::try_from(t.flatten(0, -1)).unwrap();
    DynamicImage::ImageRgb8(image::RgbImage::from_raw(w as u32, h as u32, raw).unwrap())
}

/// The model on the reference inputs. Tolerance 1e-4 relative: the same fp32 weights (the fp16
/// file upcast on both sides) and the same op sequence; only the summation order inside
/// matmul/sdpa kernels may differ.
#[test]
fn text_and_image_features_match_transformers() {
    let r = reference("clip");
    let m = ClipModel::load(&clip_dir(), Device::Cpu).unwrap();
    let text = m.text_features(&r["input_ids"]).unwrap();
    assert_eq!(text.size(), vec![2, 12]);
    eprintln!("text_embeds max |diff| {:.2e}", max_abs_diff(&text, &r["text_embeds"]));
    assert_close(&text, &r["text_embeds"], 1e-4, "text_embeds");
    let img = tch::no_grad(|| m.image_features(&r["pixel_values"])).unwrap();
    eprintln!("image_embeds max |diff| {:.2e}", max_abs_diff(&img, &r["image_embeds"]));
    assert_close(&img, &r["image_embeds"], 1e-4, "image_embeds");
    // the processor's pixels through the model
    let img = tch::no_grad(|| m.image_features(&r["photo.pixel_values"])).unwrap();
    assert_close(&img, &r["photo.image_embeds"], 1e-4, "photo image_embeds");
}

/// Our tokenizer (the clip folder's files) gives transformers' ids, truncation included.
#[test]
fn evaluator_tokenizes_as_transformers() {
    let r = reference("clip");
    let ev = Evaluator::load(&clip_dir(), &fixtures().join("dino-tiny"), Device::Cpu).unwrap();
    let prompts: Vec<String> = serde_json::from_str(&reference_meta("clip")["prompts"]).unwrap();
    let t = ev.text_features(&prompts).unwrap();
    assert_close(&t, &r["text_embeds"], 1e-4, "text features from prompts");
}

/// Crop offsets (floor division) and normalisation are exact on an already-resized image.
#[test]
fn processor_crop_and_normalise_match_exactly() {
    let r = reference("clip");
    let p = ClipImageProcessor::load(&clip_dir(), 32).unwrap();
    assert_eq!((p.shortest_edge, p.crop), (36, (32, 32)));
    let ours = p.preprocess(&image_from_hwc(&r["photo.resized_u8"])).unwrap().unsqueeze(0);
    let d = max_abs_diff(&ours, &r["photo.pixel_values"]);
    // PIL's resized pixels in, so only the crop and (x/255 − mean)/std remain: f32 rounding.
    check_tol("crop/normalise", d, 1e-5);
}

/// The `image` crate's bicubic against PIL's (see the module docs of models::clip): close, and
/// the embeddings nearly identical.
#[test]
fn processor_resize_is_close_to_pil() {
    let r = reference("clip");
    let clip = Clip::load(&clip_dir(), Device::Cpu).unwrap();
    for key in ["photo", "wide"] {
        let ours = clip.processor.preprocess(&image_from_hwc(&r[&format!("{key}.rgb_u8")])).unwrap().unsqueeze(0);
        let want = &r[&format!("{key}.pixel_values")];
        let mean = (&ours - want).abs().mean(Kind::Double).double_value(&[]);
        let max = max_abs_diff(&ours, want);
        let e = tch::no_grad(|| clip.model.image_features(&ours)).unwrap();
        let cos = cosine_matrix(&e, &r[&format!("{key}.image_embeds")]).double_value(&[0, 0]);
        eprintln!("{key}: mean |diff| {mean:.4}, max {max:.4} (normalised units); embedding cosine {cos:.6}");
        // PIL rounds to 8 bit between its two passes, the image crate does not: a few 1/255
        // steps of difference, i.e. ~0.015 in normalised units on average at most.
        assert!(mean < 0.02 && max < 0.15, "{key}: {mean} / {max}");
        assert!(cos > 0.999, "{key}: cosine {cos}");
    }
}

#[test]
fn bad_clip_folders_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let e = ClipModel::load(&tmp.path().join("nope"), Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");
    // a file with an extra key names the file and the key
    let dir = tmp.path().join("clip");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(clip_dir().join("config.json"), dir.join("config.json")).unwrap();
    let mut t = Tensor::read_safetensors(clip_dir().join("model.safetensors")).unwrap();
    t.push(("vision_model.extra.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
    Tensor::write_safetensors(&t, dir.join("model.safetensors")).unwrap();
    let e = format!("{:#}", ClipModel::load(&dir, Device::Cpu).unwrap_err());
    assert!(e.contains("model.safetensors") && e.contains("vision_model.extra.weight"), "{e}");
    // a processor with an unsupported resample names its file
    std::fs::write(dir.join("preprocessor_config.json"), r#"{"resample": 2}"#).unwrap();
    let e = ClipImageProcessor::load(&dir, 32).unwrap_err().to_string();
    assert!(e.contains("preprocessor_config.json") && e.contains("resample"), "{e}");
}

/// The metric definitions on hand-made embeddings.
#[test]
fn metric_definitions_on_hand_made_embeddings() {
    let t = |v: &[f64], n: i64| Tensor::from_slice(v).view([n, -1]);
    // generated: e0, e1; real: e0, (e0+e1)/√2-direction, −e0
    let gen = t(&[1.0, 0.0, 0.0, 2.0], 2);
    let real = t(&[3.0, 0.0, 1.0, 1.0, -1.0, 0.0], 3);
    let s = std::f64::consts::FRAC_1_SQRT_2;
    // pairs: (e0,e0)=1, (e0,d)=s, (e0,−e0)=−1, (e1,e0)=0, (e1,d)=s, (e1,−e0)=0
    let want = (1.0 + s - 1.0 + 0.0 + s + 0.0) / 6.0;
    assert!((mean_pairwise_cosine(&gen, &real) - want).abs() < 1e-12);
    // paired: row i with row i only
    let text = t(&[1.0, 1.0, 0.0, -5.0], 2);
    assert!((mean_paired_cosine(&gen, &text) - (s - 1.0) / 2.0).abs() < 1e-12);
    // scale invariance and a zero vector (cosine 0, as torch's eps rule gives)
    assert!((mean_pairwise_cosine(&(&gen * 7.0), &real) - want).abs() < 1e-12);
    let zero = t(&[0.0, 0.0], 1);
    assert_eq!(mean_pairwise_cosine(&gen, &zero), 0.0);
}

#[test]
fn prompt_is_read_from_a1111_parameters() {
    let p = "a dog in the snow\nNegative prompt: \nSteps: 6, Sampler: DDIM, CFG scale: 7.5, Seed: 0";
    assert_eq!(prompt_of_parameters(p), "a dog in the snow");
    assert_eq!(prompt_of_parameters("two\nlines\nSteps: 5"), "two\nlines");
    assert_eq!(prompt_of_parameters("just a prompt"), "just a prompt");
}

/// The scores of the same images in two orders agree; an image scored against itself alone
/// gives DINO = CLIP-I = 1.
#[test]
fn scores_of_identical_images_are_one() {
    let ev = Evaluator::load(&clip_dir(), &fixtures().join("dino-tiny"), Device::Cpu).unwrap();
    let img = image::open(fixtures().join("photos/dog/00.jpg")).unwrap();
    let s = ev.score(std::slice::from_ref(&img), std::slice::from_ref(&img), &["a dog".into()]).unwrap();
    // the same preprocessed pixels through the same model: cosine 1 up to f32 rounding.
    check_tol("dino self-similarity", (s.dino - 1.0).abs(), 1e-6);
    check_tol("clip_i self-similarity", (s.clip_i - 1.0).abs(), 1e-6);
    assert!(s.clip_t.abs() <= 1.0);
    assert_eq!((s.n_generated, s.n_real), (1, 1));
    assert!(ev.score(&[], std::slice::from_ref(&img), &[]).is_err());
}

/// `score` end to end: prompts from the PNG `parameters` chunk that `generate` writes, or from
/// `--prompts`; an image without either is an error naming it.
#[test]
fn score_cli_reads_prompts_from_png_or_file() {
    let tmp = tempfile::tempdir().unwrap();
    let gen = tmp.path().join("gen");
    let bin = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
        c.env_remove("RUST_BACKTRACE");
        c
    };
    let o = bin()
        .args(["generate", "--model"])
        .arg(model_dir("tiny-a"))
        .args(["--prompt", "a dog in the snow", "--steps", "2", "--num-images", "2", "--device", "cpu", "--out"])
        .arg(&gen)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let score = |extra: &[&std::ffi::OsStr]| {
        bin()
            .arg("score")
            .arg("--clip")
            .arg(clip_dir())
            .arg("--dino")
            .arg(fixtures().join("dino-tiny"))
            .arg("--real")
            .arg(fixtures().join("photos/dog"))
            .arg("--generated")
            .arg(&gen)
            .args(["--device", "cpu"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = score(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["n_generated"].as_u64(), v["n_real"].as_u64()), (Some(2), Some(3)), "{v}");
    // the same as the library with the prompt the PNG carries
    let ev = Evaluator::load(&clip_dir(), &fixtures().join("dino-tiny"), Device::Cpu).unwrap();
    let real: Vec<DynamicImage> =
        (0..3).map(|i| image::open(fixtures().join(format!("photos/dog/0{i}.jpg"))).unwrap()).collect();
    let g: Vec<DynamicImage> = ["0-0.png", "0-1.png"].iter().map(|n| image::open(gen.join(n)).unwrap()).collect();
    let want = ev.score(&real, &g, &["a dog in the snow".into(), "a dog in the snow".into()]).unwrap();
    // same images, models and prompts; only the batch layout of the embeddings may differ
    // (CLI and library both embed all images in one batch here), so f32 rounding at most.
    check_tol("CLI clip_t vs library", (v["clip_t"].as_f64().unwrap() - want.clip_t).abs(), 1e-5);
    check_tol("CLI dino vs library", (v["dino"].as_f64().unwrap() - want.dino).abs(), 1e-5);
    // --prompts overrides the chunk: another prompt, another CLIP-T
    let pf = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &pf,
        "{\"image\": \"0-0.png\", \"prompt\": \"a red car\"}\n{\"image\": \"0-1.png\", \"prompt\": \"a red car\"}\n",
    )
    .unwrap();
    let o = score(&["--prompts".as_ref(), pf.as_os_str()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    check_min(
        "clip_t moves with the prompts",
        (w["clip_t"].as_f64().unwrap() - v["clip_t"].as_f64().unwrap()).abs(),
        1e-4,
    );
    assert_eq!(w["dino"], v["dino"]);
    // a prompts file without an image's name is an error naming the file and the image
    std::fs::write(&pf, "{\"image\": \"0-0.png\", \"prompt\": \"a red car\"}\n").unwrap();
    let o = score(&["--prompts".as_ref(), pf.as_os_str()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("prompts.jsonl") && err.contains("0-1.png"), "{err}");
}
