//! Single-file SD-1.x checkpoints (original LDM key names) against the diffusers folder they were
//! written from. `tests/fixtures/single/tiny-b.safetensors` is tiny-b converted by
//! `scripts/make_single_file_fixture.py` and checked there with diffusers' `from_single_file`.

use hifi_tuner::io::write_safetensors_atomic;
use hifi_tuner::models::unet::config::UNetConfig;
use hifi_tuner::models::vae::VaeConfig;
use hifi_tuner::pipeline::{GenerateRequest, LoadOptions, StableDiffusion};
use hifi_tuner::single_file::{ldm_unet_key, ldm_vae_key, Configs};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

mod common;

use common::{fixtures, model_dir, read_tensors};

fn single() -> PathBuf {
    fixtures().join("single/tiny-b.safetensors")
}

fn with_config() -> LoadOptions {
    LoadOptions { config: Some(model_dir("tiny-b")), ..Default::default() }
}

fn load_err(model: &Path, opts: &LoadOptions) -> String {
    match StableDiffusion::load_with(model, opts, Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", model.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// Every variable of both models, compared exactly: same file values, same conversion.
fn assert_same_weights(a: &StableDiffusion, b: &StableDiffusion) {
    for (what, va, vb) in [
        ("unet", a.unet.vs.variables(), b.unet.vs.variables()),
        ("vae", a.vae.vs.variables(), b.vae.vs.variables()),
        ("text_encoder", a.text_encoder.vs.variables(), b.text_encoder.vs.variables()),
    ] {
        assert_eq!(va.len(), vb.len(), "{what}");
        for (k, t) in &va {
            let u = vb.get(k).unwrap_or_else(|| panic!("{what}: {k} missing"));
            assert!(t.equal(u), "{what}: {k} differs");
        }
    }
}

fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a photo of a dog!".into(),
        negative_prompt: Some("blurry".into()),
        seed: 5,
        steps: 3,
        guidance: 7.5,
        height: 32,
        width: 32,
        num_images: 1,
    }
}

#[test]
fn single_file_with_config_equals_the_folder() {
    let folder = StableDiffusion::load(&model_dir("tiny-b"), Device::Cpu).unwrap();
    let file = StableDiffusion::load_with(&single(), &with_config(), Device::Cpu).unwrap();
    assert_same_weights(&folder, &file);
    assert_eq!(file.tokenizer.encode("a photo of a dog!"), folder.tokenizer.encode("a photo of a dog!"));
    assert_eq!(file.source, single());
    // Same weights, same computation in the same process and layout: the images are identical.
    let a = tch::no_grad(|| folder.generate(&request())).unwrap();
    let b = tch::no_grad(|| file.generate(&request())).unwrap();
    assert!(a.equal(&b), "max diff {}", common::max_abs_diff(&a, &b));
}

#[test]
fn generate_cli_gives_the_same_png_for_file_and_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |model: &Path, extra: &[&str], out: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"))
            .args(["generate", "--model"])
            .arg(model)
            .args(extra)
            .args(["--prompt", "a red cube", "--steps", "2", "--seed", "3", "--device", "cpu", "--out"])
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        image::open(out).unwrap().to_rgb8().into_raw()
    };
    let cfg = model_dir("tiny-b");
    let a = run(&model_dir("tiny-b"), &[], &tmp.path().join("a.png"));
    let b = run(&single(), &["--config", cfg.to_str().unwrap()], &tmp.path().join("b.png"));
    assert_eq!(a, b);
    // tokenize reads --config's tokenizer for a single file.
    let o = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"))
        .args(["tokenize", "--model"])
        .arg(single())
        .arg("--config")
        .arg(&cfg)
        .arg("wow!")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ids: Vec<i64> = serde_json::from_slice(&o.stdout).unwrap();
    let want =
        hifi_tuner::tokenizer::ClipTokenizer::from_dir(&cfg.join("tokenizer")).unwrap().encode_padded("wow!").ids;
    assert_eq!(ids, want);
    assert_eq!(ids[0], 998, "tiny-b's bos, not the built-in SD-1.x tokenizer's 49406");
}

