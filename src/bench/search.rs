//! `tt-scale bench --model search`: a whole default search, timed end to end.
//!
//! The default config's search (random search, 4 rounds: 2 + 4 + 8 + 16 = 30 images, one image
//! per pipeline call) runs through the real search code ([`crate::search::search_prompt`]),
//! with a pipeline whose every image costs `steps` Flux.1-dev transformer steps (the real
//! architecture, `layers` deep, random weights) and a stand-in for an API verifier that answers
//! each call after `verifier_latency`. It runs twice: with generation and grading overlapped
//! (the default) and one after the other (`--low-vram`), and reports both wall times beside the
//! pure generation time, so the share of verification left visible is
//! `(wall - generation) / generation`.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use image::RgbImage;

use super::{BenchOptions, BenchReport, RandomWeights};
use crate::models::flux_transformer::{latent_image_ids, FluxConfig, FluxTransformer, Rope};
use crate::noise::Noise;
use crate::noise::RandnKernel;
use crate::pipelines::{ImagePipeline, Pipeline, PipelineError};
use crate::search::random::RandomArgs;
use crate::search::SearchMethod;
use crate::search::{
    search_prompt, ObserverError, RoundResult, SearchError, SearchObserver, SearchSettings,
};
use crate::verifiers::{Grading, Score, ScoreFailure, Verifier, VerifierInput, METRICS};

/// Rounds of the default config (`search_args.search_rounds`).
pub const ROUNDS: usize = 4;

/// A pipeline whose images cost `steps` Flux transformer steps each (the images themselves are
/// blank: only the time matters).
struct FluxStepsPipeline {
    model: FluxTransformer,
    img: Tensor,
    txt: Tensor,
    pooled: Tensor,
    rope: Rope,
    steps: usize,
    noise_shape: Vec<usize>,
}

impl ImagePipeline for FluxStepsPipeline {
    fn noise_shape(&self) -> Vec<usize> {
        self.noise_shape.clone()
    }

    fn set_prompt(&mut self, _prompt: &str) -> Result<(), PipelineError> {
        Ok(())
    }

    fn generate(&mut self, noises: &[Noise]) -> Result<Vec<RgbImage>, PipelineError> {
        let n = noises.len();
        let img = self.img.repeat((n, 1, 1))?;
        let txt = self.txt.repeat((n, 1, 1))?;
        let pooled = self.pooled.repeat((n, 1))?;
        let t = vec![500f32; n];
        let g = vec![3500f32; n];
        for _ in 0..self.steps {
            let vec = self.model.conditioning(&t, Some(&g), &pooled)?;
            self.model.forward(&img, &txt, &vec, &self.rope)?;
        }
        img.device().synchronize()?;
        Ok(vec![RgbImage::new(16, 16); n])
    }
}

/// An API verifier stand-in: every call (one batch) is answered after a fixed latency with a
/// valid grading.
struct LatencyVerifier {
    latency: Duration,
}

impl Verifier for LatencyVerifier {
    fn name(&self) -> &str {
        "latency"
    }

