//! The experiment config: the original tool's JSON schema, parsed and validated before anything
//! loads. Every error names the file, the JSON path and what is allowed.

use std::path::PathBuf;

pub use crate::device::{parse_device, DeviceSpec};
pub use crate::loading::Dtype;

/// `verifier_args`: which judge, which metric, and how to call it.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifierArgs {
    /// `name`: `gemini`, `openai` or `qwen`.
    pub name: String,
    /// `choice_of_metric`: the metric selection uses (one of [`METRICS`]).
    pub choice_of_metric: String,
    /// `max_new_tokens`: the reply's token budget (Gemini: `maxOutputTokens`; OpenAI:
    /// `max_completion_tokens`).
    pub max_new_tokens: Option<u32>,
    /// `model_name`: the API model id; each verifier has its default.
    pub model_name: Option<String>,
    /// `prompt_path`: a file whose text replaces the built-in grading rubric.
    pub prompt_path: Option<PathBuf>,
    /// `base_url`: API base URL (else the verifier's environment variable, else its default).
    pub base_url: Option<String>,
    /// `seed`: sent to APIs that accept a sampling seed.
    pub seed: Option<u64>,
    /// `concurrency`: requests in flight at once (default 4).
    pub concurrency: usize,
    /// `max_attempts`: HTTP attempts per image on 429, 5xx and timeouts (default 5).
    pub max_attempts: u32,
    /// `max_invalid_replies`: times a reply that does not fit the schema is asked again (default 2).
    pub max_invalid_replies: u32,
    /// `timeout_s`: per-request timeout in seconds (default 120).
    pub timeout_s: f64,
    /// `device`: where a local verifier runs (`cpu`, `cuda`, `cuda:N`).
    pub device: Option<String>,
    /// `processor_model`: where a CLIP verifier's image processor and tokenizer come from when
    /// not from `model_name` (PickScore's default: `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`);
    /// `image_reward`'s BERT tokenizer (default `google-bert/bert-base-uncased`).
    pub processor_model: Option<String>,
    /// `ensemble`: the members of the `ensemble` verifier (each a full `verifier_args`).
    pub ensemble: Vec<VerifierArgs>,
    /// `also_score`: verifiers that grade every candidate too, recorded, never used to select.
    pub also_score: Vec<VerifierArgs>,
    /// `also_score_best_only`: the `also_score` verifiers grade only each round's best.
    pub also_score_best_only: bool,
    /// `aesthetic_model`: the aesthetic MLP of `laion_aesthetic`, a `.pth` file or a Hub repo
    /// holding `aesthetic-model.pth` (default `trl-lib/ddpo-aesthetic-predictor`).
    pub aesthetic_model: Option<String>,
}

impl VerifierArgs {
    /// Arguments with every optional key at its default.
    pub fn new(name: &str, choice_of_metric: &str) -> Self {
        Self {
            name: name.to_string(),
            choice_of_metric: choice_of_metric.to_string(),
            max_new_tokens: None,
            model_name: None,
            prompt_path: None,
            base_url: None,
            seed: None,
            concurrency: 4,
            max_attempts: 5,
            max_invalid_replies: 2,
            timeout_s: 120.0,
            device: None,
            aesthetic_model: None,
            processor_model: None,
            ensemble: Vec::new(),
            also_score: Vec::new(),
            also_score_best_only: false,
        }
    }
}

use serde_json::{Map, Value};

/// The model families tt-scale knows, keyed by the Hub repo ids of the original tool's map.
const KNOWN_MODELS: [(&str, &str, usize); 5] = [
    ("black-forest-labs/FLUX.1-dev", "flux.1-dev", 16),
    ("black-forest-labs/FLUX.1-schnell", "flux.1-schnell", 16),
    (
        "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        "pixart-sigma-1024-ms",
        8,
    ),
    ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl-base", 8),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd-v1.5", 8),
];

/// `rel` joined to the folder of the config file `config`, when `rel` is a relative path and
/// the config has a folder.
fn beside_config(config: &std::path::Path, rel: &str) -> Option<PathBuf> {
    let rel = std::path::Path::new(rel);
    if rel.is_absolute() {
        return None;
    }
    let dir = config.parent().filter(|d| !d.as_os_str().is_empty())?;
    Some(dir.join(rel))
}

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

/// The most denoising steps a config may ask for: diffusers' schedulers train on 1000
/// timesteps, and a pipeline refuses more steps than its scheduler's `num_train_timesteps`.
pub const MAX_INFERENCE_STEPS: u64 = 1000;

/// The largest config file read (a config is a few hundred bytes).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The verifiers a config may name.
pub const VERIFIER_NAMES: &[&str] = &[
    "gemini",
    "openai",
    "qwen",
    "laion_aesthetic",
    "clip_score",
    "pickscore",
    "hpsv2",
    "image_reward",
    "ensemble",
];

