//! `learn --mode lora` from the command line on tiny-a: kill -9 + `--resume` bit-identical with
//! a checkpoint of the adapters only, `generate --subject` of a LoRA subject (no `--lora`
//! needed; + reference guidance), `replace --subject` of one, training on top of a style LoRA, half-precision base weights,
//! and bad input refused with nothing written.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const ARGS: [&str; 9] = ["--class-noun", "dog", "--steps", "3", "--no-prior", "--seed", "3", "--device", "cpu"];

fn learn_cmd(out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.args(["learn", "--mode", "lora", "--lr", "0.05", "--model"]).arg(model_dir("tiny-a"));
    c.arg("--images").arg(fixtures().join("photos/dog")).arg("--out").arg(out);
    c.args(extra);
    c
}

fn generate(args: &[&str], paths: &[(&str, &Path)], out: &Path) -> Output {
    let mut c = bin();
    c.args(["generate", "--prompt", "a sks dog on the beach", "--steps", "3", "--seed", "0", "--device", "cpu"]);
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.arg("--out").arg(out).output().unwrap()
}

fn peft(dir: &Path) -> PathBuf {
    dir.join("pytorch_lora_weights.safetensors")
}

#[test]
fn killed_and_resumed_lora_equals_unbroken_run_and_checkpoints_only_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = ARGS.to_vec();
    args[3] = "6";
    args.extend(["--checkpoint-every", "1", "--train-text-encoder"]);
    let a = tmp.path().join("a");
    assert_ok(&learn_cmd(&a, &args).output().unwrap());
    let b = tmp.path().join("b");
    let at_step = |n: usize| {
        let lines = std::fs::read_to_string(b.join("train_log.jsonl")).map(|s| s.lines().count()).unwrap_or(0);
        lines >= n && b.join("checkpoint.safetensors").exists()
    };
    kill_when(&mut learn_cmd(&b, &args), 400, Duration::from_secs(180), "step 3", || at_step(3), Duration::ZERO);
    assert!(!peft(&b).exists(), "killed before the end");
    let ckpt = read_tensors(&b.join("checkpoint.safetensors"));
    assert!(ckpt.keys().all(|k| k.contains(".lora_A.") || k.contains(".lora_B.")), "only adapters are checkpointed");
    assert!(ckpt.keys().any(|k| k.contains("text_encoder.")), "the text encoder's adapters too");
    let mut resume = args.clone();
    resume.push("--resume");
    assert_ok(&learn_cmd(&b, &resume).output().unwrap());
    assert!(std::fs::read(peft(&a)).unwrap() == std::fs::read(peft(&b)).unwrap(), "resumed LoRA differs");
    let k = |d: &Path| std::fs::read(d.join(format!("a1111/{}.safetensors", d.file_name().unwrap().to_str().unwrap())));
    assert!(k(&a).unwrap() == k(&b).unwrap(), "resumed kohya file differs");
    assert!(!b.join("checkpoint.safetensors").exists(), "the checkpoint is removed at the end");
}

#[test]
fn generate_subject_uses_its_base_model_and_lora_and_guidance_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dog");
    let mut c = learn_cmd(&out, &ARGS);
    c.arg("--masks").arg(fixtures().join("photos/dog-masks")).args(["--preview-every", "2"]);
    assert_ok(&c.output().unwrap());
    assert!(peft(&out).is_file() && out.join("a1111/dog.safetensors").is_file());
    // --preview-every: the instance prompt drawn at step 2, and the loss curve
    assert!(out.join("previews/step-000002.png").is_file() && out.join("loss.svg").is_file());
    // --subject: no --model, no --lora
    let s = tmp.path().join("s.png");
    assert_ok(&generate(&[], &[("--subject", &out)], &s));
    let l = tmp.path().join("l.png");
    assert_ok(&generate(&[], &[("--model", &model_dir("tiny-a")), ("--lora", &peft(&out))], &l));
    assert_eq!(png_rgb(&s), png_rgb(&l), "--subject of a LoRA subject = its base model + --lora");
    let base = tmp.path().join("base.png");
    assert_ok(&generate(&[], &[("--model", &model_dir("tiny-a"))], &base));
    assert_ne!(png_rgb(&base), png_rgb(&s), "the LoRA changes the image");
    // reference guidance on the LoRA subject (M_g from the token + class attention)
    let g = tmp.path().join("g.png");
    let o = generate(
        &["--reference-guidance", "--t-start", "2", "--t-end", "1", "--guidance-steps", "2", "--save-intermediates"],
        &[("--subject", &out)],
        &g,
    );
    assert_ok(&o);
    assert!(!err(&o).contains("falling back"), "{}", err(&o));
    assert!(tmp.path().join("g-intermediates/M_g.png").is_file(), "{}", err(&o));
    // replace --subject of a LoRA subject = --model BASE --lora FILE --target-word "sks dog"
    let replace = |extra: &[&str], paths: &[(&str, &Path)], out: &Path| {
        let mut c = bin();
        c.args(["replace", "--source-word", "dog", "--device", "cpu", "--steps", "3", "--inner-steps", "1"]);
        c.args(["--caption", "a photo of a dog"]).arg("--image").arg(fixtures().join("photos/dog/00.jpg"));
        c.args(extra);
        for (flag, p) in paths {
            c.arg(flag).arg(p);
        }
        c.arg("--out").arg(out).output().unwrap()
    };
    let r1 = tmp.path().join("r1.png");
    assert_ok(&replace(&[], &[("--model", &model_dir("tiny-a")), ("--subject", &out)], &r1));
    let r2 = tmp.path().join("r2.png");
    let explicit = [("--model", model_dir("tiny-a")), ("--lora", peft(&out))];
    let explicit: Vec<(&str, &Path)> = explicit.iter().map(|(f, p)| (*f, p.as_path())).collect();
    assert_ok(&replace(&["--target-word", "sks dog"], &explicit, &r2));
    assert_eq!(png_rgb(&r1), png_rgb(&r2), "replace --subject LORA = base + --lora + --target-word \"sks dog\"");
    // the inversion saved with the LoRA merged is not reused without it (the model differs)
    let inv = tmp.path().join("r1-inversion");
    assert!(inv.is_dir());
    let o = replace(
        &["--target-word", "sks dog"],
        &[("--model", &model_dir("tiny-a")), ("--inversion", &inv)],
        &tmp.path().join("r3.png"),
    );
    assert_fails(&o, "lora");
    assert!(!tmp.path().join("r3.png").exists());
}