    fn score(&self, inputs: &[VerifierInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
        std::thread::sleep(self.latency);
        inputs
            .iter()
            .map(|_| {
                Ok(METRICS
                    .iter()
                    .map(|m| {
                        let score = Score {
                            explanation: String::new(),
                            score: 5.0,
                        };
                        (m.to_string(), score)
                    })
                    .collect())
            })
            .collect()
    }
}

/// Sums the rounds' generation time.
#[derive(Default)]
struct Totals {
    generation_s: f64,
    images: usize,
}

impl SearchObserver for Totals {
    fn round_finished(&mut self, _prompt: &str, result: &RoundResult) -> Result<(), ObserverError> {
        self.generation_s += result.generation_s;
        self.images += result.candidates.len();
        Ok(())
    }
}

fn report(name: &str, ms: f64, parameters: usize, details: String) -> BenchReport {
    BenchReport {
        name: name.to_string(),
        median_ms: ms,
        min_ms: ms,
        max_ms: ms,
        iters: 1,
        parameters,
        details,
        tflop_s: None,
        gb_s: None,
    }
}

/// Runs the default search twice (overlapped, then sequential) and reports the pure generation
/// time and both wall times, in milliseconds.
pub fn bench_search(opts: &BenchOptions) -> Result<Vec<BenchReport>, PipelineError> {
    if opts.height % 16 != 0 || opts.width % 16 != 0 || opts.height == 0 || opts.width == 0 {
        return Err(PipelineError::InvalidArgument(format!(
            "bench height/width {}x{} must be positive multiples of 16 for Flux",
            opts.height, opts.width
        )));
    }
    let mut cfg = FluxConfig::dev();
    if let Some(n) = opts.layers {
        cfg.depth = n.min(cfg.depth);
        cfg.depth_single_blocks = (2 * n).min(cfg.depth_single_blocks);
    }
    let (vb, params) = RandomWeights::var_builder(opts.dtype, &opts.device);
    let model = FluxTransformer::new(&cfg, vb)?;
    let (rows, cols) = (opts.height / 16, opts.width / 16);
    let txt_len = 512;
    let rand = |shape: &[usize]| -> Result<Tensor, PipelineError> {
        Ok(Tensor::randn(0f32, 1.0, shape, &opts.device)?.to_dtype(opts.dtype)?)
    };
    let mut ids = vec![[0f32; 3]; txt_len];
    ids.extend(latent_image_ids(rows, cols));
    let mut pipeline = FluxStepsPipeline {
        img: rand(&[1, rows * cols, cfg.in_channels])?,
        txt: rand(&[1, txt_len, cfg.context_in_dim])?,
        pooled: rand(&[1, cfg.vec_in_dim])?,
        rope: Rope::new(&ids, &cfg.axes_dim, cfg.theta, &opts.device)?,
        model,
        steps: opts.search_steps.max(1),
        noise_shape: vec![1, 16, opts.height / 8, opts.width / 8],
    };
    // Warm-up: one image (kernel loading, allocator).
    for _ in 0..opts.warmup.min(1) {
        ImagePipeline::generate(
            &mut pipeline,
            &[Noise {
                shape: vec![1],
                data: vec![0.0],
            }],
        )?;
    }
    let details = format!(
        "{} Flux steps per image ({} double + {} single blocks, {}x{})",
        opts.search_steps.max(1),
        cfg.depth,
        cfg.depth_single_blocks,
        opts.width,
        opts.height,
    );
    time_search(
        &mut pipeline,
        Duration::from_millis(opts.verifier_latency_ms),
        params.get(),
        &details,
    )
}

/// Runs the default search over `pipeline` with a verifier of `latency` per call, overlapped
/// then sequential; reports generation time and both wall times (milliseconds).
fn time_search(
    pipeline: &mut dyn Pipeline,
    latency: Duration,
    parameters: usize,
    details: &str,
) -> Result<Vec<BenchReport>, PipelineError> {
    let verifier = LatencyVerifier { latency };
    let mut run = |overlap: bool| -> Result<(f64, Totals), PipelineError> {
        let settings = SearchSettings {
            method: SearchMethod::Random(RandomArgs { rounds: ROUNDS }),
            batch_size: 1,
            metric: "overall_score".to_string(),
            master_seed: 0,
            noise_kernel: RandnKernel::default(),
            overlap,
            probe_first_batch: false,
            rank_metrics: Vec::new(),
            budget: None,
            stop: Default::default(),
        };
        let mut totals = Totals::default();
        let start = Instant::now();
        search_prompt(
            "a bench",
            pipeline,
            &verifier,
            &settings,
            &mut totals,
            &crate::search::NoStore,
        )
        .map_err(|e| match e {
            SearchError::Pipeline(p) => p,
            other => PipelineError::InvalidArgument(other.to_string()),
        })?;
        Ok((start.elapsed().as_secs_f64() * 1e3, totals))
    };
    let (overlapped_ms, totals) = run(true)?;
    let (sequential_ms, seq_totals) = run(false)?;
    let gen_ms = totals.generation_s * 1e3;
    let details = format!(
        "{} images, {details}, verifier latency {} ms per call",
        totals.images,
        latency.as_millis()
    );
    let visible = |wall: f64, gen: f64| 100.0 * (wall - gen) / gen.max(1e-9);
    Ok(vec![
        report("search: generation", gen_ms, parameters, details),
        report(
            "search: wall, overlapped",
            overlapped_ms,
            parameters,
            format!("{:.1}% over generation", visible(overlapped_ms, gen_ms)),
        ),
        report(
            "search: wall, sequential",
            sequential_ms,
            parameters,
            format!(
                "{:.1}% over its generation ({:.0} ms)",
                visible(sequential_ms, seq_totals.generation_s * 1e3),
                seq_totals.generation_s * 1e3
            ),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipeline whose images take a fixed time.
    struct Sleepy(Duration, usize);

    impl ImagePipeline for Sleepy {
        fn noise_shape(&self) -> Vec<usize> {
            vec![1, 4, 2, 2]
        }
        fn set_prompt(&mut self, _: &str) -> Result<(), PipelineError> {
            Ok(())
        }
        fn generate(&mut self, noises: &[Noise]) -> Result<Vec<RgbImage>, PipelineError> {
            self.1 += noises.len();
            std::thread::sleep(self.0 * noises.len() as u32);
            Ok(vec![RgbImage::new(2, 2); noises.len()])
        }
    }

    #[test]
    fn the_search_bench_runs_the_default_search_twice_and_reports_three_times() {
        let mut p = Sleepy(Duration::from_millis(5), 0);
        let r = time_search(&mut p, Duration::from_millis(5), 0, "sleepy").unwrap();
        assert_eq!(p.1, 2 * 30, "two searches of 2 + 4 + 8 + 16 images");
        let names: Vec<&str> = r.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "search: generation",
                "search: wall, overlapped",
                "search: wall, sequential"
            ]
        );
        assert!(
            r[0].details.starts_with("30 images, sleepy"),
            "{}",
            r[0].details
        );
        // Each wall time includes at least its own generation time (30 × 5 ms).
        assert!(r[0].median_ms >= 150.0 && r[1].median_ms >= 150.0 && r[2].median_ms >= 150.0);
    }

    #[test]
    fn the_stand_in_verifier_grades_every_metric() {
        let v = LatencyVerifier {
            latency: Duration::ZERO,
        };
        let media = crate::media::Media::Image(RgbImage::new(1, 1));
        let input = || VerifierInput {
            prompt: "p",
            media: &media,
        };
        let out = v.score(&[input(), input()]);
        assert_eq!(out.len(), 2);
        let grading = out[0].as_ref().unwrap();
        assert_eq!(grading.len(), METRICS.len());
        assert_eq!(grading["overall_score"].score, 5.0);
    }
}
