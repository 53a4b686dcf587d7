//! Random search, the paper's baseline: round r draws 2^r fresh noises (seeds from the master
//! seed), and every round's best is kept. Rounds do not depend on each other's scores, so the
//! next round is generated while the last one's batches are graded.

use std::sync::OnceLock;

use super::queue::RoundQueue;
use super::registry::{read_rounds, Search, Strategy};
use super::seeds::{SeedPurpose, SeedStream};
use super::{GradedRound, Meter, NoiseOrigin, RoundResult, SearchError, SearchSettings};
use crate::keys::{KeyError, Section};
use crate::noise::Noise;

/// The arguments of random search.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomArgs {
    /// `search_rounds` (1 to 20).
    pub rounds: usize,
}

/// A finished round of random search.
fn finish(settings: &SearchSettings, per_image: Option<usize>, round: usize, g: GradedRound) -> RoundResult {
    let nfe = per_image.map(|e| (e * g.candidates.len()) as u64);
    g.ranked(settings).into_round(round, settings, nfe)
}

impl Strategy for RandomArgs {
    const NAME: &'static str = "random";
    const TITLE: &'static str = "random search";
    const KEYS: &'static [&'static str] = &["search_rounds"];

    fn read(s: &Section<'_>) -> Result<Self, KeyError> {
        Ok(RandomArgs {
            rounds: read_rounds(s)?,
        })
    }

    fn rounds(&self) -> Option<usize> {
        Some(self.rounds)
    }

    fn media_per_prompt(&self) -> usize {
        (1usize << (self.rounds + 1)).saturating_sub(2)
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
        let shape = pipeline.noise_shape();
        let per_image = pipeline.evaluations_per_image();
        let mut meter = Meter::new(settings.budget);
        let nfe_of = |n: usize| per_image.map(|e| (e * n) as u64);
        let mut stream = SeedStream::new(settings.master_seed, prompt);
        let fatal = OnceLock::new();
        std::thread::scope(|scope| {
            let mut queue = RoundQueue::new(scope, (prompt, verifier, store), settings, &fatal);
            for round in 1..=self.rounds {
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
                    Some(&mut |r, g| finish(settings, per_image, r, g)),
                )?;
            }
            queue.drain(observer, &mut |r, g| finish(settings, per_image, r, g))?;
            queue.check_fatal()
        })
    }
}
