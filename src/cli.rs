//! The command line: the only place that parses arguments. `tt-scale run` (with the original
//! tool's flag spellings as aliases), `collage`, `rescore`, `status`, `merge`, `report`,
//! `bench`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::device::{parse_device, parse_devices, DeviceSpec};
use crate::loading::Dtype;
use crate::prompts::NumPrompts;
use crate::run::RunOptions;
use crate::sweep::ShardArg;
use crate::verifiers::VerifierKind;

/// Inference-time scaling for text-to-image diffusion: search over starting noises and keep
/// what a verifier scores best.
#[derive(Debug, Parser)]
#[command(name = "tt-scale", version, about, long_about = None)]
pub struct Cli {
    /// More detailed logs (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Search over initial noises for each prompt and write every candidate, the per-round
    /// bests and config.json under --output-dir.
    Run(RunArgs),
    /// Make one collage per prompt of a run folder: the per-round best images in a row.
    Collage(CollageArgs),
    /// Grade the images of a run folder with another verifier (no generation): adds its scores
    /// to the round JSON and reports how the choice of best would change.
    Rescore(RescoreArgs),
    /// Where a run (or a sweep's shared run folder) stands: prompts done, started and pending,
    /// shards started, NFEs and verifier calls spent, failed rounds.
    Status(StatusArgs),
    /// Check that run folders (a sweep's shared folder, or one folder per shard) finish every
    /// prompt exactly once, gather per-shard folders into one (--into), and write summary.json
    /// and summary.csv (one row per prompt and round).
    Merge(MergeArgs),
    /// Write report.html (the scaling curves: best score so far vs NFEs and vs wall time, mean
    /// and spread over prompts; every round's candidates as thumbnails with scores), plus
    /// summary.csv and summary.json, into a run folder.
    Report(ReportArgs),
    /// Time one denoiser step of a model's real-size architecture with random weights (no
    /// download needed).
    Bench(BenchArgs),
}

/// `--num-prompts`: a count, `all`, or the original's `None` (no dataset prompts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumPromptsArg {
    /// Take this many (or all) prompts.
    Take(NumPrompts),
    /// `None`: take no prompts from the dataset (the original's way to say "use --prompt").
    NoneGiven,
}

fn parse_num_prompts(s: &str) -> Result<NumPromptsArg, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(NumPromptsArg::NoneGiven);
    }
    s.parse::<NumPrompts>()
        .map(NumPromptsArg::Take)
        .map_err(|_| {
            format!(
                "`{s}` is not a number of prompts: give a positive whole number, `all`, or `none`"
            )
        })
}

/// `--device`: `auto`, `cpu`, `cuda`, `cuda:N`, or a comma-separated list of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// CUDA when this build has it and a GPU is present, else the CPU.
    Auto,
    /// The named device.
    Named(DeviceSpec),
    /// Several devices (`cuda:0,cuda:1`): `tt-scale run` starts one worker process a device.
    Several(Vec<DeviceSpec>),
}

fn parse_device_arg(s: &str) -> Result<DeviceArg, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(DeviceArg::Auto);
    }
    if s.contains(',') {
        return parse_devices(s).map(DeviceArg::Several).ok_or_else(|| {
            format!("`{s}` is not a list of devices: give two or more of cpu, cuda, cuda:N, separated by commas")
        });
    }
    parse_device(s)
        .map(DeviceArg::Named)
        .ok_or_else(|| format!("`{s}` is not a device: give cpu, cuda, cuda:N or auto"))
}

