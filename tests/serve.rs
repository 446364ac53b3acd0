//! `hifi-tuner serve` through its HTTP API, as the page uses it: a server on 127.0.0.1 with an
//! ephemeral port, on the shipped world model (`assets/world-model`), with a held-out world
//! subject's photos and masks. Few steps everywhere: these check the plumbing (jobs, files,
//! states, refusals), not image quality, which the CLI's own tests cover.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world-model")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hifi-serve-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A world subject's photos and masks (`hifi-tuner world`, no samples: under a second).
fn world_subject(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    common::run_ok(common::bin().args(["world", "--out"]).arg(dir).args(["--samples", "0"]));
    let list = |d: PathBuf| {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        v
    };
    (list(dir.join("dataset/banded_ball")), list(dir.join("masks/banded_ball")))
}

/// A safetensors file's tensors as raw bytes by name (its metadata aside: paths differ).
fn tensors(p: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = common::read_tensors(p)
        .into_iter()
        .map(|(k, t)| {
            let t = t.contiguous();
            let mut b = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut b, t.numel());
            (k, b)
        })
        .collect();
    v.sort();
    v
}

struct Server {
    child: Child,
    url: String,
    token: Option<String>,
}

impl Server {
    fn start(data: &Path, extra: &[&str]) -> Server {
        Server::start_env(data, extra, &[])
    }

