//! The schedulers match diffusers 0.42 step for step.
//!
//! Golden values come from `tools/reference/make_scheduler_fixtures.py` (real diffusers
//! `PNDMScheduler`, `DDIMScheduler`, `EulerDiscreteScheduler`), stored in
//! `tests/fixtures/schedulers/`. Tolerances:
//! - timesteps: exactly equal where diffusers' are integers; fractional ones (Euler's Karras,
//!   exponential, continuous) within that tolerance times max(1, |t|); `alphas_cumprod`, sigmas, `init_noise_sigma` within relative
//!   1e-6 (float32 rounding: torch's vectorised sqrt/log/pow are not correctly rounded), 1e-5
//!   with `rescale_betas_zero_snr`, whose cancellations amplify those last-bit differences;
//! - each `scale_model_input` and `step` output of a whole run on a (1, 4, 8, 8) float32 sample,
//!   each call fed diffusers' sample from the previous call: max abs difference at most 1e-5 * max(1, max |reference|) plus
//!   8 float32 ulps of the largest input value (Euler's first steps cancel values of size
//!   `init_noise_sigma`, up to 4096 with zero-SNR rescaling).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use tt_scale::schedulers::SchedulerError;
use tt_scale::schedulers::{BetaSchedule, SchedulerConfig, SchedulerKind, TimestepSpacing};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

/// One case of `cases.json` with its tensors.
struct Case {
    config: SchedulerConfig,
    steps: Vec<usize>,
    run_steps: usize,
    run_calls: usize,
    tensors: HashMap<String, Tensor>,
}

fn load_case(name: &str) -> Case {
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap())
            .unwrap();
    let entry = index["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name} in cases.json"));
    let config = SchedulerConfig::from_json(&entry["config"], name).unwrap();
    let tensors = candle_core::safetensors::load(
        fixture_dir().join(entry["file"].as_str().unwrap()),
        &Device::Cpu,
    )
    .unwrap();
    Case {
        config,
        steps: entry["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap() as usize)
            .collect(),
        run_steps: entry["run_steps"].as_u64().unwrap() as usize,
        run_calls: entry["run_calls"].as_u64().unwrap() as usize,
        tensors,
    }
}

impl Case {
    fn vec_f64(&self, key: &str) -> Vec<f64> {
        self.tensors[key]
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}

fn assert_close_rel(ours: &[f64], reference: &[f64], rel: f64, what: &str) {
    assert_eq!(ours.len(), reference.len(), "{what}: lengths differ");
    let mut worst = (0.0f64, 0usize);
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        let err = if a == b { 0.0 } else { (a - b).abs() / b.abs() };
        if err > worst.0 || err.is_nan() {
            worst = (err, i);
        }
    }
    let (err, i) = worst;
    assert!(
        err <= rel,
        "{what}: relative error {err:e} > {rel:e} at [{i}]: ours {}, diffusers {}",
        ours[i],
        reference[i]
    );
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Checks one output against diffusers'; `input_scale` is the largest magnitude among the
/// step's inputs (see the module docs for the tolerance).
fn assert_tensor_close(ours: &Tensor, reference: &Tensor, input_scale: f64, what: &str) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shapes differ");
    assert_eq!(ours.dtype(), reference.dtype(), "{what}: dtypes differ");
    let diff = max_abs(&(ours - reference).unwrap());
    let tol = 1e-5 * max_abs(reference).max(1.0) + 8.0 * f64::from(f32::EPSILON) * input_scale;
    assert!(diff <= tol, "{what}: max abs diff {diff:e} > {tol:e}");
}

/// Relative tolerance for schedule values (see the module docs).
fn schedule_tolerance(config: &SchedulerConfig) -> f64 {
    if config.rescale_betas_zero_snr {
        1e-5
    } else {
        1e-6
    }
}

fn check_alphas_cumprod(name: &str) {
    let case = load_case(name);
    let ours: Vec<f64> = case
        .config
        .alphas_cumprod()
        .iter()
        .map(|&a| f64::from(a))
        .collect();
    assert_close_rel(
        &ours,
        &case.vec_f64("alphas_cumprod"),
        schedule_tolerance(&case.config),
        "alphas_cumprod",
    );
}

