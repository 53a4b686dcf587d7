//! The HTTP machinery shared by the API verifiers: a tokio runtime and async client owned by the
//! verifier, bounded concurrency, retries with exponential backoff and jitter (honouring
//! `Retry-After`), re-asking on replies that do not fit the schema, and index-ordered results.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;

use super::VerifierArgs;
use super::{
    preview, ApiKey, CallStats, Graded, Grading, ImageInput, ScoreFailure, TokenUsage,
    VerifierError,
};

/// How failed HTTP requests are retried (429, 408, 5xx, connection errors and timeouts).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Requests per image before giving up on transport failures (at least 1).
    pub max_attempts: u32,
    /// Wait before the first retry; doubles with each further retry.
    pub base_delay: Duration,
    /// Longest wait between two attempts, also the cap on a server's `Retry-After`.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// Production policy: `max_attempts` tries, 1 s base delay, 60 s cap.
    pub fn standard(max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        }
    }

    /// Test-friendly policy: `max_attempts` tries, 1 ms base delay, 300 ms cap.
    pub fn fast(max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(300),
        }
    }

    /// The production policy for `verifier_args.max_attempts`.
    pub fn from_args(args: &VerifierArgs) -> Self {
        Self::standard(args.max_attempts)
    }

    /// The wait after failed attempt number `failures` (1 for the first failure): the
    /// exponential backoff `base_delay * 2^(failures-1)` drawn uniformly from its upper half
    /// (jitter), raised to the server's `Retry-After` if larger, and capped at `max_delay`.
    pub fn delay(
        &self,
        failures: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Duration {
        let exponent = failures.saturating_sub(1).min(30);
        let backoff = self
            .base_delay
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay);
        let jittered = backoff.mul_f64(rng.random_range(0.5..=1.0));
        retry_after
            .map_or(jittered, |after| after.max(jittered))
            .min(self.max_delay)
    }
}

/// `Retry-After` given in seconds (integer or decimal); the HTTP-date form is ignored.
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let seconds: f64 = value.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// What one verifier API needs to say to the shared machinery.
pub(crate) trait Protocol: Send + Sync + 'static {
    /// Human name for messages, e.g. "Gemini API".
    fn api_name(&self) -> &'static str;
    /// The request for one (prompt, image) pair; the image is a base64 PNG.
    fn request(
        &self,
        client: &reqwest::Client,
        prompt: &str,
        png_base64: &str,
    ) -> reqwest::RequestBuilder;
    /// What to do about a non-retried error status (e.g. which key variable to check).
    fn advice(&self, status: StatusCode) -> String;
    /// The grading inside a successful reply body, or why it is not valid.
    fn parse_reply(&self, body: &str) -> Result<Grading, String>;
    /// A cheap request that needs the key and the model (get or list models), made once before
    /// the first image, so that a rejected key costs seconds, not a round of generation.
    fn access_request(&self, client: &reqwest::Client) -> reqwest::RequestBuilder;
    /// Whether `status` in answer to [`Protocol::access_request`] means no grading can succeed.
    fn access_refused(&self, status: StatusCode) -> bool;
    /// The (input, output) tokens a successful reply body reports, if it does.
    fn usage(&self, _body: &str) -> Option<(u64, u64)> {
        None
    }
}

/// One attempt's result.
enum Outcome {
    Graded(Grading),
    Invalid(String),
    Retry {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Not retried: this image fails. `run` when no other request can succeed either.
    Fatal {
        message: String,
        run: bool,
    },
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    failed: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
}

/// Settings of the shared machinery, from `verifier_args`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EngineSettings {
    pub concurrency: usize,
    pub max_invalid_replies: u32,
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl EngineSettings {
    /// Settings from `verifier_args` with the given retry policy; rejects a non-positive timeout.
    pub fn from_args(args: &VerifierArgs, retry: RetryPolicy) -> Result<Self, VerifierError> {
        if !(args.timeout_s.is_finite() && args.timeout_s > 0.0) {
            return Err(VerifierError::InvalidArg {
                field: "timeout_s",
                message: format!("{} is not a positive number of seconds", args.timeout_s),
            });
        }
        Ok(Self {
            concurrency: args.concurrency.max(1),
            max_invalid_replies: args.max_invalid_replies,
            timeout: Duration::from_secs_f64(args.timeout_s),
            retry,
        })
    }
}

/// Runs gradings concurrently over HTTP with retries; owns its tokio runtime.
pub(crate) struct Engine<P: Protocol> {
    runtime: Option<Runtime>,
    client: reqwest::Client,
    protocol: Arc<P>,
    settings: EngineSettings,
    key: Option<ApiKey>,
    counters: Arc<Counters>,
    /// Bounds the requests in flight across all concurrent `score_all` calls (the search
    /// scores one batch while the next is generated).
    semaphore: Arc<Semaphore>,
}

impl<P: Protocol> std::fmt::Debug for Engine<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("api", &self.protocol.api_name())
            .field("settings", &self.settings)
            .field("key", &self.key)
            .finish()
    }
}

