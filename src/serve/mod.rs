//! `hifi-tuner serve`: a local web app over the same steps as the CLI — photos in, masks checked,
//! learning watched live, the subject drawn plain and reference-guided. One page (HTML, CSS and
//! JS in one file embedded in the binary, no build step) and the JSON API it uses
//! (`docs/api.md`). Everything lives under `--data`, in the layouts the CLI writes: subjects in
//! [`subjects`], jobs (each one CLI run in a child process, one at a time) in [`jobs`].
//!
//! Safety: it binds 127.0.0.1 unless told otherwise, and any other host needs `--token` (then
//! every request carries it: `Authorization: Bearer T`, or the cookie the page's first load with
//! `?token=T` sets). No API takes a filesystem path: subjects and jobs are ids, and `/files/…`
//! serves only regular files inside the data folder (no `..`, no symlink out).
//!
//! Layer: above the algorithms (it runs them through the CLI), below `cli`.

pub mod jobs;
pub mod subjects;

use anyhow::{bail, Context, Result};
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jobs::Jobs;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use subjects::{Subjects, Upload};

/// The page: one file, embedded.
const PAGE: &str = include_str!("page.html");
const COOKIE: &str = "hifi_token";
/// The largest request body (6 photos and 6 masks of up to [`subjects::MAX_FILE_BYTES`] fit).
const MAX_BODY_BYTES: usize = 256 << 20;

/// `serve`'s settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data: PathBuf,
    pub model: PathBuf,
    pub sam: Option<PathBuf>,
    pub dino: Option<PathBuf>,
    pub host: String,
    pub port: u16,
    pub token: Option<String>,
    /// `--device` passed to every job.
    pub device: String,
    /// The binary the jobs run (this one).
    pub exe: PathBuf,
}

struct App {
    cfg: ServeConfig,
    data: PathBuf,
    subjects: Arc<Subjects>,
    jobs: Arc<Jobs>,
}

/// An API error: a status and `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, e.to_string())
}
fn internal(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}
fn not_found(what: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no {what}"))
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// Checks the settings before anything is bound or written: a host other than loopback needs a
/// token.
pub fn check_config(cfg: &ServeConfig) -> Result<()> {
    let loopback = matches!(cfg.host.as_str(), "127.0.0.1" | "localhost" | "::1");
    if !loopback && cfg.token.as_deref().is_none_or(str::is_empty) {
        bail!(
            "--host {} makes the app reachable from the network: give --token T (every request must then carry it), or keep the default --host 127.0.0.1",
            cfg.host
        );
    }
    if let Some(t) = &cfg.token {
        if t.len() < 8 || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            bail!("--token: at least 8 characters of letters, digits, '-', '_' or '.'");
        }
    }
    if !cfg.model.exists() && crate::hub::parse_hub_id(&cfg.model.to_string_lossy()).is_none() {
        bail!("--model {}: no such model folder or file (nor a Hugging Face id org/name)", cfg.model.display());
    }
    for (flag, p) in [("--sam", &cfg.sam), ("--dino", &cfg.dino)] {
        if let Some(p) = p {
            if !p.join("config.json").is_file() {
                bail!("{flag} {}: expected a transformers model folder with config.json", p.display());
            }
        }
    }
    Ok(())
}

/// Runs the server until SIGINT / SIGTERM. Prints `listening on http://HOST:PORT` (the port
/// chosen when `--port 0`) once it accepts connections.
pub fn run(cfg: ServeConfig) -> Result<()> {
    check_config(&cfg)?;
    crate::io::create_dir_all(&cfg.data)?;
    let data = cfg.data.canonicalize().with_context(|| format!("cannot open --data {}", cfg.data.display()))?;
    let _lock = crate::outdir::lock_dir(&data, "--data")?;
    let subjects = Arc::new(Subjects::open(&data)?);
    let (filing, jobs_dir) = (subjects.clone(), data.join("jobs"));
    let on_done = Box::new(move |j: &jobs::JobSpec| file_masks(&filing, &jobs_dir, j));
    let jobs = Jobs::open(&data.join("jobs"), cfg.exe.clone(), on_done)?;
    let worker = jobs.clone();
    std::thread::Builder::new().name("jobs".into()).spawn(move || worker.work())?;
    let app = Arc::new(App { cfg: cfg.clone(), data, subjects, jobs });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", cfg.host, cfg.port))?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}/");
        use std::io::Write;
        std::io::stdout().flush()?;
        axum::serve(listener, router(app)).with_graceful_shutdown(shutdown()).await?;
        anyhow::Ok(())
    })
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/config", get(config))
        .route("/api/subjects", get(list_subjects).post(create_subject))
        .route("/api/subjects/{id}", get(get_subject))
        .route("/api/subjects/{id}/masks", post(compute_masks))
        .route("/api/subjects/{id}/masks/{stem}", post(upload_mask))
        .route("/api/subjects/{id}/masks/{stem}/points", post(mask_from_points))
        .route("/api/subjects/{id}/learn", post(learn))
        .route("/api/generate", post(generate))
        .route("/api/replace", post(replace))
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/{id}", get(get_job))
        .route("/api/jobs/{id}/cancel", post(cancel_job))
        .route("/api/jobs/{id}/resume", post(resume_job))
        .route("/api/jobs/{id}/download.zip", get(download_zip))
        .route("/api/events", get(events))
        .route("/files/{*path}", get(file))
        .fallback(|| async { not_found("such page or API") })
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

