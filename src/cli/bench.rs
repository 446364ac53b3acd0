//! `hifi-tuner bench`: the speeds the issues ask for, on any model (use `init-random --config
//! sd15` for full-size numbers): seconds per DDIM step of `generate`, steps/s of `learn` in both
//! spaces and in TI mode (a TI step is the UNet forward + backward diffusers' textual-inversion
//! script times), the share of a reference-guided image spent optimising φ_h, and null-text
//! inversion + replacement (Algorithm 3), and a DreamBooth-LoRA step against the TI step and
//! against the floor of any adapter implementation (timed in turn), all at the chosen
//! `--dtype`; with `--blip`, seconds per BLIP caption (random weights at BLIP-base or -large
//! shapes, or a BLIP folder). Prints one JSON object per measurement and the ratios between
//! them.

use anyhow::Result;
use hifi_tuner::guidance::invert::ddim_invert;
use hifi_tuner::guidance::reference::{guided_denoise, GuidanceConfig, Reference};
use hifi_tuner::pipeline::{GenerateRequest, StableDiffusion};
use hifi_tuner::replace::job::{replace, Inversion, InversionMeta, ReplaceRequest};
use hifi_tuner::replace::nti::{null_text_optimize, NtiConfig};
use hifi_tuner::subject::conditioning::SubjectSteps;
use hifi_tuner::subject::file::Subject;
use hifi_tuner::subject::job::{captions, setup_ti};
use hifi_tuner::subject::learn::{train_step, LearnArgs, Objective, State, TrainSet};
use hifi_tuner::subject::{Mode, Space};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The Stable Diffusion model to time (may be left out with --blip: captions only).
    #[arg(long, required_unless_present = "blip")]
    model: Option<PathBuf>,
    /// Also time BLIP captions: `base` or `large` (random weights at those shapes:
    /// Salesforce/blip-image-captioning-base / -large) or a BLIP folder.
    #[arg(long)]
    blip: Option<String>,
    #[command(flatten)]
    model_options: super::ModelOptions,
    /// DDIM steps of the generation and guided runs.
    #[arg(long, default_value_t = 50, value_parser = super::args::ddim_steps)]
    steps: usize,
    /// Optimisation steps timed per learning mode (at least 2: the first is a warm-up).
    #[arg(long, default_value_t = 20, value_parser = super::args::at_least_two)]
    learn_steps: usize,
    #[arg(long, default_value = "auto")]
    device: String,
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

