//! The Gemini verifier: Google's Generative Language REST API (`models/{model}:generateContent`)
//! with a JSON response schema, one request per image.

use reqwest::header::{HeaderValue, CONTENT_TYPE};
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

/// `gemini` in the verifier table.
pub const SPEC: VerifierSpec = VerifierSpec {
    name: "gemini",
    metrics: &METRICS,
    media: &[MediaKind::Image],
    build: |args, ctx| Ok(Built::Images(Box::new(GeminiVerifier::from_env(args, ctx.env)?))),
};

/// Model used when `verifier_args.model_name` is unset.
pub const DEFAULT_MODEL: &str = "gemini-2.0-flash";
/// Environment variable holding the API key.
pub const KEY_ENV: &str = "GEMINI_API_KEY";
/// Environment variable that overrides the base URL (after `verifier_args.base_url`).
pub const BASE_URL_ENV: &str = "GEMINI_BASE_URL";
/// The public endpoint.
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";

/// Grades images with a Gemini model.
#[derive(Debug)]
pub struct GeminiVerifier {
    engine: Engine<GeminiProtocol>,
}

/// Request building and reply parsing for `generateContent`.
#[derive(Debug)]
struct GeminiProtocol {
    url: String,
    /// `models/{model}`, for the access check.
    model_url: String,
    key: ApiKey,
    /// Everything of the body except `contents`, built once.
    system_instruction: Value,
    generation_config: Value,
}

impl GeminiVerifier {
    /// Builds the verifier from `verifier_args` and the environment ([`KEY_ENV`],
    /// [`BASE_URL_ENV`]) with the production [`RetryPolicy`].
    pub fn from_env(args: &VerifierArgs, env: EnvLookup<'_>) -> Result<Self, VerifierError> {
        let key = env(KEY_ENV)
            .and_then(ApiKey::new)
            .ok_or(VerifierError::MissingKey {
                var: KEY_ENV,
                api: "Gemini API",
                verifier: "gemini",
                hint: " (create one at https://aistudio.google.com/apikey)",
            })?;
        let (base_url, _) = resolve_base_url(
            args.base_url.as_deref(),
            env,
            BASE_URL_ENV,
            DEFAULT_BASE_URL,
        )?;
        Self::new(args, &base_url, key, RetryPolicy::from_args(args))
    }

    /// Builds the verifier against `base_url` (without `/v1beta`) with an explicit key and
    /// retry policy; `verifier_args.base_url` is ignored here.
    pub fn new(
        args: &VerifierArgs,
        base_url: &str,
        key: ApiKey,
        retry: RetryPolicy,
    ) -> Result<Self, VerifierError> {
        let rubric = load_rubric(args)?;
        let model = args.model_name.as_deref().unwrap_or(DEFAULT_MODEL);
        let mut generation_config = json!({
            "responseMimeType": "application/json",
            "responseSchema": response_schema(),
        });
        if let Some(max) = args.max_new_tokens {
            generation_config["maxOutputTokens"] = json!(max);
        }
        if let Some(seed) = args.seed {
            // The API's seed is an int32.
            let seed = i32::try_from(seed).map_err(|_| VerifierError::InvalidArg {
                field: "seed",
                message: format!(
                    "{seed} is too large for Gemini, whose seed is at most {}",
                    i32::MAX
                ),
            })?;
            generation_config["seed"] = json!(seed);
        }
        let model_url = format!(
            "{}/v1beta/models/{}",
            base_url.trim_end_matches('/'),
            super::http::path_segment(model)
        );
        let protocol = GeminiProtocol {
            url: format!("{model_url}:generateContent"),
            model_url,
            key: key.clone(),
            system_instruction: json!({ "parts": [{ "text": rubric }] }),
            generation_config,
        };
        let settings = EngineSettings::from_args(args, retry)?;
        Ok(Self {
            engine: Engine::new("gemini", protocol, settings, Some(key))?,
        })
    }

    /// The full URL requests go to.
    pub fn endpoint(&self) -> &str {
        &self.engine.protocol().url
    }
}

