//! DINO ViT (transformers `ViTModel`) parity, preprocessing against torchvision+PIL, cosine
//! selection and the `dino` subcommand. References: `scripts/make_dino_fixture.py`.

mod common;

use common::*;
use hifi_tuner::eval::dino::{cosine, preprocess, resize_size, Dino};
use hifi_tuner::models::vit::{canonical_key, ViTModel};
use image::DynamicImage;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{Device, Kind, Tensor};

fn dino_dir() -> PathBuf {
    fixtures().join("dino-tiny")
}

fn photo(i: usize) -> PathBuf {
    fixtures().join("photos").join("dog").join(format!("{i:02}.jpg"))
}

fn open(p: &Path) -> DynamicImage {
    image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// (H, W, 3) u8 tensor -> image.
fn image_from_hwc(t: &Tensor) -> DynamicImage {
    let (h, w, c) = t.size3().unwrap();
    assert_eq!(c, 3);
    let raw = Vec::<u8>::try_from(t.flatten(0, -1)).unwrap();
    DynamicImage::ImageRgb8(image::RgbImage::from_raw(w as u32, h as u32, raw).unwrap())
}

fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().mean(Kind::Double).double_value(&[])
}

#[test]
fn last_hidden_state_matches_transformers() {
    let r = reference("dino");
    let m = ViTModel::load(&dino_dir(), Device::Cpu).unwrap();
    assert_eq!(m.config.hidden_size, 32);
    assert_eq!(m.config.layer_norm_eps, 1e-6);
    let out = tch::no_grad(|| m.forward(&r["pixel_values"]));
    assert_eq!(out.size(), vec![2, 17, 32]);
    let d = max_abs_diff(&out, &r["last_hidden_state"]);
    eprintln!(
        "last_hidden_state: max |diff| {d:.2e} (max |ref| {:.3})",
        r["last_hidden_state"].abs().max().double_value(&[])
    );
    assert_close(&out, &r["last_hidden_state"], 1e-4, "last_hidden_state");
    // the photo's reference pixels through the model
    let out = tch::no_grad(|| m.forward(&r["photo.pixel_values"]));
    assert_close(&out, &r["photo.last_hidden_state"], 1e-4, "photo last_hidden_state");
}

#[test]
fn cls_embedding_is_row_zero_after_the_final_layernorm() {
    let r = reference("dino");
    let dino = Dino::load(&dino_dir(), Device::Cpu).unwrap();
    assert_eq!((dino.image_size(), dino.dim()), (32, 32));
    let emb = tch::no_grad(|| dino.embed_pixels(&r["pixel_values"])).unwrap();
    assert_eq!(emb.size(), vec![2, 32]);
    let full = tch::no_grad(|| dino.model.forward(&r["pixel_values"]));
    assert!(emb.equal(&full.select(1, 0)), "embedding is not row 0 of the last hidden state");
    assert_close(&emb, &r["last_hidden_state"].select(1, 0), 1e-4, "CLS");
    // not the pooler output (tanh(dense(CLS))), which the fixture also records
    assert!(max_abs_diff(&emb, &r["pooler_output"]) > 0.1);
    // the final layernorm was applied: with weight ≈ 1 ± 0.2 the row is far from raw
    // residual-stream scale but has ~unit spread
    let std = emb.std_dim(-1, false, false);
    assert!(std.min().double_value(&[]) > 0.5 && std.max().double_value(&[]) < 2.0, "{std:?}");
}

#[test]
fn resize_size_follows_python_round() {
    assert_eq!(resize_size(224), 256);
    assert_eq!(resize_size(32), 37); // 36.57
    assert_eq!(resize_size(16), 18); // 18.29
    assert_eq!(resize_size(7), 8);
    let meta = reference_meta("dino");
    assert_eq!(meta["resize"], "37");
}

/// Where no resampling happens (the input is already R×R), the crop offsets (half to even) and
/// the normalisation must match torchvision exactly.
#[test]
fn crop_and_normalisation_match_torchvision_exactly() {
    let r = reference("dino");
    let resized = image_from_hwc(&r["photo.resized_u8"]); // PIL's 37×37 bicubic result
    let ours = preprocess(&resized, 32).unwrap().unsqueeze(0);
    let d = max_abs_diff(&ours, &r["photo.pixel_values"]);
    check_tol("crop/normalise vs torchvision", d, 1e-6);
}