fn check_timesteps(name: &str) {
    let case = load_case(name);
    let rel = schedule_tolerance(&case.config);
    for &n in &case.steps {
        let scheduler = case.config.build(n).unwrap();
        let ours = scheduler.timesteps();
        let reference = case.vec_f64(&format!("timesteps_{n}"));
        assert_eq!(
            ours.len(),
            reference.len(),
            "number of timesteps for {n} steps"
        );
        for (i, (&a, &b)) in ours.iter().zip(&reference).enumerate() {
            if b.fract() == 0.0 {
                assert_eq!(a, b, "timestep [{i}] for {n} steps");
            } else {
                assert!(
                    (a - b).abs() <= rel * b.abs().max(1.0),
                    "timestep [{i}] for {n} steps: ours {a}, diffusers {b}"
                );
            }
        }
        assert_close_rel(
            &[scheduler.init_noise_sigma()],
            &case.vec_f64(&format!("init_noise_sigma_{n}")),
            rel,
            &format!("init_noise_sigma for {n} steps"),
        );
    }
}

fn check_sigmas(name: &str) {
    let case = load_case(name);
    assert_eq!(case.config.kind, SchedulerKind::EulerDiscrete);
    for &n in &case.steps {
        let scheduler = tt_scale::schedulers::EulerDiscreteScheduler::new(&case.config, n).unwrap();
        let ours: Vec<f64> = scheduler.sigmas().iter().map(|&s| f64::from(s)).collect();
        assert_close_rel(
            &ours,
            &case.vec_f64(&format!("sigmas_{n}")),
            schedule_tolerance(&case.config),
            &format!("sigmas for {n} steps"),
        );
    }
}

fn check_run(name: &str) {
    let case = load_case(name);
    let mut scheduler = case.config.build(case.run_steps).unwrap();
    let timesteps = scheduler.timesteps().to_vec();
    assert_eq!(timesteps.len(), case.run_calls, "number of denoising calls");
    let noise = &case.tensors["run_noise"];
    let mut sample = noise.affine(scheduler.init_noise_sigma(), 0.0).unwrap();
    for (i, &t) in timesteps.iter().enumerate() {
        let model_output = &case.tensors[&format!("run_model_output_{i}")];
        let input_scale = max_abs(&sample).max(max_abs(model_output));
        let scaled = scheduler.scale_model_input(&sample, t).unwrap();
        assert_tensor_close(
            &scaled,
            &case.tensors[&format!("run_scaled_{i}")],
            input_scale,
            &format!("scale_model_input at call {i} (t = {t})"),
        );
        let prev = scheduler.step(model_output, t, &sample).unwrap();
        let reference = &case.tensors[&format!("run_prev_{i}")];
        assert_tensor_close(
            &prev,
            reference,
            input_scale,
            &format!("step at call {i} (t = {t})"),
        );
        // The next call starts from diffusers' sample, so each step is checked on its own.
        sample = reference.clone();
    }
}

/// Generates the parity tests for one fixture case.
macro_rules! parity_case {
    ($name:ident) => {
        mod $name {
            #[test]
            fn alphas_cumprod_match_diffusers() {
                super::check_alphas_cumprod(stringify!($name));
            }

            #[test]
            fn timesteps_and_init_noise_sigma_match_diffusers() {
                super::check_timesteps(stringify!($name));
            }

            #[test]
            fn every_step_matches_diffusers() {
                super::check_run(stringify!($name));
            }
        }
    };
}

parity_case!(pndm_sd15);
parity_case!(pndm_sd15_prk);
parity_case!(pndm_linear_linspace_v_prediction);
parity_case!(pndm_trailing);
parity_case!(ddim_sd15);
parity_case!(ddim_defaults_clip);
parity_case!(ddim_trailing_v_prediction_zero_snr);
parity_case!(ddim_cosine_linspace_sample);
parity_case!(euler_sd15);
parity_case!(euler_sdxl);
parity_case!(euler_sdxl_linspace);
parity_case!(euler_sdxl_trailing);
parity_case!(euler_sdxl_v_prediction);
parity_case!(euler_sdxl_karras);
parity_case!(euler_exponential_sigma_min);
parity_case!(euler_log_linear);
parity_case!(euler_zero_snr_v_continuous);
parity_case!(euler_sample_prediction);

