//! The DreamBooth benchmark on the tiny model: units, sharding, skip / redo, failures, report.

mod common;

use common::*;
use hifi_tuner::benchmark::report::base64;
use hifi_tuner::benchmark::{fill_prompt, run_with, units, BenchmarkConfig, Dataset, Method, Shard};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const PROMPTS_TXT: &str = "Classes\n\nsubject_name,class\ndog,dog\nteapot,teapot\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n\
'a {0} {1} in the jungle'.format(unique_token, class_token),\n'a red {0} {1}'.format(unique_token, class_token),\n\
'a {0} {1} in the snow'.format(unique_token, class_token)\n]\n\nLive Subject Prompts\n\nprompt_list = [\n\
'a {0} {1} in the jungle'.format(unique_token, class_token),\n'a {0} {1} wearing a red hat'.format(unique_token, class_token),\n]\n";

/// A two-subject DreamBooth-layout dataset from the fixture photos: `dog` (class dog, live) and
/// `teapot` (class teapot, an object: reference guidance runs for it), and their masks.
fn dataset(root: &Path) -> (PathBuf, PathBuf) {
    let (ds, masks) = (root.join("dataset"), root.join("masks"));
    for s in ["dog", "teapot"] {
        for (from, to) in [("dog", ds.join(s)), ("dog-masks", masks.join(s))] {
            std::fs::create_dir_all(&to).unwrap();
            for e in std::fs::read_dir(fixtures().join("photos").join(from)).unwrap() {
                let p = e.unwrap().path();
                std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
            }
        }
    }
    std::fs::write(ds.join("prompts_and_classes.txt"), PROMPTS_TXT).unwrap();
    (ds, masks)
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
    for k in ["RUST_BACKTRACE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "JOB_COMPLETION_INDEX"] {
        c.env_remove(k);
    }
    c
}

/// `benchmark` on tiny-a and the tiny dataset in `root` (photos and masks), scored with the tiny
/// CLIP and DINO.
fn tiny_benchmark(root: &Path) -> Command {
    let mut c = bin();
    c.args(["benchmark", "--model"]).arg(model_dir("tiny-a"));
    c.arg("--dataset").arg(root.join("dataset")).arg("--masks").arg(root.join("masks"));
    c.arg("--clip").arg(fixtures().join("clip-tiny")).arg("--dino").arg(fixtures().join("dino-tiny"));
    c
}

/// The tiny benchmark: 2 subjects × {ti, hifi}, 2 prompts × 1 image, few steps.
fn bench_cmd(root: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = tiny_benchmark(root);
    c.args(["--methods", "ti,hifi", "--prompts", "2", "--images-per-prompt", "1", "--learn-steps", "3"]);
    c.args(["--stepwise-steps", "1", "--steps", "6", "--t-start", "5", "--t-end", "2", "--guidance-steps", "2"]);
    c.args(["--device", "cpu", "--out"]).arg(out).args(extra);
    c
}

fn ok(o: Output) -> serde_json::Value {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "benchmark failed: {err}");
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn report(runs: &[&Path], out: &Path) -> (serde_json::Value, String) {
    let o = bin().arg("report").args(runs).arg("--out").arg(out).output().unwrap();
    assert!(o.status.success(), "report failed: {}", String::from_utf8_lossy(&o.stderr));
    let json = std::fs::read_to_string(out.join("results.json")).unwrap();
    (serde_json::from_str(&json).unwrap(), String::from_utf8_lossy(&o.stdout).into_owned())
}

/// (subject, method) -> (dino, clip_i, clip_t)
fn scores(results: &serde_json::Value) -> HashMap<(String, String), (f64, f64, f64)> {
    results["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let f = |k: &str| u[k].as_f64().unwrap();
            (
                (u["subject"].as_str().unwrap().to_string(), u["method"].as_str().unwrap().to_string()),
                (f("dino"), f("clip_i"), f("clip_t")),
            )
        })
        .collect()
}