/// The `image` crate's CatmullRom resize (and JPEG decoder) against PIL's bicubic (and
/// libjpeg-turbo), in normalised units.
#[test]
fn preprocessing_is_close_to_torchvision_pil() {
    let r = reference("dino");
    let dino = Dino::load(&dino_dir(), Device::Cpu).unwrap();
    let report = |what: &str, ours: &Tensor, want: &Tensor| -> (f64, f64) {
        let (mean, max) = (mean_abs_diff(ours, want), max_abs_diff(ours, want));
        let e1 = dino.embed_pixels(ours).unwrap();
        let e2 = dino.embed_pixels(want).unwrap();
        let cos = cosine(&e1, &e2);
        eprintln!(
            "{what}: mean |diff| {mean:.4}, max |diff| {max:.4} (normalised units); cosine of embeddings {cos:.6}"
        );
        assert!(cos > 0.995, "{what}: embedding cosine {cos}");
        (mean, max)
    };
    tch::no_grad(|| {
        // 1. same decoded pixels (PIL's), only the resize differs
        let from_pil_rgb = preprocess(&image_from_hwc(&r["photo.rgb_u8"]), 32).unwrap().unsqueeze(0);
        let (mean, max) = report("resize only (square 64→37→32)", &from_pil_rgb, &r["photo.pixel_values"]);
        assert!(mean < 0.02 && max < 0.1, "resize differs too much: {mean} / {max}");

        // 2. non-square: 64×48 → 49×37 → 32 (long side int(37·64/48) = 49)
        let wide = image_from_hwc(&r["wide.rgb_u8"]);
        assert_eq!((wide.width(), wide.height()), (64, 48));
        let ours = preprocess(&wide, 32).unwrap().unsqueeze(0);
        let (mean, max) = report("resize only (64×48→49×37→32)", &ours, &r["wide.pixel_values"]);
        assert!(mean < 0.02 && max < 0.1, "wide resize differs too much: {mean} / {max}");

        // 3. the whole path from the JPEG file: the `image` crate decodes too
        let img = open(&photo(0));
        let decoded = Tensor::from_slice(img.to_rgb8().as_raw()).view([64, 64, 3]);
        let dec_mean = mean_abs_diff(&decoded, &r["photo.rgb_u8"]);
        let dec_max = max_abs_diff(&decoded, &r["photo.rgb_u8"]);
        eprintln!("JPEG decode vs PIL: mean |diff| {dec_mean:.3}, max |diff| {dec_max} (of 255)");
        let ours = preprocess(&img, 32).unwrap().unsqueeze(0);
        let (mean, _) = report("JPEG file end to end", &ours, &r["photo.pixel_values"]);
        assert!(mean < 0.05, "end-to-end preprocessing differs too much: {mean}");
    });
}

#[test]
fn preprocess_shape_and_errors() {
    let img = open(&photo(1));
    let x = preprocess(&img, 32).unwrap();
    assert_eq!(x.size(), vec![3, 32, 32]);
    assert_eq!(x.kind(), Kind::Float);
    // a tall image: shorter side (width) → 37
    let tall = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(10, 30, image::Rgb([255, 0, 128])));
    let x = preprocess(&tall, 32).unwrap();
    assert_eq!(x.size(), vec![3, 32, 32]);
    // constant colour survives the resize: red channel = (1 − 0.485) / 0.229
    let red = x.get(0).mean(Kind::Double).double_value(&[]);
    check_tol("normalised red", (red - (1.0 - 0.485) / 0.229).abs(), 1e-5);
    let empty = DynamicImage::ImageRgb8(image::RgbImage::new(0, 5));
    assert!(preprocess(&empty, 32).unwrap_err().to_string().contains("empty"));
    assert!(preprocess(&img, 0).is_err());
}

