//! The table of search strategies: each strategy is a type implementing [`Strategy`] (its
//! arguments, their keys and defaults, and its search) in its own file, registered by one line
//! of `strategies!` in [`super`], which makes it a [`super::SearchMethod`] variant. The config's
//! `search_args` are read here: the strategy named by `search_method` reads its own keys, and
//! the keys only other strategies read are computed from the table and warned about.

use super::budget::SearchBudget;
use super::{CandidateStore, SearchError, SearchMethod, SearchObserver, SearchSettings};
use crate::keys::{KeyError, Section};
use crate::pipelines::Pipeline;
use crate::verifiers::Verifier;

/// What one prompt's search works with.
pub struct Search<'a> {
    /// The prompt.
    pub prompt: &'a str,
    /// The pipeline (its prompt not yet set).
    pub pipeline: &'a mut dyn Pipeline,
    /// The judge.
    pub verifier: &'a dyn Verifier,
    /// Batch size, metric, master seed, stop flag, budget...
    pub settings: &'a SearchSettings,
    /// Where each round goes.
    pub observer: &'a mut dyn SearchObserver,
    /// What an earlier attempt made and graded, and where new grades are recorded.
    pub store: &'a dyn CandidateStore,
}

/// A search strategy: its arguments (the value of this type) and how it searches.
pub trait Strategy: Clone + std::fmt::Debug + PartialEq + Sized {
    /// `search_args.search_method`.
    const NAME: &'static str;
    /// Its name in messages ("random search").
    const TITLE: &'static str;
    /// The `search_args` keys it reads, besides `search_method` and `budget`.
    const KEYS: &'static [&'static str];

    /// Reads its keys of `search_args`, with their defaults.
    fn read(s: &Section<'_>) -> Result<Self, KeyError>;

    /// Its rounds, when known before it starts (the progress bar's length); `None` when they
    /// follow the schedule.
    fn rounds(&self) -> Option<usize>;

    /// A lower bound of the media one prompt's search makes (for the CPU time estimate).
    fn media_per_prompt(&self) -> usize;

    /// Searches one prompt, reporting each round to the observer in round order.
    fn search(&self, run: Search<'_>) -> Result<(), SearchError>;
}

/// `search_args`.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchArgs {
    /// The strategy and its arguments.
    pub method: SearchMethod,
    /// `budget`: the most compute a prompt's search may spend; `None`: all rounds.
    pub budget: Option<SearchBudget>,
}

impl SearchArgs {
    /// Reads `search_args`: `search_method` (default `random`) picks the strategy, which reads
    /// its own keys; keys that only other strategies read are warned about.
    pub fn read(s: &Section<'_>) -> Result<Self, KeyError> {
        let mut known = vec!["search_method", "budget"];
        known.extend(SearchMethod::all_keys());
        s.check_keys(&known);
        let name = s
            .string("search_method")?
            .unwrap_or_else(|| "random".to_string());
        let method = SearchMethod::read(&name, s)?.ok_or_else(|| {
            s.invalid(
                "search_method",
                format!("is \"{name}\"; allowed: {}", SearchMethod::NAMES.join(", ")),
            )
        })?;
        let own = method.keys();
        let mut others: Vec<&str> = Vec::new();
        for k in SearchMethod::all_keys() {
            if !own.contains(&k) && !others.contains(&k) {
                others.push(k);
            }
        }
        s.ignored(&others, method.title());
        Ok(SearchArgs {
            method,
            budget: SearchBudget::read(s)?,
        })
    }
}

/// `search_rounds`, which random and zero-order search need: at least 1, at most 20 (random
/// search draws 2^round noises a round).
pub fn read_rounds(s: &Section<'_>) -> Result<usize, KeyError> {
    match s.count_in("search_rounds", 1, u64::MAX)? {
        Some(n) if n > 20 => Err(s.invalid(
            "search_rounds",
            format!("is {n}; at most 20 (random search draws 2^round noises per round)"),
        )),
        Some(n) => Ok(n),
        None => Err(s.invalid(
            "search_rounds",
            "is missing; give the number of search rounds (>= 1)",
        )),
    }
}
