//! Candidate seeds derived from the master seed: independent per prompt and round, never
//! repeated within a prompt.

use std::collections::HashSet;

use sha2::{Digest, Sha256};

/// Seeds stay below `i32::MAX` (2147483647), as the original's, so every tool accepts them.
pub const MAX_SEED: u64 = 2_147_483_647;

/// What a seed is for; part of its derivation so that the streams never overlap by design.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedPurpose {
    /// A candidate's (or a zero-order base's) initial noise.
    Noise,
    /// The random direction of a zero-order neighbour.
    Direction,
    /// The re-noising draw of a branch of search over paths.
    Branch,
    /// The noise of a particle's stochastic step.
    Step,
    /// The uniform draws of a particle resampling.
    Resample,
}

/// The seed source of one prompt. Seed `k` of round `r` is a hash of (master seed, prompt,
/// round, purpose, k), so it does not depend on any other round or prompt, or on how many
/// noises were drawn before it. A value already used for this prompt is skipped.
#[derive(Debug)]
pub struct SeedStream {
    master: u64,
    prompt_digest: [u8; 32],
    used: HashSet<u64>,
}

impl SeedStream {
    /// The stream of `prompt` under `master` seed.
    pub fn new(master: u64, prompt: &str) -> Self {
        Self {
            master,
            prompt_digest: Sha256::digest(prompt.as_bytes()).into(),
            used: HashSet::new(),
        }
    }

    /// Seed number `k` of `round` for `purpose`: in `[0, MAX_SEED)`, unique within the prompt.
    pub fn seed(&mut self, round: usize, purpose: SeedPurpose, k: usize) -> u64 {
        let mut attempt = 0u64;
        loop {
            let mut h = Sha256::new();
            h.update(b"tt-scale seed v1");
            h.update(self.master.to_le_bytes());
            h.update(self.prompt_digest);
            h.update((round as u64).to_le_bytes());
            h.update([match purpose {
                SeedPurpose::Noise => 0u8,
                SeedPurpose::Direction => 1u8,
                SeedPurpose::Branch => 2u8,
                SeedPurpose::Step => 3u8,
                SeedPurpose::Resample => 4u8,
            }]);
            h.update((k as u64).to_le_bytes());
            h.update(attempt.to_le_bytes());
            let d = h.finalize();
            let v = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            let seed = (v >> 33) % MAX_SEED;
            if self.used.insert(seed) {
                return seed;
            }
            attempt += 1;
        }
    }
}

/// A master seed for a run that was given none.
pub fn draw_master_seed() -> u64 {
    rand::random::<u64>() % MAX_SEED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_a_function_of_master_prompt_round_and_index() {
        let mut a = SeedStream::new(1, "a cat");
        let mut b = SeedStream::new(1, "a cat");
        let sa: Vec<u64> = (0..8).map(|k| a.seed(3, SeedPurpose::Noise, k)).collect();
        // Drawing other rounds first does not change round 3's seeds.
        for k in 0..4 {
            b.seed(1, SeedPurpose::Noise, k);
        }
        let sb: Vec<u64> = (0..8).map(|k| b.seed(3, SeedPurpose::Noise, k)).collect();
        assert_eq!(sa, sb);
        let mut c = SeedStream::new(2, "a cat");
        let mut d = SeedStream::new(1, "a dog");
        assert_ne!(c.seed(3, SeedPurpose::Noise, 0), sa[0]);
        assert_ne!(d.seed(3, SeedPurpose::Noise, 0), sa[0]);
    }

    #[test]
    fn seeds_never_repeat_within_a_prompt_and_stay_below_max_seed() {
        let mut s = SeedStream::new(7, "p");
        let mut seen = HashSet::new();
        for round in 1..=10 {
            for k in 0..(1usize << round) {
                let v = s.seed(round, SeedPurpose::Noise, k);
                assert!(v < MAX_SEED);
                assert!(seen.insert(v));
            }
        }
    }
}
