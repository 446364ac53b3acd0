//! The app's jobs: each one a run of this same binary's CLI (`learn`, `generate`, `mask`) in a
//! child process, one at a time, the rest queued. A job is a folder `DATA/jobs/ID/` holding
//! `job.json` (what was asked, the exact CLI arguments, the state), `log.txt` (the child's
//! stdout + stderr) and `out/` (what the CLI wrote, in the CLI's own layout: a subject folder,
//! PNGs). The state lives on disk, so a restarted server lists every job; one that was running
//! when the server went away is `interrupted`, and `resume` continues it from its checkpoint.
//!
//! Why child processes and not threads: a bad request or a crash in one job cannot take down the
//! server or another job, a cancel is a signal (the CLI's checkpoints are atomic), and a learning
//! run costs exactly what the CLI costs (the server only reads the run's log).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const JOB_FILE: &str = "job.json";
pub const LOG_FILE: &str = "log.txt";
pub const OUT_DIR: &str = "out";

/// A job's states as the API names them.
pub const STATES: [&str; 6] = ["queued", "running", "done", "failed", "cancelled", "interrupted"];

/// What `job.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: String,
    /// `masks`, `learn` or `generate`.
    pub kind: String,
    pub subject: Option<String>,
    /// generate: the learn job whose subject folder it uses.
    #[serde(default)]
    pub learned_job: Option<String>,
    /// The request as the API received it (after defaults).
    pub params: Value,
    /// The CLI arguments after the binary's name; paths inside the data folder.
    pub args: Vec<String>,
    pub state: String,
    /// Unix seconds.
    pub created: f64,
    #[serde(default)]
    pub started: Option<f64>,
    #[serde(default)]
    pub finished: Option<f64>,
    #[serde(default)]
    pub error: Option<String>,
    /// The steps of the whole run (learn), for the progress bar.
    #[serde(default)]
    pub total: Option<u64>,
}

pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The jobs of one data folder, the one worker that runs them, and the channel that tells
/// listeners (`/api/events`) about every change.
/// What runs after a job ends well (e.g. filing a masks job's masks into its subject).
pub type OnDone = Box<dyn Fn(&JobSpec) -> Result<()> + Send + Sync>;

pub struct Jobs {
    dir: PathBuf,
    exe: PathBuf,
    /// Serialises reads-modify-writes of `job.json` and the choice of ids.
    lock: Mutex<()>,
    running: Mutex<Option<(String, Child)>>,
    cancel_requested: Mutex<Option<String>>,
    wake: std::sync::Condvar,
    wake_flag: Mutex<bool>,
    pub events: tokio::sync::broadcast::Sender<String>,
    /// Called when a job ends well, to file what it made (masks into the subject).
    on_done: OnDone,
}

impl Jobs {
    /// Opens `DIR` (created if missing); a job left `running` by an earlier server becomes
    /// `interrupted`.
    pub fn open(dir: &Path, exe: PathBuf, on_done: OnDone) -> Result<Arc<Self>> {
        crate::io::create_dir_all(dir)?;
        let (events, _) = tokio::sync::broadcast::channel(256);
        let jobs = Arc::new(Self {
            dir: dir.to_path_buf(),
            exe,
            lock: Mutex::new(()),
            running: Mutex::new(None),
            cancel_requested: Mutex::new(None),
            wake: std::sync::Condvar::new(),
            wake_flag: Mutex::new(false),
            events,
            on_done,
        });
        for mut j in jobs.list()? {
            if j.state == "running" {
                j.state = "interrupted".into();
                j.error = Some("the server stopped while this job ran; resume continues it from its checkpoint".into());
                jobs.save(&j)?;
            }
        }
        Ok(jobs)
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Every job, oldest first.
    pub fn list(&self) -> Result<Vec<JobSpec>> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).with_context(|| format!("cannot read {}", self.dir.display()))?;
        for e in rd {
            let p = e?.path().join(JOB_FILE);
            if p.is_file() {
                out.push(read_spec(&p)?);
            }
        }
        out.sort_by(|a, b| a.created.total_cmp(&b.created).then_with(|| id_number(&a.id).cmp(&id_number(&b.id))));
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Result<Option<JobSpec>> {
        if !valid_id(id, 'j') {
            return Ok(None);
        }
        let p = self.job_dir(id).join(JOB_FILE);
        if !p.is_file() {
            return Ok(None);
        }
        read_spec(&p).map(Some)
    }

    pub fn save(&self, j: &JobSpec) -> Result<()> {
        let dir = self.job_dir(&j.id);
        crate::io::create_dir_all(&dir)?;
        crate::io::write_bytes_atomic(&dir.join(JOB_FILE), serde_json::to_string_pretty(j)?.as_bytes())?;
        let _ = self.events.send(self.view(j).to_string());
        Ok(())
    }