impl<P: Protocol> Engine<P> {
    /// Starts the runtime and HTTP client. `key` is only used to scrub messages.
    pub fn new(
        verifier: &'static str,
        protocol: P,
        settings: EngineSettings,
        key: Option<ApiKey>,
    ) -> Result<Self, VerifierError> {
        let client_error = |message: String| VerifierError::Client { verifier, message };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("tt-scale-{verifier}"))
            .enable_all()
            .build()
            .map_err(|e| client_error(e.to_string()))?;
        let client = reqwest::Client::builder()
            .redirect(same_origin_redirects())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(30)))
            .build()
            .map_err(|e| client_error(e.to_string()))?;
        Ok(Self {
            runtime: Some(runtime),
            client,
            protocol: Arc::new(protocol),
            settings,
            key,
            counters: Arc::new(Counters::default()),
            semaphore: Arc::new(Semaphore::new(settings.concurrency)),
        })
    }

    /// The protocol (request builder) in use.
    pub fn protocol(&self) -> &P {
        &self.protocol
    }

    /// Requests and failed requests so far.
    pub fn stats(&self) -> CallStats {
        CallStats {
            requests: self.counters.requests.load(Ordering::Relaxed),
            failed_requests: self.counters.failed.load(Ordering::Relaxed),
            input_tokens: self.counters.input_tokens.load(Ordering::Relaxed),
            output_tokens: self.counters.output_tokens.load(Ordering::Relaxed),
        }
    }

    /// Checks with one cheap request that the API accepts the key (and knows the model, where
    /// the API can say so). A refusal is a fatal [`ScoreFailure`] with the API's message and
    /// what to do; anything else (a timeout, a 5xx) is only logged: the first graded batch will
    /// tell.
    pub fn check_access(&self) -> Result<(), ScoreFailure> {
        let Some(runtime) = &self.runtime else {
            return Ok(());
        };
        let api = self.protocol.api_name();
        let request = self.protocol.access_request(&self.client);
        let scrub = |text: String| match &self.key {
            Some(key) => key.redact(&text),
            None => text,
        };
        let outcome = block_on(runtime, async move {
            let response = request.send().await?;
            let status = response.status();
            let url = response.url().to_string();
            let body = read_capped(response, MAX_REPLY_BYTES)
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            Ok::<_, reqwest::Error>((status, url, body))
        });
        match outcome {
            Ok((status, _, _)) if status.is_success() => Ok(()),
            Ok((status, url, body))
                if self.protocol.access_refused(status)
                    || (status == StatusCode::TOO_MANY_REQUESTS && is_quota_exhausted(&body)) =>
            {
                let what = if status == StatusCode::TOO_MANY_REQUESTS {
                    "the quota is used up; raise it or wait for it to reset".to_string()
                } else {
                    self.protocol.advice(status)
                };
                Err(ScoreFailure {
                    message: scrub(format!(
                        "HTTP {status} from the {api} ({url}){}; {what}",
                        error_detail(&body)
                    )),
                    attempts: 1,
                    fatal: true,
                })
            }
            Ok((status, url, body)) => {
                tracing::warn!(
                    "could not check access to the {api}: HTTP {status} from {url}{}; going on",
                    scrub(error_detail(&body))
                );
                Ok(())
            }
            Err(e) if e.is_redirect() => Err(ScoreFailure {
                message: scrub(format!("the {api} redirected: {}", chain(&e))),
                attempts: 1,
                fatal: true,
            }),
            Err(e) => {
                tracing::warn!(
                    "could not check access to the {api} ({}); going on",
                    scrub(chain(&e))
                );
                Ok(())
            }
        }
    }

    /// Grades every input, at most `concurrency` requests in flight; result `i` is input `i`'s,
    /// with the tokens its requests cost.
    pub fn score_all(&self, inputs: &[ImageInput<'_>]) -> Vec<(Graded, TokenUsage)> {
        let Some(runtime) = &self.runtime else {
            return inputs
                .iter()
                .map(|_| {
                    let f = failure("the verifier's runtime was shut down".into(), 0);
                    (Err(f), TokenUsage::default())
                })
                .collect();
        };
        // Owned jobs, so the tasks can be spawned on the runtime ('static).
        let jobs: Vec<Result<(String, String), String>> = inputs
            .iter()
            .map(|input| super::png_base64(input.image).map(|png| (input.prompt.to_string(), png)))
            .collect();
        let semaphore = Arc::clone(&self.semaphore);
        let task = Arc::new(Task {
            client: self.client.clone(),
            protocol: Arc::clone(&self.protocol),
            counters: Arc::clone(&self.counters),
            settings: self.settings,
            key: self.key.clone(),
        });
        let work = async move {
            let handles: Vec<_> = jobs
                .into_iter()
                .map(|job| {
                    let task = Arc::clone(&task);
                    let semaphore = Arc::clone(&semaphore);
                    tokio::spawn(async move {
                        let none = TokenUsage::default();
                        let (prompt, png) = match job {
                            Ok(job) => job,
                            Err(message) => return (Err(failure(message, 0)), none),
                        };
                        let Ok(_permit) = semaphore.acquire_owned().await else {
                            let f = failure("the request queue was closed".into(), 0);
                            return (Err(f), none);
                        };
                        task.grade_one(&prompt, &png).await
                    })
                })
                .collect();
            let mut results = Vec::with_capacity(handles.len());
            for handle in handles {
                results.push(match handle.await {
                    Ok(result) => result,
                    Err(e) => (
                        Err(failure(format!("the grading task failed: {e}"), 0)),
                        TokenUsage::default(),
                    ),
                });
            }
            results
        };
        block_on(runtime, work)
    }
}