#[test]
fn benchmark_shards_skip_redo_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    dataset(root);
    // 1. unsharded
    let full = root.join("full");
    let s = ok(bench_cmd(root, &full, &[]).output().unwrap());
    assert_eq!(s["done"].as_array().unwrap().len(), 4, "{s}");
    eprintln!("unsharded run: {s}");
    for (subj, m) in [("dog", "ti"), ("dog", "hifi"), ("teapot", "ti"), ("teapot", "hifi")] {
        let d = full.join("units").join(subj).join(m);
        for f in ["scores.json", "log.txt", "prompts.jsonl", "images/p00-0.png", "images/p01-0.png", "real/00.png"] {
            assert!(d.join(f).is_file(), "{} missing", d.join(f).display());
        }
        let sc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("scores.json")).unwrap()).unwrap();
        // guidance only for the non-live subject's hifi unit (the paper's rule)
        assert_eq!(sc["guided"].as_bool().unwrap(), subj == "teapot" && m == "hifi", "{subj}/{m}");
        // the generated PNG carries its prompt; CLIP-T scores the class-noun prompt
        let params = hifi_tuner::io::png_text(&d.join("images/p00-0.png")).unwrap();
        let p = &params.iter().find(|(k, _)| k == "parameters").unwrap().1;
        let want = if m == "ti" { format!("<{subj}>") } else { format!("a {} in the jungle", subj) };
        assert!(p.contains(&want), "{p}");
        let pl = std::fs::read_to_string(d.join("prompts.jsonl")).unwrap();
        assert!(pl.contains(&format!("a {subj} in the jungle")), "{pl}");
    }
    assert!(full.join("units/dog/hifi/subject/subject.safetensors").is_file());
    assert!(full.join("units/dog/ti/subject/learned_embeds.safetensors").is_file());

    // 2. a rerun recomputes nothing
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let before = mtime(&full.join("units/dog/ti/scores.json"));
    let s = ok(bench_cmd(root, &full, &[]).output().unwrap());
    assert_eq!(s["skipped"].as_array().unwrap().len(), 4, "{s}");
    assert!(s["done"].as_array().unwrap().is_empty(), "{s}");
    assert_eq!(mtime(&full.join("units/dog/ti/scores.json")), before);

    // 3. shard 0/2 (units 0 and 2: dog/ti, dog/hifi); shard 1/2 (teapot) through Slurm's
    //    variables, killed while learning its first unit, then rerun: the killed unit is redone.
    let sh0 = root.join("shard0");
    let s = ok(bench_cmd(root, &sh0, &["--shard", "0/2"]).output().unwrap());
    assert_eq!(s["done"], serde_json::json!(["dog/ti", "dog/hifi"]), "{s}");
    let sh1 = root.join("shard1");
    let mut child = bench_cmd(root, &sh1, &[])
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "2")
        .env("HIFI_TUNER_STEP_DELAY_MS", "1000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let log = sh1.join("units/teapot/.ti.partial/subject/train_log.jsonl");
    let mut waited = 0;
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() >= 1) {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(std::time::Duration::from_millis(50));
        waited += 1;
        assert!(waited < 6000, "no learning step logged in 5 minutes");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!sh1.join("units/teapot/ti").exists(), "a killed unit must not look finished");
    assert!(sh1.join("units/teapot/.ti.partial").is_dir());
    let o =
        bench_cmd(root, &sh1, &[]).env("SLURM_ARRAY_TASK_ID", "1").env("SLURM_ARRAY_TASK_COUNT", "2").output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("interrupted"), "{}", String::from_utf8_lossy(&o.stderr));
    let s = ok(o);
    assert_eq!(s["done"], serde_json::json!(["teapot/ti", "teapot/hifi"]), "{s}");
    assert!(!sh1.join("units/teapot/.ti.partial").exists());

    // 4. the merged shards give exactly the unsharded numbers: each unit is computed the same
    //    way (same binary, thread count, seeds; a fresh model per unit) and the report only
    //    averages the per-unit files.
    let (r_full, md) = report(&[&full], &root.join("rep-full"));
    let (r_sh, _) = report(&[&sh0, &sh1], &root.join("rep-sh"));
    assert_eq!(scores(&r_full), scores(&r_sh));
    assert_eq!(r_full["methods"], r_sh["methods"]);
    assert_eq!(r_full["methods"]["hifi"]["subjects"], 2);
    let (a, b) = (&scores(&r_full)[&("dog".into(), "ti".into())], &scores(&r_full)[&("teapot".into(), "ti".into())]);
    let mean = (a.0 + b.0) / 2.0;
    assert!((r_full["methods"]["ti"]["dino"].as_f64().unwrap() - mean).abs() < 1e-12);
    assert!(md.contains("| method | DINO | CLIP-I | CLIP-T | subjects |") && md.contains("| hifi |"), "{md}");
    // overlapping runs are refused
    let o = bin().arg("report").arg(&full).arg(&sh0).arg("--out").arg(root.join("x")).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("two runs"));

    // 5. the report names every unit and embeds its images (and the real photos)
    let html = std::fs::read_to_string(root.join("rep-sh/report.html")).unwrap();
    for (subj, m) in [("dog", "ti"), ("dog", "hifi"), ("teapot", "ti"), ("teapot", "hifi")] {
        assert!(html.contains(&format!("data-subject=\"{subj}\" data-method=\"{m}\"")), "{subj}/{m}");
    }
    // 2 subjects × (3 real photos + 2 methods × 2 images)
    assert_eq!(html.matches("src=\"data:image/png;base64,").count(), 2 * (3 + 2 * 2));
    assert!(!html.contains("src=\"/") && !html.contains("src=\"file:"), "the report must be self-contained");

    // 6. units kept without their images (their scores copied elsewhere) still report, with
    //    the same numbers; the HTML says which images were not kept
    let kept = root.join("kept");
    for d in std::fs::read_dir(full.join("units")).unwrap().flatten() {
        for u in std::fs::read_dir(d.path()).unwrap().flatten() {
            let to = kept.join("units").join(d.file_name()).join(u.file_name());
            if !u.path().join("scores.json").is_file() {
                continue;
            }
            std::fs::create_dir_all(&to).unwrap();
            for f in ["scores.json", "log.txt", "prompts.jsonl"] {
                std::fs::copy(u.path().join(f), to.join(f)).unwrap();
            }
        }
    }
    let (r_kept, _) = report(&[&kept], &root.join("rep-kept"));
    assert_eq!(scores(&r_kept), scores(&r_full));
    let html = std::fs::read_to_string(root.join("rep-kept/report.html")).unwrap();
    assert_eq!(html.matches("(image not kept)").count(), 2 * 2 * 2, "2 subjects × 2 methods × 2 images");
    let csv = std::fs::read_to_string(root.join("rep-sh/results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
}

#[test]
fn a_method_without_masks_fails_its_unit_and_the_others_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (ds, _) = dataset(root);
    let out = root.join("run");
    let o = bin()
        .args(["benchmark", "--model"])
        .arg(model_dir("tiny-a"))
        .arg("--dataset")
        .arg(&ds)
        .arg("--clip")
        .arg(fixtures().join("clip-tiny"))
        .arg("--dino")
        .arg(fixtures().join("dino-tiny"))
        .args(["--subjects", "dog", "--methods", "ti+mask,ti", "--prompts", "1", "--images-per-prompt", "1"])
        .args(["--learn-steps", "1", "--steps", "3", "--device", "cpu", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("1 unit(s) failed"), "{err}");
    let msg = std::fs::read_to_string(out.join("units/dog/ti+mask.error.txt")).unwrap();
    assert!(msg.contains("needs subject masks") && msg.contains("--masks"), "{msg}");
    assert!(out.join("units/dog/ti/scores.json").is_file(), "the other unit must go on");
    assert!(!out.join("units/dog/ti+mask").exists());
    let (r, md) = report(&[&out], &out);
    assert_eq!(r["failed"][0]["method"], "ti+mask");
    assert!(md.contains("failed"), "{md}");
}

#[test]
fn dataset_units_and_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let (ds, _) = dataset(tmp.path());
    let d = Dataset::open(&ds).unwrap();
    assert_eq!(d.subjects.len(), 2);
    assert_eq!(d.object_prompts.len(), 3);
    assert_eq!(d.live_prompts.len(), 2);
    assert!(d.subjects[0].live() && !d.subjects[1].live());
    assert_eq!(d.prompts(&d.subjects[0])[1], "a {0} {1} wearing a red hat");
    assert_eq!(fill_prompt("a red {0} {1}", "dog", "dog"), "a red dog");
    assert_eq!(fill_prompt("a {0} {1} in the snow", "<dog>", "dog"), "a <dog> in the snow");
    // stable order: method-major (table order whatever the flag order), subjects by name
    let u = units(&d, &[], &[Method::Hifi, Method::Ti]).unwrap();
    let names: Vec<String> = u.iter().map(|u| format!("{}/{}", u.subject.name, u.method.name())).collect();
    assert_eq!(names, ["dog/ti", "teapot/ti", "dog/hifi", "teapot/hifi"]);
    assert!(units(&d, &["cat".into()], &[Method::Ti]).unwrap_err().to_string().contains("cat"));
    // every unit in exactly one shard
    for n in 1..5 {
        let shards: Vec<Shard> = (0..n).map(|i| Shard::parse(&format!("{i}/{n}")).unwrap()).collect();
        for k in 0..10 {
            assert_eq!(shards.iter().filter(|s| s.takes(k)).count(), 1);
        }
    }
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    };
    assert_eq!(Shard::resolve(Some("1/3"), None, &env(&[])).unwrap(), Shard { index: 1, count: 3 });
    assert_eq!(Shard::resolve(None, None, &env(&[])).unwrap(), Shard::ALL);
    let slurm = env(&[("SLURM_ARRAY_TASK_ID", "5"), ("SLURM_ARRAY_TASK_COUNT", "4"), ("SLURM_ARRAY_TASK_MIN", "3")]);
    assert_eq!(Shard::resolve(None, None, &slurm).unwrap(), Shard { index: 2, count: 4 });
    let k8s = env(&[("JOB_COMPLETION_INDEX", "7")]);
    assert_eq!(Shard::resolve(None, Some(30), &k8s).unwrap(), Shard { index: 7, count: 30 });
    assert!(Shard::resolve(None, None, &k8s).unwrap_err().to_string().contains("--shards"));
    assert!(Shard::resolve(None, Some(5), &env(&[("JOB_COMPLETION_INDEX", "5")])).is_err());
    // --shards must agree with the count of --shard or of a Slurm array
    let e = Shard::resolve(Some("1/4"), Some(8), &env(&[])).unwrap_err().to_string();
    assert!(e.contains("--shards 8") && e.contains("--shard 1/4"), "{e}");
    assert_eq!(Shard::resolve(Some("1/4"), Some(4), &env(&[])).unwrap(), Shard { index: 1, count: 4 });
    assert!(Shard::resolve(None, Some(3), &slurm).unwrap_err().to_string().contains("SLURM_ARRAY_TASK_COUNT=4"));
    assert!(Shard::parse("2/2").is_err() && Shard::parse("1").is_err());
    assert!(Method::parse("dreambooth").is_err());
    // a bad dataset names its file
    let e = Dataset::open(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("prompts_and_classes.txt"), "{e}");
}

