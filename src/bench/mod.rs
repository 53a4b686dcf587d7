//! `tt-scale bench`: times one denoiser step of each model's real-size architecture with random
//! weights (nothing is downloaded), on the chosen device and dtype.
//!
//! Each model family provides a step benchmark: it builds its network from a [`RandomWeights`]
//! var builder and runs one step; this module times it (warm-up, then the median of repeats).
//! [`search`] times a whole default search end to end (generation overlapped with grading);
//! [`ops`] times the denoisers' hot operations one by one, fused and unfused.

pub mod clip;
pub mod models;
pub mod ops;
pub mod qwen;
pub mod search;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde::Serialize;

use crate::pipelines::PipelineError;

/// What to time.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Images per step (classifier-free guidance doubles the rows where the model uses it).
    pub batch: usize,
    /// Compute dtype.
    pub dtype: DType,
    /// Where to run.
    pub device: Device,
    /// Untimed warm-up steps.
    pub warmup: usize,
    /// Timed steps.
    pub iters: usize,
    /// Run only this many transformer blocks / layers where the model allows it (to fit a
    /// small machine); `None` for the real depth.
    pub layers: Option<usize>,
    /// `search`: denoiser steps per image (the default config's Flux.1-dev: 28).
    pub search_steps: usize,
    /// `search`: the stand-in API verifier's latency per call, milliseconds.
    pub verifier_latency_ms: u64,
}

/// The timing of one benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// What was timed, e.g. `flux.1-dev transformer step`.
    pub name: String,
    /// Median milliseconds per step.
    pub median_ms: f64,
    /// Fastest step, milliseconds.
    pub min_ms: f64,
    /// Slowest step, milliseconds.
    pub max_ms: f64,
    /// Timed steps.
    pub iters: usize,
    /// Parameters of the network as built (with `layers`, the reduced depth).
    pub parameters: usize,
    /// Free-form details (shapes, depth).
    pub details: String,
    /// Arithmetic rate at the median, 10^12 floating-point operations per second, where the
    /// benchmark counts its operations (`ops`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tflop_s: Option<f64>,
    /// Memory rate at the median, 10^9 bytes per second, where the benchmark counts the bytes it
    /// must move (`ops`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gb_s: Option<f64>,
}

/// A var builder backend that makes every weight on demand: normal(0, 0.02) for matrices and
/// convolutions, ones for norm scales, zeros for biases, so random-weight networks of any size
/// can be built without files.
pub struct RandomWeights {
    count: Arc<AtomicUsize>,
}

/// The number of parameters a [`RandomWeights`] var builder has made so far.
#[derive(Clone, Debug)]
pub struct ParameterCounter(Arc<AtomicUsize>);

impl ParameterCounter {
    /// Parameters made so far.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl RandomWeights {
    /// A var builder over random weights in `dtype` on `device`, and the counter of the
    /// parameters it makes.
    pub fn var_builder(dtype: DType, device: &Device) -> (VarBuilder<'static>, ParameterCounter) {
        let count = Arc::new(AtomicUsize::new(0));
        let vb = VarBuilder::from_backend(
            Box::new(RandomWeights {
                count: count.clone(),
            }),
            dtype,
            device.clone(),
        );
        (vb, ParameterCounter(count))
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.count.fetch_add(s.elem_count(), Ordering::Relaxed);
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let is_norm = name.contains("norm") || name.contains("ln_") || leaf == "scale";
        let t = if leaf == "bias" || leaf == "beta" {
            Tensor::zeros(s, dtype, dev)?
        } else if is_norm && s.rank() == 1 {
            Tensor::ones(s, dtype, dev)?
        } else {
            Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)?
        };
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need the shape of {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Times `step` (after `warmup` untimed calls), synchronising the device around each call.
pub fn time_steps(
    name: &str,
    opts: &BenchOptions,
    parameters: usize,
    details: String,
    mut step: impl FnMut() -> candle_core::Result<()>,
) -> Result<BenchReport, PipelineError> {
    for _ in 0..opts.warmup {
        step()?;
        opts.device.synchronize()?;
    }
    let mut times = Vec::with_capacity(opts.iters.max(1));
    for _ in 0..opts.iters.max(1) {
        opts.device.synchronize()?;
        let t = Instant::now();
        step()?;
        opts.device.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(BenchReport {
        name: name.to_string(),
        median_ms: times[times.len() / 2],
        min_ms: times[0],
        max_ms: times[times.len() - 1],
        iters: times.len(),
        parameters,
        details,
        tflop_s: None,
        gb_s: None,
    })
}

/// The benchmarks `tt-scale bench --model` can run.
pub const MODELS: &[&str] = &[
    "sd15",
    "flux",
    "pixart-sigma",
    "sdxl",
    "sdxl-vae",
    "qwen",
    "clip-l14",
    "image-reward",
    "search",
    "ops",
];

/// Runs the step benchmark of `model` (one of [`MODELS`]).
pub fn run_model(model: &str, opts: &BenchOptions) -> Result<Vec<BenchReport>, PipelineError> {
    match model {
        "sd15" => models::sd15_unet_step(opts).map(|r| vec![r]),
        "flux" => models::flux_transformer_step(opts),
        "sdxl" => models::sdxl_unet_step(opts),
        "sdxl-vae" => models::sdxl_vae_decode(opts).map(|r| vec![r]),
        "pixart-sigma" => models::pixart_transformer_step(opts),
        "qwen" => qwen::bench_score_image(opts),
        "clip-l14" => clip::bench_clip_scoring(opts).map(|r| vec![r]),
        "image-reward" => clip::bench_image_reward(opts).map(|r| vec![r]),
        "search" => search::bench_search(opts),
        "ops" => ops::bench_ops(opts),
        other => Err(PipelineError::InvalidArgument(format!(
            "no benchmark named {other}; choose one of: {}",
            MODELS.join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_follow_the_layer_kind_and_are_counted() {
        let (vb, count) = RandomWeights::var_builder(DType::F32, &Device::Cpu);
        let w = vb.get((64, 32), "proj.weight").unwrap();
        let b = vb.get(64, "proj.bias").unwrap();
        let n = vb.get(32, "norm1.weight").unwrap();
        assert_eq!(count.get(), 64 * 32 + 64 + 32);
        let std = w
            .flatten_all()
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((std - 0.02).abs() < 0.003, "{std}");
        assert_eq!(b.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(n.sum_all().unwrap().to_scalar::<f32>().unwrap(), 32.0);
    }

    #[test]
    fn timing_reports_the_median_of_the_timed_steps() {
        let opts = BenchOptions {
            height: 8,
            width: 8,
            batch: 1,
            dtype: DType::F32,
            device: Device::Cpu,
            warmup: 2,
            iters: 5,
            layers: None,
            search_steps: 1,
            verifier_latency_ms: 0,
        };
        let mut calls = 0;
        let r = time_steps("noop", &opts, 0, String::new(), || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 7);
        assert_eq!(r.iters, 5);
        assert!(r.min_ms <= r.median_ms && r.median_ms <= r.max_ms);
    }
}
