//! Subject replacement (Algorithm 3): null-text inversion against the authors' loop on
//! diffusers (fixture), its gradient, prompt-to-prompt's editing rule and token alignment, and
//! the `invert` / `replace` CLI with its bad inputs.

mod common;

use common::*;
use hifi_tuner::attention::{AttentionController, AttnKind, AttnSite, Place};
use hifi_tuner::guidance::invert::{ddim_invert, Trajectory};
use hifi_tuner::pipeline::StableDiffusion;
use hifi_tuner::replace::job::{
    find_word, invert, load_inversion, replace, save_inverted, swap_word, InvertRequest, ReplaceRequest,
};
use hifi_tuner::replace::nti::{nti_loss, null_text_optimize, NtiConfig};
use hifi_tuner::replace::p2p::{align_tokens, PromptToPrompt};
use hifi_tuner::rng::seeded;
use hifi_tuner::subject::file::Subject;
use hifi_tuner::subject::Space;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{Device, Kind, Tensor};

fn sd() -> StableDiffusion {
    StableDiffusion::load(&model_dir("tiny-a"), Device::Cpu).unwrap()
}

fn nti_ref() -> std::collections::HashMap<String, Tensor> {
    reference("nti")
}

/// The fixture's settings: its metadata names them (tiny-a's random UNet never gets near the
/// authors' 1e-5 early-stop threshold, so the fixture raises it; see tests/fixtures/README.md).
fn fixture_config() -> (NtiConfig, usize) {
    let m = reference_meta("nti");
    let num = |k: &str| m[k].parse::<f64>().unwrap_or_else(|_| panic!("metadata {k}: {:?}", m[k]));
    let cfg = NtiConfig {
        guidance: num("guidance"),
        inner_steps: num("inner_steps") as usize,
        early_stop: num("early_stop_epsilon"),
        ..NtiConfig::default()
    };
    (cfg, num("steps") as usize)
}

fn trajectory(latents: &Tensor) -> Trajectory {
    Trajectory { latents: latents.split(1, 0) }
}

/// Our NTI loop on the fixture's pivots equals the authors' loop run on diffusers' UNet: the
/// same number of Adam steps at every DDIM step, and the same losses, φ*_t and reconstruction.
#[test]
fn null_text_inversion_matches_the_reference() {
    let sd = sd();
    let r = nti_ref();
    let (cfg, steps) = fixture_config();
    let sched = sd.scheduler(steps).unwrap();
    assert_eq!(sched.timesteps, Vec::<i64>::try_from(&r["nti.timesteps"]).unwrap());
    let nti = null_text_optimize(&sd, &sched, &trajectory(&r["nti.latents"]), &r["nti.cond"], &r["nti.uncond"], &cfg)
        .unwrap();
    // Exact: every early-stop decision of the fixture is ≥ 2.8 % away from its threshold
    // (checked by the fixture script), far beyond the ≈1e-6 relative loss differences below.
    let taken: Vec<i64> = nti.log.iter().map(|s| s.losses.len() as i64).collect();
    assert_eq!(taken, Vec::<i64>::try_from(&r["nti.inner_steps"]).unwrap(), "Adam steps per DDIM step");
    let first = Tensor::from_slice(&nti.log.iter().map(|s| s.losses[0] as f32).collect::<Vec<_>>());
    let last = Tensor::from_slice(&nti.log.iter().map(|s| *s.losses.last().unwrap() as f32).collect::<Vec<_>>());
    // 1e-4 relative: the fixture script measured ≤ 1.3e-5 (φ) and ≤ 1.1e-6 (losses) between
    // PyTorch's Adam and libtorch's C++ Adam formula; our UNet adds ulp-level differences. A
    // wrong lr schedule, a missing early stop or the pivot used instead of F(x_t, φ*_t) moves
    // these by 1e-2 or more.
    assert_close(&first, &r["nti.losses_first"], 1e-4, "first loss per step");
    assert_close(&last, &r["nti.losses_last"], 1e-4, "last loss per step");
    // φ*_t: Adam divides each gradient coordinate by its own running RMS, so a coordinate
    // whose gradient is ≈ 0 (padding rows the UNet barely reads) takes lr-sized steps in a
    // direction set by rounding noise. Hence two bounds: relative L2 over all of φ, and max
    // |diff|. Measured over `make test-portable`'s runs: 2.8e-5 and 1.07e-3 with AVX2 kernels
    // (as on an AMD EPYC), 2.6e-3 max at ATEN_CPU_CAPABILITY=default, which left 3.5x and 1.9x
    // under the old bounds 1e-4 and 2e-3. Now 3e-4 (> 10x; a wrong lr schedule moves φ by ~1e-2
    // relative) and 2e-2, two Adam steps at lr 1e-2 (7.7x; φ moves by up to ≈ 0.5 in total,
    // asserted > 0.1 below).
    let phi = Tensor::cat(&nti.phi.iter().map(|p| &p.hidden).collect::<Vec<_>>(), 0);
    let rel_l2 = (&phi - &r["nti.phi"]).norm().double_value(&[]) / r["nti.phi"].norm().double_value(&[]);
    check_tol("φ*_t relative L2", rel_l2, 3e-4);
    check_tol("φ*_t max", max_abs_diff(&phi, &r["nti.phi"]), 2e-2);
    let moved = max_abs_diff(&r["nti.phi"], &r["nti.uncond"].expand_as(&r["nti.phi"]));
    assert!(moved > 0.1, "the fixture's φ must move well beyond the tolerance ({moved})");
    assert_close(nti.x0.as_ref().unwrap(), &r["nti.x0_rec"], 1e-4, "reconstruction latent");
    assert!(nti.x_t.equal(&r["nti.latents"].get(steps as i64).unsqueeze(0)), "sampling starts at x_T*");
}

