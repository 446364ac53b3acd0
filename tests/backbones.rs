//! Backbones beyond SD-1.x, against diffusers on tiny random models (issue 23):
//! - SD-2.x (`tiny-sd2`): the OpenCLIP text encoder as transformers ships it (gelu, pad "!"),
//!   linear projections, per-level heads, v-prediction in the training target, the whole method
//!   on it from the command line (learn → generate --subject / --reference-guidance, replace),
//!   and single files with OpenCLIP key names. The pipeline's image parity runs in
//!   `tests/pipeline.rs` (tiny-sd2 is one of its `MODELS`).
//! - SDXL (`tiny-xl`): both tokenizers and encoders (penultimate states, pooled `text_embeds`),
//!   the UNet's `text_time` micro-conditioning, `StableDiffusionXLPipeline`'s images with and
//!   without a negative prompt (`force_zeros_for_empty_prompt`), learning (HiFi, TI and its
//!   exports), reference guidance and replacement with φ = (hidden states, pooled embeds), and
//!   what is refused.
//!
//! References: `tests/fixtures/tiny-sd2.ref.safetensors` (scripts/make_fixtures.py),
//! `tests/fixtures/tiny-xl.ref.safetensors` (scripts/make_sdxl_fixture.py),
//! `tests/fixtures/single/tiny-sd2.safetensors` (scripts/make_single_file_fixture.py).

mod common;

use common::*;
use hifi_tuner::guidance::invert::ddim_invert;
use hifi_tuner::guidance::reference::{guided_denoise, GuidanceConfig, Reference};
use hifi_tuner::models::unet::{AddedCond, UNet2DConditionModel};
use hifi_tuner::pipeline::{GenerateRequest, LoadOptions, StableDiffusion, TextCond};
use hifi_tuner::replace::nti::{nti_loss, null_text_optimize, NtiConfig};
use hifi_tuner::rng::seeded;
use hifi_tuner::single_file::{open_clip_text_key, Family};
use hifi_tuner::subject::conditioning::SubjectSteps;
use hifi_tuner::subject::file::Subject;
use hifi_tuner::subject::Space;
use hifi_tuner::tokenizer::ClipTokenizer;
use std::path::Path;
use std::process::{Command, Output};
use tch::{Device, Kind, Tensor};

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
            let neg = sd.encode_negative(req.negative_prompt.as_deref());
            let (hn, pn) = (neg.hidden, neg.pooled);
            assert_close(&hn, &r[&format!("{key}.negative_prompt_embeds")], 1e-4, "negative_prompt_embeds");
            assert_close(&pn.unwrap(), &r[&format!("{key}.negative_pooled_prompt_embeds")], 1e-4, "negative pooled");
        }
    });
    let h = sd.encode_negative(None).hidden;
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
fn sdxl_generate_writes_its_png_and_incomplete_folders_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let xl = model_dir("tiny-xl");
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
    let err = format!("{:#}", UNet2DConditionModel::load(&broken.join("unet"), Device::Cpu).expect_err("image"));
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

    // §3.3 on SDXL: reference guidance with the HiFi subject; --min-contrast 0 makes the random
    // model's I_g1 count as showing the subject, so Algorithm 2 runs (its Eq. 10 losses are
    // in the intermediates) instead of falling back to the plain image.
    // (seed 1: M_g covers 58 % of the image, inside the usable 1–70 %; seed 2's is 73 %)
    let g = tmp.path().join("g.png");
    let mut c = bin();
    c.args(["generate", "--model"]).arg(&model).arg("--subject").arg(&subject);
    c.args(["--prompt", "a dog on the beach", "--reference-guidance", "--t-start", "3", "--t-end", "1"]);
    c.args(["--guidance-steps", "2", "--min-contrast", "0", "--save-intermediates", "--steps", "3", "--seed", "1"]);
    c.args(["--device", "cpu", "--out"]).arg(&g);
    let log = ok(&c.output().unwrap());
    assert!(!log.contains("falling back"), "{log}");
    let guided = png_rgb(&g);
    assert_eq!(guided.len(), 16 * 16 * 3);
    let facts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("g-intermediates/theta.json")).unwrap()).unwrap();
    let losses = facts["eq10_losses"].as_array().expect("Algorithm 2 ran");
    assert_eq!(losses.len(), 3, "t_s 3 … t_e 1");
    let mut c = bin();
    c.args(["generate", "--model"]).arg(&model).arg("--subject").arg(&subject);
    c.args(["--prompt", "a dog on the beach", "--steps", "3", "--seed", "1", "--device", "cpu", "--out"]);
    ok(&c.arg(tmp.path().join("p1.png")).output().unwrap());
    assert!(guided != png_rgb(&tmp.path().join("p1.png")), "guidance changes the image");

    // §3.4 on SDXL: replace (NTI with φ_t = hidden states + pooled embeds, then P2P) with the
    // subject; reusing the saved inversion (phi_pooled read back) draws the same image.
    let replace = |out: &Path, extra: &[&str]| {
        let mut c = bin();
        c.args(["replace", "--model"]).arg(&model).arg("--image").arg(fixtures().join("photos/dog/00.jpg"));
        c.args(["--source-word", "cat", "--steps", "3", "--inner-steps", "2", "--device", "cpu", "--subject"]);
        c.arg(&subject).args(extra).arg("--out").arg(out);
        ok(&c.output().unwrap());
        png_rgb(out)
    };
    let first = tmp.path().join("edit.png");
    let edited = replace(&first, &["--caption", "a photo of a cat on a bench"]);
    let inv = tmp.path().join("edit-inversion");
    assert!(read_tensors(&inv.join("inversion.safetensors")).contains_key("phi_pooled"));
    let again = replace(&tmp.path().join("edit2.png"), &["--inversion", inv.to_str().unwrap()]);
    assert!(edited == again, "the saved inversion (with its pooled φ_t) draws the same edit");
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

