//! `tt-scale run`: config -> prompts -> search (pipeline + verifier) -> output, with progress
//! bars and an end-of-run summary.
//!
//! Everything that can be checked is checked before a model loads or an output folder is made:
//! the config, the verifier's key, the prompts, the device.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::config::{Config, ConfigError, SearchMethod};
use crate::device::DeviceSpec;
use crate::output::journal::{Journal, JOURNAL_DIR};
use crate::output::{self, BestSoFar, OutputError, RoundContext};
use crate::pipelines::{ImagePipeline, PipelineError};
use crate::prompts::{self, NumPrompts, PromptSource, PromptsError};
use crate::search::{
    self, ObserverError, RoundResult, SearchError, SearchObserver, SearchSettings,
};
use crate::sweep::{self, PromptDone, Shard, ShardArg, ShardError};
use crate::verifiers::{self, Verifier, VerifierError};

/// What `tt-scale run` was asked to do (the command line, parsed).
#[derive(Clone, Debug)]
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

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The flags contradict each other.
    #[error("{0}")]
    Usage(String),
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The prompts could not be loaded.
    #[error(transparent)]
    Prompts(#[from] PromptsError),
    /// The verifier could not be set up.
    #[error(transparent)]
    Verifier(#[from] VerifierError),
    /// The model could not be loaded or run.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The search failed.
    #[error(transparent)]
    Search(#[from] SearchError),
    /// Output could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The device is not available.
    #[error("{0}")]
    Device(String),
    /// The folder given to `--resume` cannot be resumed (not a run folder, changed since, or
    /// made by another version).
    #[error("cannot resume {}: {problem}", dir.display())]
    Resume {
        /// The folder.
        dir: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// Worker processes (`--device` with several devices) failed.
    #[error("{} of the {workers} workers failed ({}); their logs are above. The files of every finished round are in {}; run the same command again to continue", failed.len(), failed.iter().map(|(d, c)| format!("{d}: exit {}", c.map_or_else(|| "by signal".to_string(), |c| c.to_string()))).collect::<Vec<_>>().join(", "), run_dir.display())]
    Workers {
        /// How many workers ran.
        workers: usize,
        /// The failed workers' devices and exit codes.
        failed: Vec<(DeviceSpec, Option<i32>)>,
        /// The run folder.
        run_dir: PathBuf,
    },
    /// `--shard` could not be worked out.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// The SIGINT/SIGTERM handlers could not be installed.
    #[error("cannot install the SIGINT/SIGTERM handlers: {0}")]
    Signals(std::io::Error),
    /// SIGINT (Ctrl-C) or SIGTERM (Slurm preemption, `kill`) stopped the run before its next
    /// batch; every file written is whole.
    #[error(
        "interrupted by {signal}: stopped before the next batch; the {images} image(s) of the rounds completed so far are in {}; continue with: {}",
        run_dir.display(), resume_command(run_dir, *shard)
    )]
    Interrupted {
        /// `SIGINT` or `SIGTERM`.
        signal: &'static str,
        /// The run folder.
        run_dir: PathBuf,
        /// Images of the rounds written.
        images: usize,
        /// The shard this process ran, if any.
        shard: Option<Shard>,
    },
    /// The verifier refused access before any image was made (checked with one cheap request).
    #[error("the verifier cannot grade any image, so nothing was generated: {0}")]
    VerifierAccess(String),
    /// The verifier cannot grade any image (a rejected key, an unknown model, a refused
    /// request, an exhausted quota); the run stopped with its files consistent.
    #[error(
        "the verifier cannot grade any image, so the run stopped (the rounds completed so far are in {}): {message}\nOnce that is fixed, continue with: {}",
        run_dir.display(), resume_command(run_dir, *shard)
    )]
    FatalVerifier {
        /// The API's message and what to do.
        message: String,
        /// The run folder.
        run_dir: PathBuf,
        /// The shard this process ran, if any.
        shard: Option<Shard>,
    },
}