#[test]
fn cosine_basics() {
    let a = Tensor::randn([32], (Kind::Float, Device::Cpu));
    assert!((cosine(&a, &a) - 1.0).abs() < 1e-12);
    assert!((cosine(&a, &(&a * 3.0)) - 1.0).abs() < 1e-12);
    assert!((cosine(&a, &(-&a)) + 1.0).abs() < 1e-12);
    let e0 = Tensor::from_slice(&[1.0f32, 0.0]);
    let e1 = Tensor::from_slice(&[0.0f32, 2.0]);
    assert_eq!(cosine(&e0, &e1), 0.0);
    assert_eq!(cosine(&e0, &Tensor::zeros([2], (Kind::Float, Device::Cpu))), 0.0);
    let dino = Dino::load(&dino_dir(), Device::Cpu).unwrap();
    let e = dino.embed_image(&open(&photo(0))).unwrap();
    assert_eq!(e.size(), vec![32]);
    assert!((cosine(&e, &e) - 1.0).abs() < 1e-9);
}

#[test]
fn most_similar_picks_the_identical_copy() {
    let dino = Dino::load(&dino_dir(), Device::Cpu).unwrap();
    let photos: Vec<DynamicImage> = (0..3).map(|i| open(&photo(i))).collect();
    for q in 0..3 {
        // candidates in a rotated order; the copy of the query sits at `at` (0, 2, 1)
        let order: Vec<usize> = (0..3).map(|k| (k + 2 * q) % 3).collect();
        let candidates: Vec<DynamicImage> = order.iter().map(|&k| photos[k].clone()).collect();
        let at = order.iter().position(|&k| k == q).unwrap();
        let (best, sims) = dino.most_similar(&photos[q], &candidates).unwrap();
        eprintln!("query {q}: candidates {order:?}, cosines {sims:?}");
        assert_eq!(best, at);
        assert_eq!(sims.len(), 3);
        check_tol("self-similarity", (sims[at] - 1.0).abs(), 1e-6);
        for (i, s) in sims.iter().enumerate() {
            if i != at {
                assert!(*s < sims[at] - 1e-4, "{sims:?}");
            }
        }
    }
    let err = dino.most_similar(&photos[0], &[]).unwrap_err();
    assert!(err.to_string().contains("no candidate"), "{err}");
}