/// Writes a copy of the fixture with `edit` applied to its tensor list.
fn edited(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let mut t = Tensor::read_safetensors(single()).unwrap();
    edit(&mut t);
    let path = dir.join(name);
    write_safetensors_atomic(&path, &t, &BTreeMap::new()).unwrap();
    path
}

#[test]
fn fp16_full_checkpoint_with_ema_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let path = edited(tmp.path(), "full-fp16.safetensors", |t| {
        for (_, v) in t.iter_mut() {
            if v.is_floating_point() {
                *v = v.to_kind(Kind::Half);
            }
        }
        // What a "full" (non-pruned) LDM checkpoint carries besides the weights.
        t.push(("model_ema.decay".into(), Tensor::from(0.9999f32)));
        t.push(("model_ema.num_updates".into(), Tensor::from(1000i32)));
        t.push(("model_ema.diffusion_modelout2weight".into(), Tensor::zeros([4, 16, 3, 3], (Kind::Half, Device::Cpu))));
        t.push(("alphas_cumprod".into(), Tensor::ones([1000], (Kind::Float, Device::Cpu))));
        t.push(("betas".into(), Tensor::ones([1000], (Kind::Float, Device::Cpu))));
    });
    let sd = StableDiffusion::load_with(&path, &with_config(), Device::Cpu).unwrap();
    // fp16 file values land in the fp32 model exactly (fp16 → fp32 is exact).
    let folder = read_tensors(&model_dir("tiny-b").join("unet/diffusion_pytorch_model.safetensors"));
    let w = &folder["conv_in.weight"];
    let got = &sd.unet.vs.variables()["conv_in.weight"];
    assert_eq!(got.kind(), Kind::Float);
    assert!(got.equal(&w.to_kind(Kind::Half).to_kind(Kind::Float)));
    assert!(!got.equal(w), "the fp16 rounding must show (else this test checks nothing)");
}

