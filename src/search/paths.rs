//! Search over paths (Ma et al. 2025, "Search over Paths"): N initial noises are denoised to
//! the search start level; at every stage each surviving path branches into M by re-noising it
//! forward by `delta_f` (the forward process, fresh seeded noise) and denoising back by
//! `delta_b` with the pipeline's scheduler; the verifier grades every branch (on its decoded
//! clean-sample prediction, or on its image denoised to the end) and the best N survive, until
//! the paths reach the end of the schedule. The last stage's branches are final images, so the
//! search ends with a best-of-N·M over them.
//!
//! The levels are those of the model's own schedule: a stage re-noises to the level closest to
//! `level + delta_f` and denoises to the level closest to `that - delta_b`, at least one level
//! on, so the search needs no steps the schedule does not have.

use serde_json::json;

use super::registry::{Search, Strategy};
use super::seeds::{SeedPurpose, SeedStream};
use super::stepwise::{select_rows, stage_round, Stepper};
use super::{Candidate, Meter, NoiseOrigin, SearchError};
use crate::keys::{KeyError, Section};
use crate::models::ModelError;
use crate::schedulers::levels::renoise;
use crate::schedulers::NoiseLevel;

/// The parameters of search over paths. Noise levels are fractions of the model's noise
/// schedule (1 = pure noise, 0 = clean; the flow time for Flux, timestep / 1000 for the UNets).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PathsArgs {
    /// `num_paths`: paths kept after every stage, and initial noises (N, default 2).
    pub num_paths: usize,
    /// `paths_width`: branches drawn from each path at every stage (M, default 2).
    pub paths_width: usize,
    /// `search_start_sigma`: the level the initial paths are denoised to before the first
    /// branching (default 0.11, the paper's).
    pub search_start_sigma: f64,
    /// `delta_f`: how far a branch is re-noised forward (default 0.78).
    pub delta_f: f64,
    /// `delta_b`: how far a branch is then denoised back (default 0.81; more than `delta_f`,
    /// so every stage ends less noisy than it started).
    pub delta_b: f64,
    /// `paths_score`: what the verifier sees of a branch.
    pub score: PathScore,
}

/// What the verifier grades of a branch of search over paths (`paths_score`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathScore {
    /// `x0`: the decoded clean-sample prediction of the branch's last model call (no extra
    /// denoiser evaluations; the default).
    X0,
    /// `final`: the image the branch gives when denoised to the end (costs the remaining steps).
    Final,
}

impl Strategy for PathsArgs {
    const NAME: &'static str = "paths";
    const TITLE: &'static str = "search over paths";
    const KEYS: &'static [&'static str] = &[
        "num_paths",
        "paths_width",
        "search_start_sigma",
        "delta_f",
        "delta_b",
        "paths_score",
    ];

    fn read(s: &Section<'_>) -> Result<Self, KeyError> {
        let count = |key: &str, default: usize| -> Result<usize, KeyError> {
            Ok(s.count_in(key, 1, 1024)?.unwrap_or(default))
        };
        let level = |key: &str, default: f64| -> Result<f64, KeyError> {
            Ok(s.number_in(key, (0.0, true), 1.0)?.unwrap_or(default))
        };
        let args = PathsArgs {
            num_paths: count("num_paths", 2)?,
            paths_width: count("paths_width", 2)?,
            search_start_sigma: level("search_start_sigma", 0.11)?,
            delta_f: level("delta_f", 0.78)?,
            delta_b: level("delta_b", 0.81)?,
            score: s
                .choice("paths_score", &[("x0", PathScore::X0), ("final", PathScore::Final)])?
                .unwrap_or(PathScore::X0),
        };
        if args.delta_b <= args.delta_f {
            return Err(s.invalid(
                "delta_b",
                format!(
                    "is {}; it must be more than delta_f ({}), or the paths never reach \
                     the end of the schedule (the paper uses 0.81 and 0.78)",
                    args.delta_b, args.delta_f
                ),
            ));
        }
        Ok(args)
    }

    fn rounds(&self) -> Option<usize> {
        None
    }

    fn media_per_prompt(&self) -> usize {
        // Its stages add up to at least this many whole denoising runs.
        self.num_paths * self.paths_width
    }

    fn search(&self, run: Search<'_>) -> Result<(), SearchError> {
        search(run, self)
    }
}

/// What a stage scored on, when it scored the branches' clean-sample predictions.
const X0_PREDICTION: &str = "x0 prediction";

/// One stage: the surviving paths (at level `from`) are re-noised to `renoised_to` and
/// denoised to `to` (indices into the schedule's levels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathStage {
    /// The level the paths have reached.
    pub from: usize,
    /// The noisier level the branches are re-noised to.
    pub renoised_to: usize,
    /// The level the branches are denoised to.
    pub to: usize,
}

