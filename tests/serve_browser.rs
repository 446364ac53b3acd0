//! The web app in a real browser: Debian's headless Chromium driven through ChromeDriver's W3C
//! WebDriver protocol (plain JSON over HTTP; `ureq` is the client, no driver crate needed). A
//! user's path on the world model: photos and masks dropped in, learning watched (status,
//! loss curve, previews), the subject drawn plain and reference-guided side by side.
//!
//! Needs `chromium` and `chromium-driver` (`apt-get install chromium chromium-driver`; CI's
//! `.ci/run` installs them). Without them the test fails saying so; `HIFI_TUNER_NO_BROWSER=1`
//! skips it on purpose (and says so).
//! `HIFI_TUNER_SCREENSHOTS=DIR` keeps the screenshots (how docs/serve.png was made).

mod common;

use serde_json::{json, Value};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A WebDriver session.
struct Browser {
    base: String,
    _driver: Killed,
}

impl Browser {
    fn start(profile: &Path) -> Browser {
        let port = free_port();
        let driver = Killed(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}")),
        );
        let root = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        while ureq::get(&format!("{root}/status")).call().is_err() {
            assert!(t0.elapsed() < Duration::from_secs(30), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        // the flags the machine notes name: no sandbox as root, and no background networking
        // (this machine's network is closed; Chromium's own connections would be refused)
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,2400",
        ];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}});
        let v: Value =
            ureq::post(&format!("{root}/session")).send_json(caps).expect("a WebDriver session").into_json().unwrap();
        let id = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_string();
        Browser { base: format!("{root}/session/{id}"), _driver: driver }
    }

    fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{}", self.base, path);
        let r = if method == "GET" { ureq::get(&url).call() } else { ureq::request(method, &url).send_json(body) };
        match r {
            Ok(r) => r.into_json::<Value>().unwrap()["value"].clone(),
            Err(ureq::Error::Status(code, r)) => {
                panic!("{method} {path}: {code} {}", r.into_string().unwrap_or_default())
            }
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({"url": url}));
    }

    fn js(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", json!({"script": script, "args": []}))
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd("POST", "/element", json!({"using": "css selector", "value": css}));
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no {css}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/click"), json!({}));
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/clear"), json!({}));
        self.cmd("POST", &format!("/element/{e}/value"), json!({"text": text}));
    }

    /// Files into an `<input type=file multiple>`, as a user picking them does.
    fn files(&self, css: &str, paths: &[PathBuf]) {
        let e = self.find(css);
        let text = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join("\n");
        self.cmd("POST", &format!("/element/{e}/value"), json!({"text": text}));
    }

    /// Sets a field the page keeps folded away (`<details>`), as the user who unfolds it would.
    fn set_value(&self, css: &str, v: &str) {
        self.js(&format!(
            "const e = document.querySelector({css:?}); e.value = {v:?}; e.dispatchEvent(new Event('input', {{bubbles: true}})); e.dispatchEvent(new Event('change', {{bubbles: true}}));"
        ));
    }

    /// Waits until `script` (a JS expression) is truthy; fails with `what` and the page's error.
    fn wait(&self, what: &str, script: &str, limit: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.js(&format!("return ({script});"));
            if !(v.is_null() || v == json!(false) || v == json!(0) || v == json!("")) {
                return v;
            }
            if t0.elapsed() > limit {
                let err = self.js("return document.querySelector('#error').classList.contains('show') ? document.querySelector('#error-text').textContent : null;");
                self.screenshot(&format!("failed-{}", what.replace(' ', "-")));
                let status = self.js("return document.querySelector('main').innerText.slice(0, 3000);");
                panic!(
                    "{what}: not after {limit:?}; the page's error: {err}; the page says:\n{}",
                    status.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn screenshot(&self, name: &str) {
        let Ok(dir) = std::env::var("HIFI_TUNER_SCREENSHOTS") else { return };
        use base64::Engine;
        let b64 = self.cmd("GET", "/screenshot", json!({}));
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = ureq::delete(&self.base).call();
    }
}

#[test]
fn a_user_learns_and_draws_a_subject_in_chromium() {
    if std::env::var("HIFI_TUNER_NO_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED on purpose (HIFI_TUNER_NO_BROWSER=1): the web app was not tested in a browser");
        return;
    }
    for p in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(p).exists(),
            "{p} is missing: `apt-get install chromium chromium-driver` (or HIFI_TUNER_NO_BROWSER=1 to skip this test on purpose)"
        );
    }
    let root = std::env::temp_dir().join(format!("hifi-browser-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    common::run_ok(common::bin().args(["world", "--out"]).arg(root.join("world")).args(["--samples", "0"]));
    let list = |d: PathBuf| {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        v
    };
    let photos = list(root.join("world/dataset/banded_ball"));
    let masks = list(root.join("world/masks/banded_ball"));

    // a server on the data folder, with or without SAM; (the server, its address)
    let serve = |sam: bool| {
        let mut c = common::bin();
        c.args(["serve", "--data"]).arg(root.join("data")).arg("--model");
        c.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/world-model"));
        c.args(["--port", "0", "--device", "cpu"]);
        if sam {
            c.arg("--sam").arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sam-tiny"));
        }
        let mut server = c.stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
        (Killed(server), line.trim().strip_prefix("listening on ").unwrap().to_string())
    };
    let (server, url) = serve(true);

    let b = Browser::start(&root.join("profile"));
    b.goto(&url);
    b.wait("the page loads its config", "document.body.dataset.ready === '1'", Duration::from_secs(30));

    // 1 · subject: photos and masks picked, a name and a class noun
    b.type_into("#subject-name", "banded ball");
    b.type_into("#subject-class", "ball");
    b.files("#photo-input", &photos);
    b.files("#mask-input", &masks);
    b.click("#create-subject");
    b.wait(
        "the subject's photos with their masks",
        "document.querySelectorAll('#photo-grid img').length >= 4 && [...document.querySelectorAll('#photo-grid img')].every(i => i.complete && i.naturalWidth > 0)",
        Duration::from_secs(30),
    );
    b.screenshot("1-subject");

    // a point clicked on the first photo re-runs SAM there (sam-tiny: random weights, so only
    // the path is checked: the dot, the job, the new mask)
    b.click("#photo-grid figure .photo");
    b.wait(
        "a green dot where the click was",
        "document.querySelectorAll('#photo-grid .pt.pos').length === 1",
        Duration::from_secs(5),
    );
    b.click("#photo-grid figure .row button");
    b.wait(
        "the SAM job ends",
        "/Mask job done/.test(document.querySelector('#mask-status').textContent)",
        Duration::from_secs(60),
    );
    b.wait(
        "the subject's masks now say sam",
        "document.querySelector('#subject-title').textContent.includes('masks: sam')",
        Duration::from_secs(10),
    );
    // the user prefers their own mask after all: "replace mask" uploads it again
    b.files("#photo-grid figure input[type=file]", &masks[..1]);
    b.wait(
        "the uploaded mask is the photo's again",
        "document.querySelector('#subject-title').textContent.includes('masks: uploaded')",
        Duration::from_secs(10),
    );

    // the server restarts without SAM (sam-tiny's random masks would make reference guidance
    // fall back); the page, reloaded (on a new port: a new origin, nothing kept in the
    // browser), lists the subject the server kept, and the user picks it
    drop(server);
    let (_server, url) = serve(false);
    b.goto(&url);
    b.wait("the page loads again", "document.body.dataset.ready === '1'", Duration::from_secs(30));
    b.wait(
        "the subject listed",
        "[...document.querySelectorAll('#subject-select option')].some(o => o.value === 's1')",
        Duration::from_secs(30),
    );
    b.set_value("#subject-select", "s1");
    b.wait(
        "the same subject, selected again",
        "document.querySelector('#subject-title').textContent.startsWith('banded ball') && document.querySelectorAll('#photo-grid img').length >= 4",
        Duration::from_secs(30),
    );

    // 2 · learn (hifi: 40 steps of c_s, then 6 step-wise phases of 1 step; enough that the
    // guided run below finds a usable subject mask M_g instead of falling back), watching the status, the loss curve and the previews
    b.set_value("#learn-mode", "hifi");
    b.type_into("#learn-steps", "40");
    b.type_into("#learn-preview-every", "20");
    b.set_value("#learn-stepwise", "1");
    b.set_value("#learn-ddim", "6");
    b.click("#start-learn");
    b.wait(
        "the learn job shows its command",
        "document.querySelector('#learn-command').textContent.includes('hifi-tuner learn')",
        Duration::from_secs(30),
    );
    b.wait(
        "learning ends",
        "document.querySelector('#learn-status').textContent.includes(': done — step 46/46')",
        Duration::from_secs(300),
    );
    b.wait(
        "the loss curve",
        "Number(document.querySelector('#loss-curve').dataset.points) >= 46",
        Duration::from_secs(10),
    );
    b.wait(
        "the previews",
        "[...document.querySelectorAll('#previews img')].filter(i => i.complete && i.naturalWidth > 0).length >= 2",
        Duration::from_secs(20),
    );
    b.screenshot("2-learn");

    // 3 · generate: plain and reference-guided side by side, with the guided run's stages
    b.wait("a learned subject to draw", "document.querySelector('#gen-learned').value", Duration::from_secs(10));
    b.type_into("#gen-prompt", "a photo of a ball on the beach");
    b.type_into("#gen-steps", "6");
    b.click("#compare");
    b.wait(
        "two images, plain and guided",
        "[...document.querySelectorAll('#gen-results img')].filter(i => i.complete && i.naturalWidth > 0).length >= 2",
        Duration::from_secs(300),
    );
    b.wait(
        "the guided run's stages",
        "document.querySelectorAll('#gen-stages img').length >= 4",
        Duration::from_secs(20),
    );
    b.wait(
        "both runs shown as done",
        "document.querySelector('#gen-results').innerText.split('\\n').filter(l => l.trim() === 'done').length >= 2",
        Duration::from_secs(20),
    );
    let err = b.js("return document.querySelector('#error').classList.contains('show') ? document.querySelector('#error-text').textContent : null;");
    assert!(err.is_null(), "the page shows an error: {err}");
    b.js("document.querySelector('#sec-learn').scrollIntoView();");
    b.screenshot("3-generate");
    drop(b);
    std::fs::remove_dir_all(&root).unwrap();
}