/// Euler's sigma schedules, per fixture case.
mod euler_sigmas_match_diffusers {
    macro_rules! sigma_case {
        ($name:ident) => {
            #[test]
            fn $name() {
                super::check_sigmas(stringify!($name));
            }
        };
    }

    sigma_case!(euler_sd15);
    sigma_case!(euler_sdxl);
    sigma_case!(euler_sdxl_linspace);
    sigma_case!(euler_sdxl_trailing);
    sigma_case!(euler_sdxl_v_prediction);
    sigma_case!(euler_sdxl_karras);
    sigma_case!(euler_exponential_sigma_min);
    sigma_case!(euler_log_linear);
    sigma_case!(euler_zero_snr_v_continuous);
    sigma_case!(euler_sample_prediction);
}

// ---- configuration ----

/// SD 1.5's `scheduler/scheduler_config.json`.
fn sd15_config() -> Value {
    json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null,
        "clip_sample": false
    })
}

fn with(mut config: Value, key: &str, value: Value) -> Value {
    config[key] = value;
    config
}

#[test]
fn from_file_reads_sd15_scheduler_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(&path, sd15_config().to_string()).unwrap();
    let config = SchedulerConfig::from_file(&path).unwrap();
    assert_eq!(config.kind, SchedulerKind::Pndm);
    assert!(config.skip_prk_steps);
    assert_eq!(config.steps_offset, 1);
    let scheduler = config.build(4).unwrap();
    assert_eq!(scheduler.timesteps(), &[751.0, 501.0, 501.0, 251.0, 1.0]);
}

#[test]
fn missing_keys_take_the_class_defaults() {
    let ddim = SchedulerConfig::from_json(&json!({"_class_name": "DDIMScheduler"}), "x").unwrap();
    assert!(ddim.clip_sample && ddim.set_alpha_to_one);
    assert_eq!(ddim.timestep_spacing, TimestepSpacing::Leading);
    assert_eq!(ddim.beta_schedule, BetaSchedule::Linear);
    assert_eq!((ddim.beta_start, ddim.beta_end), (0.0001, 0.02));
    let pndm = SchedulerConfig::from_json(&json!({"_class_name": "PNDMScheduler"}), "x").unwrap();
    assert!(!pndm.set_alpha_to_one && !pndm.skip_prk_steps);
    let euler =
        SchedulerConfig::from_json(&json!({"_class_name": "EulerDiscreteScheduler"}), "x").unwrap();
    assert_eq!(euler.timestep_spacing, TimestepSpacing::Linspace);
    assert_eq!(euler.num_train_timesteps, 1000);
}

#[test]
fn keys_the_class_does_not_use_are_ignored() {
    // SD 1.5's config used as DDIM (as `DDIMScheduler.from_config` does) keeps skip_prk_steps;
    // Euler ignores thresholding, which it does not have.
    let ddim = with(sd15_config(), "_class_name", json!("DDIMScheduler"));
    assert!(SchedulerConfig::from_json(&ddim, "x").is_ok());
    let euler = with(
        with(
            sd15_config(),
            "_class_name",
            json!("EulerDiscreteScheduler"),
        ),
        "thresholding",
        json!(true),
    );
    assert!(SchedulerConfig::from_json(&euler, "x").is_ok());
}

#[test]
fn trained_betas_replace_the_beta_schedule() {
    let betas: Vec<f64> = (0..10).map(|i| 0.01 + 0.01 * i as f64).collect();
    let config = json!({
        "_class_name": "DDIMScheduler", "num_train_timesteps": 10, "trained_betas": betas
    });
    let config = SchedulerConfig::from_json(&config, "x").unwrap();
    let expected: Vec<f32> = betas.iter().map(|&b| b as f32).collect();
    assert_eq!(config.betas(), expected);
}

// ---- errors ----

