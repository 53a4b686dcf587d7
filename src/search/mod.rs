//! Search strategies: random search (round r draws 2^r fresh noises), zero-order search (a base
//! noise and its neighbours on the sphere), search over paths ([`paths`]) and particle search
//! ([`particles`]).
//!
//! The search asks the pipeline for images of noises and the verifier for grades; what it finds
//! goes to a [`SearchObserver`] (the output writer, progress bars), round by round. Every
//! strategy records what it spends and stops at the config's budget ([`Meter`]).

pub mod neighbors;
pub mod particles;
pub mod paths;
pub mod seeds;
mod stepwise;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use image::RgbImage;
use serde::Serialize;

use crate::config::{NoiseKernel, SearchBudget, SearchMethod};
use crate::noise::{torch_randn, Noise, RandnKernel};
use crate::pipelines::{ImagePipeline, PipelineError};
use crate::verifiers::{Graded, Grading, ScoreFailure, TokenUsage, Verifier, VerifierInput};
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
    /// A branch of search over paths: `base`'s path (its latents at level `from`) re-noised
    /// to level `renoised_to` with the float32 `torch.randn` draw of `seed` (in the pipeline's
    /// latent layout, as the initial noise), then denoised to level `to` with the pipeline's
    /// scheduler started fresh at `renoised_to`. Levels index the schedule (0 = the first step).
    PathBranch {
        /// The path this branches from.
        base: Box<NoiseOrigin>,
        /// Position among the round's branches (0-based; names the file).
        branch: usize,
        /// Seed of the re-noising draw.
        seed: u64,
        /// The level the base path had reached.
        from: usize,
        /// The level it was re-noised to.
        renoised_to: usize,
        /// The level it was denoised to.
        to: usize,
    },
    /// A particle of particle search: `seeds[0]` is the initial noise, `seeds[s]` the noise of
    /// the stochastic DDIM step from level `s - 1` to level `s` (`eta`), along the particle's
    /// line of ancestors (resampling copies a line).
    Particle {
        /// Its slot among the particles (0-based; names the file).
        slot: usize,
        /// The seeds of its line, initial noise first.
        seeds: Vec<u64>,
        /// The sampler's stochasticity.
        eta: f64,
    },
}

impl NoiseOrigin {
    /// The seed of the `torch.randn` draw the noise starts from.
    pub fn root_seed(&self) -> u64 {
        match self {
            NoiseOrigin::Seed { seed } => *seed,
            NoiseOrigin::Neighbor { base, .. } | NoiseOrigin::PathBranch { base, .. } => {
                base.root_seed()
            }
            NoiseOrigin::Particle { seeds, .. } => seeds.first().copied().unwrap_or(0),
        }
    }

    /// The label used in file names after `_s@`: the seed for a drawn noise,
    /// `<root seed>-n<direction seed>...` for a neighbour (one `-n` per neighbour step),
    /// `<root seed>-b<branch>` for a branch of search over paths, `<root seed>-k<slot>` for a
    /// particle (unique within a round, which the file name also has).
    pub fn label(&self) -> String {
        match self {
            NoiseOrigin::Seed { seed } => seed.to_string(),
            NoiseOrigin::Neighbor {
                base,
                direction_seed,
                ..
            } => format!("{}-n{direction_seed}", base.label()),
            NoiseOrigin::PathBranch { branch, .. } => {
                format!("{}-b{branch}", self.root_seed())
            }
            NoiseOrigin::Particle { slot, .. } => format!("{}-k{slot}", self.root_seed()),
        }
    }

