//! The output folders of the jobs (`learn` in every mode, `train-base`, each benchmark unit):
//! the exclusive lock a run holds on its folder, and the comparison of the settings a folder
//! was made with against a new run's.
//!
//! # The lock
//!
//! [`lock_dir`] takes an `flock(2)` exclusive lock on `DIR/.hifi-tuner.lock` (never waiting)
//! and writes who holds it there: pid, host, command line and start time. A second run into the
//! same folder is refused with those details. The kernel drops the lock when its process ends,
//! however it ends, so the file a killed run leaves behind blocks nobody; a run that ends
//! normally removes it. Within one process the lock is re-entrant (the `learn` command locks
//! its `--out` before computing masks into it, then the job locks it again).
//!
//! On a file system without `flock` (some network mounts without a lock daemon) the run goes
//! on unlocked, with a warning.

use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The lock file [`lock_dir`] keeps in the folder it locks.
pub const LOCK_FILE: &str = ".hifi-tuner.lock";

/// Lock files this process holds (re-entrance).
static HELD: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// An exclusive lock on an output folder (or any lock file), held until dropped.
#[derive(Debug)]
pub struct Lock {
    /// None for a nested lock of a file this process already holds, or when locking is
    /// unsupported there.
    held: Option<(File, PathBuf)>,
    /// Folders [`lock_dir`] created (deepest first), removed on drop when left empty.
    created: Vec<PathBuf>,
}

impl Lock {
    /// The lock file, when this guard holds it.
    pub fn path(&self) -> Option<&Path> {
        self.held.as_ref().map(|(_, p)| p.as_path())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some((file, path)) = self.held.take() {
            if let Ok(mut g) = HELD.lock() {
                if let Some(set) = g.as_mut() {
                    set.remove(&path);
                }
            }
            // Unlink first, then close (which releases the lock): a run that opened the old file
            // meanwhile sees, once it gets the lock, that the path no longer names it and retries.
            let _ = std::fs::remove_file(&path);
            drop(file);
        }
        for d in &self.created {
            let _ = std::fs::remove_dir(d); // only when empty
        }
    }
}

/// Locks the output folder `dir` (created if missing; removed again on drop if the run left it
/// empty). `what` names the input in the error, e.g. `"--out"`.
pub fn lock_dir(dir: &Path, what: &str) -> Result<Lock> {
    let mut created = Vec::new();
    let mut p = dir.to_path_buf();
    while !p.as_os_str().is_empty() && !p.exists() {
        created.push(p.clone());
        p = match p.parent() {
            Some(q) => q.to_path_buf(),
            None => break,
        };
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{what}: cannot create the folder {}", dir.display()))?;
    let mut lock = lock_file(&dir.join(LOCK_FILE), &format!("{what} {}", dir.display()))?;
    lock.created = created;
    Ok(lock)
}

/// Locks `path` (created if missing, in an existing folder); `what` describes what it guards
/// in the error ("--out out/", "benchmark unit dog/ti").
pub fn lock_file(path: &Path, what: &str) -> Result<Lock> {
    let key = match (path.parent(), path.file_name()) {
        (Some(d), Some(n)) => {
            let d = if d.as_os_str().is_empty() { Path::new(".") } else { d };
            d.canonicalize().with_context(|| format!("{what}: cannot resolve {}", d.display()))?.join(n)
        }
        _ => bail!("{what}: {} is not a file path", path.display()),
    };
    {
        let mut g = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if g.get_or_insert_with(HashSet::new).contains(&key) {
            return Ok(Lock { held: None, created: vec![] });
        }
    }
    loop {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("{what}: cannot create the lock file {}", path.display()))?;
        match flock_exclusive(&file) {
            Ok(true) => {}
            Ok(false) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                bail!(
                    "{what} is in use by another run: {}; wait for it to end or choose another folder (lock file {})",
                    describe_holder(&text),
                    path.display()
                );
            }
            Err(e) => {
                eprintln!("warning: cannot lock {} ({e}); make sure no other run writes into {what}", path.display());
                return Ok(Lock { held: None, created: vec![] });
            }
        }
        // The holder may have removed the file between our open and our lock: then the path
        // names another file (or none), and the lock must be taken on that one.
        if !same_file(&file, path) {
            continue;
        }
        let info = holder_info();
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(info.to_string().as_bytes())?;
        file.flush()?;
        HELD.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashSet::new).insert(key.clone());
        return Ok(Lock { held: Some((file, key)), created: vec![] });
    }
}

/// Ok(true) when locked, Ok(false) when another open file holds the lock.
#[cfg(unix)]
fn flock_exclusive(f: &File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    loop {
        // SAFETY: a valid open file descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(c) if c == libc::EWOULDBLOCK || c == libc::EAGAIN => return Ok(false),
            _ => return Err(e),
        }
    }
}

#[cfg(not(unix))]
fn flock_exclusive(_f: &File) -> std::io::Result<bool> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "file locks are implemented for Unix only"))
}

#[cfg(unix)]
fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_f: &File, path: &Path) -> bool {
    path.exists()
}

