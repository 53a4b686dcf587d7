//! Fake Gemini and OpenAI servers on 127.0.0.1 for tests, reusable by any test file:
//!
//! ```ignore
//! #[path = "../common/fake_verifier.rs"]
//! mod fake_verifier;
//! let (base_url, server) = fake_verifier::FakeGemini::start(fake_verifier::Behaviour::good());
//! // point the verifier at base_url (Gemini: without /v1beta; OpenAI: it ends in /v1)
//! assert!(server.violations().is_empty());
//! ```
//!
//! Each server checks every request against the real API's shape (method, path, auth header,
//! body fields, response schema, inline PNG) and records it; a request that does not fit is
//! answered 400 with the violations as the error message and is listed by
//! [`FakeServer::violations`]. Replies are chosen by a [`Behaviour`]; by default the grading's
//! scores are [`pixel_score`] of the image, so they are deterministic whatever the order.
#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::future::IntoFuture;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;
use image::RgbImage;
use serde_json::{json, Value};

/// The six metric names, as the real APIs are asked for them.
pub const METRICS: [&str; 6] = [
    "accuracy_to_prompt",
    "creativity_and_originality",
    "visual_quality_and_realism",
    "consistency_and_cohesion",
    "emotional_or_thematic_resonance",
    "overall_score",
];

/// The deterministic score the fake judge gives by default: the image's mean byte value
/// mapped to 0..=10 (brighter scores higher).
pub fn pixel_score(image: &RgbImage) -> f64 {
    let bytes = image.as_raw();
    if bytes.is_empty() {
        return 0.0;
    }
    let sum: u64 = bytes.iter().map(|&b| u64::from(b)).sum();
    sum as f64 / bytes.len() as f64 / 255.0 * 10.0
}

/// A valid grading reply text (the model's JSON) with `score` for every metric.
pub fn grading_json(score: f64) -> String {
    let mut object = serde_json::Map::new();
    for metric in METRICS {
        object.insert(
            metric.to_string(),
            json!({ "explanation": format!("fake judge on {metric}"), "score": score }),
        );
    }
    Value::Object(object).to_string()
}

/// What the fake server answers to one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A valid grading with [`pixel_score`] of the request's image for every metric.
    PixelScore,
    /// A valid grading with this score for every metric.
    Score(f64),
    /// A successful API envelope whose model text is exactly this (malformed JSON, wrong
    /// schema, out-of-range scores...).
    Text(String),
    /// An HTTP error with the API's error body; `retry_after` in seconds; `message` replaces
    /// the default error message.
    Status {
        /// HTTP status code.
        code: u16,
        /// `Retry-After` header value in seconds.
        retry_after: Option<u64>,
        /// Error message in the body.
        message: Option<String>,
    },
    /// OpenAI: a refusal message; Gemini: a blocked prompt (no candidates).
    Refusal,
    /// Waits, then answers with the inner reply.
    Delayed(Duration, Box<Reply>),
}

impl Reply {
    /// An HTTP error status with the default message and no `Retry-After`.
    pub fn status(code: u16) -> Self {
        Reply::Status {
            code,
            retry_after: None,
            message: None,
        }
    }
}

/// What the server saw in one valid request, for a [`Behaviour`] to decide on.
pub struct Seen<'a> {
    /// The user's text part (the generation prompt).
    pub prompt: &'a str,
    /// The decoded image.
    pub image: &'a RgbImage,
    /// How many earlier requests carried the same prompt and image (0 for the first).
    pub attempt: usize,
}

