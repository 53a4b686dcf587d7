//! A run's options resolved once into a [`RunPlan`]: the config, the shard this process
//! searches, the master seed, the verifier's arguments with the run's device. Every later step
//! (the folder, the workers, the search, `config.json`) reads the plan; the device stays a
//! [`DeviceSpec`] from the command line to the verifier.

use serde_json::{json, Map, Value};

use super::{escape_controls, RunError, RunOptions};
use crate::config::Config;
use crate::device::DeviceSpec;
use crate::output::journal::Shard;
use crate::pipelines::{LoadOptions, Pipeline};
use crate::prompts::{self, NumPrompts, PromptSource};
use crate::search::{SearchSettings, StopFlag};
use crate::sweep::{self, ShardArg};
use crate::verifiers::{self, Verifier, VerifierArgs};

/// What a run does.
#[derive(Clone, Debug)]
pub struct RunPlan {
    /// The options as given (with `--resume`: as the folder records them).
    pub opts: RunOptions,
    /// The config.
    pub config: Config,
    /// The shard of the prompts this process searches (`None`: all of them).
    pub shard: Option<Shard>,
    /// The master seed: `--seed`, else drawn once here.
    pub master_seed: u64,
}

impl RunPlan {
    /// The plan of a new run: the config read and checked (its warnings logged), the run name
    /// and the shard checked, the master seed drawn when not given.
    pub fn new(opts: &RunOptions) -> Result<Self, RunError> {
        let config = Config::load(&opts.config_path)?;
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        if let Some(name) = &opts.run_name {
            sweep::check_run_name(name).map_err(RunError::Usage)?;
        }
        let shard = opts.shard.map(ShardArg::resolve).transpose()?;
        Ok(RunPlan {
            opts: opts.clone(),
            config,
            shard,
            master_seed: opts
                .seed
                .unwrap_or_else(crate::search::seeds::draw_master_seed),
        })
    }

    /// The run's `config.json`: the config as written (model id included), then the
    /// command-line values under the original's names, then the master seed and the tool
    /// version, as Python's `json.dump` writes it.
    pub fn config_json(&self) -> String {
        let (config, opts) = (&self.config, &self.opts);
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
        rec.insert("seed".into(), json!(self.master_seed));
        rec.insert(
            "device".into(),
            json!(opts
                .device
                .map_or_else(|| "auto".to_string(), |d| d.to_string())),
        );
        rec.insert("tt_scale_version".into(), json!(env!("CARGO_PKG_VERSION")));
        crate::output::to_python_json(&Value::Object(rec))
    }

    /// The folder of a named run (`--run-name`): `output/<model>/<verifier>/<metric>/<name>`.
    pub fn named_dir(&self) -> Option<std::path::PathBuf> {
        self.opts.run_name.as_ref().map(|name| {
            crate::output::named_run_path(
                &self.opts.output_dir,
                &self.config.model,
                self.config.verifier_args.name(),
                &self.config.verifier_args.choice_of_metric,
                name,
            )
        })
    }

    /// The config's `verifier_args` for this run: a local verifier runs on the run's device
    /// unless the config names another.
    pub fn verifier_args(&self) -> VerifierArgs {
        let mut args = self.config.verifier_args.clone();
        args.device = args.device.or(self.opts.device);
        args
    }

    /// The run's verifier; an API verifier's access (key, model) is checked here, before any
    /// model loads.
    pub fn build_verifier(&self) -> Result<Box<dyn Verifier>, RunError> {
        let verifier = verifiers::build_for_run(&self.verifier_args(), self.opts.low_vram)?;
        match verifier.check_access() {
            Err(failure) if failure.fatal => Err(RunError::VerifierAccess(failure.message)),
            _ => Ok(verifier),
        }
    }

    /// The device `--device` names, opened (auto: CUDA when built with it and present).
    pub fn open_device(&self) -> Result<candle_core::Device, RunError> {
        open_device(self.opts.device)
    }

    /// Loads the config's pipeline onto `device`.
    pub fn load_pipeline(
        &self,
        device: &candle_core::Device,
    ) -> Result<Box<dyn Pipeline>, RunError> {
        let config = &self.config;
        Ok(crate::pipelines::registry::load(
            &config.model,
            LoadOptions {
                dtype: config.dtype,
                device,
                call_args: &config.pipeline_call_args,
                low_vram: self.opts.low_vram,
                config_file: &config.path,
            },
        )?)
    }

    /// The settings every prompt's search runs with (`stop`: the signal handlers' flag).
    pub fn search_settings(&self, stop: StopFlag) -> SearchSettings {
        let args = &self.config.verifier_args;
        SearchSettings {
            stop,
            method: self.config.search_args.method.clone(),
            batch_size: self.opts.batch_size,
            metric: args.choice_of_metric.clone(),
            master_seed: self.master_seed,
            noise_kernel: self.config.noise_kernel,
            overlap: !self.opts.low_vram,
            // Set per prompt: only the run's first prompt probes.
            probe_first_batch: false,
            rank_metrics: if args.kind.is_ensemble() {
                verifiers::ensemble::rank_metrics(&args.ensemble)
            } else {
                Vec::new()
            },
            budget: self.config.search_args.budget,
        }
    }

    /// Before a large model loads onto the CPU: an estimate of the time per image and for the
    /// run, when an image takes more than a minute, and what to do instead.
    pub fn warn_if_slow_on_cpu(&self, prompts: usize) {
        let config = &self.config;
        let Ok(gflops) = crate::ops::cpu_matmul_gflops() else {
            return;
        };
        let estimate = crate::pipelines::estimate::cpu_estimate(
            &config.model,
            &config.pipeline_call_args,
            gflops,
        );
        let Some(e) = estimate else {
            return;
        };
        if e.seconds_per_image < 60.0 {
            return;
        }
        let per_prompt = config.search_args.method.media_per_prompt();
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
}

/// The candle device `spec` names for `--device` (`None`: auto, CUDA when built with it and
/// present).
pub fn open_device(spec: Option<DeviceSpec>) -> Result<candle_core::Device, RunError> {
    crate::device::select_device(spec, "--device").map_err(|e| RunError::Device(e.0))
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

/// The prompt source and count the flags ask for.
pub fn prompt_source(opts: &RunOptions) -> Result<(PromptSource, NumPrompts), RunError> {
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

/// The prompts of `source` ([`prompt_source`]), each once.
pub fn load_prompts((source, count): (PromptSource, NumPrompts)) -> Result<Vec<String>, RunError> {
    Ok(unique_prompts(prompts::load_prompts(&source, count)?))
}

/// `prompts` without repeats (the first of each kept, in order): a repeated prompt would write
/// the same files twice; each repeat is warned about.
fn unique_prompts(prompts: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut unique = Vec::with_capacity(prompts.len());
    for p in prompts {
        if seen.contains(&p) {
            tracing::warn!(
                "the prompt \"{}\" is given more than once; it is searched once",
                escape_controls(&p)
            );
        } else {
            seen.insert(p.clone());
            unique.push(p);
        }
    }
    unique
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
}
