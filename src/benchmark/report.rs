//! `report`: merges the finished units of one or more runs (from any machines) into
//! `report.html` (self-contained: thumbnails embedded as base64 PNG), `results.csv`,
//! `results.json` and Markdown tables (`report.md`, also printed).
//!
//! Each method's mean carries a 95 % bootstrap interval that resamples *subjects*
//! ([`bootstrap_mean`]), and each step of the ablation ([`ABLATION_STEPS`]) its paired
//! difference over the subjects both rows have ([`paired_differences`]). The reference rows
//! (`copy`, `base`) are shown in italics under the methods.

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

/// A score column: its key (JSON, CSV), its table label and which way is better.
#[derive(Debug)]
pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    pub higher_is_better: bool,
    get: fn(&UnitScores) -> Option<f64>,
}

impl Metric {
    pub fn of(&self, s: &UnitScores) -> Option<f64> {
        (self.get)(s)
    }
}

/// Every score a unit can have: DreamBooth's metrics (with CLIP and DINO encoders) and the
/// world's ground-truth fidelity (world datasets). Tables show the columns some unit has.
pub const METRICS: [Metric; 5] = [
    Metric { key: "dino", label: "DINO", higher_is_better: true, get: |s| s.dino },
    Metric { key: "clip_i", label: "CLIP-I", higher_is_better: true, get: |s| s.clip_i },
    Metric { key: "clip_t", label: "CLIP-T", higher_is_better: true, get: |s| s.clip_t },
    Metric { key: "gt_rmse", label: "GT RMSE ↓", higher_is_better: false, get: |s| s.gt_rmse },
    Metric { key: "gt_hist", label: "GT colours ↑", higher_is_better: true, get: |s| s.gt_hist },
];

/// A score to 4 decimals, "–" when absent.
pub fn fmt(x: Option<f64>) -> String {
    x.map_or_else(|| "–".to_string(), |v| format!("{v:.4}"))
}

/// Mean scores of a method over its subjects (key → mean over the units that have it).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MethodMeans {
    #[serde(flatten)]
    pub means: BTreeMap<&'static str, f64>,
    pub subjects: usize,
}

impl MethodMeans {
    pub fn get(&self, key: &str) -> Option<f64> {
        self.means.get(key).copied()
    }
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
    /// The [`METRICS`] some unit has, in that order.
    pub metrics: Vec<&'static Metric>,
    /// Per method and metric key: the mean over subjects with its bootstrap interval.
    pub intervals: BTreeMap<String, BTreeMap<&'static str, Interval>>,
    /// The paired differences of the ablation's steps ([`ABLATION_STEPS`]) whose two rows exist.
    pub paired: Vec<PairedDiff>,
}

/// Resamples of the subjects in a bootstrap interval.
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;
/// The bootstrap's fixed seed (ChaCha8): the same scores give the same report.
pub const BOOTSTRAP_SEED: u64 = 19;

/// A mean over subjects (each subject's value is its unit's score: the mean over that unit's
/// prompts × images) and its 95 % bootstrap interval; no interval (`lo`, `hi` None) for fewer than
/// two subjects, where resampling them cannot vary anything.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub mean: f64,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    /// Subjects.
    pub n: usize,
}

impl Interval {
    /// "0.6120 [0.5810, 0.6403]", or "0.6120 (n=1, no interval)".
    pub fn show(&self, signed: bool) -> String {
        let f = |v: f64| if signed { format!("{v:+.4}") } else { format!("{v:.4}") };
        match (self.lo, self.hi) {
            (Some(lo), Some(hi)) => format!("{} [{}, {}]", f(self.mean), f(lo), f(hi)),
            _ => format!("{} (n={}, no interval)", f(self.mean), self.n),
        }
    }
}

/// The mean of `values` (one per subject) with its 95 % percentile bootstrap interval:
/// [`BOOTSTRAP_RESAMPLES`] resamples of the subjects with replacement (ChaCha8 seeded with
/// [`BOOTSTRAP_SEED`]), the 2.5 % and 97.5 % quantiles of their means (linear interpolation
/// between order statistics). `values` must not be empty.
pub fn bootstrap_mean(values: &[f64]) -> Interval {
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return Interval { mean, lo: None, hi: None, n };
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(BOOTSTRAP_SEED);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            // an index in 0..n from 64 random bits (multiply-shift: unbiased to 2^-64·n)
            let sum: f64 = (0..n).map(|_| values[((rng.next_u64() as u128 * n as u128) >> 64) as usize]).sum();
            sum / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let q = |a: f64| {
        let x = a * (means.len() - 1) as f64;
        let (i, f) = (x.floor() as usize, x - x.floor());
        means[i] + f * (means[(i + 1).min(means.len() - 1)] - means[i])
    };
    Interval { mean, lo: Some(q(0.025)), hi: Some(q(0.975)), n }
}

