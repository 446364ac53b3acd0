//! LoRA (issue 20): a DreamBooth-LoRA training step against diffusers + peft (the same initial
//! adapters, batch, noise and timesteps; scripts/make_lora_fixture.py), diffusers'
//! `load_lora_weights` image from our two files and from peft's own kohya conversion, the merge
//! against the run-time adapters, and bad files refused by name.

mod common;

use common::*;
use hifi_tuner::dreambooth::{step_on, DbBatch, DbState, DreamBoothArgs, Params};
use hifi_tuner::lora;
use hifi_tuner::pipeline::StableDiffusion;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use tch::{Device, Kind, Tensor};

fn sd() -> StableDiffusion {
    StableDiffusion::load(&model_dir("tiny-a"), Device::Cpu).unwrap()
}

fn lora_fixture(rel: &str) -> PathBuf {
    fixtures().join("lora").join(rel)
}

/// Two steps from peft's initial adapters (B ≠ 0, α = 8, r = 4, UNet + text encoder) on the
/// fixture's [instance; class] batch: losses, gradient norms and every adapter after the steps.
#[test]
fn two_lora_steps_equal_diffusers_and_peft() {
    let r = reference("lora");
    let meta = reference_meta("lora");
    let mut sd = sd();
    let sched = sd.scheduler(1).unwrap();
    let init = lora::read(&lora_fixture("init.safetensors")).unwrap();
    assert!(init.layers.iter().all(|l| l.alpha == 8.0), "α comes from the adapter metadata");
    let mut params = Params::lora_from_file(&mut sd, &init).unwrap();
    assert_eq!(params.names.len(), 80, "40 adapted projections (32 UNet, 8 text encoder) × A, B");
    let start: Vec<Tensor> = params.tensors.iter().map(|t| t.detach().copy()).collect();
    let b = DbBatch {
        latents: r["latents"].shallow_clone(),
        noise: r["noise"].shallow_clone(),
        t: r["timesteps"].shallow_clone(),
        ids: r["ids"].shallow_clone(),
        ids_2: None,
        mask: None,
        n_instance: 1,
    };
    let mut args = DreamBoothArgs::new_lora("sks", "dog");
    args.lr = meta["lr"].parse().unwrap();
    args.prior_weight = Some(1.0);
    let mut state = DbState::new(&params, &args);
    for step in 0..2 {
        let rep = step_on(&sd, &sched, &mut params, &mut state, &b, &args).unwrap();
        // the forward pass matches diffusers to ~1e-6 relative (tests/unet.rs); the second
        // loss moves by 1.6 % after one step, so 1e-4 relative tells a wrong update while
        // allowing float32 summation order
        let want = r[&format!("loss{step}")].double_value(&[]);
        check_tol(&format!("step {step}: loss"), (rep.loss - want).abs(), 1e-4 * want);
        let want = r[&format!("grad_norm{step}")].double_value(&[]);
        check_tol(&format!("step {step}: grad norm"), (rep.grad_norm - want).abs(), 1e-3 * want);
    }
    // every adapter after two AdamW steps of lr 1e-3: an element moves by ≈ lr per step
    // (Adam normalises the gradient), except where g ≈ 0 and the normalised step is decided by
    // rounding. Measured at most 7.7e-3·lr (ATEN_CPU_CAPABILITY default / avx2, 1 / 2
    // threads), so 5e-2·lr leaves a 6.5× margin and is still 1/20 of one step
    let lr = args.lr;
    let mut moved = 0.0f64;
    for ((name, p), s) in params.names.iter().zip(&params.tensors).zip(&start) {
        let want = r.get(&format!("final.{name}")).unwrap_or_else(|| panic!("no final.{name} in the fixture"));
        check_tol(&format!("{name} after two steps"), max_abs_diff(&p.detach(), want), 5e-2 * lr);
        moved = moved.max(max_abs_diff(&p.detach(), s));
    }
    assert!(moved > 0.5 * lr, "the adapters must actually move (max |Δ| {moved})");
}