/// The steps before NTI: the photo's latent and the pivots (diffusers' DDIMInverseScheduler).
#[test]
fn encoding_and_pivots_match_the_reference() {
    let sd = sd();
    let r = nti_ref();
    let (_, steps) = fixture_config();
    let x0 = tch::no_grad(|| sd.vae.encode(&r["nti.pixels"]).mean * sd.vae.scaling_factor());
    assert_close(&x0, &r["nti.x0"], 1e-5, "x_0*");
    let sched = sd.scheduler(steps).unwrap();
    let traj = ddim_invert(&sd, &sched, &r["nti.x0"], &r["nti.cond"]);
    // 1e-4: ten chained inverse steps of a random UNet amplify ulp differences (the pivots
    // reach |x| ≈ 10 from |x_0| ≈ 0.1).
    assert_close(&Tensor::cat(&traj.latents, 0), &r["nti.latents"], 1e-4, "pivots");
}

/// NTI brings the sampled trajectory back to the photo's latent far better than plain DDIM
/// inversion followed by guided sampling (the reason it exists).
#[test]
fn null_text_reconstruction_beats_plain_inversion() {
    let sd = sd();
    let r = nti_ref();
    let (cfg, steps) = fixture_config();
    let sched = sd.scheduler(steps).unwrap();
    let traj = trajectory(&r["nti.latents"]);
    let run = |k: usize| {
        let c = NtiConfig { inner_steps: k, ..cfg.clone() };
        null_text_optimize(&sd, &sched, &traj, &r["nti.cond"], &r["nti.uncond"], &c).unwrap()
    };
    let mse = |x: &Tensor| (x - &r["nti.x0"]).square().mean(Kind::Float).double_value(&[]);
    let (nti, plain) = (mse(&run(cfg.inner_steps).x0.unwrap()), mse(&run(0).x0.unwrap()));
    assert!(nti < 0.6 * plain, "NTI {nti:.4} vs plain inversion {plain:.4}");
    // K = 0 is the baseline: diffusers' plain reconstruction with φ at every step.
    assert_close(&run(0).x0.unwrap(), &r["nti.x0_plain"], 1e-4, "plain DDIM inversion + CFG");
}