/// The steps of the ablation (Table 2) and Table 1's pair, as (from, to).
pub const ABLATION_STEPS: [(Method, Method); 7] = [
    (Method::Ti, Method::TiMask),
    (Method::TiMask, Method::TiMaskReg),
    (Method::TiMaskReg, Method::TiMaskRegStepwise),
    (Method::TiMaskRegStepwise, Method::Hifi),
    (Method::Db, Method::DbGuidance),
    (Method::Lora, Method::LoraGuidance),
    (Method::Ti, Method::Hifi),
];

/// A step's paired difference on one metric: `to − from` per subject that has both units (with
/// the metric), its mean and bootstrap interval (resampling those subjects), and how many of
/// them improved (moved the metric's better way; a tie is no improvement).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairedDiff {
    pub from: String,
    pub to: String,
    pub metric: &'static str,
    pub diff: Interval,
    pub improved: usize,
}

/// The paired differences of every step of [`ABLATION_STEPS`] whose two methods have common
/// subjects, for each metric of `metrics`.
pub fn paired_differences(units: &[FoundUnit], metrics: &[&'static Metric]) -> Vec<PairedDiff> {
    let score = |subject: &str, method: Method, k: &Metric| {
        units
            .iter()
            .find(|u| u.scores.subject == subject && u.scores.method == method.name())
            .and_then(|u| k.of(&u.scores))
    };
    let mut subjects: Vec<&str> = units.iter().map(|u| u.scores.subject.as_str()).collect();
    subjects.sort();
    subjects.dedup();
    let mut out = Vec::new();
    for (from, to) in ABLATION_STEPS {
        for k in metrics {
            let d: Vec<f64> = subjects.iter().filter_map(|s| Some(score(s, to, k)? - score(s, from, k)?)).collect();
            if d.is_empty() {
                continue;
            }
            let improved = d.iter().filter(|&&x| if k.higher_is_better { x > 0.0 } else { x < 0.0 }).count();
            out.push(PairedDiff {
                from: from.name().into(),
                to: to.name().into(),
                metric: k.key,
                diff: bootstrap_mean(&d),
                improved,
            });
        }
    }
    out
}

/// The label of a metric key.
fn label(key: &str) -> &'static str {
    METRICS.iter().find(|k| k.key == key).map_or("?", |k| k.label)
}

/// A reference row (`copy`, `base`).
fn is_reference(method: &str) -> bool {
    Method::parse(method).is_ok_and(|m| m.reference())
}

/// The note under the tables: what the intervals and the reference rows are.
const STATS_NOTE: &str = "Means over subjects (a subject's value is its unit's score, the mean over its prompts × \
images) with 95 % bootstrap intervals: 10 000 resamples of the subjects with replacement, percentile interval, \
fixed seed; with one subject there is no interval (n=1). Reference rows (in italics): copy = a training photo \
as the output (the ceiling of subject fidelity, which a prompt-fidelity score should penalise), base = the base \
model on the class-noun prompt (the floor).";

fn method_rank(name: &str) -> usize {
    Method::parse(name).map_or(Method::ALL.len(), Method::table_rank)
}

/// Reads every finished unit (`units/*/*/scores.json`) of the runs. The same unit in two runs is
/// an error (the runs overlap), and so are units made with different settings
/// ([`check_settings`]) unless `allow_mixed`.
pub fn collect(runs: &[PathBuf], allow_mixed: bool) -> Result<Merged> {
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
    check_settings(&units, allow_mixed)?;
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
        let mut means = BTreeMap::new();
        for k in &METRICS {
            let v: Vec<f64> = us.iter().filter_map(|s| k.of(s)).collect();
            if !v.is_empty() {
                means.insert(k.key, v.iter().sum::<f64>() / v.len() as f64);
            }
        }
        methods.insert(m.clone(), MethodMeans { means, subjects: us.len() });
    }
    let metrics: Vec<&'static Metric> =
        METRICS.iter().filter(|k| units.iter().any(|u| k.of(&u.scores).is_some())).collect();
    let mut intervals = BTreeMap::new();
    for m in &method_order {
        let mut per = BTreeMap::new();
        for k in &metrics {
            let v: Vec<f64> = units.iter().filter(|u| &u.scores.method == m).filter_map(|u| k.of(&u.scores)).collect();
            if !v.is_empty() {
                per.insert(k.key, bootstrap_mean(&v));
            }
        }
        intervals.insert(m.clone(), per);
    }
    let paired = paired_differences(&units, &metrics);
    Ok(Merged { units, failed, methods, method_order, metrics, intervals, paired })
}