#[test]
fn unknown_keys_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    // Inside a component: reported as unused by load_strict, with its full name.
    let path = edited(tmp.path(), "extra.safetensors", |t| {
        t.push(("model.diffusion_model.extra_block.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
    });
    let err = load_err(&path, &with_config());
    assert!(err.contains("extra_block.weight") && err.contains("unused"), "{err}");
    // Outside every component.
    let path = edited(tmp.path(), "stray.safetensors", |t| {
        t.push(("control_model.zero_convs.0.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
    });
    let err = load_err(&path, &with_config());
    assert!(err.contains("control_model.zero_convs.0.weight") && err.contains("no Stable Diffusion"), "{err}");
    // A missing weight is named too.
    let path = edited(tmp.path(), "missing.safetensors", |t| {
        t.retain(|(k, _)| k != "first_stage_model.decoder.norm_out.bias");
    });
    let err = load_err(&path, &with_config());
    assert!(err.contains("decoder.conv_norm_out.bias") && err.contains("missing"), "{err}");
    // Only a UNet: not a full checkpoint.
    let path = edited(tmp.path(), "unet-only.safetensors", |t| t.retain(|(k, _)| k.starts_with("model.")));
    let err = load_err(&path, &with_config());
    assert!(err.contains("not a full Stable Diffusion 1.x checkpoint"), "{err}");
}

#[test]
fn wrong_config_shapes_are_named() {
    // tiny-a's configs do not fit tiny-b's weights: mis-shaped keys, by name.
    let err = load_err(&single(), &LoadOptions { config: Some(model_dir("tiny-a")), ..Default::default() });
    assert!(err.contains("mis-shaped") && err.contains("model.diffusion_model."), "{err}");
    assert!(err.contains("tiny-a"), "the configs used are named: {err}");
}

#[test]
fn pickles_and_misplaced_options_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("v1-5-pruned.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04 not really").unwrap();
    let err = load_err(&ckpt, &LoadOptions::default());
    assert!(err.contains("never unpickles") && err.contains("safetensors"), "{err}");
    let err = load_err(&model_dir("tiny-b"), &with_config());
    assert!(err.contains("--config") && err.contains("single-file"), "{err}");
    let err = load_err(&single(), &LoadOptions { variant: Some("fp16".into()), ..Default::default() });
    assert!(err.contains("--variant"), "{err}");
    let err = load_err(Path::new("no/such/dir/model.safetensors"), &LoadOptions::default());
    assert!(err.contains("no such folder or file"), "{err}");
}

#[test]
fn builtin_sd15_configs_and_tokenizer() {
    let c = Configs::sd15().unwrap();
    assert_eq!(c.unet.block_out_channels, [320, 640, 1280, 1280]);
    assert_eq!(c.text_encoder.hidden_size, 768);
    let want = [49406, 320, 1125, 539, 320, 48136, 1929, 49407];
    assert_eq!(c.tokenizer.encode("a photo of a sks dog"), want);
    assert_eq!(c.tokenizer.pad_id(), 49407);
    // The built-in tokenizer files are the CLIP tokenizer fixture's.
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        let a = std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tokenizer").join(f)).unwrap();
        let b = std::fs::read(fixtures().join("tokenizers/clip").join(f)).unwrap();
        assert!(a == b, "assets/tokenizer/{f} differs from the fixture");
    }
}

/// The SD-1.5 names every converter agrees on (diffusers' `convert_ldm_unet_checkpoint` /
/// `convert_ldm_vae_checkpoint` and the original v1-5 checkpoint's key list).
#[test]
fn sd15_key_names() {
    let c = Configs::sd15().unwrap();
    let unet: &UNetConfig = &c.unet;
    for (ours, ldm) in [
        ("conv_in.weight", "input_blocks.0.0.weight"),
        ("time_embedding.linear_2.bias", "time_embed.2.bias"),
        ("down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
        ("down_blocks.0.attentions.1.proj_in.weight", "input_blocks.2.1.proj_in.weight"),
        ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
        ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
        ("down_blocks.3.resnets.1.conv2.bias", "input_blocks.11.0.out_layers.3.bias"),
        ("mid_block.resnets.1.time_emb_proj.weight", "middle_block.2.emb_layers.1.weight"),
        (
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
        ),
        ("up_blocks.0.resnets.2.conv1.weight", "output_blocks.2.0.in_layers.2.weight"),
        ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
        ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
        (
            "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight",
            "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
        ),
        ("conv_norm_out.weight", "out.0.weight"),
        ("conv_out.bias", "out.2.bias"),
    ] {
        assert_eq!(ldm_unet_key(ours, unet).as_deref(), Some(ldm), "{ours}");
    }
    let vae: &VaeConfig = &c.vae;
    for (ours, ldm) in [
        ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
        ("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "encoder.down.1.block.0.nin_shortcut.weight"),
        ("encoder.down_blocks.2.downsamplers.0.conv.bias", "encoder.down.2.downsample.conv.bias"),
        ("encoder.mid_block.attentions.0.to_q.weight", "encoder.mid.attn_1.q.weight"),
        ("decoder.mid_block.attentions.0.to_out.0.bias", "decoder.mid.attn_1.proj_out.bias"),
        ("decoder.mid_block.resnets.1.norm2.weight", "decoder.mid.block_2.norm2.weight"),
        ("decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up.3.upsample.conv.weight"),
        ("decoder.up_blocks.3.resnets.2.conv1.bias", "decoder.up.0.block.2.conv1.bias"),
        ("post_quant_conv.weight", "post_quant_conv.weight"),
    ] {
        assert_eq!(ldm_vae_key(ours, vae).as_deref(), Some(ldm), "{ours}");
    }
    assert_eq!(ldm_unet_key("class_embedding.weight", unet), None);
}
