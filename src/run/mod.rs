//! `tt-scale run`: the options resolved into a [`RunPlan`] -> prompts -> search (pipeline +
//! verifier) -> the run folder, with progress bars and an end-of-run summary.
//!
//! Everything that can be checked is checked before a model loads or an output folder is made:
//! the config, the verifier's key, the prompts, the device. The parts: [`plan`] (options
//! resolved once), `folder` (a new run's folder), `resume` (continuing one), [`workers`] (one
//! process a device), `writer` (the search's observer: files, progress, counts), `summary` and
//! `error`.

mod error;
mod folder;
pub mod plan;
mod resume;
mod summary;
pub mod workers;
mod writer;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use error::{resume_command, RunError};
pub use plan::RunPlan;
pub use summary::RunSummary;

use crate::device::DeviceSpec;
use crate::output::journal::Journal;
use crate::pipelines::Pipeline;
use crate::prompts::NumPrompts;
use crate::search::{self, SearchError, SearchSettings};
use crate::sweep::ShardArg;
use crate::verifiers::{self, Verifier};
use writer::OutputWriter;

/// What `tt-scale run` was asked to do (the command line, parsed).
#[derive(Clone, Debug, PartialEq)]
pub struct RunOptions {
    /// The config file.
    pub config_path: PathBuf,
    /// `--prompt`.
    pub prompt: Option<String>,
    /// `--prompts-file`.
    pub prompts_file: Option<PathBuf>,
    /// `--num-prompts`: `None` when not given; `Some(None)` for the original's `None`.
    pub num_prompts: Option<Option<NumPrompts>>,
    /// `--batch-size`.
    pub batch_size: usize,
    /// `--seed`.
    pub seed: Option<u64>,
    /// `--output-dir`.
    pub output_dir: PathBuf,
    /// `--low-vram`.
    pub low_vram: bool,
    /// `--device`; `None` for auto (or, with `resume`, the device the run was started with).
    pub device: Option<DeviceSpec>,
    /// `--resume`: continue the run in this folder instead of starting one; the config, seed,
    /// prompts and batch size are the folder's, the flags above that set them are ignored.
    pub resume: Option<PathBuf>,
    /// `--shard`: search only this shard's prompts (with `--resume`: continue that shard).
    pub shard: Option<ShardArg>,
    /// `--device` with several devices: one worker process a device, each a shard of the
    /// prompts (of `shard`'s, when given), into one named run folder; empty otherwise.
    pub workers: Vec<DeviceSpec>,
    /// `--run-name`: the run folder's name instead of the start time; shards of one sweep
    /// share it, and the folder may already exist.
    pub run_name: Option<String>,
}

/// Runs a whole search: validates, loads, searches every prompt, writes the outputs. With
/// `opts.resume`, continues the run in that folder instead.
pub fn run(opts: &RunOptions) -> Result<RunSummary, RunError> {
    if opts.resume.is_some() && !opts.workers.is_empty() {
        return Err(RunError::Usage(
            "--resume takes one device; to continue a run made with several, run its command (with --run-name and --seed) again: each worker continues its share".into(),
        ));
    }
    if let Some(dir) = &opts.resume {
        return resume::resume(opts, dir);
    }
    let started = Instant::now();
    let plan = RunPlan::new(opts)?;
    if !opts.workers.is_empty() {
        return workers::run_workers(&plan, started);
    }
    if plan.shard.is_some() && opts.seed.is_none() {
        return Err(RunError::Usage(
            "--shard needs --seed: every shard of a sweep must derive its candidates from the same master seed".into(),
        ));
    }
    if let Some(dir) = folder::started_before(&plan) {
        let resumed = RunOptions {
            resume: Some(dir.clone()),
            shard: plan.shard.map(ShardArg::Fixed),
            ..opts.clone()
        };
        return resume::resume(&resumed, &dir);
    }
    let source = plan::prompt_source(opts)?;
    let device = plan.open_device()?;
    let verifier = plan.build_verifier()?;
    let prompts = plan::load_prompts(source)?;
    match plan.shard {
        Some(s) => tracing::info!(
            "{} prompt(s), shard {} of {} searches {}",
            prompts.len(),
            s.index,
            s.count,
            s.select(&prompts).len()
        ),
        None => tracing::info!("{} prompt(s)", prompts.len()),
    }
    if device.is_cpu() {
        plan.warn_if_slow_on_cpu(prompts.len());
    }
    let mut pipeline = plan.load_pipeline(&device)?;
    let run_dir = folder::make(&plan, &prompts, device.is_cuda())?;
    // A closed stderr must not stop the run (`let _`: the text is dropped, never a panic).
    let _ = writeln!(
        std::io::stderr(),
        "tt-scale: master seed {}, writing to {}",
        plan.master_seed,
        run_dir.display()
    );
    let mine = plan
        .shard
        .map_or_else(|| prompts.clone(), |s| s.select(&prompts));
    search_prompts(
        &plan,
        (&run_dir, &run_dir),
        &mine,
        pipeline.as_mut(),
        verifier.as_ref(),
        started,
    )
}