/// The levels a search over paths visits on a schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathsPlan {
    /// The level the initial paths are denoised to.
    pub start: usize,
    /// The branching stages, in order; the last ends at the final level.
    pub stages: Vec<PathStage>,
}

/// The index in `range` whose level fraction is closest to `target` (ties: the first).
fn closest(levels: &[NoiseLevel], range: std::ops::Range<usize>, target: f64) -> usize {
    let mut best = range.start;
    for i in range {
        if (levels[i].fraction - target).abs() < (levels[best].fraction - target).abs() {
            best = i;
        }
    }
    best
}

/// Plans the stages of search over paths on `levels` (a schedule's levels, the final one
/// last): the start is the step level closest to `search_start_sigma` (not the first, which
/// has nothing noisier to re-noise to); each stage re-noises to the level before it closest to
/// `level + delta_f` and denoises to the level after it closest to `that - delta_b`.
pub fn plan(levels: &[NoiseLevel], args: &PathsArgs) -> Result<PathsPlan, SearchError> {
    let n = levels.len().saturating_sub(1);
    if n < 2 {
        return Err(SearchError::Settings(format!(
            "search over paths needs at least 2 denoising steps, this schedule has {n}; raise \
             pipeline_call_args.num_inference_steps"
        )));
    }
    let start = closest(levels, 1..n, args.search_start_sigma);
    let mut stages = Vec::new();
    let mut at = start;
    while at < n {
        let renoised_to = closest(levels, 0..at, levels[at].fraction + args.delta_f);
        let to = closest(
            levels,
            at + 1..n + 1,
            levels[renoised_to].fraction - args.delta_b,
        );
        stages.push(PathStage {
            from: at,
            renoised_to,
            to,
        });
        at = to;
    }
    Ok(PathsPlan { start, stages })
}

/// Candidate indices from best to worst on `metric`: graded ones by score (ties: the
/// earlier), then the ungraded in order.
fn ranking(candidates: &[Candidate], metric: &str) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| {
        match (candidates[a].score(metric), candidates[b].score(metric)) {
            (Some(x), Some(y)) => y.total_cmp(&x),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        }
        .then(a.cmp(&b))
    });
    order
}

