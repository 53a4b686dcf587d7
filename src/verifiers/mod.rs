//! Verifiers: judges that grade (prompt, media) pairs. One file per verifier, registered by one
//! line of `verifiers!` below ([`registry`]: names, metrics, media, builders).
//!
//! Two traits: [`ImageVerifier`] grades images (every judge here); [`Verifier`] grades media,
//! as the search asks. A judge that grades only images grades a video on sampled frames
//! ([`frames::FrameSampled`]); the ensemble and `also_score` combine media verifiers.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::media::Media;

pub mod args;
pub mod constrained;
pub mod frames;
pub mod http;
pub mod registry;

pub use args::VerifierArgs;
pub use gemini::GeminiVerifier;
pub use http::RetryPolicy;
pub use openai::OpenAiVerifier;
pub use qwen::QwenVerifier;
pub use registry::{BuildContext, VerifierSpec};

/// Declares each verifier's module and registers the verifiers it holds as [`VerifierKind`]
/// variants, each with its [`VerifierSpec`]: one line a module. A line may start with
/// `#[cfg(...)]`.
macro_rules! verifiers {
    (@norm [$($done:tt)*] #[cfg($c:meta)] $vis:vis mod $m:ident => $($k:ident($s:ident)),+ ; $($rest:tt)*) => {
        verifiers!(@norm [$($done)* [$c] $vis mod $m => $($k($s)),+ ;] $($rest)*);
    };
    (@norm [$($done:tt)*] $vis:vis mod $m:ident => $($k:ident($s:ident)),+ ; $($rest:tt)*) => {
        verifiers!(@norm [$($done)* [all()] $vis mod $m => $($k($s)),+ ;] $($rest)*);
    };
    (@norm [$( [$c:meta] $vis:vis mod $m:ident => $($k:ident($s:ident)),+ ; )*]) => {
        $( #[cfg($c)] $vis mod $m; )*

        /// Every verifier: the values of `verifier_args.name` ([`VerifierKind::name`]).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum VerifierKind {
            $( $(
                #[cfg($c)]
                #[doc = concat!("Described by `", stringify!($m), "::", stringify!($s), "`.")]
                $k,
            )+ )*
        }

        impl VerifierKind {
            /// Every verifier, in the order they were registered.
            pub const ALL: &'static [VerifierKind] = &[ $( $( #[cfg($c)] VerifierKind::$k, )+ )* ];

            /// What it is: name, metrics, media, builder.
            pub fn spec(self) -> &'static VerifierSpec {
                match self {
                    $( $( #[cfg($c)] VerifierKind::$k => &$m::$s, )+ )*
                }
            }
        }
    };
    ($($t:tt)*) => { verifiers!(@norm [] $($t)*); };
}

verifiers! {
    pub mod gemini => Gemini(SPEC);
    pub mod openai => OpenAi(SPEC);
    pub mod qwen => Qwen(SPEC);
    pub mod clip => LaionAesthetic(LAION_AESTHETIC), ClipScore(CLIP_SCORE), PickScore(PICKSCORE), Hpsv2(HPSV2);
    pub mod image_reward => ImageReward(SPEC);
    pub mod ensemble => Ensemble(SPEC);
    #[cfg(test)] mod fake => Fake(SPEC);
}

impl VerifierKind {
    /// Whether it is the `ensemble`, whose members are verifiers of their own.
    pub fn is_ensemble(self) -> bool {
        self == VerifierKind::Ensemble
    }
}

/// The grading rubric's metrics: what the vision-language judges grade.
pub const METRICS: [&str; 6] = [
    "accuracy_to_prompt",
    "creativity_and_originality",
    "visual_quality_and_realism",
    "consistency_and_cohesion",
    "emotional_or_thematic_resonance",
    "overall_score",
];

/// One graded aspect: the judge's reasoning, then its score (0 to 10).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Why the score was given (written before the score, as the schema asks).
    pub explanation: String,
    /// The score, 0 to 10.
    pub score: f64,
}

/// A full grading: one [`Score`] per metric name.
pub type Grading = BTreeMap<String, Score>;

/// Why a candidate could not be graded (after all retries).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (after {attempts} attempt(s))")]
pub struct ScoreFailure {
    /// What went wrong on the last attempt (never contains an API key).
    pub message: String,
    /// How many requests were made.
    pub attempts: u32,
    /// Whether no further request can succeed either: the API rejected the key (401, 403),
    /// does not know the model (404), refuses the request's form (400) or the quota is used up
    /// (429 with a quota body). The run stops instead of grading more images.
    pub fatal: bool,
}