/// Constant-time string comparison (the token).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn cookie_token(h: &HeaderMap) -> Option<String> {
    h.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == COOKIE).then(|| v.to_string())
    })
}

fn query_token(q: Option<&str>) -> Option<String> {
    q?.split('&').find_map(|kv| kv.strip_prefix("token=").map(str::to_string))
}

/// With `--token`: the request must carry it (header, cookie, or `?token=` on the page's load,
/// which then sets the cookie); else 401.
async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(token) = app.cfg.token.clone() else { return next.run(req).await };
    let h = req.headers();
    let bearer = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let from_query = query_token(req.uri().query());
    let ok = [bearer, cookie_token(h), from_query.clone()].iter().flatten().any(|t| same(t, &token));
    if !ok {
        return ApiError(StatusCode::UNAUTHORIZED, "not authorised: this server needs its token (open the page with ?token=…, or send Authorization: Bearer …)".into())
            .into_response();
    }
    let mut resp = next.run(req).await;
    if from_query.is_some() {
        let c = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
        if let Ok(v) = HeaderValue::from_str(&c) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
}

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], PAGE)
}

async fn config(State(app): State<Arc<App>>) -> Json<Value> {
    let model = app.cfg.model.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Json(json!({
        "modes": ["hifi", "ti", "dreambooth", "lora"],
        "sam": app.cfg.sam.is_some(), "dino": app.cfg.dino.is_some(), "model": model,
        "defaults": {"steps": 200, "preview_every": 50, "gen_steps": 50, "guidance": 7.5},
        "limits": {"min_photos": subjects::MIN_PHOTOS, "max_photos": subjects::MAX_PHOTOS, "max_file_bytes": subjects::MAX_FILE_BYTES},
    }))
}

/// A subject as the API shows it: its photos, masks, overlays and learn jobs.
fn subject_view(app: &App, s: &subjects::SubjectSpec) -> Result<Value> {
    let dir = app.subjects.subject_dir(&s.id);
    let url = |p: &Path| format!("/files/subjects/{}/{}", s.id, p.strip_prefix(&dir).unwrap_or(p).display());
    let photos: Vec<Value> = jobs::pngs(&dir.join("photos"))
        .into_iter()
        .map(|p| {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let m = dir.join("masks").join(format!("{stem}.png"));
            let o = dir.join("overlays").join(format!("{stem}.png"));
            json!({"stem": stem, "url": url(&p), "mask_url": m.is_file().then(|| url(&m)), "overlay_url": o.is_file().then(|| url(&o))})
        })
        .collect();
    let mut learned = Vec::new();
    let mut downloads = Vec::new();
    for j in app.jobs.list()?.into_iter().rev().filter(|j| j.kind == "learn" && j.subject.as_deref() == Some(&s.id)) {
        let out = app.jobs.job_dir(&j.id).join(jobs::OUT_DIR);
        let mode = j.params["mode"].as_str().unwrap_or("").to_string();
        learned.push(
            json!({"job": j.id, "mode": mode, "state": j.state, "out_url": format!("/files/jobs/{}/out/", j.id)}),
        );
        if j.state == "done" {
            for f in ["subject.safetensors", "learned_embeds.safetensors", "pytorch_lora_weights.safetensors"] {
                if out.join(f).is_file() {
                    downloads.push(
                        json!({"label": format!("{} ({mode})", f), "url": format!("/files/jobs/{}/out/{f}", j.id)}),
                    );
                }
            }
            downloads.push(json!({"label": format!("the whole folder, zip ({mode})"), "url": format!("/api/jobs/{}/download.zip", j.id)}));
            for p in std::fs::read_dir(out.join("a1111")).into_iter().flatten().flatten() {
                let n = p.file_name().to_string_lossy().into_owned();
                downloads.push(json!({"label": format!("a1111/{n} ({mode})"), "url": format!("/files/jobs/{}/out/a1111/{n}", j.id)}));
            }
        }
    }
    Ok(json!({
        "id": s.id, "name": s.name, "class_noun": s.class_noun, "photos": photos,
        "mask_source": s.mask_source, "mask_warning": s.mask_warning, "learned": learned, "downloads": downloads,
    }))
}

