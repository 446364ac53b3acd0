//! Backbones beyond SD-1.x, against diffusers on tiny random models (issue 23):
//! - SD-2.x (`tiny-sd2`): the OpenCLIP text encoder as transformers ships it (gelu, pad "!"),
//!   linear projections, per-level heads, v-prediction in the training target, the whole method
//!   on it from the command line (learn → generate --subject / --reference-guidance, replace),
//!   and single files with OpenCLIP key names. The pipeline's image parity runs in
//!   `tests/pipeline.rs` (tiny-sd2 is one of its `MODELS`).
//! - SDXL (`tiny-xl`): both tokenizers and encoders (penultimate states, pooled `text_embeds`),
//!   the UNet's `text_time` micro-conditioning, `StableDiffusionXLPipeline`'s images with and
//!   without a negative prompt (`force_zeros_for_empty_prompt`), and what is refused.
//!
//! References: `tests/fixtures/tiny-sd2.ref.safetensors` (scripts/make_fixtures.py),
//! `tests/fixtures/tiny-xl.ref.safetensors` (scripts/make_sdxl_fixture.py),
//! `tests/fixtures/single/tiny-sd2.safetensors` (scripts/make_single_file_fixture.py).

mod common;

use common::*;
use hifi_tuner::models::unet::{AddedCond, UNet2DConditionModel};
use hifi_tuner::pipeline::{GenerateRequest, LoadOptions, StableDiffusion};
use hifi_tuner::single_file::{open_clip_text_key, Family};
use hifi_tuner::tokenizer::ClipTokenizer;
use std::path::Path;
use std::process::{Command, Output};
use tch::{Device, Tensor};

fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load(&model_dir(name), Device::Cpu).unwrap_or_else(|e| panic!("{e:#}"))
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
    c.env_remove("RUST_BACKTRACE");
    c
}

fn ok(o: &Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{e}");
    e
}