    /// Queues a new job; `args(out)` gives the CLI arguments for its output folder.
    pub fn submit(
        &self,
        kind: &str,
        subject: Option<&str>,
        learned_job: Option<&str>,
        params: Value,
        total: Option<u64>,
        args: impl FnOnce(&Path) -> Vec<String>,
    ) -> Result<JobSpec> {
        let _g = self.lock.lock().unwrap();
        let n = self.list()?.iter().map(|j| id_number(&j.id)).max().unwrap_or(0) + 1;
        let id = format!("j{n}");
        let out = self.job_dir(&id).join(OUT_DIR);
        let spec = JobSpec {
            id,
            kind: kind.into(),
            subject: subject.map(str::to_string),
            learned_job: learned_job.map(str::to_string),
            params,
            args: args(&out),
            state: "queued".into(),
            created: now(),
            started: None,
            finished: None,
            error: None,
            total,
        };
        self.save(&spec)?;
        self.poke();
        Ok(spec)
    }

    /// Cancels a queued job, or stops the running one (SIGTERM; its last checkpoint stays).
    pub fn cancel(&self, id: &str) -> Result<JobSpec> {
        let _g = self.lock.lock().unwrap();
        let Some(mut j) = self.get(id)? else { bail!("no job {id}") };
        match j.state.as_str() {
            "queued" => {
                j.state = "cancelled".into();
                j.finished = Some(now());
                self.save(&j)?;
            }
            "running" => {
                *self.cancel_requested.lock().unwrap() = Some(id.to_string());
                if let Some((rid, child)) = self.running.lock().unwrap().as_ref() {
                    if rid == id {
                        // SAFETY: kill(2) on our own child's pid.
                        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                    }
                }
            }
            s => bail!("job {id} is {s}: nothing to cancel"),
        }
        Ok(j)
    }

    /// Queues a stopped learn job again, continuing from its checkpoint when it has one; with
    /// `extra_steps` ("extend"), a learn job — finished too — continues to that many more steps
    /// (`learn --resume` with a larger `--steps`).
    pub fn resume(&self, id: &str, extra_steps: Option<u64>) -> Result<JobSpec> {
        let _g = self.lock.lock().unwrap();
        let Some(mut j) = self.get(id)? else { bail!("no job {id}") };
        if let Some(extra) = extra_steps {
            if j.kind != "learn" {
                bail!("job {id} is a {} job: only learning can be extended", j.kind);
            }
            if !["done", "cancelled", "interrupted", "failed"].contains(&j.state.as_str()) {
                bail!("job {id} is {}: wait for it to stop before extending it", j.state);
            }
            if !self.job_dir(id).join(OUT_DIR).join(crate::subject::job::CHECKPOINT_FILE).is_file() {
                bail!(
                    "job {id} keeps no checkpoint to extend (a finished DreamBooth or LoRA run keeps only its result): start a new run with more steps"
                );
            }
            let i = j.args.iter().position(|a| a == "--steps").context("a learn job without --steps")?;
            let steps: u64 = j.args[i + 1].parse().context("--steps")?;
            j.args[i + 1] = (steps + extra).to_string();
            j.total = j.total.map(|t| t + extra);
            if let Some(o) = j.params.as_object_mut() {
                o.insert("steps".into(), (steps + extra).into());
            }
        } else if !["cancelled", "interrupted", "failed"].contains(&j.state.as_str()) {
            bail!("job {id} is {}: only a cancelled, interrupted or failed job can be resumed", j.state);
        }
        if j.kind != "learn" {
            // the other kinds have no checkpoint: they run again from the start
            j.args.retain(|a| a != "--resume");
        } else {
            let has_ckpt = self.job_dir(id).join(OUT_DIR).join(crate::subject::job::CHECKPOINT_FILE).is_file();
            j.args.retain(|a| a != "--resume");
            if has_ckpt {
                j.args.push("--resume".into());
            } else {
                // nothing to continue from: start over in a clean folder
                let out = self.job_dir(id).join(OUT_DIR);
                if out.exists() {
                    std::fs::remove_dir_all(&out).with_context(|| format!("cannot clear {}", out.display()))?;
                }
            }
        }
        j.state = "queued".into();
        j.error = None;
        j.finished = None;
        self.save(&j)?;
        self.poke();
        Ok(j)
    }

    fn poke(&self) {
        *self.wake_flag.lock().unwrap() = true;
        self.wake.notify_all();
    }

    /// The worker: runs the oldest queued job to its end, forever. Call once, on its own thread.
    pub fn work(self: &Arc<Self>) {
        loop {
            let next = {
                let _g = self.lock.lock().unwrap();
                self.list().ok().and_then(|l| l.into_iter().find(|j| j.state == "queued"))
            };
            match next {
                Some(j) => self.run_one(j),
                None => {
                    let mut f = self.wake_flag.lock().unwrap();
                    if !*f {
                        f = self.wake.wait_timeout(f, Duration::from_millis(500)).unwrap().0;
                    }
                    *f = false;
                }
            }
        }
    }