pub fn run(a: Args) -> Result<()> {
    let device = super::parse_device(&a.device)?;
    if let Some(b) = &a.blip {
        bench_blip(b, device)?;
    }
    let Some(model) = &a.model else { return Ok(()) };
    let mut sd = a.model_options.load(model, device)?;
    let size = sd.default_size();
    let req = GenerateRequest {
        prompt: "a photo of a dog on the beach".into(),
        negative_prompt: None,
        seed: 0,
        steps: a.steps,
        guidance: 7.5,
        height: size,
        width: size,
        num_images: 1,
    };
    // Warm-up (kernels, allocator), then the timed image.
    let _ = sd.generate(&GenerateRequest { steps: 2, ..req.clone() })?;
    sync(device);
    let t = Instant::now();
    let _ = sd.generate(&req)?;
    sync(device);
    let gen_s = t.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"what": "generate", "device": format!("{device:?}"), "dtype": hifi_tuner::precision::name(sd.dtype()),
        "size": size, "steps": a.steps, "seconds": gen_s, "seconds_per_step": gen_s / a.steps as f64})
    );
    let mut rates = vec![];
    for (mode, space) in [(Mode::Hifi, Space::Input), (Mode::Hifi, Space::Output), (Mode::Ti, Space::Input)] {
        let (obj, mut state) = learn_objective(&mut sd, mode, space, &a, device, size)?;
        train_step(&obj, &mut state)?; // warm-up
        sync(device);
        let t = Instant::now();
        for _ in 1..a.learn_steps {
            train_step(&obj, &mut state)?;
        }
        sync(device);
        let rate = (a.learn_steps - 1) as f64 / t.elapsed().as_secs_f64();
        println!(
            "{}",
            json!({"what": "learn", "mode": mode.as_str(), "space": space.as_str(), "steps_per_second": rate})
        );
        rates.push(rate);
    }
    println!(
        "{}",
        json!({"what": "ratio", "learn_output_over_input_space": rates[1] / rates[0], "learn_ti_over_hifi_input": rates[2] / rates[0]})
    );

    // A DreamBooth-LoRA step (rank 4 on the UNet's attention projections, batch 1, no prior
    // preservation: one UNet forward + backward, as the TI step) against the TI step, and the
    // floor of any adapter implementation, interleaved (see `lora_against_ti`).
    // (three models at once: the one timed so far, which now holds the TI tokens, is dropped
    // first to keep the peak down, and a fresh one is loaded after)
    drop(sd);
    let l = lora_against_ti(&a, device, size)?;
    let sd = a.model_options.load(model, device)?;
    println!(
        "{}",
        json!({"what": "learn", "mode": "lora", "rank": 4, "steps_per_second": 1.0 / l.lora_s,
        "seconds_over_ti_step": l.lora_s / l.ti_s, "floor_over_ti_step": l.floor_s / l.ti_s,
        "interleaved_median_seconds": {"ti": l.ti_s, "lora": l.lora_s, "floor": l.floor_s}})
    );

    // Reference guidance's second pass (Algorithm 2) with the paper's defaults on a random
    // subject, a random reference latent and a centre mask.
    let sched = sd.scheduler(a.steps)?;
    let d = sd.cond_width(); // SDXL: both encoders side by side
    let subject = Subject {
        c_s: Tensor::randn([5, d], (Kind::Float, Device::Cpu)) * 0.1,
        stepwise: vec![],
        timesteps: vec![],
        space: Space::Input,
        class_noun: "dog".into(),
        captions: vec![],
        model: String::new(),
        ddim_steps: a.steps,
    };
    let lat = size / sd.vae_scale_factor();
    let x0 = Tensor::randn([1, sd.unet.config.in_channels, lat, lat], (Kind::Float, device));
    let mask = Tensor::zeros([1, 1, lat, lat], (Kind::Float, device));
    let _ = mask.narrow(2, lat / 4, lat / 2).narrow(3, lat / 4, lat / 2).fill_(1.0);
    let t_start = (a.steps * 4 / 5).max(1);
    let gc =
        GuidanceConfig { t_start, t_end: (a.steps / 5).max(1).min(t_start), steps: 10, lr: 1e-2, substitute: true };
    sync(device);
    let t = Instant::now();
    let uncond = tch::no_grad(|| sd.encode_negative(None));
    let traj = ddim_invert(&sd, &sched, &x0, tch::no_grad(|| sd.encode_text("a photo of a dog")));
    let mut cond = SubjectSteps::new(&sd, "a dog on the beach", &subject, &sched, &uncond, 1)?;
    let x_t = sd.initial_latents(0, 1, size, size);
    let (_, report) = guided_denoise(&sd, &sched, x_t, &mut cond, 7.5, &Reference { traj: &traj, mask: &mask }, &gc)?;
    sync(device);
    let guided_s = t.elapsed().as_secs_f64() + gen_s; // + the first pass (I_g1)
    println!(
        "{}",
        json!({"what": "reference_guidance", "seconds": guided_s, "phi_h_seconds": report.phi_h_seconds,
        "phi_h_share": report.phi_h_seconds / guided_s, "over_plain_generate": guided_s / gen_s})
    );

    // Algorithm 3: null-text inversion of a random photo latent (K = 10 at every step: the early
    // stop is off, so the count is exact), then the replacement pass with the random subject.
    sync(device);
    let t = Instant::now();
    let caption = "a photo of a cat on a bench";
    let (cond_r, uncond) = tch::no_grad(|| (sd.encode_text(caption), sd.encode_negative(None)));
    let traj = ddim_invert(&sd, &sched, &x0, &cond_r);
    let nti_cfg = NtiConfig { early_stop: f64::NEG_INFINITY, early_stop_slope: 0.0, ..NtiConfig::default() };
    let t_nti = Instant::now();
    let nti = null_text_optimize(&sd, &sched, &traj, &cond_r, &uncond, &nti_cfg)?;
    sync(device);
    let nti_s = t_nti.elapsed().as_secs_f64();
    let inner: usize = nti.log.iter().map(|s| s.losses.len()).sum();
    let meta = InversionMeta {
        model: String::new(),
        image_sha256: String::new(),
        caption: caption.into(),
        caption_source: None,
        height: size,
        width: size,
        steps: a.steps,
        guidance: 7.5,
        inner_steps: nti_cfg.inner_steps,
    };
    let req = ReplaceRequest { source_word: "cat".into(), target_word: None, cross_replace: 1.0, self_replace: 0.0 };
    let _ = replace(&sd, &Inversion { nti, meta }, &req, Some(&subject))?;
    sync(device);
    let replace_s = t.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"what": "null_text_inversion", "seconds": nti_s, "inner_steps": inner, "inner_steps_per_second": inner as f64 / nti_s})
    );
    println!(
        "{}",
        json!({"what": "replace", "seconds_with_inversion": replace_s, "nti_share": nti_s / replace_s,
        "over_plain_generate": replace_s / gen_s})
    );
    Ok(())
}