#[test]
fn wrong_input_size_is_a_clear_error() {
    let m = ViTModel::load(&dino_dir(), Device::Cpu).unwrap();
    let e = m.f_forward(&Tensor::zeros([1, 3, 48, 48], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(e.contains("48*48") && e.contains("32*32"), "{e}");
    let e = m.f_forward(&Tensor::zeros([1, 4, 32, 32], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(e.contains("4 channels"), "{e}");
    let e = m.f_forward(&Tensor::zeros([3, 32, 32], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(e.contains("(B, C, H, W)"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Loading: key spellings, strictness, config errors
// ---------------------------------------------------------------------------------------------

fn weights() -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(dino_dir().join("model.safetensors")).unwrap()
}

/// A copy of dino-tiny with the given weights and, optionally, a patched config.
fn variant(
    tmp: &Path,
    name: &str,
    tensors: &[(String, Tensor)],
    config: Option<&dyn Fn(&mut serde_json::Value)>,
) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dino_dir().join("config.json")).unwrap()).unwrap();
    if let Some(f) = config {
        f(&mut cfg);
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    Tensor::write_safetensors(tensors, dir.join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", ViTModel::load(dir, Device::Cpu).unwrap_err())
}

#[test]
fn canonical_key_spellings() {
    let c = |k: &str| canonical_key(k);
    assert_eq!(c("embeddings.cls_token").as_deref(), Some("embeddings.cls_token"));
    assert_eq!(c("vit.embeddings.cls_token").as_deref(), Some("embeddings.cls_token"));
    assert_eq!(c("pooler.dense.weight"), None);
    assert_eq!(c("vit.pooler.dense.bias"), None);
    assert_eq!(
        c("layers.11.attention.q_proj.weight").as_deref(),
        Some("encoder.layer.11.attention.attention.query.weight")
    );
    assert_eq!(c("layers.0.attention.o_proj.bias").as_deref(), Some("encoder.layer.0.attention.output.dense.bias"));
    assert_eq!(c("layers.0.mlp.fc1.weight").as_deref(), Some("encoder.layer.0.intermediate.dense.weight"));
    assert_eq!(c("layers.0.mlp.fc2.weight").as_deref(), Some("encoder.layer.0.output.dense.weight"));
    assert_eq!(c("layers.0.layernorm_before.weight").as_deref(), Some("encoder.layer.0.layernorm_before.weight"));
    assert_eq!(c("classifier.weight").as_deref(), Some("classifier.weight"));
}

#[test]
fn accepts_vit_prefix_in_memory_names_and_no_pooler() {
    let tmp = tempfile::tempdir().unwrap();
    let r = reference("dino");
    let want = &r["last_hidden_state"];
    let w = weights();
    assert!(w.iter().any(|(k, _)| k.starts_with("pooler.")), "the fixture ships the pooler");
    // `vit.` prefix, pooler dropped (as ViTForImageClassification's base model minus head)
    let prefixed: Vec<(String, Tensor)> = w
        .iter()
        .filter(|(k, _)| !k.starts_with("pooler."))
        .map(|(k, t)| (format!("vit.{k}"), t.shallow_clone()))
        .collect();
    // transformers' in-memory names (a raw state_dict dump)
    let in_memory: Vec<(String, Tensor)> = w
        .iter()
        .map(|(k, t)| {
            let k = k
                .replace("encoder.layer.", "layers.")
                .replace("attention.attention.query", "attention.q_proj")
                .replace("attention.attention.key", "attention.k_proj")
                .replace("attention.attention.value", "attention.v_proj")
                .replace("attention.output.dense", "attention.o_proj")
                .replace("intermediate.dense", "mlp.fc1")
                .replace("output.dense", "mlp.fc2");
            (k, t.shallow_clone())
        })
        .collect();
    assert!(in_memory.iter().any(|(k, _)| k == "layers.1.mlp.fc2.weight"));
    for (name, tensors) in [("prefixed", prefixed), ("in-memory", in_memory)] {
        let dir = variant(tmp.path(), name, &tensors, None);
        let m = ViTModel::load(&dir, Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let out = tch::no_grad(|| m.forward(&r["pixel_values"]));
        assert_close(&out, want, 1e-4, name);
    }
}

#[test]
fn loading_is_strict_and_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let w = weights();
    let without = |drop: &str| -> Vec<(String, Tensor)> {
        w.iter().filter(|(k, _)| k != drop).map(|(k, t)| (k.clone(), t.shallow_clone())).collect()
    };
    // missing
    let dir = variant(tmp.path(), "missing", &without("encoder.layer.1.attention.attention.key.weight"), None);
    let e = load_err(&dir);
    assert!(e.contains("missing") && e.contains("encoder.layer.1.attention.attention.key.weight"), "{e}");
    assert!(e.contains("model.safetensors"), "{e}");
    // unused (a classification head)
    let mut extra = without("");
    extra.push(("classifier.weight".into(), Tensor::zeros([10, 32], (Kind::Float, Device::Cpu))));
    let dir = variant(tmp.path(), "extra", &extra, None);
    let e = load_err(&dir);
    assert!(e.contains("unused") && e.contains("classifier.weight"), "{e}");
    // mis-shaped
    let mut bad = without("layernorm.weight");
    bad.push(("layernorm.weight".into(), Tensor::ones([31], (Kind::Float, Device::Cpu))));
    let dir = variant(tmp.path(), "misshaped", &bad, None);
    let e = load_err(&dir);
    assert!(e.contains("mis-shaped") && e.contains("layernorm.weight"), "{e}");
    // a config that does not match the weights (3 layers)
    let dir = variant(tmp.path(), "layers", &without(""), Some(&|c| c["num_hidden_layers"] = 3.into()));
    let e = load_err(&dir);
    assert!(e.contains("encoder.layer.2."), "{e}");
    // unsupported activation: names config.json and the key
    let dir = variant(tmp.path(), "relu", &without(""), Some(&|c| c["hidden_act"] = "relu".into()));
    let e = load_err(&dir);
    assert!(e.contains("config.json") && e.contains("hidden_act") && e.contains("relu"), "{e}");
    // no folder / no weights
    let e = load_err(&tmp.path().join("nope"));
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(dino_dir().join("config.json"), empty.join("config.json")).unwrap();
    let e = load_err(&empty);
    assert!(e.contains("no weights") && e.contains("model.safetensors"), "{e}");
    // non-square image_size: fine for the model, refused by Dino
    let dir = variant(
        tmp.path(),
        "rect",
        &without("embeddings.position_embeddings")
            .into_iter()
            .chain([(
                "embeddings.position_embeddings".to_string(),
                Tensor::zeros([1, 1 + 4 * 2, 32], (Kind::Float, Device::Cpu)),
            )])
            .collect::<Vec<_>>(),
        Some(&|c| c["image_size"] = serde_json::json!([32, 16])),
    );
    let m = ViTModel::load(&dir, Device::Cpu).unwrap();
    assert_eq!(
        tch::no_grad(|| m.forward(&Tensor::zeros([1, 3, 32, 16], (Kind::Float, Device::Cpu)))).size(),
        vec![1, 9, 32]
    );
    let e = format!("{:#}", Dino::load(&dir, Device::Cpu).unwrap_err());
    assert!(e.contains("not square"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------------

fn run_cli(args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
    c.env_remove("RUST_BACKTRACE");
    c.args(args).output().expect("the binary runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_clean_error(o: &Output, needle: &str) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "expected a failure, got {:?}; stderr: {e}", o.status);
    assert!(e.contains("error:") && e.contains(needle), "stderr should name {needle:?}: {e}");
    assert!(!e.contains("panicked"), "panic: {e}");
    assert!(o.stdout.is_empty(), "partial output: {}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn cli_prints_one_array_per_image_in_order() {
    let dir = dino_dir();
    let (p0, p1, p2) = (photo(0), photo(1), photo(2));
    let o = run_cli(&["dino", "--model", s(&dir), "--device", "cpu", s(&p2), s(&p0), s(&p1), s(&p0)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let rows: Vec<Vec<f64>> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.len() == 32));
    let dino = Dino::load(&dir, Device::Cpu).unwrap();
    for (row, p) in rows.iter().zip([&p2, &p0, &p1, &p0]) {
        let want = dino.embed_image(&open(p)).unwrap();
        let got = Tensor::from_slice(row).to_kind(Kind::Float);
        check_tol(&p.display().to_string(), max_abs_diff(&got, &want), 1e-5);
    }
    // The same photo at batch positions 1 and 3: libtorch's CPU kernels may block a batch
    // differently per position, CPU vendor and thread count, so the rows agree only to float32
    // rounding (seen: 1.2e-7 on an AMD EPYC). 1e-5 on embeddings of size O(1) is ~100 ulps; a
    // wrong order or a wrong photo moves them by more than 1e-2 (checked on rows 0 and 1).
    let diff = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    check_tol("rows 1 and 3", diff(&rows[1], &rows[3]), 1e-5);
    check_min("rows 0 and 1 differ", diff(&rows[0], &rows[1]), 1e-2);
}

#[test]
fn cli_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p0 = photo(0);
    // missing model folder
    let nope = tmp.path().join("no-such-model");
    assert_clean_error(&run_cli(&["dino", "--model", s(&nope), "--device", "cpu", s(&p0)]), "no-such-model");
    // missing image
    let missing = tmp.path().join("missing.png");
    assert_clean_error(
        &run_cli(&["dino", "--model", s(&dino_dir()), "--device", "cpu", s(&p0), s(&missing)]),
        "missing.png",
    );
    // not an image
    let junk = tmp.path().join("junk.jpg");
    std::fs::write(&junk, b"this is not a jpeg").unwrap();
    assert_clean_error(&run_cli(&["dino", "--model", s(&dino_dir()), "--device", "cpu", s(&junk)]), "junk.jpg");
    // no images at all: clap's usage error
    let o = run_cli(&["dino", "--model", s(&dino_dir())]);
    assert!(!o.status.success());
}