/// Eq. 4's gradient with respect to φ_t against central finite differences.
#[test]
fn gradient_of_the_nti_loss_matches_finite_differences() {
    let sd = sd();
    let r = nti_ref();
    let (cfg, steps) = fixture_config();
    let sched = sd.scheduler(steps).unwrap();
    let i = 3usize;
    let t = sched.timesteps[i];
    let x = r["nti.latents"].get((steps - i) as i64).unsqueeze(0);
    let target = r["nti.latents"].get((steps - i - 1) as i64).unsqueeze(0);
    let eps_c = tch::no_grad(|| sd.unet.forward(&x, &Tensor::from(t), &r["nti.cond"], None));
    let loss = |p: &Tensor| nti_loss(&sd, &sched, &x, t, &eps_c, &p.into(), &target, cfg.guidance);
    let p0 = r["nti.uncond"].shallow_clone();
    let p = p0.detach().set_requires_grad(true);
    let g = Tensor::run_backward(&[&loss(&p)], &[&p], false, false).remove(0);
    // Along the gradient (plus a random part, so a wrong direction would show): a random
    // direction over the 77 rows mostly probes padding rows the UNet barely reads, and its
    // derivative drowns in f32 rounding.
    let noise = seeded(5, || Tensor::randn(p0.size().as_slice(), (Kind::Float, Device::Cpu)));
    let v = &g / g.norm().double_value(&[]) + &noise / noise.norm().double_value(&[]) * 0.5;
    let v = &v / v.norm().double_value(&[]);
    let analytic = (&g * &v).sum(Kind::Double).double_value(&[]);
    let h = 1e-2;
    let at = |q: Tensor| tch::no_grad(|| loss(&q).double_value(&[]));
    let fd = (at(&p0 + &v * h) - at(&p0 - &v * h)) / (2.0 * h);
    let rel = (fd - analytic).abs() / analytic.abs().max(1e-6);
    // 2e-2: f32 central differences at h = 1e-2 on a loss of O(1) (as the subject tests).
    check_tol("finite difference vs autograd (rel)", rel, 2e-2);
    check_min("the gradient does not vanish", analytic.abs(), 1e-6);
}

#[test]
fn guidance_at_most_one_is_refused() {
    let cfg = NtiConfig { guidance: 1.0, ..NtiConfig::default() };
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("--guidance > 1"), "{e}");
    assert!(NtiConfig { inner_steps: 0, ..cfg }.validate().is_ok(), "plain inversion needs no gradient");
    let d = NtiConfig::default();
    assert_eq!((d.inner_steps, d.lr_at(0), d.threshold_at(0)), (10, 1e-2, 1e-5));
    assert!((d.lr_at(49) - 1e-2 * 0.51).abs() < 1e-15 && (d.threshold_at(49) - (1e-5 + 49.0 * 2e-5)).abs() < 1e-15);
}

// ---- prompt-to-prompt ------------------------------------------------------------------

#[test]
fn token_alignment_equal_longer_shorter_first_last() {
    let some = |v: &[usize]| v.iter().map(|&s| Some(s)).collect::<Vec<_>>();
    // equal counts: identity, the word keeps its own
    let a = align_tokens(8, 3, 1, 1);
    assert_eq!(a, [some(&[0, 1, 2]), vec![None], some(&[4, 5, 6, 7])].concat());
    // longer target word (1 → 2 tokens): later words shift right by one
    let a = align_tokens(8, 3, 1, 2);
    assert_eq!(a, [some(&[0, 1, 2]), vec![None, None], some(&[4, 5, 6])].concat());
    // shorter target word (2 → 1): later words shift left; the last slot has no source
    let a = align_tokens(8, 3, 2, 1);
    assert_eq!(a, [some(&[0, 1, 2]), vec![None], some(&[5, 6, 7]), vec![None]].concat());
    // the word first (right after BOS)
    let a = align_tokens(6, 1, 1, 3);
    assert_eq!(a, [some(&[0]), vec![None; 3], some(&[2, 3])].concat());
    // the word last: only padding follows, with the same shift
    let a = align_tokens(6, 4, 2, 1);
    assert_eq!(a, [some(&[0, 1, 2, 3]), vec![None], vec![None]].concat());
}

