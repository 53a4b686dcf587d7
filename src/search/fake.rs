//! A stand-in strategy for the tests of the extension points: registered by one line of
//! `strategies!` as `fake`, it draws `fake_candidates` noises (default 3) in one round and
//! keeps the best, through the same batch-and-grade queue as random search.

use std::sync::OnceLock;

use super::queue::RoundQueue;
use super::registry::{Search, Strategy};
use super::seeds::{SeedPurpose, SeedStream};
use super::{NoiseOrigin, SearchError};
use crate::keys::{KeyError, Section};
use crate::noise::Noise;

/// The fake strategy's arguments.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FakeArgs {
    /// `fake_candidates`: noises drawn (1 to 64).
    pub candidates: usize,
}

impl Strategy for FakeArgs {
    const NAME: &'static str = "fake";
    const TITLE: &'static str = "the fake strategy";
    const KEYS: &'static [&'static str] = &["fake_candidates"];

    fn read(s: &Section<'_>) -> Result<Self, KeyError> {
        Ok(FakeArgs {
            candidates: s.count_in("fake_candidates", 1, 64)?.unwrap_or(3),
        })
    }

    fn rounds(&self) -> Option<usize> {
        Some(1)
    }

    fn media_per_prompt(&self) -> usize {
        self.candidates
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
        let mut stream = SeedStream::new(settings.master_seed, prompt);
        let origins: Vec<NoiseOrigin> = (0..self.candidates)
            .map(|k| NoiseOrigin::Seed {
                seed: stream.seed(1, SeedPurpose::Noise, k),
            })
            .collect();
        let noises: Vec<Noise> = origins
            .iter()
            .map(|o| o.regenerate(&shape, settings.noise_kernel))
            .collect();
        let fatal = OnceLock::new();
        std::thread::scope(|scope| {
            let mut queue = RoundQueue::new(scope, (prompt, verifier, store), settings, &fatal);
            observer.round_started(1, self.candidates);
            queue.generate_round(1, origins, &noises, pipeline, settings, observer, None)?;
            let graded = queue.collect_round()?;
            let nfe = per_image.map(|e| (e * graded.candidates.len()) as u64);
            let result = graded.ranked(settings).into_round(1, settings, nfe);
            observer.round_finished(prompt, &result)?;
            queue.check_fatal()
        })
    }
}
