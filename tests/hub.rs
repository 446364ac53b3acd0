//! `--model org/name[@revision]`: the Hugging Face cache, offline mode, and downloads from a mock
//! hub served on 127.0.0.1 by the test itself (tiny-b's files). Runs the binary so that the
//! `HF_*` variables are set per process.

mod common;

use common::{fixtures, model_dir};
use hifi_tuner::hub::{parse_hub_id, ModelSpec};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Every file of tiny-b, relative, plus files the loader must never fetch.
fn repo_files() -> Vec<(String, Vec<u8>)> {
    repo_files_of("tiny-b")
}

/// Every file of a fixture model folder (SD or SDXL), relative, plus files the loader must never
/// fetch.
fn repo_files_of(name: &str) -> Vec<(String, Vec<u8>)> {
    let root = model_dir(name);
    let mut out = Vec::new();
    for c in ["", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2"] {
        if !root.join(c).is_dir() {
            continue;
        }
        for e in std::fs::read_dir(root.join(c)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                let rel = p.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.push(("unet/diffusion_pytorch_model.bin".into(), b"pickle: never fetched".to_vec()));
    out.push(("v1-5-pruned.ckpt".into(), b"pickle: never fetched".to_vec()));
    out.push(("README.md".into(), b"# tiny".to_vec()));
    out.sort();
    out
}

/// A minimal hub: `/api/models/org/tiny/revision/main` and `/org/tiny/resolve/main/FILE` with
/// the headers `hf-hub` reads (etag, x-repo-commit, Content-Range). Returns the endpoint and the
/// log of requested paths.
fn mock_hub() -> (String, Arc<Mutex<Vec<String>>>) {
    mock_hub_of("tiny-b")
}

/// [`mock_hub`] serving the files of another fixture model as `org/tiny`.
fn mock_hub_of(name: &str) -> (String, Arc<Mutex<Vec<String>>>) {
    let files = repo_files_of(name);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range_start: Option<usize> = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                let lower = h.to_ascii_lowercase();
                if let Some(r) = lower.strip_prefix("range: bytes=") {
                    range_start = r.trim().split('-').next().and_then(|s| s.parse().ok());
                }
            }
            log2.lock().unwrap().push(path.clone());
            let (status, headers, body): (&str, Vec<String>, Vec<u8>) = if path == "/api/models/org/tiny/revision/main"
            {
                let siblings: Vec<String> = files.iter().map(|(f, _)| format!("{{\"rfilename\":\"{f}\"}}")).collect();
                let body = format!("{{\"sha\":\"{COMMIT}\",\"siblings\":[{}]}}", siblings.join(","));
                ("200 OK", vec!["Content-Type: application/json".into()], body.into_bytes())
            } else if let Some(f) = path.strip_prefix("/org/tiny/resolve/main/") {
                match files.iter().position(|(name, _)| name == f) {
                    Some(i) => {
                        let data = &files[i].1;
                        let start = range_start.unwrap_or(0).min(data.len());
                        // The metadata probe (`bytes=0-0`) also gets the whole rest: hf-hub only
                        // reads its headers.
                        let end = data.len();
                        let headers = vec![
                            format!("ETag: \"etag-{i:04}-{}\"", data.len()),
                            format!("X-Repo-Commit: {COMMIT}"),
                            format!("Content-Range: bytes {start}-{}/{}", end.saturating_sub(1), data.len()),
                        ];
                        ("206 Partial Content", headers, data[start..end].to_vec())
                    }
                    None => ("404 Not Found", vec![], b"not found".to_vec()),
                }
            } else {
                ("404 Not Found", vec![], b"not found".to_vec())
            };
            let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
            for h in headers {
                head.push_str(&h);
                head.push_str("\r\n");
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
            let _ = stream.flush();
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        }
    });
    (endpoint, log)
}