async fn list_subjects(State(app): State<Arc<App>>) -> ApiResult<Json<Value>> {
    let v = app.subjects.list().map_err(internal)?;
    Ok(Json(Value::Array(v.iter().map(|s| subject_view(&app, s)).collect::<Result<_>>().map_err(internal)?)))
}

fn subject_or_404(app: &App, id: &str) -> ApiResult<subjects::SubjectSpec> {
    app.subjects.get(id).map_err(internal)?.ok_or_else(|| not_found(&format!("subject {id}")))
}

async fn get_subject(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> ApiResult<Json<Value>> {
    let s = subject_or_404(&app, &id)?;
    Ok(Json(subject_view(&app, &s).map_err(internal)?))
}

/// Reads a multipart form: its text fields and its files (by field name).
async fn read_form(mut m: Multipart) -> ApiResult<(std::collections::HashMap<String, String>, Vec<(String, Upload)>)> {
    let mut fields = std::collections::HashMap::new();
    let mut files = Vec::new();
    while let Some(f) = m.next_field().await.map_err(|e| bad(format!("a malformed upload: {e}")))? {
        let name = f.name().unwrap_or("").to_string();
        match f.file_name().map(str::to_string) {
            Some(file_name) => {
                if files.len() >= 2 * subjects::MAX_PHOTOS + 2 {
                    return Err(bad(format!(
                        "too many files: at most {} photos and as many masks",
                        subjects::MAX_PHOTOS
                    )));
                }
                let bytes = f.bytes().await.map_err(|e| bad(format!("{file_name:?}: the upload broke off ({e})")))?;
                files.push((name, Upload { file_name, bytes: bytes.to_vec() }));
            }
            None => {
                let text = f.text().await.map_err(|e| bad(format!("field {name}: {e}")))?;
                fields.insert(name, text);
            }
        }
    }
    Ok((fields, files))
}

async fn create_subject(State(app): State<Arc<App>>, m: Multipart) -> ApiResult<impl IntoResponse> {
    let (fields, files) = read_form(m).await?;
    let (mut photos, mut masks) = (Vec::new(), Vec::new());
    for (field, u) in files {
        match field.as_str() {
            "photos" => photos.push(u),
            "masks" => masks.push(u),
            other => return Err(bad(format!("unexpected file field {other:?} (photos, masks)"))),
        }
    }
    let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or("");
    let s = tokio::task::block_in_place(|| app.subjects.create(get("name"), get("class_noun"), &photos, &masks))
        .map_err(bad)?;
    Ok((StatusCode::CREATED, Json(json!({"id": s.id}))))
}

async fn upload_mask(
    State(app): State<Arc<App>>,
    UrlPath((id, stem)): UrlPath<(String, String)>,
    m: Multipart,
) -> ApiResult<Json<Value>> {
    let s = subject_or_404(&app, &id)?;
    let (_, files) = read_form(m).await?;
    let mut files = files;
    if files.len() != 1 {
        return Err(bad("send one file, field `mask`"));
    }
    let (_, u) = files.pop().expect("one file");
    tokio::task::block_in_place(|| app.subjects.set_mask(&s.id, &stem, &u)).map_err(bad)?;
    let s = subject_or_404(&app, &id)?;
    Ok(Json(subject_view(&app, &s).map_err(internal)?))
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

async fn compute_masks(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> ApiResult<impl IntoResponse> {
    let s = subject_or_404(&app, &id)?;
    let photos = jobs::pngs(&app.subjects.subject_dir(&id).join("photos"));
    let mut args =
        vec!["mask".into(), "--model".into(), p(&app.cfg.model), "--class-noun".into(), s.class_noun.clone()];
    if let Some(sam) = &app.cfg.sam {
        args.extend(["--sam".into(), p(sam)]);
    }
    args.extend(["--device".into(), app.cfg.device.clone()]);
    let spec = app
        .jobs
        .submit("masks", Some(&id), None, json!({}), None, |out| {
            args.extend(["--out".into(), p(out)]);
            args.extend(photos.iter().map(|x| p(x)));
            args
        })
        .map_err(internal)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"job": spec.id}))))
}