/// The metric of the `ensemble` verifier: each candidate's rank among its round's candidates
/// under each member's metric, normalised to [0, 1] (1 = best) and averaged over the members.
pub const ENSEMBLE_METRIC: &str = "ensemble_rank";

/// The metrics of the CLIP verifiers: the LAION aesthetic score (1-10 scale), the raw CLIP
/// cosine of image and prompt, and CLIP-S = 2.5 max(cosine, 0) (Hessel et al.).
pub const CLIP_METRICS: [&str; 3] = ["laion_aesthetic_score", "clip_score", "clip_s"];

/// The metrics verifier `name` grades (the valid values of `choice_of_metric`); empty for an
/// unknown name.
pub fn verifier_metrics(name: &str) -> &'static [&'static str] {
    match name {
        "gemini" | "openai" | "qwen" => &METRICS,
        "laion_aesthetic" => &CLIP_METRICS,
        "clip_score" => &CLIP_METRICS[1..],
        "pickscore" => &["pickscore"],
        "hpsv2" => &["hpsv2"],
        "image_reward" => &["image_reward"],
        "ensemble" => &[ENSEMBLE_METRIC],
        _ => &[],
    }
}

/// The grading rubric's metrics: the valid values of `choice_of_metric`.
pub const METRICS: [&str; 6] = [
    "accuracy_to_prompt",
    "creativity_and_originality",
    "visual_quality_and_realism",
    "consistency_and_cohesion",
    "emotional_or_thematic_resonance",
    "overall_score",
];

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
const RUN_RECORD_KEYS: [&str; 12] = [
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

const PIPELINE_KEYS: [&str; 7] = [
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "max_sequence_length",
    "clean_caption",
];

const VERIFIER_KEYS: [&str; 19] = [
    "name",
    "also_score_best_only",
    "processor_model",
    "aesthetic_model",
    "ensemble",
    "also_score",
    "choice_of_metric",
    "max_new_tokens",
    "model_name",
    "prompt_path",
    "base_url",
    "seed",
    "concurrency",
    "max_attempts",
    "max_invalid_replies",
    "timeout_s",
    "device",
    "use_low_gpu_vram",
    "dtype",
];

const SEARCH_KEYS: [&str; 20] = [
    "budget",
    "search_method",
    "search_rounds",
    "threshold",
    "num_neighbors",
    "num_paths",
    "paths_width",
    "search_start_sigma",
    "delta_f",
    "delta_b",
    "paths_score",
    "num_particles",
    "lambda",
    "potential",
    "resample_interval",
    "resample_start",
    "resample_end",
    "adaptive_resampling",
    "ess_threshold",
    "eta",
];

/// The keys only search over paths reads.
const PATHS_KEYS: [&str; 6] = [
    "num_paths",
    "paths_width",
    "search_start_sigma",
    "delta_f",
    "delta_b",
    "paths_score",
];

/// The keys only particle search reads.
const PARTICLE_KEYS: [&str; 9] = [
    "num_particles",
    "lambda",
    "potential",
    "resample_interval",
    "resample_start",
    "resample_end",
    "adaptive_resampling",
    "ess_threshold",
    "eta",
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

/// `pipeline_call_args`: forwarded to the pipeline call. Absent values take the model's defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PipelineCallArgs {
    /// Image height in pixels; a multiple of the model's factor (8, or 16 for Flux).
    pub height: Option<usize>,
    /// Image width in pixels; a multiple of the model's factor.
    pub width: Option<usize>,
    /// Denoising steps (>= 1).
    pub num_inference_steps: Option<usize>,
    /// Classifier-free guidance scale (Flux: the guidance embedding).
    pub guidance_scale: Option<f64>,
    /// Negative prompt for classifier-free guidance.
    pub negative_prompt: Option<String>,
    /// Text encoder token budget (T5-based models).
    pub max_sequence_length: Option<usize>,
    /// PixArt caption cleaning.
    pub clean_caption: Option<bool>,
}

/// How candidates are proposed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SearchMethod {
    /// Round r draws 2^r fresh noises.
    Random,
    /// A base noise and `num_neighbors` neighbours at cosine similarity `threshold` from it.
    ZeroOrder {
        /// Cosine similarity between the base and each neighbour, in (0, 1).
        threshold: f64,
        /// Neighbours per round (>= 1).
        num_neighbors: usize,
    },
    /// The paper's search over paths: branch the surviving paths by re-noising, denoise back,
    /// keep the best.
    Paths(PathsArgs),
    /// Feynman-Kac steering: particles denoised with a stochastic sampler, resampled by
    /// verifier potentials.
    Particles(ParticleArgs),
}