#[test]
fn a_subject_learned_on_a_style_lora_is_drawn_with_both() {
    let tmp = tempfile::tempdir().unwrap();
    let style = fixtures().join("lora/ours/kohya.safetensors");
    let out = tmp.path().join("dog");
    let mut c = learn_cmd(&out, &ARGS);
    c.arg("--lora").arg(format!("{}:0.5", style.display()));
    assert_ok(&c.output().unwrap());
    let manifest = std::fs::read_to_string(out.join("dreambooth.json")).unwrap();
    assert!(manifest.contains("kohya.safetensors") && manifest.contains("\"mode\": \"lora\""), "{manifest}");
    let s = tmp.path().join("s.png");
    assert_ok(&generate(&[], &[("--subject", &out)], &s));
    let both = tmp.path().join("both.png");
    let style_arg = PathBuf::from(format!("{}:0.5", style.display()));
    assert_ok(&generate(
        &[],
        &[("--model", &model_dir("tiny-a")), ("--lora", &style_arg), ("--lora", &peft(&out))],
        &both,
    ));
    assert_eq!(png_rgb(&s), png_rgb(&both), "the subject is drawn with the style LoRA it was learned on");
    let only = tmp.path().join("only.png");
    assert_ok(&generate(&[], &[("--model", &model_dir("tiny-a")), ("--lora", &peft(&out))], &only));
    assert_ne!(png_rgb(&s), png_rgb(&only), "…and without it, another image");
}

#[test]
fn lora_trains_on_half_precision_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf");
    let mut args = ARGS.to_vec();
    args.extend(["--dtype", "bf16"]);
    assert_ok(&learn_cmd(&out, &args).output().unwrap());
    let t = read_tensors(&peft(&out));
    assert!(t.values().all(|v| v.kind() == tch::Kind::Float), "adapters are float32");
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);
}

#[test]
fn bad_lora_arguments_are_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let h = tmp.path().join("h");
    let o = bin()
        .args(["learn", "--mode", "hifi", "--rank", "8", "--class-noun", "dog", "--device", "cpu", "--model"])
        .arg(model_dir("tiny-a"))
        .arg("--images")
        .arg(fixtures().join("photos/dog"))
        .arg("--out")
        .arg(&h)
        .output()
        .unwrap();
    assert_fails(&o, "--rank and --alpha apply to --mode lora only");
    assert!(!h.exists());
    let mut args = ARGS.to_vec();
    args.extend(["--rank", "0"]);
    let o = learn_cmd(&tmp.path().join("r0"), &args).output().unwrap();
    assert!(!o.status.success() && err(&o).contains("--rank"), "{}", err(&o));
    assert!(!tmp.path().join("r0").exists());
    // a finished LoRA is not overwritten
    let done = tmp.path().join("done");
    assert_ok(&learn_cmd(&done, &ARGS).output().unwrap());
    let before = std::fs::read(peft(&done)).unwrap();
    assert_fails(&learn_cmd(&done, &ARGS).output().unwrap(), "already holds a finished LoRA");
    // a DreamBooth run into a LoRA folder: another subject
    let o = bin()
        .args(["learn", "--mode", "dreambooth", "--model"])
        .arg(model_dir("tiny-a"))
        .arg("--images")
        .arg(fixtures().join("photos/dog"))
        .arg("--out")
        .arg(&done)
        .args(ARGS)
        .output()
        .unwrap();
    assert_fails(&o, "already holds another DreamBooth subject");
    assert!(before == std::fs::read(peft(&done)).unwrap());
}
