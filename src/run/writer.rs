//! The run's [`SearchObserver`]: writes every round's media and JSON (media as soon as they are
//! decoded), grades each round's best with `also_score_best_only`'s verifiers, drives the
//! progress bars (one log line a round without a terminal), and keeps the counts for the
//! summary.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::escape_controls;
use crate::media::Media;
use crate::output::journal::PromptDone;
use crate::output::media::write_media;
use crate::output::{self, BestSoFar, OutputError, RoundContext};
use crate::search::{NoiseOrigin, ObserverError, RoundResult, SearchObserver, SearchSettings};
use crate::verifiers;

/// Writes every round's images and JSON, drives the progress bars, and keeps the counts for
/// the summary.
pub struct OutputWriter {
    run_dir: PathBuf,
    /// The run folder as the JSON names it ([`RoundContext::shown_dir`]).
    shown_dir: PathBuf,
    metric: String,
    /// The current prompt's file-name part.
    pub prompt_name: String,
    best: Option<BestSoFar>,
    /// The current prompt's compute so far.
    spent: output::Spent,
    /// The run's denoiser evaluations so far (`None` if a pipeline could not tell).
    pub nfe: Option<u64>,
    /// `also_score` verifiers that grade only each round's best (`also_score_best_only`).
    pub best_extras: Vec<verifiers::ensemble::NamedVerifier>,
    /// Per prompt: the best score over its rounds.
    pub best_scores: Vec<(String, Option<f64>)>,
    /// Media of the rounds written.
    pub images: usize,
    /// [`OutputWriter::images`] and [`OutputWriter::failed_rounds`] when the prompt started,
    /// and the prompt's rounds so far: its completion record.
    prompt_start: (usize, usize),
    prompt_rounds: usize,
    prompt_started: Instant,
    /// Media generated (not read back).
    pub generated: usize,
    /// Grades read back from the journal.
    pub reused_grades: usize,
    /// Candidates whose grading failed.
    pub failed_gradings: usize,
    /// Rounds with no candidate graded.
    pub failed_rounds: usize,
    /// Seconds of generation.
    pub generation_s: f64,
    bars: Bars,
}

struct Bars {
    _multi: MultiProgress,
    prompts: ProgressBar,
    rounds: ProgressBar,
    images: ProgressBar,
}

impl OutputWriter {
    /// A writer into `run_dir` (named `shown_dir` in the JSON) for `num_prompts` prompts.
    pub fn new(
        run_dir: PathBuf,
        shown_dir: PathBuf,
        settings: &SearchSettings,
        num_prompts: usize,
    ) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style = |t: &str| {
            ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar())
        };
        let prompts = multi.add(ProgressBar::new(num_prompts as u64));
        prompts.set_style(style(
            "prompts {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        ));
        let rounds = multi.add(ProgressBar::new(
            settings.method.rounds().unwrap_or(0) as u64
        ));
        rounds.set_style(style(
            "rounds  {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}]",
        ));
        let images = multi.add(ProgressBar::new(0));
        images.set_style(style(
            "images  {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {per_sec}",
        ));
        Self {
            run_dir,
            shown_dir,
            metric: settings.metric.clone(),
            prompt_name: String::new(),
            best: None,
            spent: output::Spent::default(),
            nfe: Some(0),
            best_extras: Vec::new(),
            best_scores: Vec::new(),
            images: 0,
            prompt_start: (0, 0),
            prompt_rounds: 0,
            prompt_started: Instant::now(),
            generated: 0,
            reused_grades: 0,
            failed_gradings: 0,
            failed_rounds: 0,
            generation_s: 0.0,
            bars: Bars {
                _multi: multi,
                prompts,
                rounds,
                images,
            },
        }
    }

    /// Starts `prompt`'s search.
    pub fn start_prompt(&mut self, prompt: &str) {
        self.prompt_name = output::prompt_to_filename(prompt);
        self.prompt_start = (self.images, self.failed_rounds);
        self.prompt_rounds = 0;
        self.prompt_started = Instant::now();
        self.best = None;
        self.spent = output::Spent::default();
        let short = escape_controls(&prompt.chars().take(40).collect::<String>());
        self.bars.prompts.set_message(short);
        self.bars.rounds.reset();
    }

    /// Records the prompt as done (`journal/done/<prompt name>.json`, for `tt-scale status`
    /// and merges) and reports it.
    pub fn finish_prompt(&mut self, prompt: &str) -> Result<(), OutputError> {
        let done = PromptDone {
            prompt: prompt.to_string(),
            rounds: self.prompt_rounds,
            images: self.images - self.prompt_start.0,
            nfe: self.spent.nfe,
            verifier_calls: self.spent.verifier_calls,
            best_score: self.best.as_ref().map(|b| b.score),
            failed_rounds: self.failed_rounds - self.prompt_start.1,
        };
        done.write(&self.run_dir, &self.prompt_name)?;
        self.best_scores
            .push((prompt.to_string(), self.best.as_ref().map(|b| b.score)));
        self.bars.prompts.inc(1);
        match &self.best {
            Some(b) => tracing::info!(
                "prompt done: best {} = {} (round {}, seed {})",
                self.metric,
                b.score,
                b.round,
                b.label
            ),
            None => tracing::warn!("prompt done: no candidate could be graded"),
        }
        Ok(())
    }

    /// Clears the progress bars.
    pub fn finish(&self) {
        self.bars.images.finish_and_clear();
        self.bars.rounds.finish_and_clear();
        self.bars.prompts.finish_and_clear();
    }
}