/// Runs the binary with a clean Hugging Face environment plus `env`.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
    c.args(args);
    for k in ["HF_HUB_CACHE", "HF_HOME", "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE"] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tiny_b_ids(text: &str) -> Vec<i64> {
    hifi_tuner::tokenizer::ClipTokenizer::from_dir(&model_dir("tiny-b/tokenizer")).unwrap().encode_padded(text).ids
}

/// A cache laid out as `huggingface_hub` writes it, holding tiny-b at `COMMIT` (refs/main).
fn fake_cache(root: &Path) -> PathBuf {
    let repo = root.join("models--org--tiny");
    let snap = repo.join("snapshots").join(COMMIT);
    for (f, data) in repo_files().into_iter().filter(|(f, _)| !f.ends_with(".bin") && !f.ends_with(".ckpt")) {
        let p = snap.join(&f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    snap
}

#[test]
fn hub_ids_parse() {
    assert_eq!(parse_hub_id("org/name"), Some(("org/name".into(), None)));
    assert_eq!(
        parse_hub_id("runwayml/stable-diffusion-v1-5@fp16"),
        Some(("runwayml/stable-diffusion-v1-5".into(), Some("fp16".into())))
    );
    for bad in ["name", "a/b/c", "/abs", "./x", "org/", "org/na me", "org/name@", "../x"] {
        assert_eq!(parse_hub_id(bad), None, "{bad}");
    }
    // An existing path wins over the id form.
    assert_eq!(ModelSpec::parse(&model_dir("tiny-b")).unwrap(), ModelSpec::Folder(model_dir("tiny-b")));
    let f = fixtures().join("single/tiny-b.safetensors");
    assert_eq!(ModelSpec::parse(&f).unwrap(), ModelSpec::SingleFile(f));
    assert_eq!(
        ModelSpec::parse(Path::new("org/tiny@v2")).unwrap(),
        ModelSpec::Hub { repo: "org/tiny".into(), revision: Some("v2".into()) }
    );
}

#[test]
fn offline_resolution_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hf/hub");
    fake_cache(&hub);
    let want = serde_json::to_string(&tiny_b_ids("wow!")).unwrap();
    // HF_HUB_CACHE, and HF_HOME/hub.
    let by_cache = [("HF_HUB_CACHE", hub.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let home = tmp.path().join("hf");
    let by_home = [("HF_HOME", home.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    for env in [&by_cache[..], &by_home[..]] {
        let o = run(&["tokenize", "--model", "org/tiny", "wow!"], env);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), want);
    }
    // A commit revision resolves without refs.
    let o = run(&["tokenize", "--model", &format!("org/tiny@{COMMIT}"), "wow!"], &by_cache);
    assert!(o.status.success(), "{}", stderr(&o));
    // generate from the cache = generate from the folder.
    let img = |model: &str, env: &[(&str, &str)], name: &str| {
        let out = tmp.path().join(name);
        let o = run(
            &[
                "generate",
                "--model",
                model,
                "--prompt",
                "a cube",
                "--steps",
                "2",
                "--device",
                "cpu",
                "--out",
                out.to_str().unwrap(),
            ],
            env,
        );
        assert!(o.status.success(), "{}", stderr(&o));
        // Pixels only: the PNG's parameters text names the model differently.
        image::open(out).unwrap().to_rgb8().into_raw()
    };
    let folder = model_dir("tiny-b");
    assert_eq!(img("org/tiny", &by_cache, "hub.png"), img(folder.to_str().unwrap(), &[], "folder.png"));
}

#[test]
fn offline_and_not_cached_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(
        &["tokenize", "--model", "org/absent", "x"],
        &[("HF_HUB_CACHE", tmp.path().to_str().unwrap()), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("org/absent") && e.contains("not in the Hugging Face cache") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    // A cached snapshot that lacks a weight file names it.
    let snap = fake_cache(tmp.path());
    std::fs::remove_file(snap.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let o = run(
        &["tokenize", "--model", "org/tiny", "x"],
        &[("HF_HUB_CACHE", tmp.path().to_str().unwrap()), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("vae/diffusion_pytorch_model.safetensors"), "{}", stderr(&o));
}

#[test]
fn downloads_only_what_the_loader_reads_from_a_mock_hub() {
    let (endpoint, log) = mock_hub();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_ENDPOINT", endpoint.as_str()), ("HF_TOKEN", "hf_test")];
    let o = run(&["tokenize", "--model", "org/tiny", "wow!"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), serde_json::to_string(&tiny_b_ids("wow!")).unwrap());
    let requested = log.lock().unwrap().clone();
    assert!(requested.iter().any(|p| p.starts_with("/api/models/org/tiny")), "{requested:?}");
    for never in [".bin", ".ckpt", "README.md"] {
        assert!(!requested.iter().any(|p| p.ends_with(never)), "fetched {never}: {requested:?}");
    }
    // The cache now holds exactly tiny-b's files, byte for byte, in huggingface_hub's layout.
    let snap = cache.join("models--org--tiny/snapshots").join(COMMIT);
    assert_eq!(std::fs::read_to_string(cache.join("models--org--tiny/refs/main")).unwrap().trim(), COMMIT);
    for (f, data) in repo_files() {
        let p = snap.join(&f);
        if f.ends_with(".bin") || f.ends_with(".ckpt") || f == "README.md" {
            assert!(!p.exists(), "{f} must not be downloaded");
        } else {
            assert_eq!(std::fs::read(&p).unwrap_or_else(|e| panic!("{f}: {e}")), data, "{f}");
        }
    }
    // Then offline, from the cache, with no request.
    let n = log.lock().unwrap().len();
    let offline = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let o = run(&["tokenize", "--model", "org/tiny", "wow!"], &offline);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(log.lock().unwrap().len(), n);
    // A repository the hub does not have: the error names it.
    let o = run(&["tokenize", "--model", "org/other", "x"], &env);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("org/other"), "{}", stderr(&o));
}

/// An SDXL repository: the second text encoder and tokenizer are fetched too (and nothing the
/// loader does not read), and the model draws from the cache.
#[test]
fn downloads_an_sdxl_repository_with_both_text_encoders() {
    let (endpoint, log) = mock_hub_of("tiny-xl");
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_ENDPOINT", endpoint.as_str())];
    let png = tmp.path().join("xl.png");
    let o = run(
        &[
            "generate",
            "--model",
            "org/tiny",
            "--prompt",
            "a backpack",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            png.to_str().unwrap(),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(png.is_file());
    let requested = log.lock().unwrap().clone();
    for f in [
        "text_encoder_2/model.safetensors",
        "text_encoder_2/config.json",
        "tokenizer_2/vocab.json",
        "tokenizer_2/merges.txt",
    ] {
        assert!(requested.iter().any(|p| p.ends_with(f)), "{f} not fetched: {requested:?}");
    }
    for never in [".bin", ".ckpt", "README.md"] {
        assert!(!requested.iter().any(|p| p.ends_with(never)), "fetched {never}: {requested:?}");
    }
    let snap = cache.join("models--org--tiny/snapshots").join(COMMIT);
    for (f, data) in repo_files_of("tiny-xl") {
        if !(f.ends_with(".bin") || f.ends_with(".ckpt") || f == "README.md") {
            assert_eq!(std::fs::read(snap.join(&f)).unwrap_or_else(|e| panic!("{f}: {e}")), data, "{f}");
        }
    }
    // A cached SDXL snapshot without tokenizer_2 is incomplete: offline, the error names it.
    std::fs::remove_dir_all(snap.join("tokenizer_2")).unwrap();
    let offline = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let o = run(&["tokenize", "--model", "org/tiny", "x"], &offline);
    assert!(!o.status.success() && stderr(&o).contains("tokenizer_2/vocab.json"), "{}", stderr(&o));
}