fn parse_batch_size(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=4096).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{s}` is not a batch size: give a whole number from 1 to 4096"
        )),
    }
}

fn parse_seed(s: &str) -> Result<u64, String> {
    s.trim().parse::<u64>().map_err(|_| {
        format!("`{s}` is not a seed: give a whole number from 0 to 18446744073709551615")
    })
}

/// Flags of `tt-scale run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The experiment config (JSON; the original tool's schema).
    #[arg(
        long = "pipeline-config",
        visible_alias = "pipeline_config_path",
        value_name = "PATH",
        default_value = "configs/flux.1_dev.json"
    )]
    pub pipeline_config: PathBuf,

    /// One prompt to search for (instead of the dataset's prompts).
    #[arg(long, value_name = "TEXT", conflicts_with = "prompts_file")]
    pub prompt: Option<String>,

    /// A UTF-8 text file with one prompt a line (blank lines skipped).
    #[arg(long = "prompts-file", value_name = "PATH")]
    pub prompts_file: Option<PathBuf>,

    /// How many prompts to take from the prompts file or the dataset: N, `all` (any case) or
    /// `none` [default: 2 for the dataset, all for a prompts file]
    #[arg(
        long = "num-prompts",
        visible_alias = "num_prompts",
        value_name = "N|all",
        value_parser = parse_num_prompts
    )]
    pub num_prompts: Option<NumPromptsArg>,

    /// Candidates denoised per pipeline call.
    #[arg(
        long = "batch-size",
        visible_alias = "batch_size_for_img_gen",
        value_name = "N",
        default_value = "1",
        value_parser = parse_batch_size
    )]
    pub batch_size: usize,

    /// Master seed: every candidate seed derives from it. When absent, one is drawn and
    /// recorded in config.json.
    #[arg(long, value_name = "N", value_parser = parse_seed)]
    pub seed: Option<u64>,

    /// Where run folders are made.
    #[arg(long = "output-dir", value_name = "DIR", default_value = "output")]
    pub output_dir: PathBuf,

    /// Keep peak GPU memory low: text encoders are freed before denoising, the VAE decodes after
    /// the denoiser is idle, and a local verifier is loaded only while it scores.
    #[arg(long = "low-vram", visible_alias = "use_low_gpu_vram")]
    pub low_vram: bool,

    /// Compute device: auto (cuda when built with it and a GPU is present, else cpu), cpu,
    /// cuda or cuda:N, or a list (cuda:0,cuda:1,...): one worker process a device, each
    /// searching its share of the prompts into one run folder. With --resume: the run's device
    /// unless given.
    #[arg(long, value_name = "DEVICE", default_value = "auto", value_parser = parse_device_arg)]
    pub device: DeviceArg,

    /// Continue the interrupted or crashed run in this folder: its config, seed, prompts and
    /// batch size are used, saved images and journaled grades are reused, the rest is made.
    #[arg(
        long,
        value_name = "RUN_DIR",
        conflicts_with_all = ["pipeline_config", "prompt", "prompts_file", "num_prompts", "batch_size", "seed", "output_dir", "run_name"]
    )]
    pub resume: Option<PathBuf>,

    /// Search one shard of the prompts: INDEX/COUNT (0-based: prompt i when i % COUNT == INDEX;
    /// needs --seed), or auto (a Slurm array task's SLURM_ARRAY_TASK_ID/COUNT, a Kubernetes
    /// Indexed Job's JOB_COMPLETION_INDEX with TT_SCALE_SHARD_COUNT). With --resume: continue
    /// that shard of the run.
    #[arg(long, value_name = "INDEX/COUNT|auto", value_parser = parse_shard)]
    pub shard: Option<ShardArg>,

    /// At the end, print the run summary as JSON on stdout (the text summary stays on stderr).
    #[arg(long)]
    pub json: bool,

    /// Name the run folder (output/<model>/<verifier>/<metric>/NAME) instead of the start
    /// time; the shards of a sweep share one name and write into one folder. The same command
    /// again continues a run (or shard) that stopped there.
    #[arg(long = "run-name", value_name = "NAME")]
    pub run_name: Option<String>,
}

fn parse_shard(s: &str) -> Result<ShardArg, String> {
    ShardArg::parse(s).map_err(|e| e.to_string())
}

impl RunArgs {
    /// The run's options: `--device` split into the one device (or auto) and the workers' list.
    pub fn options(self) -> RunOptions {
        RunOptions {
            config_path: self.pipeline_config,
            prompt: self.prompt,
            prompts_file: self.prompts_file,
            num_prompts: self.num_prompts.map(|n| match n {
                NumPromptsArg::Take(n) => Some(n),
                NumPromptsArg::NoneGiven => None,
            }),
            batch_size: self.batch_size,
            seed: self.seed,
            output_dir: self.output_dir,
            low_vram: self.low_vram,
            device: match &self.device {
                DeviceArg::Named(d) => Some(*d),
                DeviceArg::Auto | DeviceArg::Several(_) => None,
            },
            workers: match self.device {
                DeviceArg::Several(list) => list,
                _ => Vec::new(),
            },
            resume: self.resume,
            shard: self.shard,
            run_name: self.run_name,
        }
    }
}

/// `--verifier`'s help: every verifier's name, from the verifier table.
fn verifier_help() -> String {
    format!(
        "The verifier: a name ({}) with its defaults, or a JSON file holding a verifier_args \
         object (or a whole config)",
        VerifierKind::names()
    )
}

fn parse_one_device(s: &str) -> Result<DeviceSpec, String> {
    parse_device(s).ok_or_else(|| format!("`{s}` is not a device: give cpu, cuda or cuda:N"))
}

/// Flags of `tt-scale rescore`.
#[derive(Debug, Args)]
pub struct RescoreArgs {
    /// The run folder (output/<model>/<verifier>/<metric>/<timestamp>).
    #[arg(value_name = "RUN_DIR")]
    pub path: PathBuf,
    #[arg(long, value_name = "NAME|FILE", help = verifier_help())]
    pub verifier: String,
    /// The metric to compare choices by (default: the verifier's choice_of_metric, or its
    /// first metric).
    #[arg(long, value_name = "METRIC")]
    pub metric: Option<String>,
    /// Where a local verifier runs: cpu, cuda or cuda:N (default: CUDA when present).
    #[arg(long, value_name = "DEVICE", value_parser = parse_one_device)]
    pub device: Option<DeviceSpec>,
}

/// Flags of `tt-scale status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The run folder (output/<model>/<verifier>/<metric>/<name>).
    #[arg(value_name = "RUN_DIR")]
    pub path: PathBuf,
    /// Print the status as JSON on stdout (for scripts).
    #[arg(long)]
    pub json: bool,
}