#[test]
fn word_swap_locates_the_tokens() {
    let sd = sd();
    let enc = |s: &str| sd.tokenizer.encode_padded(s).ids;
    let w = swap_word(&sd, "a photo of a cat on a bench", "cat", "stuffed animal").unwrap();
    assert_eq!(w.target_caption, "a photo of a stuffed animal on a bench");
    assert_eq!((w.start, w.n_source, w.n_target), (5, 1, 2));
    assert_eq!(enc(&w.target_caption)[7..10], enc("a photo of a cat on a bench")[6..9], "words after keep their ids");
    let first = swap_word(&sd, "Cat on a bench", "cat", "dog").unwrap();
    assert_eq!((first.start, first.target_caption.as_str()), (1, "dog on a bench"));
    let last = swap_word(&sd, "a photo of a cat.", "cat", "dog").unwrap();
    assert_eq!((last.start, last.target_caption.as_str()), (5, "a photo of a dog."));
    assert_eq!(find_word("a catalogue of cats, a cat", "cat"), Some((23, 26)), "whole words only");
    let e = swap_word(&sd, "a photo of a cat on a bench", "horse", "dog").unwrap_err().to_string();
    assert!(e.contains("\"horse\"") && e.contains("a, photo, of, a, cat, on, a, bench"), "{e}");
}

fn site(kind: AttnKind, hw: i64) -> AttnSite {
    AttnSite { place: Place::Up, block: 1, attention: 0, layer: 0, kind, height: hw, width: hw }
}

/// A probe through the controller: exception tokens keep the target's own maps, every other
/// token takes the source's (through the alignment); the unconditional half is untouched.
#[test]
fn p2p_keeps_exceptions_and_copies_everything_else() {
    let len = 10usize;
    let alignment = align_tokens(len, 2, 1, 2); // target word at 2, 3
    let exceptions = [2usize, 3, 8, 9]; // w_g + two subject positions
    let mut p2p = PromptToPrompt::new(&alignment, &exceptions, 3, 1, 16 * 16, Device::Cpu);
    let probs = seeded(3, || Tensor::rand([4, 2, 16, len as i64], (Kind::Float, Device::Cpu)));
    let out = p2p.on_probs(&site(AttnKind::Cross, 4), probs.copy());
    assert!(out.narrow(0, 0, 3).equal(&probs.narrow(0, 0, 3)), "φ rows and the source row are untouched");
    let keep = p2p.keeps_own();
    for j in 0..len {
        let got = out.get(3).select(2, j as i64);
        let want = match (alignment[j], exceptions.contains(&j)) {
            (Some(s), false) => probs.get(2).select(2, s as i64),
            _ => probs.get(3).select(2, j as i64),
        };
        assert!(got.equal(&want), "token {j}");
        assert_eq!(keep[j], alignment[j].is_none() || exceptions.contains(&j), "token {j}");
    }
    // Which calls are edited: cross-attention for the first 3 steps; self-attention only for
    // step 0 and only at coarse sites (≤ 1/4 of the 16×16 latent's cells: 8×8 and below).
    assert!(p2p.wants(&site(AttnKind::Cross, 16)) && p2p.wants(&site(AttnKind::SelfAttn, 4)));
    assert!(p2p.wants(&site(AttnKind::SelfAttn, 8)), "8×8 = 1/4 of the cells is replaced");
    assert!(!p2p.wants(&site(AttnKind::SelfAttn, 16)), "fine self-attention is never replaced");
    // SD at 512² (64×64 latent): the NTI notebook's `≤ 32²` rule.
    let sd512 = PromptToPrompt::new(&alignment, &exceptions, 3, 1, 64 * 64, Device::Cpu);
    assert!(sd512.wants(&site(AttnKind::SelfAttn, 32)) && !sd512.wants(&site(AttnKind::SelfAttn, 64)));
    let self_out = p2p.on_probs(&site(AttnKind::SelfAttn, 4), probs.copy());
    assert!(self_out.get(3).equal(&probs.get(2)), "self-attention injection copies the source's map");
    p2p.step = 1;
    assert!(p2p.wants(&site(AttnKind::Cross, 16)) && !p2p.wants(&site(AttnKind::SelfAttn, 4)));
    p2p.step = 3;
    assert!(!p2p.wants(&site(AttnKind::Cross, 16)));
}