#[test]
fn base64_matches_rfc4648() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"M"), "TQ==");
    assert_eq!(base64(b"Ma"), "TWE=");
    assert_eq!(base64(b"Man"), "TWFu");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
}

/// Two rows of a subject-folder method (a plain and a guided one) on the teapot: each unit is
/// scored, generates "a sks teapot …" and keeps what it learned (`learned`, relative to the
/// unit's subject folder); the report has the guided row.
fn fine_tuned_rows(rows: [&str; 2], steps_flag: &str, learned: &str, absent: Option<&str>) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    dataset(root);
    let out = root.join("run");
    let mut c = tiny_benchmark(root);
    c.args(["--subjects", "teapot", "--methods", &rows.join(","), "--prompts", "1", "--images-per-prompt", "1"]);
    c.args([steps_flag, "2", "--db-class-images", "1", "--steps", "6", "--t-start", "5", "--t-end", "2"]);
    c.args(["--guidance-steps", "2", "--device", "cpu", "--out"]).arg(&out);
    let s = ok(c.output().unwrap());
    assert_eq!(s["done"].as_array().unwrap().len(), 2, "{s}");
    for m in rows {
        let u = out.join("units/teapot").join(m);
        let sc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(u.join("scores.json")).unwrap()).unwrap();
        assert_eq!(sc["guided"], m == rows[1]);
        assert!(sc["dino"].as_f64().unwrap().is_finite());
        assert!(u.join("subject").join(learned).is_file(), "{m}: no {learned}");
        if let Some(a) = absent {
            assert!(!u.join("subject").join(a).exists(), "{m}: {a} should not be written");
        }
        let text = hifi_tuner::io::png_text(&u.join("images/p00-0.png")).unwrap();
        let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
        assert!(params.starts_with("a sks teapot in the jungle"), "{m}: {params}");
        assert!(params.contains(&format!("subject/{}", learned.split('/').next().unwrap())), "{m}: {params}");
    }
    let (r, md) = report(&[&out], &out);
    assert_eq!(r["methods"][rows[1]]["subjects"], 1);
    assert!(md.contains(&format!("| {} |", rows[1])), "{md}");
}

