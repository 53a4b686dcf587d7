//! One step of search over paths against diffusers, on the tiny SD 1.5 (PNDM) and Flux
//! (flow-matching Euler) models: a sample at level 7 of a 10-step schedule is re-noised to
//! level 2 with a given noise (the forward process), then denoised back to level 5 with the
//! pipeline's scheduler started fresh there; the latents and the last call's clean-sample
//! prediction must match.
//!
//! Fixtures: `tests/fixtures/paths/` (reference.safetensors, meta.json), written by
//! `tools/reference/make_paths_fixtures.py` from the tiny models, in fp32 and fp64.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tt_scale::loading::Dtype;
use tt_scale::loading::ModelSource;
use tt_scale::noise::Noise;
use tt_scale::pipelines::flux::FluxPipeline;
use tt_scale::pipelines::sd15::Sd15Pipeline;
use tt_scale::pipelines::{CallArgs, ImagePipeline};
use tt_scale::schedulers::levels::renoise;

const PROMPT: &str = "a photo of a cat sitting on a red chair, highly detailed";
/// The levels of the fixture: the sample's, the one it is re-noised to, the one it is
/// denoised back to.
const A: usize = 7;
const B: usize = 2;
const C: usize = 5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("paths/reference.safetensors"), &Device::Cpu)
        .unwrap()
}

fn noise_of(t: &Tensor) -> Noise {
    Noise {
        shape: t.dims().to_vec(),
        data: t.flatten_all().unwrap().to_vec1().unwrap(),
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Re-noises and denoises as a paths stage does and compares with the references of
/// `case`: ours against the fp64 run within `tol`, reported beside the fp32 run's own
/// distance to it. Returns the span's evaluations.
fn check_step(pipeline: &mut dyn ImagePipeline, case: &str, tol: [f64; 3]) -> usize {
    let r = reference();
    let get = |name: &str| r[&format!("{case}.{name}")].clone();
    pipeline.set_prompt(PROMPT).unwrap();
    let schedule = pipeline.schedule().unwrap();
    let x_a = pipeline.noise_latents(&[noise_of(&get("x_a"))]).unwrap();
    let eps = pipeline.noise_latents(&[noise_of(&get("eps"))]).unwrap();
    let renoised = renoise(&x_a, &schedule.levels[A], &schedule.levels[B], &eps).unwrap();
    let span = pipeline.denoise_span(&renoised, B, C).unwrap();
    for ((name, ours), tol) in [
        ("renoised", &renoised),
        ("latents", &span.latents),
        ("x0", &span.x0),
    ]
    .into_iter()
    .zip(tol)
    {
        let exact = get(&format!("{name}_f64"));
        let ours_err = max_abs_diff(ours, &exact);
        let torch_err = max_abs_diff(&get(name), &exact);
        eprintln!("{case}.{name}: ours {ours_err:.3e}, torch fp32 {torch_err:.3e} from fp64");
        assert!(ours_err <= tol, "{case}.{name}: {ours_err:e} > {tol:e}");
    }
    span.evaluations
}

#[test]
fn sd15_paths_step_matches_diffusers_pndm_restarted_mid_schedule() {
    let args = CallArgs {
        height: Some(64),
        width: Some(64),
        num_inference_steps: Some(10),
        guidance_scale: Some(7.5),
        ..Default::default()
    };
    let dir = fixtures().join("tiny-sd15");
    let mut p =
        Sd15Pipeline::load(&ModelSource::Local(dir), Dtype::F32, &Device::Cpu, &args).unwrap();
    let levels = p.schedule().unwrap().levels;
    let timesteps: Vec<i64> = reference()["sd15.timesteps"].to_vec1().unwrap();
    let ours: Vec<i64> = levels[..10].iter().map(|l| l.timestep as i64).collect();
    assert_eq!(ours, timesteps);
    // PLMS restarted at level 2 visits 701, 601, 601, 501: four guided calls.
    let evaluations = check_step(&mut p, "sd15", [1e-6, 2e-5, 5e-5]);
    assert_eq!(evaluations, 4 * 2);
}

#[test]
fn flux_paths_step_matches_diffusers_flow_match_from_a_begin_index() {
    let args = CallArgs {
        height: Some(32),
        width: Some(32),
        num_inference_steps: Some(10),
        guidance_scale: Some(3.5),
        max_sequence_length: Some(16),
        ..Default::default()
    };
    let source = ModelSource::Local(fixtures().join("tiny-flux"));
    let mut p = FluxPipeline::load(source, Dtype::F32, &Device::Cpu, &args, false).unwrap();
    let sigmas: Vec<f32> = reference()["flux.sigmas"].to_vec1().unwrap();
    let ours: Vec<f32> = p
        .schedule()
        .unwrap()
        .levels
        .iter()
        .map(|l| l.sigma as f32)
        .collect();
    assert_eq!(ours, sigmas);
    let evaluations = check_step(&mut p, "flux", [1e-6, 2e-5, 5e-5]);
    assert_eq!(evaluations, 3);
}