/// SAM on one photo with the points a user clicked (`{"points": [{"x", "y", "positive"}]}`, in
/// the photo's pixels): a `sam` job whose mask replaces the photo's. Needs `--sam`.
async fn mask_from_points(
    State(app): State<Arc<App>>,
    UrlPath((id, stem)): UrlPath<(String, String)>,
    Json(v): Json<Value>,
) -> ApiResult<impl IntoResponse> {
    subject_or_404(&app, &id)?;
    let sam = app.cfg.sam.clone().ok_or_else(|| bad("this server has no --sam: upload a mask instead"))?;
    let photo = app.subjects.subject_dir(&id).join("photos").join(format!("{stem}.png"));
    if subjects::clean_stem(&format!("{stem}.png")).is_err() || !photo.is_file() {
        return Err(not_found(&format!("photo {stem} of subject {id}")));
    }
    let (w, h) = image::image_dimensions(&photo).map_err(|e| internal(e.into()))?;
    let points = v.get("points").and_then(Value::as_array).ok_or_else(|| bad("points: a list of {x, y, positive}"))?;
    if points.is_empty() || points.len() > 16 {
        return Err(bad("points: 1 to 16 points"));
    }
    let mut args: Vec<String> = vec!["sam".into(), "--model".into(), p(&sam), "--image".into(), p(&photo)];
    for pt in points {
        let x: f64 = num(pt, "x", f64::NAN)?;
        let y: f64 = num(pt, "y", f64::NAN)?;
        if !(x >= 0.0 && y >= 0.0 && x < f64::from(w) && y < f64::from(h)) {
            return Err(bad(format!("point ({x}, {y}) is outside the photo ({w}×{h})")));
        }
        let positive = pt.get("positive").and_then(Value::as_bool).unwrap_or(true);
        let flag = if positive { "--point" } else { "--negative-point" };
        args.extend([flag.into(), format!("{x:.1},{y:.1}")]);
    }
    if !points.iter().any(|pt| pt.get("positive").and_then(Value::as_bool).unwrap_or(true)) {
        return Err(bad("points: at least one on the subject (positive)"));
    }
    args.extend(["--device".into(), app.cfg.device.clone()]);
    let params = json!({"stem": stem, "points": points});
    let spec = app
        .jobs
        .submit("sam", Some(&id), None, params, None, |out| {
            args.extend(["--out".into(), p(&out.join(format!("{stem}.png")))]);
            args
        })
        .map_err(internal)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"job": spec.id}))))
}

/// After a masks job: its STEM.png go to the subject's masks/, STEM.overlay.png to overlays/;
/// after a `sam` (points) job, its one mask replaces that photo's.
fn file_masks(subjects: &Subjects, jobs_dir: &Path, j: &jobs::JobSpec) -> Result<()> {
    if j.kind == "sam" {
        let id = j.subject.as_deref().context("a sam job without a subject")?;
        let stem = j.params["stem"].as_str().context("a sam job without a stem")?;
        let sdir = subjects.subject_dir(id);
        let made = jobs_dir.join(&j.id).join(jobs::OUT_DIR).join(format!("{stem}.png"));
        let dest = sdir.join("masks").join(format!("{stem}.png"));
        crate::io::create_dir_all(dest.parent().unwrap())?;
        crate::io::write_bytes_atomic(
            &dest,
            &std::fs::read(&made).with_context(|| format!("cannot read {}", made.display()))?,
        )?;
        subjects::write_overlay(&sdir, stem)?;
        let mut s = subjects.get(id)?.with_context(|| format!("subject {id} vanished"))?;
        s.mask_source = Some("sam".into());
        return subjects.save(&s);
    }
    if j.kind != "masks" {
        return Ok(());
    }
    let id = j.subject.as_deref().context("a masks job without a subject")?;
    let sdir = subjects.subject_dir(id);
    let out = jobs_dir.join(&j.id).join(jobs::OUT_DIR);
    for f in jobs::pngs(&out) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let dest = match name.strip_suffix(".overlay.png") {
            Some(stem) => sdir.join("overlays").join(format!("{stem}.png")),
            None => sdir.join("masks").join(&name),
        };
        crate::io::create_dir_all(dest.parent().unwrap())?;
        crate::io::write_bytes_atomic(&dest, &std::fs::read(&f)?)?;
    }
    let mut s = subjects.get(id)?.with_context(|| format!("subject {id} vanished"))?;
    let sam = j.args.iter().any(|a| a == "--sam");
    s.mask_source = Some(if sam { "sam" } else { "attention" }.into());
    s.mask_warning = (!sam).then(|| {
        "coarse masks: the thresholded attention map (the server has no --sam); check them, or upload your own"
            .to_string()
    });
    subjects.save(&s)
}

fn num<T: serde::de::DeserializeOwned>(v: &Value, key: &str, default: T) -> ApiResult<T> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => serde_json::from_value(x.clone()).map_err(|_| bad(format!("{key}: expected a number, got {x}"))),
    }
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(key: &str, x: T, lo: T, hi: T) -> ApiResult<T> {
    if x < lo || x > hi {
        return Err(bad(format!("{key}: {x} is outside {lo}..={hi}")));
    }
    Ok(x)
}