/// The DreamBooth rows (issue 11): `db` fine-tunes the UNet and generates "a sks teapot …" from
/// the fine-tuned folder; `db+guidance` adds reference guidance for the object subject.
#[test]
fn dreambooth_rows_fine_tune_and_generate_from_the_fine_tuned_model() {
    fine_tuned_rows(["db", "db+guidance"], "--db-steps", "model/unet/diffusion_pytorch_model.safetensors", None);
}

/// The LoRA rows (issue 20): `lora` trains adapters and generates "a sks teapot …" on the base
/// model with them merged (no model folder); `lora+guidance` adds reference guidance.
#[test]
fn lora_rows_train_adapters_and_generate_with_them() {
    fine_tuned_rows(["lora", "lora+guidance"], "--lora-steps", "pytorch_lora_weights.safetensors", Some("model"));
}

/// A world dataset needs no CLIP / DINO and is scored against its ground truth; a DreamBooth
/// dataset without them is refused before any work.
#[test]
fn a_world_dataset_is_scored_against_ground_truth() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path().join("world");
    hifi_tuner::world::dataset::write_world(&w, 0, 3, 0).unwrap();
    // the world model's shapes (64×64) with random weights: the score is defined, not good
    let model = tmp.path().join("m");
    let o = bin()
        .args(["train-base", "--device", "cpu", "--images", "8", "--vae-steps", "1", "--unet-steps", "1"])
        .arg("--unet-config")
        .arg(fixtures().join("world/unet.json"))
        .arg("--vae-config")
        .arg(fixtures().join("world/vae.json"))
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("run");
    let run = |extra: &[&str], ds: &Path| {
        bin()
            .args(["benchmark", "--model"])
            .arg(&model)
            .arg("--dataset")
            .arg(ds)
            .arg("--masks")
            .arg(w.join("masks"))
            .args(["--subjects", "striped_cube", "--prompts", "2", "--images-per-prompt", "1", "--learn-steps", "2"])
            .args(["--stepwise-steps", "1", "--steps", "4", "--t-start", "3", "--t-end", "1", "--guidance-steps", "1"])
            .args(["--caption-template", "a {}", "--device", "cpu", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let s = ok(run(&["--methods", "ti+mask,hifi"], &w.join("dataset")));
    assert_eq!(s["done"].as_array().unwrap().len(), 2, "{s}");
    let sc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("units/striped_cube/hifi/scores.json")).unwrap())
            .unwrap();
    let rmse = sc["gt_rmse"].as_f64().unwrap();
    assert!(rmse > 0.0 && rmse < 1.0, "{sc}");
    assert!(sc["dino"].is_null() && sc["clip_t"].is_null());
    assert_eq!(sc["settings"]["learn"]["captions"][0], "a cube");
    let (r, md) = report(&[&out], &out);
    assert!(r["methods"]["hifi"]["gt_rmse"].as_f64().is_some());
    assert!(md.contains("GT RMSE") && !md.contains("DINO"), "{md}");
    // the DreamBooth-layout dataset of the tiny test: CLIP and DINO are required
    let (ds, _) = dataset(tmp.path());
    let o = run(&["--methods", "ti"], &ds);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--clip and --dino"), "{e}");
}

/// The tiny benchmark's settings as a library config (no work: the tests run stand-in units).
fn config(root: &Path, out: &Path) -> BenchmarkConfig {
    BenchmarkConfig {
        model: model_dir("tiny-a"),
        load: Default::default(),
        dataset: root.join("dataset"),
        masks: Some(root.join("masks")),
        clip: Some(fixtures().join("clip-tiny")),
        dino: Some(fixtures().join("dino-tiny")),
        out: out.to_path_buf(),
        subjects: vec![],
        methods: vec![Method::Ti],
        prompts: 1,
        images_per_prompt: 1,
        seed: 0,
        learn_steps: 1,
        stepwise_steps: 1,
        lr: 5e-3,
        reg_weight: 1e-3,
        tokens: 5,
        db_steps: 1,
        db_class_images: 1,
        db_lr: 5e-6,
        lora_steps: 1,
        lora_lr: 1e-4,
        lora_rank: 4,
        caption_templates: vec![],
        steps: 3,
        guidance: 7.5,
        t_start: 2,
        t_end: 1,
        guidance_steps: 1,
        guidance_lr: 1e-2,
        shard: Shard::ALL,
        device: tch::Device::Cpu,
        redo_mismatched: false,
    }
}