    /// Builds the initial noise of this origin for `shape` (for a branch or a particle: the
    /// initial noise its line starts from).
    pub fn regenerate(&self, shape: &[usize], kernel: NoiseKernel) -> Noise {
        match self {
            NoiseOrigin::Seed { seed } => torch_randn(*seed, shape, randn_kernel(kernel)),
            NoiseOrigin::PathBranch { base, .. } => base.regenerate(shape, kernel),
            NoiseOrigin::Particle { .. } => {
                torch_randn(self.root_seed(), shape, randn_kernel(kernel))
            }
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
    /// Denoiser evaluations spent on this round's new candidates (carried-over ones excluded;
    /// images read back by `--resume` counted, as the run that made them spent them), when the
    /// pipeline can tell ([`ImagePipeline::evaluations_per_image`]).
    pub nfe: Option<u64>,
    /// Gradings of this round's new candidates (one verifier call each).
    pub verifier_calls: u64,
    /// The API tokens the round's gradings cost (as the journal recorded them for grades read
    /// back by `--resume`).
    pub tokens: TokenUsage,
    /// What the stage of a stepwise strategy did (search over paths: the levels and the
    /// surviving branches; particles: rewards, weights, resampling), written as the round
    /// JSON's `stage`; `None` for random and zero-order search.
    pub stage: Option<serde_json::Value>,
    /// The images are clean-sample predictions of unfinished paths or particles, not finished
    /// images: a finished image is preferred as the prompt's result whatever their scores.
    pub provisional: bool,
}

/// Receives the search's progress and results.
pub trait SearchObserver {
    /// A round is about to generate `num_images` images.
    fn round_started(&mut self, _round: usize, _num_images: usize) {}
    /// `n` more images were generated.
    fn images_generated(&mut self, _n: usize) {}
    /// A batch of round `round` was decoded, before it is graded: `origins[i]` made
    /// `images[i]`. The observer may save the images now, so none is lost if the run stops.
    fn batch_generated(
        &mut self,
        _round: usize,
        _origins: &[NoiseOrigin],
        _images: &[RgbImage],
    ) -> Result<(), ObserverError> {
        Ok(())
    }
    /// A round is complete; the observer may persist it.
    fn round_finished(&mut self, prompt: &str, result: &RoundResult) -> Result<(), ObserverError>;
}

/// What is already known of a prompt's candidates: images on disk and grades recorded by an
/// earlier, interrupted attempt at the same run (`--resume`), and where new grades are recorded
/// as they arrive. The search asks it before generating a batch or grading a candidate, so
/// nothing is generated or graded twice.
pub trait CandidateStore: Sync {
    /// The image `origin` made in round `round`, if it is already saved.
    fn image(&self, round: usize, origin: &NoiseOrigin) -> Option<RgbImage>;
    /// The grading recorded for `origin` in round `round`, if any, with the API tokens it cost.
    fn grading(&self, round: usize, origin: &NoiseOrigin) -> Option<(Graded, TokenUsage)>;
    /// Records a grading and the tokens it cost as soon as it arrives (called from grading
    /// threads).
    fn record(
        &self,
        round: usize,
        origin: &NoiseOrigin,
        grading: &Graded,
        usage: TokenUsage,
    ) -> Result<(), ObserverError>;
}

/// A store that knows nothing and keeps nothing: every candidate is generated and graded.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoStore;

impl CandidateStore for NoStore {
    fn image(&self, _round: usize, _origin: &NoiseOrigin) -> Option<RgbImage> {
        None
    }
    fn grading(&self, _round: usize, _origin: &NoiseOrigin) -> Option<(Graded, TokenUsage)> {
        None
    }
    fn record(
        &self,
        _round: usize,
        _origin: &NoiseOrigin,
        _grading: &Graded,
        _usage: TokenUsage,
    ) -> Result<(), ObserverError> {
        Ok(())
    }
}

/// Why an observer could not take a round (its files could not be written, ...): any error of
/// the layer above, kept as its message and source.
#[derive(Debug)]
pub struct ObserverError(pub Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for ObserverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl From<ObserverError> for SearchError {
    fn from(e: ObserverError) -> Self {
        SearchError::Observer(e)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for ObserverError {
    fn from(e: E) -> Self {
        ObserverError(Box::new(e))
    }
}

/// Why a search stopped.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The pipeline failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The observer could not take a round (e.g. its files could not be written).
    #[error("{0}")]
    Observer(ObserverError),
    /// The verifier cannot grade any image (a rejected key, an unknown model, a refused
    /// request, an exhausted quota): the search stopped; the rounds complete so far were
    /// reported.
    #[error("the verifier cannot grade any image, so the run stopped: {0}")]
    FatalVerifier(String),
    /// A stop was asked for (see [`SearchSettings::stop`]); the rounds complete so far were
    /// reported.
    #[error("the search was stopped")]
    Interrupted,
    /// The strategy's settings do not fit the model's schedule.
    #[error("{0}")]
    Settings(String),
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
    /// Grade each batch while the next one is generated (and, for random search, let the next
    /// round start while the last batches are graded). Off under `--low-vram`, where a local
    /// verifier must not share the GPU with the denoiser.
    pub overlap: bool,
    /// Grade the first batch before generating the next one, even with `overlap`: for the
    /// run's first prompt, so that a rejected key or an unknown model costs one batch.
    pub probe_first_batch: bool,
    /// Set from outside (a signal handler) to stop before the next batch.
    pub stop: StopFlag,
    /// For the `ensemble` verifier: the member metrics whose ranks make each candidate's
    /// [`crate::config::ENSEMBLE_METRIC`] ([`apply_ensemble_rank`]); empty otherwise.
    pub rank_metrics: Vec<String>,
    /// The most a prompt's search may spend ([`SearchBudget`]); `None`: every round.
    pub budget: Option<SearchBudget>,
}

/// What a prompt's search has spent, against its budget.
#[derive(Clone, Debug)]
pub struct Meter {
    budget: Option<SearchBudget>,
    started: Instant,
    /// Denoiser evaluations so far; `None` once a stage could not count them.
    nfe: Option<u64>,
    calls: u64,
    stages: u64,
}

impl Meter {
    /// A meter for one prompt's search under `budget`, started now.
    pub fn new(budget: Option<SearchBudget>) -> Self {
        Self {
            budget,
            started: Instant::now(),
            nfe: Some(0),
            calls: 0,
            stages: 0,
        }
    }

    /// Whether a stage costing `nfe` denoiser evaluations (`None`: unknown) and `calls`
    /// verifier calls may start: the first stage always does; then NFE and verifier-call
    /// budgets admit a stage that stays within them (an unknown NFE count is admitted), a
    /// seconds budget any stage that starts before the time is up.
    pub fn admits(&self, nfe: Option<u64>, calls: u64) -> bool {
        if self.stages == 0 {
            return true;
        }
        match self.budget {
            None => true,
            Some(SearchBudget::Nfe(max)) => match (self.nfe, nfe) {
                (Some(spent), Some(n)) => spent + n <= max,
                _ => true,
            },
            Some(SearchBudget::VerifierCalls(max)) => self.calls + calls <= max,
            Some(SearchBudget::Seconds(s)) => self.started.elapsed().as_secs_f64() < s,
        }
    }

    /// Records a stage's spending.
    pub fn spend(&mut self, nfe: Option<u64>, calls: u64) {
        self.nfe = self.nfe.zip(nfe).map(|(a, b)| a + b);
        self.calls += calls;
        self.stages += 1;
    }

    /// [`Meter::admits`], then [`Meter::spend`] when it does; logs the stop when it does not.
    pub fn take(&mut self, round: usize, nfe: Option<u64>, calls: u64) -> bool {
        if self.admits(nfe, calls) {
            self.spend(nfe, calls);
            true
        } else {
            tracing::info!("search budget reached: stopping before round {round}");
            false
        }
    }
}

/// A request to stop the search before its next batch (Ctrl-C, SIGTERM), shared with whoever
/// raises it.
#[derive(Clone, Debug, Default)]
pub struct StopFlag(pub Arc<AtomicBool>);

impl StopFlag {
    /// Whether a stop was asked for.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Sets every graded candidate's [`crate::config::ENSEMBLE_METRIC`], the paper's verifier
/// ensemble: under each of `metrics`, the candidate's rank among the candidates graded on it
/// (ascending, ties sharing their average rank), normalised to [0, 1] (1 = best; a lone
/// candidate gets 1), averaged over the metrics. A candidate missing one of them gets none.
/// Raw scores of different verifiers are never mixed, only their ranks.
pub fn apply_ensemble_rank(candidates: &mut [Candidate], metrics: &[String]) {
    if metrics.is_empty() {
        return;
    }
    let mut sums = vec![0.0f64; candidates.len()];
    let mut complete = vec![true; candidates.len()];
    for metric in metrics {
        let scored: Vec<(usize, f64)> = candidates
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.score(metric).filter(|s| s.is_finite()).map(|s| (i, s)))
            .collect();
        for (i, c) in complete.iter_mut().enumerate() {
            *c &= scored.iter().any(|(j, _)| *j == i);
        }
        let n = scored.len();
        for &(i, s) in &scored {
            let below = scored.iter().filter(|(_, t)| *t < s).count() as f64;
            let equal = scored.iter().filter(|(_, t)| *t == s).count() as f64;
            // 1-based average rank of the tie group, ascending.
            let rank = below + (equal + 1.0) / 2.0;
            sums[i] += if n > 1 {
                (rank - 1.0) / (n - 1) as f64
            } else {
                1.0
            };
        }
    }
    for (i, c) in candidates.iter_mut().enumerate() {
        if let (true, Ok(g)) = (complete[i], c.grading.as_mut()) {
            g.insert(
                crate::config::ENSEMBLE_METRIC.into(),
                crate::verifiers::Score {
                    explanation: format!(
                        "average over {} of the rank among this round's candidates (0 = worst, 1 = best)",
                        metrics.join(", ")
                    ),
                    score: sums[i] / metrics.len() as f64,
                },
            );
        }
    }
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

/// Runs the whole search for one prompt, reporting each round to `observer` in round order.
///
/// Batches whose images `store` has are not generated again (a batch is regenerated whole, so
/// its images are the same as in one uninterrupted run), candidates it has grades for are not
/// graded again, and every new grading is recorded in it as it arrives. The prompt is encoded
/// only when a batch has to be generated.
///
/// Generation and grading overlap when `settings.overlap` is set: every generated batch is
/// sent to the verifier on its own thread while the pipeline denoises the next batch, and
/// random search (whose rounds do not depend on each other's scores) goes on to the next
/// round without waiting; a round is reported once all its grades are in. Scores are matched
/// to candidates by index, so the results are the same with or without overlap.
pub fn search_prompt(
    prompt: &str,
    pipeline: &mut dyn ImagePipeline,
    verifier: &dyn Verifier,
    settings: &SearchSettings,
    observer: &mut dyn SearchObserver,
    store: &dyn CandidateStore,
) -> Result<(), SearchError> {
    let shape = pipeline.noise_shape();
    let per_image = pipeline.evaluations_per_image();
    if matches!(settings.budget, Some(SearchBudget::Nfe(_))) && per_image.is_none() {
        tracing::warn!(
            "this pipeline cannot count its denoiser evaluations: the NFE budget is not applied"
        );
    }
    match settings.method {
        SearchMethod::Paths(args) => {
            return paths::search(prompt, pipeline, verifier, settings, &args, observer, store)
        }
        SearchMethod::Particles(args) => {
            return particles::search(prompt, pipeline, verifier, settings, &args, observer, store)
        }
        SearchMethod::Random | SearchMethod::ZeroOrder { .. } => {}
    }
    let mut meter = Meter::new(settings.budget);
    let nfe_of = |n: usize| per_image.map(|e| (e * n) as u64);
    let mut stream = SeedStream::new(settings.master_seed, prompt);
    let fatal = OnceLock::new();
    std::thread::scope(|scope| {
        let mut queue = RoundQueue {
            scope,
            verifier,
            prompt,
            overlap: settings.overlap,
            probe: settings.probe_first_batch,
            fatal: &fatal,
            store,
            prompt_set: false,
            pending: std::collections::VecDeque::new(),
        };
        match settings.method {
            SearchMethod::Random => {
                for round in 1..=settings.rounds {
                    let n = 1usize << round;
                    if !meter.take(round, nfe_of(n), n as u64) {
                        break;
                    }
                    let origins: Vec<NoiseOrigin> = (0..n)
                        .map(|k| NoiseOrigin::Seed {
                            seed: stream.seed(round, SeedPurpose::Noise, k),
                        })
                        .collect();
                    let noises: Vec<Noise> = origins
                        .iter()
                        .map(|o| o.regenerate(&shape, settings.noise_kernel))
                        .collect();
                    observer.round_started(round, n);
                    queue.generate_round(
                        round,
                        origins,
                        &noises,
                        pipeline,
                        settings,
                        observer,
                        Some(&mut |r, o| finish_random_round(per_image, settings, r, o)),
                    )?;
                }
                queue.drain(observer, &mut |r, o| {
                    finish_random_round(per_image, settings, r, o)
                })?;
                queue.check_fatal()
            }
            SearchMethod::ZeroOrder {
                threshold,
                num_neighbors,
            } => {
                let mut carried: Option<(Candidate, Noise)> = None;
                for round in 1..=settings.rounds {
                    let n = num_neighbors + usize::from(carried.is_none());
                    if !meter.take(round, nfe_of(n), n as u64) {
                        break;
                    }
                    observer.round_started(round, n);
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
                    // The next round's base depends on this round's grades: no overlap
                    // across rounds, only between the batches of this one.
                    queue.generate_round(
                        round, origins, &noises, pipeline, settings, observer, None,
                    )?;
                    let graded = queue.collect_round()?;
                    let mut candidates = graded.candidates;
                    let mut all_noises = noises;
                    if let Some(mut b) = base {
                        b.carried_over = true;
                        candidates.insert(0, b);
                        all_noises.insert(0, base_noise);
                    }
                    apply_ensemble_rank(&mut candidates, &settings.rank_metrics);
                    let best = select_best(&candidates, &settings.metric);
                    let improved = best.is_some_and(|i| i > 0);
                    if let Some(i) = best.filter(|_| improved) {
                        carried = Some((candidates[i].clone(), all_noises.swap_remove(i)));
                    }
                    let new = candidates.iter().filter(|c| !c.carried_over).count() as u64;
                    let result = RoundResult {
                        round,
                        candidates,
                        best,
                        neighbors_improvement: Some(improved),
                        generation_s: graded.generation_s,
                        verification_s: graded.verification_s,
                        nfe: per_image.map(|e| e as u64 * new),
                        verifier_calls: new,
                        tokens: graded.tokens,
                        stage: None,
                        provisional: false,
                    };
                    observer.round_finished(prompt, &result)?;
                    queue.check_fatal()?;
                }
                Ok(())
            }
            SearchMethod::Paths(_) | SearchMethod::Particles(_) => Ok(()),
        }
    })
}

/// A round whose candidates are all generated and graded, in draw order.
struct GradedRound {
    candidates: Vec<Candidate>,
    generation_s: f64,
    verification_s: f64,
    tokens: TokenUsage,
}

fn finish_random_round(
    per_image: Option<usize>,
    settings: &SearchSettings,
    round: usize,
    graded: GradedRound,
) -> RoundResult {
    let mut graded = graded;
    apply_ensemble_rank(&mut graded.candidates, &settings.rank_metrics);
    let best = select_best(&graded.candidates, &settings.metric);
    let new = graded.candidates.len() as u64;
    RoundResult {
        round,
        candidates: graded.candidates,
        best,
        neighbors_improvement: None,
        generation_s: graded.generation_s,
        verification_s: graded.verification_s,
        nfe: per_image.map(|e| e as u64 * new),
        verifier_calls: new,
        tokens: graded.tokens,
        stage: None,
        provisional: false,
    }
}

/// A generated batch and its grades (or the thread grading it).
enum Batch<'scope> {
    Done(BatchResult),
    Grading(std::thread::ScopedJoinHandle<'scope, BatchResult>),
}

struct BatchResult {
    images: Vec<RgbImage>,
    gradings: Vec<Result<Grading, ScoreFailure>>,
    seconds: f64,
    /// Why a grading could not be recorded in the store, if it could not.
    record_error: Option<ObserverError>,
    /// The API tokens the batch's gradings cost (those read back from the store included).
    tokens: TokenUsage,
}

struct PendingRound<'scope> {
    round: usize,
    origins: Vec<NoiseOrigin>,
    /// Images generated so far.
    generated: usize,
    batches: Vec<Batch<'scope>>,
    generation_s: f64,
}

/// Rounds whose batches are generated and are being graded, oldest first.
struct RoundQueue<'scope, 'env> {
    scope: &'scope std::thread::Scope<'scope, 'env>,
    verifier: &'env dyn Verifier,
    prompt: &'env str,
    overlap: bool,
    /// The next batch is graded before another is generated (see `probe_first_batch`).
    probe: bool,
    /// The first failure that no further request can avoid, set by the grading threads.
    fatal: &'env OnceLock<String>,
    /// Saved images and recorded grades.
    store: &'env dyn CandidateStore,
    /// Whether the pipeline has been given the prompt.
    prompt_set: bool,
    pending: std::collections::VecDeque<PendingRound<'scope>>,
}

/// A batch to grade: its images, the noises that made them, and the gradings already known.
struct ToGrade {
    round: usize,
    origins: Vec<NoiseOrigin>,
    images: Vec<RgbImage>,
    known: Vec<Option<(Graded, TokenUsage)>>,
}

impl ToGrade {
    /// Whether some image has no grading yet, so the verifier will be asked.
    fn asks(&self) -> bool {
        self.known.iter().any(Option::is_none)
    }
}

/// Grades the images of `batch` that have no known grading, records each new grading in
/// `store`, and notes the first fatal failure in `fatal`.
fn grade(
    verifier: &dyn Verifier,
    prompt: &str,
    batch: ToGrade,
    fatal: &OnceLock<String>,
    store: &dyn CandidateStore,
) -> BatchResult {
    let t = Instant::now();
    let ToGrade {
        round,
        origins,
        images,
        known,
    } = batch;
    let missing: Vec<usize> = (0..images.len())
        .filter(|&i| known.get(i).is_none_or(Option::is_none))
        .collect();
    let mut fresh = if missing.is_empty() {
        Vec::new()
    } else {
        let inputs: Vec<VerifierInput<'_>> = missing
            .iter()
            .map(|&i| VerifierInput {
                prompt,
                image: &images[i],
            })
            .collect();
        verifier.score_with_usage(&inputs)
    };
    // A verifier that returns fewer results than inputs must not shift scores onto the wrong
    // candidates: missing slots are failures.
    let no_result = || {
        Err(ScoreFailure {
            message: "the verifier returned no result for this image".into(),
            attempts: 0,
            fatal: false,
        })
    };
    fresh.resize_with(missing.len(), || (no_result(), TokenUsage::default()));
    fresh.truncate(missing.len());
    let mut record_error = None;
    for (&i, (g, usage)) in missing.iter().zip(&fresh) {
        match g {
            // The first fatal failure wins; later ones say the same. A fatal failure is not
            // recorded: once the cause is fixed, a resumed run asks again.
            Err(f) if f.fatal => {
                let _ = fatal.set(f.message.clone());
            }
            _ => {
                if let Some(origin) = origins.get(i) {
                    if let Err(e) = store.record(round, origin, g, *usage) {
                        record_error.get_or_insert(e);
                    }
                }
            }
        }
    }
    let mut fresh = fresh.into_iter();
    let mut tokens = TokenUsage::default();
    let gradings = known
        .into_iter()
        .map(|k| {
            let (g, usage) = k
                .or_else(|| fresh.next())
                .unwrap_or_else(|| (no_result(), TokenUsage::default()));
            tokens += usage;
            g
        })
        .collect();
    BatchResult {
        images,
        gradings,
        seconds: t.elapsed().as_secs_f64(),
        record_error,
        tokens,
    }
}

impl<'scope, 'env> RoundQueue<'scope, 'env> {
    /// Generates `noises` batch by batch, handing each batch to the verifier; between batches,
    /// reports (with `finish`) the rounds at the head of the queue whose grades are all in.
    /// Without `finish` the round stays queued for [`RoundQueue::collect_round`].
    #[allow(clippy::too_many_arguments)]
    fn generate_round(
        &mut self,
        round: usize,
        origins: Vec<NoiseOrigin>,
        noises: &[Noise],
        pipeline: &mut dyn ImagePipeline,
        settings: &SearchSettings,
        observer: &mut dyn SearchObserver,
        finish: Option<&mut dyn FnMut(usize, GradedRound) -> RoundResult>,
    ) -> Result<(), SearchError> {
        let mut finish = finish;
        self.pending.push_back(PendingRound {
            round,
            origins,
            generated: 0,
            batches: Vec::new(),
            generation_s: 0.0,
        });
        for batch in noises.chunks(settings.batch_size.max(1)) {
            let stop = match self.fatal.get() {
                Some(message) => Some(SearchError::FatalVerifier(message.clone())),
                None if settings.stop.is_set() => Some(SearchError::Interrupted),
                None => None,
            };
            if let Some(error) = stop {
                // No more images: report the rounds before this one (complete), not this one.
                if let Some(f) = finish.as_deref_mut() {
                    let current = self.pending.pop_back();
                    self.report_ready(observer, f, true)?;
                    drop(current);
                }
                return Err(error);
            }
            let (start, origins) = match self.pending.back() {
                Some(p) => (
                    p.generated,
                    p.origins
                        .get(p.generated..p.generated + batch.len())
                        .unwrap_or(&[])
                        .to_vec(),
                ),
                None => (0, Vec::new()),
            };
            // A batch saved whole by an earlier attempt is read back, not generated.
            let saved: Option<Vec<RgbImage>> = origins
                .iter()
                .map(|o| self.store.image(round, o))
                .collect::<Option<Vec<_>>>()
                .filter(|images| !images.is_empty() && images.len() == batch.len());
            let (images, generation_s) = match saved {
                Some(images) => (images, 0.0),
                None => {
                    if !self.prompt_set {
                        pipeline.set_prompt(self.prompt)?;
                        self.prompt_set = true;
                    }
                    let t = Instant::now();
                    let images = pipeline.generate(batch)?;
                    // Generation only: without overlap, grading below runs on this thread.
                    let generation_s = t.elapsed().as_secs_f64();
                    if images.len() != batch.len() {
                        return Err(SearchError::ImageCount {
                            expected: batch.len(),
                            got: images.len(),
                        });
                    }
                    observer.batch_generated(round, &origins, &images)?;
                    (images, generation_s)
                }
            };
            observer.images_generated(images.len());
            if let Some(p) = self.pending.back_mut() {
                p.generated = start + images.len();
            }
            let known = origins
                .iter()
                .map(|o| self.store.grading(round, o))
                .collect();
            let to_grade = ToGrade {
                round,
                origins,
                images,
                known,
            };
            let (verifier, prompt, fatal, store) =
                (self.verifier, self.prompt, self.fatal, self.store);
            let graded = if !to_grade.asks() {
                Batch::Done(grade(verifier, prompt, to_grade, fatal, store))
            } else if self.overlap && !self.probe {
                Batch::Grading(
                    self.scope
                        .spawn(move || grade(verifier, prompt, to_grade, fatal, store)),
                )
            } else {
                self.probe = false;
                Batch::Done(grade(verifier, prompt, to_grade, fatal, store))
            };
            if let Some(p) = self.pending.back_mut() {
                p.generation_s += generation_s;
                p.batches.push(graded);
            }
            if let Some(f) = finish.as_deref_mut() {
                self.report_ready(observer, f, false)?;
            }
        }
        Ok(())
    }

    /// Reports, in round order, the rounds at the head of the queue that are complete (all of
    /// them, waiting for their grades, when `wait`). The round being generated (the last one)
    /// is left alone unless `wait`.
    fn report_ready(
        &mut self,
        observer: &mut dyn SearchObserver,
        finish: &mut dyn FnMut(usize, GradedRound) -> RoundResult,
        wait: bool,
    ) -> Result<(), SearchError> {
        while self.pending.len() > usize::from(!wait) {
            let ready = self.pending.front().is_some_and(|p| {
                p.batches.iter().all(|b| match b {
                    Batch::Done(_) => true,
                    Batch::Grading(h) => h.is_finished(),
                })
            });
            if !ready && !wait {
                break;
            }
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let round = p.round;
            let graded = Self::collect(p)?;
            observer.round_finished(self.prompt, &finish(round, graded))?;
        }
        Ok(())
    }

    /// The verifier's fatal failure, if a grading met one.
    fn check_fatal(&self) -> Result<(), SearchError> {
        match self.fatal.get() {
            Some(message) => Err(SearchError::FatalVerifier(message.clone())),
            None => Ok(()),
        }
    }

    /// Waits for and reports every queued round.
    fn drain(
        &mut self,
        observer: &mut dyn SearchObserver,
        finish: &mut dyn FnMut(usize, GradedRound) -> RoundResult,
    ) -> Result<(), SearchError> {
        self.report_ready(observer, finish, true)
    }

    /// Waits for the grades of the only queued round and returns it.
    fn collect_round(&mut self) -> Result<GradedRound, SearchError> {
        match self.pending.pop_front() {
            Some(p) => Self::collect(p),
            None => Ok(GradedRound {
                candidates: Vec::new(),
                generation_s: 0.0,
                verification_s: 0.0,
                tokens: TokenUsage::default(),
            }),
        }
    }

    /// Waits for a round's grades and puts its candidates together; fails when a grading
    /// could not be recorded.
    fn collect(p: PendingRound<'scope>) -> Result<GradedRound, SearchError> {
        let mut images = Vec::with_capacity(p.origins.len());
        let mut gradings = Vec::with_capacity(p.origins.len());
        let mut verification_s = 0.0;
        let mut tokens = TokenUsage::default();
        for b in p.batches {
            let r = match b {
                Batch::Done(r) => r,
                Batch::Grading(h) => h
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            };
            if let Some(e) = r.record_error {
                return Err(SearchError::Observer(e));
            }
            verification_s += r.seconds;
            tokens += r.tokens;
            images.extend(r.images);
            gradings.extend(r.gradings);
        }
        let candidates = p
            .origins
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
        Ok(GradedRound {
            candidates,
            generation_s: p.generation_s,
            verification_s,
            tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verifiers::Score;
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    /// Counts generated batches, so the fake verifier can tell whether the next batch was
    /// generated while it was grading.
    #[derive(Default)]
    struct Progress {
        generated: Mutex<usize>,
        changed: Condvar,
    }

    struct FakePipeline<'a> {
        progress: &'a Progress,
    }

    impl ImagePipeline for FakePipeline<'_> {
        fn noise_shape(&self) -> Vec<usize> {
            vec![1, 1, 4, 4]
        }
        fn set_prompt(&mut self, _prompt: &str) -> Result<(), PipelineError> {
            Ok(())
        }
        fn generate(&mut self, noises: &[Noise]) -> Result<Vec<RgbImage>, PipelineError> {
            let images = noises
                .iter()
                .map(|n| {
                    let v = (n.data.iter().sum::<f32>().abs() * 10.0) as u8;
                    RgbImage::from_pixel(2, 2, image::Rgb([v, v, v]))
                })
                .collect();
            *self.progress.generated.lock().unwrap() += 1;
            self.progress.changed.notify_all();
            Ok(images)
        }
    }

    /// Grades an image by its brightness. Before answering batch k it waits (up to `patience`)
    /// until batch k+1 has been generated (or every batch has), and counts the times it gave up.
    struct FakeVerifier<'a> {
        progress: &'a Progress,
        calls: Mutex<usize>,
        total_batches: usize,
        patience: Duration,
        gave_up: Mutex<usize>,
    }

    impl Verifier for FakeVerifier<'_> {
        fn name(&self) -> &str {
            "fake"
        }
        fn score(&self, inputs: &[VerifierInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
            let k = {
                let mut c = self.calls.lock().unwrap();
                *c += 1;
                *c - 1
            };
            let target = (k + 2).min(self.total_batches);
            let generated = self.progress.generated.lock().unwrap();
            let (_g, timeout) = self
                .progress
                .changed
                .wait_timeout_while(generated, self.patience, |g| *g < target)
                .unwrap();
            if timeout.timed_out() {
                *self.gave_up.lock().unwrap() += 1;
            }
            inputs
                .iter()
                .map(|i| {
                    let mut g = Grading::new();
                    g.insert(
                        "overall_score".into(),
                        Score {
                            explanation: "brightness".into(),
                            score: f64::from(i.image.get_pixel(0, 0)[0]) / 25.5,
                        },
                    );
                    Ok(g)
                })
                .collect()
        }
    }

    /// Per round: its number, the best candidate, every candidate's score.
    type Rounds = Vec<(usize, Option<usize>, Vec<Option<f64>>)>;

    #[derive(Default)]
    struct Recorder {
        rounds: Rounds,
        generation_s: f64,
        verification_s: f64,
    }

    impl SearchObserver for Recorder {
        fn round_finished(&mut self, _p: &str, r: &RoundResult) -> Result<(), ObserverError> {
            let scores = r
                .candidates
                .iter()
                .map(|c| c.score("overall_score"))
                .collect();
            self.rounds.push((r.round, r.best, scores));
            self.generation_s += r.generation_s;
            self.verification_s += r.verification_s;
            Ok(())
        }
    }

    fn run(
        method: SearchMethod,
        overlap: bool,
        patience: Duration,
        total_batches: usize,
    ) -> (Recorder, usize) {
        let progress = Progress::default();
        let mut pipeline = FakePipeline {
            progress: &progress,
        };
        let verifier = FakeVerifier {
            progress: &progress,
            calls: Mutex::new(0),
            total_batches,
            patience,
            gave_up: Mutex::new(0),
        };
        let settings = SearchSettings {
            method,
            rounds: 3,
            batch_size: 2,
            metric: "overall_score".into(),
            master_seed: 11,
            noise_kernel: NoiseKernel::Portable,
            overlap,
            probe_first_batch: false,
            stop: StopFlag::default(),
            rank_metrics: Vec::new(),
            budget: None,
        };
        let mut rec = Recorder::default();
        search_prompt("p", &mut pipeline, &verifier, &settings, &mut rec, &NoStore).unwrap();
        let gave_up = *verifier.gave_up.lock().unwrap();
        (rec, gave_up)
    }

    #[test]
    fn batches_are_graded_while_the_next_batch_is_generated() {
        // Random search, 3 rounds of 2, 4, 8 candidates in batches of 2: 7 batches. Each
        // grading waits for the next batch to be generated; with overlap it never has to give up.
        let (rec, gave_up) = run(SearchMethod::Random, true, Duration::from_secs(20), 7);
        assert_eq!(gave_up, 0);
        let rounds: Vec<usize> = rec.rounds.iter().map(|r| r.0).collect();
        assert_eq!(rounds, [1, 2, 3], "rounds are reported in order");
        assert!(rec.rounds.iter().all(|r| r.2.iter().all(Option::is_some)));
    }

    #[test]
    fn without_overlap_grading_waits_for_nothing_and_results_are_the_same() {
        // Without overlap the next batch is never generated during grading, so the verifier gives
        // up waiting on every batch but the last: the fake can tell the two apart.
        let (serial, gave_up) = run(SearchMethod::Random, false, Duration::from_millis(50), 7);
        assert_eq!(gave_up, 6);
        let (overlapped, _) = run(SearchMethod::Random, true, Duration::from_secs(20), 7);
        assert_eq!(serial.rounds, overlapped.rounds);
        // Grading ran on the search's thread (6 waits of 50 ms); it is not generation time.
        assert!(serial.verification_s >= 0.3, "{}", serial.verification_s);
        assert!(
            serial.generation_s < serial.verification_s / 2.0,
            "generation {} s includes grading",
            serial.generation_s
        );
    }

    #[test]
    fn zero_order_overlaps_batches_within_a_round() {
        // 1 base + 3 neighbours in batches of 2 per fresh round; rounds wait for their grades.
        let method = SearchMethod::ZeroOrder {
            threshold: 0.9,
            num_neighbors: 3,
        };
        let (serial, _) = run(method, false, Duration::from_millis(1), usize::MAX);
        let (overlapped, _) = run(method, true, Duration::from_millis(1), usize::MAX);
        assert_eq!(serial.rounds, overlapped.rounds);
        assert_eq!(serial.rounds.len(), 3);
    }
    /// Counts what it is asked: prompts encoded, images generated, images graded.
    #[derive(Default)]
    struct Counting {
        prompts: Mutex<usize>,
        generated: Mutex<Vec<usize>>,
        graded: Mutex<usize>,
    }

    struct CountingPipeline<'a>(&'a Counting);

    impl ImagePipeline for CountingPipeline<'_> {
        fn noise_shape(&self) -> Vec<usize> {
            vec![1, 1, 4, 4]
        }
        fn set_prompt(&mut self, _prompt: &str) -> Result<(), PipelineError> {
            *self.0.prompts.lock().unwrap() += 1;
            Ok(())
        }
        fn generate(&mut self, noises: &[Noise]) -> Result<Vec<RgbImage>, PipelineError> {
            self.0.generated.lock().unwrap().push(noises.len());
            Ok(noises
                .iter()
                .map(|n| {
                    let v = (n.data.iter().sum::<f32>().abs() * 10.0) as u8;
                    RgbImage::from_pixel(2, 2, image::Rgb([v, v, v]))
                })
                .collect())
        }
    }

    impl Verifier for &Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn score(&self, inputs: &[VerifierInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
            *self.graded.lock().unwrap() += inputs.len();
            inputs
                .iter()
                .map(|i| {
                    let mut g = Grading::new();
                    let score = f64::from(i.image.get_pixel(0, 0)[0]);
                    g.insert(
                        "overall_score".into(),
                        Score {
                            explanation: String::new(),
                            score,
                        },
                    );
                    Ok(g)
                })
                .collect()
        }
    }

    /// Keeps images and grades in memory, as the journal and the PNGs do on disk.
    #[derive(Default)]
    struct MemoryStore {
        images: Mutex<std::collections::HashMap<(usize, String), RgbImage>>,
        grades: Mutex<std::collections::HashMap<(usize, String), (Graded, TokenUsage)>>,
    }

    impl CandidateStore for MemoryStore {
        fn image(&self, round: usize, origin: &NoiseOrigin) -> Option<RgbImage> {
            self.images
                .lock()
                .unwrap()
                .get(&(round, origin.label()))
                .cloned()
        }
        fn grading(&self, round: usize, origin: &NoiseOrigin) -> Option<(Graded, TokenUsage)> {
            self.grades
                .lock()
                .unwrap()
                .get(&(round, origin.label()))
                .cloned()
        }
        fn record(
            &self,
            round: usize,
            origin: &NoiseOrigin,
            grading: &Graded,
            usage: TokenUsage,
        ) -> Result<(), ObserverError> {
            self.grades
                .lock()
                .unwrap()
                .insert((round, origin.label()), (grading.clone(), usage));
            Ok(())
        }
    }

    /// Saves every generated image into the store, as the run's output writer saves PNGs.
    struct Saving<'a> {
        store: &'a MemoryStore,
        rec: Recorder,
    }

    impl SearchObserver for Saving<'_> {
        fn batch_generated(
            &mut self,
            round: usize,
            origins: &[NoiseOrigin],
            images: &[RgbImage],
        ) -> Result<(), ObserverError> {
            let mut saved = self.store.images.lock().unwrap();
            for (o, i) in origins.iter().zip(images) {
                saved.insert((round, o.label()), i.clone());
            }
            Ok(())
        }
        fn round_finished(&mut self, p: &str, r: &RoundResult) -> Result<(), ObserverError> {
            self.rec.round_finished(p, r)
        }
    }