/// Chooses the reply to each valid request.
#[derive(Clone)]
pub struct Behaviour(Arc<dyn Fn(&Seen<'_>) -> Reply + Send + Sync>);

impl Behaviour {
    /// Always a valid grading scored by [`pixel_score`].
    pub fn good() -> Self {
        Self::always(Reply::PixelScore)
    }

    /// Always the same reply.
    pub fn always(reply: Reply) -> Self {
        Self::custom(move |_| reply.clone())
    }

    /// For each (prompt, image): the first `times` requests get `reply`, later ones a valid
    /// [`pixel_score`] grading.
    pub fn first_then_good(times: usize, reply: Reply) -> Self {
        Self::custom(move |seen| {
            if seen.attempt < times {
                reply.clone()
            } else {
                Reply::PixelScore
            }
        })
    }

    /// Any rule.
    pub fn custom(rule: impl Fn(&Seen<'_>) -> Reply + Send + Sync + 'static) -> Self {
        Self(Arc::new(rule))
    }
}

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// HTTP method.
    pub method: String,
    /// Path (without query).
    pub path: String,
    /// Query string, if any.
    pub query: Option<String>,
    /// Headers, lower-case names.
    pub headers: HashMap<String, String>,
    /// The JSON body (`Null` if it was not JSON).
    pub body: Value,
    /// The key sent (`x-goog-api-key` or the bearer token).
    pub key: Option<String>,
    /// The model asked for (path segment for Gemini, `model` for OpenAI).
    pub model: Option<String>,
    /// The system prompt text.
    pub system: Option<String>,
    /// The user's text part.
    pub prompt: Option<String>,
    /// The image, decoded from the inline PNG.
    pub image: Option<RgbImage>,
    /// How the request deviates from the real API (empty when it fits).
    pub violations: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Gemini,
    OpenAi,
}

struct ServerState {
    kind: Kind,
    require_key: bool,
    behaviour: Behaviour,
    records: Mutex<Vec<Recorded>>,
    /// GET requests for a model or the model list (the access check): (path, key sent).
    access_checks: Mutex<Vec<(String, Option<String>)>>,
    /// The answer to the access check; `None`: the model, 200.
    access_reply: Mutex<Option<Reply>>,
    attempts: Mutex<HashMap<u64, usize>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A running fake server; stops when dropped.
pub struct FakeServer {
    base_url: String,
    state: Arc<ServerState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeServer {
    /// The base URL to give the verifier.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.records.lock().unwrap().clone()
    }

    /// How many grading requests arrived (access checks not included).
    pub fn request_count(&self) -> usize {
        self.state.records.lock().unwrap().len()
    }

    /// The access checks received (GET of the model, or of the model list): (path, key).
    pub fn access_checks(&self) -> Vec<(String, Option<String>)> {
        self.state.access_checks.lock().unwrap().clone()
    }

    /// Answers the access checks from now on with `reply` (a [`Reply::Status`], say).
    pub fn set_access_reply(&self, reply: Reply) {
        *self.state.access_reply.lock().unwrap() = Some(reply);
    }

    /// Every way a request deviated from the real API, prefixed by its arrival number.
    pub fn violations(&self) -> Vec<String> {
        self.requests()
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                r.violations
                    .iter()
                    .map(move |v| format!("request {i}: {v}"))
            })
            .collect()
    }

    /// The most requests that were being handled at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A fake of Google's Generative Language API (`/v1beta/models/{model}:generateContent`).
pub struct FakeGemini;

impl FakeGemini {
    /// Starts a server that requires an `x-goog-api-key` header (any non-empty key). Returns
    /// the base URL (`http://127.0.0.1:PORT`, no `/v1beta`) and the server.
    pub fn start(behaviour: Behaviour) -> (String, FakeServer) {
        let server = start(Kind::Gemini, behaviour, true, "");
        (server.base_url.clone(), server)
    }
}

/// A fake of OpenAI's Chat Completions API (`/v1/chat/completions`).
pub struct FakeOpenAi;

impl FakeOpenAi {
    /// Starts a server that requires a bearer key (any non-empty key). Returns the base URL
    /// (`http://127.0.0.1:PORT/v1`) and the server.
    pub fn start(behaviour: Behaviour) -> (String, FakeServer) {
        let server = start(Kind::OpenAi, behaviour, true, "/v1");
        (server.base_url.clone(), server)
    }

    /// Like [`FakeOpenAi::start`] but needing no key, as a local OpenAI-compatible server.
    pub fn start_without_auth(behaviour: Behaviour) -> (String, FakeServer) {
        let server = start(Kind::OpenAi, behaviour, false, "/v1");
        (server.base_url.clone(), server)
    }
}

fn start(kind: Kind, behaviour: Behaviour, require_key: bool, suffix: &str) -> FakeServer {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let address = listener.local_addr().expect("local address");
    let state = Arc::new(ServerState {
        kind,
        require_key,
        behaviour,
        records: Mutex::new(Vec::new()),
        access_checks: Mutex::new(Vec::new()),
        access_reply: Mutex::new(None),
        attempts: Mutex::new(HashMap::new()),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app_state = Arc::clone(&state);
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("fake server runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let app = Router::new()
                .fallback(handle)
                .layer(DefaultBodyLimit::disable())
                .with_state(app_state);
            tokio::select! {
                _ = axum::serve(listener, app).into_future() => {}
                _ = rx => {}
            }
        });
        runtime.shutdown_background();
    });
    FakeServer {
        base_url: format!("http://{address}{suffix}"),
        state,
        shutdown: Some(tx),
        thread: Some(thread),
    }
}

/// Decrements the in-flight counter when the request ends (or the client goes away).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    State(state): State<Arc<ServerState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == Method::GET {
        return access_check(&state, uri.path(), &headers);
    }
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = InFlight(&state.in_flight);

    let mut record = Recorded {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().map(str::to_string),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        key: None,
        model: None,
        system: None,
        prompt: None,
        image: None,
        violations: Vec::new(),
    };
    match state.kind {
        Kind::Gemini => check_gemini(&mut record),
        Kind::OpenAi => check_openai(&mut record),
    }
    let missing_key = record.key.as_deref().is_none_or(str::is_empty);
    if state.require_key && missing_key {
        record.violations.push("no API key sent".to_string());
    }
    state.records.lock().unwrap().push(record.clone());

    if !record.violations.is_empty() {
        let code = if state.require_key && missing_key {
            401
        } else {
            400
        };
        let message = record.violations.join("; ");
        return error_response(state.kind, code, None, Some(message));
    }
    let (Some(prompt), Some(image)) = (record.prompt.as_deref(), record.image.as_ref()) else {
        return error_response(state.kind, 400, None, Some("no prompt or image".into()));
    };
    let attempt = {
        let mut hasher = DefaultHasher::new();
        prompt.hash(&mut hasher);
        image.as_raw().hash(&mut hasher);
        let mut attempts = state.attempts.lock().unwrap();
        let count = attempts.entry(hasher.finish()).or_insert(0);
        *count += 1;
        *count - 1
    };
    let mut reply = (state.behaviour.0)(&Seen {
        prompt,
        image,
        attempt,
    });
    loop {
        match reply {
            Reply::Delayed(wait, inner) => {
                tokio::time::sleep(wait).await;
                reply = *inner;
            }
            Reply::PixelScore => return success(state.kind, &grading_json(pixel_score(image))),
            Reply::Score(score) => return success(state.kind, &grading_json(score)),
            Reply::Text(text) => return success(state.kind, &text),
            Reply::Refusal => return refusal(state.kind),
            Reply::Status {
                code,
                retry_after,
                message,
            } => return error_response(state.kind, code, retry_after, message),
        }
    }
}