/// A panic inside a unit (issue 18: the world score's squeeze aborted every unit and left
/// `.partial/` behind) fails that unit like any error: its `.partial` folder is removed, its
/// error file names the panic, and the other units go on.
#[test]
fn a_panic_inside_a_unit_fails_that_unit_only() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    dataset(root);
    let out = root.join("run");
    let cfg = config(root, &out);
    let mut seen = Vec::new();
    let s = run_with(&cfg, &mut |cfg, _ds, u, _ev, _gt| {
        seen.push(u.subject.name.clone());
        let partial = cfg.out.join("units").join(&u.subject.name).join(".ti.partial");
        std::fs::create_dir_all(&partial)?;
        std::fs::write(partial.join("half.png"), b"x")?;
        if u.subject.name == "dog" {
            let v: Vec<i64> = vec![];
            let _ = v[3]; // a bug deep in a unit
        }
        let done = cfg.out.join("units").join(&u.subject.name).join("ti");
        std::fs::rename(&partial, &done)?;
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, ["dog", "teapot"], "the other unit must go on");
    assert_eq!(s.done, ["teapot/ti"]);
    assert_eq!(s.failed.len(), 1, "{:?}", s.failed);
    assert!(s.failed[0].1.contains("panicked") && s.failed[0].1.contains("index out of bounds"), "{:?}", s.failed);
    assert!(!out.join("units/dog/.ti.partial").exists(), "the panicked unit's .partial must be removed");
    let msg = std::fs::read_to_string(out.join("units/dog/ti.error.txt")).unwrap();
    assert!(msg.contains("panicked"), "{msg}");
    assert!(out.join("units/teapot/ti/half.png").is_file());
}