// ---- SDXL: reference guidance (§3.3) and replacement (§3.4) ---------------------------------

/// A random subject for tiny-xl: c_s spans both encoders (32 + 48).
fn xl_subject() -> Subject {
    Subject {
        c_s: seeded(9, || Tensor::randn([3, 32 + 48], (Kind::Float, Device::Cpu))) * 0.3,
        stepwise: vec![],
        timesteps: vec![],
        space: Space::Input,
        class_noun: "dog".into(),
        captions: vec![],
        model: "tiny-xl".into(),
        ddim_steps: 6,
    }
}

/// A photo-like latent of tiny-xl's default 16 × 16 image (8 × 8 latent) and its pivots under
/// "a photo of a dog" (w = 1, the pooled embeds and size ids in the added conditioning).
fn xl_pivots(sd: &StableDiffusion, steps: usize) -> (Tensor, hifi_tuner::guidance::invert::Trajectory) {
    let sched = sd.scheduler(steps).unwrap();
    let x0 = seeded(2, || Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu))) * 0.5;
    let traj = tch::no_grad(|| ddim_invert(sd, &sched, &x0, sd.encode_text("a photo of a dog")));
    (x0, traj)
}

/// Central finite difference of `loss` at `p0` along `v` (normalised over both parts) against
/// autograd; returns (analytic, fd).
fn directional(loss: &dyn Fn(&TextCond) -> Tensor, p0: &TextCond, v: &TextCond) -> (f64, f64) {
    let norm = v.tensors().iter().map(|t| t.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
    let v = TextCond { hidden: &v.hidden / norm, pooled: v.pooled.as_ref().map(|p| p / norm) };
    let leaves = p0.leaves();
    let grads = Tensor::run_backward(&[&loss(&leaves)], &leaves.tensors(), false, false);
    let analytic: f64 = grads.iter().zip(v.tensors()).map(|(g, d)| (g * d).sum(Kind::Double).double_value(&[])).sum();
    let h = 1e-2;
    let at = |sign: f64| {
        let q = TextCond {
            hidden: &p0.hidden + &v.hidden * (sign * h),
            pooled: p0.pooled.as_ref().zip(v.pooled.as_ref()).map(|(p, d)| p + d * (sign * h)),
        };
        tch::no_grad(|| loss(&q).double_value(&[]))
    };
    (analytic, (at(1.0) - at(-1.0)) / (2.0 * h))
}

/// Eq. 4 (and through the same F^(t)(x_t, c, φ), Eq. 10) on SDXL: φ is the pair (hidden states
/// (1, 77, 80), pooled embeds (1, 40)); the gradient in each part matches finite differences.
#[test]
fn sdxl_gradient_of_the_nti_loss_in_both_parts_of_phi_matches_finite_differences() {
    let sd = load("tiny-xl");
    let steps = 6;
    let sched = sd.scheduler(steps).unwrap();
    let (_, traj) = xl_pivots(&sd, steps);
    let cond = tch::no_grad(|| sd.encode_text("a photo of a dog"));
    let i = 2usize;
    let t = sched.timesteps[i];
    let x = traj.before_step(i);
    let eps_c = tch::no_grad(|| sd.eps(x, t, &cond, None));
    let loss = |p: &TextCond| nti_loss(&sd, &sched, x, t, &eps_c, p, traj.after_step(i), 7.5);
    // φ of the empty prompt (not the zeros of force_zeros_for_empty_prompt: a generic point).
    let p0 = tch::no_grad(|| sd.encode_text(""));
    let leaves = p0.leaves();
    let g = Tensor::run_backward(&[&loss(&leaves)], &leaves.tensors(), false, false);
    // Along each part's gradient plus a random part (a wrong direction would show), the other
    // part held still.
    let noise = |t: &Tensor, seed| seeded(seed, || Tensor::randn(t.size().as_slice(), (Kind::Float, Device::Cpu)));
    let unit = |t: &Tensor| t / t.norm().double_value(&[]);
    let v_hidden = unit(&g[0]) + unit(&noise(&g[0], 5)) * 0.5;
    let v_pooled = unit(&g[1]) + unit(&noise(&g[1], 6)) * 0.5;
    for (what, v) in [
        ("hidden states", TextCond { hidden: v_hidden, pooled: Some(g[1].zeros_like()) }),
        ("pooled embeds", TextCond { hidden: g[0].zeros_like(), pooled: Some(v_pooled) }),
    ] {
        let (analytic, fd) = directional(&loss, &p0, &v);
        let rel = (fd - analytic).abs() / analytic.abs().max(1e-6);
        // 2e-2: f32 central differences at h = 1e-2 on a loss of O(1), as the SD-1.x NTI test.
        check_tol(&format!("SDXL φ {what}: finite difference vs autograd (rel)"), rel, 2e-2);
        check_min(&format!("SDXL φ {what}: the gradient does not vanish"), analytic.abs(), 1e-6);
    }
}

/// Null-text inversion on SDXL optimises both parts of φ_t and brings the sampled trajectory
/// back to the photo's latent far better than plain inversion (K = 0), as on SD-1.x.
#[test]
fn sdxl_null_text_inversion_moves_both_parts_of_phi_and_beats_plain_inversion() {
    let sd = load("tiny-xl");
    let steps = 4;
    let sched = sd.scheduler(steps).unwrap();
    let (x0, traj) = xl_pivots(&sd, steps);
    let (cond, phi) = tch::no_grad(|| (sd.encode_text("a photo of a dog"), sd.encode_negative(None)));
    // The random tiny-xl's two branches differ wildly, so w = 3 and more, larger Adam steps
    // than the authors' K = 10 at lr 1e-2 (which still halves the error: 1.75 vs 2.78 at w = 2).
    // No early stop, so both runs take every step.
    let cfg = NtiConfig { guidance: 3.0, lr: 0.1, early_stop: 0.0, early_stop_slope: 0.0, ..NtiConfig::default() };
    let run = |k: usize| {
        null_text_optimize(&sd, &sched, &traj, &cond, &phi, &NtiConfig { inner_steps: k, ..cfg.clone() }).unwrap()
    };
    let (nti, plain) = (run(50), run(0));
    let mse = |x: &Tensor| (x - &x0).square().mean(Kind::Float).double_value(&[]);
    let (e_nti, e_plain) = (mse(nti.x0.as_ref().unwrap()), mse(plain.x0.as_ref().unwrap()));
    // Measured 0.55 vs 9.74 (ratio 0.056); 0.3 leaves 5x.
    check_tol("SDXL NTI / plain inversion reconstruction MSE", e_nti / e_plain, 0.3);
    let last = nti.phi.last().unwrap();
    let moved_h = max_abs_diff(&last.hidden, &phi.hidden);
    let moved_p = max_abs_diff(last.pooled.as_ref().unwrap(), phi.pooled.as_ref().unwrap());
    assert!(moved_h > 1e-2 && moved_p > 1e-2, "both parts of φ_t move: hidden {moved_h}, pooled {moved_p}");
}

/// Algorithm 2 on SDXL: with J = 0 and no substitution it is plain Eq. 7 bit for bit (the same
/// conditioning, pooled embeds and size ids reach the UNet as in `generate --subject`); with
/// J Adam steps on φ_h = (hidden states, pooled embeds) Eq. 10 falls at every guided step.
#[test]
fn sdxl_algorithm_2_is_plain_eq7_without_steps_and_eq10_falls_with_them() {
    let sd = load("tiny-xl");
    let steps = 6;
    let sched = sd.scheduler(steps).unwrap();
    let s = xl_subject();
    let uncond = tch::no_grad(|| sd.encode_negative(None));
    let x_t = sd.initial_latents(5, 1, 16, 16);
    let (_, traj) = xl_pivots(&sd, steps);
    let mask = Tensor::zeros([1, 1, 8, 8], (Kind::Float, Device::Cpu));
    let _ = mask.narrow(2, 2, 4).narrow(3, 2, 4).fill_(1.0);
    let reference = Reference { traj: &traj, mask: &mask };
    let steps_for = || SubjectSteps::new(&sd, "a dog in the snow", &s, &sched, &uncond, 1).unwrap();
    let plain = tch::no_grad(|| sd.denoise(x_t.shallow_clone(), &sched, &mut steps_for(), 7.5, None).unwrap());
    let gc = GuidanceConfig { t_start: 5, t_end: 2, steps: 0, lr: 1e-2, substitute: false };
    let (same, _) = guided_denoise(&sd, &sched, x_t.shallow_clone(), &mut steps_for(), 7.5, &reference, &gc).unwrap();
    assert!(same.equal(&plain), "J = 0 without substitution must be plain Eq. 7, bit for bit");
    let gc = GuidanceConfig { steps: 6, substitute: true, ..gc };
    let (x, report) = guided_denoise(&sd, &sched, x_t, &mut steps_for(), 7.5, &reference, &gc).unwrap();
    assert!(bool::try_from(x.isfinite().all()).unwrap());
    assert_eq!(report.losses.len(), 5 - 2 + 1);
    for l in &report.losses {
        assert!(l[5] < l[0], "Eq. 10 should fall over the J steps: {l:?}");
    }
    assert!(!x.equal(&plain), "guidance changes the image");
}

// ---- SDXL: DreamBooth and LoRA ----------------------------------------------------------------

/// `learn --mode lora --train-text-encoder` and `--mode dreambooth --train-text-encoder
/// --gradient-checkpointing` on SDXL (conditioned by
/// both encoders and the added conditioning; prior preservation with SDXL class images): the
/// LoRA's diffusers file and its kohya file (sd-scripts' SDXL names: LDM UNet paths,
/// `lora_te1_` / `lora_te2_`) merge into the same weights; both subjects are drawn by `generate --subject`, the LoRA also through `--lora` in
/// either format.
#[test]
fn sdxl_dreambooth_and_lora_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir("tiny-xl");
    let learn = |mode: &str, out: &Path, extra: &[&str]| {
        let mut c = bin();
        c.args(["learn", "--mode", mode, "--model"]).arg(&model).arg("--images").arg(fixtures().join("photos/dog"));
        c.args(["--class-noun", "dog", "--steps", "3", "--seed", "3", "--device", "cpu"]).args(extra);
        c.arg("--out").arg(out);
        ok(&c.output().unwrap());
    };
    let lora = tmp.path().join("xl-lora");
    learn("lora", &lora, &["--lr", "0.05", "--class-images", "1", "--class-steps", "2", "--train-text-encoder"]);
    assert!(lora.join("class_images").read_dir().unwrap().count() >= 1, "class images drawn by the SDXL model");
    let peft = lora.join("pytorch_lora_weights.safetensors");
    let kohya = lora.join("a1111/xl-lora.safetensors");
    let p = read_tensors(&peft);
    let k = read_tensors(&kohya);
    for prefix in ["unet.", "text_encoder.", "text_encoder_2."] {
        assert!(p.keys().any(|k| k.starts_with(prefix)), "{prefix}: the UNet's and both encoders' adapters");
    }
    assert!(k.keys().any(|k| k.starts_with("lora_te1_text_model_encoder_layers_0_self_attn_q_proj")));
    assert!(k.keys().any(|k| k.starts_with("lora_te2_text_model_encoder_layers_0_self_attn_q_proj")));
    // layers_per_block 1: down_blocks.1.attentions.0 is input_blocks.3.1, up_blocks.0's are
    // output_blocks.0.1 and 1.1, the mid block's middle_block.1 (SDXL-base's down_blocks.1 →
    // input_blocks.4.1, the sd-scripts name users see)
    for name in [
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_out_0",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_output_blocks_1_1_transformer_blocks_0_attn1_to_v",
    ] {
        assert!(
            k.contains_key(&format!("{name}.lora_down.weight")),
            "{name} in {:?}",
            k.keys().take(4).collect::<Vec<_>>()
        );
    }
    assert!(!k.keys().any(|k| k.contains("down_blocks") || k.contains("up_blocks")), "LDM names only");
    assert!(!k.keys().any(|k| k.starts_with("lora_te_")), "SDXL's encoders are te1 / te2");
    assert_eq!(p.len(), k.len() / 3 * 2, "every adapter in both files");
    let meta = hifi_tuner::load::safetensors_metadata(&kohya).unwrap();
    assert_eq!(meta["ss_base_model_version"], "sdxl_base_v1-0");
    // Both files merge into the same weights.
    let merged = |file: &Path| {
        let sd = load("tiny-xl");
        let f = hifi_tuner::lora::read(file).unwrap();
        hifi_tuner::lora::merge(&f, 1.0, &sd.lora_networks()).unwrap();
        sd
    };
    let (a, b, base) = (merged(&peft), merged(&kohya), load("tiny-xl"));
    let w = |sd: &StableDiffusion| {
        let q = "text_model.encoder.layers.1.self_attn.v_proj.weight";
        [
            sd.unet.vs.variables()["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"].copy(),
            sd.text_encoder.vs.variables()[q].copy(),
            sd.xl.as_ref().unwrap().text_encoder_2.vs.variables()[q].copy(),
        ]
    };
    for ((x, y), z) in w(&a).iter().zip(&w(&b)).zip(&w(&base)) {
        assert!(max_abs_diff(x, y) < 1e-7, "the kohya file's names (LDM, te1, te2) reach the same modules");
        assert!(max_abs_diff(x, z) > 1e-4, "the LoRA changes the weights");
    }
    // Drawn as a subject and through --lora (either file).
    let gen = |extra: Vec<&std::ffi::OsStr>, out: &str| {
        let path = tmp.path().join(out);
        let mut c = bin();
        c.args(["generate", "--prompt", "a sks dog on the beach", "--steps", "3", "--seed", "0", "--device", "cpu"]);
        c.args(extra).arg("--out").arg(&path);
        ok(&c.output().unwrap());
        png_rgb(&path)
    };
    let m = model.as_os_str();
    let plain = gen(vec!["--model".as_ref(), m], "plain.png");
    let subject = gen(vec!["--subject".as_ref(), lora.as_os_str()], "lora.png");
    let via_peft = gen(vec!["--model".as_ref(), m, "--lora".as_ref(), peft.as_os_str()], "peft.png");
    let via_kohya = gen(vec!["--model".as_ref(), m, "--lora".as_ref(), kohya.as_os_str()], "kohya.png");
    assert!(subject != plain && subject == via_peft, "the subject is the base model with its LoRA");
    // (the kohya file's float32 α = 4 and the diffusers file's metadata α give the same scale;
    // merged weights equal to 1e-7, so the 8-bit images agree within one level)
    let most = subject.iter().zip(&via_kohya).map(|(x, y)| (*x as i32 - *y as i32).abs()).max().unwrap();
    assert!(most <= 1, "kohya vs diffusers file: {most} levels");

    // DreamBooth: the UNet and both encoders, checkpointed backward (added conditioning included)
    let db = tmp.path().join("xl-db");
    learn("dreambooth", &db, &["--lr", "1e-3", "--no-prior", "--train-text-encoder", "--gradient-checkpointing"]);
    assert!(db.join("model/tokenizer_2").is_dir(), "a whole SDXL folder");
    let te2 = read_tensors(&db.join("model/text_encoder_2/model.safetensors"));
    let base = read_tensors(&model_dir("tiny-xl").join("text_encoder_2/model.safetensors"));
    // (CLIPTextModelWithProjection's layout: text_model.… beside text_projection, as the base's)
    let mut keys: Vec<&String> = te2.keys().collect();
    let mut want: Vec<&String> = base.keys().collect();
    keys.sort();
    want.sort();
    assert_eq!(keys, want, "text_encoder_2's keys as transformers saves them");
    let q = "text_model.encoder.layers.0.self_attn.q_proj.weight";
    assert!(max_abs_diff(&te2[q], &base[q]) > 1e-5, "text encoder 2 was trained");
    assert!(te2.contains_key("text_projection.weight"), "with its projection");
    let drawn = gen(vec!["--subject".as_ref(), db.as_os_str()], "db.png");
    assert!(drawn != plain, "the fine-tuned UNet draws another image");
}