/// Runs search over paths for one prompt, reporting each stage as a round.
fn search(run: Search<'_>, args: &PathsArgs) -> Result<(), SearchError> {
    let (prompt, settings) = (run.prompt, run.settings);
    let (mut st, schedule, observer) = Stepper::start(run)?;
    let plan = plan(&schedule.levels, args)?;
    let last = schedule.last();
    let levels = &schedule.levels;
    let (n, m) = (args.num_paths, args.paths_width);
    let mut stream = SeedStream::new(settings.master_seed, prompt);
    let mut meter = Meter::new(settings.budget);

    let seeds: Vec<u64> = (0..n)
        .map(|i| stream.seed(0, SeedPurpose::Noise, i))
        .collect();
    let mut origins: Vec<NoiseOrigin> = seeds
        .iter()
        .map(|&seed| NoiseOrigin::Seed { seed })
        .collect();
    let mut latents =
        (st.noise_of(&seeds)? * schedule.init_noise_sigma).map_err(ModelError::from)?;
    let mut initial_pending = true;
    let per_image = |from: usize, to: usize| schedule.span_evaluations(from, to) as u64;

    for (i, stage) in plan.stages.iter().enumerate() {
        let round = i + 1;
        let parents = origins.len();
        let branches = parents * m;
        let to_end = stage.to < last && args.score == PathScore::Final;
        let mut nfe = branches as u64
            * (per_image(stage.renoised_to, stage.to)
                + if to_end { per_image(stage.to, last) } else { 0 });
        if initial_pending {
            nfe += (n as u64) * per_image(0, plan.start);
        }
        if !meter.take(round, Some(nfe), branches as u64) {
            break;
        }
        st.check_stop()?;
        observer.round_started(round, branches);
        if initial_pending {
            latents = st.span(&latents, 0, plan.start)?.latents;
            initial_pending = false;
        }

        let mut branch_origins = Vec::with_capacity(branches);
        let mut draws = Vec::with_capacity(branches);
        let mut parent_of = Vec::with_capacity(branches);
        for (p, base) in origins.iter().enumerate() {
            for _ in 0..m {
                let branch = branch_origins.len();
                let seed = stream.seed(round, SeedPurpose::Branch, branch);
                draws.push(seed);
                parent_of.push(p);
                branch_origins.push(NoiseOrigin::PathBranch {
                    base: Box::new(base.clone()),
                    branch,
                    seed,
                    from: stage.from,
                    renoised_to: stage.renoised_to,
                    to: stage.to,
                });
            }
        }
        let eps = st.noise_of(&draws)?;
        let bases = select_rows(&latents, &parent_of)?;
        let renoised = renoise(
            &bases,
            &levels[stage.from],
            &levels[stage.renoised_to],
            &eps,
        )
        .map_err(ModelError::from)?;
        let span = st.span(&renoised, stage.renoised_to, stage.to)?;
        let (images, scored_on) = if stage.to == last {
            (st.decode(&span.latents)?, "final image")
        } else if to_end {
            let end = st.span(&span.latents, stage.to, last)?;
            (
                st.decode(&end.latents)?,
                "final image (denoised to the end)",
            )
        } else {
            (st.decode(&span.x0)?, X0_PREDICTION)
        };
        let graded = st.graded(round, branch_origins, images, observer)?;
        let keep: Vec<usize> = ranking(&graded.candidates, &settings.metric)
            .into_iter()
            .take(n)
            .collect();
        let fraction = |l: usize| levels[l].fraction;
        let detail = json!({
            "strategy": "paths",
            "levels": {"from": stage.from, "renoised_to": stage.renoised_to, "to": stage.to},
            "noise_levels": {
                "from": fraction(stage.from),
                "renoised_to": fraction(stage.renoised_to),
                "to": fraction(stage.to),
            },
            "scored_on": scored_on,
            "parents": parent_of,
            "survivors": keep,
        });
        origins = keep
            .iter()
            .map(|&k| graded.candidates[k].origin.clone())
            .collect();
        latents = select_rows(&span.latents, &keep)?;
        let provisional = scored_on == X0_PREDICTION;
        let result = stage_round(graded, round, settings, nfe, detail, provisional);
        observer.round_finished(prompt, &result)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::stepwise::fakes::{self, key, FakeStepper, Rounds};
    use super::*;

    fn levels(fractions: &[f64]) -> Vec<NoiseLevel> {
        fractions
            .iter()
            .map(|&f| NoiseLevel {
                timestep: f * 1000.0,
                alpha: 1.0 - f,
                sigma: f,
                fraction: f,
            })
            .collect()
    }

    fn args(start: f64, f: f64, b: f64) -> PathsArgs {
        PathsArgs {
            num_paths: 2,
            paths_width: 2,
            search_start_sigma: start,
            delta_f: f,
            delta_b: b,
            score: PathScore::X0,
        }
    }

    #[test]
    fn the_plan_follows_the_schedule_and_reaches_the_end() {
        // 10 evenly spaced steps: 1.0, 0.9, ..., 0.1, then 0.
        let l = levels(&[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]);
        let p = plan(&l, &args(0.3, 0.4, 0.5)).unwrap();
        assert_eq!(p.start, 7);
        // 0.3 → 0.7 → 0.2; 0.2 → 0.6 → 0.1; 0.1 → 0.5 → 0.0.
        assert_eq!(
            p.stages,
            vec![
                PathStage {
                    from: 7,
                    renoised_to: 3,
                    to: 8
                },
                PathStage {
                    from: 8,
                    renoised_to: 4,
                    to: 9
                },
                PathStage {
                    from: 9,
                    renoised_to: 5,
                    to: 10
                },
            ]
        );
        // The paper's values on a coarse grid: every stage still advances at least one level.
        let p = plan(&l, &args(0.11, 0.78, 0.81)).unwrap();
        assert_eq!(p.start, 9);
        assert_eq!(
            p.stages,
            vec![PathStage {
                from: 9,
                renoised_to: 1,
                to: 10
            }]
        );
        // A forward step past pure noise re-noises to the first level.
        // Then back to 1.0 - 0.93 = 0.07, closest to the level 0.1.
        let p = plan(&l, &args(0.5, 0.9, 0.93)).unwrap();
        assert_eq!(
            p.stages[0],
            PathStage {
                from: 5,
                renoised_to: 0,
                to: 9
            }
        );
        assert_eq!(p.stages.last().map(|s| s.to), Some(10));
    }

    fn run(a: PathsArgs, budget: Option<crate::search::SearchBudget>) -> (Rounds, FakeStepper) {
        fakes::run(crate::search::SearchMethod::Paths(a), budget)
    }

    fn wide(score: PathScore) -> PathsArgs {
        PathsArgs {
            num_paths: 2,
            paths_width: 3,
            search_start_sigma: 0.3,
            delta_f: 0.4,
            delta_b: 0.5,
            score,
        }
    }

    #[test]
    fn each_stage_branches_every_survivor_and_keeps_the_best() {
        let (rounds, pipeline) = run(wide(PathScore::X0), None);
        let rounds = rounds.0;
        // The plan of the 10-step schedule: 7 → 3 → 8, 8 → 4 → 9, 9 → 5 → 10.
        assert_eq!(rounds.len(), 3);
        let mut previous: Option<Vec<NoiseOrigin>> = None;
        for r in &rounds {
            assert_eq!(r.candidates.len(), 6, "2 paths x 3 branches");
            assert_eq!(r.verifier_calls, 6);
            let stage = r.stage.as_ref().unwrap();
            assert_eq!(stage["parents"], json!([0, 0, 0, 1, 1, 1]));
            // The survivors are the two best scores, best first.
            let mut order: Vec<usize> = (0..6).collect();
            order.sort_by(|&a, &b| {
                let (x, y) = (
                    r.candidates[a].score("overall_score"),
                    r.candidates[b].score("overall_score"),
                );
                y.partial_cmp(&x).unwrap().then(a.cmp(&b))
            });
            assert_eq!(stage["survivors"], json!(order[..2]));
            assert_eq!(r.best, Some(order[0]));
            let top = r.candidates[order[0]].score("overall_score");
            assert!(
                top > r.candidates[order[5]].score("overall_score"),
                "scores must differ"
            );
            // Every branch grows from a survivor of the stage before.
            for c in &r.candidates {
                let NoiseOrigin::PathBranch { base, .. } = &c.origin else {
                    panic!("not a branch: {:?}", c.origin);
                };
                match &previous {
                    None => assert!(matches!(**base, NoiseOrigin::Seed { .. })),
                    Some(kept) => assert!(kept.contains(base)),
                }
            }
            let kept = order[..2]
                .iter()
                .map(|&i| r.candidates[i].origin.clone())
                .collect();
            previous = Some(kept);
        }
        // NFEs (2 a call): round 1 has the 2 initial paths to level 7 (2 x 7 x 2) and 6
        // branches of 5 steps (6 x 5 x 2); rounds 2 and 3 have 6 branches of 5 steps.
        let nfe: Vec<Option<u64>> = rounds.iter().map(|r| r.nfe).collect();
        assert_eq!(nfe, vec![Some(28 + 60), Some(60), Some(60)]);
        // The pipeline was asked for exactly that: spans of 2 rows (initial), then of 3 (the
        // batch size) for the 6 branches.
        let log = pipeline.log.lock().unwrap().clone();
        assert_eq!(log[0], ("span", 0, 7, 2));
        assert_eq!(log[1], ("span", 3, 8, 3));
        assert_eq!(log[2], ("span", 3, 8, 3));
        let calls: usize = log.iter().map(|(_, a, b, n)| (b - a) * n * 2).sum();
        assert_eq!(calls as u64, 28 + 60 * 3);
    }

    #[test]
    fn final_scoring_denoises_each_branch_to_the_end_and_counts_it() {
        let (rounds, pipeline) = run(wide(PathScore::Final), None);
        let nfe: Vec<Option<u64>> = rounds.0.iter().map(|r| r.nfe).collect();
        // Round 1: + 6 branches from level 8 to 10; round 2: + from 9 to 10; round 3 ends there.
        assert_eq!(nfe, vec![Some(88 + 6 * 2 * 2), Some(60 + 6 * 2), Some(60)]);
        let log = pipeline.log.lock().unwrap().clone();
        assert!(log.contains(&("span", 8, 10, 3)));
        assert!(log.contains(&("span", 9, 10, 3)));
    }

    #[test]
    fn the_same_master_seed_gives_the_same_search_and_budgets_stop_it() {
        let (a, _) = run(wide(PathScore::X0), None);
        let (b, _) = run(wide(PathScore::X0), None);
        assert_eq!(key(&a), key(&b));
        use crate::search::SearchBudget;
        // 12 verifier calls admit two stages of 6; 88 + 60 NFEs admit two stages.
        let (r, _) = run(wide(PathScore::X0), Some(SearchBudget::VerifierCalls(12)));
        assert_eq!(r.0.len(), 2);
        let (r, _) = run(wide(PathScore::X0), Some(SearchBudget::Nfe(148)));
        assert_eq!(r.0.len(), 2);
        let (r, _) = run(wide(PathScore::X0), Some(SearchBudget::Nfe(147)));
        assert_eq!(r.0.len(), 1, "the first stage always runs");
        // What was kept: the first rounds are those of the unlimited search.
        assert_eq!(key(&r)[..], key(&a)[..1]);
        // A spent time budget stops before the next stage.
        let (r, _) = run(wide(PathScore::X0), Some(SearchBudget::Seconds(1e-9)));
        assert_eq!(r.0.len(), 1);
    }

    #[test]
    fn one_step_schedules_are_refused_by_name() {
        let err = plan(&levels(&[1.0, 0.0]), &args(0.11, 0.78, 0.81)).unwrap_err();
        assert!(err.to_string().contains("num_inference_steps"), "{err}");
    }
}
