//! `caption`, and `invert` / `replace` with `--captioner` instead of `--caption` (the tiny BLIP
//! of `scripts/make_blip_fixture.py`, the tiny SD model tiny-a).

mod common;

use common::*;
use hifi_tuner::caption::{CaptionOptions, Captioner};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

fn blip() -> PathBuf {
    fixtures().join("blip-tiny")
}

fn photo(i: usize) -> PathBuf {
    fixtures().join(format!("photos/dog/0{i}.jpg"))
}

fn lines(o: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn caption_prints_one_json_line_per_image_as_the_library_captions() {
    let c = Captioner::load(&blip(), Device::Cpu, Kind::Float).unwrap();
    let mut cmd = bin();
    cmd.args(["caption", "--device", "cpu", "--model"]).arg(blip()).arg(photo(0)).arg(photo(1));
    let o = cmd.output().unwrap();
    assert_ok(&o);
    let out = lines(&o);
    assert_eq!(out.len(), 2);
    for (i, l) in out.iter().enumerate() {
        assert_eq!(l["image"], photo(i).display().to_string());
        let want = c.caption_file(&photo(i), &CaptionOptions::default()).unwrap().text;
        assert_eq!(l["caption"], want);
    }
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("{\"image\": "), "image first");
    // beams, prefix and max length reach the decoder
    let opts = CaptionOptions { prefix: Some("a photography of".into()), beams: Some(3), max_length: Some(9) };
    let mut cmd = bin();
    cmd.args(["caption", "--device", "cpu", "--prefix", "a photography of", "--beams", "3", "--max-length", "9"]);
    cmd.arg("--model").arg(blip()).arg(photo(2));
    let o = cmd.output().unwrap();
    assert_ok(&o);
    let want = c.caption_file(&photo(2), &opts).unwrap();
    assert!(want.ids.len() <= 9 && want.text.starts_with("a photography of"), "{want:?}");
    assert_eq!(lines(&o)[0]["caption"], want.text);
}

#[test]
fn caption_refuses_bad_input_by_name_and_prints_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("fake.png");
    std::fs::write(&fake, "not a png").unwrap();
    let mut cmd = bin();
    cmd.args(["caption", "--device", "cpu", "--model"]).arg(blip()).arg(photo(0)).arg(&fake);
    let o = cmd.output().unwrap();
    assert_fails(&o, "fake.png");
    assert!(o.stdout.is_empty(), "nothing printed for the good image either");
    let mut cmd = bin();
    cmd.args(["caption", "--device", "cpu", "--model"]).arg(tmp.path().join("nope")).arg(photo(0));
    assert_fails(&cmd.output().unwrap(), "does not exist");
    // a hub id that is not cached, offline: refused by name
    let mut cmd = bin();
    cmd.env("HF_HUB_CACHE", tmp.path()).env("HF_HUB_OFFLINE", "1");
    cmd.args(["caption", "--device", "cpu", "--model", "Salesforce/blip-image-captioning-base"]).arg(photo(0));
    assert_fails(&cmd.output().unwrap(), "Salesforce/blip-image-captioning-base");
}

/// A hub id resolves from the Hugging Face cache (offline), as transformers finds it there.
#[test]
fn caption_reads_a_hub_id_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("models--Salesforce--blip-tiny");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in std::fs::read_dir(blip()).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, snap.join(p.file_name().unwrap())).unwrap();
    }
    let run = |model: &Path| {
        let mut cmd = bin();
        cmd.env("HF_HUB_CACHE", tmp.path()).env("HF_HUB_OFFLINE", "1");
        cmd.args(["caption", "--device", "cpu", "--model"]).arg(model).arg(photo(0));
        let o = cmd.output().unwrap();
        assert_ok(&o);
        lines(&o)[0]["caption"].clone()
    };
    assert_eq!(run(Path::new("Salesforce/blip-tiny")), run(&blip()));
}

fn inv_cmd(sub: &str, out: &Path) -> std::process::Command {
    let mut c = bin();
    c.args([sub, "--device", "cpu", "--steps", "3", "--inner-steps", "1", "--model"]).arg(model_dir("tiny-a"));
    c.arg("--image").arg(photo(0)).arg("--out").arg(out);
    c
}

#[test]
fn invert_captions_with_blip_and_stores_it() {
    let tmp = tempfile::tempdir().unwrap();
    let want = Captioner::load(&blip(), Device::Cpu, Kind::Float).unwrap();
    let want = want.caption_file(&photo(0), &CaptionOptions::default()).unwrap().text;
    let out = tmp.path().join("inv");
    let mut c = inv_cmd("invert", &out);
    c.arg("--captioner").arg(blip());
    let o = c.output().unwrap();
    assert_ok(&o);
    assert!(err(&o).contains(&format!("{want:?}")), "the caption is printed: {}", err(&o));
    let md = hifi_tuner::load::safetensors_metadata(&out.join("inversion.safetensors")).unwrap();
    assert_eq!(md["caption"], want);
    assert!(md["caption_source"].starts_with("blip "), "{md:?}");
    // with --caption nothing changes: no caption_source
    let typed = tmp.path().join("typed");
    let mut c = inv_cmd("invert", &typed);
    c.args(["--caption", &want]);
    assert_ok(&c.output().unwrap());
    let md2 = hifi_tuner::load::safetensors_metadata(&typed.join("inversion.safetensors")).unwrap();
    assert!(!md2.contains_key("caption_source"));
    assert_eq!(std::fs::read(out.join("source.png")).unwrap(), std::fs::read(typed.join("source.png")).unwrap());
    // neither, or both: refused before anything is written
    let none = tmp.path().join("none");
    assert_fails(&inv_cmd("invert", &none).output().unwrap(), "--captioner");
    let mut c = inv_cmd("invert", &none);
    c.args(["--caption", "a dog"]).arg("--captioner").arg(blip());
    assert_eq!(c.output().unwrap().status.code(), Some(2), "clap refuses both");
    assert!(!none.exists());
}

#[test]
fn replace_with_a_blip_caption_names_it_when_the_word_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let want = Captioner::load(&blip(), Device::Cpu, Kind::Float).unwrap();
    let caption = want.caption_file(&photo(0), &CaptionOptions::default()).unwrap().text;
    let out = tmp.path().join("r.png");
    let mut c = inv_cmd("replace", &out);
    c.args(["--source-word", "cat", "--target-word", "dog"]).arg("--captioner").arg(blip());
    let o = c.output().unwrap();
    assert_fails(&o, &format!("{caption:?}"));
    let e = err(&o);
    assert!(e.contains("--source-word") && e.contains("--caption") && e.contains("blip"), "{e}");
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none(), "nothing written");
    // a word of the caption works, and the inversion it saves is reused without any caption
    let word = caption.split_whitespace().next().unwrap().to_string();
    let mut c = inv_cmd("replace", &out);
    c.args(["--source-word", &word, "--target-word", "dog"]).arg("--captioner").arg(blip());
    assert_ok(&c.output().unwrap());
    let again = tmp.path().join("again.png");
    let mut c = inv_cmd("replace", &again);
    c.args(["--source-word", &word, "--target-word", "dog"]).arg("--inversion").arg(tmp.path().join("r-inversion"));
    let o = c.output().unwrap();
    assert_ok(&o);
    assert!(err(&o).contains("from the inversion"), "{}", err(&o));
    assert_eq!(png_rgb(&out), png_rgb(&again));
}
