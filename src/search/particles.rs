//! Particle search: Feynman-Kac steering (Singhal et al. 2025). K particles are denoised in
//! lockstep with a stochastic sampler (the DDIM-eta step on the model's own schedule: DDPM /
//! ancestral steps at `eta = 1` for the UNets, the same step in the flow's `alpha = 1 - t`,
//! `sigma = t` form for Flux). At the potential steps the verifier grades every particle's
//! decoded clean-sample prediction, the rewards make potentials (`max`, `add`, `diff`, inverse
//! temperature lambda), and the particles are resampled multinomially in proportion to their
//! importance weights, adaptively when the effective sample size falls below a threshold.
//!
//! The importance weights are the product of all potentials since the last resampling: a
//! potential step that does not resample carries its weights into the next one (the reference
//! code judged and resampled on the latest potential alone). After the last step the final
//! images are graded and the best one is the result.

use candle_core::Tensor;
use serde_json::json;

use super::registry::{Search, Strategy};
use super::seeds::{SeedPurpose, SeedStream};
use super::stepwise::{select_rows, stage_round, Stepper};
use super::{Meter, NoiseOrigin, SearchError};
use crate::keys::{KeyError, Section};
use crate::models::ModelError;
use crate::schedulers::levels::ddim_step;

/// The potential of Feynman-Kac steering (`potential`), from the verifier's rewards `r` of a
/// particle's clean-sample predictions and the temperature `lambda`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Potential {
    /// `max`: `exp(lambda · max of the rewards so far)` (the default).
    Max,
    /// `add`: `exp(lambda · sum of the rewards so far)`.
    Add,
    /// `diff`: `exp(lambda · (r_t - r_previous))`.
    Diff,
}

/// The parameters of particle search (Feynman-Kac steering).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParticleArgs {
    /// `num_particles`: particles denoised in lockstep (K, default 4).
    pub num_particles: usize,
    /// `lambda`: the potentials' inverse temperature (default 10).
    pub lambda: f64,
    /// `potential`: how rewards make potentials (default `max`).
    pub potential: Potential,
    /// `resample_interval`: steps between potential evaluations (default 5).
    pub resample_interval: usize,
    /// `resample_start`: first step (0-based) potentials are evaluated at (default: the
    /// interval).
    pub resample_start: Option<usize>,
    /// `resample_end`: last step potentials may be evaluated at before the final one
    /// (default: the last step); the final step always is.
    pub resample_end: Option<usize>,
    /// `adaptive_resampling`: resample only when the effective sample size falls below
    /// `ess_threshold · K` (default true); false resamples at every potential.
    pub adaptive: bool,
    /// `ess_threshold`: the fraction of K (default 0.5).
    pub ess_threshold: f64,
    /// `eta`: the sampler's stochasticity (default 1: DDPM / ancestral steps).
    pub eta: f64,
}

impl Strategy for ParticleArgs {
    const NAME: &'static str = "particles";
    const TITLE: &'static str = "particle search";
    const KEYS: &'static [&'static str] = &[
        "num_particles",
        "lambda",
        "potential",
        "resample_interval",
        "resample_start",
        "resample_end",
        "adaptive_resampling",
        "ess_threshold",
        "eta",
    ];

    fn read(s: &Section<'_>) -> Result<Self, KeyError> {
        let step = |key: &str| s.count_in(key, 0, 100_000);
        let args = ParticleArgs {
            num_particles: s.count_in("num_particles", 1, 1024)?.unwrap_or(4),
            lambda: s.number_in("lambda", (0.0, false), 1e6)?.unwrap_or(10.0),
            potential: s
                .choice(
                    "potential",
                    &[
                        ("max", Potential::Max),
                        ("add", Potential::Add),
                        ("diff", Potential::Diff),
                    ],
                )?
                .unwrap_or(Potential::Max),
            resample_interval: s.count_in("resample_interval", 1, 100_000)?.unwrap_or(5),
            resample_start: step("resample_start")?,
            resample_end: step("resample_end")?,
            adaptive: s.boolean("adaptive_resampling")?.unwrap_or(true),
            ess_threshold: s.number_in("ess_threshold", (0.0, true), 1.0)?.unwrap_or(0.5),
            eta: s.number_in("eta", (0.0, true), 1.0)?.unwrap_or(1.0),
        };
        if let (Some(a), Some(b)) = (args.resample_start, args.resample_end) {
            if b < a {
                return Err(s.invalid(
                    "resample_end",
                    format!("is {b}; it must not be before resample_start ({a})"),
                ));
            }
        }
        Ok(args)
    }

    fn rounds(&self) -> Option<usize> {
        None
    }

    fn media_per_prompt(&self) -> usize {
        self.num_particles
    }

    fn search(&self, run: Search<'_>) -> Result<(), SearchError> {
        search(run, self)
    }
}