/// The learning objective of `bench` for one mode on random photo latents and masks, with its
/// optimiser state (a TI mode adds its tokens to `sd`'s tokenizer).
fn learn_objective<'a>(
    sd: &'a mut StableDiffusion,
    mode: Mode,
    space: Space,
    a: &Args,
    device: Device,
    size: i64,
) -> Result<(Objective<'a>, State)> {
    let args = LearnArgs {
        mode,
        space,
        n_tokens: 5,
        token: "<bench>".into(),
        class_noun: "dog".into(),
        captions: captions(mode, "dog", "<bench>", 5),
        steps: a.learn_steps,
        lr: 5e-3,
        reg_weight: 1e-3,
        stepwise_steps: 0,
        ddim_steps: a.steps,
        batch_size: 1,
        seed: 0,
        masked: true,
    };
    let (base, init) = if mode == Mode::Ti { setup_ti(sd, &args)? } else { (0, None) };
    let f = sd.vae_scale_factor();
    let c = sd.unet.config.in_channels;
    let data = hifi_tuner::rng::seeded(0, || TrainSet {
        latents: Tensor::randn([3, c, size / f, size / f], (Kind::Float, device)),
        masks: Some(Tensor::rand([3, 1, size / f, size / f], (Kind::Float, device))),
    });
    let ids = hifi_tuner::subject::job::caption_ids(sd, &args)?;
    let obj = Objective::new(sd, args, data, ids, base)?;
    let state = State::new(init.as_ref().unwrap_or(&obj.phi_s), 5e-3);
    Ok((obj, state))
}

/// Median seconds per step of the TI step, the LoRA step and the LoRA floor.
struct LoraTimes {
    ti_s: f64,
    lora_s: f64,
    floor_s: f64,
}