impl SearchMethod {
    /// The name used in configs: `random`, `zero-order`, `paths` or `particles`.
    pub fn name(&self) -> &'static str {
        match self {
            SearchMethod::Random => "random",
            SearchMethod::ZeroOrder { .. } => "zero-order",
            SearchMethod::Paths(_) => "paths",
            SearchMethod::Particles(_) => "particles",
        }
    }
}

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

/// The potential of Feynman-Kac steering (`potential`), from the verifier's rewards `r` of a
/// particle's clean-sample predictions and the temperature `lambda`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Potential {
    /// `max`: `exp(lambda · max of the rewards so far)` (the default).
    Max,
    /// `add`: `exp(lambda · sum of the rewards so far)`.
    Add,
    /// `diff`: `exp(lambda · (r_t - r_previous))`.
    Diff,
}

/// The parameters of particle search (Feynman-Kac steering).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParticleArgs {
    /// `num_particles`: particles denoised in lockstep (K, default 4).
    pub num_particles: usize,
    /// `lambda`: the potentials' inverse temperature (default 10).
    pub lambda: f64,
    /// `potential`: how rewards make potentials (default `max`).
    pub potential: Potential,
    /// `resample_interval`: steps between potential evaluations (default 5).
    pub resample_interval: usize,
    /// `resample_start`: first step (0-based) potentials are evaluated at (default: the
    /// interval).
    pub resample_start: Option<usize>,
    /// `resample_end`: last step potentials may be evaluated at before the final one
    /// (default: the last step); the final step always is.
    pub resample_end: Option<usize>,
    /// `adaptive_resampling`: resample only when the effective sample size falls below
    /// `ess_threshold · K` (default true); false resamples at every potential.
    pub adaptive: bool,
    /// `ess_threshold`: the fraction of K (default 0.5).
    pub ess_threshold: f64,
    /// `eta`: the sampler's stochasticity (default 1: DDPM / ancestral steps).
    pub eta: f64,
}

/// `search_args`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SearchArgs {
    /// The search strategy.
    pub method: SearchMethod,
    /// Number of rounds (>= 1).
    pub rounds: usize,
    /// `budget`: the most compute a prompt's search may spend; `None`: all rounds.
    pub budget: Option<SearchBudget>,
}

/// `search_args.budget`: a prompt's search stops before a round that would exceed it (a
/// seconds budget: before a round that starts after it) and keeps the best so far.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SearchBudget {
    /// Denoiser evaluations (NFEs: two a step under classifier-free guidance).
    Nfe(u64),
    /// Wall-clock seconds of the prompt's search.
    Seconds(f64),
    /// Verifier calls (gradings).
    VerifierCalls(u64),
}

/// Which PyTorch CPU kernel the initial noise reproduces (`noise_kernel`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NoiseKernel {
    /// The vectorized (AVX2/AVX-512) kernel most x86 users of diffusers get.
    #[default]
    Vectorized,
    /// The portable kernel (`ATEN_CPU_CAPABILITY=default`, non-x86 CPUs).
    Portable,
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
    pub pipeline_call_args: PipelineCallArgs,
    /// `verifier_args`.
    pub verifier_args: VerifierArgs,
    /// `search_args`.
    pub search_args: SearchArgs,
    /// `noise_kernel` (default: vectorized).
    pub noise_kernel: NoiseKernel,
    /// The file's JSON object as written, for the run's `config.json`.
    pub raw: Map<String, Value>,
    /// Non-fatal findings (unknown keys, ignored keys), one sentence each.
    pub warnings: Vec<String>,
}

/// The output folder name the original tool uses for a known model id, if any.
pub fn known_model_short_name(model: &str) -> Option<&'static str> {
    KNOWN_MODELS
        .iter()
        .find(|(id, _, _)| *id == model)
        .map(|(_, short, _)| *short)
}