/// The particles' importance weights between resamplings and the state their potentials need.
#[derive(Clone, Debug, PartialEq)]
pub struct ParticleWeights {
    potential: Potential,
    lambda: f64,
    /// Log importance weight of each particle since the last resampling.
    log_weights: Vec<f64>,
    /// Per particle: the running max (`max`), running sum (`add`) or last reward (`diff`).
    history: Vec<Option<f64>>,
}

/// What one potential step did to the weights.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightUpdate {
    /// Each particle's log potential at this step.
    pub log_potentials: Vec<f64>,
    /// Each particle's log importance weight after it (before any resampling).
    pub log_weights: Vec<f64>,
    /// The effective sample size of those weights, in particles (1 to K).
    pub ess: f64,
}

impl ParticleWeights {
    /// Equal weights for `k` particles.
    pub fn new(k: usize, potential: Potential, lambda: f64) -> Self {
        Self {
            potential,
            lambda,
            log_weights: vec![0.0; k],
            history: vec![None; k],
        }
    }

    /// The current log importance weights.
    pub fn log_weights(&self) -> &[f64] {
        &self.log_weights
    }

    /// Applies one potential step's rewards (`None`: the particle could not be graded; its
    /// potential is 1 and its history unchanged): `max` gives `lambda · max(rewards so far)`,
    /// `add` `lambda · sum(rewards so far)`, `diff` `lambda · (r - previous r)` (the previous
    /// reward of the first step is 0) as the log potential, added to the log weight.
    pub fn observe(&mut self, rewards: &[Option<f64>]) -> WeightUpdate {
        let mut log_potentials = Vec::with_capacity(rewards.len());
        for (i, r) in rewards.iter().enumerate() {
            let Some(r) = r.filter(|r| r.is_finite()) else {
                log_potentials.push(0.0);
                continue;
            };
            let h = self.history.get(i).copied().flatten();
            let (log_g, next) = match self.potential {
                Potential::Max => {
                    let m = h.map_or(r, |h| h.max(r));
                    (self.lambda * m, m)
                }
                Potential::Add => {
                    let sum = h.unwrap_or(0.0) + r;
                    (self.lambda * sum, sum)
                }
                Potential::Diff => (self.lambda * (r - h.unwrap_or(0.0)), r),
            };
            if let Some(slot) = self.history.get_mut(i) {
                *slot = Some(next);
            }
            if let Some(w) = self.log_weights.get_mut(i) {
                *w += log_g;
            }
            log_potentials.push(log_g);
        }
        WeightUpdate {
            log_potentials,
            log_weights: self.log_weights.clone(),
            ess: self.ess(),
        }
    }

    /// The weights normalised to sum to 1.
    pub fn normalized(&self) -> Vec<f64> {
        let max = self
            .log_weights
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = self.log_weights.iter().map(|l| (l - max).exp()).collect();
        let sum: f64 = w.iter().sum();
        w.iter().map(|x| x / sum).collect()
    }

    /// The effective sample size `(sum w)² / sum w²`.
    pub fn ess(&self) -> f64 {
        let w = self.normalized();
        1.0 / w.iter().map(|x| x * x).sum::<f64>()
    }

    /// After a resampling to `ancestors`: each particle takes its ancestor's history and all
    /// weights are equal again.
    pub fn resampled(&mut self, ancestors: &[usize]) {
        self.history = ancestors
            .iter()
            .map(|&a| self.history.get(a).copied().flatten())
            .collect();
        self.log_weights = vec![0.0; ancestors.len()];
    }
}

