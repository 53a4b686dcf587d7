//! What a finished run reports: [`RunSummary`], printed on stderr and, with `--json`, as JSON
//! on stdout (which is also how worker processes report to the parent that adds them up).

use std::path::PathBuf;

use serde_json::{json, Value};

use super::escape_controls;
use crate::verifiers::CallStats;

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// The run folder.
    pub run_dir: PathBuf,
    /// The master seed used.
    pub master_seed: u64,
    /// Per prompt: the prompt and the best score over all rounds (if any candidate was graded).
    pub best_scores: Vec<(String, Option<f64>)>,
    /// Images of the rounds written (generated, or read back when resuming).
    pub images: usize,
    /// Denoiser evaluations of the images of the rounds written (the NFEs of the paper's
    /// budgets), when the pipeline can tell.
    pub nfe: Option<u64>,
    /// Images read back from the folder instead of generated (`--resume`).
    pub reused_images: usize,
    /// Grades read back from the journal instead of asked (`--resume`).
    pub reused_grades: usize,
    /// Candidates whose grading failed.
    pub failed_gradings: usize,
    /// Rounds in which every candidate failed grading.
    pub failed_rounds: usize,
    /// Verifier requests and failed requests.
    pub verifier_stats: CallStats,
    /// Seconds spent generating images.
    pub generation_s: f64,
    /// Wall-clock seconds of the whole run.
    pub wall_s: f64,
}

impl RunSummary {
    /// The summary for scripts (`tt-scale run --json` prints it on stdout).
    pub fn to_json(&self) -> Value {
        json!({
            "run_dir": self.run_dir.display().to_string(),
            "master_seed": self.master_seed,
            "prompts": self.best_scores.iter().map(|(prompt, best)| json!({
                "prompt": prompt,
                "best_score": best,
            })).collect::<Vec<_>>(),
            "images": self.images,
            "nfe": self.nfe,
            "reused_images": self.reused_images,
            "reused_grades": self.reused_grades,
            "failed_gradings": self.failed_gradings,
            "failed_rounds": self.failed_rounds,
            "verifier_requests": self.verifier_stats.requests,
            "verifier_failed_requests": self.verifier_stats.failed_requests,
            "verifier_input_tokens": self.verifier_stats.input_tokens,
            "verifier_output_tokens": self.verifier_stats.output_tokens,
            "generation_s": self.generation_s,
            "wall_s": self.wall_s,
        })
    }
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "Summary")?;
        for (prompt, best) in &self.best_scores {
            let short: String = escape_controls(&prompt.chars().take(70).collect::<String>());
            let ell = if prompt.chars().count() > 70 {
                "..."
            } else {
                ""
            };
            match best {
                Some(s) => writeln!(f, "  best {s:>5.2}  {short}{ell}")?,
                None => writeln!(f, "  best   n/a  {short}{ell} (every grading failed)")?,
            }
        }
        let ips = if self.generation_s > 0.0 {
            self.images as f64 / self.generation_s
        } else {
            0.0
        };
        writeln!(
            f,
            "  images: {} ({ips:.3} images/s of generation), wall time {:.1} s",
            self.images, self.wall_s
        )?;
        if let Some(nfe) = self.nfe {
            writeln!(f, "  denoiser evaluations (NFEs): {nfe}")?;
        }
        if self.reused_images > 0 || self.reused_grades > 0 {
            writeln!(
                f,
                "  resumed: {} image(s) and {} grade(s) reused from the folder",
                self.reused_images, self.reused_grades
            )?;
        }
        writeln!(
            f,
            "  verifier: {} requests, {} failed requests, {} candidates without a grade, {} rounds with none graded",
            self.verifier_stats.requests,
            self.verifier_stats.failed_requests,
            self.failed_gradings,
            self.failed_rounds
        )?;
        let s = &self.verifier_stats;
        if s.input_tokens + s.output_tokens > 0 {
            writeln!(
                f,
                "  verifier tokens: {} input, {} output (as the API reported them)",
                s.input_tokens, s.output_tokens
            )?;
        }
        writeln!(f, "  master seed: {}", self.master_seed)?;
        write!(f, "  output: {}", self.run_dir.display())
    }
}

impl RunSummary {
    /// The sum of the summaries `workers` printed with `--json` (a run on several devices):
    /// every count added, the prompts in the workers' order, `wall_s` the parent's own.
    pub fn sum_of_workers(
        run_dir: PathBuf,
        master_seed: u64,
        workers: &[Value],
        wall_s: f64,
    ) -> Self {
        let sum = |key: &str| -> u64 { workers.iter().filter_map(|s| s[key].as_u64()).sum() };
        let sum_f = |key: &str| -> f64 { workers.iter().filter_map(|s| s[key].as_f64()).sum() };
        let nfe = workers
            .iter()
            .map(|s| s["nfe"].as_u64())
            .sum::<Option<u64>>();
        RunSummary {
            run_dir,
            master_seed,
            best_scores: workers
                .iter()
                .filter_map(|s| s["prompts"].as_array())
                .flatten()
                .map(|p| {
                    (
                        p["prompt"].as_str().unwrap_or_default().to_string(),
                        p["best_score"].as_f64(),
                    )
                })
                .collect(),
            images: sum("images") as usize,
            nfe,
            reused_images: sum("reused_images") as usize,
            reused_grades: sum("reused_grades") as usize,
            failed_gradings: sum("failed_gradings") as usize,
            failed_rounds: sum("failed_rounds") as usize,
            verifier_stats: CallStats {
                requests: sum("verifier_requests"),
                failed_requests: sum("verifier_failed_requests"),
                input_tokens: sum("verifier_input_tokens"),
                output_tokens: sum("verifier_output_tokens"),
            },
            generation_s: sum_f("generation_s"),
            wall_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_summaries_add_up_and_their_json_round_trips() {
        let one = RunSummary {
            run_dir: PathBuf::from("out/x"),
            master_seed: 7,
            best_scores: vec![("a".into(), Some(6.5)), ("b".into(), None)],
            images: 6,
            nfe: Some(120),
            reused_images: 1,
            reused_grades: 2,
            failed_gradings: 1,
            failed_rounds: 0,
            verifier_stats: CallStats {
                requests: 7,
                failed_requests: 1,
                input_tokens: 10,
                output_tokens: 3,
            },
            generation_s: 1.5,
            wall_s: 9.0,
        };
        let both = [one.to_json(), one.to_json()];
        let sum = RunSummary::sum_of_workers(PathBuf::from("out/x"), 7, &both, 2.0);
        assert_eq!(sum.images, 12);
        assert_eq!(sum.nfe, Some(240));
        assert_eq!(sum.best_scores.len(), 4);
        assert_eq!(sum.best_scores[1], ("b".to_string(), None));
        assert_eq!(sum.verifier_stats.input_tokens, 20);
        assert_eq!(sum.generation_s, 3.0);
        assert_eq!(sum.wall_s, 2.0);
        // A worker that could not count NFEs makes the sum unknown.
        let mut unknown = one.to_json();
        unknown["nfe"] = Value::Null;
        let sum = RunSummary::sum_of_workers(PathBuf::new(), 7, &[one.to_json(), unknown], 1.0);
        assert_eq!(sum.nfe, None);
    }
}
