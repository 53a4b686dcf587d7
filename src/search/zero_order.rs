//! Zero-order search: a base noise and `num_neighbors` neighbours on the sphere at cosine
//! similarity `threshold` from it; when a neighbour beats the base, it is the next round's
//! base (carried over, not generated or graded again), else the base stays. Rounds depend on
//! each other's grades, so only the batches within a round overlap with grading.

use std::sync::OnceLock;

use super::queue::RoundQueue;
use super::registry::{read_rounds, Search, Strategy};
use super::seeds::{SeedPurpose, SeedStream};
use super::{neighbors, Candidate, Meter, NoiseOrigin, SearchError};
use crate::keys::{KeyError, Section};
use crate::noise::Noise;

/// The arguments of zero-order search.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ZeroOrderArgs {
    /// `search_rounds` (1 to 20).
    pub rounds: usize,
    /// `threshold`: cosine similarity between the base and each neighbour, in (0, 1).
    pub threshold: f64,
    /// `num_neighbors`: neighbours per round (1 to 4096).
    pub num_neighbors: usize,
}

impl Strategy for ZeroOrderArgs {
    const NAME: &'static str = "zero-order";
    const TITLE: &'static str = "zero-order search";
    const KEYS: &'static [&'static str] = &["search_rounds", "threshold", "num_neighbors"];

    fn read(s: &Section<'_>) -> Result<Self, KeyError> {
        let rounds = read_rounds(s)?;
        let threshold = s.number("threshold")?.ok_or_else(|| {
            s.invalid(
                "threshold",
                "is missing; zero-order search needs the cosine similarity between the base noise and its neighbours, in (0, 1), e.g. 0.95",
            )
        })?;
        if !(threshold > 0.0 && threshold < 1.0) {
            return Err(s.invalid(
                "threshold",
                format!("is {threshold}; it must be in (0, 1), e.g. 0.95"),
            ));
        }
        let num_neighbors = s.count_in("num_neighbors", 1, u64::MAX)?.ok_or_else(|| {
            s.invalid(
                "num_neighbors",
                "is missing; zero-order search needs the number of neighbours per round (>= 1)",
            )
        })?;
        if num_neighbors > 4096 {
            return Err(s.invalid(
                "num_neighbors",
                format!("is {num_neighbors}; at most 4096"),
            ));
        }
        Ok(ZeroOrderArgs {
            rounds,
            threshold,
            num_neighbors,
        })
    }

    fn rounds(&self) -> Option<usize> {
        Some(self.rounds)
    }

    fn media_per_prompt(&self) -> usize {
        1 + self.rounds * self.num_neighbors
    }

    fn search(&self, run: Search<'_>) -> Result<(), SearchError> {
        let Search {
            prompt,
            pipeline,
            verifier,
            settings,
            observer,
            store,
        } = run;
        let ZeroOrderArgs {
            rounds,
            threshold,
            num_neighbors,
        } = *self;
        let shape = pipeline.noise_shape();
        let per_image = pipeline.evaluations_per_image();
        let mut meter = Meter::new(settings.budget);
        let nfe_of = |n: usize| per_image.map(|e| (e * n) as u64);
        let mut stream = SeedStream::new(settings.master_seed, prompt);
        let fatal = OnceLock::new();
        std::thread::scope(|scope| {
            let mut queue = RoundQueue::new(scope, (prompt, verifier, store), settings, &fatal);
            let mut carried: Option<(Candidate, Noise)> = None;
            for round in 1..=rounds {
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
                        settings.noise_kernel,
                    ));
                    origins.push(NoiseOrigin::Neighbor {
                        base: Box::new(base_origin.clone()),
                        neighbor_index: i,
                        direction_seed,
                        threshold,
                    });
                }
                // The next round's base depends on this round's grades: no overlap across
                // rounds, only between the batches of this one.
                queue.generate_round(round, origins, &noises, pipeline, settings, observer, None)?;
                let mut graded = queue.collect_round()?;
                let mut all_noises = noises;
                if let Some(mut b) = base {
                    b.carried_over = true;
                    graded.candidates.insert(0, b);
                    all_noises.insert(0, base_noise);
                }
                let new = graded.candidates.iter().filter(|c| !c.carried_over).count();
                let mut result = graded
                    .ranked(settings)
                    .into_round(round, settings, nfe_of(new));
                let improved = result.best.is_some_and(|i| i > 0);
                if let Some(i) = result.best.filter(|_| improved) {
                    carried = Some((result.candidates[i].clone(), all_noises.swap_remove(i)));
                }
                result.neighbors_improvement = Some(improved);
                observer.round_finished(prompt, &result)?;
                queue.check_fatal()?;
            }
            Ok(())
        })
    }
}
