//! The OpenAI verifier: the Chat Completions API (`POST {base}/chat/completions`) with a strict
//! JSON-schema response format, one request per image. Works with OpenAI-compatible servers
//! (e.g. vLLM) through `verifier_args.base_url`.

use reqwest::header::CONTENT_TYPE;
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::http::{Engine, EngineSettings, Protocol, RetryPolicy};
use super::{
    load_rubric, parse_grading, resolve_base_url, ApiKey, CallStats, EnvLookup, Graded, Grading,
    ScoreFailure, TokenUsage, ImageVerifier, VerifierError, ImageInput, METRICS,
};
use super::registry::{Built, VerifierSpec};
use super::VerifierArgs;
use crate::media::MediaKind;

/// `openai` in the verifier table: Chat Completions (also vLLM, SGLang, Ollama...).
pub const SPEC: VerifierSpec = VerifierSpec {
    name: "openai",
    metrics: &METRICS,
    media: &[MediaKind::Image],
    build: |args, ctx| Ok(Built::Images(Box::new(OpenAiVerifier::from_env(args, ctx.env)?))),
};

/// Model used when `verifier_args.model_name` is unset.
pub const DEFAULT_MODEL: &str = "gpt-4o-2024-11-20";
/// Environment variable holding the API key.
pub const KEY_ENV: &str = "OPENAI_API_KEY";
/// Environment variable that overrides the base URL (after `verifier_args.base_url`).
pub const BASE_URL_ENV: &str = "OPENAI_BASE_URL";
/// The public endpoint (including `/v1`).
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// Grades images with an OpenAI (or OpenAI-compatible) chat model.
#[derive(Debug)]
pub struct OpenAiVerifier {
    engine: Engine<OpenAiProtocol>,
}

/// Request building and reply parsing for `chat/completions`.
#[derive(Debug)]
struct OpenAiProtocol {
    url: String,
    /// `models`, for the access check.
    models_url: String,
    key: Option<ApiKey>,
    model: String,
    rubric: String,
    max_completion_tokens: Option<u32>,
    seed: Option<u64>,
}

impl OpenAiVerifier {
    /// Builds the verifier from `verifier_args` and the environment ([`KEY_ENV`],
    /// [`BASE_URL_ENV`]) with the production [`RetryPolicy`]. The key may be absent only when a
    /// custom base URL is set (a local OpenAI-compatible server).
    pub fn from_env(args: &VerifierArgs, env: EnvLookup<'_>) -> Result<Self, VerifierError> {
        let (base_url, custom) = resolve_base_url(
            args.base_url.as_deref(),
            env,
            BASE_URL_ENV,
            DEFAULT_BASE_URL,
        )?;
        let key = env(KEY_ENV).and_then(ApiKey::new);
        if key.is_none() && !custom {
            return Err(VerifierError::MissingKey {
                var: KEY_ENV,
                api: "OpenAI API",
                verifier: "openai",
                hint: " (or set verifier_args.base_url to an OpenAI-compatible server that needs no key)",
            });
        }
        Self::new(args, &base_url, key, RetryPolicy::from_args(args))
    }

    /// Builds the verifier against `base_url` (including `/v1`) with an explicit key (sent as
    /// a bearer token when present) and retry policy; `verifier_args.base_url` is ignored here.
    pub fn new(
        args: &VerifierArgs,
        base_url: &str,
        key: Option<ApiKey>,
        retry: RetryPolicy,
    ) -> Result<Self, VerifierError> {
        let protocol = OpenAiProtocol {
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            models_url: format!("{}/models", base_url.trim_end_matches('/')),
            key: key.clone(),
            model: args
                .model_name
                .clone()
                .unwrap_or_else(|| DEFAULT_MODEL.to_string()),
            rubric: load_rubric(args)?,
            max_completion_tokens: args.max_new_tokens,
            seed: args.seed,
        };
        let settings = EngineSettings::from_args(args, retry)?;
        Ok(Self {
            engine: Engine::new("openai", protocol, settings, key)?,
        })
    }

    /// The full URL requests go to.
    pub fn endpoint(&self) -> &str {
        &self.engine.protocol().url
    }
}

impl ImageVerifier for OpenAiVerifier {
    fn name(&self) -> &str {
        "openai"
    }

