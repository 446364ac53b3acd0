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