/// SplitMix64: a small, fixed generator, so that a resampling is the same on every machine
/// and every version.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `k` multinomial draws of indices with probabilities `weights` (summing to 1), from the
/// uniforms of SplitMix64 seeded with `seed`.
pub fn multinomial(weights: &[f64], seed: u64, k: usize) -> Vec<usize> {
    let mut state = seed;
    (0..k)
        .map(|_| {
            let u = (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
            let mut acc = 0.0;
            weights
                .iter()
                .position(|w| {
                    acc += w;
                    u < acc
                })
                .unwrap_or(weights.len().saturating_sub(1))
        })
        .collect()
}

/// The steps (0-based, each a model call at that level) where potentials are evaluated:
/// from `resample_start` (default: the interval) every `resample_interval` steps up to
/// `resample_end` (default: the last step), among the `steps` of the schedule.
pub fn potential_steps(steps: usize, args: &ParticleArgs) -> Vec<usize> {
    let interval = args.resample_interval.max(1);
    let start = args.resample_start.unwrap_or(interval);
    let end = args
        .resample_end
        .unwrap_or(usize::MAX)
        .min(steps.saturating_sub(1));
    (start..=end).step_by(interval).collect()
}

/// Runs particle search for one prompt: a round for every potential step, then one for the
/// final images.
fn search(run: Search<'_>, args: &ParticleArgs) -> Result<(), SearchError> {
    let (prompt, settings) = (run.prompt, run.settings);
    let (mut st, schedule, observer) = Stepper::start(run)?;
    let last = schedule.last();
    let levels = &schedule.levels;
    let k = args.num_particles;
    let per_call = (schedule.evaluations_per_call * k) as u64;
    let mut stream = SeedStream::new(settings.master_seed, prompt);
    let mut meter = Meter::new(settings.budget);

    let seeds: Vec<u64> = (0..k)
        .map(|slot| stream.seed(0, SeedPurpose::Noise, slot))
        .collect();
    let mut lines: Vec<Vec<u64>> = seeds.iter().map(|&s| vec![s]).collect();
    let mut x = (st.noise_of(&seeds)? * schedule.init_noise_sigma).map_err(ModelError::from)?;
    let mut weights = ParticleWeights::new(k, args.potential, args.lambda);
    let origins = |lines: &[Vec<u64>]| -> Vec<NoiseOrigin> {
        lines
            .iter()
            .enumerate()
            .map(|(slot, seeds)| NoiseOrigin::Particle {
                slot,
                seeds: seeds.clone(),
                eta: args.eta,
            })
            .collect()
    };

    // One stochastic step of every particle from level i, given their x0 predictions there.
    let step = |st: &mut Stepper<'_>,
                stream: &mut SeedStream,
                lines: &mut [Vec<u64>],
                x: &Tensor,
                x0: &Tensor,
                i: usize|
     -> Result<Tensor, SearchError> {
        let seeds: Vec<u64> = (0..k)
            .map(|slot| stream.seed(i + 1, SeedPurpose::Step, slot))
            .collect();
        for (line, &s) in lines.iter_mut().zip(&seeds) {
            line.push(s);
        }
        let z = st.noise_of(&seeds)?;
        Ok(ddim_step(x, x0, &levels[i], &levels[i + 1], args.eta, &z).map_err(ModelError::from)?)
    };

    let mut pos = 0;
    let boundaries = potential_steps(last, args)
        .into_iter()
        .chain(std::iter::once(last));
    for (r, b) in boundaries.enumerate() {
        let round = r + 1;
        let calls = if b < last { b + 1 - pos } else { b - pos };
        let nfe = calls as u64 * per_call;
        if !meter.take(round, Some(nfe), k as u64) {
            break;
        }
        st.check_stop()?;
        observer.round_started(round, k);
        for i in pos..b {
            let x0 = st.predict_x0(&x, i)?;
            x = step(&mut st, &mut stream, &mut lines, &x, &x0, i)?;
        }
        if b == last {
            let images = st.decode(&x)?;
            let graded = st.graded(round, origins(&lines), images, observer)?;
            let rewards: Vec<Option<f64>> = graded
                .candidates
                .iter()
                .map(|c| c.score(&settings.metric))
                .collect();
            let detail = json!({
                "strategy": "particles",
                "step": b,
                "noise_level": levels[b].fraction,
                "final": true,
                "rewards": rewards,
                "log_weights": weights.log_weights(),
            });
            let result = stage_round(graded, round, settings, nfe, detail, false);
            observer.round_finished(prompt, &result)?;
            break;
        }
        let x0 = st.predict_x0(&x, b)?;
        let images = st.decode(&x0)?;
        let graded = st.graded(round, origins(&lines), images, observer)?;
        let rewards: Vec<Option<f64>> = graded
            .candidates
            .iter()
            .map(|c| c.score(&settings.metric))
            .collect();
        let update = weights.observe(&rewards);
        let threshold = args.ess_threshold * k as f64;
        let resample = !args.adaptive || update.ess < threshold;
        let ancestors = if resample {
            let seed = stream.seed(b, SeedPurpose::Resample, 0);
            let a = multinomial(&weights.normalized(), seed, k);
            weights.resampled(&a);
            Some(a)
        } else {
            None
        };
        let detail = json!({
            "strategy": "particles",
            "step": b,
            "noise_level": levels[b].fraction,
            "rewards": rewards,
            "log_potentials": update.log_potentials,
            "log_weights": update.log_weights,
            "ess": update.ess,
            "ess_threshold": threshold,
            "resampled": resample,
            "ancestors": ancestors,
        });
        let result = stage_round(graded, round, settings, nfe, detail, true);
        observer.round_finished(prompt, &result)?;
        let (x_now, x0_now) = match &ancestors {
            Some(a) => {
                lines = a.iter().map(|&i| lines[i].clone()).collect();
                (select_rows(&x, a)?, select_rows(&x0, a)?)
            }
            None => (x, x0),
        };
        x = step(&mut st, &mut stream, &mut lines, &x_now, &x0_now, b)?;
        pos = b + 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::stepwise::fakes::{self, key, FakeStepper, Rounds};
    use super::super::RoundResult;
    use super::*;

    fn args(interval: usize, start: Option<usize>, end: Option<usize>) -> ParticleArgs {
        ParticleArgs {
            num_particles: 4,
            lambda: 10.0,
            potential: Potential::Max,
            resample_interval: interval,
            resample_start: start,
            resample_end: end,
            adaptive: true,
            ess_threshold: 0.5,
            eta: 1.0,
        }
    }

    fn run(a: ParticleArgs, budget: Option<crate::search::SearchBudget>) -> (Rounds, FakeStepper) {
        fakes::run(crate::search::SearchMethod::Particles(a), budget)
    }

    fn stage(r: &RoundResult) -> &serde_json::Value {
        r.stage.as_ref().unwrap()
    }

    #[test]
    fn particles_step_in_lockstep_and_grade_at_the_potential_steps() {
        let (rounds, pipeline) = run(args(3, None, None), None);
        let rounds = rounds.0;
        // Potential steps 3, 6, 9 of the 10, then the final images.
        let steps: Vec<u64> = rounds
            .iter()
            .map(|r| stage(r)["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, vec![3, 6, 9, 10]);
        assert!(rounds
            .iter()
            .all(|r| r.candidates.len() == 4 && r.verifier_calls == 4));
        // One call a step for 4 particles, 2 evaluations a call: 4, 3, 3 calls, then none.
        let nfe: Vec<Option<u64>> = rounds.iter().map(|r| r.nfe).collect();
        assert_eq!(nfe, vec![Some(32), Some(24), Some(24), Some(0)]);
        let log = pipeline.log.lock().unwrap().clone();
        let predicted: Vec<usize> = log.iter().filter(|l| l.3 == 3).map(|l| l.1).collect();
        assert_eq!(
            predicted,
            (0..10).collect::<Vec<_>>(),
            "one call a level, batches of 3 + 1"
        );
        // Each particle's line has one seed more than the levels it has passed.
        for r in &rounds {
            let level = stage(r)["step"].as_u64().unwrap() as usize;
            for c in &r.candidates {
                let NoiseOrigin::Particle { seeds, .. } = &c.origin else {
                    panic!("{:?}", c.origin);
                };
                assert_eq!(seeds.len(), level + 1);
            }
        }
        // The result is the best final image.
        let last = rounds.last().unwrap();
        let best = last.best.unwrap();
        let top = last.candidates[best].score("overall_score");
        assert!(last
            .candidates
            .iter()
            .all(|c| c.score("overall_score") <= top));
    }

    #[test]
    fn resampling_happens_when_the_ess_falls_below_half_and_weights_carry_otherwise() {
        // lambda 0: equal weights, ESS = K, never resampled.
        let mut a = args(3, None, None);
        a.lambda = 0.0;
        let (rounds, _) = run(a, None);
        for r in &rounds.0[..3] {
            assert_eq!(stage(r)["ess"].as_f64(), Some(4.0));
            assert_eq!(stage(r)["resampled"], json!(false));
        }
        // A steep lambda: the ESS collapses and every particle descends from the best.
        a.lambda = 50.0;
        let (rounds, _) = run(a, None);
        let first = &rounds.0[0];
        let s = stage(first);
        assert!(s["ess"].as_f64().unwrap() < 2.0, "{s}");
        assert_eq!(s["resampled"], json!(true));
        let best = first.best.unwrap();
        assert_eq!(s["ancestors"], json!([best, best, best, best]));
        // The next round's particles all carry the best line's seeds up to that step.
        let NoiseOrigin::Particle { seeds: kept, .. } = &first.candidates[best].origin else {
            panic!();
        };
        for c in &rounds.0[1].candidates {
            let NoiseOrigin::Particle { seeds, .. } = &c.origin else {
                panic!();
            };
            assert_eq!(&seeds[..kept.len()], &kept[..]);
        }
        // A mild lambda: no resampling at the first potential step, whose weights then count
        // at the second (the sum of both steps' log potentials).
        a.lambda = 0.01;
        let (rounds, _) = run(a, None);
        let (s1, s2) = (stage(&rounds.0[0]), stage(&rounds.0[1]));
        assert_eq!(s1["resampled"], json!(false));
        let p1 = s1["log_potentials"].as_array().unwrap();
        let p2 = s2["log_potentials"].as_array().unwrap();
        let w2 = s2["log_weights"].as_array().unwrap();
        for i in 0..4 {
            let direct = p1[i].as_f64().unwrap() + p2[i].as_f64().unwrap();
            assert!((w2[i].as_f64().unwrap() - direct).abs() < 1e-9);
        }
        // Non-adaptive resampling resamples at every potential step.
        let mut b = args(3, None, None);
        b.adaptive = false;
        b.lambda = 0.0;
        let (rounds, _) = run(b, None);
        assert!(rounds.0[..3]
            .iter()
            .all(|r| stage(r)["resampled"] == json!(true)));
    }

    #[test]
    fn the_same_master_seed_gives_the_same_particles_and_budgets_stop_them() {
        let (a, _) = run(args(3, None, None), None);
        let (b, _) = run(args(3, None, None), None);
        assert_eq!(key(&a), key(&b));
        use crate::search::SearchBudget;
        let (r, _) = run(args(3, None, None), Some(SearchBudget::Nfe(56)));
        assert_eq!(r.0.len(), 2, "32 + 24 NFEs");
        let (r, _) = run(args(3, None, None), Some(SearchBudget::VerifierCalls(4)));
        assert_eq!(r.0.len(), 1);
        assert_eq!(key(&r)[..], key(&a)[..1]);
        let (r, _) = run(args(3, None, None), Some(SearchBudget::Seconds(1e-9)));
        assert_eq!(r.0.len(), 1);
    }

    #[test]
    fn potential_steps_follow_interval_and_window() {
        assert_eq!(
            potential_steps(30, &args(5, None, None)),
            vec![5, 10, 15, 20, 25]
        );
        assert_eq!(
            potential_steps(30, &args(5, Some(2), Some(12))),
            vec![2, 7, 12]
        );
        assert_eq!(
            potential_steps(4, &args(1, Some(0), None)),
            vec![0, 1, 2, 3]
        );
        assert!(potential_steps(4, &args(5, None, None)).is_empty());
    }

    #[test]
    fn weights_carry_across_a_step_that_does_not_resample() {
        // Two potential steps; the first leaves the ESS above K/2, so its potentials must
        // still count at the second: the weights there are exp(sum of both steps' log
        // potentials), computed here directly.
        let lambda = 0.5;
        let mut w = ParticleWeights::new(4, Potential::Diff, lambda);
        let r1 = [0.1, 0.3, 0.2, 0.4];
        let u1 = w.observe(&r1.map(Some));
        assert!(u1.ess > 2.0, "{}", u1.ess);
        let r2 = [2.0, 0.3, 5.0, 0.0];
        let u2 = w.observe(&r2.map(Some));
        let direct: Vec<f64> = (0..4)
            .map(|i| lambda * (r1[i] - 0.0) + lambda * (r2[i] - r1[i]))
            .collect();
        for (got, want) in u2.log_weights.iter().zip(&direct) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        let z: f64 = direct.iter().map(|l| l.exp()).sum();
        let norm: Vec<f64> = direct.iter().map(|l| l.exp() / z).collect();
        let ess = 1.0 / norm.iter().map(|p| p * p).sum::<f64>();
        assert!((u2.ess - ess).abs() < 1e-12);
        // The reference's rule (the latest potential alone) gives other weights.
        let latest: Vec<f64> = (0..4).map(|i| lambda * (r2[i] - r1[i])).collect();
        assert!(latest
            .iter()
            .zip(&direct)
            .any(|(a, b)| (a - b).abs() > 1e-3));
        for (got, want) in w.normalized().iter().zip(&norm) {
            assert!((got - want).abs() < 1e-12);
        }
    }

    #[test]
    fn potentials_are_max_add_and_diff_of_the_rewards_so_far() {
        let rewards = [[1.0, 3.0], [2.0, 1.0]];
        let logs = |p: Potential| {
            let mut w = ParticleWeights::new(2, p, 1.0);
            rewards
                .iter()
                .map(|r| w.observe(&r.map(Some)).log_potentials)
                .collect::<Vec<_>>()
        };
        assert_eq!(logs(Potential::Max), vec![vec![1.0, 3.0], vec![2.0, 3.0]]);
        assert_eq!(logs(Potential::Add), vec![vec![1.0, 3.0], vec![3.0, 4.0]]);
        assert_eq!(logs(Potential::Diff), vec![vec![1.0, 3.0], vec![1.0, -2.0]]);
        // An ungraded particle gets potential 1 (log 0) and keeps its history.
        let mut w = ParticleWeights::new(2, Potential::Max, 1.0);
        w.observe(&[Some(1.0), Some(1.0)]);
        let u = w.observe(&[None, Some(0.5)]);
        assert_eq!(u.log_potentials, vec![0.0, 1.0]);
    }

    #[test]
    fn resampling_copies_history_and_resets_weights() {
        let mut w = ParticleWeights::new(3, Potential::Max, 1.0);
        w.observe(&[Some(1.0), Some(5.0), Some(2.0)]);
        w.resampled(&[1, 1, 2]);
        assert_eq!(w.log_weights(), &[0.0, 0.0, 0.0]);
        // The copies of particle 1 keep its running max of 5.
        let u = w.observe(&[Some(0.0), Some(0.0), Some(0.0)]);
        assert_eq!(u.log_potentials, vec![5.0, 5.0, 2.0]);
    }

    #[test]
    fn multinomial_draws_follow_the_weights_and_the_seed() {
        let draws = multinomial(&[0.0, 1.0, 0.0], 7, 5);
        assert_eq!(draws, vec![1; 5]);
        let a = multinomial(&[0.25; 4], 3, 4000);
        assert_eq!(a, multinomial(&[0.25; 4], 3, 4000));
        assert_ne!(a, multinomial(&[0.25; 4], 4, 4000));
        for i in 0..4 {
            let n = a.iter().filter(|&&x| x == i).count();
            assert!((900..1100).contains(&n), "{i}: {n}");
        }
    }
}