fn small_inversion(
    sd: &StableDiffusion,
    caption: &str,
    steps: usize,
    inner: usize,
) -> hifi_tuner::replace::job::Inverted {
    let req = InvertRequest {
        image: fixtures().join("photos/dog/00.jpg"),
        caption: caption.into(),
        caption_source: None,
        steps,
        height: None,
        width: None,
        nti: NtiConfig { inner_steps: inner, early_stop: 0.175, ..NtiConfig::default() },
    };
    invert(sd, &req).unwrap()
}

/// Identical prompts and no subject: the edit is the reconstruction.
#[test]
fn p2p_with_identical_prompts_gives_the_reconstruction() {
    let sd = sd();
    let inv = small_inversion(&sd, "a photo of a dog", 6, 3);
    let req = ReplaceRequest {
        source_word: "dog".into(),
        target_word: Some("dog".into()),
        cross_replace: 1.0,
        self_replace: 0.4,
    };
    let r = replace(&sd, &inv.inversion, &req, None).unwrap();
    assert!(r.edited_calls > 0);
    // Source and target are the same computation in two rows of one batch: libtorch's CPU
    // kernels may round rows differently by an ulp, amplified over 6 steps; 1e-5 of the
    // latents' scale is far below any edit (the subject test below moves them by > 1e-2).
    assert_close(&r.latents.get(1), &r.latents.get(0), 1e-5, "target vs source row");
    // And the source row is NTI's own reconstruction, but computed in a batch of 4 rows where
    // NTI ran batches of 1 and 2: other GEMM blockings, so other roundings, amplified through 6
    // CFG steps. Measured max |diff| (latents' scale 13.65): 1.38e-4 on an AMD EPYC without
    // AVX-512 (1.39e-4 at ATEN_CPU_CAPABILITY=default), which failed the old 1e-5 relative
    // bound (1.37e-4). 1e-4 relative (1.37e-3) keeps ~10x over that; `make test-portable`
    // records the margin on every run. Still 7x below the smallest edit (1e-2) we assert.
    assert_close(&r.latents.get(0).unsqueeze(0), inv.inversion.nti.x0.as_ref().unwrap(), 1e-4, "source row vs NTI");
}

fn tiny_subject(dir: &Path, n: i64) -> PathBuf {
    let d = 32;
    let c_s = seeded(9, || Tensor::randn([n, d], (Kind::Float, Device::Cpu)));
    let s = Subject {
        c_s,
        stepwise: vec![],
        timesteps: vec![],
        space: Space::Input,
        class_noun: "dog".into(),
        captions: vec!["a photo of a dog".into()],
        model: model_dir("tiny-a").display().to_string(),
        ddim_steps: 6,
    };
    let p = dir.join("subject.safetensors");
    s.save(&p).unwrap();
    p
}

#[test]
fn a_subject_changes_the_target_and_only_through_its_tokens() {
    let sd = sd();
    let tmp = tempfile::tempdir().unwrap();
    let subject = Subject::load(&tiny_subject(tmp.path(), 3)).unwrap();
    let inv = small_inversion(&sd, "a photo of a cat on a bench", 6, 2);
    let req = ReplaceRequest { source_word: "cat".into(), target_word: None, cross_replace: 1.0, self_replace: 0.0 };
    let r = replace(&sd, &inv.inversion, &req, Some(&subject)).unwrap();
    assert_eq!(r.swap.target_caption, "a photo of a dog on a bench", "the target word defaults to the class noun");
    let moved = (r.latents.get(1) - r.latents.get(0)).abs().max().double_value(&[]);
    check_min("the subject moves the target row", moved, 1e-2);
    assert_eq!(r.maps.len(), 2);
    // Saved and reloaded, the inversion gives the same edit, bit for bit (same ops, same shapes).
    save_inverted(tmp.path(), &inv).unwrap();
    let back = load_inversion(tmp.path(), Device::Cpu).unwrap();
    assert_eq!(back.meta, inv.inversion.meta);
    let r2 = replace(&sd, &back, &req, Some(&subject)).unwrap();
    assert!(r2.latents.equal(&r.latents));
}

