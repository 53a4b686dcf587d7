//! A prompt's search budget (`search_args.budget`) and the [`Meter`] that admits each round or
//! stage against it, whatever the strategy.

use std::time::Instant;

use crate::keys::{KeyError, Section};

/// `search_args.budget`: a prompt's search stops before a round that would exceed it (a
/// seconds budget: before a round that starts after it) and keeps the best so far.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SearchBudget {
    /// Denoiser evaluations (NFEs: two a step under classifier-free guidance).
    Nfe(u64),
    /// Wall-clock seconds of the prompt's search.
    Seconds(f64),
    /// Verifier calls (gradings).
    VerifierCalls(u64),
}

impl SearchBudget {
    /// Reads `budget` of `search_args` (`s`): absent or `null` is no budget; else an object
    /// with exactly one of `nfe`, `seconds`, `verifier_calls`.
    pub fn read(s: &Section<'_>) -> Result<Option<Self>, KeyError> {
        const KEYS: [&str; 3] = ["nfe", "seconds", "verifier_calls"];
        match s.get("budget") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Object(_)) => {
                let b = s.section("budget")?;
                b.check_keys(&KEYS);
                let given: Vec<&str> = KEYS.into_iter().filter(|k| b.has(k)).collect();
                if given.len() != 1 {
                    return Err(s.invalid(
                        "budget",
                        "must give exactly one of nfe, seconds, verifier_calls (e.g. {\"nfe\": 2880})",
                    ));
                }
                Ok(Some(match given[0] {
                    "nfe" => SearchBudget::Nfe(b.uint("nfe", 1)?.unwrap_or(1)),
                    "verifier_calls" => {
                        SearchBudget::VerifierCalls(b.uint("verifier_calls", 1)?.unwrap_or(1))
                    }
                    _ => SearchBudget::Seconds(
                        b.number_in("seconds", (0.0, true), 1e9)?.unwrap_or(1.0),
                    ),
                }))
            }
            Some(other) => Err(s.invalid(
                "budget",
                format!(
                    "must be a JSON object such as {{\"nfe\": 2880}}, not {}",
                    crate::keys::type_name(other)
                ),
            )),
        }
    }
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