async fn learn(
    State(app): State<Arc<App>>,
    UrlPath(id): UrlPath<String>,
    body: Option<Json<Value>>,
) -> ApiResult<impl IntoResponse> {
    let s = subject_or_404(&app, &id)?;
    let v = body.map(|b| b.0).unwrap_or(json!({}));
    let mode = v.get("mode").and_then(Value::as_str).unwrap_or("hifi").to_string();
    if !["hifi", "ti", "dreambooth", "lora"].contains(&mode.as_str()) {
        return Err(bad(format!("mode: hifi, ti, dreambooth or lora, got {mode:?}")));
    }
    let steps = in_range("steps", num(&v, "steps", 200u64)?, 1, 100_000)?;
    let preview_every = in_range("preview_every", num(&v, "preview_every", 50u64)?, 0, 100_000)?;
    let seed = num(&v, "seed", 0u64)?;
    let lr: Option<f64> = num(&v, "lr", None)?;
    if let Some(lr) = lr {
        if !(lr.is_finite() && lr > 0.0 && lr < 1.0) {
            return Err(bad(format!("lr: a positive number below 1, got {lr}")));
        }
    }
    let stepwise = in_range("stepwise_steps", num(&v, "stepwise_steps", 10u64)?, 0, 1000)?;
    let ddim = in_range("ddim_steps", num(&v, "ddim_steps", 50u64)?, 1, 1000)?;
    let sdir = app.subjects.subject_dir(&id);
    let masks = sdir.join("masks");
    let has_masks = masks.is_dir() && jobs::pngs(&masks).len() == jobs::pngs(&sdir.join("photos")).len();
    let mut args: Vec<String> =
        vec!["learn".into(), "--model".into(), p(&app.cfg.model), "--images".into(), p(&sdir.join("photos"))];
    if has_masks {
        args.extend(["--masks".into(), p(&masks)]);
    }
    args.extend(["--class-noun".into(), s.class_noun.clone(), "--mode".into(), mode.clone()]);
    args.extend(["--steps".into(), steps.to_string(), "--seed".into(), seed.to_string()]);
    if let Some(lr) = lr {
        args.extend(["--lr".into(), lr.to_string()]);
    }
    let mut total = steps;
    if mode == "hifi" {
        args.extend(["--stepwise-steps".into(), stepwise.to_string(), "--ddim-steps".into(), ddim.to_string()]);
        total += stepwise * ddim;
    }
    let every = if preview_every > 0 { preview_every } else { steps.min(100) };
    args.extend(["--checkpoint-every".into(), every.to_string()]);
    if preview_every > 0 {
        args.extend(["--preview-every".into(), preview_every.to_string()]);
    }
    args.extend(["--device".into(), app.cfg.device.clone()]);
    let params = json!({"mode": mode, "steps": steps, "preview_every": preview_every, "seed": seed, "lr": lr,
        "stepwise_steps": stepwise, "ddim_steps": ddim, "masked": has_masks});
    let spec = app
        .jobs
        .submit("learn", Some(&id), None, params, Some(total), |out| {
            args.extend(["--out".into(), p(out)]);
            args
        })
        .map_err(internal)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"job": spec.id}))))
}

