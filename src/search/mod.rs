//! Search strategies over initial noises: random search (round r draws 2^r fresh noises) and
//! zero-order search (a base noise and its neighbours on the sphere).
//!
//! The search asks the pipeline for images of noises and the verifier for grades; what it finds
//! goes to a [`SearchObserver`] (the output writer, progress bars), round by round.

pub mod neighbors;
pub mod seeds;

use std::time::Instant;

use image::RgbImage;
use serde::Serialize;

use crate::config::{NoiseKernel, SearchMethod};
use crate::noise::{torch_randn, Noise, RandnKernel};
use crate::pipelines::{ImagePipeline, PipelineError};
use crate::verifiers::{Grading, ScoreFailure, Verifier, VerifierInput};
use seeds::{SeedPurpose, SeedStream};

/// How a candidate's initial noise is made, so that it can be made again.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NoiseOrigin {
    /// `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` in float32.
    Seed {
        /// The generator seed.
        seed: u64,
    },
    /// A zero-order neighbour of `base`: see [`neighbors::neighbor`].
    Neighbor {
        /// The noise this is a neighbour of.
        base: Box<NoiseOrigin>,
        /// Position among the round's neighbours (0-based).
        neighbor_index: usize,
        /// Seed of the float32 `torch.randn` draw that gives the direction.
        direction_seed: u64,
        /// Cosine similarity to the base.
        threshold: f64,
    },
}

impl NoiseOrigin {
    /// The seed of the `torch.randn` draw the noise starts from.
    pub fn root_seed(&self) -> u64 {
        match self {
            NoiseOrigin::Seed { seed } => *seed,
            NoiseOrigin::Neighbor { base, .. } => base.root_seed(),
        }
    }

    /// The label used in file names after `_s@`: the seed for a drawn noise,
    /// `<root seed>-n<direction seed>...` for a neighbour (one `-n` per neighbour step).
    pub fn label(&self) -> String {
        match self {
            NoiseOrigin::Seed { seed } => seed.to_string(),
            NoiseOrigin::Neighbor {
                base,
                direction_seed,
                ..
            } => format!("{}-n{direction_seed}", base.label()),
        }
    }

    /// Builds the noise of this origin for `shape`.
    pub fn regenerate(&self, shape: &[usize], kernel: NoiseKernel) -> Noise {
        match self {
            NoiseOrigin::Seed { seed } => torch_randn(*seed, shape, randn_kernel(kernel)),
            NoiseOrigin::Neighbor {
                base,
                direction_seed,
                threshold,
                ..
            } => {
                let b = base.regenerate(shape, kernel);
                neighbors::neighbor(&b, *threshold, *direction_seed, randn_kernel(kernel))
            }
        }
    }
}

fn randn_kernel(k: NoiseKernel) -> RandnKernel {
    match k {
        NoiseKernel::Vectorized => RandnKernel::Vectorized,
        NoiseKernel::Portable => RandnKernel::Portable,
    }
}

/// One generated and graded candidate.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// How its noise was made.
    pub origin: NoiseOrigin,
    /// The generated image.
    pub image: RgbImage,
    /// The verifier's grading, or why there is none.
    pub grading: Result<Grading, ScoreFailure>,
    /// True for a zero-order base carried over from the previous round (not generated or
    /// graded again).
    pub carried_over: bool,
}

impl Candidate {
    /// The score of `metric`, when the candidate was graded.
    pub fn score(&self, metric: &str) -> Option<f64> {
        self.grading
            .as_ref()
            .ok()
            .and_then(|g| g.get(metric))
            .map(|s| s.score)
    }
}

/// Everything one round produced.
#[derive(Clone, Debug)]
pub struct RoundResult {
    /// 1-based round number.
    pub round: usize,
    /// The round's candidates in draw order (zero-order: the base first).
    pub candidates: Vec<Candidate>,
    /// Index of the best graded candidate (ties go to the earliest); `None` when every
    /// candidate failed grading.
    pub best: Option<usize>,
    /// Zero-order only: whether a neighbour strictly beat the base.
    pub neighbors_improvement: Option<bool>,
    /// Seconds spent generating images.
    pub generation_s: f64,
    /// Seconds spent waiting for the verifier.
    pub verification_s: f64,
}

/// Receives the search's progress and results.
pub trait SearchObserver {
    /// A round is about to generate `num_images` images.
    fn round_started(&mut self, _round: usize, _num_images: usize) {}
    /// `n` more images were generated.
    fn images_generated(&mut self, _n: usize) {}
    /// A round is complete; the observer may persist it.
    fn round_finished(&mut self, prompt: &str, result: &RoundResult) -> Result<(), SearchError>;
}

/// Why a search stopped.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The pipeline failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// Results could not be saved.
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    /// The pipeline broke its contract.
    #[error("the pipeline returned {got} images for {expected} noises")]
    ImageCount {
        /// Noises sent.
        expected: usize,
        /// Images returned.
        got: usize,
    },
}

/// The settings of a search, from the config and the command line.
#[derive(Clone, Debug)]
pub struct SearchSettings {
    /// Strategy and its parameters.
    pub method: SearchMethod,
    /// Number of rounds.
    pub rounds: usize,
    /// Candidates per pipeline call.
    pub batch_size: usize,
    /// The metric selection uses.
    pub metric: String,
    /// The run's master seed.
    pub master_seed: u64,
    /// Which torch kernel the noise reproduces.
    pub noise_kernel: NoiseKernel,
}