/// Fails with status 1, names `needle`, no panic.
fn refused(o: &Output, needle: &str) -> String {
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "expected a refusal: {e}");
    assert!(e.contains(needle), "the error should name {needle:?}: {e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

// ---- SD-2.x ---------------------------------------------------------------------------------

#[test]
fn sd2_text_encoder_unet_and_vae_match_diffusers() {
    let sd = load("tiny-sd2");
    let r = reference("tiny-sd2");
    assert_eq!(sd.scheduler_config.prediction_type, "v_prediction");
    // The tokenizer pads with "!" (id 0), as SD-2.x's does, after <eos> (999).
    let ids = sd.tokenize("a photo of a sks dog wearing a red hat, 4k");
    assert!(ids.equal(&r["text.input_ids"].get(0).unsqueeze(0)), "prompt ids differ from CLIPTokenizer's");
    let n = Vec::<i64>::try_from(ids.view([-1])).unwrap();
    let eos = n.iter().position(|&i| i == 999).expect("an eos");
    assert!(n[eos + 1..].iter().all(|&i| i == 0), "padding after eos is \"!\" = 0: {n:?}");
    tch::no_grad(|| {
        let h = sd.text_encoder.forward(&r["text.input_ids"]);
        assert_close(&h, &r["text.last_hidden_state"], 1e-4, "tiny-sd2 text encoder (gelu, 3 layers)");
        let out = sd.unet.forward(&r["unet.sample"], &r["unet.timestep"], &r["unet.encoder_hidden_states"], None);
        assert_close(&out, &r["unet.out"], 1e-4, "tiny-sd2 UNet (linear projections, heads [2, 4, 8])");
        let dec = sd.vae.decode(&r["vae.z"]);
        assert_close(&dec, &r["vae.decoded"], 1e-4, "tiny-sd2 VAE decoder");
    });
}

/// The training target of a v-prediction model is diffusers' `get_velocity`, and every loss we
/// optimise (Eq. 6, TI, DreamBooth, LoRA) regresses onto it.
#[test]
fn v_prediction_training_target_is_diffusers_get_velocity() {
    let sd = load("tiny-sd2");
    let r = reference("tiny-sd2");
    let sched = sd.scheduler(10).unwrap();
    let v = sched.training_target(&r["sched.velocity_x0"], &r["sched.velocity_noise"], &r["sched.velocity_t"]).unwrap();
    // ~1 ulp of a product of O(1) numbers; 1e-6 keeps > 10x over what the sweep sees.
    assert_close(&v, &r["sched.velocity"], 1e-6, "v = √ᾱ·ε − √(1−ᾱ)·x_0");
    // ε-models regress onto ε itself.
    let eps_model = load("tiny-b").scheduler(10).unwrap();
    let e = eps_model.training_target(&r["sched.velocity_x0"], &r["sched.velocity_noise"], &r["sched.velocity_t"]);
    assert!(e.unwrap().equal(&r["sched.velocity_noise"]));
    // A model predicting x_0 ("sample") cannot be trained here, and says so.
    let mut cfg = sd.scheduler_config.clone();
    cfg.prediction_type = "sample".into();
    let s = hifi_tuner::scheduler::DdimScheduler::new(cfg, 10).unwrap();
    let err = s.check_trainable().unwrap_err().to_string();
    assert!(err.contains("v_prediction") && err.contains("\"sample\""), "{err}");
}

#[test]
fn sd2_builtin_tokenizer_pads_with_exclamation_marks() {
    let sd1 = ClipTokenizer::sd15().unwrap().encode_padded("a dog").ids;
    let sd2 = ClipTokenizer::sd2().unwrap().encode_padded("a dog").ids;
    assert_eq!(&sd1[..4], &sd2[..4], "the same vocabulary: bos, a, dog, eos");
    assert_eq!((sd1[4], sd2[4]), (49407, 0), "SD-1.x pads with <eos>, SD-2.x with \"!\"");
    assert!(sd2[4..].iter().all(|&i| i == 0));
}

#[test]
fn sd2_single_file_with_open_clip_keys_equals_the_folder() {
    let file = fixtures().join("single/tiny-sd2.safetensors");
    assert_eq!(Family::of_file(&file).unwrap(), Family::Sd2);
    assert_eq!(Family::of_file(&fixtures().join("single/tiny-b.safetensors")).unwrap(), Family::Sd1);
    let opts = LoadOptions { config: Some(model_dir("tiny-sd2")), ..Default::default() };
    let single = StableDiffusion::load_with(&file, &opts, Device::Cpu).unwrap_or_else(|e| panic!("{e:#}"));
    let folder = load("tiny-sd2");
    for (what, a, b) in [
        ("text encoder", &single.text_encoder.vs, &folder.text_encoder.vs),
        ("unet", &single.unet.vs, &folder.unet.vs),
        ("vae", &single.vae.vs, &folder.vae.vs),
    ] {
        let (va, vb) = (a.variables(), b.variables());
        assert_eq!(va.len(), vb.len(), "{what}");
        for (k, t) in &vb {
            assert!(va[k].equal(t), "{what}: {k} differs after the OpenCLIP conversion");
        }
    }
    // The OpenCLIP names, as diffusers' convert_open_clip_checkpoint maps them.
    let cases = [
        ("token_embedding.weight", Some("text_model.embeddings.token_embedding.weight")),
        ("positional_embedding", Some("text_model.embeddings.position_embedding.weight")),
        ("ln_final.bias", Some("text_model.final_layer_norm.bias")),
        ("transformer.resblocks.22.ln_1.weight", Some("text_model.encoder.layers.22.layer_norm1.weight")),
        ("transformer.resblocks.0.mlp.c_fc.bias", Some("text_model.encoder.layers.0.mlp.fc1.bias")),
        ("transformer.resblocks.0.mlp.c_proj.weight", Some("text_model.encoder.layers.0.mlp.fc2.weight")),
        ("transformer.resblocks.3.attn.out_proj.weight", Some("text_model.encoder.layers.3.self_attn.out_proj.weight")),
        ("transformer.resblocks.3.attn.in_proj_weight", Some("text_model.encoder.layers.3.self_attn.")),
        ("transformer.resblocks.3.attn.in_proj_weight.x", None),
        ("visual.proj", None),
    ];
    for (key, want) in cases {
        assert_eq!(open_clip_text_key(key).as_deref(), want, "{key}");
    }
    // The same file through the CLI: the images equal the folder's.
    let tmp = tempfile::tempdir().unwrap();
    let gen = |model: &Path, extra: &[&str], out: &str| {
        let p = tmp.path().join(out);
        let mut c = bin();
        c.args(["generate", "--model"]).arg(model).args(extra);
        c.args(["--prompt", "a red hat", "--steps", "3", "--seed", "5", "--device", "cpu", "--out"]).arg(&p);
        ok(&c.output().unwrap());
        png_rgb(&p)
    };
    let cfg = model_dir("tiny-sd2");
    let a = gen(&file, &["--config", cfg.to_str().unwrap()], "file.png");
    let b = gen(&cfg, &[], "folder.png");
    assert!(a == b, "single file and folder draw different images");
}

#[test]
fn sd2_single_file_without_config_uses_the_sd21_configs_and_bad_files_are_named() {
    // Without --config, an OpenCLIP file is converted with SD-2.1's configs: the tiny weights
    // do not fit them, and the error says which configs were used.
    let file = fixtures().join("single/tiny-sd2.safetensors");
    let err = format!("{:#}", StableDiffusion::load(&file, Device::Cpu).err().expect("tiny weights vs SD-2.1 shapes"));
    assert!(err.contains("SD-2.1") && err.contains("assets/configs/sd21"), "{err}");
    // A fused q/k/v of the wrong height is named.
    let tmp = tempfile::tempdir().unwrap();
    let mut tensors = Tensor::read_safetensors(&file).unwrap();
    for (k, v) in tensors.iter_mut() {
        if k == "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" {
            *v = v.narrow(0, 0, 96).contiguous();
        }
    }
    let bad = tmp.path().join("bad.safetensors");
    Tensor::write_safetensors(&tensors, &bad).unwrap();
    let opts = LoadOptions { config: Some(model_dir("tiny-sd2")), ..Default::default() };
    let err = format!("{:#}", StableDiffusion::load_with(&bad, &opts, Device::Cpu).err().expect("bad in_proj"));
    assert!(err.contains("resblocks.1.attn.in_proj_weight") && err.contains("144 rows"), "{err}");
    // Both text encoders in one file: refused, naming both prefixes.
    let sd1 = Tensor::read_safetensors(fixtures().join("single/tiny-b.safetensors")).unwrap();
    let mut both = Tensor::read_safetensors(&file).unwrap();
    both.extend(sd1.into_iter().filter(|(k, _)| k.starts_with("cond_stage_model.transformer.")));
    let two = tmp.path().join("two.safetensors");
    Tensor::write_safetensors(&both, &two).unwrap();
    let err = format!("{:#}", StableDiffusion::load_with(&two, &opts, Device::Cpu).err().expect("two encoders"));
    assert!(err.contains("cond_stage_model.transformer.") && err.contains("cond_stage_model.model."), "{err}");
}

/// The paper's method on a v-prediction SD-2 model from the command line: learn (masked,
/// step-wise) → generate with the subject, plain and reference-guided → replace with it.
#[test]
fn sd2_whole_method_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("tiny-sd2");
    let subject = tmp.path().join("dog");
    let mut c = bin();
    c.args(["learn", "--model"]).arg(&model).arg("--images").arg(fixtures().join("photos/dog"));
    c.arg("--masks").arg(fixtures().join("photos/dog-masks"));
    c.args(["--class-noun", "dog", "--device", "cpu", "--seed", "3", "--steps", "4", "--stepwise-steps", "1"]);
    c.args(["--ddim-steps", "3", "--tokens", "2", "--out"]).arg(&subject);
    ok(&c.output().unwrap());
    let log = std::fs::read_to_string(subject.join("train_log.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().expect("loss"))
        .collect();
    assert_eq!(losses.len(), 4 + 3);
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
    for (name, extra) in [
        ("plain.png", vec![]),
        ("guided.png", vec!["--reference-guidance", "--t-start", "3", "--t-end", "1", "--guidance-steps", "2"]),
    ] {
        let out = tmp.path().join(name);
        let mut c = bin();
        c.args(["generate", "--model"]).arg(&model).arg("--subject").arg(&subject);
        c.args(["--prompt", "a dog on the beach", "--steps", "4", "--seed", "1", "--device", "cpu"]);
        c.args(&extra).arg("--out").arg(&out);
        ok(&c.output().unwrap());
        let img = png_rgb(&out);
        assert_eq!(img.len(), 16 * 16 * 3, "{name}: the model's default 16×16 (sample_size 8 × 2)");
    }
    let out = tmp.path().join("edit.png");
    let mut c = bin();
    c.args(["replace", "--model"]).arg(&model).arg("--image").arg(fixtures().join("photos/dog/00.jpg"));
    c.args(["--caption", "a photo of a cat on a bench", "--source-word", "cat", "--steps", "4", "--inner-steps"]);
    c.args(["2", "--device", "cpu", "--subject"]).arg(&subject).arg("--out").arg(&out);
    ok(&c.output().unwrap());
    assert!(out.is_file());
}

// ---- SDXL -----------------------------------------------------------------------------------

fn xl_request(meta: &std::collections::HashMap<String, String>, key: &str) -> GenerateRequest {
    let get = |k: &str| meta[&format!("{key}.{k}")].clone();
    GenerateRequest {
        prompt: get("prompt"),
        negative_prompt: meta.get(&format!("{key}.negative_prompt")).cloned(),
        seed: get("seed").parse().unwrap(),
        steps: get("steps").parse().unwrap(),
        guidance: get("guidance").parse().unwrap(),
        height: get("height").parse().unwrap(),
        width: get("width").parse().unwrap(),
        num_images: get("num_images").parse().unwrap(),
    }
}

#[test]
fn sdxl_tokenizers_and_text_encoders_match_diffusers() {
    let sd = load("tiny-xl");
    let r = reference("tiny-xl");
    let xl = sd.xl.as_ref().expect("tiny-xl is SDXL");
    assert!(xl.force_zeros_for_empty_prompt);
    let prompts: Vec<String> = serde_json::from_str(&reference_meta("tiny-xl")["text.prompts"]).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let ids_1 = sd.tokenizer.encode_padded(p).ids;
        let ids_2 = xl.tokenizer_2.encode_padded(p).ids;
        assert_eq!(ids_1, Vec::<i64>::try_from(r["text.input_ids_1"].get(i as i64)).unwrap(), "tokenizer ids: {p}");
        assert_eq!(ids_2, Vec::<i64>::try_from(r["text.input_ids_2"].get(i as i64)).unwrap(), "tokenizer_2 ids: {p}");
    }
    let pads = |ids: Vec<i64>| {
        let eos = ids.iter().position(|&i| i == 999).expect("an <eos>");
        ids[eos + 1..].to_vec()
    };
    assert!(pads(xl.tokenizer_2.encode_padded("a dog").ids).iter().all(|&i| i == 0), "tokenizer_2 pads with \"!\" (0)");
    assert!(pads(sd.tokenizer.encode_padded("a dog").ids).iter().all(|&i| i == 999), "tokenizer pads with <eos>");
    tch::no_grad(|| {
        let o1 = sd.text_encoder.penultimate_and_pooled(&r["text.input_ids_1"]).unwrap();
        let o2 = xl.text_encoder_2.penultimate_and_pooled(&r["text.input_ids_2"]).unwrap();
        assert!(o1.text_embeds.is_none(), "encoder 1 is a plain CLIPTextModel");
        assert_close(&o1.penultimate, &r["text.penultimate_1"], 1e-4, "encoder 1 hidden_states[-2]");
        assert_close(&o2.penultimate, &r["text.penultimate_2"], 1e-4, "encoder 2 hidden_states[-2]");
        assert_close(&o2.text_embeds.unwrap(), &r["text.text_embeds_2"], 1e-4, "encoder 2 text_embeds");
        // The pipeline's prompt embeddings: both penultimate states side by side, pooled of 2.
        for key in ["gen", "gen_neg"] {
            let req = xl_request(&reference_meta("tiny-xl"), key);
            let (h, pooled) = sd.encode_prompt_xl(&req.prompt);
            assert_close(&h, &r[&format!("{key}.prompt_embeds")], 1e-4, "prompt_embeds (77 × 80)");
            assert_close(&pooled, &r[&format!("{key}.pooled_prompt_embeds")], 1e-4, "pooled_prompt_embeds");
            let (hn, pn) = sd.encode_negative(req.negative_prompt.as_deref());
            assert_close(&hn, &r[&format!("{key}.negative_prompt_embeds")], 1e-4, "negative_prompt_embeds");
            assert_close(&pn.unwrap(), &r[&format!("{key}.negative_pooled_prompt_embeds")], 1e-4, "negative pooled");
        }
    });
    let (h, _) = sd.encode_negative(None);
    assert_eq!(h.abs().max().double_value(&[]), 0.0, "force_zeros_for_empty_prompt: φ = 0 without a negative prompt");
}

#[test]
fn sdxl_unet_with_text_time_conditioning_matches_diffusers() {
    let unet = UNet2DConditionModel::load(&model_dir("tiny-xl").join("unet"), Device::Cpu).unwrap();
    assert!(unet.needs_added_cond());
    let r = reference("tiny-xl");
    let added =
        AddedCond { text_embeds: r["unet.text_embeds"].shallow_clone(), time_ids: r["unet.time_ids"].shallow_clone() };
    let out = tch::no_grad(|| {
        unet.forward_added(&r["unet.sample"], &r["unet.timestep"], &r["unet.encoder_hidden_states"], Some(&added), None)
    });
    assert_close(&out, &r["unet.out"], 1e-4, "tiny-xl UNet (text_time, first level without attention)");
    // The micro-conditioning is used: other sizes give another prediction.
    let other = AddedCond { time_ids: &r["unet.time_ids"] + 64.0, ..added };
    let out2 = tch::no_grad(|| {
        unet.forward_added(&r["unet.sample"], &r["unet.timestep"], &r["unet.encoder_hidden_states"], Some(&other), None)
    });
    check_min("time_ids change the prediction", max_abs_diff(&out, &out2), 1e-3);
}

#[test]
fn sdxl_generate_matches_stable_diffusion_xl_pipeline() {
    let sd = load("tiny-xl");
    let r = reference("tiny-xl");
    let meta = reference_meta("tiny-xl");
    for key in ["gen", "gen_neg"] {
        let req = xl_request(&meta, key);
        let x = sd.initial_latents(req.seed, req.num_images, req.height, req.width);
        // As in tests/pipeline.rs: the scalar Box–Muller path differs by ≤ 1.8e-6; 2e-5 is 11x.
        check_tol(&format!("{key}: x_T"), max_abs_diff(&x, &r[&format!("{key}.latents_init")]), 2e-5);
        assert_eq!(
            sd.scheduler(req.steps).unwrap().timesteps,
            Vec::<i64>::try_from(&r[&format!("{key}.timesteps")]).unwrap()
        );
        let images = sd.generate(&req).unwrap();
        assert_same_image(&images, &r[&format!("{key}.image_u8")], key);
    }
}

#[test]
fn sdxl_is_refused_where_it_is_not_built_and_incomplete_folders_are_named() {
    // (inversion and replacement, reference guidance, DreamBooth / LoRA are not built for SDXL)
    let tmp = tempfile::tempdir().unwrap();
    let xl = model_dir("tiny-xl");
    let out = tmp.path().join("inversion");
    let mut c = bin();
    c.args(["invert", "--model"]).arg(&xl).arg("--image").arg(fixtures().join("photos/dog/00.jpg"));
    c.args(["--caption", "a photo of a dog", "--steps", "2", "--device", "cpu", "--out"]).arg(&out);
    refused(&c.output().unwrap(), "does not support SDXL models yet");
    assert!(!out.exists(), "nothing is written");
    // generate works on SDXL (plain text to image), and writes its PNG.
    let png = tmp.path().join("xl.png");
    let mut c = bin();
    c.args(["generate", "--model"]).arg(&xl);
    c.args(["--prompt", "a backpack", "--steps", "2", "--device", "cpu", "--out"]).arg(&png);
    ok(&c.output().unwrap());
    assert_eq!(png_rgb(&png).len(), 16 * 16 * 3, "the default size: sample_size 8 × 2");
    // An SDXL folder without tokenizer_2/ is named.
    let broken = tmp.path().join("xl");
    copy_dir(&xl, &broken);
    std::fs::remove_dir_all(broken.join("tokenizer_2")).unwrap();
    let err = format!("{:#}", StableDiffusion::load(&broken, Device::Cpu).err().expect("no tokenizer_2"));
    assert!(err.contains("tokenizer_2/"), "{err}");
    // A UNet config with another addition embedding is refused by key.
    let cfg_path = broken.join("unet/config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap().replace("\"text_time\"", "\"image\"");
    std::fs::write(&cfg_path, text).unwrap();
    let err = format!("{:#}", UNet2DConditionModel::load(&broken.join("unet"), Device::Cpu).err().expect("image"));
    assert!(err.contains("addition_embed_type") && err.contains("\"image\""), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// The built-in full-size configs parse and validate as diffusers writes them (SDXL's
/// `upcast_attention: null`, SD-2.1's per-level heads), and `init-random --config tiny-xl`
/// writes an SDXL folder that loads and draws.
#[test]
fn builtin_sd2_and_sdxl_configs_and_init_random_tiny_xl() {
    use hifi_tuner::models::unet::UNetConfig;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/configs");
    for (preset, levels, cross) in [("sd21", 4, 1024), ("sdxl", 3, 2048), ("tiny-xl", 2, 64)] {
        let cfg: UNetConfig = hifi_tuner::load::read_json(&root.join(preset).join("unet.json")).unwrap();
        let l = cfg.levels().unwrap_or_else(|e| panic!("{preset}: {e:#}"));
        assert_eq!((l.len(), l[0].cross_attention_dim), (levels, cross), "{preset}");
        assert_eq!(cfg.text_time().is_some(), preset != "sd21", "{preset}");
    }
    let sdxl: UNetConfig = hifi_tuner::load::read_json(&root.join("sdxl/unet.json")).unwrap();
    let depth: Vec<i64> = sdxl.levels().unwrap().iter().map(|l| l.transformer_layers).collect();
    assert_eq!((depth, sdxl.text_time()), (vec![1, 2, 10], Some((256, 2816))));

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("xl");
    let mut c = bin();
    c.args(["init-random", "--config", "tiny-xl", "--tokenizer"]).arg(fixtures().join("tokenizers/clip"));
    c.arg("--out").arg(&out);
    ok(&c.output().unwrap());
    let sd = StableDiffusion::load(&out, Device::Cpu).unwrap_or_else(|e| panic!("{e:#}"));
    let xl = sd.xl.as_ref().expect("an SDXL folder");
    assert_eq!((sd.tokenizer.pad_id(), xl.tokenizer_2.pad_id()), (49407, 0), "tokenizer_2 pads with \"!\"");
    let req = GenerateRequest {
        prompt: "a dog".into(),
        negative_prompt: None,
        seed: 1,
        steps: 2,
        guidance: 5.0,
        height: 32,
        width: 48,
        num_images: 1,
    };
    assert_eq!(sd.generate(&req).unwrap().size(), [1, 32, 48, 3]);
}

/// An SDXL single file (`conditioner.embedders.0.transformer.*` CLIP, `…1.model.*` OpenCLIP with
/// its projection, `label_emb` for `add_embedding`) loads into the folder's weights and draws
/// the folder's image; without `--config` the built-in SDXL-base configs are used (and named).
#[test]
fn sdxl_single_file_equals_the_folder() {
    let file = fixtures().join("single/tiny-xl.safetensors");
    assert_eq!(Family::of_file(&file).unwrap(), Family::Sdxl);
    let opts = LoadOptions { config: Some(model_dir("tiny-xl")), ..Default::default() };
    let single = StableDiffusion::load_with(&file, &opts, Device::Cpu).unwrap_or_else(|e| panic!("{e:#}"));
    let folder = load("tiny-xl");
    let te2 = |sd: &StableDiffusion| sd.xl.as_ref().expect("SDXL").text_encoder_2.vs.variables();
    for (what, va, vb) in [
        ("text encoder", single.text_encoder.vs.variables(), folder.text_encoder.vs.variables()),
        ("text encoder 2", te2(&single), te2(&folder)),
        ("unet", single.unet.vs.variables(), folder.unet.vs.variables()),
        ("vae", single.vae.vs.variables(), folder.vae.vs.variables()),
    ] {
        assert_eq!(va.len(), vb.len(), "{what}");
        for (k, t) in &vb {
            assert!(va[k].equal(t), "{what}: {k} differs after the conversion");
        }
    }
    let req = xl_request(&reference_meta("tiny-xl"), "gen");
    assert!(single.generate(&req).unwrap().equal(&folder.generate(&req).unwrap()));
    let err = format!("{:#}", StableDiffusion::load(&file, Device::Cpu).err().expect("tiny vs SDXL-base shapes"));
    assert!(err.contains("SDXL-base") && err.contains("assets/configs/sdxl"), "{err}");
    // An SD-1.x --config for an SDXL file, and an SDXL --config for an SD-1.x file: refused.
    let err = format!(
        "{:#}",
        StableDiffusion::load_with(
            &file,
            &LoadOptions { config: Some(model_dir("tiny-b")), ..Default::default() },
            Device::Cpu
        )
        .err()
        .expect("SD-1 configs")
    );
    assert!(err.contains("is an SDXL checkpoint"), "{err}");
    let sd1 = fixtures().join("single/tiny-b.safetensors");
    let err = format!("{:#}", StableDiffusion::load_with(&sd1, &opts, Device::Cpu).err().expect("SDXL configs"));
    assert!(err.contains("Stable Diffusion 1.x checkpoint") && err.contains("SDXL"), "{err}");
}

/// An SDXL textual inversion in both forms users have — A1111 / ComfyUI's `{"clip_l",
/// "clip_g"}` and diffusers' `learned_embeds.safetensors` + `learned_embeds_2.safetensors` —
/// loads into both encoders and draws the image diffusers draws after
/// `load_textual_inversion` into each encoder (`scripts/make_sdxl_fixture.py`, `ti.*`).
#[test]
fn sdxl_textual_inversion_in_both_forms_matches_diffusers() {
    use hifi_tuner::subject::ti;
    let r = reference("tiny-xl");
    let meta = reference_meta("tiny-xl");
    let req = xl_request(&meta, "ti");
    let token = meta["ti.token"].clone();
    let dir = fixtures().join("ti-xl");
    for (path, tok) in [
        (dir.join("sks-xl.safetensors"), Some(token.as_str())),
        (dir.join("learned_embeds.safetensors"), None),
        (dir.clone(), None),
    ] {
        let mut sd = load("tiny-xl");
        let loaded = ti::load_embedding(&mut sd, &path, tok).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert_eq!((loaded.token.as_str(), loaded.n), (token.as_str(), 2), "{}", path.display());
        let prompt = ti::convert_prompt(&sd, &req.prompt, &[loaded]);
        let xl = sd.xl.as_ref().unwrap();
        let ids_1 = sd.tokenizer.encode_padded(&prompt).ids;
        let ids_2 = xl.tokenizer_2.encode_padded(&prompt).ids;
        assert_eq!(ids_1, Vec::<i64>::try_from(r["ti.input_ids_1"].get(0)).unwrap(), "{}", path.display());
        assert_eq!(ids_2, Vec::<i64>::try_from(r["ti.input_ids_2"].get(0)).unwrap(), "{}", path.display());
        let images = sd.generate(&GenerateRequest { prompt, ..req.clone() }).unwrap();
        assert_same_image(&images, &r["ti.image_u8"], &path.display().to_string());
    }
    // The same from the command line.
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("ti.png");
    let mut c = bin();
    c.args(["generate", "--model"]).arg(model_dir("tiny-xl")).arg("--embedding").arg(&dir);
    c.args(["--prompt", &req.prompt, "--steps", &req.steps.to_string(), "--seed", &req.seed.to_string()]);
    c.args(["--guidance", "5", "--height", "16", "--width", "16", "--device", "cpu", "--out"]).arg(&png);
    ok(&c.output().unwrap());
    let want = Vec::<u8>::try_from(r["ti.image_u8"].view([-1])).unwrap();
    let got = png_rgb(&png);
    let worst = got.iter().zip(&want).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    assert!(worst <= 1, "CLI image vs diffusers: {worst} levels");
    // An SDXL embedding on an SD-1.x model, and an SD-1.x embedding on SDXL: refused by name.
    let mut sd1 = load("tiny-b");
    let err = format!("{:#}", ti::load_embedding(&mut sd1, &dir.join("sks-xl.safetensors"), None).unwrap_err());
    assert!(err.contains("is an SDXL embedding"), "{err}");
    let mut xl = load("tiny-xl");
    let err =
        format!("{:#}", ti::load_embedding(&mut xl, &fixtures().join("ti/single.safetensors"), None).unwrap_err());
    assert!(err.contains("is not an SDXL embedding") && err.contains("clip_g"), "{err}");
}

/// Learning on SDXL from the command line: HiFi (masked, step-wise; c_s for both encoders) then
/// generate with the subject; textual inversion then its three exports — diffusers' two files
/// and A1111's `{clip_l, clip_g}` — which draw the same image.
#[test]
fn sdxl_learn_hifi_and_ti_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("tiny-xl");
    let learn = |out: &Path, extra: &[&str]| {
        let mut c = bin();
        c.args(["learn", "--model"]).arg(&model).arg("--images").arg(fixtures().join("photos/dog"));
        c.args(["--class-noun", "dog", "--device", "cpu", "--seed", "3", "--tokens", "2"]).args(extra);
        c.arg("--out").arg(out);
        ok(&c.output().unwrap());
    };
    let subject = tmp.path().join("hifi");
    let masks = fixtures().join("photos/dog-masks");
    learn(
        &subject,
        &["--steps", "4", "--stepwise-steps", "1", "--ddim-steps", "3", "--masks", masks.to_str().unwrap()],
    );
    let s = hifi_tuner::subject::file::Subject::load(&subject).unwrap();
    assert_eq!((s.c_s.size(), s.stepwise.len()), (vec![2, 32 + 48], 3), "c_s spans both encoders");
    let gen = |extra: &[&str], out: &str| {
        let p = tmp.path().join(out);
        let mut c = bin();
        c.args(["generate", "--model"]).arg(&model).args(extra);
        c.args(["--steps", "3", "--seed", "2", "--device", "cpu", "--out"]).arg(&p);
        ok(&c.output().unwrap());
        png_rgb(&p)
    };
    let with = gen(&["--subject", subject.to_str().unwrap(), "--prompt", "a dog on the beach"], "s.png");
    let without = gen(&["--prompt", "a dog on the beach"], "p.png");
    assert_eq!(with.len(), 16 * 16 * 3);
    assert!(with != without, "the subject changes the image");

    let ti = tmp.path().join("ti");
    learn(&ti, &["--mode", "ti", "--token", "<dx>", "--steps", "3"]);
    for f in ["learned_embeds.safetensors", "learned_embeds_2.safetensors", "a1111/dx.safetensors"] {
        assert!(ti.join(f).is_file(), "{f}");
    }
    let l = read_tensors(&ti.join("learned_embeds.safetensors"));
    let g = read_tensors(&ti.join("learned_embeds_2.safetensors"));
    let a = read_tensors(&ti.join("a1111/dx.safetensors"));
    assert_eq!((l["<dx>"].size(), g["<dx>"].size()), (vec![2, 32], vec![2, 48]));
    assert!(a["clip_l"].equal(&l["<dx>"]) && a["clip_g"].equal(&g["<dx>"]));
    let prompt = ["--prompt", "a photo of <dx> on a rock"];
    let x = gen(&[&["--embedding", ti.to_str().unwrap()][..], &prompt[..]].concat(), "t1.png");
    let a1111 = ti.join("a1111/dx.safetensors");
    let y = gen(&[&["--embedding", a1111.to_str().unwrap(), "--token", "<dx>"][..], &prompt[..]].concat(), "t2.png");
    assert!(x == y, "the diffusers and A1111 exports draw the same image");
}

/// Attention masks (the class noun's cross-attention, DAAM) on SDXL: both encoders' states and
/// the added conditioning reach the UNet, whose deeper transformer stacks report every site.
#[test]
fn sdxl_attention_masks_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("masks");
    let mut c = bin();
    c.args(["mask", "--model"]).arg(model_dir("tiny-xl"));
    // --min-contrast 1 accepts any photo: the random model's attention says little (a mask is
    // made all the same, which is what is checked here)
    c.args(["--class-noun", "dog", "--device", "cpu", "--min-contrast", "1", "--out"]).arg(&out);
    for f in ["00.jpg", "01.jpg"] {
        c.arg(fixtures().join("photos/dog").join(f));
    }
    ok(&c.output().unwrap());
    for stem in ["00", "01"] {
        let m = image::open(out.join(format!("{stem}.png"))).unwrap().to_luma8();
        assert!(m.pixels().all(|p| p[0] == 0 || p[0] == 255), "{stem}: a 0/255 mask");
        assert!(m.pixels().any(|p| p[0] == 255), "{stem}: the mask marks something");
        assert!(out.join(format!("{stem}.overlay.png")).is_file());
    }
}
