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
use tt_scale::pipelines::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
use tt_scale::pipelines::PipelineError;

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
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap(),
    )
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
    assert_close_rel(&ours, &case.vec_f64("alphas_cumprod"), schedule_tolerance(&case.config), "alphas_cumprod");
}

fn check_timesteps(name: &str) {
    let case = load_case(name);
    let rel = schedule_tolerance(&case.config);
    for &n in &case.steps {
        let scheduler = case.config.build(n).unwrap();
        let ours = scheduler.timesteps();
        let reference = case.vec_f64(&format!("timesteps_{n}"));
        assert_eq!(ours.len(), reference.len(), "number of timesteps for {n} steps");
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
        let scheduler =
            tt_scale::pipelines::schedulers::EulerDiscreteScheduler::new(&case.config, n).unwrap();
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
        assert_tensor_close(&prev, reference, input_scale, &format!("step at call {i} (t = {t})"));
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
