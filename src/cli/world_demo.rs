//! `world-demo`: the main job on the shipped world model, end to end, with ground truth.

use anyhow::{bail, Context, Result};
use hifi_tuner::guidance::job::{generate_guided, GuidedSubject, ReferenceOptions};
use hifi_tuner::guidance::reference::GuidanceConfig;
use hifi_tuner::io::RgbImage;
use hifi_tuner::pipeline::GenerateRequest;
use hifi_tuner::subject::conditioning::generate;
use hifi_tuner::subject::file::{Subject, SUBJECT_FILE};
use hifi_tuner::subject::job::{learn, LearnJob};
use hifi_tuner::subject::learn::LearnArgs;
use hifi_tuner::subject::{Mode, Space};
use hifi_tuner::world::dataset::{ground_truth, rgb_image, subject_photo, write_world, PROMPT_SCENES};
use hifi_tuner::world::score::{fidelity, render_tensors};
use hifi_tuner::world::{SCENES, SHAPES, SUBJECTS};
use std::path::PathBuf;
use tch::{Kind, Tensor};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model trained on the world (the shipped one by default).
    #[arg(long, default_value = "assets/world-model")]
    model: PathBuf,
    #[command(flatten)]
    opts: super::ModelOptions,
    /// The held-out subject to learn: one of `hifi-tuner world`'s 15 (the validation five:
    /// quartered_ball, striped_cube, dotted_pyramid, checked_ring, two_tone_star; the test ten:
    /// banded_ball, ringed_ball, two_tone_cube, checked_cube, striped_pyramid, quartered_pyramid,
    /// dotted_ring, two_tone_ring, ringed_star, striped_star).
    #[arg(long, default_value = "quartered_ball")]
    subject: String,
    /// Output folder (rewritten): world/, subject/, strip.png and the single images.
    #[arg(long)]
    out: PathBuf,
    /// Adam steps of learning (phase 0).
    #[arg(long, default_value_t = 400)]
    learn_steps: usize,
    /// DDIM steps (generation and Algorithm 1).
    #[arg(long, default_value_t = 25, value_parser = super::args::ddim_steps)]
    steps: usize,
    #[arg(long, default_value_t = 5.0, value_parser = super::args::guidance)]
    guidance: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    let Some(si) = SUBJECTS.iter().position(|s| s.name == a.subject) else {
        bail!(
            "--subject {:?} is not a held-out subject of the world ({})",
            a.subject,
            SUBJECTS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        );
    };
    let subj = SUBJECTS[si];
    let class = SHAPES[subj.object.shape];
    let dev = super::parse_device(&a.device)?;
    let world = a.out.join("world");
    let learned = a.out.join("subject");
    for d in [&world, &learned] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("cannot remove {}", d.display()))?;
        }
    }
    write_world(&world, 0, 4, 0)?;
    eprintln!("[1/3] learning {} ({}) from 4 renders and their masks", subj.name, subj.description);
    let job = LearnJob {
        model: a.model.clone(),
        load: a.opts.options(dev)?,
        images: world.join("dataset").join(subj.name),
        masks: Some(world.join("masks").join(subj.name)),
        out: learned.clone(),
        args: LearnArgs {
            mode: Mode::Hifi,
            space: Space::Input,
            n_tokens: 5,
            token: format!("<{}>", subj.name),
            class_noun: class.to_string(),
            // the world's captions are "a {colour} {shape} {scene}": "a {class}" is the closest
            // generic caption in its language (the usual "a photo of a …" words are unknown to it)
            captions: vec![format!("a {class}")],
            steps: a.learn_steps,
            lr: 5e-3,
            reg_weight: 1e-3,
            stepwise_steps: 10,
            ddim_steps: a.steps,
            batch_size: 1,
            seed: a.seed,
            masked: true,
        },
        checkpoint_every: 0,
        preview_every: 0,
        resume: false,
        device: dev,
    };
    learn(&job)?;
    let subject = Subject::load(&learned.join(SUBJECT_FILE))?;
    let sd = a.opts.load(&a.model, dev)?;
    let (h, w) = sd.default_hw();
    eprintln!("[2/3] generating it in {} new scenes: plain and with reference guidance", PROMPT_SCENES.len());
    let mut rows: Vec<Vec<Tensor>> = (0..5).map(|_| vec![]).collect();
    let mut table = String::from(
        "scene      base (no subject)   HiFi   HiFi + reference guidance   (ground-truth RMSE, lower is better)\n",
    );
    let to_chw = |img: &Tensor| img.get(0).permute([2, 0, 1]).to_kind(Kind::Float) / 255.0;
    for k in 0..4 {
        rows[0].push(render_tensors(&subject_photo(0, si, k)).0);
    }
    for &scene in PROMPT_SCENES.iter() {
        let prompt = format!("a {class} {}", SCENES[scene].1);
        let req = GenerateRequest {
            prompt: prompt.clone(),
            negative_prompt: None,
            seed: a.seed,
            steps: a.steps,
            guidance: a.guidance,
            height: h,
            width: w,
            num_images: 1,
        };
        let gt = ground_truth(0, subj.object, scene);
        let (gt_img, gt_mask) = render_tensors(&gt);
        let base = sd.generate(&req)?;
        let plain = generate(&sd, &req, Some(&subject))?;
        let opt = ReferenceOptions {
            guidance: GuidanceConfig {
                t_start: a.steps * 4 / 5,
                t_end: a.steps / 5,
                steps: 10,
                lr: 1e-2,
                substitute: true,
            },
            dino: None,
            reference_caption: Some(format!("a {class}")),
            references: None,
            reference_masks: None,
            sam: None,
            intermediates: None,
            min_contrast: hifi_tuner::guidance::daam::MIN_CONTRAST,
        };
        let g = generate_guided(&sd, &req, &GuidedSubject::Embedding(&subject), &learned, &opt)?;
        match &g.fallback {
            Some(why) => eprintln!("{prompt}: reference guidance fell back to the plain image: {why}"),
            None => eprintln!("{prompt}: reference guidance ran (subject attention contrast {:.2})", g.contrast),
        }
        let name = SCENES[scene].0;
        let mut scores = vec![];
        for (img, file) in [(&base, "base"), (&plain, "hifi"), (&g.image, "hifi_guided")] {
            RgbImage::from_hwc_u8(&img.get(0))?
                .save_png(&a.out.join(format!("{file}_{name}.png")), &[("parameters", &prompt)])?;
            scores.push(fidelity(&to_chw(img), &gt_img, &gt_mask)?.rmse);
        }
        rgb_image(&gt).save_png(&a.out.join(format!("ground_truth_{name}.png")), &[])?;
        table.push_str(&format!("{name:<10} {:>17.3} {:>6.3} {:>27.3}\n", scores[0], scores[1], scores[2]));
        rows[1].push(gt_img);
        rows[2].push(to_chw(&base));
        rows[3].push(to_chw(&plain));
        rows[4].push(to_chw(&g.image));
    }
    eprintln!("[3/3] strip.png: rows = the 4 photos; ground truth; base model \"a {class} …\"; HiFi; HiFi + reference guidance");
    // (rows·S, 4·S, 3), each tile 2× (nearest) for viewing
    let grid = Tensor::cat(&rows.iter().map(|r| Tensor::cat(r, 2)).collect::<Vec<_>>(), 1);
    let big = grid.unsqueeze(0).upsample_nearest2d([grid.size()[1] * 2, grid.size()[2] * 2], None, None).squeeze_dim(0);
    let u8 = (big * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8).permute([1, 2, 0]);
    let strip = a.out.join("strip.png");
    RgbImage::from_hwc_u8(&u8)?.save_png(&strip, &[])?;
    print!("{table}");
    println!("{}", strip.display());
    Ok(())
}