/// `learn --mode lora`'s step (fresh rank-4 adapters on a fresh model) against the TI step, and
/// against its floor: the same UNet step with the adapted projections' own weights trainable
/// instead of adapters. The floor reaches as far back in the backward as the adapters must (a
/// TI step stops at the first cross-attention's keys and values; adapters on the first
/// self-attention need the backward through it) and adds one dense weight gradient per layer
/// but no adapter operations, so no adapter implementation is much below it. The three steps
/// run in turn, `--learn-steps` times each, and the medians are compared: on a shared machine
/// a step's time drifts by more than the differences measured.
fn lora_against_ti(a: &Args, device: Device, size: i64) -> Result<LoraTimes> {
    use hifi_tuner::dreambooth::{loss, step_on, DbBatch, DbState, DreamBoothArgs, Params};
    let model = a.model.as_deref().expect("checked");
    let mut sd_ti = a.model_options.load(model, device)?;
    let (obj, mut ti_state) = learn_objective(&mut sd_ti, Mode::Ti, Space::Input, a, device, size)?;
    let mut sd = a.model_options.load(model, device)?;
    let mut args = DreamBoothArgs::new_lora("sks", "dog");
    args.prior_weight = None;
    let lora = args.lora.clone().expect("a LoRA recipe");
    let mut params = Params::lora(&mut sd, &lora, false, 0);
    let mut state = DbState::new(&params, &args);
    let mut sd_floor = a.model_options.load(model, device)?;
    let weights: Vec<Tensor> = sd_floor
        .unet
        .lora_targets_mut()
        .into_iter()
        .map(|t| {
            let w = t.base.ws.detach().set_requires_grad(true);
            t.base.ws = w.shallow_clone();
            w
        })
        .collect();
    let sched = sd.scheduler(1)?;
    let (c, l) = (sd.unet.config.in_channels, size / sd.vae_scale_factor());
    let batch = hifi_tuner::rng::seeded(0, || DbBatch {
        latents: Tensor::randn([1, c, l, l], (Kind::Float, device)),
        noise: Tensor::randn([1, c, l, l], (Kind::Float, device)),
        t: Tensor::from_slice(&[500i64]).to_device(device),
        ids: sd.tokenize(&args.instance_prompt),
        ids_2: sd.tokenize_each(&args.instance_prompt).get(1).map(Tensor::shallow_clone),
        mask: None,
        n_instance: 1,
    });
    let mut times: [Vec<f64>; 3] = Default::default();
    for i in 0..a.learn_steps {
        for (k, v) in times.iter_mut().enumerate() {
            sync(device);
            let t = Instant::now();
            match k {
                0 => drop(train_step(&obj, &mut ti_state)?),
                1 => drop(step_on(&sd, &sched, &mut params, &mut state, &batch, &args)?),
                _ => {
                    let l = loss(&sd_floor, &sched, &batch, None)?;
                    let refs: Vec<&Tensor> = weights.iter().collect();
                    let g = Tensor::run_backward(&[&l.total], &refs, false, false);
                    let _ = (l.total.double_value(&[]), g[0].sum(Kind::Float).double_value(&[]));
                }
            }
            sync(device);
            if i > 0 {
                v.push(t.elapsed().as_secs_f64()); // the first round warms up
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [ti, lo, fl] = &mut times;
    Ok(LoraTimes { ti_s: median(ti), lora_s: median(lo), floor_s: median(fl) })
}

/// Seconds per BLIP caption (greedy and 3 beams, 20 new tokens: random weights rarely stop
/// earlier, so this is the default limit's worst case), the image encoding alone, and the first
/// and last decoding step (with the key / value cache the last costs about what the first does).
fn bench_blip(which: &str, device: Device) -> Result<()> {
    use hifi_tuner::caption::BlipImageProcessor;
    use hifi_tuner::models::blip::{BlipConfig, BlipForConditionalGeneration, GenerationConfig, MaxLength};
    let model = match which {
        "base" | "large" => {
            let mut cfg: BlipConfig = serde_json::from_value(json!({"text_config": {}, "vision_config": {}}))?;
            if which == "large" {
                let v = &mut cfg.vision_config;
                (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) = (1024, 24, 16, 4096);
                cfg.text_config.encoder_hidden_size = 1024;
            }
            BlipForConditionalGeneration::new(cfg, device)?
        }
        dir => BlipForConditionalGeneration::load(std::path::Path::new(dir), device, Kind::Float)?,
    };
    let s = model.config.vision_config.image_size;
    let proc = BlipImageProcessor::default_for(s);
    let img =
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(640, 480, |x, y| image::Rgb([x as u8, y as u8, 128])));
    let px = proc.preprocess(&img)?.unsqueeze(0);
    let bos = model.config.text_config.bos_token_id;
    let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        f()?; // warm-up
        sync(device);
        let t = Instant::now();
        f()?;
        sync(device);
        Ok(t.elapsed().as_secs_f64())
    };
    let encode_s = time(&|| tch::no_grad(|| model.image_embeds(&px)).map(|_| ()))?;
    let embeds = tch::no_grad(|| model.image_embeds(&px))?;
    let g = GenerationConfig { max_length: MaxLength::New(20), ..GenerationConfig::default() };
    let mut rows = vec![];
    for beams in [1usize, 3] {
        let g = GenerationConfig { num_beams: beams, ..g.clone() };
        let secs = time(&|| {
            let e = tch::no_grad(|| model.image_embeds(&px))?;
            model.generate(&e, &[bos], &g).map(|_| ())
        })?;
        let len = model.generate(&embeds, &[bos], &g)?.len();
        rows.push(json!({"beams": beams, "tokens": len, "seconds_per_caption": secs}));
    }
    // one decoding step at the first and at the 20th position (cache of 19 tokens)
    let step = |pos: usize| -> Result<f64> {
        tch::no_grad(|| {
            let mut cache = model.new_cache(&embeds);
            if pos > 0 {
                let _ = model.decode(&Tensor::full([1, pos as i64], bos, (Kind::Int64, device)), &mut cache)?;
            }
            let one = Tensor::full([1, 1], bos, (Kind::Int64, device));
            time(&|| model.decode(&one, &mut cache.fork()).map(|_| ()))
        })
    };
    let (first, last) = (step(0)?, step(19)?);
    println!(
        "{}",
        json!({"what": "caption", "blip": which, "device": format!("{device:?}"), "image_size": s,
        "encode_seconds": encode_s, "runs": rows, "step_seconds_first": first, "step_seconds_at_20": last,
        "step_20_over_first": last / first})
    );
    Ok(())
}