/// The factor height and width must be multiples of: 16 for Flux, the VAE's downscale factor
/// otherwise (read from a local folder's `vae/config.json` when there is one; 8 by default).
pub fn model_size_factor(model: &str) -> usize {
    if let Some((_, _, f)) = KNOWN_MODELS.iter().find(|(id, _, _)| *id == model) {
        return *f;
    }
    let dir = std::path::Path::new(model);
    if dir.is_dir() {
        let class = std::fs::read_to_string(dir.join("model_index.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| {
                v.get("_class_name")
                    .and_then(Value::as_str)
                    .map(String::from)
            });
        let vae_factor = std::fs::read_to_string(dir.join("vae").join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| {
                v.get("block_out_channels")
                    .and_then(Value::as_array)
                    .map(Vec::len)
            })
            .map(|n| 1usize << n.saturating_sub(1))
            .unwrap_or(8);
        if class.as_deref().is_some_and(|c| c.starts_with("Flux")) {
            return vae_factor * 2;
        }
        return vae_factor;
    }
    if model.to_ascii_lowercase().contains("flux") {
        16
    } else {
        8
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The known key closest to `key`, when it is close enough to be a likely typo.
fn suggest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 3.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Reads the config fields of one JSON object, recording the JSON path of each.
struct Reader<'a> {
    path: &'a std::path::Path,
    warnings: &'a mut Vec<String>,
}

impl Reader<'_> {
    fn invalid(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    fn object<'v>(
        &self,
        obj: &'v Map<String, Value>,
        key: &str,
        prefix: &str,
    ) -> Result<&'v Map<String, Value>, ConfigError> {
        let jp = join(prefix, key);
        match obj.get(key) {
            None => Err(self.invalid(&jp, "is missing; it must be a JSON object")),
            Some(Value::Object(m)) => Ok(m),
            Some(other) => Err(self.invalid(
                &jp,
                format!("must be a JSON object, not {}", type_name(other)),
            )),
        }
    }

    fn check_keys(&mut self, obj: &Map<String, Value>, prefix: &str, known: &[&str]) {
        for key in obj.keys() {
            if known.contains(&key.as_str()) {
                continue;
            }
            let jp = join(prefix, key);
            let msg = match suggest(key, known) {
                Some(s) => format!(
                    "{}: unknown key `{jp}` is ignored; did you mean `{}`?",
                    self.path.display(),
                    join(prefix, s)
                ),
                None => format!(
                    "{}: unknown key `{jp}` is ignored (known keys: {})",
                    self.path.display(),
                    known.join(", ")
                ),
            };
            self.warnings.push(msg);
        }
    }

    fn string(
        &self,
        obj: &Map<String, Value>,
        key: &str,
        prefix: &str,
    ) -> Result<Option<String>, ConfigError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.invalid(
                &join(prefix, key),
                format!("must be a string, not {}", type_name(other)),
            )),
        }
    }

    fn required_string(
        &self,
        obj: &Map<String, Value>,
        key: &str,
        prefix: &str,
        allowed: &str,
    ) -> Result<String, ConfigError> {
        self.string(obj, key, prefix)?
            .ok_or_else(|| self.invalid(&join(prefix, key), format!("is missing; {allowed}")))
    }

    fn uint(
        &self,
        obj: &Map<String, Value>,
        key: &str,
        prefix: &str,
        min: u64,
    ) -> Result<Option<u64>, ConfigError> {
        let jp = join(prefix, key);
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => {
                let v = n.as_u64().or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9.0e15)
                        .map(|f| f as u64)
                });
                match v {
                    Some(v) if v >= min => Ok(Some(v)),
                    _ => {
                        Err(self.invalid(&jp, format!("must be a whole number >= {min}, not {n}")))
                    }
                }
            }
            Some(other) => Err(self.invalid(
                &jp,
                format!("must be a whole number >= {min}, not {}", type_name(other)),
            )),
        }
    }

    /// A whole number in `min..=max`; an error naming the key and the range otherwise.
    fn uint_in(
        &self,
        obj: &Map<String, Value>,
        key: &str,
        prefix: &str,
        min: u64,
        max: u64,
    ) -> Result<Option<u64>, ConfigError> {
        match self.uint(obj, key, prefix, min)? {
            Some(v) if v > max => Err(self.invalid(
                &join(prefix, key),
                format!("is {v}; it must be from {min} to {max}"),
            )),
            v => Ok(v),
        }
    }

    /// A finite number in `min..=max` (`min` excluded when `open_min`).
    fn number_in(
        &self,
        obj: &Map<String, Value>,
        key: &str,
        prefix: &str,
        (min, open_min): (f64, bool),
        max: f64,
    ) -> Result<Option<f64>, ConfigError> {
        match self.number(obj, key, prefix)? {
            Some(v) if v > max || v < min || (open_min && v == min) => {
                let low = if open_min { ">" } else { ">=" };
                Err(self.invalid(
                    &join(prefix, key),
                    format!("is {v}; it must be {low} {min} and <= {max}"),
                ))
            }
            v => Ok(v),
        }
    }

    fn number(
        &self,
        obj: &Map<String, Value>,
        key: &str,
        prefix: &str,
    ) -> Result<Option<f64>, ConfigError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or_else(|| self.invalid(&join(prefix, key), "must be a finite number")),
            Some(other) => Err(self.invalid(
                &join(prefix, key),
                format!("must be a number, not {}", type_name(other)),
            )),
        }
    }

    fn boolean(
        &self,
        obj: &Map<String, Value>,
        key: &str,
        prefix: &str,
    ) -> Result<Option<bool>, ConfigError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.invalid(
                &join(prefix, key),
                format!("must be true or false, not {}", type_name(other)),
            )),
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn to_usize(v: Option<u64>) -> Option<usize> {
    v.and_then(|v| usize::try_from(v).ok())
}

