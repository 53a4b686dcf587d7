//! What a round is made of and where it goes: candidates ([`Candidate`]), a graded round
//! ([`GradedRound`], finished into a [`RoundResult`]), the observer that takes the rounds (the output
//! writer, progress bars) and the store that knows what an earlier attempt made and graded.

use super::rank::apply_ensemble_rank;
use super::{NoiseOrigin, SearchError, SearchSettings};
use crate::media::Media;
use crate::verifiers::{Graded, Grading, ScoreFailure, TokenUsage};

/// One generated and graded candidate.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// How its noise was made.
    pub origin: NoiseOrigin,
    /// The generated image or video.
    pub media: Media,
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
    /// `media[i]`. The observer may save them now, so none is lost if the run stops.
    fn batch_generated(
        &mut self,
        _round: usize,
        _origins: &[NoiseOrigin],
        _media: &[Media],
    ) -> Result<(), ObserverError> {
        Ok(())
    }
    /// A round is complete; the observer may persist it.
    fn round_finished(&mut self, prompt: &str, result: &RoundResult) -> Result<(), ObserverError>;
}

/// What is already known of a prompt's candidates: media on disk and grades recorded by an
/// earlier, interrupted attempt at the same run (`--resume`), and where new grades are recorded
/// as they arrive. The search asks it before generating a batch or grading a candidate, so
/// nothing is generated or graded twice.
pub trait CandidateStore: Sync {
    /// The media `origin` made in round `round`, if it is already saved.
    fn media(&self, round: usize, origin: &NoiseOrigin) -> Option<Media>;
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
    fn media(&self, _round: usize, _origin: &NoiseOrigin) -> Option<Media> {
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

/// A round's candidates, generated and graded, in draw order, with what it took: what every
/// strategy finishes into a [`RoundResult`].
pub struct GradedRound {
    /// The candidates.
    pub candidates: Vec<Candidate>,
    /// Seconds spent generating them.
    pub generation_s: f64,
    /// Seconds spent waiting for the verifier.
    pub verification_s: f64,
    /// The API tokens of their gradings.
    pub tokens: TokenUsage,
}

impl GradedRound {
    /// Sets every candidate's ensemble rank ([`apply_ensemble_rank`]) under `settings`.
    pub fn ranked(mut self, settings: &SearchSettings) -> Self {
        apply_ensemble_rank(&mut self.candidates, &settings.rank_metrics);
        self
    }

    /// The round `round`: its best candidate on the selection metric, one verifier call a new
    /// candidate, `nfe` denoiser evaluations (`None`: unknown).
    pub fn into_round(
        self,
        round: usize,
        settings: &SearchSettings,
        nfe: Option<u64>,
    ) -> RoundResult {
        let best = select_best(&self.candidates, &settings.metric);
        let new = self.candidates.iter().filter(|c| !c.carried_over).count() as u64;
        RoundResult {
            round,
            best,
            candidates: self.candidates,
            neighbors_improvement: None,
            generation_s: self.generation_s,
            verification_s: self.verification_s,
            nfe,
            verifier_calls: new,
            tokens: self.tokens,
            stage: None,
            provisional: false,
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