impl<P: Protocol> Drop for Engine<P> {
    fn drop(&mut self) {
        // Safe to call from inside or outside an async context, unlike dropping the runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn failure(message: String, attempts: u32) -> ScoreFailure {
    ScoreFailure {
        message,
        attempts,
        fatal: false,
    }
}

/// Runs `future` to completion on `runtime`, from a helper thread when the caller is itself
/// inside a tokio runtime (where blocking on another runtime is not allowed).
fn block_on<F>(runtime: &Runtime, future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(
            |scope| match scope.spawn(|| runtime.block_on(future)).join() {
                Ok(output) => output,
                Err(panic) => std::panic::resume_unwind(panic),
            },
        )
    } else {
        runtime.block_on(future)
    }
}

/// What a grading task needs, shared by all tasks of one `score_all` call.
struct Task<P: Protocol> {
    client: reqwest::Client,
    protocol: Arc<P>,
    counters: Arc<Counters>,
    settings: EngineSettings,
    key: Option<ApiKey>,
}

impl<P: Protocol> Task<P> {
    /// `text` with the API key (if any) replaced by `[redacted]`.
    fn scrub(&self, text: String) -> String {
        match &self.key {
            Some(key) => key.redact(&text),
            None => text,
        }
    }

    /// Grades one image: retries transport failures up to `max_attempts` requests and re-asks
    /// after invalid replies up to `max_invalid_replies` times. Every message is scrubbed of
    /// the key before it is logged or returned. Also returns the tokens all its requests cost.
    async fn grade_one(&self, prompt: &str, png: &str) -> (Graded, TokenUsage) {
        let mut usage = TokenUsage::default();
        let graded = self.grade_counted(prompt, png, &mut usage).await;
        (graded, usage)
    }