    fn search_with_store(method: SearchMethod, store: &MemoryStore) -> (Rounds, Counting) {
        let counting = Counting::default();
        let mut pipeline = CountingPipeline(&counting);
        let settings = SearchSettings {
            method,
            rounds: 3,
            batch_size: 3,
            metric: "overall_score".into(),
            master_seed: 5,
            noise_kernel: NoiseKernel::Portable,
            overlap: true,
            probe_first_batch: true,
            stop: StopFlag::default(),
            rank_metrics: Vec::new(),
            budget: None,
        };
        let mut obs = Saving {
            store,
            rec: Recorder::default(),
        };
        search_prompt("p", &mut pipeline, &&counting, &settings, &mut obs, store).unwrap();
        (obs.rec.rounds, counting)
    }

    #[test]
    fn a_store_with_everything_asks_for_nothing_and_gives_the_same_rounds() {
        for method in [
            SearchMethod::Random,
            SearchMethod::ZeroOrder {
                threshold: 0.95,
                num_neighbors: 4,
            },
        ] {
            let store = MemoryStore::default();
            let (first, fresh) = search_with_store(method, &store);
            assert_eq!(*fresh.prompts.lock().unwrap(), 1);
            let images = store.images.lock().unwrap().len();
            assert_eq!(*fresh.graded.lock().unwrap(), images);
            assert_eq!(
                store.grades.lock().unwrap().len(),
                images,
                "every grade recorded"
            );

            let (again, counted) = search_with_store(method, &store);
            assert_eq!(again, first, "{method:?}");
            assert_eq!(
                *counted.prompts.lock().unwrap(),
                0,
                "the prompt is not even encoded"
            );
            assert!(counted.generated.lock().unwrap().is_empty());
            assert_eq!(*counted.graded.lock().unwrap(), 0);
        }
    }