    fn start_env(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = common::bin()
            .envs(env.iter().copied())
            .args(["serve", "--data"])
            .arg(data)
            .arg("--model")
            .arg(model())
            .args(["--port", "0", "--device", "cpu"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("no address: {line:?}")).to_string();
        let url = url.replace("0.0.0.0", "127.0.0.1");
        Server { child, url, token: None }
    }

    fn req(&self, method: &str, path: &str) -> ureq::Request {
        let r = ureq::request(method, &format!("{}{}", self.url, path.trim_start_matches('/')));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    /// (status, JSON body) of any answer, 4xx included.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let r = self.req(method, path);
        let res = match body {
            Some(b) => r.send_json(b),
            None => r.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        (status, resp.into_json().unwrap_or(Value::Null))
    }

    fn multipart(&self, path: &str, fields: &[(&str, &str)], files: &[(&str, &str, Vec<u8>)]) -> (u16, Value) {
        let boundary = "hifiTestBoundary7MA4YWxkTrZu0gW";
        let mut body = Vec::new();
        for (k, v) in fields {
            write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n").unwrap();
        }
        for (field, name, bytes) in files {
            write!(
                body,
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .unwrap();
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        write!(body, "--{boundary}--\r\n").unwrap();
        let r = self.req("POST", path).set("Content-Type", &format!("multipart/form-data; boundary={boundary}"));
        let resp = match r.send_bytes(&body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("POST {path}: {e}"),
        };
        (resp.status(), resp.into_json().unwrap_or(Value::Null))
    }

    fn bytes(&self, path: &str) -> (u16, String, Vec<u8>) {
        let resp = match self.req("GET", path).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("GET {path}: {e}"),
        };
        let (status, ct) = (resp.status(), resp.content_type().to_string());
        let mut b = Vec::new();
        resp.into_reader().read_to_end(&mut b).unwrap();
        (status, ct, b)
    }

    /// Polls a job until it leaves queued / running.
    fn wait(&self, job: &str, limit: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let (s, j) = self.call("GET", &format!("/api/jobs/{job}"), None);
            assert_eq!(s, 200, "{j}");
            if !["queued", "running"].contains(&j["state"].as_str().unwrap()) {
                return j;
            }
            assert!(t0.elapsed() < limit, "job {job} still {} after {limit:?}: {j}", j["state"]);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn png(&self, url: &str) -> image::RgbImage {
        let (s, ct, b) = self.bytes(url);
        assert_eq!((s, ct.as_str()), (200, "image/png"), "{url}");
        image::load_from_memory(&b).unwrap_or_else(|e| panic!("{url}: {e}")).to_rgb8()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn files(field: &'static str, paths: &[PathBuf]) -> Vec<(&'static str, String, Vec<u8>)> {
    paths
        .iter()
        .map(|p| (field, p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(p).unwrap()))
        .collect()
}

fn create_subject(s: &Server, photos: &[PathBuf], masks: &[PathBuf]) -> String {
    let mut f = files("photos", photos);
    f.extend(files("masks", masks));
    let f: Vec<(&str, &str, Vec<u8>)> = f.iter().map(|(a, b, c)| (*a, b.as_str(), c.clone())).collect();
    let (st, v) = s.multipart("/api/subjects", &[("name", "banded ball"), ("class_noun", "ball")], &f);
    assert_eq!(st, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// The raw request line, as a browser would not normalise it (`..` kept).
fn raw_get(url: &str, path: &str) -> String {
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut r = String::new();
    c.read_to_string(&mut r).unwrap();
    r
}

/// The whole flow of the page: a subject (with refusals that store nothing), learning with
/// previews and a live loss, extend, plain and guided generation with stages, replacement,
/// the events stream, and the file server's refusals.
#[test]
fn the_app_learns_draws_and_replaces_through_its_api() {
    let root = tmp("flow");
    let (photos, masks) = world_subject(&root.join("world"));
    let data = root.join("data");
    let s = Server::start(&data, &[]);
    let (st, ct, page) = s.bytes("/");
    assert_eq!((st, ct.as_str()), (200, "text/html"));
    assert!(String::from_utf8_lossy(&page).contains("id=\"start-learn\""));

    // refused uploads keep nothing
    let mut bad = files("photos", &photos);
    bad[1].2 = b"hello, I am text".to_vec();
    bad[1].1 = "fake.png".into();
    let bad: Vec<(&str, &str, Vec<u8>)> = bad.iter().map(|(a, b, c)| (*a, b.as_str(), c.clone())).collect();
    let (st, v) = s.multipart("/api/subjects", &[("name", "x"), ("class_noun", "ball")], &bad);
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("fake.png"), "{v}");
    let few = files("photos", &photos[..2]);
    let few: Vec<(&str, &str, Vec<u8>)> = few.iter().map(|(a, b, c)| (*a, b.as_str(), c.clone())).collect();
    let (st, v) = s.multipart("/api/subjects", &[("name", "x"), ("class_noun", "ball")], &few);
    assert_eq!(st, 400, "{v}");
    assert_eq!(s.call("GET", "/api/subjects", None).1, json!([]));
    let kept: Vec<_> = std::fs::read_dir(data.join("subjects")).unwrap().collect();
    assert!(kept.is_empty(), "a refused upload left {kept:?}");

    let id = create_subject(&s, &photos, &masks);
    let (_, subj) = s.call("GET", &format!("/api/subjects/{id}"), None);
    assert_eq!(subj["photos"].as_array().unwrap().len(), 4, "{subj}");
    assert!(subj["photos"][0]["mask_url"].is_string(), "{subj}");
    assert_eq!(s.png(subj["photos"][0]["url"].as_str().unwrap()).dimensions(), (64, 64));

    // the events stream sees the next job's updates
    let (tx, rx) = std::sync::mpsc::channel();
    let events = s.req("GET", "/api/events").call().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(events.into_reader()).lines() {
            let line = line.unwrap_or_default();
            if let Some(d) = line.strip_prefix("data:") {
                let _ = tx.send(d.trim().to_string());
                return;
            }
        }
    });

    // learn: 40 steps of c_s + 6 step-wise phases (6 DDIM steps) of 1 step, previews every 20
    let (st, v) = s.call(
        "POST",
        &format!("/api/subjects/{id}/learn"),
        Some(json!({"mode": "hifi", "steps": 40, "stepwise_steps": 1, "ddim_steps": 6, "preview_every": 20})),
    );
    assert_eq!(st, 202, "{v}");
    let learn = v["job"].as_str().unwrap().to_string();
    // bad requests meanwhile are refused and touch nothing
    assert_eq!(s.call("POST", &format!("/api/subjects/{id}/learn"), Some(json!({"mode": "magic"}))).0, 400);
    assert_eq!(s.call("POST", "/api/subjects/s999/learn", Some(json!({}))).0, 404);
    assert_eq!(s.call("GET", "/api/jobs/j999", None).0, 404);
    assert_eq!(s.call("POST", "/api/generate", Some(json!({"subject": "s999"}))).0, 404);
    let (st, v) = s.call("POST", &format!("/api/subjects/{id}/masks/00/points"), Some(json!({"points": []})));
    assert!(st == 400 && v["error"].as_str().unwrap().contains("no --sam"), "{st} {v}");
    let ev: Value = serde_json::from_str(&rx.recv_timeout(Duration::from_secs(60)).expect("an SSE job event")).unwrap();
    assert_eq!(ev["id"], learn.as_str(), "{ev}");

    let j = s.wait(&learn, Duration::from_secs(300));
    assert_eq!(j["state"], "done", "{j}");
    assert_eq!((j["step"].as_u64(), j["total"].as_u64()), (Some(46), Some(46)), "{j}");
    assert_eq!(j["loss"].as_array().unwrap().len(), 46);
    let previews: Vec<&str> = j["previews"].as_array().unwrap().iter().map(|p| p["url"].as_str().unwrap()).collect();
    assert_eq!(previews.len(), 2, "steps 20, 40: {j}");
    s.png(previews[0]);
    let (st, ct, svg) = s.bytes(j["loss_svg"].as_str().unwrap());
    assert_eq!((st, ct.as_str()), (200, "image/svg+xml"));
    assert!(String::from_utf8_lossy(&svg).contains("<polyline"));
    assert!(j["command"].as_str().unwrap().starts_with("hifi-tuner learn --model"), "{j}");

    // extend by 2 steps of c_s: the step-wise phase runs again after them; the subject equals a
    // straight 42-step run's (the same process layout and threads: bit-equal by construction)
    let (st, v) = s.call("POST", &format!("/api/jobs/{learn}/resume"), Some(json!({"extra_steps": 2})));
    assert_eq!(st, 202, "{v}");
    let j = s.wait(&learn, Duration::from_secs(300));
    assert_eq!(j["state"], "done", "{j}");
    assert_eq!((j["step"].as_u64(), j["total"].as_u64()), (Some(48), Some(48)), "{j}");
    let straight = root.join("straight");
    common::run_ok(
        common::bin()
            .args(["learn", "--model"])
            .arg(model())
            .arg("--images")
            .arg(data.join(format!("subjects/{id}/photos")))
            .arg("--masks")
            .arg(data.join(format!("subjects/{id}/masks")))
            .args(["--class-noun", "ball", "--mode", "hifi", "--steps", "42", "--seed", "0", "--stepwise-steps", "1"])
            .args(["--ddim-steps", "6", "--device", "cpu", "--out"])
            .arg(&straight),
    );
    assert_eq!(
        tensors(&data.join(format!("jobs/{learn}/out/subject.safetensors"))),
        tensors(&straight.join("subject.safetensors")),
        "extended by 2 steps ≠ a straight 42-step run"
    );

    // plain and reference-guided, 6 DDIM steps each
    let gen = |rg: bool| {
        let body = json!({"subject": id, "prompt": "a photo of a ball on the beach", "seed": 1, "steps": 6,
            "guidance": 7.5, "reference_guidance": rg, "num_images": 1});
        let (st, v) = s.call("POST", "/api/generate", Some(body));
        assert_eq!(st, 202, "{v}");
        v["job"].as_str().unwrap().to_string()
    };
    let (plain, guided) = (gen(false), gen(true));
    let (jp, jg) = (s.wait(&plain, Duration::from_secs(300)), s.wait(&guided, Duration::from_secs(300)));
    assert_eq!((jp["state"].as_str(), jg["state"].as_str()), (Some("done"), Some("done")), "{jp}\n{jg}");
    let (a, b) = (s.png(jp["images"][0]["url"].as_str().unwrap()), s.png(jg["images"][0]["url"].as_str().unwrap()));
    assert_eq!(a.dimensions(), (64, 64));
    assert_ne!(a.as_raw(), b.as_raw(), "guidance changed nothing");
    assert!(jp["stages"].as_array().unwrap().is_empty());
    assert_eq!(jg["warnings"], json!([]), "the guided run fell back: {jg}");
    let labels: Vec<&str> = jg["stages"].as_array().unwrap().iter().map(|x| x["label"].as_str().unwrap()).collect();
    for want in ["M_g", "reference_aligned", "I_g1", "I_g2"] {
        assert!(labels.iter().any(|l| l.ends_with(&format!(": {want}"))), "no stage {want}: {labels:?}");
    }
    let first = |w: &str| labels.iter().position(|l| l.ends_with(w)).unwrap();
    assert!(first(": M_g") < first(": I_g1") && first(": I_g1") < first(": I_g2"), "{labels:?}");

    // replace: the subject put into a photo of the world (the ground truth of another scene)
    let photo = std::fs::read(root.join("world/ground_truth/banded_ball/p00.png")).unwrap();
    let (st, v) = s.multipart(
        "/api/replace",
        &[("subject", &id), ("caption", "a photo of a ball"), ("source_word", "cat")],
        &[("photo", "p.png", photo.clone())],
    );
    assert_eq!(st, 400, "a source word not in the caption: {v}");
    let (st, v) = s.multipart(
        "/api/replace",
        &[("subject", &id), ("caption", "a photo of a ball"), ("source_word", "ball"), ("steps", "4")],
        &[("photo", "p.png", photo)],
    );
    assert_eq!(st, 202, "{v}");
    let jr = s.wait(v["job"].as_str().unwrap(), Duration::from_secs(300));
    assert_eq!(jr["state"], "done", "{jr}");
    s.png(jr["images"][0]["url"].as_str().unwrap());
    assert!(jr["stages"].as_array().unwrap().iter().any(|x| x["label"] == "replaced: reconstruction"), "{jr}");

    // the subject lists its downloads; the file server stays inside --data
    let (_, subj) = s.call("GET", &format!("/api/subjects/{id}"), None);
    assert!(
        subj["downloads"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["url"].as_str().unwrap().ends_with("subject.safetensors")),
        "{subj}"
    );
    // the whole learned folder as one zip: the subject file and the photos, not the checkpoint
    let (st, ct, z) = s.bytes(&format!("/api/jobs/{learn}/download.zip"));
    assert_eq!((st, ct.as_str()), (200, "application/zip"));
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(z)).unwrap();
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    assert!(
        names.contains(&"subject.safetensors".to_string()) && names.contains(&"photos/00.png".to_string()),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.contains("checkpoint")), "{names:?}");
    let mut inner = Vec::new();
    zip.by_name("subject.safetensors").unwrap().read_to_end(&mut inner).unwrap();
    assert_eq!(inner, std::fs::read(data.join(format!("jobs/{learn}/out/subject.safetensors"))).unwrap());
    assert_eq!(s.call("GET", &format!("/api/jobs/{plain}/download.zip"), None).0, 409);
    for p in ["/files/../Cargo.toml", "/files/%2e%2e/Cargo.toml", "/files//etc/passwd", "/files/subjects"] {
        let r = raw_get(&s.url, p);
        assert!(
            r.starts_with("HTTP/1.1 404") || r.starts_with("HTTP/1.1 400"),
            "{p}: {}",
            r.lines().next().unwrap_or("")
        );
    }
    let (_, jobs) = s.call("GET", "/api/jobs", None);
    assert_eq!(jobs.as_array().unwrap().len(), 4, "learn, 2 generate, replace: {jobs}");
    drop(s);
    std::fs::remove_dir_all(&root).unwrap();
}

/// Masks: uploaded ones get overlays; with `--sam`, points clicked on a photo re-run SAM on it
/// (the `sam` command as a job) and its mask replaces that photo's. (`sam-tiny` has random
/// weights: this checks the plumbing, not the mask.)
#[test]
fn points_on_a_photo_rerun_sam_and_replace_its_mask() {
    let root = tmp("points");
    let (photos, masks) = world_subject(&root.join("world"));
    let data = root.join("data");
    let sam = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sam-tiny");
    let s = Server::start(&data, &["--sam", sam.to_str().unwrap()]);
    let id = create_subject(&s, &photos, &masks);
    let (_, subj) = s.call("GET", &format!("/api/subjects/{id}"), None);
    let overlay = s.png(subj["photos"][0]["overlay_url"].as_str().expect("an uploaded mask's overlay"));
    assert_eq!(overlay.dimensions(), (64, 64));
    let stem = subj["photos"][0]["stem"].as_str().unwrap().to_string();
    let url = format!("/api/subjects/{id}/masks/{stem}/points");
    for (bad, why) in [
        (json!({"points": []}), "1 to 16"),
        (json!({"points": [{"x": 70, "y": 3, "positive": true}]}), "outside the photo"),
        (json!({"points": [{"x": 7, "y": 3, "positive": false}]}), "at least one on the subject"),
    ] {
        let (st, v) = s.call("POST", &url, Some(bad));
        assert_eq!(st, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{v}");
    }
    assert_eq!(s.call("POST", &format!("/api/subjects/{id}/masks/nope/points"), Some(json!({"points": []}))).0, 404);
    let mask_path = data.join(format!("subjects/{id}/masks/{stem}.png"));
    let before = std::fs::read(&mask_path).unwrap();
    let body = json!({"points": [{"x": 32, "y": 30, "positive": true}, {"x": 3, "y": 60, "positive": false}]});
    let (st, v) = s.call("POST", &url, Some(body));
    assert_eq!(st, 202, "{v}");
    let j = s.wait(v["job"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(j["state"], "done", "{j}");
    assert!(j["command"].as_str().unwrap().contains("--point 32.0,30.0 --negative-point 3.0,60.0"), "{j}");
    let after = std::fs::read(&mask_path).unwrap();
    assert_ne!(before, after, "the mask was not replaced");
    let (_, subj) = s.call("GET", &format!("/api/subjects/{id}"), None);
    assert_eq!(subj["mask_source"], "sam", "{subj}");
    assert_ne!(s.png(subj["photos"][0]["overlay_url"].as_str().unwrap()).as_raw(), overlay.as_raw());
    drop(s);
    std::fs::remove_dir_all(&root).unwrap();
}

/// A server killed (SIGKILL) while a job runs: the restarted server lists it as interrupted,
/// and resume continues it from its checkpoint to the result a run without the kill gives.
#[test]
fn a_killed_server_resumes_its_interrupted_job() {
    let root = tmp("restart");
    let (photos, masks) = world_subject(&root.join("world"));
    let data = root.join("data");
    // slow steps (the CLI's test hook, inherited by the jobs) so that the kill lands mid-run
    let s = Server::start_env(&data, &[], &[("HIFI_TUNER_STEP_DELAY_MS", "150")]);
    let id = create_subject(&s, &photos, &masks);
    let body = json!({"mode": "ti", "steps": 30, "preview_every": 4});
    let (st, v) = s.call("POST", &format!("/api/subjects/{id}/learn"), Some(body));
    assert_eq!(st, 202, "{v}");
    let job = v["job"].as_str().unwrap().to_string();
    let ckpt = data.join(format!("jobs/{job}/out/checkpoint.safetensors"));
    let t0 = Instant::now();
    while !ckpt.exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut s = s;
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let s = Server::start(&data, &[]);
    let (_, j) = s.call("GET", &format!("/api/jobs/{job}"), None);
    assert_eq!(j["state"], "interrupted", "{j}");
    assert!(j["step"].as_u64().unwrap() < 30, "{j}");
    let (st, v) = s.call("POST", &format!("/api/jobs/{job}/resume"), Some(json!({})));
    assert_eq!(st, 202, "{v}");
    let j = s.wait(&job, Duration::from_secs(300));
    assert_eq!(j["state"], "done", "{j}");
    assert!(j["command"].as_str().unwrap().ends_with("--resume"), "{j}");
    assert_eq!(j["step"].as_u64(), Some(30), "{j}");
    // the result a run without the kill gives (same layout and threads: bit-equal by construction)
    let straight = root.join("straight");
    common::run_ok(
        common::bin()
            .args(["learn", "--model"])
            .arg(model())
            .arg("--images")
            .arg(data.join(format!("subjects/{id}/photos")))
            .arg("--masks")
            .arg(data.join(format!("subjects/{id}/masks")))
            .args(["--class-noun", "ball", "--mode", "ti", "--steps", "30", "--seed", "0", "--device", "cpu", "--out"])
            .arg(&straight),
    );
    assert_eq!(
        tensors(&data.join(format!("jobs/{job}/out/learned_embeds.safetensors"))),
        tensors(&straight.join("learned_embeds.safetensors")),
        "killed and resumed ≠ a straight run"
    );
    drop(s);
    std::fs::remove_dir_all(&root).unwrap();
}

/// Any host but loopback needs --token (refused before anything is written); with one, every
/// request carries it: Bearer, or ?token= on the page's load, which sets the cookie.
#[test]
fn a_network_host_needs_a_token_and_every_request_carries_it() {
    let root = tmp("token");
    let data = root.join("data");
    let o = common::bin().args(["serve", "--host", "0.0.0.0", "--port", "0", "--data"]).arg(&data).output().unwrap();
    common::assert_fails(&o, "--token");
    assert!(!data.exists(), "a refused start created {}", data.display());

    let token = "test-token-1234";
    let mut s = Server::start(&data, &["--host", "0.0.0.0", "--token", token]);
    let (st, v) = s.call("GET", "/api/config", None);
    assert_eq!(st, 401, "{v}");
    assert_eq!(s.bytes("/").0, 401);
    assert_eq!(s.bytes("/files/subjects").0, 401);
    let resp = ureq::get(&format!("{}?token={token}", s.url)).call().unwrap();
    let cookie = resp.header("set-cookie").unwrap().to_string();
    assert!(cookie.starts_with(&format!("hifi_token={token}")) && cookie.contains("HttpOnly"), "{cookie}");
    let kv = cookie.split(';').next().unwrap();
    assert_eq!(ureq::get(&format!("{}api/config", s.url)).set("Cookie", kv).call().unwrap().status(), 200);
    let wrong = ureq::get(&format!("{}api/config", s.url)).set("Authorization", "Bearer test-token-1235").call();
    assert!(matches!(wrong, Err(ureq::Error::Status(401, _))));
    s.token = Some(token.into());
    assert_eq!(s.call("GET", "/api/config", None).0, 200);
    drop(s);
    std::fs::remove_dir_all(&root).unwrap();
}