async fn generate(State(app): State<Arc<App>>, Json(v): Json<Value>) -> ApiResult<impl IntoResponse> {
    let sid = v.get("subject").and_then(Value::as_str).ok_or_else(|| bad("subject: the subject's id"))?.to_string();
    let s = subject_or_404(&app, &sid)?;
    let learned = learned_job(&app, &sid, v.get("learned_job").and_then(Value::as_str))?;
    let mode = learned.params["mode"].as_str().unwrap_or("hifi");
    let default_prompt = match mode {
        "dreambooth" | "lora" => format!("a sks {} on the beach", s.class_noun),
        "ti" => "a photo of a <subject> on the beach".to_string(),
        _ => format!("a photo of a {} on the beach", s.class_noun),
    };
    let prompt = v
        .get("prompt")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .unwrap_or(&default_prompt)
        .to_string();
    if prompt.len() > 500 {
        return Err(bad("prompt: at most 500 characters"));
    }
    let seed = num(&v, "seed", 0u64)?;
    let steps = in_range("steps", num(&v, "steps", 50u64)?, 1, 1000)?;
    let guidance = in_range("guidance", num(&v, "guidance", 7.5f64)?, 0.0, 50.0)?;
    let n = in_range("num_images", num(&v, "num_images", 1u64)?, 1, 8)?;
    let rg = v.get("reference_guidance").and_then(Value::as_bool).unwrap_or(false);
    let subject_out = app.jobs.job_dir(&learned.id).join(jobs::OUT_DIR);
    let mut args: Vec<String> =
        vec!["generate".into(), "--model".into(), p(&app.cfg.model), "--subject".into(), p(&subject_out)];
    args.extend([
        "--prompt".into(),
        prompt.clone(),
        "--seed".into(),
        seed.to_string(),
        "--steps".into(),
        steps.to_string(),
    ]);
    args.extend(["--guidance".into(), guidance.to_string(), "--num-images".into(), n.to_string()]);
    if rg {
        args.extend(["--reference-guidance".into(), "--save-intermediates".into()]);
        // the CLI's t_s = 40, t_e = 10 of 50 DDIM steps, at the same fractions of fewer steps
        let t_start = (steps * 4 / 5).max(1);
        let t_end = (steps / 5).clamp(1, t_start);
        args.extend(["--t-start".into(), t_start.to_string(), "--t-end".into(), t_end.to_string()]);
        if let Some(d) = &app.cfg.dino {
            args.extend(["--dino".into(), p(d)]);
        }
        if let Some(sam) = &app.cfg.sam {
            args.extend(["--sam".into(), p(sam)]);
        }
    }
    args.extend(["--device".into(), app.cfg.device.clone()]);
    let params = json!({"prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance, "num_images": n,
        "reference_guidance": rg, "mode": mode});
    let learned_id = learned.id.clone();
    let spec = app
        .jobs
        .submit("generate", Some(&sid), Some(&learned_id), params, None, |out| {
            args.extend(["--out".into(), p(out)]);
            args
        })
        .map_err(internal)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"job": spec.id}))))
}

/// The finished learn job of `sid` named by `learned_job`, or its newest one.
fn learned_job(app: &App, sid: &str, named: Option<&str>) -> ApiResult<jobs::JobSpec> {
    let all = app.jobs.list().map_err(internal)?;
    let learned = match named {
        Some(j) => all.iter().find(|x| x.id == j).ok_or_else(|| not_found(&format!("job {j}")))?,
        None => all
            .iter()
            .rev()
            .find(|x| x.kind == "learn" && x.subject.as_deref() == Some(sid) && x.state == "done")
            .ok_or_else(|| bad(format!("subject {sid} has no finished learn job yet")))?,
    };
    if learned.kind != "learn" || learned.subject.as_deref() != Some(sid) || learned.state != "done" {
        return Err(bad(format!("learned_job {}: not a finished learn job of subject {sid}", learned.id)));
    }
    Ok(learned.clone())
}

/// Algorithm 3 on an uploaded photo (multipart: `subject`, optional `learned_job`, file
/// `photo`, `caption`, `source_word`, optional `steps`): the photo is decoded and kept under
/// DATA/uploads/ (named by its SHA-256), then `replace … --save-intermediates` runs as a job.
async fn replace(State(app): State<Arc<App>>, m: Multipart) -> ApiResult<impl IntoResponse> {
    let (fields, files) = read_form(m).await?;
    let get = |k: &str| fields.get(k).map(|x| x.trim()).filter(|x| !x.is_empty());
    let sid = get("subject").ok_or_else(|| bad("subject: the subject's id"))?.to_string();
    subject_or_404(&app, &sid)?;
    let learned = learned_job(&app, &sid, get("learned_job"))?;
    let caption = get("caption")
        .ok_or_else(|| bad("caption: a caption of the photo, e.g. \"a photo of a cat on a sofa\""))?
        .to_string();
    let word = get("source_word").ok_or_else(|| bad("source_word: the word of the caption to replace"))?.to_string();
    if caption.len() > 300 {
        return Err(bad("caption: at most 300 characters"));
    }
    let words: Vec<String> = caption.split(|c: char| !c.is_alphanumeric()).map(str::to_lowercase).collect();
    if !words.contains(&word.to_lowercase()) {
        return Err(bad(format!("source_word {word:?} is not a word of the caption {caption:?}")));
    }
    let steps = in_range(
        "steps",
        get("steps").map(str::parse::<u64>).transpose().map_err(|_| bad("steps: a number"))?.unwrap_or(50),
        2,
        1000,
    )?;
    let mut files = files;
    if files.len() != 1 || files[0].0 != "photo" {
        return Err(bad("send one file, field `photo`"));
    }
    let (_, u) = files.pop().expect("one file");
    let img = subjects::decode(&u, "photo").map_err(bad)?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).map_err(|e| internal(e.into()))?;
    let hash: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&png).iter().map(|b| format!("{b:02x}")).collect()
    };
    let photo = app.data.join("uploads").join(format!("{}.png", &hash[..16]));
    if !photo.is_file() {
        tokio::task::block_in_place(|| {
            crate::io::create_dir_all(photo.parent().unwrap()).and_then(|_| crate::io::write_bytes_atomic(&photo, &png))
        })
        .map_err(internal)?;
    }
    let subject_out = app.jobs.job_dir(&learned.id).join(jobs::OUT_DIR);
    let mut args: Vec<String> =
        vec!["replace".into(), "--model".into(), p(&app.cfg.model), "--subject".into(), p(&subject_out)];
    args.extend([
        "--image".into(),
        p(&photo),
        "--caption".into(),
        caption.clone(),
        "--source-word".into(),
        word.clone(),
    ]);
    args.extend([
        "--steps".into(),
        steps.to_string(),
        "--save-intermediates".into(),
        "--device".into(),
        app.cfg.device.clone(),
    ]);
    let params = json!({"caption": caption, "source_word": word, "steps": steps, "photo": u.file_name, "mode": learned.params["mode"]});
    let spec = app
        .jobs
        .submit("replace", Some(&sid), Some(&learned.id), params, None, |out| {
            args.extend(["--out".into(), p(&out.join("replaced.png"))]);
            args
        })
        .map_err(internal)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"job": spec.id}))))
}