/// A rerun with other settings is refused (issue 18: the old units were kept and reported as
/// skipped), or with --redo-mismatched redone; `report` refuses to average units made with
/// different settings unless --allow-mixed-settings; a unit another process holds is not run.
#[test]
fn other_settings_are_refused_or_redone_and_not_averaged() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    dataset(root);
    let small = |out: &Path, extra: &[&str]| {
        let mut c = bin();
        c.args(["benchmark", "--model"]).arg(model_dir("tiny-a")).arg("--dataset").arg(root.join("dataset"));
        c.arg("--clip").arg(fixtures().join("clip-tiny")).arg("--dino").arg(fixtures().join("dino-tiny"));
        c.args(["--methods", "ti", "--prompts", "1", "--images-per-prompt", "1"]);
        c.args(["--steps", "3", "--device", "cpu", "--out"]).arg(out).args(extra);
        c.output().unwrap()
    };
    let a = root.join("a");
    let s = ok(small(&a, &["--subjects", "dog", "--learn-steps", "1"]));
    assert_eq!(s["done"], serde_json::json!(["dog/ti"]), "{s}");
    let scores = a.join("units/dog/ti/scores.json");
    let before = std::fs::read(&scores).unwrap();
    // the same settings: skipped
    let s = ok(small(&a, &["--subjects", "dog", "--learn-steps", "1"]));
    assert_eq!(s["skipped"], serde_json::json!(["dog/ti"]), "{s}");
    // another --learn-steps: refused before any work, naming the unit and the setting
    let o = small(&a, &["--subjects", "dog", "--learn-steps", "2"]);
    let e = String::from_utf8_lossy(&o.stderr);
    eprintln!("{e}");
    assert!(!o.status.success(), "{e}");
    assert!(e.contains("dog/ti") && e.contains("learn.steps: 1 → 2") && e.contains("--redo-mismatched"), "{e}");
    assert_eq!(std::fs::read(&scores).unwrap(), before, "the finished unit must be kept");
    // … or redone with --redo-mismatched
    let s = ok(small(&a, &["--subjects", "dog", "--learn-steps", "2", "--redo-mismatched"]));
    assert_eq!(
        (s["done"].clone(), s["redone"].clone()),
        (serde_json::json!(["dog/ti"]), serde_json::json!(["dog/ti"]))
    );
    let sc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&scores).unwrap()).unwrap();
    assert_eq!(sc["settings"]["learn"]["steps"], 2);
    assert_eq!(sc["method_settings"]["learn"]["class_noun"], "{class}");

    // another run (teapot) with --learn-steps 1: the report refuses to average the two
    let b = root.join("b");
    ok(small(&b, &["--subjects", "teapot", "--learn-steps", "1"]));
    let o = bin().arg("report").arg(&a).arg(&b).arg("--out").arg(root.join("rep")).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    eprintln!("{e}");
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("different settings") && e.contains("learn.steps: 2 → 1") && e.contains("--allow-mixed-settings"),
        "{e}"
    );
    assert!(!root.join("rep/results.json").exists());
    let o = bin()
        .arg("report")
        .arg(&a)
        .arg(&b)
        .arg("--allow-mixed-settings")
        .arg("--out")
        .arg(root.join("rep"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // a unit another process holds is not run; the holder is named
    std::fs::create_dir_all(b.join("units/dog")).unwrap();
    let held = hifi_tuner::outdir::lock_file(&b.join("units/dog/.ti.lock"), "unit").unwrap();
    let o = small(&b, &["--learn-steps", "1"]);
    let e = String::from_utf8_lossy(&o.stderr);
    eprintln!("{e}");
    assert!(!o.status.success(), "{e}");
    assert!(e.contains("another process holds") && e.contains(&format!("pid {}", std::process::id())), "{e}");
    assert!(!b.join("units/dog/ti").exists() && !b.join("units/dog/.ti.partial").exists());
    drop(held);
}

/// The files under `dir` with their contents and modification times (to check a folder is
/// untouched).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            let data = if p.is_file() { std::fs::read(&p).unwrap() } else { vec![] };
            out.push((p.clone(), data, std::fs::metadata(&p).unwrap().modified().unwrap()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A stand-in unit: the finished folder with a scores.json and one image, no model.
fn stand_in(cfg: &BenchmarkConfig, u: &hifi_tuner::benchmark::Unit) -> anyhow::Result<()> {
    let done = hifi_tuner::benchmark::unit_dir(&cfg.out, &u.subject.name, u.method);
    std::fs::create_dir_all(done.join("images"))?;
    std::fs::write(done.join("images/p00-0.png"), b"png")?;
    std::fs::write(done.join("scores.json"), b"{}")?;
    Ok(())
}

/// Issue 19: `--dino` at a folder that is not a ViT (a CLIP folder, an empty folder, one without
/// config.json, none) is refused naming the folder before any unit runs and before anything is
/// written under --out; the finished units of an earlier run stay as they were.
#[test]
fn a_bad_dino_folder_is_refused_before_any_unit_and_finished_units_stay() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    dataset(root);
    let out = root.join("run");
    let mut cfg = config(root, &out);
    cfg.subjects = vec!["dog".into()];
    let s = run_with(&cfg, &mut |cfg, _ds, u, _ev, _gt| stand_in(cfg, u)).unwrap();
    assert_eq!(s.done, ["dog/ti"]);
    let before = snapshot(&out);
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let no_config = root.join("no-config");
    std::fs::create_dir_all(&no_config).unwrap();
    std::fs::copy(fixtures().join("dino-tiny/model.safetensors"), no_config.join("model.safetensors")).unwrap();
    let clip = fixtures().join("clip-tiny");
    for (bad, why) in [
        (&clip, "model_type \"clip\""),
        (&empty, "no config.json"),
        (&no_config, "no config.json"),
        (&root.join("none"), "no such folder"),
    ] {
        // every subject: the teapot unit would run
        let mut c = config(root, &out);
        c.dino = Some(bad.clone());
        let mut ran = false;
        let e = run_with(&c, &mut |_, _, _, _, _| {
            ran = true;
            Ok(())
        })
        .unwrap_err();
        let e = format!("{e:#}");
        eprintln!("{e}");
        assert!(e.contains("--dino") && e.contains(&bad.display().to_string()) && e.contains(why), "{e}");
        assert!(!ran, "no unit may run");
        assert_eq!(snapshot(&out), before, "the finished unit and --out must be untouched ({})", bad.display());
        // a new --out is not even created
        let fresh = root.join("fresh");
        c.out = fresh.clone();
        assert!(run_with(&c, &mut |_, _, _, _, _| Ok(())).is_err());
        assert!(!fresh.exists(), "nothing may be written under a new --out");
    }
    // the command line says the same
    let mut c = bin();
    c.args(["benchmark", "--model"]).arg(model_dir("tiny-a")).arg("--dataset").arg(root.join("dataset"));
    c.arg("--clip").arg(&clip).arg("--dino").arg(&clip).args(["--methods", "ti", "--device", "cpu", "--out"]).arg(&out);
    let o = c.output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains(&format!("--dino {}", clip.display())), "{e}");
    assert_eq!(snapshot(&out), before);
}

/// Issue 19: a world dataset whose ground_truth/ is missing, or lacks a subject's files, is
/// refused naming the folder before any unit runs; the finished units stay.
#[test]
fn a_world_dataset_without_its_ground_truth_is_refused_before_any_unit() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path().join("world");
    hifi_tuner::world::dataset::write_world(&w, 0, 2, 0).unwrap();
    let ds = Dataset::open(&w.join("dataset")).unwrap();
    let subject = ds.subjects[0].name.clone();
    let out = tmp.path().join("run");
    let mut cfg = config(tmp.path(), &out);
    (cfg.dataset, cfg.masks, cfg.clip, cfg.dino) = (w.join("dataset"), Some(w.join("masks")), None, None);
    cfg.subjects = vec![subject.clone()];
    cfg.prompts = 2;
    let s = run_with(&cfg, &mut |cfg, _ds, u, _ev, gt| {
        assert!(gt.is_some(), "a world dataset is scored against its ground truth");
        stand_in(cfg, u)
    })
    .unwrap();
    assert_eq!(s.done.len(), 1);
    let before = snapshot(&out);
    let never =
        &mut |_: &BenchmarkConfig, _: &Dataset, _: &hifi_tuner::benchmark::Unit, _: Option<&_>, _: Option<&Path>| {
            panic!("no unit may run")
        };
    // a prompt's mask is missing
    let gt = w.join("ground_truth").join(&subject);
    std::fs::remove_file(gt.join("p01.mask.png")).unwrap();
    let e = format!("{:#}", run_with(&cfg, never).unwrap_err());
    eprintln!("{e}");
    assert!(e.contains(&gt.display().to_string()) && e.contains("p01.mask.png"), "{e}");
    assert_eq!(snapshot(&out), before);
    // no ground_truth/ at all
    std::fs::remove_dir_all(w.join("ground_truth")).unwrap();
    let e = format!("{:#}", run_with(&cfg, never).unwrap_err());
    eprintln!("{e}");
    assert!(e.contains(&w.join("ground_truth").display().to_string()) && e.contains("world dataset"), "{e}");
    assert_eq!(snapshot(&out), before);
}

