//! Verifiers made of verifiers: the paper's `ensemble` (every member grades every candidate; the
//! search selects by the average rank, [`crate::search::apply_ensemble_rank`]) and
//! `also_score` (extra verifiers whose scores are recorded beside the selecting verifier's and
//! never used to select, to show what a search costs on the metrics it does not optimise).
//!
//! A member's metrics are recorded as `<member>/<metric>` (`laion_aesthetic/clip_score`), an
//! `also_score` verifier's as `also/<name>/<metric>`; a name used twice gets its position
//! (`qwen#2/overall_score`).

use super::registry::{build_one, Built, VerifierSpec};
use super::{CallStats, Graded, Grading, ScoreFailure, TokenUsage, Verifier, VerifierInput};
use super::VerifierArgs;
use crate::media::MediaKind;

/// The metric of the `ensemble` verifier: each candidate's rank among its round's candidates
/// under each member's metric, normalised to [0, 1] (1 = best) and averaged over the members.
pub const ENSEMBLE_METRIC: &str = "ensemble_rank";

/// `ensemble` in the verifier table: its members grade every candidate (videos as each member
/// grades them).
pub const SPEC: VerifierSpec = VerifierSpec {
    name: "ensemble",
    metrics: &[ENSEMBLE_METRIC],
    media: &[MediaKind::Image, MediaKind::Video],
    build: |args, ctx| {
        let members = member_prefixes(&args.ensemble)
            .into_iter()
            .zip(&args.ensemble)
            .map(|(prefix, a)| Ok((prefix, build_one(a, ctx)?)))
            .collect::<Result<Vec<_>, super::VerifierError>>()?;
        Ok(Built::Media(Box::new(EnsembleVerifier::new(members))))
    },
};

/// A verifier with the prefix of its metrics in a combined grading.
pub type NamedVerifier = (String, Box<dyn Verifier>);

/// The prefix of each verifier's metrics in a combined grading: its name, or `name#i` (1-based)
/// when the name occurs more than once in `list`.
pub fn member_prefixes(list: &[VerifierArgs]) -> Vec<String> {
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            if list.iter().filter(|b| b.kind == a.kind).count() > 1 {
                format!("{}#{}", a.name(), i + 1)
            } else {
                a.name().to_string()
            }
        })
        .collect()
}

/// The metrics the `ensemble` of `members` ranks by: `<prefix>/<choice_of_metric>` per member.
pub fn rank_metrics(members: &[VerifierArgs]) -> Vec<String> {
    member_prefixes(members)
        .into_iter()
        .zip(members)
        .map(|(p, m)| format!("{p}/{}", m.choice_of_metric))
        .collect()
}

/// Adds every metric of `from` to `into` as `<prefix>/<metric>`.
pub fn merge(into: &mut Grading, prefix: &str, from: Grading) {
    for (metric, score) in from {
        into.insert(format!("{prefix}/{metric}"), score);
    }
}

/// The `ensemble` verifier: each member grades every input; a candidate's grading holds every
/// member's metrics, and fails when a member could not grade it (its rank would be missing).
pub struct EnsembleVerifier {
    members: Vec<NamedVerifier>,
}

impl EnsembleVerifier {
    /// The ensemble of `members`, named by [`member_prefixes`].
    pub fn new(members: Vec<NamedVerifier>) -> Self {
        Self { members }
    }
}

impl Verifier for EnsembleVerifier {
    fn name(&self) -> &str {
        "ensemble"
    }