/// With the UNet's blocks checkpointed (`--gradient-checkpointing`), the adapters get the same
/// gradients: one step from peft's initial adapters moves them as the plain step does.
#[test]
fn a_checkpointed_lora_step_equals_the_plain_step() {
    let r = reference("lora");
    let init = lora::read(&lora_fixture("init.safetensors")).unwrap();
    let b = DbBatch {
        latents: r["latents"].shallow_clone(),
        noise: r["noise"].shallow_clone(),
        t: r["timesteps"].shallow_clone(),
        ids: r["ids"].shallow_clone(),
        ids_2: None,
        mask: None,
        n_instance: 1,
    };
    let after = |checkpointing: bool| {
        let mut sd = sd();
        let sched = sd.scheduler(1).unwrap();
        let mut params = Params::lora_from_file(&mut sd, &init).unwrap();
        let mut args = DreamBoothArgs::new_lora("sks", "dog");
        args.lr = 1e-3;
        args.gradient_checkpointing = checkpointing;
        let mut state = DbState::new(&params, &args);
        let rep = step_on(&sd, &sched, &mut params, &mut state, &b, &args).unwrap();
        (rep.grad_norm, params.flat.unwrap().detach())
    };
    let ((n0, p0), (n1, p1)) = (after(false), after(true));
    // the same gradient up to summation order (the shared leaves' contributions are added per
    // segment): measured at most 7.9e-7 on the adapters and 6e-8 on the norm (ATEN_CPU_CAPABILITY
    // default / avx2, 1 / 2 threads). The update is ≈ lr = 1e-3 per element, so 5e-5 (63×
    // margin) still tells a missing or wrong gradient.
    check_tol("grad norm, checkpointed vs plain", (n0 - n1).abs(), 1e-4 * n0);
    check_tol("adapters after one step, checkpointed vs plain", max_abs_diff(&p0, &p1), 5e-5);
}

/// Merging a file into the weights (inference) equals the run-time adapters (training) on
/// the UNet and the text encoder.
#[test]
fn merged_lora_equals_runtime_adapters() {
    let init = lora::read(&lora_fixture("init.safetensors")).unwrap();
    let mut adapted = sd();
    let _params = Params::lora_from_file(&mut adapted, &init).unwrap();
    let merged = sd();
    lora::merge(&init, 1.0, &merged.lora_networks()).unwrap();
    let plain = sd();
    let ids = plain.tokenize("a sks dog on the beach");
    let (x, t) = tch::no_grad(|| {
        let c = plain.unet.config.in_channels;
        (
            hifi_tuner::rng::seeded(7, || Tensor::randn([1, c, 16, 16], (Kind::Float, Device::Cpu))),
            Tensor::from_slice(&[500i64]),
        )
    });
    let out = |m: &StableDiffusion| {
        tch::no_grad(|| {
            let ctx = m.text_encoder.forward(&ids);
            (ctx.shallow_clone(), m.unet.forward(&x, &t, &ctx, None))
        })
    };
    let ((ca, ea), (cm, em), (cp, ep)) = (out(&adapted), out(&merged), out(&plain));
    // float32 re-association of W·x + s·B·(A·x) vs (W + s·B·A)·x on values O(1): measured at
    // most 1.1e-6 (text) / 1.8e-6 (ε) over ATEN_CPU_CAPABILITY default / avx2 and 1 / 2
    // threads; 2e-5 leaves ≥ 10× margin, while the LoRA moves them by > 1
    check_tol("text encoder: merged vs run-time", max_abs_diff(&ca, &cm), 2e-5);
    check_tol("UNet: merged vs run-time", max_abs_diff(&ea, &em), 2e-5);
    check_min("the LoRA changes the text features", max_abs_diff(&ca, &cp), 1e-2);
    check_min("the LoRA changes ε", max_abs_diff(&ea, &ep), 1e-2);
}

fn generate(extra: &[&str], lora_arg: Option<String>, out: &Path) -> Output {
    let mut c = bin();
    c.args(["generate", "--prompt", "a sks dog on the beach", "--steps", "3", "--seed", "0", "--device", "cpu"]);
    c.arg("--model").arg(model_dir("tiny-a"));
    if let Some(l) = lora_arg {
        c.arg("--lora").arg(l);
    }
    c.args(extra).arg("--out").arg(out).output().unwrap()
}

fn max_png_diff(a: &[u8], b: &[u8]) -> i32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (*x as i32 - *y as i32).abs()).max().unwrap()
}