    #[test]
    fn only_batches_missing_an_image_are_generated_whole_and_only_missing_grades_asked() {
        // Random search, rounds of 2, 4, 8 in batches of 3: [2], [3, 1], [3, 3, 2].
        let store = MemoryStore::default();
        let (first, _) = search_with_store(SearchMethod::Random, &store);
        // As after a crash in round 3: its second batch lost one image, its last batch was
        // never made, and two grades of round 2 were never recorded.
        let round3: Vec<String> = {
            let mut images = store.images.lock().unwrap();
            // Round 3's seeds in draw order, drawn as the search draws them.
            let mut stream = SeedStream::new(5, "p");
            for (round, n) in [(1, 2), (2, 4)] {
                for k in 0..n {
                    stream.seed(round, SeedPurpose::Noise, k);
                }
            }
            let order: Vec<String> = (0..8)
                .map(|k| stream.seed(3, SeedPurpose::Noise, k).to_string())
                .collect();
            images.remove(&(3, order[4].clone()));
            for l in &order[6..] {
                images.remove(&(3, l.clone()));
            }
            order
        };
        let mut grades = store.grades.lock().unwrap();
        for l in &round3[3..] {
            grades.remove(&(3, l.clone()));
        }
        let round2: Vec<(usize, String)> = grades
            .keys()
            .filter(|k| k.0 == 2)
            .take(2)
            .cloned()
            .collect();
        for k in &round2 {
            grades.remove(k);
        }
        drop(grades);
        let (again, counted) = search_with_store(SearchMethod::Random, &store);
        assert_eq!(again, first);
        assert_eq!(
            *counted.generated.lock().unwrap(),
            [3, 2],
            "round 3's last two batches"
        );
        assert_eq!(*counted.graded.lock().unwrap(), 2 + 5);
        assert_eq!(*counted.prompts.lock().unwrap(), 1);
    }
    fn graded(scores: &[(&str, f64)]) -> Candidate {
        let mut g = Grading::new();
        for (m, v) in scores {
            g.insert(
                m.to_string(),
                Score {
                    explanation: String::new(),
                    score: *v,
                },
            );
        }
        Candidate {
            origin: NoiseOrigin::Seed { seed: 0 },
            image: RgbImage::new(1, 1),
            grading: Ok(g),
            carried_over: false,
        }
    }