/// Issue 19's reference rows: `copy` gives the subject's photos back (cycled, resized to the
/// generated size) and has the highest DINO of the rows; `base` generates the class-noun prompt
/// (no subject token) with the rows' seeds and learns nothing; the report shows both in italics.
#[test]
fn reference_rows_copy_the_photos_and_prompt_the_class_noun() {
    use hifi_tuner::benchmark::{class_prompt, copy_image};
    assert_eq!(class_prompt("a {0} {1} on the beach", "ball"), "a ball on the beach");
    assert_eq!(class_prompt("a red {0} {1}", "ball"), "a red ball");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    dataset(root);
    let out = root.join("run");
    let mut c = tiny_benchmark(root);
    c.args(["--subjects", "teapot", "--methods", "base,copy,ti", "--prompts", "2", "--images-per-prompt", "2"]);
    c.args(["--learn-steps", "2", "--steps", "4", "--device", "cpu", "--out"]).arg(&out);
    let s = ok(c.output().unwrap());
    assert_eq!(s["done"], serde_json::json!(["teapot/ti", "teapot/copy", "teapot/base"]), "{s}");
    let unit = |m: &str| out.join("units/teapot").join(m);
    let scores = |m: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(unit(m).join("scores.json")).unwrap()).unwrap()
    };
    let photos = hifi_tuner::eval::metrics::image_files(&root.join("dataset/teapot")).unwrap();
    assert_eq!(photos.len(), 3);
    let generated = hifi_tuner::io::open_image(&unit("ti").join("images/p00-0.png")).unwrap();
    let (w, h) = (generated.width(), generated.height());
    for (p, j) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        let name = format!("p{p:02}-{j}.png");
        // copy: photo (p·2 + j) mod 3, pixel-equal after the resize
        let got = hifi_tuner::io::open_image(&unit("copy").join("images").join(&name)).unwrap().to_rgb8();
        let photo = hifi_tuner::io::open_image(&photos[(p * 2 + j) % 3]).unwrap();
        let want = copy_image(&photo, w, h);
        assert_eq!((got.width(), got.height()), (w, h), "{name}: the generated size");
        assert!(got.as_raw() == &want.pixels, "{name}: copy must be the photo, resized");
        // base: the class-noun prompt, with the seed of the other rows
        let text = hifi_tuner::io::png_text(&unit("base").join("images").join(&name)).unwrap();
        let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
        let want_prompt = ["a teapot in the jungle", "a red teapot"][p];
        assert!(params.starts_with(&format!("{want_prompt}\n")), "{params}");
        assert!(params.contains(&format!("Seed: {},", p * 2 + j)) && params.contains("Method: base"), "{params}");
        assert!(!params.contains("<teapot>") && !params.contains("sks"), "{params}");
    }
    // a photo of the generated size is copied as it is
    let same = copy_image(&generated, w, h);
    assert!(same.pixels == generated.to_rgb8().into_raw());
    let pl = std::fs::read_to_string(unit("base").join("prompts.jsonl")).unwrap();
    assert!(pl.contains("a teapot in the jungle") && !pl.contains('<') && !pl.contains("sks"), "{pl}");
    for m in ["copy", "base"] {
        let sc = scores(m);
        assert!(sc["settings"]["learn"].is_null() && sc["seconds"]["learn"] == 0.0, "{m}: nothing is learned");
        assert!(!unit(m).join("subject").exists(), "{m}");
        assert_eq!(sc["n_generated"], 4);
    }
    // copy is the ceiling of DINO (and CLIP-I) on the fixture
    let dino = |m: &str| scores(m)["dino"].as_f64().unwrap();
    let clip_i = |m: &str| scores(m)["clip_i"].as_f64().unwrap();
    eprintln!("DINO: copy {} ti {} base {}", dino("copy"), dino("ti"), dino("base"));
    assert!(dino("copy") > dino("ti") && dino("copy") > dino("base"));
    assert!(clip_i("copy") > clip_i("ti") && clip_i("copy") > clip_i("base"));
    // the report: reference rows under the methods, in italics
    let (r, md) = report(&[&out], &out);
    assert_eq!(r["methods"]["copy"]["subjects"], 1);
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ti |") || l.starts_with("| *")).collect();
    assert!(rows.len() == 3 && rows[0].starts_with("| ti |") && rows[1].starts_with("| *copy* |"), "{md}");
    assert!(rows[2].starts_with("| *base* |") && md.contains("n=1"), "{md}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<i>copy</i> (reference)") && html.contains("<i>base</i> (reference)"));
}

/// A run folder of hand-written units (subject, method, dino, gt_rmse): no model.
fn fake_run(run: &Path, units: &[(&str, &str, f64, f64)]) {
    for (s, m, dino, rmse) in units {
        let d = run.join("units").join(s).join(m);
        std::fs::create_dir_all(&d).unwrap();
        let sc = serde_json::json!({"subject": s, "method": m, "class": "cube", "live": false, "guided": false,
            "dino": dino, "clip_i": null, "clip_t": null, "gt_rmse": rmse, "n_generated": 4, "n_real": 3,
            "images": [], "seconds": {}, "settings": {}});
        std::fs::write(d.join("scores.json"), sc.to_string()).unwrap();
    }
}