    fn run_one(&self, mut j: JobSpec) {
        let dir = self.job_dir(&j.id);
        let started = (|| -> Result<Child> {
            let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(LOG_FILE))?;
            let mut cmd = Command::new(&self.exe);
            cmd.args(&j.args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
            // The child dies with the server (SIGKILL included): no orphan keeps writing into a
            // job the restarted server calls interrupted.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            Ok(cmd.spawn()?)
        })();
        {
            let _g = self.lock.lock().unwrap();
            j.started = Some(now());
            match started {
                Ok(child) => {
                    j.state = "running".into();
                    *self.running.lock().unwrap() = Some((j.id.clone(), child));
                }
                Err(e) => {
                    j.state = "failed".into();
                    j.error = Some(format!("cannot start {}: {e:#}", self.exe.display()));
                }
            }
            let _ = self.save(&j);
            if j.state == "failed" {
                return;
            }
        }
        let mut last_view = String::new();
        let status = loop {
            let st = self.running.lock().unwrap().as_mut().map(|(_, c)| c.try_wait());
            match st {
                Some(Ok(Some(s))) => break Some(s),
                Some(Ok(None)) => {}
                _ => break None,
            }
            let v = self.view(&j).to_string();
            if v != last_view {
                let _ = self.events.send(v.clone());
                last_view = v;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let _g = self.lock.lock().unwrap();
        *self.running.lock().unwrap() = None;
        let cancelled = self.cancel_requested.lock().unwrap().take().is_some_and(|c| c == j.id);
        j.finished = Some(now());
        if cancelled {
            j.state = "cancelled".into();
        } else if status.is_some_and(|s| s.success()) {
            j.state = "done".into();
            if let Err(e) = (self.on_done)(&j) {
                j.state = "failed".into();
                j.error = Some(format!("{e:#}"));
            }
        } else {
            j.state = "failed".into();
            j.error = Some(last_error(&dir.join(LOG_FILE)));
        }
        let _ = self.save(&j);
    }

    /// The job as the API shows it: the spec plus its progress read from the run's own files.
    pub fn view(&self, j: &JobSpec) -> Value {
        let dir = self.job_dir(&j.id);
        let out = dir.join(OUT_DIR);
        let url = |p: &Path| format!("/files/jobs/{}/{}", j.id, p.strip_prefix(&dir).unwrap_or(p).display());
        let log = read_train_log(&out.join(crate::subject::job::LOG_FILE));
        let loss: Vec<f64> = log.iter().map(|(_, l, _)| *l).collect();
        let step = log.last().map(|(g, _, _)| g + 1).unwrap_or(0);
        let total = j.total.unwrap_or(0);
        // s/it over the last few steps of this run (the log's clock restarts on resume)
        let spi = if log.len() >= 2 {
            let k = log.len().min(20);
            let tail = &log[log.len() - k..];
            let dt = tail[k - 1].2 - tail[0].2;
            (dt > 0.0).then(|| dt / (k - 1) as f64)
        } else {
            None
        };
        let eta = spi.map(|s| s * total.saturating_sub(step) as f64);
        let previews: Vec<Value> = pngs(&out.join("previews"))
            .into_iter()
            .map(|p| {
                let s = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.strip_prefix("step-"))
                    .and_then(|s| s.parse::<u64>().ok());
                json!({"step": s, "url": url(&p)})
            })
            .collect();
        let images: Vec<Value> = if j.kind == "generate" || j.kind == "replace" {
            pngs(&out).into_iter().map(|p| json!({"url": url(&p), "label": p.file_stem().map(|s| s.to_string_lossy().into_owned()), "params": j.params})).collect()
        } else {
            vec![]
        };
        let stages = stages(&out, &url);
        let loss_svg = out.join("loss.svg");
        json!({
            "id": j.id, "kind": j.kind, "subject": j.subject, "learned_job": j.learned_job, "state": j.state,
            "step": step, "total": total, "seconds_per_step": spi, "eta_seconds": eta, "loss": loss,
            "previews": previews, "images": images, "stages": stages,
            "loss_svg": loss_svg.is_file().then(|| url(&loss_svg)),
            "command": command_line(&j.args), "error": j.error, "warnings": warnings(&dir.join(LOG_FILE)), "created": j.created, "params": j.params,
        })
    }
}

/// The stages `--save-intermediates` wrote (OUT/NAME-intermediates/ of each image), in the
/// order the paper's figures show them; labelled "NAME: stage".
fn stages(out: &Path, url: &dyn Fn(&Path) -> String) -> Vec<Value> {
    const ORDER: [&str; 12] = [
        "M_g",
        "reference",
        "reference_aligned",
        "M_r_star",
        "I_g1",
        "I_g2",
        "source",
        "reconstruction",
        "result",
        "attention",
        "strip",
        "",
    ];
    let rank = |stem: &str| ORDER.iter().position(|o| !o.is_empty() && stem.starts_with(o)).unwrap_or(ORDER.len());
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with("-intermediates")))
        .collect();
    dirs.sort();
    let mut v = Vec::new();
    for d in dirs {
        let name = d.file_name().and_then(|n| n.to_str()).unwrap_or("").trim_end_matches("-intermediates").to_string();
        let mut files = pngs(&d);
        files.sort_by_key(|p| {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            (rank(&stem), stem)
        });
        for p in files {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            v.push(json!({"label": format!("{name}: {stem}"), "url": url(&p)}));
        }
    }
    v
}

