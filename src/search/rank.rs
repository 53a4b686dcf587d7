//! The paper's verifier ensemble selects by rank, never by raw score: each member's metric
//! ranks a round's candidates, and the ranks are averaged.

use super::Candidate;
use crate::verifiers::ensemble::ENSEMBLE_METRIC;
use crate::verifiers::Score;

/// Sets every graded candidate's [`ENSEMBLE_METRIC`], the paper's verifier
/// ensemble: under each of `metrics`, the candidate's rank among the candidates graded on it
/// (ascending, ties sharing their average rank), normalised to [0, 1] (1 = best; a lone
/// candidate gets 1), averaged over the metrics. A candidate missing one of them gets none.
/// Raw scores of different verifiers are never mixed, only their ranks.
pub fn apply_ensemble_rank(candidates: &mut [Candidate], metrics: &[String]) {
    if metrics.is_empty() {
        return;
    }
    let mut sums = vec![0.0f64; candidates.len()];
    let mut complete = vec![true; candidates.len()];
    for metric in metrics {
        let scored: Vec<(usize, f64)> = candidates
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.score(metric).filter(|s| s.is_finite()).map(|s| (i, s)))
            .collect();
        for (i, c) in complete.iter_mut().enumerate() {
            *c &= scored.iter().any(|(j, _)| *j == i);
        }
        let n = scored.len();
        for &(i, s) in &scored {
            let below = scored.iter().filter(|(_, t)| *t < s).count() as f64;
            let equal = scored.iter().filter(|(_, t)| *t == s).count() as f64;
            // 1-based average rank of the tie group, ascending.
            let rank = below + (equal + 1.0) / 2.0;
            sums[i] += if n > 1 {
                (rank - 1.0) / (n - 1) as f64
            } else {
                1.0
            };
        }
    }
    for (i, c) in candidates.iter_mut().enumerate() {
        if let (true, Ok(g)) = (complete[i], c.grading.as_mut()) {
            g.insert(
                ENSEMBLE_METRIC.into(),
                Score {
                    explanation: format!(
                        "average over {} of the rank among this round's candidates (0 = worst, 1 = best)",
                        metrics.join(", ")
                    ),
                    score: sums[i] / metrics.len() as f64,
                },
            );
        }
    }
}