    #[test]
    fn the_ensemble_selects_by_average_rank_not_by_average_score() {
        let a = [1.0, 3.0, 3.0, 2.0];
        let b = [10.0, 0.0, 5.0, 5.0];
        let mut candidates: Vec<Candidate> = (0..4)
            .map(|i| graded(&[("x/a", a[i]), ("y/b", b[i])]))
            .collect();
        candidates.push(graded(&[("x/a", 9.0)])); // y could not grade it
        let metrics = vec!["x/a".to_string(), "y/b".to_string()];
        apply_ensemble_rank(&mut candidates, &metrics);
        // Directly: ascending ranks with ties averaged, over the candidates graded on each
        // metric, normalised by (n - 1). Under x/a all five count; under y/b the first four.
        let rank = |v: f64, all: &[f64]| {
            let below = all.iter().filter(|t| **t < v).count() as f64;
            let equal = all.iter().filter(|t| **t == v).count() as f64;
            (below + (equal + 1.0) / 2.0 - 1.0) / (all.len() - 1) as f64
        };
        let a_all = [1.0, 3.0, 3.0, 2.0, 9.0];
        for i in 0..4 {
            let want = (rank(a[i], &a_all) + rank(b[i], &b)) / 2.0;
            let got = candidates[i].score(ENSEMBLE).unwrap();
            assert!((got - want).abs() < 1e-12, "candidate {i}: {got} vs {want}");
        }
        assert_eq!(
            candidates[4].score(ENSEMBLE),
            None,
            "a missing member score, no rank"
        );
        assert_eq!(select_best(&candidates, ENSEMBLE), Some(2));
        // Averaging raw scores would pick candidate 0 (5.5): b's scale would dominate.
        let raw: Vec<f64> = (0..4).map(|i| (a[i] + b[i]) / 2.0).collect();
        assert_eq!(
            raw.iter()
                .cloned()
                .enumerate()
                .fold((0, f64::MIN), |m, (i, v)| if v > m.1 { (i, v) } else { m })
                .0,
            0
        );
        // A lone candidate is the best of its round.
        let mut one = vec![graded(&[("x/a", 1.0), ("y/b", 2.0)])];
        apply_ensemble_rank(&mut one, &metrics);
        assert_eq!(one[0].score(ENSEMBLE), Some(1.0));
    }