impl RunError {
    /// The process exit code (the README's table): 2 for a mistake in the flags, the config or
    /// the files they name (a missing prompts file or model folder, a dtype the device cannot
    /// run); 3 when the verifier cannot grade any image; 1 for anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Usage(_)
            | RunError::Config(_)
            | RunError::Device(_)
            | RunError::Shard(_)
            | RunError::Resume { .. } => 2,
            RunError::Prompts(
                PromptsError::EmptyPrompt
                | PromptsError::ReadFile { .. }
                | PromptsError::NotUtf8 { .. }
                | PromptsError::NoPrompts { .. },
            ) => 2,
            RunError::Verifier(
                VerifierError::Unknown { .. }
                | VerifierError::PromptFile { .. }
                | VerifierError::EmptyPrompt { .. }
                | VerifierError::InvalidArg { .. }
                | VerifierError::BaseUrl { .. },
            ) => 2,
            RunError::Pipeline(
                PipelineError::InvalidArgument(_) | PipelineError::Unsupported(_),
            ) => 2,
            RunError::FatalVerifier { .. }
            | RunError::VerifierAccess(_)
            | RunError::Search(SearchError::FatalVerifier(_)) => 3,
            RunError::Workers { failed, .. } => failed
                .iter()
                .find_map(|(_, c)| c.filter(|&c| c != 0))
                .unwrap_or(1),
            RunError::Interrupted { signal, .. } => {
                if *signal == "SIGTERM" {
                    143
                } else {
                    130
                }
            }
            _ => 1,
        }
    }
}

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
    pub verifier_stats: verifiers::CallStats,
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

/// Runs a whole search: validates, loads, searches every prompt, writes the outputs. With
/// `opts.resume`, continues the run in that folder instead.
pub fn run(opts: &RunOptions) -> Result<RunSummary, RunError> {
    if opts.resume.is_some() && !opts.workers.is_empty() {
        return Err(RunError::Usage(
            "--resume takes one device; to continue a run made with several, run its command (with --run-name and --seed) again: each worker continues its share".into(),
        ));
    }
    if let Some(dir) = &opts.resume {
        return resume(opts, dir);
    }
    let started = Instant::now();
    let config = Config::load(&opts.config_path)?;
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    if let Some(name) = &opts.run_name {
        sweep::check_run_name(name).map_err(RunError::Usage)?;
    }
    let shard = opts.shard.map(ShardArg::resolve).transpose()?;
    if !opts.workers.is_empty() {
        return run_workers(opts, &config, shard, started);
    }
    if shard.is_some() && opts.seed.is_none() {
        return Err(RunError::Usage(
            "--shard needs --seed: every shard of a sweep must derive its candidates from the same master seed".into(),
        ));
    }
    // The same command again (a requeued Slurm task, a restarted pod) finds its own start in
    // the named folder, with this very config.json: it continues there.
    if let (Some(name), Some(seed)) = (&opts.run_name, opts.seed) {
        let dir = output::named_run_path(
            &opts.output_dir,
            &config.model,
            &config.verifier_args.name,
            &config.verifier_args.choice_of_metric,
            name,
        );
        let started_here = dir
            .join(JOURNAL_DIR)
            .join(sweep::record_file_name(shard))
            .is_file();
        let config_json = output::to_python_json(&run_record(&config, opts, seed));
        let same =
            crate::files::read_capped(&dir.join("config.json"), crate::config::MAX_CONFIG_BYTES)
                .is_ok_and(|bytes| bytes == config_json.as_bytes());
        if started_here && same {
            let _ = writeln!(
                std::io::stderr(),
                "tt-scale: {} already started in {}: continuing it",
                shard.map_or_else(|| "this run".to_string(), |s| format!("shard {}", s.spec())),
                dir.display()
            );
            let resumed = RunOptions {
                resume: Some(dir.clone()),
                shard: shard.map(ShardArg::Fixed),
                ..opts.clone()
            };
            return resume(&resumed, &dir);
        }
    }
    let source = prompt_source(opts)?;
    let device = select_device(opts.device)?;
    let verifier = build_verifier(&config, opts)?;
    let prompts = unique_prompts(prompts::load_prompts(&source.0, source.1)?);
    match shard {
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
        warn_if_slow_on_cpu(&config, prompts.len());
    }
    let mut pipeline = crate::pipelines::load(&config, &device, opts.low_vram)?;
    run_with(
        opts,
        &config,
        &prompts,
        shard,
        pipeline.as_mut(),
        verifier.as_ref(),
        device.is_cuda(),
        started,
    )
}

