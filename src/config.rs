//! The experiment config: the original tool's JSON schema, read and checked before anything
//! loads. Each section is read by its owner (`pipeline_call_args` by [`crate::pipelines`],
//! `verifier_args` by [`crate::verifiers`], `search_args` by [`crate::search`]'s strategies)
//! through [`crate::keys::Section`], so every error names the file, the JSON path and what is
//! allowed.

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::keys::{KeyError, Section, Warnings};
use crate::loading::Dtype;
use crate::noise::RandnKernel;
use crate::pipelines::CallArgs;
use crate::search::SearchArgs;
use crate::verifiers::VerifierArgs;

/// The configs shipped in `configs/`, compiled into the binary: `--pipeline-config` takes their
/// name (`flux.1_dev`, `sd1.5_gemini`, ...) from any folder.
pub const SHIPPED: &[(&str, &str)] = &[
    ("flux.1_dev", include_str!("../configs/flux.1_dev.json")),
    (
        "flux.1_dev_ensemble",
        include_str!("../configs/flux.1_dev_ensemble.json"),
    ),
    (
        "flux.1_dev_zero_order",
        include_str!("../configs/flux.1_dev_zero_order.json"),
    ),
    ("pixart_sigma", include_str!("../configs/pixart_sigma.json")),
    ("sd1.5", include_str!("../configs/sd1.5.json")),
    (
        "sd1.5_aesthetic",
        include_str!("../configs/sd1.5_aesthetic.json"),
    ),
    ("sd1.5_gemini", include_str!("../configs/sd1.5_gemini.json")),
    ("sdxl", include_str!("../configs/sdxl.json")),
];

/// The largest config file read (a config is a few hundred bytes).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Top-level keys of a config file.
const TOP_KEYS: [&str; 7] = [
    "pretrained_model_name_or_path",
    "torch_dtype",
    "pipeline_call_args",
    "verifier_args",
    "search_args",
    "export_args",
    "noise_kernel",
];

/// Keys a previous run's `config.json` holds besides the config proper; accepted and ignored,
/// so a run's `config.json` can be fed back in.
pub const RUN_RECORD_KEYS: [&str; 12] = [
    "pipeline_config_path",
    "prompt",
    "prompts_file",
    "num_prompts",
    "batch_size_for_img_gen",
    "use_low_gpu_vram",
    "seed",
    "device",
    "output_dir",
    "tt_scale_version",
    "run_started_at",
    "config_path",
];

/// A config file that cannot be used. Each variant names the file and, where it applies, the
/// JSON path of the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the config file {path}: {source} (pass an existing file with --pipeline-config)")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{path} is not valid JSON: {source}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parse error, with line and column.
        source: serde_json::Error,
    },
    /// A key is missing or has a value that is not allowed.
    #[error("{path}: `{key}` {problem}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// JSON path of the key, e.g. `search_args.threshold`.
        key: String,
        /// What is wrong and what is allowed.
        problem: String,
    },
}

impl From<KeyError> for ConfigError {
    fn from(e: KeyError) -> Self {
        ConfigError::Invalid {
            path: e.file,
            key: e.key,
            problem: e.problem,
        }
    }
}

/// A validated experiment config.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// `pretrained_model_name_or_path`: a Hub repo id or a local folder in diffusers layout.
    pub model: String,
    /// `torch_dtype`.
    pub dtype: Dtype,
    /// `pipeline_call_args`.
    pub pipeline_call_args: CallArgs,
    /// `verifier_args`.
    pub verifier_args: VerifierArgs,
    /// `search_args`.
    pub search_args: SearchArgs,
    /// `noise_kernel` (default: vectorized).
    pub noise_kernel: RandnKernel,
    /// The file's JSON object as written, for the run's `config.json`.
    pub raw: Map<String, Value>,
    /// Non-fatal findings (unknown keys, ignored keys), one sentence each.
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        if !path.exists() {
            // A shipped config's name (`flux.1_dev`, or `configs/flux.1_dev.json` run from
            // another folder) is read from the binary.
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(|n| n.trim_end_matches(".json"));
            if let Some((_, text)) = SHIPPED.iter().find(|(n, _)| Some(*n) == name) {
                return Config::parse(text, path);
            }
        }
        let text = crate::files::read_text_capped(path, MAX_CONFIG_BYTES).map_err(|source| {
            ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Config::parse(&text, path)
    }

    /// Validates config JSON `text`; `path` names it in errors.
    pub fn parse(text: &str, path: &std::path::Path) -> Result<Config, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let Value::Object(root) = value else {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "(top level)".into(),
                problem: format!(
                    "must be a JSON object, not {}",
                    crate::keys::type_name(&value)
                ),
            });
        };
        let warnings = Warnings::default();
        let s = Section::new(path, &root, &warnings);
        let mut top_known: Vec<&str> = TOP_KEYS.to_vec();
        top_known.extend(RUN_RECORD_KEYS);
        s.check_keys(&top_known);

        let model = s.required_string(
            "pretrained_model_name_or_path",
            "give a Hugging Face repo id (owner/name) or a local folder in diffusers layout",
        )?;
        if model.trim().is_empty() {
            return Err(s
                .invalid(
                    "pretrained_model_name_or_path",
                    "is empty; give a Hugging Face repo id (owner/name) or a local folder in diffusers layout",
                )
                .into());
        }
        // A relative folder is looked for in the current folder, then beside the config.
        let model = match s.beside_file(&model) {
            Some(p) if !std::path::Path::new(&model).is_dir() && p.is_dir() => {
                p.display().to_string()
            }
            _ => model,
        };
        let dtype_s = s.required_string("torch_dtype", "one of fp32, fp16, bf16")?;
        let dtype = Dtype::parse(&dtype_s).ok_or_else(|| {
            s.invalid(
                "torch_dtype",
                format!("is \"{dtype_s}\"; allowed: fp32, fp16, bf16"),
            )
        })?;
        let noise_kernel = match s.string("noise_kernel")? {
            None => RandnKernel::default(),
            Some(k) => k.parse().map_err(|_| {
                s.invalid(
                    "noise_kernel",
                    format!("is \"{k}\"; allowed: vectorized (default), portable"),
                )
            })?,
        };
        let pipeline_call_args = CallArgs::read(
            &s.section("pipeline_call_args")?,
            &model,
            crate::pipelines::registry::size_factor(&model),
        )?;
        let verifier_args = VerifierArgs::read(&s.section("verifier_args")?, false, false)?;
        let search_args = SearchArgs::read(&s.section("search_args")?)?;
        if let Some(ea) = s.get("export_args") {
            if !ea.is_object() {
                return Err(s
                    .invalid(
                        "export_args",
                        format!("must be a JSON object, not {}", crate::keys::type_name(ea)),
                    )
                    .into());
            }
            s.warn("`export_args` only applies to video models and is ignored");
        }
        Ok(Config {
            path: path.to_path_buf(),
            model,
            dtype,
            pipeline_call_args,
            verifier_args,
            search_args,
            noise_kernel,
            raw: root.clone(),
            warnings: warnings.into_inner(),
        })
    }
}
