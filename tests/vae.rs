//! AutoencoderKL: parity with diffusers 0.42.1 on the tiny fixtures, legacy attention names,
//! non-square images, strict loading and config refusals.

use hifi_tuner::models::vae::{map_legacy_key, AutoencoderKL};
use hifi_tuner::rng::seeded;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

mod common;

use common::{check_tol, fixtures};

/// A float reference tensor (`vae.*` keys are float32 already; the conversion keeps the
/// comparisons in one dtype whatever the file holds).
fn reference(name: &str, key: &str) -> Tensor {
    common::reference_tensor(name, key).to_kind(Kind::Float)
}

fn vae_dir(name: &str) -> PathBuf {
    fixtures().join(name).join("vae")
}

fn load(name: &str) -> AutoencoderKL {
    AutoencoderKL::load(&vae_dir(name), Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

/// max |a - b| / max |b|
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let num = (a - b).abs().max().double_value(&[]);
    let den = b.abs().max().double_value(&[]).max(1e-12);
    num / den
}

fn check_parity(name: &str) {
    let vae = load(name);
    let image = reference(name, "vae.image");
    let post = tch::no_grad(|| vae.encode(&image));
    let z = reference(name, "vae.z");
    let decoded = tch::no_grad(|| vae.decode(&z));
    for (what, got, want) in [
        ("latent_mean", &post.mean, reference(name, "vae.latent_mean")),
        ("latent_logvar", &post.logvar, reference(name, "vae.latent_logvar")),
        ("decoded", &decoded, reference(name, "vae.decoded")),
    ] {
        let rel = rel_diff(got, &want);
        println!("{name} {what} {:?}: max relative diff {rel:.3e}", want.size());
        check_tol(&format!("{name} {what}"), rel, 1e-4);
    }
}

#[test]
fn parity_tiny_a() {
    check_parity("tiny-a");
}

#[test]
fn parity_tiny_b() {
    check_parity("tiny-b");
}

#[test]
fn config_accessors() {
    let a = load("tiny-a");
    assert_eq!(a.downscale_factor(), 1 << (a.config.block_out_channels.len() - 1));
    let b = load("tiny-b");
    assert_eq!(b.config.block_out_channels.len(), 3);
    assert_eq!(b.downscale_factor(), 4);
    assert_eq!(b.scaling_factor(), 0.3);
    assert_eq!(b.latent_channels(), b.config.latent_channels);
}

#[test]
fn latent_dist_sample_and_mode() {
    let vae = load("tiny-b");
    let image = reference("tiny-b", "vae.image");
    let post = tch::no_grad(|| vae.encode(&image));
    assert!(post.mode().equal(&post.mean));
    let noise = post.mean.randn_like();
    let s = post.sample_with_noise(&noise);
    let expected = &post.mean + (&post.logvar * 0.5).exp() * &noise;
    assert!(s.equal(&expected));
    let s1 = seeded(7, || post.sample());
    let s2 = seeded(7, || post.sample());
    assert!(s1.equal(&s2));
    assert_eq!(s1.size(), post.mean.size());
    assert!((&s1 - &post.mean).abs().max().double_value(&[]) > 0.0);
    let lv_min = post.logvar.min().double_value(&[]);
    let lv_max = post.logvar.max().double_value(&[]);
    assert!((-30.0..=20.0).contains(&lv_min) && (-30.0..=20.0).contains(&lv_max));
}

/// Writes `tensors` with tiny-b's VAE config into a temp dir.
fn write_variant(tensors: &[(String, Tensor)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(vae_dir("tiny-b").join("config.json"), dir.path().join("config.json")).unwrap();
    Tensor::write_safetensors(tensors, dir.path().join("diffusion_pytorch_model.safetensors")).unwrap();
    dir
}

fn tiny_b_tensors() -> Vec<(String, Tensor)> {
    let file = hifi_tuner::load::weight_file(&vae_dir("tiny-b")).unwrap();
    Tensor::read_safetensors(file).unwrap()
}

fn to_legacy(key: &str) -> String {
    [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")].iter().fold(
        key.to_string(),
        |k, (new, old)| {
            if k.contains(".mid_block.attentions.") {
                k.replace(new, old)
            } else {
                k
            }
        },
    )
}

fn outputs(vae: &AutoencoderKL) -> (Tensor, Tensor, Tensor) {
    let image = reference("tiny-b", "vae.image");
    let z = reference("tiny-b", "vae.z");
    tch::no_grad(|| {
        let p = vae.encode(&image);
        (p.mean, p.logvar, vae.decode(&z))
    })
}

#[test]
fn legacy_and_modern_attention_names_give_identical_outputs() {
    let tensors = tiny_b_tensors();
    let modern: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| (map_legacy_key(k), t.shallow_clone())).collect();
    let legacy: Vec<(String, Tensor)> = modern.iter().map(|(k, t)| (to_legacy(k), t.shallow_clone())).collect();
    assert!(legacy.iter().any(|(k, _)| k.ends_with("mid_block.attentions.0.query.weight")));
    assert!(legacy.iter().any(|(k, _)| k.ends_with("mid_block.attentions.0.proj_attn.bias")));
    assert!(modern.iter().any(|(k, _)| k.ends_with("mid_block.attentions.0.to_out.0.weight")));
    // The oldest layout: legacy names with the projections stored as 1x1 convolutions.
    let conv: Vec<(String, Tensor)> = legacy
        .iter()
        .map(|(k, t)| {
            let is_proj = k.contains(".mid_block.attentions.") && k.ends_with(".weight") && !k.contains("group_norm");
            (k.clone(), if is_proj { t.unsqueeze(-1).unsqueeze(-1) } else { t.shallow_clone() })
        })
        .collect();
    assert!(conv.iter().any(|(k, t)| k.ends_with("attentions.0.key.weight") && t.dim() == 4));

    let mut results = Vec::new();
    for (what, ts) in [("modern", &modern), ("legacy", &legacy), ("legacy conv", &conv)] {
        let dir = write_variant(ts);
        let vae = AutoencoderKL::load(dir.path(), Device::Cpu).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        results.push((what, outputs(&vae)));
    }
    let (_, (m0, l0, d0)) = &results[0];
    for (what, (m, l, d)) in &results[1..] {
        assert!(m.equal(m0) && l.equal(l0) && d.equal(d0), "{what} outputs differ from modern");
    }
}

#[test]
fn both_names_for_one_parameter_is_an_error() {
    let mut tensors: Vec<(String, Tensor)> =
        tiny_b_tensors().into_iter().map(|(k, t)| (map_legacy_key(&k), t)).collect();
    let (_, w) = tensors
        .iter()
        .find(|(k, _)| k == "encoder.mid_block.attentions.0.to_q.weight")
        .expect("tiny-b has a mid-block attention");
    let w = w.copy();
    tensors.push(("encoder.mid_block.attentions.0.query.weight".into(), w));
    let dir = write_variant(&tensors);
    let err = AutoencoderKL::load(dir.path(), Device::Cpu).expect_err("duplicate accepted");
    let msg = format!("{err:#}");
    assert!(msg.contains("attentions.0.query.weight") && msg.contains("attentions.0.to_q.weight"), "{msg}");
}

#[test]
fn non_square_images_keep_height_and_width_apart() {
    let vae = load("tiny-b");
    let f = vae.downscale_factor();
    let (h, w) = (3 * f * 2, 5 * f * 2); // 24 x 40 for f = 4
    let image = seeded(3, || Tensor::rand([1, 3, h, w], (Kind::Float, Device::Cpu))) * 2.0 - 1.0;
    let post = tch::no_grad(|| vae.encode(&image));
    assert_eq!(post.mean.size(), vec![1, vae.latent_channels(), h / f, w / f]);
    let z = Tensor::randn([1, vae.latent_channels(), h / f, w / f], (Kind::Float, Device::Cpu));
    let dec = tch::no_grad(|| vae.decode(&z));
    assert_eq!(dec.size(), vec![1, 3, h, w]);

    // Transposition equivariance: with every conv kernel transposed, the model on the
    // transposed image gives the transposed outputs (the downsampling pad, right and bottom,
    // is symmetric under transposition). A mixed-up H/W anywhere breaks this.
    let vt = load("tiny-b");
    tch::no_grad(|| {
        for (_, mut v) in vt.vs.variables() {
            if v.dim() == 4 {
                let t = v.transpose(2, 3).copy();
                v.copy_(&t);
            }
        }
    });
    let post_t = tch::no_grad(|| vt.encode(&image.transpose(2, 3)));
    let dec_t = tch::no_grad(|| vt.decode(&z.transpose(2, 3)));
    for (what, a, b) in [
        ("mean", post_t.mean.transpose(2, 3), &post.mean),
        ("logvar", post_t.logvar.transpose(2, 3), &post.logvar),
        ("decoded", dec_t.transpose(2, 3), &dec),
    ] {
        let rel = rel_diff(&a, b);
        check_tol(&format!("non-square {what}: transposed model"), rel, 1e-5);
    }
    // An odd size also runs (the padded stride-2 conv gives floor(H/2)).
    let odd = Tensor::rand([1, 3, h + 1, w - 1], (Kind::Float, Device::Cpu));
    let post_odd = tch::no_grad(|| vae.encode(&odd));
    assert_eq!(post_odd.mean.size(), vec![1, vae.latent_channels(), (h + 1) / f, (w - 1) / f]);
}

#[test]
fn missing_key_is_named() {
    let mut t = tiny_b_tensors();
    t.retain(|(k, _)| k != "decoder.up_blocks.1.resnets.1.conv2.bias");
    let n = t.len();
    let dir = write_variant(&t);
    assert_eq!(n + 1, tiny_b_tensors().len(), "the removed key must exist in tiny-b");
    let err = AutoencoderKL::load(dir.path(), Device::Cpu).expect_err("missing key accepted");
    let msg = format!("{err:#}");
    assert!(msg.contains("missing") && msg.contains("decoder.up_blocks.1.resnets.1.conv2.bias"), "{msg}");
}

#[test]
fn unused_and_misshaped_keys_are_named() {
    let mut t = tiny_b_tensors();
    t.push(("encoder.down_blocks.0.extra.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
    for (k, v) in t.iter_mut() {
        if k == "post_quant_conv.bias" {
            *v = Tensor::zeros([v.size()[0] + 1], (Kind::Float, Device::Cpu));
        }
    }
    let dir = write_variant(&t);
    let err = AutoencoderKL::load(dir.path(), Device::Cpu).expect_err("bad file accepted");
    let msg = format!("{err:#}");
    assert!(msg.contains("unused") && msg.contains("encoder.down_blocks.0.extra.weight"), "{msg}");
    assert!(msg.contains("mis-shaped") && msg.contains("post_quant_conv.bias"), "{msg}");
}

fn with_config_edit(edit: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<AutoencoderKL> {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae_dir("tiny-b").join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    Tensor::write_safetensors(&tiny_b_tensors(), dir.path().join("diffusion_pytorch_model.safetensors")).unwrap();
    AutoencoderKL::load(dir.path(), Device::Cpu)
}

#[test]
fn unsupported_config_values_are_refused_naming_the_key() {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("shift_factor", Box::new(|c| c["shift_factor"] = 0.1.into())),
        ("down_block_types", Box::new(|c| c["down_block_types"][1] = "AttnDownEncoderBlock2D".into())),
        ("up_block_types", Box::new(|c| c["up_block_types"][0] = "AttnUpDecoderBlock2D".into())),
        ("act_fn", Box::new(|c| c["act_fn"] = "gelu".into())),
        ("latents_mean", Box::new(|c| c["latents_mean"] = serde_json::json!([0.0, 0.0, 0.0, 0.0]))),
    ];
    for (key, edit) in cases {
        let err = with_config_edit(edit).expect_err(key);
        let msg = format!("{err:#}");
        assert!(msg.contains(key) && msg.contains("config.json"), "{key}: {msg}");
    }
}

#[test]
fn quant_convs_and_mid_attention_follow_the_config() {
    // Without quant convs / mid attention the file has keys the model lacks: named as unused.
    let err = with_config_edit(|c| c["use_quant_conv"] = false.into()).expect_err("extra keys accepted");
    let msg = format!("{err:#}");
    assert!(msg.contains("2 unused") && msg.contains("quant_conv.weight"), "{msg}");
    let err = with_config_edit(|c| c["mid_block_add_attention"] = false.into()).expect_err("extra keys accepted");
    let msg = format!("{err:#}");
    assert!(msg.contains("unused") && msg.contains("mid_block.attentions.0"), "{msg}");
    // And with the keys removed the smaller model loads.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae_dir("tiny-b").join("config.json")).unwrap()).unwrap();
    cfg["use_quant_conv"] = false.into();
    cfg["mid_block_add_attention"] = false.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let mut t = tiny_b_tensors();
    t.retain(|(k, _)| !k.starts_with("quant_conv.") && !k.contains(".mid_block.attentions."));
    Tensor::write_safetensors(&t, dir.path().join("diffusion_pytorch_model.safetensors")).unwrap();
    let vae = AutoencoderKL::load(dir.path(), Device::Cpu).unwrap_or_else(|e| panic!("{e:#}"));
    let post = tch::no_grad(|| vae.encode(&reference("tiny-b", "vae.image")));
    assert_eq!(post.mean.size(), reference("tiny-b", "vae.latent_mean").size());
}