/// Issue 19 item 6: each method's mean has a 95 % bootstrap interval over subjects (fixed seed,
/// none for one subject), and each ablation step its paired difference with "k/n improved".
#[test]
fn bootstrap_intervals_and_paired_differences() {
    use hifi_tuner::benchmark::report::{bootstrap_mean, BOOTSTRAP_RESAMPLES};
    // the interval holds the mean, lies within the values, is reproducible; n=1 has none
    let v = [0.5, 0.6, 0.7, 0.9, 0.2];
    let i = bootstrap_mean(&v);
    let (lo, hi) = (i.lo.unwrap(), i.hi.unwrap());
    assert!((i.mean - 0.58).abs() < 1e-12 && i.n == 5);
    assert!(0.2 <= lo && lo < i.mean && i.mean < hi && hi <= 0.9, "{i:?}");
    assert_eq!(bootstrap_mean(&v), i, "a fixed seed");
    // the percentile interval of the mean of 5 values: about ±1.96·sd/√n (sd with 1/n)
    let sd = (v.iter().map(|x| (x - 0.58) * (x - 0.58)).sum::<f64>() / 5.0).sqrt() / 5f64.sqrt();
    // (plain arithmetic on a fixed ChaCha stream: no libtorch, the same on every machine)
    let rel = ((hi - lo) / 2.0 - 1.96 * sd).abs() / (1.96 * sd);
    eprintln!("bootstrap half-width {} vs normal {} (rel. {rel:.3})", (hi - lo) / 2.0, 1.96 * sd);
    assert!(rel < 0.25, "{rel}");
    assert_eq!(BOOTSTRAP_RESAMPLES, 10_000);
    let one = bootstrap_mean(&[0.4]);
    assert!(one.lo.is_none() && one.hi.is_none() && one.n == 1 && one.show(false).contains("n=1"));
    let flat = bootstrap_mean(&[0.3, 0.3, 0.3]);
    assert_eq!((flat.lo, flat.hi), (Some(0.3), Some(0.3)));

    // paired differences, by hand: ti → ti+mask over subjects a, b, c (d has ti only);
    // ti → hifi over a only
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    fake_run(
        &run,
        &[
            ("a", "ti", 0.50, 0.30),
            ("b", "ti", 0.60, 0.30),
            ("c", "ti", 0.70, 0.30),
            ("d", "ti", 0.10, 0.90),
            ("a", "ti+mask", 0.55, 0.20),
            ("b", "ti+mask", 0.58, 0.40),
            ("c", "ti+mask", 0.80, 0.25),
            ("a", "hifi", 0.90, 0.10),
        ],
    );
    let m = hifi_tuner::benchmark::report::collect(std::slice::from_ref(&run), false).unwrap();
    let step = |to: &str, key: &str| m.paired.iter().find(|d| d.from == "ti" && d.to == to && d.metric == key).unwrap();
    let d = step("ti+mask", "dino");
    // DINO differences 0.05, −0.02, 0.10: mean 0.04333, 2 of 3 higher
    assert!((d.diff.mean - 0.13 / 3.0).abs() < 1e-12 && d.diff.n == 3 && d.improved == 2, "{d:?}");
    assert!(d.diff.lo.unwrap() <= d.diff.mean && d.diff.mean <= d.diff.hi.unwrap());
    assert!(d.diff.lo.unwrap() >= -0.02 - 1e-12 && d.diff.hi.unwrap() <= 0.10 + 1e-12);
    // GT RMSE (lower is better) differences −0.10, +0.10, −0.05: 2 of 3 improved
    let r = step("ti+mask", "gt_rmse");
    assert!((r.diff.mean + 0.05 / 3.0).abs() < 1e-12 && r.improved == 2, "{r:?}");
    let h = step("hifi", "dino");
    assert!((h.diff.mean - 0.4).abs() < 1e-12 && h.diff.n == 1 && h.improved == 1 && h.diff.lo.is_none());
    // the method means: ti over its 4 subjects
    let ti = m.intervals["ti"]["dino"];
    assert!((ti.mean - 0.475).abs() < 1e-12 && ti.n == 4 && ti.lo.unwrap() < ti.mean);
    // shown in the Markdown, the HTML and results.json
    let out = tmp.path().join("rep");
    let md = hifi_tuner::benchmark::report::write(&[run], &out, false).unwrap();
    assert!(md.contains("| ti → ti+mask | DINO | +0.0433 [") && md.contains("| 2/3 |"), "{md}");
    assert!(md.contains("| ti → hifi | DINO | +0.4000 (n=1, no interval) | 1/1 |"), "{md}");
    assert!(md.contains("| hifi | 0.9000 (n=1, no interval) |"), "{md}");
    assert_eq!(std::fs::read_to_string(out.join("report.md")).unwrap(), md);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("id=\"paired\"") && html.contains("ti → ti+mask") && html.contains("2/3"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["intervals"]["ti"]["dino"]["n"], 4);
    assert!(json["paired"].as_array().unwrap().iter().any(|d| d["to"] == "hifi" && d["diff"]["lo"].is_null()));
}