/// `--device A,B,...`: one worker process a device (this binary, `tt-scale run` with `--device`
/// one of them and `--shard` its share of the prompts, [`Shard::within`]), all writing into one
/// named run folder with one master seed, so the folder is the one a single device makes. The
/// workers' logs are forwarded line by line, prefixed with their device; their summaries (read
/// from their `--json` output) are added up.
fn run_workers(
    opts: &RunOptions,
    config: &Config,
    outer: Option<Shard>,
    started: Instant,
) -> Result<RunSummary, RunError> {
    use std::io::BufRead;
    let seed = opts.seed.unwrap_or_else(search::seeds::draw_master_seed);
    let run_name = match &opts.run_name {
        Some(n) => {
            sweep::check_run_name(n).map_err(RunError::Usage)?;
            n.clone()
        }
        None => chrono::Local::now().format("%Y%m%d_%H%M%S").to_string(),
    };
    let exe = std::env::current_exe().map_err(|e| {
        RunError::Device(format!(
            "cannot find this program to start its workers: {e}"
        ))
    })?;
    let run_dir = output::named_run_path(
        &opts.output_dir,
        &config.model,
        &config.verifier_args.name,
        &config.verifier_args.choice_of_metric,
        &run_name,
    );
    let n = opts.workers.len();
    let _ = writeln!(
        std::io::stderr(),
        "tt-scale: {n} workers ({}), master seed {seed}, writing to {}",
        opts.workers
            .iter()
            .map(DeviceSpec::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        run_dir.display()
    );
    let mut children = Vec::with_capacity(n);
    for (w, device) in opts.workers.iter().enumerate() {
        let shard = Shard::within(outer, w, n);
        let mut args: Vec<String> = vec![
            "run".into(),
            "--pipeline-config".into(),
            opts.config_path.display().to_string(),
        ];
        if let Some(p) = &opts.prompt {
            args.extend(["--prompt".into(), p.clone()]);
        }
        if let Some(f) = &opts.prompts_file {
            args.extend(["--prompts-file".into(), f.display().to_string()]);
        }
        if let Some(num) = opts.num_prompts {
            let v = match num {
                None => "none".to_string(),
                Some(NumPrompts::All) => "all".to_string(),
                Some(NumPrompts::First(k)) => k.to_string(),
            };
            args.extend(["--num-prompts".into(), v]);
        }
        args.extend([
            "--batch-size".into(),
            opts.batch_size.to_string(),
            "--seed".into(),
            seed.to_string(),
            "--output-dir".into(),
            opts.output_dir.display().to_string(),
            "--run-name".into(),
            run_name.clone(),
            "--device".into(),
            device.to_string(),
            "--shard".into(),
            shard.spec(),
            "--json".into(),
        ]);
        if opts.low_vram {
            args.push("--low-vram".into());
        }
        let mut child = std::process::Command::new(&exe)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| RunError::Device(format!("cannot start the worker for {device}: {e}")))?;
        let prefix = format!("[{device}] ");
        let forward = child.stderr.take().map(|err| {
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    let _ = writeln!(std::io::stderr(), "{prefix}{line}");
                }
            })
        });
        children.push((*device, child, forward));
    }
    let mut failed = Vec::new();
    let mut summaries = Vec::new();
    for (device, child, forward) in children {
        let out = child.wait_with_output();
        if let Some(t) = forward {
            let _ = t.join();
        }
        match out {
            Ok(o) if o.status.success() => {
                let text = String::from_utf8_lossy(&o.stdout);
                if let Some(v) = text
                    .lines()
                    .rev()
                    .find_map(|l| serde_json::from_str::<Value>(l).ok())
                {
                    summaries.push(v);
                }
            }
            Ok(o) => failed.push((device, o.status.code())),
            Err(_) => failed.push((device, None)),
        }
    }
    if !failed.is_empty() {
        return Err(RunError::Workers {
            workers: n,
            failed,
            run_dir,
        });
    }
    let sum = |key: &str| -> u64 { summaries.iter().filter_map(|s| s[key].as_u64()).sum() };
    let sum_f = |key: &str| -> f64 { summaries.iter().filter_map(|s| s[key].as_f64()).sum() };
    let nfe = summaries
        .iter()
        .map(|s| s["nfe"].as_u64())
        .sum::<Option<u64>>();
    Ok(RunSummary {
        run_dir,
        master_seed: seed,
        best_scores: summaries
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
        verifier_stats: verifiers::CallStats {
            requests: sum("verifier_requests"),
            failed_requests: sum("verifier_failed_requests"),
            input_tokens: sum("verifier_input_tokens"),
            output_tokens: sum("verifier_output_tokens"),
        },
        generation_s: sum_f("generation_s"),
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// The verifier of `config`; a local one runs beside the diffusion model unless told otherwise.
/// Before a large model loads onto the CPU: an estimate of the time per image and for the run,
/// when an image takes more than a minute, and what to do instead.
fn warn_if_slow_on_cpu(config: &Config, prompts: usize) {
    let Ok(gflops) = crate::ops::cpu_matmul_gflops() else {
        return;
    };
    let Some(e) = crate::pipelines::estimate::cpu_estimate(config, gflops) else {
        return;
    };
    if e.seconds_per_image < 60.0 {
        return;
    }
    let rounds = config.search_args.rounds;
    let per_prompt = match config.search_args.method {
        SearchMethod::Random => (1usize << (rounds + 1)).saturating_sub(2),
        SearchMethod::ZeroOrder { num_neighbors, .. } => 1 + rounds * num_neighbors,
        // Their stages add up to at least this many whole denoising runs.
        SearchMethod::Paths(p) => p.num_paths * p.paths_width,
        SearchMethod::Particles(p) => p.num_particles,
    };
    let images = per_prompt.saturating_mul(prompts);
    tracing::warn!(
        "{} at {}x{} on the CPU: at least {} per image ({} steps{}, at the {gflops:.0} GFLOP/s \
         measured here), about {} for the {images} image(s) of this run; a CUDA build with \
         --device cuda is the way to run it, or try the CPU-sized sd1.5_gemini config",
        config.model,
        e.size.1,
        e.size.0,
        human_duration(e.seconds_per_image),
        e.steps,
        if e.evals_per_step == 2 {
            " with classifier-free guidance"
        } else {
            ""
        },
        human_duration(e.seconds_per_image * images as f64),
    );
}

/// `seconds` in words: `45 s`, `12 min`, `3.4 h`, `2.1 days`.
fn human_duration(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{seconds:.0} s")
    } else if seconds < 90.0 * 60.0 {
        format!("{:.0} min", seconds / 60.0)
    } else if seconds < 48.0 * 3600.0 {
        format!("{:.1} h", seconds / 3600.0)
    } else {
        format!("{:.1} days", seconds / 86400.0)
    }
}

/// The config's `verifier_args` for this run: a local verifier runs beside the diffusion model
/// unless told otherwise.
fn run_verifier_args(config: &Config, opts: &RunOptions) -> crate::config::VerifierArgs {
    let mut verifier_args = config.verifier_args.clone();
    if verifier_args.device.is_none() {
        verifier_args.device = opts.device.map(|d| d.to_string());
    }
    verifier_args
}

/// An API verifier's access (key, model) is checked here, before any model loads.
fn build_verifier(config: &Config, opts: &RunOptions) -> Result<Box<dyn Verifier>, RunError> {
    let verifier = verifiers::build_for_run(&run_verifier_args(config, opts), opts.low_vram)?;
    match verifier.check_access() {
        Err(failure) if failure.fatal => Err(RunError::VerifierAccess(failure.message)),
        _ => Ok(verifier),
    }
}

/// The search and output part of [`run`], for an already loaded pipeline and verifier: makes
/// the run folder (its `config.json` and resume record) and searches every prompt of `prompts`
/// (the run's whole list) that `shard` owns. `on_cuda` says which kind of device the images are
/// made on (a resumed run must use the same kind).
#[allow(clippy::too_many_arguments)]
pub fn run_with(
    opts: &RunOptions,
    config: &Config,
    prompts: &[String],
    shard: Option<Shard>,
    pipeline: &mut dyn ImagePipeline,
    verifier: &dyn Verifier,
    on_cuda: bool,
    started: Instant,
) -> Result<RunSummary, RunError> {
    let master_seed = opts.seed.unwrap_or_else(search::seeds::draw_master_seed);
    let config_json = output::to_python_json(&run_record(config, opts, master_seed));
    let run_dir = match &opts.run_name {
        Some(name) => {
            let dir = output::named_run_dir(
                &opts.output_dir,
                &config.model,
                &config.verifier_args.name,
                &config.verifier_args.choice_of_metric,
                name,
            )?;
            check_shared_folder(&dir, &config_json, shard)?;
            dir
        }
        None => output::create_run_dir(
            &opts.output_dir,
            &config.model,
            &config.verifier_args.name,
            &config.verifier_args.choice_of_metric,
            chrono::Local::now(),
        )?,
    };
    let config_path = run_dir.join("config.json");
    if opts.run_name.is_some() {
        // Shards of one sweep start together: one of them makes config.json, the others find
        // it and must agree with it.
        let made =
            crate::files::write_new(&config_path, config_json.as_bytes()).map_err(|source| {
                OutputError {
                    path: config_path.clone(),
                    source,
                }
            })?;
        if !made {
            check_shared_folder(&run_dir, &config_json, shard)?;
        }
    } else {
        output::write_atomic(&config_path, config_json.as_bytes())?;
    }
    let journal_dir = run_dir.join(JOURNAL_DIR);
    std::fs::create_dir_all(&journal_dir).map_err(|source| OutputError {
        path: journal_dir.clone(),
        source,
    })?;
    let record = ResumeRecord {
        format: RESUME_FORMAT,
        tt_scale_version: env!("CARGO_PKG_VERSION").to_string(),
        cwd: std::env::current_dir().unwrap_or_default(),
        run_dir: run_dir.clone(),
        config_sha256: sha256_hex(config_json.as_bytes()),
        device: device_kind(on_cuda).to_string(),
        prompts: prompts.to_vec(),
        shard,
    };
    output::write_json(&journal_dir.join(sweep::record_file_name(shard)), &record)?;
    // A closed stderr must not stop the run (`let _`: the text is dropped, never a panic).
    let _ = writeln!(
        std::io::stderr(),
        "tt-scale: master seed {master_seed}, writing to {}",
        run_dir.display()
    );
    let mine = shard.map_or_else(|| prompts.to_vec(), |s| s.select(prompts));
    search_prompts(
        &run_dir,
        &run_dir,
        master_seed,
        opts,
        config,
        (&mine, shard),
        pipeline,
        verifier,
        started,
    )
}

/// Before a process writes into a named run folder that may already hold a run (the other
/// shards of its sweep): its `config.json`, if any, must be the one this process would write
/// (same config, seed, prompts, batch size), and this shard must not have started there before.
fn check_shared_folder(
    dir: &Path,
    config_json: &str,
    shard: Option<Shard>,
) -> Result<(), RunError> {
    let refuse = |problem: String| RunError::Resume {
        dir: dir.to_path_buf(),
        problem,
    };
    let existing = dir.join("config.json");
    if existing.is_file() {
        let bytes = crate::files::read_capped(&existing, crate::config::MAX_CONFIG_BYTES)
            .map_err(|e| refuse(format!("its config.json cannot be read ({e})")))?;
        if bytes != config_json.as_bytes() {
            return Err(refuse(
                "it holds a run with another config.json (config, seed, prompts, batch size, device or version differ): the shards of one sweep must be started with the same flags apart from --shard; choose another --run-name".into(),
            ));
        }
    }
    if dir
        .join(JOURNAL_DIR)
        .join(sweep::record_file_name(shard))
        .is_file()
    {
        return Err(refuse(format!(
            "this {} already started there; continue it with: {}",
            shard.map_or_else(|| "run".to_string(), |s| format!("shard ({})", s.spec())),
            resume_command(dir, shard)
        )));
    }
    Ok(())
}

/// Searches every prompt into `run_dir` (new or resumed): what the folder already holds (saved
/// images, journaled grades) is reused, the rest is generated and graded.
#[allow(clippy::too_many_arguments)]
fn search_prompts(
    run_dir: &Path,
    shown_dir: &Path,
    master_seed: u64,
    opts: &RunOptions,
    config: &Config,
    (prompts, shard): (&[String], Option<Shard>),
    pipeline: &mut dyn ImagePipeline,
    verifier: &dyn Verifier,
    started: Instant,
) -> Result<RunSummary, RunError> {
    let run_dir = run_dir.to_path_buf();
    let signals = Signals::register()?;
    let settings = SearchSettings {
        stop: signals.stop.clone(),
        method: config.search_args.method,
        rounds: config.search_args.rounds,
        batch_size: opts.batch_size,
        metric: config.verifier_args.choice_of_metric.clone(),
        master_seed,
        noise_kernel: config.noise_kernel,
        overlap: !opts.low_vram,
        // Set per prompt below: only the run's first prompt probes.
        probe_first_batch: false,
        rank_metrics: if config.verifier_args.name == "ensemble" {
            verifiers::ensemble::rank_metrics(&config.verifier_args.ensemble)
        } else {
            Vec::new()
        },
        budget: config.search_args.budget,
    };
    let mut writer = OutputWriter::new(
        run_dir.clone(),
        shown_dir.to_path_buf(),
        &settings,
        prompts.len(),
    );
    if config.verifier_args.also_score_best_only {
        let args = run_verifier_args(config, opts);
        writer.best_extras = verifiers::build_also_score(&args, opts.low_vram)?;
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

/// Version of the resume record's layout.
const RESUME_FORMAT: u32 = 1;

/// What `journal/run.json` keeps beside `config.json` so that a run can be resumed exactly.
#[derive(Debug, Serialize, Deserialize)]
struct ResumeRecord {
    /// [`RESUME_FORMAT`].
    format: u32,
    /// The version that made the run; another version may make other images.
    tt_scale_version: String,
    /// The folder the run was started from: relative paths of the command line resolve there.
    cwd: PathBuf,
    /// The run folder as the round JSON names it (see [`RoundContext::shown_dir`]).
    run_dir: PathBuf,
    /// SHA-256 (hex) of `config.json` as written, to notice an edit.
    config_sha256: String,
    /// `cpu` or `cuda`: the kind of device the images were made on.
    device: String,
    /// The run's prompts, in order (all shards' when sharded).
    prompts: Vec<String>,
    /// The shard this record's process searches (`None`: every prompt).
    #[serde(default)]
    shard: Option<Shard>,
}

fn device_kind(on_cuda: bool) -> &'static str {
    if on_cuda {
        "cuda"
    } else {
        "cpu"
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `tt-scale run --resume DIR`: checks that the folder is a run this binary can continue
/// exactly, then searches its prompts again, reusing every saved image and journaled grade.
fn resume(opts: &RunOptions, dir: &Path) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let refuse = |problem: String| RunError::Resume {
        dir: dir.to_path_buf(),
        problem,
    };
    if !dir.is_dir() {
        return Err(refuse(
            "it is not a folder; give the run folder that tt-scale printed (output/<model>/<verifier>/<metric>/<time>)".into(),
        ));
    }
    let config_path = dir.join("config.json");
    let config_bytes = crate::files::read_capped(&config_path, crate::config::MAX_CONFIG_BYTES)
        .map_err(|e| {
            refuse(format!(
                "its config.json cannot be read ({e}); is it a tt-scale run folder?"
            ))
        })?;
    let shard = opts.shard.map(ShardArg::resolve).transpose()?;
    let record_path = dir.join(JOURNAL_DIR).join(sweep::record_file_name(shard));
    if shard.is_none() && !record_path.is_file() {
        let shards: Vec<String> = sweep::record_files(&dir.join(JOURNAL_DIR))
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .collect();
        if !shards.is_empty() {
            return Err(refuse(format!(
                "it is a sharded sweep ({}): resume one shard with --resume {} --shard INDEX/COUNT (or --shard auto in its array task)",
                shards.join(", "),
                dir.display()
            )));
        }
    }
    let record: ResumeRecord = crate::files::read_capped(&record_path, 1 << 30)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| {
            refuse(format!(
                "{} is missing or unreadable: the run was made by an older tt-scale, or stopped before it began; start a new run",
                record_path.display()
            ))
        })?;
    if record.shard != shard {
        return Err(refuse(format!(
            "{} records shard {:?}, not {:?}",
            record_path.display(),
            record.shard.map(|s| s.spec()),
            shard.map(|s| s.spec())
        )));
    }
    let version = env!("CARGO_PKG_VERSION");
    if record.format != RESUME_FORMAT || record.tt_scale_version != version {
        return Err(refuse(format!(
            "it was made by tt-scale {}, and this is {version}, whose images or grades may differ; resume it with tt-scale {} or start a new run",
            record.tt_scale_version, record.tt_scale_version
        )));
    }
    if sha256_hex(&config_bytes) != record.config_sha256 {
        return Err(refuse(
            "its config.json was changed after the run started, so the images already made would not match the rest; undo the change, or start a new run with the new config".into(),
        ));
    }
    let text = String::from_utf8(config_bytes)
        .map_err(|_| refuse("its config.json is not UTF-8".into()))?;
    let recorded: Map<String, Value> = serde_json::from_str(&text)
        .map_err(|e| refuse(format!("its config.json is not a JSON object ({e})")))?;
    let recorded_path = recorded
        .get("pipeline_config_path")
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .unwrap_or_else(|| config_path.clone());
    // The config is the folder's copy; relative paths in it resolve as when the run started.
    let mut config = Config::parse(&text, &record.cwd.join(recorded_path))?;
    if !Path::new(&config.model).is_dir() && record.cwd.join(&config.model).is_dir() {
        config.model = record.cwd.join(&config.model).display().to_string();
    }
    let master_seed = recorded.get("seed").and_then(Value::as_u64);
    let batch_size = recorded
        .get("batch_size_for_img_gen")
        .and_then(Value::as_u64)
        .and_then(|b| usize::try_from(b).ok())
        .filter(|&b| b >= 1);
    let (Some(master_seed), Some(batch_size)) = (master_seed, batch_size) else {
        return Err(refuse(
            "its config.json has no `seed` or `batch_size_for_img_gen`; it was not written by `tt-scale run`".into(),
        ));
    };
    let recorded_device = recorded
        .get("device")
        .and_then(Value::as_str)
        .and_then(crate::device::parse_device);
    let opts = RunOptions {
        config_path: config.path.clone(),
        seed: Some(master_seed),
        batch_size,
        device: opts.device.or(recorded_device),
        resume: Some(dir.to_path_buf()),
        ..opts.clone()
    };
    let device = select_device(opts.device)?;
    if device_kind(device.is_cuda()) != record.device {
        return Err(refuse(format!(
            "its images were made on {}, and this run would make them on {}, where they differ; resume it with --device {}",
            record.device,
            device_kind(device.is_cuda()),
            record.device
        )));
    }
    let verifier = build_verifier(&config, &opts)?;
    let mut pipeline = crate::pipelines::load(&config, &device, opts.low_vram)?;
    for folder in [dir.to_path_buf(), dir.join(JOURNAL_DIR)] {
        output::remove_stale_temp_files(&folder)?;
    }
    let prompts = shard.map_or_else(|| record.prompts.clone(), |s| s.select(&record.prompts));
    let _ = writeln!(
        std::io::stderr(),
        "tt-scale: resuming {} (master seed {master_seed}, {} prompt(s))",
        dir.display(),
        prompts.len()
    );
    search_prompts(
        dir,
        &record.run_dir,
        master_seed,
        &opts,
        &config,
        (&prompts, shard),
        pipeline.as_mut(),
        verifier.as_ref(),
        started,
    )
}

/// The command that resumes the run (or `shard` of it) in `run_dir`, from any folder (the path
/// made absolute).
pub fn resume_command(run_dir: &Path, shard: Option<Shard>) -> String {
    let dir = std::path::absolute(run_dir).unwrap_or_else(|_| run_dir.to_path_buf());
    let shard = shard.map_or_else(String::new, |s| format!(" --shard {}", s.spec()));
    format!(
        "tt-scale run --resume {}{shard}",
        shell_quote(&dir.display().to_string())
    )
}

/// `text` as one shell word: unchanged when it is plain, else in single quotes.
fn shell_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b));
    if plain {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
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

/// `prompts` without repeats (the first of each kept, in order): a repeated prompt would write
/// the same files twice; each repeat is warned about.
fn unique_prompts(prompts: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut unique = Vec::with_capacity(prompts.len());
    for p in prompts {
        if seen.contains(&p) {
            tracing::warn!(
                "the prompt {} is given more than once; it is searched once",
                printable(&p)
            );
        } else {
            seen.insert(p.clone());
            unique.push(p);
        }
    }
    unique
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

/// `text` quoted, with [`escape_controls`].
fn printable(text: &str) -> String {
    format!("\"{}\"", escape_controls(text))
}

/// The prompt source and count the flags ask for.
fn prompt_source(opts: &RunOptions) -> Result<(PromptSource, NumPrompts), RunError> {
    match (&opts.prompt, &opts.prompts_file, opts.num_prompts) {
        (Some(_), Some(_), _) => Err(RunError::Usage(
            "--prompt and --prompts-file cannot be used together; pick one".into(),
        )),
        (Some(_), None, Some(Some(_))) => Err(RunError::Usage(
            "--num-prompts counts prompts from a file or the dataset; leave it out with --prompt".into(),
        )),
        (Some(p), None, _) => {
            if p.trim().is_empty() {
                return Err(RunError::Usage("--prompt is empty; give the text to generate".into()));
            }
            Ok((PromptSource::Single(p.clone()), NumPrompts::All))
        }
        (None, _, Some(None)) => Err(RunError::Usage(
            "--num-prompts none leaves no prompts: give --prompt TEXT, --prompts-file PATH, or a number of dataset prompts".into(),
        )),
        (None, Some(f), n) => Ok((
            PromptSource::File(f.clone()),
            n.flatten().unwrap_or(NumPrompts::All),
        )),
        (None, None, n) => Ok((
            PromptSource::Dataset(prompts::DatasetSpec::from_env()),
            n.flatten().unwrap_or(NumPrompts::First(2)),
        )),
    }
}

/// The candle device for `--device` (auto: CUDA when built with it and present).
pub fn select_device(spec: Option<DeviceSpec>) -> Result<candle_core::Device, RunError> {
    crate::device::select_device(spec, "--device").map_err(|e| RunError::Device(e.0))
}

/// The run's `config.json`: the config as written (model id included), then the command-line
/// values under the original's names, then the master seed and the tool version.
fn run_record(config: &Config, opts: &RunOptions, master_seed: u64) -> Value {
    let mut rec: Map<String, Value> = config.raw.clone();
    rec.insert(
        "pipeline_config_path".into(),
        json!(opts.config_path.display().to_string()),
    );
    rec.insert("prompt".into(), json!(opts.prompt));
    let num = match opts.num_prompts {
        Some(Some(NumPrompts::All)) => json!("all"),
        Some(Some(NumPrompts::First(n))) => json!(n),
        Some(None) => Value::Null,
        None if opts.prompt.is_some() => Value::Null,
        None if opts.prompts_file.is_some() => json!("all"),
        None => json!(2),
    };
    rec.insert("num_prompts".into(), num);
    rec.insert("batch_size_for_img_gen".into(), json!(opts.batch_size));
    rec.insert("use_low_gpu_vram".into(), json!(opts.low_vram));
    rec.insert(
        "prompts_file".into(),
        json!(opts.prompts_file.as_ref().map(|p| p.display().to_string())),
    );
    rec.insert("seed".into(), json!(master_seed));
    rec.insert(
        "device".into(),
        json!(opts
            .device
            .map_or_else(|| "auto".to_string(), |d| d.to_string())),
    );
    rec.insert("tt_scale_version".into(), json!(env!("CARGO_PKG_VERSION")));
    Value::Object(rec)
}

/// Writes every round's images and JSON, drives the progress bars, and keeps the counts for
/// the summary.
struct OutputWriter {
    run_dir: PathBuf,
    /// The run folder as the JSON names it ([`RoundContext::shown_dir`]).
    shown_dir: PathBuf,
    metric: String,
    zero_order: bool,
    prompt_name: String,
    best: Option<BestSoFar>,
    /// The current prompt's compute so far.
    spent: output::Spent,
    /// The run's denoiser evaluations so far (`None` if a pipeline could not tell).
    nfe: Option<u64>,
    /// `also_score` verifiers that grade only each round's best (`also_score_best_only`).
    best_extras: Vec<verifiers::ensemble::NamedVerifier>,
    best_scores: Vec<(String, Option<f64>)>,
    images: usize,
    /// [`OutputWriter::images`] and [`OutputWriter::failed_rounds`] when the prompt started,
    /// and the prompt's rounds so far: its completion record.
    prompt_start: (usize, usize),
    prompt_rounds: usize,
    prompt_started: Instant,
    /// Images generated (not read back).
    generated: usize,
    reused_grades: usize,
    failed_gradings: usize,
    failed_rounds: usize,
    generation_s: f64,
    bars: Bars,
}

struct Bars {
    _multi: MultiProgress,
    prompts: ProgressBar,
    rounds: ProgressBar,
    images: ProgressBar,
}

impl OutputWriter {
    fn new(
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
        let rounds = multi.add(ProgressBar::new(settings.rounds as u64));
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
            zero_order: matches!(settings.method, SearchMethod::ZeroOrder { .. }),
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

    fn start_prompt(&mut self, prompt: &str) {
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
    fn finish_prompt(&mut self, prompt: &str) -> Result<(), OutputError> {
        let done = PromptDone {
            prompt: prompt.to_string(),
            rounds: self.prompt_rounds,
            images: self.images - self.prompt_start.0,
            nfe: self.spent.nfe,
            verifier_calls: self.spent.verifier_calls,
            best_score: self.best.as_ref().map(|b| b.score),
            failed_rounds: self.failed_rounds - self.prompt_start.1,
        };
        let dir = self.run_dir.join(JOURNAL_DIR).join(sweep::DONE_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| OutputError {
            path: dir.clone(),
            source,
        })?;
        output::write_json(&dir.join(format!("{}.json", self.prompt_name)), &done)?;
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

    fn finish(&self) {
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
        origins: &[search::NoiseOrigin],
        images: &[image::RgbImage],
    ) -> Result<(), ObserverError> {
        // Saved before grading, so a stopped or crashed run keeps every decoded image.
        self.generated += images.len();
        for (origin, image) in origins.iter().zip(images) {
            let stem = output::candidate_stem(&self.prompt_name, round, &origin.label());
            output::write_png(&self.run_dir.join(format!("{stem}.png")), image)?;
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
                        image: &best.image,
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
                zero_order: self.zero_order,
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

/// `tt-scale collage`: makes the collages of a run folder and returns their paths.
pub fn collage(path: &Path) -> Result<Vec<PathBuf>, crate::collage::CollageError> {
    crate::collage::make_collages(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_prompts_are_searched_once_in_first_order() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            unique_prompts(p(&["a", "b", "a", "c", "b"])),
            p(&["a", "b", "c"])
        );
    }

    #[test]
    fn durations_are_written_in_a_readable_unit() {
        assert_eq!(human_duration(45.0), "45 s");
        assert_eq!(human_duration(720.0), "12 min");
        assert_eq!(human_duration(3.4 * 3600.0), "3.4 h");
        assert_eq!(human_duration(3.0 * 86400.0), "3.0 days");
    }

    #[test]
    fn resume_commands_quote_folders_for_the_shell() {
        assert_eq!(
            shell_quote("output/sd-v1.5/gemini/x_1"),
            "output/sd-v1.5/gemini/x_1"
        );
        assert_eq!(shell_quote("my runs/it's"), "'my runs/it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        assert_eq!(escape_controls("a\u{1b}[2Jb\r\nc"), "a\\u{1b}[2Jb\\r\\nc");
        assert_eq!(escape_controls("plain, ünïcode"), "plain, ünïcode");
        assert_eq!(printable("x\ty"), "\"x\\ty\"");
    }
}