/// `generate --lora FILE:SCALE` draws diffusers' `load_lora_weights` image: our diffusers and
/// kohya files at scales 1 and 0.5, and the kohya file of peft's own conversion.
#[test]
fn generate_with_lora_files_gives_diffusers_images() {
    let tmp = tempfile::tempdir().unwrap();
    let base = png_rgb(&lora_fixture("base.png"));
    for (name, rel, scale) in [
        ("peft-1.0", "ours/pytorch_lora_weights.safetensors", "1"),
        ("peft-0.5", "ours/pytorch_lora_weights.safetensors", "0.5"),
        ("kohya-1.0", "ours/kohya.safetensors", "1.0"),
        ("kohya-0.5", "ours/kohya.safetensors", "0.5"),
        ("peft_kohya-1.0", "peft_kohya.safetensors", "1"),
    ] {
        let img = tmp.path().join(format!("{name}.png"));
        let o = generate(&[], Some(format!("{}:{scale}", lora_fixture(rel).display())), &img);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let (ours, theirs) = (png_rgb(&img), png_rgb(&lora_fixture(&format!("diffusers-{name}.png"))));
        // the command line's plumbing (the float comparison is in
        // lora_images_equal_diffusers_before_rounding): merged (ours) vs diffusers' run-time
        // adapters differ by at most 1/255 (one 8-bit rounding step either side, seen in every
        // ISA / thread setting); 8/255 is 8× that and far below what a LoRA missing, doubled or
        // at the wrong scale does (62–182/255)
        let d = max_png_diff(&ours, &theirs);
        assert!(d <= 8, "{name}: our image differs from diffusers' by {d}/255");
        let moved = max_png_diff(&ours, &base);
        assert!(moved >= 40, "{name}: the LoRA must change the image (by {moved}/255)");
    }
}

/// The same images before 8-bit rounding: `--lora` merged into the weights against diffusers'
/// run-time adapters, in [0, 1] per channel.
#[test]
fn lora_images_equal_diffusers_before_rounding() {
    use hifi_tuner::pipeline::{Fixed, LoadOptions, StepCond};
    let want = read_tensors(&lora_fixture("diffusers-images.safetensors"));
    let draw = |loras: Vec<lora::LoraSpec>| {
        let opts = LoadOptions { loras, ..Default::default() };
        let sd = StableDiffusion::load_with(&model_dir("tiny-a"), &opts, Device::Cpu).unwrap();
        let (h, w) = sd.default_hw();
        tch::no_grad(|| {
            let sched = sd.scheduler(3).unwrap();
            let cond = StepCond {
                cond: sd.encode_prompt("a sks dog on the beach"),
                uncond: sd.encode_prompt(""),
                added: None,
            };
            let x0 = sd.denoise(sd.initial_latents(0, 1, h, w), &sched, &mut Fixed(cond), 7.5, None).unwrap();
            (sd.decode(&x0) / 2.0 + 0.5).clamp(0.0, 1.0).permute([0, 2, 3, 1]).get(0)
        })
    };
    let base = draw(vec![]);
    // diffusers' own no-LoRA image: our pipeline is bit-exact there (tests/pipeline.rs)
    check_tol("base image vs diffusers", max_abs_diff(&base, &want["base"]), 1e-4);
    for (name, rel, scale) in [
        ("peft-1.0", "ours/pytorch_lora_weights.safetensors", 1.0),
        ("peft-0.5", "ours/pytorch_lora_weights.safetensors", 0.5),
        ("kohya-1.0", "ours/kohya.safetensors", 1.0),
        ("kohya-0.5", "ours/kohya.safetensors", 0.5),
        ("peft_kohya-1.0", "peft_kohya.safetensors", 1.0),
    ] {
        let img = draw(vec![lora::LoraSpec { path: lora_fixture(rel), scale }]);
        // merged weights (ours) vs W·x + s·B·A·x (diffusers): float32 re-association through 3
        // DDIM steps and the VAE, measured at most 1.1e-5 (`make test-portable`: avx2, 2
        // threads); 1e-4 is a 9× margin, while the LoRA moves the image by 0.35–0.72
        check_tol(&format!("{name}: image vs diffusers"), max_abs_diff(&img, &want[name]), 1e-4);
        check_min(&format!("{name}: the LoRA changes the image"), max_abs_diff(&img, &base), 0.05);
    }
}