/// Searches `prompts` (this process's) into the run folder (`run_dir`, named `shown_dir` in the
/// JSON; new or resumed): what the folder already holds (saved media, journaled grades) is
/// reused, the rest is generated and graded.
fn search_prompts(
    plan: &RunPlan,
    (run_dir, shown_dir): (&Path, &Path),
    prompts: &[String],
    pipeline: &mut dyn Pipeline,
    verifier: &dyn Verifier,
    started: Instant,
) -> Result<RunSummary, RunError> {
    let (run_dir, shard, master_seed) = (run_dir.to_path_buf(), plan.shard, plan.master_seed);
    let signals = Signals::register()?;
    let settings = plan.search_settings(signals.stop.clone());
    let mut writer = OutputWriter::new(
        run_dir.clone(),
        shown_dir.to_path_buf(),
        &settings,
        prompts.len(),
    );
    if plan.config.verifier_args.also_score_best_only {
        writer.best_extras =
            verifiers::build_also_score(&plan.verifier_args(), plan.opts.low_vram)?;
    }
    for (i, prompt) in prompts.iter().enumerate() {
        let settings = SearchSettings {
            probe_first_batch: i == 0,
            ..settings.clone()
        };
        writer.start_prompt(prompt);
        let journal = Journal::open(&run_dir, &writer.prompt_name)?;
        let searched = if settings.stop.is_set() {
            Err(SearchError::Interrupted)
        } else {
            search::search_prompt(prompt, pipeline, verifier, &settings, &mut writer, &journal)
        };
        writer.reused_grades += journal.reused_grades();
        match searched {
            Err(SearchError::FatalVerifier(message)) => {
                writer.finish();
                return Err(RunError::FatalVerifier {
                    message,
                    run_dir,
                    shard,
                });
            }
            Err(SearchError::Interrupted) => {
                writer.finish();
                return Err(RunError::Interrupted {
                    signal: signals.received(),
                    run_dir,
                    images: writer.images,
                    shard,
                });
            }
            other => other?,
        }
        writer.finish_prompt(prompt)?;
    }
    writer.finish();
    Ok(RunSummary {
        run_dir,
        master_seed,
        best_scores: writer.best_scores,
        images: writer.images,
        nfe: writer.nfe,
        reused_images: writer.images.saturating_sub(writer.generated),
        reused_grades: writer.reused_grades,
        failed_gradings: writer.failed_gradings,
        failed_rounds: writer.failed_rounds,
        verifier_stats: verifier.call_stats(),
        generation_s: writer.generation_s,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// SIGINT and SIGTERM during the search: the first one asks the search to stop before its next
/// batch (the rounds complete so far are written, the run exits 130 or 143); a second one ends
/// the process at once with that code (every file is written atomically, so none is partial).
struct Signals {
    stop: search::StopFlag,
    term: Arc<AtomicBool>,
}

impl Signals {
    fn register() -> Result<Self, RunError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let stop = search::StopFlag::default();
        let term = Arc::new(AtomicBool::new(false));
        let fail = RunError::Signals;
        for (signal, code) in [(SIGINT, 130), (SIGTERM, 143)] {
            // Registered first, so it sees the flag as it was before this signal.
            signal_hook::flag::register_conditional_shutdown(signal, code, Arc::clone(&stop.0))
                .map_err(fail)?;
            signal_hook::flag::register(signal, Arc::clone(&stop.0)).map_err(fail)?;
        }
        signal_hook::flag::register(SIGTERM, Arc::clone(&term)).map_err(fail)?;
        Ok(Self { stop, term })
    }

    /// The signal received: SIGTERM if one came, else SIGINT.
    fn received(&self) -> &'static str {
        if self.term.load(Ordering::SeqCst) {
            "SIGTERM"
        } else {
            "SIGINT"
        }
    }
}

/// `text` for a terminal: control characters (escape sequences, carriage returns, newlines) are
/// shown escaped (`\u{1b}`, `\r`), so a prompt cannot rewrite the screen or split a log line.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        assert_eq!(escape_controls("a\u{1b}[2Jb\r\nc"), "a\\u{1b}[2Jb\\r\\nc");
        assert_eq!(escape_controls("plain, ünïcode"), "plain, ünïcode");
    }
}