/// What the lock file records: pid, host, command line, start time (UTC).
fn holder_info() -> serde_json::Value {
    let command: Vec<String> = std::env::args().collect();
    serde_json::json!({
        "pid": std::process::id(),
        "host": hostname(),
        "command": command.join(" "),
        "started": utc_now(),
    })
}

/// "pid 123 on host h, started 2025-01-02 03:04:05 UTC: hifi-tuner learn …", from the lock
/// file's text.
fn describe_holder(text: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return "another process (it has not written its details yet)".into();
    };
    let s = |k: &str| v[k].as_str().map(str::to_string).unwrap_or_else(|| v[k].to_string());
    format!("pid {} on host {}, started {}: {}", s("pid"), s("host"), s("started"), s("command"))
}

#[cfg(unix)]
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates (we stop at the first NUL or the end).
    if unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } != 0 {
        return "?".into();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[cfg(not(unix))]
fn hostname() -> String {
    std::env::var("COMPUTERNAME").unwrap_or_else(|_| "?".into())
}

/// The current time as "YYYY-MM-DD hh:mm:ss UTC".
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // civil_from_days (H. Hinnant): days since 1970-01-01 → (y, m, d)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The start of a training run (`train-base`, `train-encoders`) in `out`, whose arguments are
/// `identity`, kept in `args_path`: with `resume` the saved arguments must equal them (else an
/// error naming the changed ones); without, `out` must be absent or empty (a lock file aside).
pub fn check_run_start(
    out: &Path,
    args_path: &Path,
    identity: &serde_json::Value,
    resume: bool,
    command: &str,
) -> Result<()> {
    if resume {
        let text = std::fs::read_to_string(args_path).with_context(|| {
            format!("--resume: {} is not a {command} run (no {})", out.display(), args_path.display())
        })?;
        let saved: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("--resume: cannot parse {}", args_path.display()))?;
        if &saved != identity {
            bail!(
                "--resume with other arguments than {} holds ({}); use the same flags",
                args_path.display(),
                changed_settings(&saved, identity).join(", ")
            );
        }
    } else if std::fs::read_dir(out)
        .map(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name() != LOCK_FILE))
        .unwrap_or(false)
    {
        bail!("--out {} already exists and is not empty (pass --resume to continue a run there)", out.display());
    }
    Ok(())
}

/// The settings that differ between `old` (stored) and `new` (this run), as
/// "path: old → new" lines for nested JSON objects (`learn.lr: 0.005 → 0.001`); a key only one
/// side has shows "–" on the other. Empty when equal.
pub fn changed_settings(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    // both as they read back from a file: a float compares as its written form
    let reread = |v: &serde_json::Value| serde_json::from_str(&v.to_string()).unwrap_or_else(|_| v.clone());
    let mut out = Vec::new();
    diff_into("", &reread(old), &reread(new), &mut out);
    out
}

fn diff_into(prefix: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    if old == new {
        return;
    }
    if let (Value::Object(a), Value::Object(b)) = (old, new) {
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match (a.get(k), b.get(k)) {
                (Some(x), Some(y)) => diff_into(&path, x, y, out),
                (Some(x), None) => out.push(format!("{path}: {} → –", short(x))),
                (None, Some(y)) => out.push(format!("{path}: – → {}", short(y))),
                (None, None) => {}
            }
        }
        return;
    }
    let name = if prefix.is_empty() { "settings" } else { prefix };
    out.push(format!("{name}: {} → {}", short(old), short(new)));
}

/// A JSON value for a message, cut to 120 characters.
fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(119).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_settings_names_each_leaf() {
        let a = serde_json::json!({"learn": {"lr": 0.005, "steps": 3}, "model": "a", "x": 1});
        let b = serde_json::json!({"learn": {"lr": 0.001, "steps": 3}, "model": "b", "y": 2});
        assert_eq!(
            changed_settings(&a, &b),
            ["learn.lr: 0.005 → 0.001", "model: \"a\" → \"b\"", "x: 1 → –", "y: – → 2"]
        );
        assert!(changed_settings(&a, &a).is_empty());
    }

    #[test]
    fn utc_now_is_well_formed() {
        let s = utc_now();
        assert_eq!(s.len(), "2025-01-02 03:04:05 UTC".len(), "{s}");
        assert!(s.starts_with("20") && s.ends_with(" UTC"), "{s}");
    }

    #[test]
    fn a_second_lock_in_another_open_file_is_refused_and_a_released_one_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let lock = lock_dir(&dir, "--out").unwrap();
        let path = dir.join(LOCK_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("\"pid\":{}", std::process::id())), "{text}");
        // Another open file description conflicts even within this process.
        let f = File::open(&path).unwrap();
        assert!(!flock_exclusive(&f).unwrap());
        // Re-entrant in this process.
        let nested = lock_dir(&dir, "--out").unwrap();
        assert!(nested.path().is_none());
        drop(nested);
        assert!(path.exists(), "a nested guard must not release the lock");
        drop(lock);
        assert!(!path.exists());
        assert!(!tmp.path().join("a").exists(), "the folders it created are removed when left empty");
        assert!(flock_exclusive(&f).unwrap(), "the old file is free");
    }
}