/// Our kohya file holds the same adapters as our diffusers file (kohya names, `.alpha`,
/// sd-scripts' metadata) and merges to the same weights.
#[test]
fn kohya_and_diffusers_files_hold_the_same_adapters() {
    let peft = lora::read(&lora_fixture("ours/pytorch_lora_weights.safetensors")).unwrap();
    let kohya = lora::read(&lora_fixture("ours/kohya.safetensors")).unwrap();
    assert!(!peft.kohya && kohya.kohya);
    assert_eq!(peft.layers.len(), kohya.layers.len());
    let meta = hifi_tuner::load::safetensors_metadata(&lora_fixture("ours/kohya.safetensors")).unwrap();
    assert_eq!(meta.get("ss_network_dim").map(String::as_str), Some("4"));
    assert_eq!(meta.get("ss_network_alpha").map(String::as_str), Some("8.0"));
    let keys: Vec<String> = read_tensors(&lora_fixture("ours/kohya.safetensors")).into_keys().collect();
    for k in [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
    ] {
        assert!(keys.iter().any(|x| x == k), "{k} missing from the kohya file");
    }
    let weights = |f: &lora::LoraFile| {
        let m = sd();
        lora::merge(f, 1.0, &m.lora_networks()).unwrap();
        let mut v: BTreeMap<String, Tensor> = m.unet.vs.variables().into_iter().collect();
        v.extend(m.text_encoder.vs.variables().into_iter().map(|(k, t)| (format!("te.{k}"), t)));
        v
    };
    let (a, b) = (weights(&peft), weights(&kohya));
    for (k, t) in &a {
        assert_eq!(max_abs_diff(t, &b[k]), 0.0, "{k}: the two files merge differently");
    }
}

/// Bad LoRA files are refused by name, before any output is written.
#[test]
fn bad_lora_files_are_refused_by_name_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let init = read_tensors(&lora_fixture("init.safetensors"));
    let write = |name: &str, f: &dyn Fn(&mut BTreeMap<String, Tensor>)| {
        let mut t: BTreeMap<String, Tensor> = init.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        f(&mut t);
        let p = tmp.path().join(name);
        let v: Vec<(String, Tensor)> = t.into_iter().collect();
        hifi_tuner::io::write_safetensors_atomic(&p, &v, &Default::default()).unwrap();
        p
    };
    let a_key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight";
    let rank8 = write("rank.safetensors", &|t| {
        t.insert(a_key.into(), Tensor::zeros([8, 32], (Kind::Float, Device::Cpu)));
    });
    let wide = write("wide.safetensors", &|t| {
        let b = a_key.replace("lora_A", "lora_B");
        t.insert(a_key.into(), Tensor::zeros([4, 640], (Kind::Float, Device::Cpu)));
        t.insert(b, Tensor::zeros([640, 4], (Kind::Float, Device::Cpu)));
    });
    let unknown = write("unknown.safetensors", &|t| {
        t.insert(
            "unet.down_blocks.0.nonsense.lora_A.weight".into(),
            Tensor::zeros([4, 32], (Kind::Float, Device::Cpu)),
        );
        t.insert(
            "unet.down_blocks.0.nonsense.lora_B.weight".into(),
            Tensor::zeros([32, 4], (Kind::Float, Device::Cpu)),
        );
    });
    // a valid SDXL LoRA (kohya, the second text encoder) on an SD-1.x model
    let sdxl = tmp.path().join("sdxl.safetensors");
    let name = "lora_te2_text_model_encoder_layers_0_mlp_fc1";
    let v = vec![
        (format!("{name}.lora_down.weight"), Tensor::zeros([4, 32], (Kind::Float, Device::Cpu))),
        (format!("{name}.lora_up.weight"), Tensor::zeros([64, 4], (Kind::Float, Device::Cpu))),
    ];
    hifi_tuner::io::write_safetensors_atomic(&sdxl, &v, &Default::default()).unwrap();
    let pickle = tmp.path().join("style.pt");
    std::fs::write(&pickle, b"\x80\x02}q\x00.").unwrap();
    for (file, needle) in [
        (&rank8, "to_q.lora_A.weight has shape [8, 32]"),
        (&wide, "does not fit"),
        (&unknown, "unet.down_blocks.0.nonsense.lora_A.weight"),
        (&sdxl, "SDXL"),
        (&pickle, "never unpickles"),
    ] {
        let img = tmp.path().join("out.png");
        let o = generate(&[], Some(file.display().to_string()), &img);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}: accepted", file.display());
        assert!(e.contains(needle), "{}: the error should name {needle:?}: {e}", file.display());
        assert!(!e.contains("panicked"), "{e}");
        assert!(!img.exists(), "nothing may be written");
    }
    // a missing file and a bad scale are refused when the arguments are read
    let o = generate(
        &[],
        Some(format!("{}:abc", tmp.path().join("none.safetensors").display())),
        &tmp.path().join("x.png"),
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such file"), "{}", String::from_utf8_lossy(&o.stderr));
}