async fn list_jobs(State(app): State<Arc<App>>) -> ApiResult<Json<Value>> {
    let l = app.jobs.list().map_err(internal)?;
    Ok(Json(Value::Array(l.iter().rev().map(|j| app.jobs.view(j)).collect())))
}

fn job_or_404(app: &App, id: &str) -> ApiResult<jobs::JobSpec> {
    app.jobs.get(id).map_err(internal)?.ok_or_else(|| not_found(&format!("job {id}")))
}

async fn get_job(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> ApiResult<Json<Value>> {
    let j = job_or_404(&app, &id)?;
    Ok(Json(app.jobs.view(&j)))
}

async fn cancel_job(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> ApiResult<Json<Value>> {
    job_or_404(&app, &id)?;
    let j = app.jobs.cancel(&id).map_err(|e| ApiError(StatusCode::CONFLICT, e.to_string()))?;
    Ok(Json(app.jobs.view(&j)))
}

async fn resume_job(
    State(app): State<Arc<App>>,
    UrlPath(id): UrlPath<String>,
    body: Option<Json<Value>>,
) -> ApiResult<impl IntoResponse> {
    job_or_404(&app, &id)?;
    let v = body.map(|b| b.0).unwrap_or(json!({}));
    let extra: Option<u64> = num(&v, "extra_steps", None)?;
    if let Some(x) = extra {
        in_range("extra_steps", x, 1, 100_000)?;
    }
    let j = app.jobs.resume(&id, extra).map_err(|e| ApiError(StatusCode::CONFLICT, e.to_string()))?;
    Ok((StatusCode::ACCEPTED, Json(app.jobs.view(&j))))
}

async fn events(
    State(app): State<Arc<App>>,
) -> Sse<impl tokio_stream::Stream<Item = std::result::Result<Event, std::convert::Infallible>>> {
    use tokio_stream::StreamExt;
    let rx = tokio_stream::wrappers::BroadcastStream::new(app.jobs.events.subscribe());
    let s = rx.filter_map(|m| m.ok()).map(|data| Ok(Event::default().event("job").data(data)));
    Sse::new(s).keep_alive(KeepAlive::default())
}

/// A regular file inside the data folder, or 404: the path may not climb out (`..`, absolute,
/// or a symlink whose target lies outside).
pub fn resolve_inside(root: &Path, rel: &str) -> Option<PathBuf> {
    let rel_path = Path::new(rel);
    if rel.is_empty()
        || rel_path.is_absolute()
        || rel_path.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    let full = root.join(rel_path).canonicalize().ok()?;
    (full.starts_with(root) && full.is_file()).then_some(full)
}

async fn file(State(app): State<Arc<App>>, UrlPath(path): UrlPath<String>) -> ApiResult<Response> {
    let full = resolve_inside(&app.data, &path).ok_or_else(|| not_found(&format!("file {path}")))?;
    let ct = match full.extension().and_then(|e| e.to_str()) {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        Some("jsonl" | "txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    let mut r = stream_file(&full, ct).await?;
    if ct == "application/octet-stream" {
        let name = full.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
            r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
    }
    Ok(r)
}

/// A file as a streamed response (not read into memory).
async fn stream_file(path: &Path, content_type: &'static str) -> ApiResult<Response> {
    let f = tokio::fs::File::open(path).await.map_err(|e| internal(e.into()))?;
    let len = f.metadata().await.map_err(|e| internal(e.into()))?.len();
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(f));
    Ok(([(header::CONTENT_TYPE, content_type.to_string()), (header::CONTENT_LENGTH, len.to_string())], body)
        .into_response())
}

/// A finished learn job's folder as one zip (`jobs/ID/download.zip`, made once, atomically):
/// the learned files (subject / TI / LoRA / A1111 files, a DreamBooth run's diffusers `model/`),
/// its photos, masks, previews and log; not the checkpoint, the lock or DreamBooth's class images.
async fn download_zip(State(app): State<Arc<App>>, UrlPath(id): UrlPath<String>) -> ApiResult<Response> {
    let j = job_or_404(&app, &id)?;
    if j.kind != "learn" || j.state != "done" {
        return Err(ApiError(StatusCode::CONFLICT, format!("job {id} is not a finished learn job")));
    }
    let zip_path = app.jobs.job_dir(&id).join("download.zip");
    let out = app.jobs.job_dir(&id).join(jobs::OUT_DIR);
    // made after the job last finished (an extended job finishes again)
    let made = zip_path.metadata().and_then(|z| z.modified()).ok();
    let made = made.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64());
    let fresh = matches!((made, j.finished), (Some(m), Some(f)) if m >= f);
    if !fresh {
        let (zp, o) = (zip_path.clone(), out.clone());
        tokio::task::spawn_blocking(move || write_zip(&o, &zp))
            .await
            .map_err(|e| internal(anyhow::anyhow!("{e}")))?
            .map_err(internal)?;
    }
    let mut r = stream_file(&zip_path, "application/zip").await?;
    let name = format!(
        "{}-{}-{id}.zip",
        j.subject.as_deref().unwrap_or("subject"),
        j.params["mode"].as_str().unwrap_or("learn")
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

/// Zips `dir` (stored entries, relative names) into `dest` through a temp file.
pub fn write_zip(dir: &Path, dest: &Path) -> Result<()> {
    use std::io::Write;
    const SKIP: [&str; 3] =
        [crate::subject::job::CHECKPOINT_FILE, crate::outdir::LOCK_FILE, crate::dreambooth::job::CLASS_DIR];
    let tmp = dest.with_extension("zip.tmp");
    let mut z =
        zip::ZipWriter::new(std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?);
    let opts = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored).large_file(true);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&d)?.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if SKIP.contains(&name.as_str()) || name.ends_with(".tmp") {
                continue;
            }
            let meta = std::fs::symlink_metadata(&p)?;
            let rel = p.strip_prefix(dir).unwrap_or(&p).to_string_lossy().replace('\\', "/");
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                z.start_file(rel, opts)?;
                std::io::copy(&mut std::fs::File::open(&p)?, &mut z)?;
            }
        }
    }
    z.finish()?.flush()?;
    std::fs::rename(&tmp, dest).with_context(|| format!("cannot write {}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(host: &str, token: Option<&str>) -> ServeConfig {
        ServeConfig {
            data: "/tmp/x".into(),
            model: ".".into(),
            sam: None,
            dino: None,
            host: host.into(),
            port: 0,
            token: token.map(str::to_string),
            device: "cpu".into(),
            exe: "x".into(),
        }
    }

    #[test]
    fn a_network_host_needs_a_token() {
        assert!(check_config(&cfg("127.0.0.1", None)).is_ok());
        let e = check_config(&cfg("0.0.0.0", None)).unwrap_err().to_string();
        assert!(e.contains("--token"), "{e}");
        assert!(check_config(&cfg("0.0.0.0", Some("s3cret-token"))).is_ok());
        assert!(check_config(&cfg("0.0.0.0", Some("short"))).is_err());
    }

    #[test]
    fn files_stay_inside_the_data_folder() {
        let root = std::env::temp_dir().join(format!("hifi-serve-files-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("a/x.png"), b"x").unwrap();
        let outside = std::env::temp_dir().join(format!("hifi-serve-outside-{}", std::process::id()));
        std::fs::write(&outside, b"secret").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/link.png")).unwrap();
        let root = root.canonicalize().unwrap();
        assert!(resolve_inside(&root, "a/x.png").is_some());
        for bad in ["../x", "a/../a/x.png", "/etc/passwd", "a/link.png", "a", "", "a/missing.png"] {
            assert!(resolve_inside(&root, bad).is_none(), "{bad}");
        }
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_file(&outside).unwrap();
    }

    #[test]
    fn tokens_from_cookie_and_query() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=b; hifi_token=abc12345"));
        assert_eq!(cookie_token(&h).as_deref(), Some("abc12345"));
        assert_eq!(query_token(Some("x=1&token=zz")).as_deref(), Some("zz"));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
