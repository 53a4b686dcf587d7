//! Search strategies: random search (round r draws 2^r fresh noises), zero-order search (a base
//! noise and its neighbours on the sphere), search over paths ([`paths`]) and particle search
//! ([`particles`]), each in its own file and registered by one line of `strategies!` below
//! ([`registry`]: the [`Strategy`] trait and `search_args`).
//!
//! The search asks the pipeline for media of noises and the verifier for grades; what it finds
//! goes to a [`SearchObserver`] (the output writer, progress bars), round by round. Every
//! strategy records what it spends and stops at the config's budget ([`Meter`]).

pub mod budget;
pub mod neighbors;
pub mod origin;
mod queue;
pub mod rank;
pub mod registry;
pub mod round;
pub mod seeds;
mod stepwise;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use budget::{Meter, SearchBudget};
pub use origin::NoiseOrigin;
pub use rank::apply_ensemble_rank;
pub use registry::{Search, SearchArgs, Strategy};
pub use round::{
    select_best, Candidate, CandidateStore, GradedRound, NoStore, ObserverError, RoundResult,
    SearchObserver,
};

use crate::keys::{KeyError, Section};
use crate::noise::RandnKernel;
use crate::pipelines::{Pipeline, PipelineError};
use crate::verifiers::Verifier;

/// Declares each strategy's module and registers its arguments type (a [`Strategy`]) as a
/// [`SearchMethod`] variant: one line a strategy. A line may start with `#[cfg(...)]`.
macro_rules! strategies {
    ($( $(#[cfg($cfg:meta)])? $vis:vis mod $m:ident => $variant:ident($args:ident) ),* $(,)?) => {
        $( $(#[cfg($cfg)])? $vis mod $m; )*

        /// How candidates are proposed: one variant per strategy, holding its arguments.
        #[derive(Clone, Debug, PartialEq)]
        pub enum SearchMethod {
            $(
                $(#[cfg($cfg)])?
                #[doc = concat!("`", stringify!($m), "`: see [`", stringify!($m), "::", stringify!($args), "`].")]
                $variant($m::$args),
            )*
        }

        impl SearchMethod {
            /// The values of `search_args.search_method`, in registration order.
            pub const NAMES: &'static [&'static str] =
                &[ $( $(#[cfg($cfg)])? <$m::$args as Strategy>::NAME, )* ];

            /// Every strategy's own `search_args` keys (a key several read comes more than once).
            pub fn all_keys() -> impl Iterator<Item = &'static str> {
                [ $( $(#[cfg($cfg)])? <$m::$args as Strategy>::KEYS, )* ]
                    .into_iter()
                    .flatten()
                    .copied()
            }

            /// The strategy named `name`, its arguments read from `s`; `None` for no strategy.
            fn read(name: &str, s: &Section<'_>) -> Result<Option<Self>, KeyError> {
                Ok(match name {
                    $(
                        $(#[cfg($cfg)])?
                        n if n == <$m::$args as Strategy>::NAME => {
                            Some(SearchMethod::$variant(<$m::$args as Strategy>::read(s)?))
                        }
                    )*
                    _ => None,
                })
            }

            /// Its name in configs.
            pub fn name(&self) -> &'static str {
                match self { $( $(#[cfg($cfg)])? SearchMethod::$variant(_) => <$m::$args as Strategy>::NAME, )* }
            }

            /// Its name in messages.
            pub fn title(&self) -> &'static str {
                match self { $( $(#[cfg($cfg)])? SearchMethod::$variant(_) => <$m::$args as Strategy>::TITLE, )* }
            }

            /// The `search_args` keys it reads.
            pub fn keys(&self) -> &'static [&'static str] {
                match self { $( $(#[cfg($cfg)])? SearchMethod::$variant(_) => <$m::$args as Strategy>::KEYS, )* }
            }

            /// See [`Strategy::rounds`].
            pub fn rounds(&self) -> Option<usize> {
                match self { $( $(#[cfg($cfg)])? SearchMethod::$variant(a) => a.rounds(), )* }
            }

            /// See [`Strategy::media_per_prompt`].
            pub fn media_per_prompt(&self) -> usize {
                match self { $( $(#[cfg($cfg)])? SearchMethod::$variant(a) => a.media_per_prompt(), )* }
            }

            /// Runs the strategy on one prompt.
            fn search(&self, run: Search<'_>) -> Result<(), SearchError> {
                match self { $( $(#[cfg($cfg)])? SearchMethod::$variant(a) => a.search(run), )* }
            }
        }
    };
}

strategies! {
    pub mod random => Random(RandomArgs),
    pub mod zero_order => ZeroOrder(ZeroOrderArgs),
    pub mod paths => Paths(PathsArgs),
    pub mod particles => Particles(ParticleArgs),
    #[cfg(test)] mod fake => Fake(FakeArgs),
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
    /// Candidates per pipeline call.
    pub batch_size: usize,
    /// The metric selection uses.
    pub metric: String,
    /// The run's master seed.
    pub master_seed: u64,
    /// Which torch kernel the noise reproduces.
    pub noise_kernel: RandnKernel,
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
    /// [`crate::verifiers::ensemble::ENSEMBLE_METRIC`] ([`apply_ensemble_rank`]); empty otherwise.
    pub rank_metrics: Vec<String>,
    /// The most a prompt's search may spend ([`SearchBudget`]); `None`: every round.
    pub budget: Option<SearchBudget>,
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

/// Runs the whole search for one prompt with the settings' strategy, reporting each round to
/// `observer` in round order.
///
/// Media that `store` has are not generated again (a batch is regenerated whole, so its media
/// are the same as in one uninterrupted run), candidates it has grades for are not graded
/// again, and every new grading is recorded in it as it arrives. The prompt is encoded only
/// when something has to be generated.
///
/// Generation and grading overlap when `settings.overlap` is set: every generated batch is
/// sent to the verifier on its own thread while the pipeline denoises the next batch. Scores
/// are matched to candidates by index, so the results are the same with or without overlap.
pub fn search_prompt(
    prompt: &str,
    pipeline: &mut dyn Pipeline,
    verifier: &dyn Verifier,
    settings: &SearchSettings,
    observer: &mut dyn SearchObserver,
    store: &dyn CandidateStore,
) -> Result<(), SearchError> {
    if matches!(settings.budget, Some(SearchBudget::Nfe(_)))
        && pipeline.evaluations_per_image().is_none()
    {
        tracing::warn!(
            "this pipeline cannot count its denoiser evaluations: the NFE budget is not applied"
        );
    }
    settings.method.search(Search {
        prompt,
        pipeline,
        verifier,
        settings,
        observer,
        store,
    })
}

#[cfg(test)]
mod tests;