/// An SDXL LoRA for the second text encoder (kohya `lora_te2_…`, diffusers `text_encoder_2.…`)
/// merges into it: W + s·(α/r)·B·A exactly; an SD-1.x model refuses it, naming the key.
#[test]
fn sdxl_lora_for_the_second_text_encoder_merges_into_it() {
    let tmp = tempfile::tempdir().unwrap();
    let module = "text_model.encoder.layers.0.self_attn.q_proj";
    let (a, b) = seeded(4, || {
        (Tensor::randn([2, 48], (Kind::Float, Device::Cpu)), Tensor::randn([48, 2], (Kind::Float, Device::Cpu)))
    });
    let kohya = tmp.path().join("te2.safetensors");
    let name = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj";
    let tensors = vec![
        (format!("{name}.lora_down.weight"), a.shallow_clone()),
        (format!("{name}.lora_up.weight"), b.shallow_clone()),
        (format!("{name}.alpha"), Tensor::from(1f32)),
    ];
    hifi_tuner::io::write_safetensors_atomic(&kohya, &tensors, &Default::default()).unwrap();
    let peft = tmp.path().join("te2-peft.safetensors");
    let tensors = vec![
        ("text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight".to_string(), a.shallow_clone()),
        ("text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_B.weight".to_string(), b.shallow_clone()),
    ];
    hifi_tuner::io::write_safetensors_atomic(&peft, &tensors, &Default::default()).unwrap();
    let weight = |sd: &StableDiffusion| {
        sd.xl.as_ref().unwrap().text_encoder_2.vs.variables()[&format!("{module}.weight")].copy()
    };
    let base = weight(&load("tiny-xl"));
    for (file, alpha) in [(&kohya, 1.0), (&peft, 2.0)] {
        let sd = load("tiny-xl");
        hifi_tuner::lora::merge(&hifi_tuner::lora::read(file).unwrap(), 0.5, &sd.lora_networks()).unwrap();
        let want = &base + b.matmul(&a) * (0.5 * alpha / 2.0); // peft without metadata: α = r
        check_tol(
            &format!("{}: merged text_encoder_2 weight", file.display()),
            max_abs_diff(&weight(&sd), &want),
            1e-5,
        );
    }
    let sd1 = load("tiny-a");
    let e = hifi_tuner::lora::merge(&hifi_tuner::lora::read(&kohya).unwrap(), 1.0, &sd1.lora_networks()).unwrap_err();
    assert!(format!("{e:#}").contains("SDXL LoRA") && format!("{e:#}").contains(name), "{e:#}");
}

