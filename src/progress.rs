//! Progress bars for the loops a person waits for (hidden when stderr is not a terminal).
//!
//! Bars nest: while a [`Nest`] is alive (the benchmark's bar over units), every [`bar`] created
//! by the library (learning, denoising, guidance) is drawn below it in the same
//! [`MultiProgress`], and disappears when finished.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::sync::Mutex;

static PARENT: Mutex<Option<MultiProgress>> = Mutex::new(None);

fn styled(pb: ProgressBar, label: &str) -> ProgressBar {
    let style = ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(label.to_string());
    pb
}

/// A bar of `len` steps with a label, elapsed time, rate and ETA; nested under the current
/// [`Nest`] if there is one.
pub fn bar(len: u64, label: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let parent = PARENT.lock().ok().and_then(|p| p.clone());
    let pb = match parent {
        Some(m) => m.add(pb),
        None => pb,
    };
    styled(pb, label)
}

/// An outer bar under which the bars of [`bar`] nest until it is dropped.
pub struct Nest {
    pub bar: ProgressBar,
}

impl Nest {
    /// The outer bar (`len` units; its ETA is over units).
    pub fn new(len: u64, label: &str) -> Self {
        let multi = MultiProgress::new();
        let pb = styled(multi.add(ProgressBar::new(len)), label);
        if let Ok(mut p) = PARENT.lock() {
            *p = Some(multi);
        }
        Self { bar: pb }
    }
}

impl Drop for Nest {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        if let Ok(mut p) = PARENT.lock() {
            *p = None;
        }
    }
}

/// `learn --preview-every N`'s files: `OUT/previews/step-NNNNNN.png` (an image drawn at a fixed
/// seed with the state of step N) and `OUT/loss.svg` (the loss curve of `train_log.jsonl` so far).
pub mod previews {
    use anyhow::Result;
    use std::path::{Path, PathBuf};

    pub const DIR: &str = "previews";
    pub const LOSS_SVG: &str = "loss.svg";
    /// The preview's DDIM steps, seed and guidance (fixed, so previews compare across steps).
    pub const STEPS: usize = 25;
    pub const SEED: u64 = 0;
    pub const GUIDANCE: f64 = 7.5;

    pub fn path(out: &Path, step: usize) -> PathBuf {
        out.join(DIR).join(format!("step-{step:06}.png"))
    }

    /// Writes the preview of `step`: `image` (H, W, 3) uint8, drawn from `prompt`.
    pub fn save(out: &Path, step: usize, image: &tch::Tensor, prompt: &str) -> Result<()> {
        let path = path(out, step);
        crate::io::create_dir_all(path.parent().expect("previews/"))?;
        crate::io::RgbImage::from_hwc_u8(image)?.save_png(&path, &[("parameters", &format!("{prompt}\nstep {step}"))])
    }

    /// Rewrites `OUT/loss.svg` from the losses of `log` (one JSON object per line with `loss`).
    pub fn write_loss_svg(log: &Path, out: &Path) -> Result<()> {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let losses: Vec<f64> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
            .filter(|x| x.is_finite())
            .collect();
        crate::io::write_bytes_atomic(&out.join(LOSS_SVG), loss_svg(&losses).as_bytes())
    }

    /// A 480×240 SVG line chart of `losses` against the step, with its range written on it.
    pub fn loss_svg(losses: &[f64]) -> String {
        let (w, h, m) = (480.0, 240.0, 30.0);
        let lo = losses.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let span = if hi > lo { hi - lo } else { 1.0 };
        let n = losses.len().max(2) as f64 - 1.0;
        let pts: Vec<String> = losses
            .iter()
            .enumerate()
            .map(|(i, l)| {
                format!("{:.1},{:.1}", m + (w - 2.0 * m) * i as f64 / n, h - m - (h - 2.0 * m) * (l - lo) / span)
            })
            .collect();
        let label = if losses.is_empty() {
            "no steps yet".to_string()
        } else {
            format!("loss {lo:.4} – {hi:.4} over {} steps", losses.len())
        };
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
<path d=\"M{m} {m}V{b}H{r}\" stroke=\"#888\" fill=\"none\"/>\
<polyline points=\"{}\" fill=\"none\" stroke=\"#1f6feb\" stroke-width=\"1.5\"/>\
<text x=\"{m}\" y=\"18\" font-family=\"sans-serif\" font-size=\"12\">{label}</text></svg>\n",
            pts.join(" "),
            b = h - m,
            r = w - m,
        )
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_curve_spans_the_plot() {
            let s = super::loss_svg(&[1.0, 0.5, 0.25]);
            assert!(s.contains("30.0,30.0") && s.contains("450.0,210.0"), "{s}");
            assert!(s.contains("over 3 steps"));
            assert!(super::loss_svg(&[]).contains("no steps yet"));
        }
    }
}