/// Gemini's `models.get` (`GET /v1beta/models/{model}`) and OpenAI's `models.list`
/// (`GET /v1/models`), as the verifiers' access check uses them.
fn access_check(state: &ServerState, path: &str, headers: &HeaderMap) -> Response {
    let key = match state.kind {
        Kind::Gemini => headers.get("x-goog-api-key"),
        Kind::OpenAi => headers.get("authorization"),
    }
    .and_then(|v| v.to_str().ok())
    .map(|v| v.trim_start_matches("Bearer ").to_string());
    state
        .access_checks
        .lock()
        .unwrap()
        .push((path.to_string(), key.clone()));
    let known = match state.kind {
        Kind::Gemini => path
            .strip_prefix("/v1beta/models/")
            .filter(|m| !m.is_empty() && !m.contains([':', '/'])),
        Kind::OpenAi => (path == "/v1/models").then_some(""),
    };
    let Some(model) = known else {
        return error_response(state.kind, 404, None, Some(format!("no route {path}")));
    };
    if state.require_key && key.as_deref().is_none_or(str::is_empty) {
        return error_response(state.kind, 401, None, Some("no API key sent".into()));
    }
    match state.access_reply.lock().unwrap().clone() {
        Some(Reply::Status {
            code,
            retry_after,
            message,
        }) => error_response(state.kind, code, retry_after, message),
        _ => {
            let body = match state.kind {
                Kind::Gemini => json!({"name": format!("models/{model}"), "displayName": model}),
                Kind::OpenAi => {
                    json!({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]})
                }
            };
            (StatusCode::OK, axum::Json(body)).into_response()
        }
    }
}