    async fn grade_counted(&self, prompt: &str, png: &str, usage: &mut TokenUsage) -> Graded {
        let api = self.protocol.api_name();
        let settings = self.settings;
        let mut attempts = 0u32;
        let mut transport_failures = 0u32;
        let mut invalid_replies = 0u32;
        loop {
            attempts += 1;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let outcome = attempt(
                &self.client,
                &*self.protocol,
                settings.timeout,
                prompt,
                png,
                &self.counters,
                usage,
            )
            .await;
            if !matches!(outcome, Outcome::Graded(_)) {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
            }
            match outcome {
                Outcome::Graded(grading) => return Ok(grading),
                Outcome::Invalid(reason) => {
                    let reason = self.scrub(reason);
                    invalid_replies += 1;
                    if invalid_replies > settings.max_invalid_replies {
                        return Err(failure(
                            format!(
                                "the {api}'s reply did not fit the grading schema: {reason} \
                                 (re-asked {} time(s), verifier_args.max_invalid_replies)",
                                settings.max_invalid_replies
                            ),
                            attempts,
                        ));
                    }
                    tracing::warn!("{api}: invalid reply, asking again: {reason}");
                }
                Outcome::Retry {
                    message,
                    retry_after,
                } => {
                    let message = self.scrub(message);
                    transport_failures += 1;
                    if transport_failures >= settings.retry.max_attempts {
                        return Err(failure(
                            format!(
                                "{message} (gave up after {transport_failures} failed \
                                 request(s), verifier_args.max_attempts)"
                            ),
                            attempts,
                        ));
                    }
                    let wait =
                        settings
                            .retry
                            .delay(transport_failures, retry_after, &mut rand::rng());
                    tracing::warn!("{api}: {message}; retrying in {:.2} s", wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                }
                Outcome::Fatal { message, run } => {
                    return Err(ScoreFailure {
                        fatal: run,
                        ..failure(self.scrub(message), attempts)
                    })
                }
            }
        }
    }
}

/// Sends one request and classifies what came back.
async fn attempt<P: Protocol>(
    client: &reqwest::Client,
    protocol: &P,
    timeout: Duration,
    prompt: &str,
    png: &str,
    counters: &Counters,
    usage: &mut TokenUsage,
) -> Outcome {
    let api = protocol.api_name();
    let response = match protocol.request(client, prompt, png).send().await {
        Ok(response) => response,
        Err(e) => return transport_outcome(api, timeout, &e),
    };
    let status = response.status();
    let retry_after = parse_retry_after(response.headers());
    let body = match read_capped(response, MAX_REPLY_BYTES).await {
        Ok(Some(body)) => body,
        Ok(None) => {
            return Outcome::Retry {
                message: format!(
                    "the {api}'s reply is larger than {} MiB; a grading is a few kilobytes, so \
                     this is not one (check verifier_args.base_url)",
                    MAX_REPLY_BYTES >> 20
                ),
                retry_after: None,
            }
        }
        Err(e) => return transport_outcome(api, timeout, &e),
    };
    if status.is_success() {
        // Every reply is paid for, also one that does not fit the schema.
        if let Some((input, output)) = protocol.usage(&body) {
            counters.input_tokens.fetch_add(input, Ordering::Relaxed);
            counters.output_tokens.fetch_add(output, Ordering::Relaxed);
            *usage += TokenUsage {
                input_tokens: input,
                output_tokens: output,
            };
        }
        return match protocol.parse_reply(&body) {
            Ok(grading) => Outcome::Graded(grading),
            Err(reason) => Outcome::Invalid(reason),
        };
    }
    let detail = error_detail(&body);
    if status == StatusCode::TOO_MANY_REQUESTS && is_quota_exhausted(&body) {
        Outcome::Fatal {
            message: format!(
                "HTTP {status} from the {api}: the quota is used up{detail}; raise the quota or \
                 wait for it to reset, then resume"
            ),
            run: true,
        }
    } else if status == StatusCode::TOO_MANY_REQUESTS {
        Outcome::Retry {
            message: format!(
                "HTTP {status} from the {api} (rate limited{detail}); lower \
                 verifier_args.concurrency or check your quota"
            ),
            retry_after,
        }
    } else if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        Outcome::Retry {
            message: format!("HTTP {status} from the {api}{detail}"),
            retry_after,
        }
    } else {
        Outcome::Fatal {
            message: format!(
                "HTTP {status} from the {api}{detail}; {}",
                protocol.advice(status)
            ),
            run: is_fatal_for_the_run(status),
        }
    }
}

/// A transport error (no HTTP status) as an outcome: timeouts and connection problems are
/// retried, a request that cannot even be built is not.
fn transport_outcome(api: &str, timeout: Duration, error: &reqwest::Error) -> Outcome {
    if error.is_redirect() {
        return Outcome::Fatal {
            message: format!("the {api} redirected: {}", chain(error)),
            run: true,
        };
    }
    if error.is_builder() {
        return Outcome::Fatal {
            message: format!("cannot build the request to the {api}: {}", chain(error)),
            run: true,
        };
    }
    let message = if error.is_timeout() {
        format!(
            "the request to the {api} timed out after {} s; raise verifier_args.timeout_s",
            timeout.as_secs_f64()
        )
    } else if error.is_connect() {
        format!(
            "cannot connect to the {api} ({}); check verifier_args.base_url and the network",
            chain(error)
        )
    } else {
        format!("the request to the {api} failed: {}", chain(error))
    };
    Outcome::Retry {
        message,
        retry_after: None,
    }
}