impl SearchObserver for OutputWriter {
    fn round_started(&mut self, round: usize, num_images: usize) {
        // Paths and particles: the stages follow the schedule, known as they come.
        if self
            .bars
            .rounds
            .length()
            .is_some_and(|len| (round as u64) > len)
        {
            self.bars.rounds.set_length(round as u64);
        }
        self.bars.images.reset();
        self.bars.images.set_length(num_images as u64);
        tracing::debug!("round {round}: generating {num_images} image(s)");
    }

    fn images_generated(&mut self, n: usize) {
        self.bars.images.inc(n as u64);
    }

    fn batch_generated(
        &mut self,
        round: usize,
        origins: &[NoiseOrigin],
        media: &[Media],
    ) -> Result<(), ObserverError> {
        // Saved before grading, so a stopped or crashed run keeps every decoded image.
        self.generated += media.len();
        for (origin, m) in origins.iter().zip(media) {
            let stem = output::candidate_stem(&self.prompt_name, round, &origin.label());
            write_media(&self.run_dir.join(format!("{stem}.png")), m)?;
        }
        Ok(())
    }

    fn round_finished(&mut self, prompt: &str, r: &RoundResult) -> Result<(), ObserverError> {
        // `also_score_best_only`: the extra verifiers grade the round's best only.
        let scored;
        let r = match r.best.filter(|_| !self.best_extras.is_empty()) {
            Some(i) => {
                let mut copy = r.clone();
                let best = &mut copy.candidates[i];
                for (prefix, extra) in &self.best_extras {
                    let input = verifiers::VerifierInput {
                        prompt,
                        media: &best.media,
                    };
                    match (best.grading.as_mut(), extra.score(&[input]).pop()) {
                        (Ok(g), Some(Ok(extra_grading))) => {
                            verifiers::ensemble::merge(g, &format!("also/{prefix}"), extra_grading)
                        }
                        (_, Some(Err(f))) => tracing::warn!(
                            "also_score {prefix} could not grade round {}'s best: {}",
                            r.round,
                            f.message
                        ),
                        _ => {}
                    }
                }
                scored = copy;
                &scored
            }
            None => r,
        };
        let written = output::write_round(
            &self.run_dir,
            &RoundContext {
                prompt,
                shown_dir: &self.shown_dir,
                prompt_name: &self.prompt_name,
                metric: &self.metric,
                elapsed_s: self.prompt_started.elapsed().as_secs_f64(),
            },
            r,
            &mut self.best,
            &mut self.spent,
        )?;
        self.nfe = self.nfe.zip(r.nfe).map(|(a, b)| a + b);
        self.images += written.new_images;
        self.failed_gradings += written.failed_gradings;
        self.generation_s += r.generation_s;
        if r.best.is_none() {
            self.failed_rounds += 1;
            tracing::warn!(
                "round {}: none of the {} candidates could be graded; see the round's JSON for the errors",
                r.round,
                r.candidates.len()
            );
        }
        self.bars.rounds.inc(1);
        self.prompt_rounds += 1;
        let line = match r.best {
            Some(i) => {
                let c = &r.candidates[i];
                format!(
                    "round {}: best {} = {} (seed {})",
                    r.round,
                    self.metric,
                    c.score(&self.metric).unwrap_or(f64::NAN),
                    c.origin.label()
                )
            }
            None => format!("round {}: no candidate could be graded", r.round),
        };
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            self.bars.prompts.println(line);
        } else {
            // No progress bars without a terminal (a log file, Slurm): one line per round.
            let _ = writeln!(
                std::io::stderr(),
                "{} {line}",
                escape_controls(&self.prompt_name)
            );
        }
        Ok(())
    }
}