fn success(kind: Kind, text: &str) -> Response {
    let body = match kind {
        Kind::Gemini => json!({
            "candidates": [{
                "content": { "parts": [{ "text": text }], "role": "model" },
                "finishReason": "STOP",
                "index": 0,
            }],
            "usageMetadata": { "promptTokenCount": 1290, "candidatesTokenCount": 150, "totalTokenCount": 1440 },
            "modelVersion": "fake",
        }),
        Kind::OpenAi => json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": "fake",
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": text, "refusal": null },
                "finish_reason": "stop",
            }],
            "usage": { "prompt_tokens": 1105, "completion_tokens": 140, "total_tokens": 1245 },
        }),
    };
    json_response(StatusCode::OK, &body, None)
}

fn refusal(kind: Kind) -> Response {
    let body = match kind {
        Kind::Gemini => json!({ "promptFeedback": { "blockReason": "SAFETY" } }),
        Kind::OpenAi => json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": "fake",
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": null, "refusal": "I can't help with that." },
                "finish_reason": "stop",
            }],
        }),
    };
    json_response(StatusCode::OK, &body, None)
}

fn error_response(
    kind: Kind,
    code: u16,
    retry_after: Option<u64>,
    message: Option<String>,
) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = message.unwrap_or_else(|| match code {
        401 => "API key not valid. Please pass a valid API key.".to_string(),
        429 => "Resource has been exhausted (e.g. check quota).".to_string(),
        500 => "An internal error has occurred.".to_string(),
        503 => "The model is overloaded. Please try again later.".to_string(),
        _ => format!("fake error {code}"),
    });
    let body = match kind {
        Kind::Gemini => json!({ "error": { "code": code, "message": message, "status": "FAKE" } }),
        Kind::OpenAi => json!({
            "error": { "message": message, "type": "fake_error", "param": null, "code": null },
        }),
    };
    json_response(status, &body, retry_after)
}

fn json_response(status: StatusCode, body: &Value, retry_after: Option<u64>) -> Response {
    let mut response = (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(seconds),
        );
    }
    response
}

/// Checks `body[pointer]` is a string and returns it, recording a violation otherwise.
fn string_at(record: &mut Recorded, pointer: &str) -> Option<String> {
    match record.body.pointer(pointer).and_then(Value::as_str) {
        Some(text) => Some(text.to_string()),
        None => {
            record
                .violations
                .push(format!("{pointer} is missing or not a string"));
            None
        }
    }
}

fn expect(record: &mut Recorded, ok: bool, violation: impl FnOnce() -> String) {
    if !ok {
        record.violations.push(violation());
    }
}

/// Object keys at `pointer` must all be in `allowed` (the real APIs reject unknown fields).
fn known_keys(record: &mut Recorded, pointer: &str, allowed: &[&str]) {
    let unknown: Vec<String> = match record.body.pointer(pointer).and_then(Value::as_object) {
        Some(object) => object
            .keys()
            .filter(|k| !allowed.contains(&k.as_str()))
            .cloned()
            .collect(),
        None => vec![format!("(no object at {pointer})")],
    };
    if !unknown.is_empty() {
        record
            .violations
            .push(format!("unknown fields at {pointer:?}: {unknown:?}"));
    }
}

fn decode_png(record: &mut Recorded, base64_text: &str) {
    let bytes = match base64::engine::general_purpose::STANDARD.decode(base64_text) {
        Ok(bytes) => bytes,
        Err(e) => {
            record
                .violations
                .push(format!("image data is not base64: {e}"));
            return;
        }
    };
    match image::load_from_memory_with_format(&bytes, image::ImageFormat::Png) {
        Ok(image) => record.image = Some(image.to_rgb8()),
        Err(e) => record
            .violations
            .push(format!("image data is not a PNG: {e}")),
    }
}

fn common_http_checks(record: &mut Recorded, headers_ok_path: bool) {
    let method_ok = record.method == "POST";
    let method = record.method.clone();
    expect(record, method_ok, || {
        format!("method {method}, expected POST")
    });
    let content_type_ok = record
        .headers
        .get("content-type")
        .is_some_and(|t| t.starts_with("application/json"));
    expect(record, content_type_ok, || {
        "content-type is not application/json".to_string()
    });
    let path = record.path.clone();
    expect(record, headers_ok_path, || {
        format!("unexpected path {path}")
    });
    let body_is_object = record.body.is_object();
    expect(record, body_is_object, || {
        "body is not a JSON object".to_string()
    });
}

