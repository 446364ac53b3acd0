//! DDIM against diffusers' own published expectations (diffusers'
//! `tests/schedulers/test_scheduler_ddim.py`: the full-loop sums and means, and the timesteps),
//! plus weight-free invariants of F^(t) and F^-1.

mod common;
use common::check_tol;

use hifi_tuner::scheduler::{DdimScheduler, SchedulerConfig};
use tch::{Kind, Tensor};

fn config(json: &str) -> SchedulerConfig {
    serde_json::from_str(json).unwrap()
}

/// diffusers' `dummy_sample_deter`: (4, 3, 8, 8), arange / n laid out channel-major.
fn sample_deter() -> Tensor {
    let n = 4 * 3 * 8 * 8;
    (Tensor::arange(n, (Kind::Int64, tch::Device::Cpu)).reshape([3, 8, 8, 4]) / n as f64)
        .to_kind(Kind::Float)
        .permute([3, 0, 1, 2])
}

/// diffusers' `dummy_model`: sample · t / (t + 1).
fn dummy_model(sample: &Tensor, t: i64) -> Tensor {
    let t = Tensor::from(t).reshape([-1, 1, 1, 1]).to_kind(Kind::Float);
    sample * &t / (&t + 1.0)
}

/// diffusers' `get_scheduler_config(**overrides)` for the DDIM tests.
fn full_loop(overrides: &str) -> (f64, f64) {
    let mut cfg: serde_json::Value = serde_json::from_str(
        r#"{"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
            "beta_schedule": "linear", "clip_sample": true}"#,
    )
    .unwrap();
    let extra: serde_json::Map<String, serde_json::Value> = serde_json::from_str(overrides).unwrap();
    cfg.as_object_mut().unwrap().extend(extra);
    let s = DdimScheduler::new(serde_json::from_value(cfg).unwrap(), 10).unwrap();
    let mut x = sample_deter();
    for &t in &s.timesteps {
        x = s.step(&dummy_model(&x, t), t, &x);
    }
    (x.abs().sum(Kind::Double).double_value(&[]), x.abs().mean(Kind::Double).double_value(&[]))
}

#[test]
fn full_loop_matches_diffusers_published_values() {
    // (extra config, result_sum, result_mean) as asserted by diffusers' DDIM tests.
    let cases = [
        ("{}", 172.0067, 0.223967),
        (r#"{"prediction_type": "v_prediction"}"#, 52.5302, 0.0684),
        (r#"{"set_alpha_to_one": true, "beta_start": 0.01}"#, 149.8295, 0.1951),
        (r#"{"set_alpha_to_one": false, "beta_start": 0.01}"#, 149.0784, 0.1941),
    ];
    for (extra, sum, mean) in cases {
        let (s, m) = full_loop(extra);
        check_tol(&format!("{extra}: sum"), (s - sum).abs(), 1e-2);
        check_tol(&format!("{extra}: mean"), (m - mean).abs(), 1e-3);
    }
}

#[test]
fn timesteps_match_diffusers() {
    let s = DdimScheduler::new(config(r#"{"steps_offset": 1}"#), 5).unwrap();
    assert_eq!(s.timesteps, vec![801, 601, 401, 201, 1]);
    // Values printed by diffusers 0.42.1 DDIMScheduler(timestep_spacing=…, steps_offset=1).set_timesteps(7).
    let expect: [(&str, [i64; 7]); 3] = [
        ("linspace", [999, 832, 666, 500, 333, 166, 0]),
        ("trailing", [999, 856, 713, 570, 428, 285, 142]),
        ("leading", [853, 711, 569, 427, 285, 143, 1]),
    ];
    for (spacing, ts) in expect {
        let json = format!(r#"{{"timestep_spacing": "{spacing}", "steps_offset": 1}}"#);
        let s = DdimScheduler::new(config(&json), 7).unwrap();
        assert_eq!(s.timesteps, ts.to_vec(), "{spacing}");
        assert_eq!(s.inverse_timesteps(), ts.iter().rev().copied().collect::<Vec<_>>());
    }
}

fn sd_scheduler(steps: usize) -> DdimScheduler {
    let json = r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1}"#;
    DdimScheduler::new(config(json), steps).unwrap()
}

/// With an exact ε (the one that made x_t from x_0), F^(t) lands on the DDPM marginal of x_0
/// at the previous timestep, and F^-1 undoes F^(t) for a fixed ε.
#[test]
fn step_and_inverse_step_are_consistent() {
    let s = sd_scheduler(20);
    let (x0, eps) = hifi_tuner::rng::seeded(3, || {
        (
            Tensor::randn([2, 4, 6, 5], (Kind::Float, tch::Device::Cpu)),
            Tensor::randn([2, 4, 6, 5], (Kind::Float, tch::Device::Cpu)),
        )
    });
    let t = s.timesteps[5];
    let prev = s.timesteps[6];
    let xt = s.add_noise(&x0, &eps, &Tensor::from_slice(&[t, t]));
    let x_prev = s.step(&eps, t, &xt);
    let expect = s.add_noise(&x0, &eps, &Tensor::from_slice(&[prev, prev]));
    let err = (&x_prev - &expect).abs().max().double_value(&[]);
    check_tol("DDIM step with the true ε", err, 1e-5);
    // F^-1 at t maps x_{t-stride} back to x_t for the same ε.
    let back = s.inverse_step(&eps, t, &x_prev);
    let err = (&back - &xt).abs().max().double_value(&[]);
    check_tol("inverse step", err, 1e-5);
}

#[test]
fn bad_configs_and_step_counts_are_refused() {
    assert!(DdimScheduler::new(config(r#"{"beta_schedule": "sigmoid"}"#), 10).is_err());
    assert!(DdimScheduler::new(config(r#"{"prediction_type": "flow"}"#), 10).is_err());
    assert!(DdimScheduler::new(config("{}"), 0).is_err());
    assert!(DdimScheduler::new(config("{}"), 1001).is_err());
}