// ---- CLI ------------------------------------------------------------------------------------

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hifi-tuner"));
    c.env_remove("RUST_BACKTRACE");
    c
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn base_args<'a>(model: &'a str, image: &'a str, caption: &'a str) -> Vec<&'a str> {
    vec![
        "--model",
        model,
        "--image",
        image,
        "--caption",
        caption,
        "--steps",
        "5",
        "--inner-steps",
        "2",
        "--device",
        "cpu",
    ]
}

fn assert_refused(o: &Output, needle: &str, dir: &Path) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "expected a failure: {e}");
    assert!(e.contains("error:") && e.contains(needle), "stderr should name {needle:?}: {e}");
    assert!(!e.contains("panicked"), "panic: {e}");
    let left: Vec<_> = std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(left.iter().all(|n| n.to_string_lossy().starts_with("keep")), "files written: {left:?}");
}

#[test]
fn invert_cli_writes_its_folder_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, image) = (model_dir("tiny-a"), fixtures().join("photos/dog/01.jpg"));
    let mut outs = Vec::new();
    for k in 0..2 {
        let out = tmp.path().join(format!("inv{k}"));
        let mut a = vec!["invert"];
        a.extend(base_args(s(&model), s(&image), "a photo of a dog"));
        a.extend(["--out", s(&out)]);
        let o = run(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        outs.push(out);
    }
    for f in ["inversion.safetensors", "source.png", "reconstruction.png", "inversion_log.jsonl"] {
        let (a, b) = (std::fs::read(outs[0].join(f)).unwrap(), std::fs::read(outs[1].join(f)).unwrap());
        assert!(a == b, "{f} differs between two identical runs");
    }
    let t = read_tensors(&outs[0].join("inversion.safetensors"));
    assert_eq!(t["x_T"].size(), [1, 4, 16, 16]);
    assert_eq!(t["phi"].size(), [5, 77, 32]);
    assert_eq!(Vec::<i64>::try_from(&t["timesteps"]).unwrap(), [801, 601, 401, 201, 1]);
    let log = std::fs::read_to_string(outs[0].join("inversion_log.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|r| r["inner_steps"].as_u64().unwrap() <= 2 && r["loss_first"].as_f64().is_some()));
    let meta = hifi_tuner::load::safetensors_metadata(&outs[0].join("inversion.safetensors")).unwrap();
    assert_eq!(meta["caption"], "a photo of a dog");
    assert_eq!((meta["height"].as_str(), meta["steps"].as_str(), meta["guidance"].as_str()), ("32", "5", "7.5"));
    assert_eq!(meta["image_sha256"].len(), 64);
}

#[test]
fn replace_cli_with_a_subject_and_a_reused_inversion() {
    let tmp = tempfile::tempdir().unwrap();
    let subject = tiny_subject(tmp.path(), 3);
    let (model, image) = (model_dir("tiny-a"), fixtures().join("photos/dog/00.jpg"));
    let cap = "a photo of a cat on a bench";
    let out = tmp.path().join("edit.png");
    let mut a = vec!["replace"];
    a.extend(base_args(s(&model), s(&image), cap));
    a.extend(["--source-word", "cat", "--subject", s(&subject), "--save-intermediates", "--out", s(&out)]);
    let o = run(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let inv_dir = tmp.path().join("edit-inversion");
    assert!(inv_dir.join("inversion.safetensors").is_file(), "the inversion is saved next to the output");
    let inter = tmp.path().join("edit-intermediates");
    for f in
        ["source.png", "reconstruction.png", "result.png", "map-source-word.png", "map-target-words.png", "strip.png"]
    {
        assert!(inter.join(f).is_file(), "{f}");
    }
    let strip = image::open(inter.join("strip.png")).unwrap();
    assert_eq!((strip.width(), strip.height()), (5 * 32, 32), "source, reconstruction, two maps, result");
    let params = hifi_tuner::io::png_text(&out).unwrap();
    assert!(
        params.iter().any(|(k, v)| k == "parameters" && v.starts_with("a photo of a dog on a bench")),
        "{params:?}"
    );
    // Reusing the inversion gives the same image.
    let out2 = tmp.path().join("again.png");
    let mut b = vec!["replace"];
    b.extend(base_args(s(&model), s(&image), cap));
    b.extend(["--source-word", "cat", "--subject", s(&subject), "--inversion", s(&inv_dir), "--out", s(&out2)]);
    let o = run(&b);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(image::open(&out).unwrap().to_rgb8(), image::open(&out2).unwrap().to_rgb8());
    assert!(!tmp.path().join("again-inversion").exists(), "a reused inversion is not written again");
}

#[test]
fn replace_cli_refuses_bad_input_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = tmp.path().join("keep");
    std::fs::create_dir(&keep).unwrap();
    let subject = tiny_subject(&keep, 5);
    let (model, image) = (model_dir("tiny-a"), fixtures().join("photos/dog/00.jpg"));
    let out = tmp.path().join("edit.png");
    let cap = "a photo of a cat on a bench";
    let go = |extra: &[&str], caption: &str, img: &Path| {
        let mut a = vec!["replace"];
        a.extend(base_args(s(&model), s(img), caption));
        a.extend(extra);
        a.extend(["--out", s(&out)]);
        run(&a)
    };
    // the source word is not in the caption: the caption's words are listed
    let o = go(&["--source-word", "horse", "--target-word", "dog"], cap, &image);
    assert_refused(&o, "a, photo, of, a, cat, on, a, bench", tmp.path());
    // no room for the subject's n positions
    let long = format!("a photo of a cat on a bench {}", "very ".repeat(68));
    let o = go(&["--source-word", "cat", "--subject", s(&subject)], &long, &image);
    assert_refused(&o, "subject tokens", tmp.path());
    // guidance ≤ 1
    let o = go(&["--source-word", "cat", "--target-word", "dog", "--guidance", "1"], cap, &image);
    assert_refused(&o, "--guidance > 1", tmp.path());
    // no target at all
    let o = go(&["--source-word", "cat"], cap, &image);
    assert_refused(&o, "--target-word", tmp.path());
    // an unreadable image
    let junk = keep.join("junk.jpg");
    std::fs::write(&junk, b"not a jpeg").unwrap();
    let o = go(&["--source-word", "cat", "--target-word", "dog"], cap, &junk);
    assert_refused(&o, "junk.jpg", tmp.path());
    // an inversion made for another caption and step count
    let inv = keep.join("inv");
    let o = run(&[
        "invert",
        "--model",
        s(&model),
        "--image",
        s(&image),
        "--caption",
        "a photo of a dog",
        "--steps",
        "4",
        "--inner-steps",
        "1",
        "--device",
        "cpu",
        "--out",
        s(&inv),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = go(&["--source-word", "cat", "--target-word", "dog", "--inversion", s(&inv)], cap, &image);
    assert_refused(&o, "caption", tmp.path());
    let o = go(&["--source-word", "dog", "--target-word", "cat", "--inversion", s(&inv)], "a photo of a dog", &image);
    assert_refused(&o, "steps", tmp.path());
    let other = fixtures().join("photos/dog/01.jpg");
    let o = go(&["--source-word", "dog", "--target-word", "cat", "--inversion", s(&inv)], "a photo of a dog", &other);
    assert_refused(&o, "image (SHA-256)", tmp.path());
}
