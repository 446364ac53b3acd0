//! `report`: merges the finished units of one or more runs (from any machines) into
//! `report.html` (self-contained: thumbnails embedded as base64 PNG), `results.csv`,
//! `results.json` and Markdown tables.

use super::{Method, UnitScores};
use crate::io::{write_bytes_atomic, RgbImage};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A finished unit and where it lies.
#[derive(Debug, Clone)]
pub struct FoundUnit {
    pub scores: UnitScores,
    pub dir: PathBuf,
}

/// Mean scores of a method over its subjects.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MethodMeans {
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
    pub subjects: usize,
}

/// The merged results.
#[derive(Debug, Clone)]
pub struct Merged {
    /// Sorted by (subject, method order).
    pub units: Vec<FoundUnit>,
    /// Units that failed (RUN/units/S/M.error.txt) and have no finished folder anywhere.
    pub failed: Vec<(String, String, String)>,
    pub methods: BTreeMap<String, MethodMeans>,
    /// Method names in table order.
    pub method_order: Vec<String>,
}

fn method_rank(name: &str) -> usize {
    Method::ALL.iter().position(|m| m.name() == name).unwrap_or(Method::ALL.len())
}

/// Reads every finished unit (`units/*/*/scores.json`) of the runs. The same unit in two runs is
/// an error (the runs overlap).
pub fn collect(runs: &[PathBuf]) -> Result<Merged> {
    let mut units: Vec<FoundUnit> = Vec::new();
    let mut errors = Vec::new();
    for run in runs {
        let root = run.join("units");
        if !root.is_dir() {
            bail!("{} is not a benchmark run: no units/ folder", run.display());
        }
        let mut subjects: Vec<PathBuf> = std::fs::read_dir(&root)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        subjects.sort();
        for sdir in subjects.into_iter().filter(|p| p.is_dir()) {
            let mut entries: Vec<PathBuf> =
                std::fs::read_dir(&sdir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
            entries.sort();
            for e in entries {
                let name = e.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if let Some(m) = name.strip_suffix(".error.txt") {
                    let s = sdir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    let msg = std::fs::read_to_string(&e).unwrap_or_default().trim().to_string();
                    errors.push((s, m.to_string(), msg));
                    continue;
                }
                let f = e.join("scores.json");
                if name.starts_with('.') || !f.is_file() {
                    continue;
                }
                let text = std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
                let scores: UnitScores = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a unit's scores.json", f.display()))?;
                if let Some(o) =
                    units.iter().find(|u| u.scores.subject == scores.subject && u.scores.method == scores.method)
                {
                    bail!(
                        "unit {}/{} is in two runs: {} and {} (merge runs of disjoint shards)",
                        scores.subject,
                        scores.method,
                        o.dir.display(),
                        e.display()
                    );
                }
                units.push(FoundUnit { scores, dir: e });
            }
        }
    }
    units.sort_by(|a, b| {
        (a.scores.subject.as_str(), method_rank(&a.scores.method), a.scores.method.as_str()).cmp(&(
            b.scores.subject.as_str(),
            method_rank(&b.scores.method),
            b.scores.method.as_str(),
        ))
    });
    let failed = errors
        .into_iter()
        .filter(|(s, m, _)| !units.iter().any(|u| &u.scores.subject == s && &u.scores.method == m))
        .collect();
    let mut method_order: Vec<String> = Vec::new();
    let mut by_rank: Vec<&FoundUnit> = units.iter().collect();
    by_rank.sort_by_key(|u| method_rank(&u.scores.method));
    for u in by_rank {
        if !method_order.contains(&u.scores.method) {
            method_order.push(u.scores.method.clone());
        }
    }
    let mut methods = BTreeMap::new();
    for m in &method_order {
        let us: Vec<&UnitScores> = units.iter().map(|u| &u.scores).filter(|s| &s.method == m).collect();
        let n = us.len() as f64;
        methods.insert(
            m.clone(),
            MethodMeans {
                dino: us.iter().map(|s| s.dino).sum::<f64>() / n,
                clip_i: us.iter().map(|s| s.clip_i).sum::<f64>() / n,
                clip_t: us.iter().map(|s| s.clip_t).sum::<f64>() / n,
                subjects: us.len(),
            },
        );
    }
    Ok(Merged { units, failed, methods, method_order })
}

/// `results.json`: `{"units": [...], "methods": {...}}`.
pub fn results_json(m: &Merged) -> serde_json::Value {
    let units: Vec<serde_json::Value> = m
        .units
        .iter()
        .map(|u| {
            let s = &u.scores;
            serde_json::json!({"subject": s.subject, "method": s.method, "class": s.class, "live": s.live,
                "guided": s.guided, "dino": s.dino, "clip_i": s.clip_i, "clip_t": s.clip_t,
                "images": s.images, "n_real": s.n_real, "dir": u.dir})
        })
        .collect();
    let failed: Vec<serde_json::Value> =
        m.failed.iter().map(|(s, me, e)| serde_json::json!({"subject": s, "method": me, "error": e})).collect();
    serde_json::json!({"units": units, "methods": m.methods, "failed": failed})
}

/// `results.csv`: one row per unit.
pub fn results_csv(m: &Merged) -> String {
    let mut out = String::from("subject,method,class,live,guided,dino,clip_i,clip_t,n_generated,n_real\n");
    for u in &m.units {
        let s = &u.scores;
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{}",
            csv_field(&s.subject),
            csv_field(&s.method),
            csv_field(&s.class),
            s.live,
            s.guided,
            s.dino,
            s.clip_i,
            s.clip_t,
            s.n_generated,
            s.n_real
        );
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The two tables as Markdown: per method (Table 1/2 style) and per subject.
pub fn markdown(m: &Merged) -> String {
    let mut out = String::from("| method | DINO | CLIP-I | CLIP-T | subjects |\n|---|---|---|---|---|\n");
    for name in &m.method_order {
        let x = &m.methods[name];
        let _ = writeln!(out, "| {name} | {:.4} | {:.4} | {:.4} | {} |", x.dino, x.clip_i, x.clip_t, x.subjects);
    }
    out.push_str("\n| subject | method | DINO | CLIP-I | CLIP-T | images |\n|---|---|---|---|---|---|\n");
    for u in &m.units {
        let s = &u.scores;
        let _ = writeln!(
            out,
            "| {} | {} | {:.4} | {:.4} | {:.4} | {} |",
            s.subject, s.method, s.dino, s.clip_i, s.clip_t, s.n_generated
        );
    }
    for (s, me, e) in &m.failed {
        let _ = writeln!(out, "| {s} | {me} | failed: {} | | | |", e.lines().next().unwrap_or(""));
    }
    out
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An `<img>` with the image (shrunk to at most 128 px, never enlarged) embedded as a base64 PNG.
fn img_tag(path: &Path, title: &str) -> Result<String> {
    let img = image::open(path).with_context(|| format!("cannot read image {}", path.display()))?;
    let t = crate::benchmark::shrink(&img, 128);
    let png = RgbImage { width: t.width(), height: t.height(), pixels: t.into_raw() }.to_png(&[])?;
    Ok(format!("<img src=\"data:image/png;base64,{}\" title=\"{}\" alt=\"{}\">", base64(&png), esc(title), esc(title)))
}

/// Prompts shown per subject in the image grid.
const GRID_PROMPTS: usize = 4;

/// The self-contained HTML report.
pub fn html(m: &Merged) -> Result<String> {
    let mut h = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>hifi-tuner benchmark report</title>\n<style>\
         body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}\
         td,th{border:1px solid #aaa;padding:3px 8px;text-align:right}td.l,th.l{text-align:left}\
         img{margin:1px;vertical-align:top}.row{margin:4px 0}.label{display:inline-block;width:14em;vertical-align:top}\
         </style></head><body>\n<h1>hifi-tuner benchmark report</h1>\n",
    );
    h.push_str(
        "<p>DINO and CLIP-I: mean cosine over all (generated, real) pairs of DINO ViT CLS / CLIP image \
         embeddings; CLIP-T: mean cosine of each generated image's CLIP image embedding with the CLIP text \
         embedding of its prompt, where the subject placeholder is replaced by the class noun \
         (\"a dog in the snow\").</p>\n",
    );
    h.push_str("<h2>Methods (mean over subjects)</h2>\n<table id=\"methods\"><tr><th class=\"l\">method</th><th>DINO</th><th>CLIP-I</th><th>CLIP-T</th><th>subjects</th><th class=\"l\">what it runs</th></tr>\n");
    for name in &m.method_order {
        let x = &m.methods[name];
        let mut what = Method::parse(name).map(|me| me.describe()).unwrap_or("").to_string();
        if let Some(u) = m.units.iter().find(|u| &u.scores.method == name) {
            let st = &u.scores.settings;
            let l = &st["learn"];
            what.push_str(&format!(
                " [mode={} masked={} reg_weight={} stepwise_steps={} tokens={} steps={} lr={}; DDIM {} steps, w={}]",
                l["mode"],
                l["masked"],
                l["reg_weight"],
                l["stepwise_steps"],
                l["n_tokens"],
                l["steps"],
                l["lr"],
                st["generate"]["steps"],
                st["generate"]["guidance"]
            ));
        }
        let _ = writeln!(
            h,
            "<tr><td class=\"l\">{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{}</td><td class=\"l\">{}</td></tr>",
            esc(name),
            x.dino,
            x.clip_i,
            x.clip_t,
            x.subjects,
            esc(&what)
        );
    }
    h.push_str("</table>\n<h2>Per subject</h2>\n<table id=\"units\"><tr><th class=\"l\">subject</th><th class=\"l\">class</th><th class=\"l\">method</th><th>DINO</th><th>CLIP-I</th><th>CLIP-T</th><th>images</th></tr>\n");
    for u in &m.units {
        let s = &u.scores;
        let _ = writeln!(
            h,
            "<tr class=\"unit\" data-subject=\"{}\" data-method=\"{}\"><td class=\"l\">{}</td><td class=\"l\">{}{}</td><td class=\"l\">{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{}</td></tr>",
            esc(&s.subject),
            esc(&s.method),
            esc(&s.subject),
            esc(&s.class),
            if s.live { " (live)" } else { "" },
            esc(&s.method),
            s.dino,
            s.clip_i,
            s.clip_t,
            s.n_generated
        );
    }
    for (s, me, e) in &m.failed {
        let _ = writeln!(
            h,
            "<tr class=\"failed\"><td class=\"l\">{}</td><td></td><td class=\"l\">{}</td><td colspan=\"4\" class=\"l\">failed: {}</td></tr>",
            esc(s),
            esc(me),
            esc(e)
        );
    }
    h.push_str("</table>\n<h2>Images</h2>\n");
    let mut subjects: Vec<&str> = m.units.iter().map(|u| u.scores.subject.as_str()).collect();
    subjects.dedup();
    for subj in subjects {
        let _ = writeln!(h, "<h3>{}</h3>", esc(subj));
        let units: Vec<&FoundUnit> = m.units.iter().filter(|u| u.scores.subject == subj).collect();
        if let Some(first) = units.first() {
            let real_dir = first.dir.join("real");
            if real_dir.is_dir() {
                h.push_str("<div class=\"row\"><span class=\"label\">real photos</span>");
                for p in crate::eval::metrics::image_files(&real_dir)? {
                    h.push_str(&img_tag(&p, "real photo")?);
                }
                h.push_str("</div>\n");
            }
        }
        for u in units {
            let _ = write!(h, "<div class=\"row\"><span class=\"label\">{}</span>", esc(&u.scores.method));
            let prompts = read_prompt_map(&u.dir);
            for name in &u.scores.images {
                let p: usize = name.get(1..3).and_then(|d| d.parse().ok()).unwrap_or(0);
                if p >= GRID_PROMPTS {
                    continue;
                }
                let title = prompts.get(name).cloned().unwrap_or_else(|| name.clone());
                h.push_str(&img_tag(&u.dir.join("images").join(name), &format!("{}: {title}", u.scores.method))?);
            }
            h.push_str("</div>\n");
        }
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

fn read_prompt_map(dir: &Path) -> BTreeMap<String, String> {
    crate::eval::metrics::read_prompts(&dir.join("prompts.jsonl"))
        .map(|v| v.into_iter().map(|l| (l.image, l.prompt)).collect())
        .unwrap_or_default()
}

/// Writes `report.html`, `results.csv`, `results.json` into `out`; returns the Markdown tables.
pub fn write(runs: &[PathBuf], out: &Path) -> Result<String> {
    let m = collect(runs)?;
    if m.units.is_empty() {
        bail!("no finished units in {}", runs.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    write_bytes_atomic(&out.join("report.html"), html(&m)?.as_bytes())?;
    write_bytes_atomic(&out.join("results.csv"), results_csv(&m).as_bytes())?;
    write_bytes_atomic(&out.join("results.json"), serde_json::to_string_pretty(&results_json(&m))?.as_bytes())?;
    Ok(markdown(&m))
}