/// Our SDXL files as diffusers loads them (`scripts/make_sdxl_files_fixture.py`, by hand): the
/// LoRA `learn --mode lora` wrote on tiny-xl (diffusers file; kohya file with sd-scripts' LDM
/// UNet names, through diffusers' own conversion) and the TI pair `learn --mode ti` wrote
/// (`load_textual_inversion` once per encoder): `StableDiffusionXLPipeline` draws, with each,
/// the image we draw with it.
#[test]
fn sdxl_lora_and_ti_files_we_write_draw_diffusers_images() {
    use hifi_tuner::lora::LoraSpec;
    use hifi_tuner::subject::ti;
    let r = reference("xl-files");
    let m = reference_meta("xl-files");
    let dir = fixtures().join("xl-files");
    let num = |k: &str| m[k].parse::<i64>().unwrap();
    let req = |prompt: String| GenerateRequest {
        prompt,
        negative_prompt: None,
        seed: num("seed") as u64,
        steps: num("steps") as usize,
        guidance: m["guidance"].parse().unwrap(),
        height: num("height"),
        width: num("width"),
        num_images: 1,
    };
    let lora_prompt = m["prompt.lora"].clone();
    let base = load("tiny-xl").generate(&req(lora_prompt.clone())).unwrap();
    assert_same_image(&base, &r["base.image_u8"], "no LoRA");
    for (key, file) in [("peft", "pytorch_lora_weights.safetensors"), ("kohya", "kohya.safetensors")] {
        let opts = LoadOptions { loras: vec![LoraSpec { path: dir.join(file), scale: 1.0 }], ..Default::default() };
        let sd = StableDiffusion::load_with(&model_dir("tiny-xl"), &opts, Device::Cpu).unwrap();
        assert_same_image(&sd.generate(&req(lora_prompt.clone())).unwrap(), &r[&format!("{key}.image_u8")], key);
    }
    let mut sd = load("tiny-xl");
    let loaded = ti::load_embedding(&mut sd, &dir, None).unwrap();
    assert_eq!(loaded.token, m["token"]);
    let prompt = ti::convert_prompt(&sd, &m["prompt.ti"], &[loaded]);
    assert_same_image(&sd.generate(&req(prompt)).unwrap(), &r["ti.image_u8"], "our TI pair");
}