    fn score(&self, inputs: &[VerifierInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
        without_usage(self.score_with_usage(inputs))
    }

    fn score_with_usage(&self, inputs: &[VerifierInput<'_>]) -> Vec<(Graded, TokenUsage)> {
        let mut out: Vec<(Graded, TokenUsage)> = inputs
            .iter()
            .map(|_| (Ok(Grading::new()), TokenUsage::default()))
            .collect();
        for (prefix, member) in &self.members {
            let results = member.score_with_usage(inputs);
            for ((slot, usage), (result, spent)) in out.iter_mut().zip(results) {
                *usage += spent;
                match (slot.as_mut(), result) {
                    (Ok(g), Ok(member_grading)) => merge(g, prefix, member_grading),
                    (Ok(_), Err(f)) => {
                        *slot = Err(ScoreFailure {
                            message: format!("ensemble member {prefix}: {}", f.message),
                            ..f
                        })
                    }
                    (Err(_), _) => {}
                }
            }
        }
        out
    }

    fn call_stats(&self) -> CallStats {
        sum_stats(self.members.iter().map(|(_, m)| m.as_ref()))
    }

    fn check_access(&self) -> Result<(), ScoreFailure> {
        for (prefix, member) in &self.members {
            member.check_access().map_err(|f| ScoreFailure {
                message: format!("ensemble member {prefix}: {}", f.message),
                ..f
            })?;
        }
        Ok(())
    }
}

/// The selecting verifier with `also_score` verifiers beside it: their metrics are added as
/// `<prefix>/<metric>`; when one of them fails on a candidate, that is logged and the
/// candidate keeps the selecting verifier's grading.
pub struct AlsoScored {
    main: Box<dyn Verifier>,
    extras: Vec<NamedVerifier>,
}

impl AlsoScored {
    /// `main` with `extras` (named by [`member_prefixes`]).
    pub fn new(main: Box<dyn Verifier>, extras: Vec<NamedVerifier>) -> Self {
        Self { main, extras }
    }
}

impl Verifier for AlsoScored {
    fn name(&self) -> &str {
        self.main.name()
    }

    fn score(&self, inputs: &[VerifierInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
        without_usage(self.score_with_usage(inputs))
    }

    fn score_with_usage(&self, inputs: &[VerifierInput<'_>]) -> Vec<(Graded, TokenUsage)> {
        let mut out = self.main.score_with_usage(inputs);
        for (prefix, extra) in &self.extras {
            for ((slot, usage), (result, spent)) in
                out.iter_mut().zip(extra.score_with_usage(inputs))
            {
                *usage += spent;
                match (slot.as_mut(), result) {
                    (Ok(g), Ok(extra_grading)) => {
                        merge(g, &format!("also/{prefix}"), extra_grading)
                    }
                    (Ok(_), Err(f)) => tracing::warn!(
                        "also_score {prefix} could not grade a candidate: {}",
                        f.message
                    ),
                    (Err(_), _) => {}
                }
            }
        }
        out
    }

    fn call_stats(&self) -> CallStats {
        sum_stats(
            std::iter::once(self.main.as_ref()).chain(self.extras.iter().map(|(_, v)| v.as_ref())),
        )
    }

    fn check_access(&self) -> Result<(), ScoreFailure> {
        self.main.check_access()?;
        for (prefix, extra) in &self.extras {
            if let Err(f) = extra.check_access() {
                tracing::warn!("also_score {prefix}: {}", f.message);
            }
        }
        Ok(())
    }
}

fn without_usage(graded: Vec<(Graded, TokenUsage)>) -> Vec<Graded> {
    graded.into_iter().map(|(g, _)| g).collect()
}

fn sum_stats<'a>(verifiers: impl Iterator<Item = &'a dyn Verifier>) -> CallStats {
    verifiers.fold(CallStats::default(), |acc, v| {
        let s = v.call_stats();
        CallStats {
            requests: acc.requests + s.requests,
            failed_requests: acc.failed_requests + s.failed_requests,
            input_tokens: acc.input_tokens + s.input_tokens,
            output_tokens: acc.output_tokens + s.output_tokens,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verifiers::Score;

    /// Scores each image by a fixed function of its first pixel, or fails on dark ones.
    struct Fixed {
        name: &'static str,
        score: fn(u8) -> Option<f64>,
    }

    impl Verifier for Fixed {
        fn name(&self) -> &str {
            self.name
        }
        fn score(&self, inputs: &[VerifierInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
            inputs
                .iter()
                .map(|i| match (self.score)(i.media.poster().get_pixel(0, 0)[0]) {
                    Some(s) => {
                        let mut g = Grading::new();
                        g.insert(
                            "m".into(),
                            Score {
                                explanation: String::new(),
                                score: s,
                            },
                        );
                        Ok(g)
                    }
                    None => Err(ScoreFailure {
                        message: "too dark".into(),
                        attempts: 1,
                        fatal: false,
                    }),
                })
                .collect()
        }
    }

    fn image(v: u8) -> crate::media::Media {
        crate::media::Media::Image(image::RgbImage::from_pixel(1, 1, image::Rgb([v, v, v])))
    }

    #[test]
    fn members_metrics_are_prefixed_and_a_member_failure_fails_the_candidate() {
        let e = EnsembleVerifier::new(vec![
            (
                "a".into(),
                Box::new(Fixed {
                    name: "a",
                    score: |v| Some(f64::from(v)),
                }),
            ),
            (
                "b".into(),
                Box::new(Fixed {
                    name: "b",
                    score: |v| (v > 10).then(|| -f64::from(v)),
                }),
            ),
        ]);
        let (bright, dark) = (image(200), image(5));
        let out = e.score(&[
            VerifierInput {
                prompt: "p",
                media: &bright,
            },
            VerifierInput {
                prompt: "p",
                media: &dark,
            },
        ]);
        let g = out[0].as_ref().unwrap();
        assert_eq!(g["a/m"].score, 200.0);
        assert_eq!(g["b/m"].score, -200.0);
        let f = out[1].as_ref().unwrap_err();
        assert!(f.message.contains("ensemble member b") && f.message.contains("too dark"));
    }

    #[test]
    fn also_scored_extras_are_recorded_and_their_failures_do_not_fail_the_candidate() {
        let v = AlsoScored::new(
            Box::new(Fixed {
                name: "main",
                score: |v| Some(f64::from(v)),
            }),
            vec![(
                "x".into(),
                Box::new(Fixed {
                    name: "x",
                    score: |v| (v > 10).then_some(1.0),
                }),
            )],
        );
        let (bright, dark) = (image(200), image(5));
        let out = v.score(&[
            VerifierInput {
                prompt: "p",
                media: &bright,
            },
            VerifierInput {
                prompt: "p",
                media: &dark,
            },
        ]);
        assert_eq!(out[0].as_ref().unwrap()["also/x/m"].score, 1.0);
        assert_eq!(out[0].as_ref().unwrap()["m"].score, 200.0);
        let dark_grading = out[1].as_ref().unwrap();
        assert_eq!(dark_grading["m"].score, 5.0);
        assert!(!dark_grading.contains_key("also/x/m"));
    }

    #[test]
    fn repeated_names_are_told_apart_by_position() {
        let a = VerifierArgs::new(super::super::VerifierKind::Qwen, "overall_score");
        let b = VerifierArgs::new(super::super::VerifierKind::ClipScore, "clip_score");
        assert_eq!(
            member_prefixes(&[a.clone(), b.clone(), a.clone()]),
            ["qwen#1", "clip_score", "qwen#3"]
        );
        assert_eq!(
            rank_metrics(&[a, b]),
            ["qwen/overall_score", "clip_score/clip_score"]
        );
    }
}