    #[test]
    fn a_budget_stops_the_search_before_a_round_that_would_exceed_it() {
        let run_with = |budget: SearchBudget| {
            let counting = Counting::default();
            let mut pipeline = CountingPipeline(&counting);
            let settings = SearchSettings {
                method: SearchMethod::Random,
                rounds: 3,
                batch_size: 3,
                metric: "overall_score".into(),
                master_seed: 5,
                noise_kernel: NoiseKernel::Portable,
                overlap: true,
                probe_first_batch: false,
                stop: StopFlag::default(),
                rank_metrics: Vec::new(),
                budget: Some(budget),
            };
            let mut rec = Recorder::default();
            search_prompt(
                "p",
                &mut pipeline,
                &&counting,
                &settings,
                &mut rec,
                &NoStore,
            )
            .unwrap();
            let graded = *counting.graded.lock().unwrap();
            (rec.rounds.iter().map(|r| r.0).collect::<Vec<_>>(), graded)
        };
        // Rounds of 2, 4, 8 candidates: 7 calls admit rounds 1 and 2 (6), not round 3 (14).
        assert_eq!(run_with(SearchBudget::VerifierCalls(7)), (vec![1, 2], 6));
        assert_eq!(
            run_with(SearchBudget::VerifierCalls(14)),
            (vec![1, 2, 3], 14)
        );
        // The first round always runs; a spent time budget stops before the next.
        assert_eq!(run_with(SearchBudget::VerifierCalls(1)), (vec![1], 2));
        assert_eq!(run_with(SearchBudget::Seconds(1e-9)), (vec![1], 2));
        // This pipeline cannot count NFEs: the NFE budget is not applied.
        assert_eq!(run_with(SearchBudget::Nfe(1)), (vec![1, 2, 3], 14));
    }

    const ENSEMBLE: &str = crate::config::ENSEMBLE_METRIC;
}