/// Refuses (or, with `allow_mixed`, warns about) units that were made with different settings:
/// the units of a method must have equal [`super::method_settings`], and all units the same
/// model, dataset, model options and generation settings. Units of older versions (no recorded
/// method settings) are not compared.
pub fn check_settings(units: &[FoundUnit], allow_mixed: bool) -> Result<()> {
    let common = |v: &serde_json::Value| serde_json::json!({"model": v["model"], "dataset": v["dataset"], "generate": v["generate"], "load": v.get("load")});
    let mut problems: Vec<String> = Vec::new();
    let mut first_of: BTreeMap<&str, &FoundUnit> = BTreeMap::new();
    let mut first: Option<&FoundUnit> = None;
    let mut unchecked = 0;
    for u in units {
        let ms = &u.scores.method_settings;
        if ms.is_null() {
            unchecked += 1;
            continue;
        }
        let mut compare = |f: &FoundUnit, a: &serde_json::Value, b: &serde_json::Value| {
            let c = crate::outdir::changed_settings(a, b);
            if !c.is_empty() {
                problems.push(format!(
                    "{}/{} in {} vs {}/{} in {} ({})",
                    f.scores.subject,
                    f.scores.method,
                    f.dir.display(),
                    u.scores.subject,
                    u.scores.method,
                    u.dir.display(),
                    c.join(", ")
                ));
            }
        };
        match first_of.get(u.scores.method.as_str()) {
            Some(f) => compare(f, &f.scores.method_settings, ms),
            None => {
                if let Some(f) = first {
                    compare(f, &common(&f.scores.method_settings), &common(ms));
                }
                first_of.insert(&u.scores.method, u);
            }
        }
        first.get_or_insert(u);
    }
    if unchecked > 0 {
        eprintln!("warning: {unchecked} unit(s) were made by an older version that did not record their settings: not compared");
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    let list = problems.into_iter().take(5).collect::<Vec<_>>().join("; ") + if n > 5 { "; …" } else { "" };
    if allow_mixed {
        eprintln!("warning: merging units made with different settings (--allow-mixed-settings): {list}");
        return Ok(());
    }
    bail!(
        "the units were made with different settings, so they cannot be averaged: {list}; pass \
         --allow-mixed-settings to merge them anyway (a model or dataset at another path counts as another setting)"
    )
}

/// `results.json`: `{"units": [...], "methods": {...}}`.
pub fn results_json(m: &Merged) -> serde_json::Value {
    let units: Vec<serde_json::Value> = m
        .units
        .iter()
        .map(|u| {
            let s = &u.scores;
            let mut v = serde_json::json!({"subject": s.subject, "method": s.method, "class": s.class, "live": s.live,
                "guided": s.guided, "images": s.images, "n_real": s.n_real, "dir": u.dir});
            for k in &m.metrics {
                v[k.key] = k.of(s).into();
            }
            v
        })
        .collect();
    let failed: Vec<serde_json::Value> =
        m.failed.iter().map(|(s, me, e)| serde_json::json!({"subject": s, "method": me, "error": e})).collect();
    serde_json::json!({"units": units, "methods": m.methods, "intervals": m.intervals, "paired": m.paired,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": 0.95}, "failed": failed})
}

/// `results.csv`: one row per unit.
pub fn results_csv(m: &Merged) -> String {
    let mut out = String::from("subject,method,class,live,guided");
    for k in &m.metrics {
        let _ = write!(out, ",{}", k.key);
    }
    out.push_str(",n_generated,n_real\n");
    for u in &m.units {
        let s = &u.scores;
        let _ = write!(
            out,
            "{},{},{},{},{}",
            csv_field(&s.subject),
            csv_field(&s.method),
            csv_field(&s.class),
            s.live,
            s.guided
        );
        for k in &m.metrics {
            let _ = write!(out, ",{}", k.of(s).map(|v| v.to_string()).unwrap_or_default());
        }
        let _ = writeln!(out, ",{},{}", s.n_generated, s.n_real);
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
    let labels: String = m.metrics.iter().map(|k| format!(" {} |", k.label)).collect();
    let rule: String = m.metrics.iter().map(|_| "---|").collect();
    let md_name = |name: &str| if is_reference(name) { format!("*{name}*") } else { name.to_string() };
    let mut out = format!("| method |{labels} subjects |\n|---|{rule}---|\n");
    for name in &m.method_order {
        let x = &m.methods[name];
        let cells: String = m
            .metrics
            .iter()
            .map(|k| format!(" {} |", m.intervals[name].get(k.key).map_or_else(|| fmt(None), |i| i.show(false))))
            .collect();
        let _ = writeln!(out, "| {} |{cells} {} |", md_name(name), x.subjects);
    }
    let _ = writeln!(out, "\n{STATS_NOTE}");
    if !m.paired.is_empty() {
        let _ = write!(
            out,
            "\nPaired differences (to − from, over the subjects with both rows):\n\n\
             | step | metric | mean difference [95 % interval] | subjects improved |\n|---|---|---|---|\n"
        );
        for d in &m.paired {
            let _ = writeln!(
                out,
                "| {} → {} | {} | {} | {}/{} |",
                d.from,
                d.to,
                label(d.metric),
                d.diff.show(true),
                d.improved,
                d.diff.n
            );
        }
    }
    let _ = write!(out, "\n| subject | method |{labels} images |\n|---|---|{rule}---|\n");
    for u in &m.units {
        let s = &u.scores;
        let cells: String = m.metrics.iter().map(|k| format!(" {} |", fmt(k.of(s)))).collect();
        let _ = writeln!(out, "| {} | {} |{cells} {} |", s.subject, md_name(&s.method), s.n_generated);
    }
    for (s, me, e) in &m.failed {
        let _ = writeln!(
            out,
            "| {s} | {me} | failed: {} |{} |",
            e.lines().next().unwrap_or(""),
            " |".repeat(m.metrics.len())
        );
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

/// An `<img>` with the image (shrunk to at most 128 px, never enlarged) embedded as a base64 PNG;
/// a unit kept without its images (only `scores.json`, `log.txt`, `prompts.jsonl`: a run's scores
/// copied to another machine, e.g. `docs/runs/`) gets a note in its place, its numbers being all
/// the tables need.
fn img_tag(path: &Path, title: &str) -> Result<String> {
    if !path.exists() {
        return Ok(format!("<span class=\"missing\" title=\"{}\">(image not kept)</span>", esc(title)));
    }
    let img = crate::io::open_image(path)?;
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
         td,th{border:1px solid #aaa;padding:3px 8px;text-align:right}td.l,th.l{text-align:left}tr.reference td{color:#555}\
         img{margin:1px;vertical-align:top}.row{margin:4px 0}.label{display:inline-block;width:14em;vertical-align:top}\
         </style></head><body>\n<h1>hifi-tuner benchmark report</h1>\n",
    );
    if m.metrics.iter().any(|k| k.key.starts_with("gt_")) {
        h.push_str(
            "<p>GT RMSE: the best masked RMSE (0–1) of the subject's ground-truth render, template-matched over \
             positions and scales in each generated image (lower is better); GT colours: the colour-histogram \
             intersection at that match (higher is better). See the crate docs of <code>world::score</code>.</p>\n",
        );
    }
    h.push_str(
        "<p>DINO and CLIP-I: mean cosine over all (generated, real) pairs of DINO ViT CLS / CLIP image \
         embeddings; CLIP-T: mean cosine of each generated image's CLIP image embedding with the CLIP text \
         embedding of its prompt, where the subject placeholder is replaced by the class noun \
         (\"a dog in the snow\").</p>\n",
    );
    let heads: String = m.metrics.iter().map(|k| format!("<th>{}</th>", esc(k.label))).collect();
    let _ = writeln!(h, "<h2>Methods (mean over subjects)</h2>\n<table id=\"methods\"><tr><th class=\"l\">method</th>{heads}<th>subjects</th><th class=\"l\">what it runs</th></tr>");
    for name in &m.method_order {
        let x = &m.methods[name];
        let mut what = Method::parse(name).map(|me| me.describe()).unwrap_or("").to_string();
        if let Some(u) = m.units.iter().find(|u| &u.scores.method == name) {
            let st = &u.scores.settings;
            let l = &st["learn"];
            // the learn settings as recorded (key=value), then the generation's
            let learn: Vec<String> = l
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| !v.is_array() && !v.is_object() && k.as_str() != "seed")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            what.push_str(&format!(
                " [{}; DDIM {} steps, w={}]",
                learn.join(" "),
                st["generate"]["steps"],
                st["generate"]["guidance"]
            ));
        }
        let cells: String = m
            .metrics
            .iter()
            .map(|k| {
                format!("<td>{}</td>", esc(&m.intervals[name].get(k.key).map_or_else(|| fmt(None), |i| i.show(false))))
            })
            .collect();
        let reference = is_reference(name);
        let _ = writeln!(
            h,
            "<tr{}><td class=\"l\">{}</td>{cells}<td>{}</td><td class=\"l\">{}</td></tr>",
            if reference { " class=\"reference\"" } else { "" },
            if reference { format!("<i>{}</i> (reference)", esc(name)) } else { esc(name) },
            x.subjects,
            esc(&what)
        );
    }
    let _ = writeln!(h, "</table>\n<p>{}</p>", esc(STATS_NOTE));
    if !m.paired.is_empty() {
        h.push_str(
            "<h2>Ablation steps (paired differences over subjects)</h2>\n<table id=\"paired\"><tr><th class=\"l\">step</th>\
             <th class=\"l\">metric</th><th>mean difference (to − from) [95 % interval]</th><th>subjects improved</th></tr>\n",
        );
        for d in &m.paired {
            let _ = writeln!(
                h,
                "<tr><td class=\"l\">{} → {}</td><td class=\"l\">{}</td><td>{}</td><td>{}/{}</td></tr>",
                esc(&d.from),
                esc(&d.to),
                esc(label(d.metric)),
                esc(&d.diff.show(true)),
                d.improved,
                d.diff.n
            );
        }
    }
    let _ = writeln!(h, "<h2>Per subject</h2>\n<table id=\"units\"><tr><th class=\"l\">subject</th><th class=\"l\">class</th><th class=\"l\">method</th>{heads}<th>images</th></tr>");
    for u in &m.units {
        let s = &u.scores;
        let _ = writeln!(
            h,
            "<tr class=\"unit\" data-subject=\"{}\" data-method=\"{}\"><td class=\"l\">{}</td><td class=\"l\">{}{}</td><td class=\"l\">{}</td>{}<td>{}</td></tr>",
            esc(&s.subject),
            esc(&s.method),
            esc(&s.subject),
            esc(&s.class),
            if s.live { " (live)" } else { "" },
            if is_reference(&s.method) { format!("<i>{}</i>", esc(&s.method)) } else { esc(&s.method) },
            m.metrics.iter().map(|k| format!("<td>{}</td>", fmt(k.of(s)))).collect::<String>(),
            s.n_generated
        );
    }
    for (s, me, e) in &m.failed {
        let _ = writeln!(
            h,
            "<tr class=\"failed\"><td class=\"l\">{}</td><td></td><td class=\"l\">{}</td><td colspan=\"{}\" class=\"l\">failed: {}</td></tr>",
            esc(s),
            esc(me),
            m.metrics.len() + 1,
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

/// Writes `report.html`, `results.csv`, `results.json` and `report.md` (the Markdown tables) into
/// `out`; returns the Markdown tables.
/// Units made with different settings are refused unless `allow_mixed` ([`check_settings`]).
pub fn write(runs: &[PathBuf], out: &Path, allow_mixed: bool) -> Result<String> {
    let m = collect(runs, allow_mixed)?;
    if m.units.is_empty() {
        bail!("no finished units in {}", runs.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    write_bytes_atomic(&out.join("report.html"), html(&m)?.as_bytes())?;
    write_bytes_atomic(&out.join("results.csv"), results_csv(&m).as_bytes())?;
    write_bytes_atomic(&out.join("results.json"), serde_json::to_string_pretty(&results_json(&m))?.as_bytes())?;
    let md = markdown(&m);
    write_bytes_atomic(&out.join("report.md"), md.as_bytes())?;
    Ok(md)
}