/// `verifier_args` (or a member of its `ensemble` / `also_score` lists, `nested`) at JSON path
/// `v`, validated; `optional_metric`: `choice_of_metric` may be left out (it then is the
/// verifier's first metric).
fn verifier_args_at(
    r: &mut Reader<'_>,
    va: &Map<String, Value>,
    v: &str,
    path: &std::path::Path,
    nested: bool,
    optional_metric: bool,
) -> Result<VerifierArgs, ConfigError> {
    r.check_keys(va, v, &VERIFIER_KEYS);
    let names: Vec<&str> = VERIFIER_NAMES
        .iter()
        .copied()
        .filter(|n| !nested || *n != "ensemble")
        .collect();
    let allowed_names = format!("allowed: {}", names.join(", "));
    let name = r.required_string(va, "name", v, &allowed_names)?;
    if !names.contains(&name.as_str()) {
        return Err(r.invalid(&join(v, "name"), format!("is \"{name}\"; {allowed_names}")));
    }
    let allowed = verifier_metrics(&name);
    let metrics = allowed.join(", ");
    let metric = match (optional_metric, r.string(va, "choice_of_metric", v)?) {
        (_, Some(m)) => m,
        (true, None) => allowed.first().copied().unwrap_or_default().to_string(),
        (false, None) => {
            r.required_string(va, "choice_of_metric", v, &format!("allowed: {metrics}"))?
        }
    };
    if !allowed.contains(&metric.as_str()) {
        return Err(r.invalid(
            &join(v, "choice_of_metric"),
            format!("is \"{metric}\"; the {name} verifier grades: {metrics}"),
        ));
    }
    let mut verifier_args = VerifierArgs::new(&name, &metric);
    verifier_args.max_new_tokens = r
        .uint_in(va, "max_new_tokens", v, 1, 32_768)?
        .map(|t| u32::try_from(t).unwrap_or(u32::MAX));
    verifier_args.model_name = r.string(va, "model_name", v)?;
    verifier_args.aesthetic_model = r.string(va, "aesthetic_model", v)?;
    verifier_args.processor_model = r.string(va, "processor_model", v)?;
    if let Some(m) = &verifier_args.model_name {
        if m.trim().is_empty() {
            return Err(r.invalid(
                &join(v, "model_name"),
                "is empty; leave it out to use the verifier's default model",
            ));
        }
    }
    verifier_args.prompt_path = r.string(va, "prompt_path", v)?.map(PathBuf::from);
    if let Some(pp) = verifier_args.prompt_path.clone() {
        // Relative: the current folder first, then the config's folder.
        let beside = beside_config(path, &pp.display().to_string());
        if !pp.is_file() {
            match beside.as_ref().filter(|b| b.is_file()) {
                Some(b) => verifier_args.prompt_path = Some(b.clone()),
                None => {
                    let looked = match &beside {
                        Some(b) => format!(
                            "looked for {} (from the current folder) and {} (beside the config)",
                            pp.display(),
                            b.display()
                        ),
                        None => format!("looked for {}", pp.display()),
                    };
                    return Err(r.invalid(
                        &join(v, "prompt_path"),
                        format!("is not a readable file ({looked}); give the path of a text file holding the grading rubric"),
                    ));
                }
            }
        }
    }
    verifier_args.base_url = r.string(va, "base_url", v)?;
    if let Some(u) = &verifier_args.base_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            return Err(r.invalid(
                &join(v, "base_url"),
                format!("is \"{u}\"; it must start with http:// or https://"),
            ));
        }
    }
    verifier_args.seed = r.uint(va, "seed", v, 0)?;
    if let Some(c) = to_usize(r.uint(va, "concurrency", v, 1)?) {
        if c > 256 {
            return Err(r.invalid(&join(v, "concurrency"), format!("is {c}; at most 256")));
        }
        verifier_args.concurrency = c;
    }
    if let Some(a) = r.uint_in(va, "max_attempts", v, 1, 100)? {
        verifier_args.max_attempts = a as u32;
    }
    if let Some(a) = r.uint_in(va, "max_invalid_replies", v, 0, 20)? {
        verifier_args.max_invalid_replies = a as u32;
    }
    if let Some(t) = r.number_in(va, "timeout_s", v, (0.0, true), 3600.0)? {
        verifier_args.timeout_s = t;
    }
    verifier_args.device = r.string(va, "device", v)?;
    if let Some(d) = &verifier_args.device {
        if parse_device(d).is_none() {
            return Err(r.invalid(
                &join(v, "device"),
                format!("is \"{d}\"; allowed: cpu, cuda, cuda:N"),
            ));
        }
    }
    r.boolean(va, "use_low_gpu_vram", v)?;
    if name == "ensemble" {
        verifier_args.ensemble = verifier_list(r, va, v, "ensemble", path, true)?;
        if verifier_args.ensemble.len() < 2 {
            return Err(r.invalid(
                &join(v, "ensemble"),
                "needs at least 2 members, each a verifier_args object ({\"name\": ..., \"choice_of_metric\": ...})",
            ));
        }
    } else if va.contains_key("ensemble") {
        return Err(r.invalid(
            &join(v, "ensemble"),
            format!("is only for verifier_args.name \"ensemble\", not \"{name}\""),
        ));
    }
    if va.contains_key("also_score") {
        if nested {
            return Err(r.invalid(
                &join(v, "also_score"),
                "belongs in the top-level verifier_args only",
            ));
        }
        verifier_args.also_score = verifier_list(r, va, v, "also_score", path, false)?;
    }
    verifier_args.also_score_best_only = r.boolean(va, "also_score_best_only", v)?.unwrap_or(false);
    Ok(verifier_args)
}