fn expect_unsupported(config: Value, source: &str, key: &str) {
    match SchedulerConfig::from_json(&config, source) {
        Err(SchedulerError::Unsupported(message)) => {
            assert!(message.contains(source), "{message}");
            assert!(message.contains(key), "{message}");
        }
        other => panic!("expected Unsupported naming {key}, got {other:?}"),
    }
}

#[test]
fn unknown_scheduler_class_is_an_error_naming_file_and_key() {
    let config = with(sd15_config(), "_class_name", json!("LMSDiscreteScheduler"));
    expect_unsupported(config, "sd/scheduler_config.json", "_class_name");
}

#[test]
fn unknown_beta_schedule_is_an_error_naming_file_and_key() {
    let config = with(sd15_config(), "beta_schedule", json!("sigmoid"));
    expect_unsupported(config, "sd/scheduler_config.json", "beta_schedule");
}

#[test]
fn unknown_timestep_spacing_is_an_error() {
    let config = with(sd15_config(), "timestep_spacing", json!("middle"));
    expect_unsupported(config, "cfg.json", "timestep_spacing");
}

#[test]
fn pndm_rejects_sample_prediction() {
    let config = with(sd15_config(), "prediction_type", json!("sample"));
    expect_unsupported(config, "cfg.json", "prediction_type");
}

#[test]
fn ddim_thresholding_is_unsupported() {
    let config = with(
        with(sd15_config(), "_class_name", json!("DDIMScheduler")),
        "thresholding",
        json!(true),
    );
    expect_unsupported(config, "cfg.json", "thresholding");
}

#[test]
fn euler_beta_sigmas_are_unsupported() {
    let config = with(
        with(
            sd15_config(),
            "_class_name",
            json!("EulerDiscreteScheduler"),
        ),
        "use_beta_sigmas",
        json!(true),
    );
    expect_unsupported(config, "cfg.json", "use_beta_sigmas");
}

#[test]
fn missing_config_file_is_a_model_file_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    match SchedulerConfig::from_file(&path) {
        Err(SchedulerError::ModelFile { path: p, .. }) => assert_eq!(p, path.display().to_string()),
        other => panic!("expected ModelFile, got {other:?}"),
    }
}

#[test]
fn invalid_json_is_a_model_file_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(&path, "{not json").unwrap();
    assert!(matches!(
        SchedulerConfig::from_file(&path),
        Err(SchedulerError::ModelFile { .. })
    ));
}

#[test]
fn missing_class_name_is_a_model_file_error() {
    let config = json!({"beta_start": 0.001});
    match SchedulerConfig::from_json(&config, "cfg.json") {
        Err(SchedulerError::ModelFile { path, message }) => {
            assert_eq!(path, "cfg.json");
            assert!(message.contains("_class_name"), "{message}");
        }
        other => panic!("expected ModelFile, got {other:?}"),
    }
}

#[test]
fn value_of_wrong_type_is_an_error_naming_the_key() {
    let config = with(sd15_config(), "beta_start", json!("0.00085"));
    match SchedulerConfig::from_json(&config, "cfg.json") {
        Err(SchedulerError::ModelFile { path, message }) => {
            assert_eq!(path, "cfg.json");
            assert!(message.contains("beta_start"), "{message}");
        }
        other => panic!("expected ModelFile, got {other:?}"),
    }
}

#[test]
fn zero_inference_steps_is_an_invalid_argument() {
    let config = SchedulerConfig::from_json(&sd15_config(), "x").unwrap();
    assert!(matches!(
        config.build(0),
        Err(SchedulerError::InvalidArgument(_))
    ));
}

#[test]
fn ddim_rejects_more_steps_than_training_timesteps() {
    let config = with(sd15_config(), "_class_name", json!("DDIMScheduler"));
    let config = SchedulerConfig::from_json(&config, "x").unwrap();
    assert!(matches!(
        config.build(1001),
        Err(SchedulerError::InvalidArgument(_))
    ));
}

#[test]
fn pndm_runge_kutta_warm_up_needs_four_steps() {
    let config = with(sd15_config(), "skip_prk_steps", json!(false));
    let config = SchedulerConfig::from_json(&config, "x").unwrap();
    assert!(matches!(
        config.build(3),
        Err(SchedulerError::InvalidArgument(_))
    ));
    assert!(config.build(4).is_ok());
}

