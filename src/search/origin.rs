//! Where a candidate's initial noise comes from ([`NoiseOrigin`]), recorded so that it can be
//! made again: by a resumed run, by the round JSON's reader, by diffusers from the seed.

use serde::Serialize;

use super::neighbors;
use crate::noise::{torch_randn, Noise, RandnKernel};

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
    pub fn regenerate(&self, shape: &[usize], kernel: RandnKernel) -> Noise {
        match self {
            NoiseOrigin::Seed { seed } => torch_randn(*seed, shape, kernel),
            NoiseOrigin::PathBranch { base, .. } => base.regenerate(shape, kernel),
            NoiseOrigin::Particle { .. } => torch_randn(self.root_seed(), shape, kernel),
            NoiseOrigin::Neighbor {
                base,
                direction_seed,
                threshold,
                ..
            } => {
                let b = base.regenerate(shape, kernel);
                neighbors::neighbor(&b, *threshold, *direction_seed, kernel)
            }
        }
    }
}