impl ImageVerifier for GeminiVerifier {
    fn name(&self) -> &str {
        "gemini"
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

/// The grading schema in the API's OpenAPI subset: an OBJECT of the six metrics, each an
/// OBJECT with `explanation` (STRING) ordered before `score` (NUMBER).
pub fn response_schema() -> Value {
    let score = json!({
        "type": "OBJECT",
        "properties": {
            "explanation": { "type": "STRING" },
            "score": { "type": "NUMBER" },
        },
        "required": ["explanation", "score"],
        "propertyOrdering": ["explanation", "score"],
    });
    let properties: serde_json::Map<String, Value> = METRICS
        .iter()
        .map(|metric| (metric.to_string(), score.clone()))
        .collect();
    json!({
        "type": "OBJECT",
        "properties": properties,
        "required": METRICS,
        "propertyOrdering": METRICS,
    })
}

impl Protocol for GeminiProtocol {
    fn api_name(&self) -> &'static str {
        "Gemini API"
    }

    fn request(
        &self,
        client: &reqwest::Client,
        prompt: &str,
        png_base64: &str,
    ) -> reqwest::RequestBuilder {
        let body = json!({
            "systemInstruction": self.system_instruction,
            "contents": [{
                "role": "user",
                "parts": [
                    { "text": prompt },
                    { "inlineData": { "mimeType": "image/png", "data": png_base64 } },
                ],
            }],
            "generationConfig": self.generation_config,
        });
        let request = client
            .post(&self.url)
            .header(CONTENT_TYPE, "application/json");
        match HeaderValue::from_str(self.key.expose()) {
            Ok(mut value) => {
                value.set_sensitive(true);
                request.header("x-goog-api-key", value).json(&body)
            }
            // A key with characters a header cannot hold: send without it and let the API
            // answer 401/403, whose advice names the key variable.
            Err(_) => request.json(&body),
        }
    }

    fn access_request(&self, client: &reqwest::Client) -> reqwest::RequestBuilder {
        // models.get: needs a valid key and an existing model.
        let request = client.get(&self.model_url);
        match HeaderValue::from_str(self.key.expose()) {
            Ok(mut value) => {
                value.set_sensitive(true);
                request.header("x-goog-api-key", value)
            }
            Err(_) => request,
        }
    }

    fn access_refused(&self, status: StatusCode) -> bool {
        // Gemini answers a malformed key with 400 "API key not valid".
        super::http::is_fatal_for_the_run(status)
    }

    fn advice(&self, status: StatusCode) -> String {
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                format!("the API key was rejected: check {KEY_ENV}")
            }
            StatusCode::NOT_FOUND => format!(
                "check verifier_args.model_name and that {} is a Gemini API endpoint",
                self.url
            ),
            StatusCode::BAD_REQUEST => "the request was rejected: check verifier_args \
                 (model_name, max_new_tokens, seed) and, if the message names the key, \
                 check GEMINI_API_KEY"
                .to_string(),
            _ => "this is not retried; check verifier_args and the API's status".to_string(),
        }
    }

    fn usage(&self, body: &str) -> Option<(u64, u64)> {
        let reply: Value = serde_json::from_str(body).ok()?;
        let u = reply.get("usageMetadata")?;
        let count = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
        Some((
            count("promptTokenCount"),
            count("candidatesTokenCount") + count("thoughtsTokenCount"),
        ))
    }

    fn parse_reply(&self, body: &str) -> Result<Grading, String> {
        let reply: Value = serde_json::from_str(body)
            .map_err(|e| format!("the response body is not JSON ({e})"))?;
        let Some(candidate) = reply.pointer("/candidates/0") else {
            let reason = reply
                .pointer("/promptFeedback/blockReason")
                .and_then(Value::as_str)
                .unwrap_or("no reason given");
            return Err(format!("the reply has no candidates (blocked: {reason})"));
        };
        let text: String = candidate
            .pointer("/content/parts")
            .and_then(Value::as_array)
            .map(|parts| {
                parts
                    .iter()
                    .filter_map(|part| part.get("text").and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default();
        let finish = candidate
            .get("finishReason")
            .and_then(Value::as_str)
            .unwrap_or("STOP");
        match parse_grading(&text) {
            Ok(grading) => Ok(grading),
            Err(e) if finish == "MAX_TOKENS" => Err(format!(
                "{e} (the reply was cut at the token limit; raise verifier_args.max_new_tokens)"
            )),
            Err(e) if finish != "STOP" => Err(format!("{e} (finishReason {finish})")),
            Err(e) => Err(e.0),
        }
    }
}
