//! `hifi-tuner world --out DIR`: the world's held-out subjects as a benchmark dataset in the
//! DreamBooth layout, with masks and ground truth.
//!
//! - `DIR/dataset/prompts_and_classes.txt` and `DIR/dataset/SUBJECT/NN.png`: the subject's
//!   photos — renders in the *photo scenes* ([`PHOTO_SCENES`]) at random placements;
//! - `DIR/masks/SUBJECT/NN.png`: their masks (the `--masks` folder of `learn` / `benchmark`);
//! - `DIR/ground_truth/SUBJECT/pPP.png` + `pPP.mask.png`: the subject, centred, in the scene of
//!   prompt PP — the prompts are the *new scenes* ([`PROMPT_SCENES`]), never in its photos;
//! - `DIR/samples/`: a contact sheet of training samples with their captions (inspection);
//! - `DIR/world.json`: the seed, the subjects, the prompts and their scenes.

use super::{render, Object, Paint, Placement, Render, Rng, N_VALIDATION, SCENES, SHAPES, SIZE, SUBJECTS};
use crate::io::{write_bytes_atomic, RgbImage};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Scenes of the subjects' photos.
pub const PHOTO_SCENES: [usize; 4] = [0, 3, 4, 5];
/// Scenes of the prompts (new to the subject): beach, sky, water, night.
pub const PROMPT_SCENES: [usize; 4] = [1, 2, 6, 7];
pub const WORLD_FILE: &str = "world.json";

/// `world.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorldInfo {
    pub format: String,
    pub seed: u64,
    /// (folder name, class noun, description)
    pub subjects: Vec<(String, String, String)>,
    /// DreamBooth templates ({0} = subject token, {1} = class), one per prompt scene.
    pub prompts: Vec<String>,
    /// The scene name of each prompt.
    pub prompt_scenes: Vec<String>,
    pub photo_scenes: Vec<String>,
    /// The subjects for choosing settings, and the test subjects of the reported tables.
    #[serde(default)]
    pub validation: Vec<String>,
    #[serde(default)]
    pub test: Vec<String>,
}

pub fn world_info(seed: u64) -> WorldInfo {
    WorldInfo {
        format: "hifi-tuner-world/1".into(),
        seed,
        subjects: SUBJECTS
            .iter()
            .map(|s| (s.name.to_string(), SHAPES[s.object.shape].to_string(), s.description.to_string()))
            .collect(),
        prompts: PROMPT_SCENES.iter().map(|&e| format!("a {{0}} {{1}} {}", SCENES[e].1)).collect(),
        prompt_scenes: PROMPT_SCENES.iter().map(|&e| SCENES[e].0.to_string()).collect(),
        photo_scenes: PHOTO_SCENES.iter().map(|&e| SCENES[e].0.to_string()).collect(),
        validation: SUBJECTS[..N_VALIDATION].iter().map(|s| s.name.to_string()).collect(),
        test: SUBJECTS[N_VALIDATION..].iter().map(|s| s.name.to_string()).collect(),
    }
}

/// The `k`-th photo of a subject (scene `PHOTO_SCENES[k % 4]`): a random position and size
/// (radius 14–20 px) and an in-plane rotation of 11–52° either way, so that no photo shows the
/// pose of the ground truth (centred, radius 16, upright).
pub fn subject_photo(seed: u64, subject: usize, k: usize) -> Render {
    let mut rng = Rng::for_item(seed, 2, (subject * 64 + k) as u64);
    let mut place = Placement::draw(&mut rng);
    place.r = place.r.max(14.0);
    place.cx = place.cx.clamp(place.r + 2.0, SIZE as f32 - place.r - 2.0);
    place.cy = place.cy.clamp(place.r + 2.0, SIZE as f32 - place.r - 2.0);
    let bg = rng.uniform().to_bits() as u64 ^ (k as u64) << 32;
    let turn = rng.range(0.2, 0.9);
    place.angle = if rng.uniform() < 0.5 { -turn } else { turn };
    render(SUBJECTS[subject].object, PHOTO_SCENES[k % PHOTO_SCENES.len()], place, bg)
}

/// The ground truth of a subject in `scene`: centred, background seed fixed per scene.
pub fn ground_truth(seed: u64, object: Object, scene: usize) -> Render {
    render(object, scene, Placement::centred(), seed ^ (1000 + scene as u64))
}

/// The mean colour of a render's object (its pixels weighted by coverage).
pub fn mean_colour(r: &Render) -> [u8; 3] {
    let mut acc = [0f64; 3];
    let mut w = 0f64;
    for (i, &m) in r.mask.iter().enumerate() {
        let m = m as f64;
        for (c, a) in acc.iter_mut().enumerate() {
            *a += m * r.rgb[i * 3 + c] as f64;
        }
        w += m;
    }
    acc.map(|a| (a / w.max(1.0)).round().clamp(0.0, 255.0) as u8)
}

/// What the validity check compares the ground truth with: renders in the same scene and place
/// (the same background) that a fidelity score must rank below the true render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// A flat disc of the subject's mean colour, of the ground truth's radius.
    Blob,
    /// The subject's shape, shaded, in its mean colour (no pattern).
    Shape,
    /// Another subject (`(subject + 1) % n` of the same split), its true render.
    Other,
}

impl Baseline {
    pub const ALL: [Baseline; 3] = [Baseline::Blob, Baseline::Shape, Baseline::Other];
    pub fn name(self) -> &'static str {
        match self {
            Baseline::Blob => "blob",
            Baseline::Shape => "shape",
            Baseline::Other => "other subject",
        }
    }
}