/// The run's `warning: …` lines (e.g. reference guidance falling back to plain generation),
/// each once, at most 20.
fn warnings(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut v: Vec<String> = Vec::new();
    for w in text.lines().filter_map(|l| l.trim().strip_prefix("warning: ")) {
        if !v.iter().any(|x| x == w) && v.len() < 20 {
            v.push(w.to_string());
        }
    }
    v
}

fn read_spec(p: &Path) -> Result<JobSpec> {
    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a job file", p.display()))
}

/// `j12` → 12 (0 for anything else).
pub fn id_number(id: &str) -> u64 {
    id.get(1..).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// An id as this server makes them: the prefix and 1–9 digits (nothing a path could hide in).
pub fn valid_id(id: &str, prefix: char) -> bool {
    id.len() >= 2 && id.len() <= 10 && id.starts_with(prefix) && id[1..].bytes().all(|b| b.is_ascii_digit())
}

/// (global step, loss, seconds) of each line of a learn run's `train_log.jsonl`.
pub fn read_train_log(path: &Path) -> Vec<(u64, f64, f64)> {
    let Ok(text) = std::fs::read_to_string(path) else { return vec![] };
    let mut by_step = BTreeMap::new();
    for l in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(l) else { continue };
        if let (Some(g), Some(loss)) = (v["global_step"].as_u64(), v["loss"].as_f64()) {
            by_step.insert(g, (loss, v["seconds"].as_f64().unwrap_or(0.0)));
        }
    }
    by_step.into_iter().map(|(g, (l, s))| (g, l, s)).collect()
}

/// The PNG files directly in `dir`, by name.
pub fn pngs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return vec![] };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "png"))
        .collect();
    v.sort();
    v
}

/// The last lines of a failed run's log that say why (its `error:` line when it has one).
fn last_error(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.contains('\r')).collect();
    if let Some(i) = lines.iter().rposition(|l| l.starts_with("error") || l.starts_with("Error")) {
        return lines[i..].iter().take(6).copied().collect::<Vec<_>>().join("\n");
    }
    let n = lines.len();
    let tail = lines[n.saturating_sub(4)..].join("\n");
    if tail.is_empty() {
        "the run failed without a message".into()
    } else {
        tail
    }
}

/// The arguments as one shell line (single-quoted where needed), after `hifi-tuner`.
pub fn command_line(args: &[String]) -> String {
    let q = |a: &str| {
        if !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+".contains(&b)) {
            a.to_string()
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    };
    std::iter::once("hifi-tuner".to_string()).chain(args.iter().map(|a| q(a))).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_command_lines() {
        assert!(valid_id("j12", 'j'));
        for bad in ["j", "j1/..", "s1", "j-1", "j1234567890", "../j1"] {
            assert!(!valid_id(bad, 'j'), "{bad}");
        }
        assert_eq!(id_number("j12"), 12);
        let args: Vec<String> = ["learn", "--class-noun", "a dog's toy", "--steps", "5"].map(String::from).to_vec();
        assert_eq!(command_line(&args), r"hifi-tuner learn --class-noun 'a dog'\''s toy' --steps 5");
    }

    #[test]
    fn train_log_keeps_the_last_line_of_each_step() {
        let d = tempfile_dir();
        let p = d.join("train_log.jsonl");
        std::fs::write(
            &p,
            "{\"global_step\":0,\"loss\":1.0,\"seconds\":0.5}\n{\"global_step\":1,\"loss\":0.5,\"seconds\":1.0}\nnot json\n{\"global_step\":1,\"loss\":0.25,\"seconds\":2.0}\n",
        )
        .unwrap();
        assert_eq!(read_train_log(&p), vec![(0, 1.0, 0.5), (1, 0.25, 2.0)]);
        assert!(read_train_log(&d.join("missing")).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("hifi-serve-{}-{}", std::process::id(), now()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