/// The checkpointed backward on SDXL: the added embedding (pooled embeds, size ids) is a shared
/// leaf like the time embedding; every parameter's gradient equals the plain backward's, with
/// and without both text encoders trained (their gradients reach them through the context and
/// the pooled embeds).
#[test]
fn sdxl_checkpointed_gradients_equal_the_plain_backward() {
    use hifi_tuner::dreambooth::{checkpointed_grads, loss, DbBatch, Params};
    for text_encoder in [false, true] {
        let mut sd = load("tiny-xl");
        let sched = sd.scheduler(1).unwrap();
        let ids = |p: &str| sd.tokenize_each(p);
        let (i, c) = (ids("a sks dog"), ids("a photo of a dog"));
        let (latents, noise) = seeded(7, || {
            (
                Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu)),
                Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu)),
            )
        });
        let b = DbBatch {
            latents,
            noise,
            t: Tensor::from_slice(&[300i64, 600]),
            ids: Tensor::cat(&[&i[0], &c[0]], 0),
            ids_2: Some(Tensor::cat(&[&i[1], &c[1]], 0)),
            mask: None,
            n_instance: 1,
        };
        let mut params = Params::unfreeze(&mut sd, text_encoder);
        let l = loss(&sd, &sched, &b, Some(1.0)).unwrap();
        let refs: Vec<&Tensor> = params.tensors.iter().collect();
        let plain = Tensor::run_backward(&[&l.total], &refs, false, false);
        let (lc, ckpt) = checkpointed_grads(&sd, &sched, &mut params, &b, Some(1.0)).unwrap();
        assert_eq!(lc.total.double_value(&[]), l.total.double_value(&[]), "the same ops: the same loss");
        // against the largest entry of all gradients (as the SD-1.x test): per-segment sums of
        // the shared leaves' gradients are float32 rounding
        // SDXL reads text encoder 1's penultimate layer: its last layer and final norm get no
        // gradient (undefined in both, and the update skips them, as PyTorch's AdamW)
        let unreached = |gs: &[Tensor]| -> Vec<String> {
            params.names.iter().zip(gs).filter(|(_, g)| !g.defined()).map(|(n, _)| n.clone()).collect()
        };
        let (u_plain, u_ckpt) = (unreached(&plain), unreached(&ckpt));
        assert_eq!(u_plain, u_ckpt);
        let last = format!("text_encoder.text_model.encoder.layers.{}.", sd.text_encoder.config.num_hidden_layers - 1);
        assert!(
            u_plain.iter().all(|n| n.starts_with(&last) || n.starts_with("text_encoder.text_model.final_layer_norm.")),
            "{u_plain:?}"
        );
        assert_eq!(u_plain.is_empty(), !text_encoder);
        let reached = || plain.iter().zip(&ckpt).filter(|(g, _)| g.defined());
        let global = reached().map(|(g, _)| g.abs().max().double_value(&[])).fold(0.0, f64::max);
        let worst = reached().map(|(g, c)| max_abs_diff(g, c)).fold(0.0, f64::max);
        check_tol(
            &format!("SDXL checkpointed vs plain gradients / largest entry (text encoders {text_encoder})"),
            worst / global,
            1e-6,
        );
        let trained = |p: &str| params.names.iter().any(|n| n.starts_with(p));
        assert_eq!((trained("text_encoder."), trained("text_encoder_2.")), (text_encoder, text_encoder));
        let add = params.names.iter().position(|n| n == "add_embedding.linear_1.weight").expect("add_embedding");
        check_min("add_embedding gets a gradient", ckpt[add].abs().max().double_value(&[]), 1e-9);
    }
}