fn check_gemini(record: &mut Recorded) {
    let model = record
        .path
        .strip_prefix("/v1beta/models/")
        .and_then(|rest| rest.strip_suffix(":generateContent"))
        .filter(|m| !m.is_empty() && !m.contains('/'))
        .map(str::to_string);
    common_http_checks(record, model.is_some());
    record.model = model;
    record.key = record.headers.get("x-goog-api-key").cloned();
    let key_in_query = record.query.as_deref().is_some_and(|q| q.contains("key="));
    expect(record, !key_in_query, || {
        "the key must travel in the x-goog-api-key header, not the URL".to_string()
    });
    if !record.body.is_object() {
        return;
    }
    known_keys(
        record,
        "",
        &[
            "contents",
            "systemInstruction",
            "generationConfig",
            "safetySettings",
            "tools",
            "toolConfig",
            "cachedContent",
        ],
    );
    record.system = string_at(record, "/systemInstruction/parts/0/text");
    let contents_len = record.body["contents"].as_array().map_or(0, Vec::len);
    expect(record, contents_len == 1, || {
        format!("contents has {contents_len} entries, expected 1")
    });
    let role_ok = record.body.pointer("/contents/0/role") == Some(&json!("user"));
    expect(record, role_ok, || {
        "contents[0].role is not \"user\"".to_string()
    });
    let parts_len = record
        .body
        .pointer("/contents/0/parts")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    expect(record, parts_len == 2, || {
        format!("contents[0].parts has {parts_len} entries, expected text then image")
    });
    record.prompt = string_at(record, "/contents/0/parts/0/text");
    let mime = string_at(record, "/contents/0/parts/1/inlineData/mimeType");
    expect(record, mime.as_deref() == Some("image/png"), || {
        format!("inlineData.mimeType is {mime:?}, expected image/png")
    });
    if let Some(data) = string_at(record, "/contents/0/parts/1/inlineData/data") {
        decode_png(record, &data);
    }
    known_keys(
        record,
        "/generationConfig",
        &[
            "stopSequences",
            "responseMimeType",
            "responseSchema",
            "responseJsonSchema",
            "responseModalities",
            "candidateCount",
            "maxOutputTokens",
            "temperature",
            "topP",
            "topK",
            "seed",
            "presencePenalty",
            "frequencyPenalty",
            "responseLogprobs",
            "logprobs",
            "thinkingConfig",
            "mediaResolution",
        ],
    );
    let mime_type = record.body.pointer("/generationConfig/responseMimeType");
    let json_mime = mime_type == Some(&json!("application/json"));
    expect(record, json_mime, || {
        "generationConfig.responseMimeType is not application/json".to_string()
    });
    if let Some(max) = record
        .body
        .pointer("/generationConfig/maxOutputTokens")
        .cloned()
    {
        let ok = max.as_u64().is_some_and(|m| m > 0);
        expect(record, ok, || {
            format!("maxOutputTokens {max} is not a positive integer")
        });
    }
    if let Some(seed) = record.body.pointer("/generationConfig/seed").cloned() {
        let ok = seed.as_i64().is_some_and(|s| i32::try_from(s).is_ok());
        expect(record, ok, || format!("seed {seed} is not an int32"));
    }
    let schema = record
        .body
        .pointer("/generationConfig/responseSchema")
        .cloned()
        .unwrap_or(Value::Null);
    check_gemini_schema(record, &schema);
}

fn check_gemini_schema(record: &mut Recorded, schema: &Value) {
    let metrics: Vec<Value> = METRICS.iter().map(|m| json!(m)).collect();
    expect(record, schema["type"] == "OBJECT", || {
        format!("responseSchema.type is {}, expected OBJECT", schema["type"])
    });
    let names: Vec<&str> = schema["properties"]
        .as_object()
        .map(|p| p.keys().map(String::as_str).collect())
        .unwrap_or_default();
    expect(record, names == METRICS, || {
        format!("responseSchema.properties are {names:?}, expected the six metrics")
    });
    let required_ok = schema["required"].as_array() == Some(&metrics);
    expect(record, required_ok, || {
        "responseSchema.required is not the six metrics".to_string()
    });
    for metric in METRICS {
        let entry = &schema["properties"][metric];
        let ok = entry["type"] == "OBJECT"
            && entry["properties"]["explanation"]["type"] == "STRING"
            && entry["properties"]["score"]["type"] == "NUMBER"
            && entry["required"] == json!(["explanation", "score"])
            && entry["propertyOrdering"] == json!(["explanation", "score"]);
        expect(record, ok, || {
            format!("responseSchema.properties.{metric} is not {{explanation: STRING, score: NUMBER}} ordered explanation first: {entry}")
        });
    }
}