/// Flags of `tt-scale merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The run folders: one shared sweep folder, or the shards' folders.
    #[arg(value_name = "RUN_DIR", required = true)]
    pub folders: Vec<PathBuf>,
    /// Where to gather several folders (a new folder; files are hard-linked where possible).
    #[arg(long, value_name = "DIR")]
    pub into: Option<PathBuf>,
}

/// Flags of `tt-scale report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The run folder (output/<model>/<verifier>/<metric>/<name>; a merged sweep's folder).
    #[arg(value_name = "RUN_DIR")]
    pub path: PathBuf,
}

/// Flags of `tt-scale collage`.
#[derive(Debug, Args)]
pub struct CollageArgs {
    /// A run folder (output/<model>/<verifier>/<metric>/<timestamp>).
    #[arg(long, value_name = "DIR")]
    pub path: PathBuf,
}

fn parse_dtype(s: &str) -> Result<Dtype, String> {
    Dtype::parse(s).ok_or_else(|| format!("`{s}` is not a dtype: give fp32, fp16 or bf16"))
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a whole number >= 1")),
    }
}

/// Flags of `tt-scale bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which model's denoiser step to time (see `tt_scale::bench::MODELS`); repeat for several.
    #[arg(long = "model", value_name = "NAME", required = true)]
    pub models: Vec<String>,
    /// Image height in pixels.
    #[arg(long, default_value = "1024", value_parser = parse_positive)]
    pub height: usize,
    /// Image width in pixels.
    #[arg(long, default_value = "1024", value_parser = parse_positive)]
    pub width: usize,
    /// Images per step.
    #[arg(long, default_value = "1", value_parser = parse_positive)]
    pub batch: usize,
    /// Compute dtype: fp32, fp16 or bf16 (default: bf16 on a GPU, fp32 on a CPU, which has no
    /// fast bf16 matmul).
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<Dtype>,
    /// Compute device: auto, cpu, cuda or cuda:N.
    #[arg(long, value_name = "DEVICE", default_value = "auto", value_parser = parse_device_arg)]
    pub device: DeviceArg,
    /// Untimed warm-up steps.
    #[arg(long, default_value = "2")]
    pub warmup: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value = "5", value_parser = parse_positive)]
    pub iters: usize,
    /// Build only this many blocks/layers (to fit a small machine); default: the real depth.
    #[arg(long, value_parser = parse_positive)]
    pub layers: Option<usize>,
    /// `--model search`: denoiser steps per image.
    #[arg(long, default_value = "28", value_parser = parse_positive)]
    pub steps: usize,
    /// `--model search`: the stand-in API verifier's latency per call, in milliseconds.
    #[arg(long, value_name = "MS", default_value = "3000")]
    pub verifier_latency_ms: u64,
    /// Also write the reports as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::journal::Shard;
    use crate::run::workers::worker_args;
    use crate::run::RunPlan;

    fn options(args: &[&str]) -> RunOptions {
        let cli = Cli::try_parse_from(args).unwrap();
        match cli.command {
            Command::Run(a) => a.options(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_workers_command_line_parses_back_into_the_plans_options() {
        // The worker's flags are the plan's options rendered: parsed back, they give those
        // options with the worker's device and shard, the plan's seed and run name, and --json.
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("c.json");
        std::fs::write(
            &config,
            r#"{"pretrained_model_name_or_path": "someone/model", "torch_dtype": "fp32",
                "pipeline_call_args": {}, "verifier_args": {"name": "clip_score",
                "choice_of_metric": "clip_score"}, "search_args": {"search_rounds": 2}}"#,
        )
        .unwrap();
        let config = config.display().to_string();
        for given in [
            vec![
                "--prompts-file",
                "p.txt",
                "--num-prompts",
                "7",
                "--low-vram",
            ],
            vec!["--prompt", "a cat, \"quoted\" -- and --flags"],
            vec!["--num-prompts", "none"],
            vec!["--num-prompts", "all", "--batch-size", "3"],
        ] {
            let mut args = vec!["tt-scale", "run", "--pipeline-config", &config];
            args.extend(&given);
            args.extend(["--seed", "9", "--output-dir", "o", "--device", "cpu,cuda:1"]);
            let opts = options(&args);
            assert_eq!(opts.workers, [DeviceSpec::Cpu, DeviceSpec::Cuda(1)]);
            let plan = RunPlan::new(&opts).unwrap();
            let shard = Shard { index: 1, count: 4 };
            let mut worker = vec!["tt-scale".to_string()];
            worker.extend(worker_args(&plan, DeviceSpec::Cuda(1), shard, "sweep"));
            let cli = Cli::try_parse_from(&worker).unwrap();
            let Command::Run(run) = cli.command else {
                panic!("not a run: {worker:?}");
            };
            assert!(run.json, "{worker:?}");
            let back = run.options();
            let want = RunOptions {
                device: Some(DeviceSpec::Cuda(1)),
                workers: Vec::new(),
                shard: Some(ShardArg::Fixed(shard)),
                run_name: Some("sweep".into()),
                ..opts.clone()
            };
            assert_eq!(back, want, "{worker:?}");
        }
    }
}