/// Index of the best graded candidate: highest score, ties to the earliest.
pub fn select_best(candidates: &[Candidate], metric: &str) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, c) in candidates.iter().enumerate() {
        if let Some(s) = c.score(metric) {
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((i, s));
            }
        }
    }
    best.map(|(i, _)| i)
}

/// Runs the whole search for one prompt, reporting each round to `observer`.
pub fn search_prompt(
    prompt: &str,
    pipeline: &mut dyn ImagePipeline,
    verifier: &dyn Verifier,
    settings: &SearchSettings,
    observer: &mut dyn SearchObserver,
) -> Result<(), SearchError> {
    pipeline.set_prompt(prompt)?;
    let shape = pipeline.noise_shape();
    let mut stream = SeedStream::new(settings.master_seed, prompt);
    let mut carried: Option<(Candidate, Noise)> = None;
    for round in 1..=settings.rounds {
        match settings.method {
            SearchMethod::Random => {
                let n = 1usize << round;
                observer.round_started(round, n);
                let origins: Vec<NoiseOrigin> = (0..n)
                    .map(|k| NoiseOrigin::Seed {
                        seed: stream.seed(round, SeedPurpose::Noise, k),
                    })
                    .collect();
                let noises: Vec<Noise> = origins
                    .iter()
                    .map(|o| o.regenerate(&shape, settings.noise_kernel))
                    .collect();
                let (candidates, generation_s, verification_s) = generate_and_grade(
                    prompt, pipeline, verifier, settings, origins, &noises, observer,
                )?;
                let best = select_best(&candidates, &settings.metric);
                let result = RoundResult {
                    round,
                    candidates,
                    best,
                    neighbors_improvement: None,
                    generation_s,
                    verification_s,
                };
                observer.round_finished(prompt, &result)?;
            }
            SearchMethod::ZeroOrder {
                threshold,
                num_neighbors,
            } => {
                observer.round_started(round, num_neighbors + usize::from(carried.is_none()));
                let (base, base_origin, base_noise) = match carried.take() {
                    Some((c, noise)) => {
                        let origin = c.origin.clone();
                        (Some(c), origin, noise)
                    }
                    None => {
                        let origin = NoiseOrigin::Seed {
                            seed: stream.seed(round, SeedPurpose::Noise, 0),
                        };
                        let noise = origin.regenerate(&shape, settings.noise_kernel);
                        (None, origin, noise)
                    }
                };
                let mut origins = Vec::new();
                let mut noises = Vec::new();
                if base.is_none() {
                    origins.push(base_origin.clone());
                    noises.push(base_noise.clone());
                }
                for i in 0..num_neighbors {
                    let direction_seed = stream.seed(round, SeedPurpose::Direction, i);
                    noises.push(neighbors::neighbor(
                        &base_noise,
                        threshold,
                        direction_seed,
                        randn_kernel(settings.noise_kernel),
                    ));
                    origins.push(NoiseOrigin::Neighbor {
                        base: Box::new(base_origin.clone()),
                        neighbor_index: i,
                        direction_seed,
                        threshold,
                    });
                }
                let (mut candidates, generation_s, verification_s) = generate_and_grade(
                    prompt, pipeline, verifier, settings, origins, &noises, observer,
                )?;
                let mut all_noises = noises;
                if let Some(mut b) = base {
                    b.carried_over = true;
                    candidates.insert(0, b);
                    all_noises.insert(0, base_noise);
                }
                let best = select_best(&candidates, &settings.metric);
                let improved = best.is_some_and(|i| i > 0);
                if improved {
                    if let Some(i) = best {
                        carried = Some((candidates[i].clone(), all_noises.swap_remove(i)));
                    }
                }
                let result = RoundResult {
                    round,
                    candidates,
                    best,
                    neighbors_improvement: Some(improved),
                    generation_s,
                    verification_s,
                };
                observer.round_finished(prompt, &result)?;
            }
        }
    }
    Ok(())
}

/// Generates images for `noises` in batches of `settings.batch_size`, then grades them all;
/// returns the candidates (in the order of `origins`) and the seconds spent on each part.
fn generate_and_grade(
    prompt: &str,
    pipeline: &mut dyn ImagePipeline,
    verifier: &dyn Verifier,
    settings: &SearchSettings,
    origins: Vec<NoiseOrigin>,
    noises: &[Noise],
    observer: &mut dyn SearchObserver,
) -> Result<(Vec<Candidate>, f64, f64), SearchError> {
    let t0 = Instant::now();
    let mut images = Vec::with_capacity(noises.len());
    for batch in noises.chunks(settings.batch_size.max(1)) {
        let out = pipeline.generate(batch)?;
        if out.len() != batch.len() {
            return Err(SearchError::ImageCount {
                expected: batch.len(),
                got: out.len(),
            });
        }
        observer.images_generated(out.len());
        images.extend(out);
    }
    let generation_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let inputs: Vec<VerifierInput<'_>> = images
        .iter()
        .map(|image| VerifierInput { prompt, image })
        .collect();
    let mut gradings = verifier.score(&inputs);
    let verification_s = t1.elapsed().as_secs_f64();
    // A verifier that returns fewer results than inputs must not shift scores onto the wrong
    // candidates: missing slots are failures.
    gradings.resize_with(images.len(), || {
        Err(ScoreFailure {
            message: "the verifier returned no result for this image".into(),
            attempts: 0,
        })
    });
    let candidates = origins
        .into_iter()
        .zip(images)
        .zip(gradings)
        .map(|((origin, image), grading)| Candidate {
            origin,
            image,
            grading,
            carried_over: false,
        })
        .collect();
    Ok((candidates, generation_s, verification_s))
}