fn check_openai(record: &mut Recorded) {
    let path_ok = record.path == "/v1/chat/completions";
    common_http_checks(record, path_ok);
    record.key = record
        .headers
        .get("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    if !record.body.is_object() {
        return;
    }
    known_keys(
        record,
        "",
        &[
            "model",
            "messages",
            "response_format",
            "max_completion_tokens",
            "max_tokens",
            "seed",
            "temperature",
            "top_p",
            "n",
            "stop",
            "user",
            "store",
            "metadata",
            "reasoning_effort",
            "frequency_penalty",
            "presence_penalty",
            "logprobs",
            "top_logprobs",
        ],
    );
    record.model = string_at(record, "/model");
    let messages_len = record.body["messages"].as_array().map_or(0, Vec::len);
    expect(record, messages_len == 2, || {
        format!("messages has {messages_len} entries, expected system then user")
    });
    let system_role = record.body.pointer("/messages/0/role") == Some(&json!("system"));
    expect(record, system_role, || {
        "messages[0].role is not system".to_string()
    });
    record.system = string_at(record, "/messages/0/content");
    let user_role = record.body.pointer("/messages/1/role") == Some(&json!("user"));
    expect(record, user_role, || {
        "messages[1].role is not user".to_string()
    });
    let text_type = record.body.pointer("/messages/1/content/0/type") == Some(&json!("text"));
    expect(record, text_type, || {
        "user content[0].type is not text".to_string()
    });
    record.prompt = string_at(record, "/messages/1/content/0/text");
    let image_type = record.body.pointer("/messages/1/content/1/type") == Some(&json!("image_url"));
    expect(record, image_type, || {
        "user content[1].type is not image_url".to_string()
    });
    if let Some(url) = string_at(record, "/messages/1/content/1/image_url/url") {
        match url.strip_prefix("data:image/png;base64,") {
            Some(data) => decode_png(record, data),
            None => record.violations.push(format!(
                "image_url.url is not a data:image/png;base64 URL: {}",
                &url[..url.len().min(40)]
            )),
        }
    }
    for field in ["max_completion_tokens", "seed"] {
        if let Some(value) = record.body.get(field).cloned() {
            let ok = value.is_u64() || value.is_i64();
            expect(record, ok, || format!("{field} {value} is not an integer"));
        }
    }
    let format = record
        .body
        .get("response_format")
        .cloned()
        .unwrap_or(Value::Null);
    check_openai_format(record, &format);
}

fn check_openai_format(record: &mut Recorded, format: &Value) {
    expect(record, format["type"] == "json_schema", || {
        format!(
            "response_format.type is {}, expected json_schema",
            format["type"]
        )
    });
    let spec = &format["json_schema"];
    let name_ok = spec["name"].as_str().is_some_and(|n| {
        !n.is_empty()
            && n.len() <= 64
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    });
    expect(record, name_ok, || {
        format!("json_schema.name {} is invalid", spec["name"])
    });
    expect(record, spec["strict"] == true, || {
        "json_schema.strict is not true".to_string()
    });
    let schema = &spec["schema"];
    let metrics: Vec<Value> = METRICS.iter().map(|m| json!(m)).collect();
    let names: Vec<&str> = schema["properties"]
        .as_object()
        .map(|p| p.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let top_ok = schema["type"] == "object"
        && names == METRICS
        && schema["required"].as_array() == Some(&metrics)
        && schema["additionalProperties"] == false;
    expect(record, top_ok, || {
        "schema is not an object of the six metrics, all required, no additional properties"
            .to_string()
    });
    for metric in METRICS {
        let entry = &schema["properties"][metric];
        let keys: Vec<&str> = entry["properties"]
            .as_object()
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let ok = entry["type"] == "object"
            && keys == ["explanation", "score"]
            && entry["properties"]["explanation"]["type"] == "string"
            && entry["properties"]["score"]["type"] == "number"
            && entry["required"] == json!(["explanation", "score"])
            && entry["additionalProperties"] == false;
        expect(record, ok, || {
            format!("schema.properties.{metric} is not a strict {{explanation: string, score: number}} (explanation first): {entry}")
        });
    }
}