/// One image to grade.
#[derive(Clone, Copy)]
pub struct ImageInput<'a> {
    /// The generation prompt.
    pub prompt: &'a str,
    /// The generated image.
    pub image: &'a RgbImage,
}

/// A judge that grades images against their prompts.
pub trait ImageVerifier: Send + Sync {
    /// The verifier's name as in `verifier_args.name`.
    fn name(&self) -> &str;
    /// Grades every input; the result at index `i` belongs to `inputs[i]`, whatever order the
    /// requests complete in.
    fn score(&self, inputs: &[ImageInput<'_>]) -> Vec<Result<Grading, ScoreFailure>>;
    /// [`ImageVerifier::score`] with the API tokens each input's grading cost (its retries and
    /// re-asks included); local verifiers cost none.
    fn score_with_usage(&self, inputs: &[ImageInput<'_>]) -> Vec<(Graded, TokenUsage)> {
        self.score(inputs)
            .into_iter()
            .map(|g| (g, TokenUsage::default()))
            .collect()
    }
    /// Requests made so far (including retries) and requests that failed.
    fn call_stats(&self) -> CallStats {
        CallStats::default()
    }
    /// Checks, before any image is made, that grading can work at all (an API accepts the
    /// key); a fatal failure says why. Local verifiers have nothing to check.
    fn check_access(&self) -> Result<(), ScoreFailure> {
        Ok(())
    }
}

/// One candidate to grade: its prompt and media.
#[derive(Clone, Copy)]
pub struct VerifierInput<'a> {
    /// The generation prompt.
    pub prompt: &'a str,
    /// The generated image or video.
    pub media: &'a Media,
}

/// A judge of media, as the search asks: what [`registry::build_one`] builds.
pub trait Verifier: Send + Sync {
    /// The verifier's name as in `verifier_args.name`.
    fn name(&self) -> &str;
    /// Grades every input; the result at index `i` belongs to `inputs[i]`.
    fn score(&self, inputs: &[VerifierInput<'_>]) -> Vec<Result<Grading, ScoreFailure>>;
    /// [`Verifier::score`] with the API tokens each input's grading cost.
    fn score_with_usage(&self, inputs: &[VerifierInput<'_>]) -> Vec<(Graded, TokenUsage)> {
        self.score(inputs)
            .into_iter()
            .map(|g| (g, TokenUsage::default()))
            .collect()
    }
    /// Requests made so far (including retries) and requests that failed.
    fn call_stats(&self) -> CallStats {
        CallStats::default()
    }
    /// Checks, before any media is made, that grading can work at all.
    fn check_access(&self) -> Result<(), ScoreFailure> {
        Ok(())
    }
}

/// A grading or why there is none.
pub type Graded = Result<Grading, ScoreFailure>;

/// API tokens spent, as the API reported them for its replies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TokenUsage {
    /// Input (prompt and image) tokens.
    pub input_tokens: u64,
    /// Output tokens (Gemini: candidates and thoughts).
    pub output_tokens: u64,
}

impl std::ops::AddAssign for TokenUsage {
    fn add_assign(&mut self, other: Self) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
    }
}

impl TokenUsage {
    /// Whether no token was counted.
    pub fn is_zero(&self) -> bool {
        self.input_tokens == 0 && self.output_tokens == 0
    }
}

/// Counters of a verifier's API calls, for the end-of-run summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CallStats {
    /// HTTP requests sent (including retries).
    pub requests: u64,
    /// Requests that did not yield a valid grading.
    pub failed_requests: u64,
    /// Input (prompt and image) tokens the API reported for its replies.
    pub input_tokens: u64,
    /// Output tokens the API reported (Gemini: candidates and thoughts).
    pub output_tokens: u64,
}

/// The built-in grading rubric (system prompt) shared by the vision-language verifiers:
/// the six [`METRICS`], 0 to 10 each, explanation before score.
pub const RUBRIC: &str = include_str!("rubric.txt");

/// Why a verifier could not be set up. Raised by [`build`] before any image is generated.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// The local verifier's model could not be loaded or used.
    #[error(
        "cannot load the local verifier model {model}: {message}; set verifier_args.{key} to \
         {expected} (a Hub repo id or a local path)"
    )]
    LocalModel {
        /// The `verifier_args` key that names it.
        key: &'static str,
        /// What it must be.
        expected: &'static str,
        /// The model id or folder.
        model: String,
        /// What went wrong.
        message: String,
    },
    /// The API key's environment variable is unset or empty.
    #[error("{var} is not set: export your {api} key in {var} before running with verifier \"{verifier}\"{hint}")]
    MissingKey {
        /// The environment variable to set.
        var: &'static str,
        /// Human name of the API.
        api: &'static str,
        /// The verifier name.
        verifier: &'static str,
        /// Extra advice (may be empty).
        hint: &'static str,
    },
    /// `verifier_args.prompt_path` could not be read.
    #[error("cannot read the grading prompt {}: {source}; fix verifier_args.prompt_path", path.display())]
    PromptFile {
        /// The file named by `prompt_path`.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `verifier_args.prompt_path` points to an empty file.
    #[error("the grading prompt {} is empty; write a rubric in it or drop verifier_args.prompt_path", path.display())]
    EmptyPrompt {
        /// The file named by `prompt_path`.
        path: PathBuf,
    },
    /// An argument has a value the API cannot take.
    #[error("verifier_args.{field}: {message}")]
    InvalidArg {
        /// The `verifier_args` key.
        field: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The base URL is not an absolute http(s) URL.
    #[error("base URL \"{url}\" (from {source_name}) is not an http:// or https:// URL; fix it")]
    BaseUrl {
        /// The URL given.
        url: String,
        /// Where it came from (`verifier_args.base_url` or an environment variable).
        source_name: String,
    },
    /// The HTTP client or its runtime could not start.
    #[error("cannot start the HTTP client for verifier \"{verifier}\": {message}")]
    Client {
        /// The verifier name.
        verifier: &'static str,
        /// The underlying error.
        message: String,
    },
}

/// An API key. Its `Debug` output is redacted and it has no `Display`, so it cannot leak into
/// error messages or logs by formatting.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key; `None` when it is empty or only whitespace.
    pub fn new(key: impl Into<String>) -> Option<Self> {
        let key = key.into();
        let key = key.trim();
        (!key.is_empty()).then(|| Self(key.to_string()))
    }

    /// The secret itself, for building a request header.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// Replaces every occurrence of the key in `text` by `[redacted]`.
    pub fn redact(&self, text: &str) -> String {
        text.replace(&self.0, "[redacted]")
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

/// Reads environment variables; [`build`] uses the process environment, tests pass a map.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Builds the verifier `args` describes (an ensemble with its members; without
/// `also_score`), reading keys and base URLs from the process environment. Fails (naming what
/// to fix) on a missing key, an unreadable `prompt_path` or a model that cannot load.
pub fn build(args: &VerifierArgs) -> Result<Box<dyn Verifier>, VerifierError> {
    build_with_env(args, &|var| std::env::var(var).ok())
}

/// [`build`] with an explicit environment (used by tests so they need not mutate the process
/// environment).
pub fn build_with_env(
    args: &VerifierArgs,
    env: EnvLookup<'_>,
) -> Result<Box<dyn Verifier>, VerifierError> {
    registry::build_one(
        args,
        &BuildContext {
            env,
            low_vram: false,
        },
    )
}

/// Like [`build`], for a run: with `low_vram`, a local verifier loads its model only while
/// scoring and frees it afterwards; the `also_score` verifiers grade beside it unless
/// `also_score_best_only`.
pub fn build_for_run(
    args: &VerifierArgs,
    low_vram: bool,
) -> Result<Box<dyn Verifier>, VerifierError> {
    let env = |var: &str| std::env::var(var).ok();
    let ctx = BuildContext {
        env: &env,
        low_vram,
    };
    let main = registry::build_one(args, &ctx)?;
    if args.also_score.is_empty() || args.also_score_best_only {
        return Ok(main);
    }
    let extras = build_also_score(args, low_vram)?;
    Ok(Box::new(ensemble::AlsoScored::new(main, extras)))
}

/// The `also_score` verifiers of `args`, each with its metric prefix
/// ([`ensemble::member_prefixes`]).
pub fn build_also_score(
    args: &VerifierArgs,
    low_vram: bool,
) -> Result<Vec<ensemble::NamedVerifier>, VerifierError> {
    let env = |var: &str| std::env::var(var).ok();
    let ctx = BuildContext {
        env: &env,
        low_vram,
    };
    ensemble::member_prefixes(&args.also_score)
        .into_iter()
        .zip(&args.also_score)
        .map(|(prefix, a)| Ok((prefix, registry::build_one(a, &ctx)?)))
        .collect()
}

/// Opens `verifier_args.device` for a local verifier; unset: the first CUDA device when this
/// build has CUDA and one is present, else the CPU.
pub fn open_device(
    spec: Option<crate::device::DeviceSpec>,
) -> Result<candle_core::Device, VerifierError> {
    crate::device::select_device(spec, "verifier_args.device").map_err(|e| {
        VerifierError::InvalidArg {
            field: "device",
            message: e.0,
        }
    })
}

/// The system prompt: `verifier_args.prompt_path`'s text when set, else [`RUBRIC`]. A file
/// wrapped in `"""` lines (as the original tool's prompt file is) has them removed.
pub fn load_rubric(args: &VerifierArgs) -> Result<String, VerifierError> {
    let Some(path) = &args.prompt_path else {
        return Ok(RUBRIC.trim().to_string());
    };
    // A rubric is a few kilobytes; 1 MiB is generous and keeps a wrong path from eating memory.
    let text = crate::files::read_text_capped(path, 1 << 20).map_err(|source| {
        VerifierError::PromptFile {
            path: path.clone(),
            source,
        }
    })?;
    let mut body = text.trim();
    if body.len() >= 6 && body.starts_with("\"\"\"") && body.ends_with("\"\"\"") {
        body = body[3..body.len() - 3].trim();
    }
    if body.is_empty() {
        return Err(VerifierError::EmptyPrompt { path: path.clone() });
    }
    Ok(body.to_string())
}

/// Why a judge's reply is not a valid grading.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidReply(pub String);

/// Parses and validates a judge's reply text: a JSON object holding every metric of
/// [`METRICS`], each an object with a string `explanation` and a numeric `score` in 0..=10.
/// Extra keys are ignored; a Markdown code fence around the JSON is tolerated.
pub fn parse_grading(text: &str) -> Result<Grading, InvalidReply> {
    let json_text = strip_code_fence(text);
    let value: serde_json::Value = serde_json::from_str(json_text).map_err(|e| {
        InvalidReply(format!(
            "the reply is not valid JSON ({e}): {}",
            preview(text)
        ))
    })?;
    let object = value.as_object().ok_or_else(|| {
        InvalidReply(format!("the reply is not a JSON object: {}", preview(text)))
    })?;
    let mut grading = Grading::new();
    for metric in METRICS {
        let entry = object
            .get(metric)
            .ok_or_else(|| InvalidReply(format!("the reply lacks the metric `{metric}`")))?;
        let explanation = entry
            .get("explanation")
            .and_then(|e| e.as_str())
            .ok_or_else(|| {
                InvalidReply(format!("`{metric}.explanation` is missing or not a string"))
            })?;
        let score = entry
            .get("score")
            .and_then(|s| s.as_f64())
            .ok_or_else(|| InvalidReply(format!("`{metric}.score` is missing or not a number")))?;
        if !(0.0..=10.0).contains(&score) {
            return Err(InvalidReply(format!(
                "`{metric}.score` is {score}, outside 0 to 10"
            )));
        }
        grading.insert(
            metric.to_string(),
            Score {
                explanation: explanation.to_string(),
                score,
            },
        );
    }
    Ok(grading)
}

/// The JSON inside a Markdown code fence (```json ... ```), or the trimmed text itself.
fn strip_code_fence(text: &str) -> &str {
    let trimmed = text.trim();
    if let Some(rest) = trimmed.strip_prefix("```") {
        if let Some(inner) = rest.strip_suffix("```") {
            let inner = inner.strip_prefix("json").unwrap_or(inner);
            return inner.trim();
        }
    }
    trimmed
}

/// The first characters of a reply, for error messages.
pub(crate) fn preview(text: &str) -> String {
    const MAX: usize = 200;
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= MAX {
        format!("\"{flat}\"")
    } else {
        let cut: String = flat.chars().take(MAX).collect();
        format!("\"{cut}…\"")
    }
}

/// Encodes an image as PNG and then base64 (standard alphabet, padded), as both APIs take it.
pub(crate) fn png_base64(image: &RgbImage) -> Result<String, String> {
    use base64::Engine as _;
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| format!("cannot encode the image as PNG: {e}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(png))
}

/// Picks the base URL: `verifier_args.base_url`, else the environment variable, else the
/// default; trailing slashes removed. Returns the URL and whether it is a custom one.
pub(crate) fn resolve_base_url(
    arg: Option<&str>,
    env: EnvLookup<'_>,
    env_var: &str,
    default: &str,
) -> Result<(String, bool), VerifierError> {
    let (url, source_name, custom) = if let Some(url) = arg.filter(|u| !u.trim().is_empty()) {
        (
            url.trim().to_string(),
            "verifier_args.base_url".to_string(),
            true,
        )
    } else if let Some(url) = env(env_var).filter(|u| !u.trim().is_empty()) {
        (url.trim().to_string(), env_var.to_string(), true)
    } else {
        (default.to_string(), "the default".to_string(), false)
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(VerifierError::BaseUrl { url, source_name });
    }
    Ok((url.trim_end_matches('/').to_string(), custom))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(score: serde_json::Value) -> String {
        let mut object = serde_json::Map::new();
        for metric in METRICS {
            object.insert(
                metric.to_string(),
                serde_json::json!({"explanation": "fine", "score": score}),
            );
        }
        serde_json::Value::Object(object).to_string()
    }

    #[test]
    fn parse_grading_accepts_all_six_metrics() {
        let grading = parse_grading(&reply(serde_json::json!(7.5))).unwrap();
        assert_eq!(grading.len(), 6);
        assert_eq!(grading["overall_score"].score, 7.5);
    }

    #[test]
    fn parse_grading_accepts_integer_scores_and_bounds() {
        assert!(parse_grading(&reply(serde_json::json!(0))).is_ok());
        assert!(parse_grading(&reply(serde_json::json!(10))).is_ok());
    }

    #[test]
    fn parse_grading_rejects_scores_outside_zero_to_ten() {
        let err = parse_grading(&reply(serde_json::json!(10.5))).unwrap_err();
        assert!(err.0.contains("outside 0 to 10"), "{err}");
        assert!(parse_grading(&reply(serde_json::json!(-1))).is_err());
    }

    #[test]
    fn parse_grading_rejects_string_scores() {
        assert!(parse_grading(&reply(serde_json::json!("7"))).is_err());
    }

    #[test]
    fn parse_grading_names_the_missing_metric() {
        let text = r#"{"accuracy_to_prompt": {"explanation": "x", "score": 1}}"#;
        let err = parse_grading(text).unwrap_err();
        assert!(err.0.contains("creativity_and_originality"), "{err}");
    }

    #[test]
    fn parse_grading_rejects_text_that_is_not_json() {
        let err = parse_grading("The image is lovely, 9/10").unwrap_err();
        assert!(err.0.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn parse_grading_tolerates_a_markdown_fence() {
        let text = format!("```json\n{}\n```", reply(serde_json::json!(3)));
        assert!(parse_grading(&text).is_ok());
    }

    #[test]
    fn api_key_debug_is_redacted() {
        let key = ApiKey::new("sk-very-secret").unwrap();
        assert!(!format!("{key:?}").contains("very-secret"));
        assert_eq!(key.redact("bad key sk-very-secret!"), "bad key [redacted]!");
    }

    #[test]
    fn empty_api_key_counts_as_missing() {
        assert!(ApiKey::new("  ").is_none());
    }

    #[test]
    fn rubric_names_every_metric() {
        for metric in METRICS {
            assert!(RUBRIC.contains(metric), "rubric lacks {metric}");
        }
    }

    #[test]
    fn prompt_file_wrapped_in_triple_quotes_is_unwrapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompt.txt");
        std::fs::write(&path, "\"\"\"\nGrade it.\n\"\"\"").unwrap();
        let mut args = VerifierArgs::new(VerifierKind::Gemini, "overall_score");
        args.prompt_path = Some(path);
        assert_eq!(load_rubric(&args).unwrap(), "Grade it.");
    }

    #[test]
    fn base_url_prefers_args_then_env_then_default() {
        let env = |_: &str| Some("http://env:1/".to_string());
        let no_env = |_: &str| None;
        assert_eq!(
            resolve_base_url(Some("http://arg:2/"), &env, "X", "https://d").unwrap(),
            ("http://arg:2".to_string(), true)
        );
        assert_eq!(
            resolve_base_url(None, &env, "X", "https://d").unwrap(),
            ("http://env:1".to_string(), true)
        );
        assert_eq!(
            resolve_base_url(None, &no_env, "X", "https://d").unwrap(),
            ("https://d".to_string(), false)
        );
    }

    #[test]
    fn base_url_without_scheme_is_rejected() {
        let no_env = |_: &str| None;
        let err = resolve_base_url(Some("localhost:8000"), &no_env, "X", "https://d").unwrap_err();
        assert!(err.to_string().contains("localhost:8000"), "{err}");
    }
}