    fn score(&self, inputs: &[ImageInput<'_>]) -> Vec<Result<Grading, ScoreFailure>> {
        self.engine
            .score_all(inputs)
            .into_iter()
            .map(|(g, _)| g)
            .collect()
    }

    fn score_with_usage(&self, inputs: &[ImageInput<'_>]) -> Vec<(Graded, TokenUsage)> {
        self.engine.score_all(inputs)
    }

    fn check_access(&self) -> Result<(), ScoreFailure> {
        self.engine.check_access()
    }

    fn call_stats(&self) -> CallStats {
        self.engine.stats()
    }
}

/// The `response_format` value: a strict JSON schema of the six metrics, each an object with
/// `explanation` (string) before `score` (number), all required, no extra properties.
pub fn response_format() -> Value {
    let score = json!({
        "type": "object",
        "properties": {
            "explanation": { "type": "string" },
            "score": { "type": "number" },
        },
        "required": ["explanation", "score"],
        "additionalProperties": false,
    });
    let properties: serde_json::Map<String, Value> = METRICS
        .iter()
        .map(|metric| (metric.to_string(), score.clone()))
        .collect();
    json!({
        "type": "json_schema",
        "json_schema": {
            "name": "grading",
            "strict": true,
            "schema": {
                "type": "object",
                "properties": properties,
                "required": METRICS,
                "additionalProperties": false,
            },
        },
    })
}

impl Protocol for OpenAiProtocol {
    fn api_name(&self) -> &'static str {
        "OpenAI API"
    }

    fn request(
        &self,
        client: &reqwest::Client,
        prompt: &str,
        png_base64: &str,
    ) -> reqwest::RequestBuilder {
        let mut body = json!({
            "model": self.model,
            "messages": [
                { "role": "system", "content": self.rubric },
                {
                    "role": "user",
                    "content": [
                        { "type": "text", "text": prompt },
                        {
                            "type": "image_url",
                            "image_url": { "url": format!("data:image/png;base64,{png_base64}") },
                        },
                    ],
                },
            ],
            "response_format": response_format(),
        });
        if let Some(max) = self.max_completion_tokens {
            body["max_completion_tokens"] = json!(max);
        }
        if let Some(seed) = self.seed {
            body["seed"] = json!(seed);
        }
        let request = client
            .post(&self.url)
            .header(CONTENT_TYPE, "application/json");
        let request = match &self.key {
            Some(key) => request.bearer_auth(key.expose()),
            None => request,
        };
        request.json(&body)
    }

    fn access_request(&self, client: &reqwest::Client) -> reqwest::RequestBuilder {
        // models.list: every OpenAI-compatible server has it, and it needs the key.
        let request = client.get(&self.models_url);
        match &self.key {
            Some(key) => request.bearer_auth(key.expose()),
            None => request,
        }
    }

    fn access_refused(&self, status: StatusCode) -> bool {
        // Only the key: compatible servers differ in what else the list says.
        matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
    }

    fn advice(&self, status: StatusCode) -> String {
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                format!("the API key was rejected or lacks access: check {KEY_ENV}")
            }
            StatusCode::NOT_FOUND => format!(
                "check verifier_args.model_name (\"{}\") and that {} is a chat completions endpoint",
                self.model, self.url
            ),
            StatusCode::BAD_REQUEST => "the request was rejected: check verifier_args \
                 (model_name must accept images and json_schema response formats; \
                 max_new_tokens, seed)"
                .to_string(),
            _ => "this is not retried; check verifier_args and the API's status".to_string(),
        }
    }

    fn usage(&self, body: &str) -> Option<(u64, u64)> {
        let reply: Value = serde_json::from_str(body).ok()?;
        let u = reply.get("usage")?;
        let count = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
        Some((count("prompt_tokens"), count("completion_tokens")))
    }

    fn parse_reply(&self, body: &str) -> Result<Grading, String> {
        let reply: Value = serde_json::from_str(body)
            .map_err(|e| format!("the response body is not JSON ({e})"))?;
        let choice = reply
            .pointer("/choices/0")
            .ok_or_else(|| "the reply has no choices".to_string())?;
        if let Some(refusal) = choice.pointer("/message/refusal").and_then(Value::as_str) {
            return Err(format!(
                "the model refused to grade: {}",
                super::preview(refusal)
            ));
        }
        let text = choice
            .pointer("/message/content")
            .and_then(Value::as_str)
            .ok_or_else(|| "the reply's message has no text content".to_string())?;
        let finish = choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .unwrap_or("stop");
        match parse_grading(text) {
            Ok(grading) => Ok(grading),
            Err(e) if finish == "length" => Err(format!(
                "{e} (the reply was cut at the token limit; raise verifier_args.max_new_tokens)"
            )),
            Err(e) => Err(e.0),
        }
    }
}