#[test]
fn euler_rejects_a_timestep_outside_its_schedule() {
    let config = with(
        sd15_config(),
        "_class_name",
        json!("EulerDiscreteScheduler"),
    );
    let mut scheduler = SchedulerConfig::from_json(&config, "x")
        .unwrap()
        .build(4)
        .unwrap();
    let sample = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(scheduler.scale_model_input(&sample, 123.5).is_err());
    assert!(scheduler.step(&sample, 123.5, &sample).is_err());
}

#[test]
fn euler_rejects_a_step_after_the_last() {
    let config = with(
        sd15_config(),
        "_class_name",
        json!("EulerDiscreteScheduler"),
    );
    let mut scheduler = SchedulerConfig::from_json(&config, "x")
        .unwrap()
        .build(2)
        .unwrap();
    let sample = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let timesteps = scheduler.timesteps().to_vec();
    for &t in &timesteps {
        scheduler.step(&sample, t, &sample).unwrap();
    }
    assert!(scheduler.step(&sample, timesteps[1], &sample).is_err());
}

// ---- dtypes ----

/// Runs a whole schedule on `dtype` samples and on F32 samples; returns (ours, f32 result).
fn run_in(config: Value, dtype: DType) -> (Tensor, Tensor) {
    let config = SchedulerConfig::from_json(&config, "x").unwrap();
    let noise = Tensor::randn(0f32, 1f32, (1, 4, 4, 4), &Device::Cpu).unwrap();
    let mut results = Vec::new();
    for dt in [dtype, DType::F32] {
        let mut scheduler = config.build(5).unwrap();
        let mut sample = noise
            .affine(scheduler.init_noise_sigma(), 0.0)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        for (i, t) in scheduler.timesteps().to_vec().into_iter().enumerate() {
            let model_input = scheduler.scale_model_input(&sample, t).unwrap();
            assert_eq!(model_input.dtype(), dt);
            let model_output = model_input.affine(0.1 * (i as f64 + 1.0), 0.05).unwrap();
            sample = scheduler.step(&model_output, t, &sample).unwrap();
            assert_eq!(sample.dtype(), dt);
        }
        results.push(sample);
    }
    let f32_result = results.pop().unwrap();
    (results.pop().unwrap(), f32_result)
}

fn assert_half_close(config: Value) {
    for dtype in [DType::F16, DType::BF16] {
        let (half, full) = run_in(config.clone(), dtype);
        let diff = max_abs(&(half.to_dtype(DType::F32).unwrap() - &full).unwrap());
        assert!(
            diff <= 0.05 * max_abs(&full).max(1.0),
            "{dtype:?}: diff {diff}"
        );
    }
}

#[test]
fn pndm_steps_half_precision_samples_in_their_own_dtype() {
    assert_half_close(sd15_config());
}

#[test]
fn ddim_steps_half_precision_samples_in_their_own_dtype() {
    assert_half_close(with(sd15_config(), "_class_name", json!("DDIMScheduler")));
}

#[test]
fn euler_steps_half_precision_samples_in_their_own_dtype() {
    assert_half_close(with(
        sd15_config(),
        "_class_name",
        json!("EulerDiscreteScheduler"),
    ));
}

#[test]
fn more_steps_than_training_timesteps_are_refused_for_every_scheduler() {
    for class in [
        "PNDMScheduler",
        "DDIMScheduler",
        "EulerDiscreteScheduler",
        "DPMSolverMultistepScheduler",
    ] {
        let config = with(sd15_config(), "_class_name", json!(class));
        let config = with(config, "num_train_timesteps", json!(50));
        let config = SchedulerConfig::from_json(&config, "x").unwrap();
        match config.build(51) {
            Err(SchedulerError::InvalidArgument(m)) => {
                assert!(m.contains("num_train_timesteps = 50"), "{class}: {m}")
            }
            Err(e) => panic!("{class}: expected InvalidArgument, got {e:?}"),
            Ok(_) => panic!("{class}: 51 steps of a 50-step schedule were accepted"),
        }
        assert!(config.build(50).is_ok(), "{class}");
    }
}