/// A config value (e.g. `verifier_args.model_name`) made safe as one URL path segment: every
/// byte but the unreserved `A-Z a-z 0-9 - . _ ~` is percent-encoded, so `/`, `?`, `#` cannot
/// change where a request goes.
pub fn path_segment(value: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(value, RESERVED).to_string()
}

/// Follows redirects (at most 5) within the configured origin only: a redirect to another
/// scheme, host or port is refused, so the credential headers (`x-goog-api-key`,
/// `Authorization`) are never sent anywhere but the configured base URL.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let first = attempt.previous().first().map(|u| u.origin());
        if first.is_some_and(|origin| origin != attempt.url().origin()) {
            let to = attempt.url().origin().ascii_serialization();
            attempt.error(format!(
                "refused a redirect to another origin ({to}); the API key is only sent to the \
                 configured base URL: set verifier_args.base_url to the server's real address"
            ))
        } else if attempt.previous().len() > 5 {
            attempt.error("more than 5 redirects")
        } else {
            attempt.follow()
        }
    })
}

/// The largest reply body read (a grading is a few kilobytes): a larger one is a transient
/// failure, never a multi-gigabyte allocation.
pub const MAX_REPLY_BYTES: usize = 8 << 20;

/// The body of `response` as text, read chunk by chunk; `None` when it is longer than `cap`
/// bytes (by its `Content-Length` or as it arrives), without reading further.
async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Option<String>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if bytes.len() + chunk.len() > cap {
            return Ok(None);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Whether a non-retried status means no other request can succeed: a rejected key (401, 403),
/// an unknown model or endpoint (404), a request whose form the API refuses (400).
pub fn is_fatal_for_the_run(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_REQUEST
            | StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::NOT_FOUND
    )
}

/// Whether a 429 body says the quota is used up (OpenAI's `insufficient_quota`, Gemini's daily
/// quota), not that requests come too fast: waiting seconds will not help.
pub fn is_quota_exhausted(body: &str) -> bool {
    let lower = body.to_ascii_lowercase();
    lower.contains("insufficient_quota")
        || (lower.contains("quota")
            && (lower.contains("per day")
                || lower.contains("perday")
                || lower.contains("daily")
                || lower.contains("exceeded your current quota")))
}

/// An error and its sources, joined by ": ".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The server's own error message (`error.message` in both APIs' error bodies) or a preview
/// of the body, as ": ..." for appending; empty when the body is empty.
fn error_detail(body: &str) -> String {
    if body.trim().is_empty() {
        return String::new();
    }
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message")?.as_str().map(str::to_string));
    match message {
        Some(message) => format!(": {}", preview(&message)),
        None => format!(": {}", preview(body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    #[test]
    fn backoff_doubles_within_jitter_bounds() {
        let policy = RetryPolicy::standard(5);
        for failures in 1..=4u32 {
            let full = Duration::from_secs(1u64 << (failures - 1));
            let wait = policy.delay(failures, None, &mut rng());
            assert!(wait >= full / 2 && wait <= full, "{failures}: {wait:?}");
        }
    }

    #[test]
    fn backoff_is_capped() {
        let policy = RetryPolicy::standard(50);
        assert!(policy.delay(40, None, &mut rng()) <= Duration::from_secs(60));
    }

    #[test]
    fn retry_after_raises_the_wait_up_to_the_cap() {
        let policy = RetryPolicy::standard(5);
        let wait = policy.delay(1, Some(Duration::from_secs(7)), &mut rng());
        assert_eq!(wait, Duration::from_secs(7));
        let capped = policy.delay(1, Some(Duration::from_secs(3600)), &mut rng());
        assert_eq!(capped, Duration::from_secs(60));
    }

    #[test]
    fn retry_after_seconds_are_parsed() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(parse_retry_after(&headers), None);
    }

    #[test]
    fn error_detail_prefers_the_api_message() {
        let body = r#"{"error": {"code": 400, "message": "model not found", "status": "X"}}"#;
        assert_eq!(error_detail(body), ": \"model not found\"");
        assert_eq!(error_detail(""), "");
    }
}