/// The verifier list `key` of `va` (`ensemble` or `also_score`): an array of `verifier_args`
/// objects, each validated at its JSON path (`verifier_args.ensemble[1].name`...).
fn verifier_list(
    r: &mut Reader<'_>,
    va: &Map<String, Value>,
    v: &str,
    key: &str,
    path: &std::path::Path,
    ensemble: bool,
) -> Result<Vec<VerifierArgs>, ConfigError> {
    let jp = join(v, key);
    let Some(Value::Array(items)) = va.get(key) else {
        return Err(r.invalid(
            &jp,
            "must be an array of verifier_args objects ([{\"name\": ...}, ...])",
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("{jp}[{i}]");
        let Value::Object(obj) = item else {
            return Err(r.invalid(
                &at,
                format!("must be a verifier_args object, not {}", type_name(item)),
            ));
        };
        out.push(verifier_args_at(r, obj, &at, path, true, !ensemble)?);
    }
    Ok(out)
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
                problem: format!("must be a JSON object, not {}", type_name(&value)),
            });
        };
        let mut warnings = Vec::new();
        let mut r = Reader {
            path,
            warnings: &mut warnings,
        };
        let mut top_known: Vec<&str> = TOP_KEYS.to_vec();
        top_known.extend(RUN_RECORD_KEYS);
        r.check_keys(&root, "", &top_known);

        let model = r.required_string(
            &root,
            "pretrained_model_name_or_path",
            "",
            "give a Hugging Face repo id (owner/name) or a local folder in diffusers layout",
        )?;
        if model.trim().is_empty() {
            return Err(r.invalid(
                "pretrained_model_name_or_path",
                "is empty; give a Hugging Face repo id (owner/name) or a local folder in diffusers layout",
            ));
        }
        // A relative folder is looked for in the current folder, then beside the config.
        let model = match beside_config(path, &model) {
            Some(p) if !std::path::Path::new(&model).is_dir() && p.is_dir() => {
                p.display().to_string()
            }
            _ => model,
        };
        let dtype_s = r.required_string(&root, "torch_dtype", "", "one of fp32, fp16, bf16")?;
        let dtype = match dtype_s.as_str() {
            "fp32" => Dtype::F32,
            "fp16" => Dtype::F16,
            "bf16" => Dtype::Bf16,
            other => {
                return Err(r.invalid(
                    "torch_dtype",
                    format!("is \"{other}\"; allowed: fp32, fp16, bf16"),
                ))
            }
        };
        let noise_kernel = match r.string(&root, "noise_kernel", "")?.as_deref() {
            None | Some("vectorized") => NoiseKernel::Vectorized,
            Some("portable") => NoiseKernel::Portable,
            Some(other) => {
                return Err(r.invalid(
                    "noise_kernel",
                    format!("is \"{other}\"; allowed: vectorized (default), portable"),
                ))
            }
        };

        // pipeline_call_args
        let pca = r.object(&root, "pipeline_call_args", "")?;
        r.check_keys(pca, "pipeline_call_args", &PIPELINE_KEYS);
        let p = "pipeline_call_args";
        let factor = model_size_factor(&model);
        let mut dims = [None, None];
        for (slot, key) in dims.iter_mut().zip(["height", "width"]) {
            let v = to_usize(r.uint(pca, key, p, 1)?);
            if let Some(v) = v {
                if v % factor != 0 {
                    return Err(r.invalid(
                        &join(p, key),
                        format!(
                            "is {v}; it must be a multiple of {factor} for {model} (e.g. {})",
                            (v / factor).max(1) * factor
                        ),
                    ));
                }
                if v > 8192 {
                    return Err(r.invalid(&join(p, key), format!("is {v}; at most 8192")));
                }
            }
            *slot = v;
        }
        let call_args = PipelineCallArgs {
            height: dims[0],
            width: dims[1],
            num_inference_steps: to_usize(r.uint_in(
                pca,
                "num_inference_steps",
                p,
                1,
                MAX_INFERENCE_STEPS,
            )?),
            guidance_scale: r.number_in(pca, "guidance_scale", p, (-1000.0, false), 1000.0)?,
            negative_prompt: r.string(pca, "negative_prompt", p)?,
            max_sequence_length: to_usize(r.uint_in(pca, "max_sequence_length", p, 1, 4096)?),
            clean_caption: r.boolean(pca, "clean_caption", p)?,
        };

        // verifier_args
        let va = r.object(&root, "verifier_args", "")?;
        let verifier_args = verifier_args_at(&mut r, va, "verifier_args", path, false, false)?;

        // search_args
        let sa = r.object(&root, "search_args", "")?;
        r.check_keys(sa, "search_args", &SEARCH_KEYS);
        let s = "search_args";
        let method_name = r
            .string(sa, "search_method", s)?
            .unwrap_or_else(|| "random".to_string());
        let rounds_given = to_usize(r.uint(sa, "search_rounds", s, 1)?);
        if rounds_given.is_some_and(|n| n > 20) {
            return Err(r.invalid(
                "search_args.search_rounds",
                format!(
                    "is {}; at most 20 (random search draws 2^round noises per round)",
                    rounds_given.unwrap_or(0)
                ),
            ));
        }
        let stepwise = matches!(method_name.as_str(), "paths" | "particles");
        let rounds = match rounds_given {
            Some(n) => n,
            None if stepwise => 0,
            None => {
                return Err(r.invalid(
                    "search_args.search_rounds",
                    "is missing; give the number of search rounds (>= 1)",
                ))
            }
        };
        let ignored = |r: &mut Reader, keys: &[&str], by: &str| {
            for k in keys {
                if sa.contains_key(*k) {
                    r.warnings.push(format!(
                        "{}: `search_args.{k}` is ignored by {by}",
                        path.display()
                    ));
                }
            }
        };
        if stepwise && rounds_given.is_some() {
            ignored(
                &mut r,
                &["search_rounds"],
                "this strategy (its stages follow the schedule)",
            );
        }
        let method = match method_name.as_str() {
            "random" => {
                ignored(&mut r, &["threshold", "num_neighbors"], "random search");
                ignored(&mut r, &PATHS_KEYS, "random search");
                ignored(&mut r, &PARTICLE_KEYS, "random search");
                SearchMethod::Random
            }
            "zero-order" => {
                ignored(&mut r, &PATHS_KEYS, "zero-order search");
                ignored(&mut r, &PARTICLE_KEYS, "zero-order search");
                let threshold = r.number(sa, "threshold", s)?.ok_or_else(|| {
                    r.invalid(
                        "search_args.threshold",
                        "is missing; zero-order search needs the cosine similarity between the base noise and its neighbours, in (0, 1), e.g. 0.95",
                    )
                })?;
                if !(threshold > 0.0 && threshold < 1.0) {
                    return Err(r.invalid(
                        "search_args.threshold",
                        format!("is {threshold}; it must be in (0, 1), e.g. 0.95"),
                    ));
                }
                let num_neighbors = to_usize(r.uint(sa, "num_neighbors", s, 1)?).ok_or_else(|| {
                    r.invalid(
                        "search_args.num_neighbors",
                        "is missing; zero-order search needs the number of neighbours per round (>= 1)",
                    )
                })?;
                if num_neighbors > 4096 {
                    return Err(r.invalid(
                        "search_args.num_neighbors",
                        format!("is {num_neighbors}; at most 4096"),
                    ));
                }
                SearchMethod::ZeroOrder {
                    threshold,
                    num_neighbors,
                }
            }
            "paths" => {
                ignored(&mut r, &["threshold", "num_neighbors"], "search over paths");
                ignored(&mut r, &PARTICLE_KEYS, "search over paths");
                let count = |r: &Reader, key: &str, default: usize| -> Result<usize, ConfigError> {
                    Ok(to_usize(r.uint_in(sa, key, s, 1, 1024)?).unwrap_or(default))
                };
                let level = |r: &Reader, key: &str, default: f64| -> Result<f64, ConfigError> {
                    Ok(r.number_in(sa, key, s, (0.0, true), 1.0)?
                        .unwrap_or(default))
                };
                let args = PathsArgs {
                    num_paths: count(&r, "num_paths", 2)?,
                    paths_width: count(&r, "paths_width", 2)?,
                    search_start_sigma: level(&r, "search_start_sigma", 0.11)?,
                    delta_f: level(&r, "delta_f", 0.78)?,
                    delta_b: level(&r, "delta_b", 0.81)?,
                    score: match r.string(sa, "paths_score", s)?.as_deref() {
                        None | Some("x0") => PathScore::X0,
                        Some("final") => PathScore::Final,
                        Some(other) => {
                            return Err(r.invalid(
                                "search_args.paths_score",
                                format!("is \"{other}\"; allowed: x0, final"),
                            ))
                        }
                    },
                };
                if args.delta_b <= args.delta_f {
                    return Err(r.invalid(
                        "search_args.delta_b",
                        format!(
                            "is {}; it must be more than delta_f ({}), or the paths never reach \
                             the end of the schedule (the paper uses 0.81 and 0.78)",
                            args.delta_b, args.delta_f
                        ),
                    ));
                }
                SearchMethod::Paths(args)
            }
            "particles" => {
                ignored(&mut r, &["threshold", "num_neighbors"], "particle search");
                ignored(&mut r, &PATHS_KEYS, "particle search");
                let step = |r: &Reader, key: &str| -> Result<Option<usize>, ConfigError> {
                    Ok(to_usize(r.uint_in(sa, key, s, 0, 100_000)?))
                };
                let interval = to_usize(r.uint_in(sa, "resample_interval", s, 1, 100_000)?);
                let args = ParticleArgs {
                    num_particles: to_usize(r.uint_in(sa, "num_particles", s, 1, 1024)?)
                        .unwrap_or(4),
                    lambda: r
                        .number_in(sa, "lambda", s, (0.0, false), 1e6)?
                        .unwrap_or(10.0),
                    potential: match r.string(sa, "potential", s)?.as_deref() {
                        None | Some("max") => Potential::Max,
                        Some("add") => Potential::Add,
                        Some("diff") => Potential::Diff,
                        Some(other) => {
                            return Err(r.invalid(
                                "search_args.potential",
                                format!("is \"{other}\"; allowed: max, add, diff"),
                            ))
                        }
                    },
                    resample_interval: interval.unwrap_or(5),
                    resample_start: step(&r, "resample_start")?,
                    resample_end: step(&r, "resample_end")?,
                    adaptive: r.boolean(sa, "adaptive_resampling", s)?.unwrap_or(true),
                    ess_threshold: r
                        .number_in(sa, "ess_threshold", s, (0.0, true), 1.0)?
                        .unwrap_or(0.5),
                    eta: r.number_in(sa, "eta", s, (0.0, true), 1.0)?.unwrap_or(1.0),
                };
                if let (Some(a), Some(b)) = (args.resample_start, args.resample_end) {
                    if b < a {
                        return Err(r.invalid(
                            "search_args.resample_end",
                            format!("is {b}; it must not be before resample_start ({a})"),
                        ));
                    }
                }
                SearchMethod::Particles(args)
            }
            other => {
                return Err(r.invalid(
                    "search_args.search_method",
                    format!("is \"{other}\"; allowed: random, zero-order, paths, particles"),
                ))
            }
        };
        let budget = match sa.get("budget") {
            None | Some(Value::Null) => None,
            Some(Value::Object(b)) => {
                let bp = "search_args.budget";
                r.check_keys(b, bp, &["nfe", "seconds", "verifier_calls"]);
                let given: Vec<&str> = ["nfe", "seconds", "verifier_calls"]
                    .into_iter()
                    .filter(|k| b.contains_key(*k))
                    .collect();
                if given.len() != 1 {
                    return Err(r.invalid(
                        bp,
                        "must give exactly one of nfe, seconds, verifier_calls (e.g. {\"nfe\": 2880})",
                    ));
                }
                Some(match given[0] {
                    "nfe" => SearchBudget::Nfe(r.uint(b, "nfe", bp, 1)?.unwrap_or(1)),
                    "verifier_calls" => SearchBudget::VerifierCalls(
                        r.uint(b, "verifier_calls", bp, 1)?.unwrap_or(1),
                    ),
                    _ => SearchBudget::Seconds(
                        r.number_in(b, "seconds", bp, (0.0, true), 1e9)?
                            .unwrap_or(1.0),
                    ),
                })
            }
            Some(other) => {
                return Err(r.invalid(
                    "search_args.budget",
                    format!(
                        "must be a JSON object such as {{\"nfe\": 2880}}, not {}",
                        type_name(other)
                    ),
                ))
            }
        };
        if let Some(ea) = root.get("export_args") {
            if !ea.is_object() {
                return Err(r.invalid(
                    "export_args",
                    format!("must be a JSON object, not {}", type_name(ea)),
                ));
            }
            r.warnings.push(format!(
                "{}: `export_args` only applies to video models and is ignored",
                path.display()
            ));
        }
        Ok(Config {
            path: path.to_path_buf(),
            model,
            dtype,
            pipeline_call_args: call_args,
            verifier_args,
            search_args: SearchArgs {
                method,
                rounds,
                budget,
            },
            noise_kernel,
            raw: root,
            warnings,
        })
    }
}