/// The baseline `b` for subject `subject` in `scene`, in the ground truth's place.
pub fn baseline(seed: u64, subject: usize, scene: usize, b: Baseline) -> Render {
    let o = SUBJECTS[subject].object;
    let gt = ground_truth(seed, o, scene);
    match b {
        Baseline::Blob => ground_truth(seed, Object { shape: 0, paint: Paint::Flat(mean_colour(&gt)) }, scene),
        Baseline::Shape => ground_truth(seed, Object { shape: o.shape, paint: Paint::Rgb(mean_colour(&gt)) }, scene),
        Baseline::Other => {
            let (lo, n) =
                if subject < N_VALIDATION { (0, N_VALIDATION) } else { (N_VALIDATION, SUBJECTS.len() - N_VALIDATION) };
            ground_truth(seed, SUBJECTS[lo + (subject - lo + 1) % n].object, scene)
        }
    }
}

pub fn rgb_image(r: &Render) -> RgbImage {
    RgbImage { width: SIZE as u32, height: SIZE as u32, pixels: r.rgb.clone() }
}

pub fn mask_image(r: &Render) -> RgbImage {
    RgbImage { width: SIZE as u32, height: SIZE as u32, pixels: r.mask.iter().flat_map(|&m| [m, m, m]).collect() }
}

/// Writes the dataset folder (see the module docs); `photos` per subject, `samples` training
/// samples on the contact sheet.
pub fn write_world(out: &Path, seed: u64, photos: usize, samples: usize) -> Result<()> {
    if photos == 0 {
        bail!("--photos must be at least 1");
    }
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("--out {} already exists and is not empty; refusing to overwrite it", out.display());
    }
    let info = world_info(seed);
    let mut table = String::from("subject_name,class\n");
    for (name, class, _) in &info.subjects {
        table.push_str(&format!("{name},{class}\n"));
    }
    table.push_str("\nObject Prompts\n");
    for p in &info.prompts {
        table.push_str(&format!("prompt_list = ['{p}'.format(unique_token, class_token)]\n"));
    }
    table.push_str("\nLive Subject Prompts\n");
    for p in &info.prompts {
        table.push_str(&format!("prompt_list = ['{p}'.format(unique_token, class_token)]\n"));
    }
    write_bytes_atomic(&out.join("dataset").join("prompts_and_classes.txt"), table.as_bytes())?;
    for (i, s) in SUBJECTS.iter().enumerate() {
        for k in 0..photos {
            let r = subject_photo(seed, i, k);
            let stem = format!("{k:02}.png");
            rgb_image(&r).save_png(&out.join("dataset").join(s.name).join(&stem), &[])?;
            mask_image(&r).save_png(&out.join("masks").join(s.name).join(&stem), &[])?;
        }
        for (p, &scene) in PROMPT_SCENES.iter().enumerate() {
            let r = ground_truth(seed, s.object, scene);
            let dir = out.join("ground_truth").join(s.name);
            rgb_image(&r).save_png(&dir.join(format!("p{p:02}.png")), &[])?;
            mask_image(&r).save_png(&dir.join(format!("p{p:02}.mask.png")), &[])?;
        }
    }
    if samples > 0 {
        write_samples(&out.join("samples"), seed, samples)?;
    }
    write_bytes_atomic(&out.join(WORLD_FILE), serde_json::to_string_pretty(&info)?.as_bytes())?;
    Ok(())
}

/// `sheet.png` (8 per row) and `captions.txt` of the first `n` training samples.
fn write_samples(dir: &Path, seed: u64, n: usize) -> Result<()> {
    let cols = n.min(8);
    let rows = n.div_ceil(cols);
    let (w, h) = (cols * SIZE, rows * SIZE);
    let mut sheet = vec![0u8; w * h * 3];
    let mut captions = String::new();
    for i in 0..n {
        let s = super::sample(seed, i as u64);
        captions.push_str(&format!("{i}\t{}\n", super::caption(s.colour, s.shape, s.scene)));
        let (ox, oy) = ((i % cols) * SIZE, (i / cols) * SIZE);
        for y in 0..SIZE {
            let src = &s.render.rgb[y * SIZE * 3..(y + 1) * SIZE * 3];
            let at = ((oy + y) * w + ox) * 3;
            sheet[at..at + SIZE * 3].copy_from_slice(src);
        }
    }
    RgbImage { width: w as u32, height: h as u32, pixels: sheet }.save_png(&dir.join("sheet.png"), &[])?;
    write_bytes_atomic(&dir.join("captions.txt"), captions.as_bytes())
}

/// The ground-truth folder of a world dataset (`WORLD/dataset` → `WORLD/ground_truth`), or
/// None when `dataset` is not a world's.
pub fn ground_truth_dir(dataset: &Path) -> Option<std::path::PathBuf> {
    let root = dataset.parent()?;
    (root.join(WORLD_FILE).is_file() && root.join("ground_truth").is_dir()).then(|| root.join("ground_truth"))
}

/// The ground-truth fidelity of the generated image `image` for prompt `p` ("pPP") of the
/// subject whose ground truth is in `subject_gt`.
pub fn score_file(image: &Path, subject_gt: &Path, p: &str) -> Result<super::score::Fidelity> {
    let load = |f: &Path| -> Result<tch::Tensor> {
        Ok(crate::io::load_rgb_u8(f)?.permute([2, 0, 1]).to_kind(tch::Kind::Float) / 255.0)
    };
    let g = load(image)?;
    let t = load(&subject_gt.join(format!("{p}.png")))?;
    let m = load(&subject_gt.join(format!("{p}.mask.png")))?.narrow(0, 0, 1);
    super::score::fidelity(&g, &t, &m)
}
