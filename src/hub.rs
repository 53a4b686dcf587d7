//! The Hugging Face Hub over HTTP, shared by model loading and the prompt dataset: its settings as
//! `huggingface_hub` reads them from the environment, and a blocking client with a connect and a
//! read timeout on every request and retries with backoff for what may pass (connection errors,
//! timeouts, cut-off bodies, 429, 5xx). Errors name the URL, the attempts and `HF_ENDPOINT`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::blocking::{Client, Response};
use reqwest::header::{HeaderMap, AUTHORIZATION, RANGE};

/// The Hub endpoint used when `HF_ENDPOINT` is unset.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Seconds to wait for a connection, and for the headers of a metadata request, when
/// `HF_HUB_ETAG_TIMEOUT` is unset.
pub const DEFAULT_CONNECT_TIMEOUT_S: u64 = 10;
/// Seconds a download may go without receiving a byte when `HF_HUB_DOWNLOAD_TIMEOUT` is unset.
pub const DEFAULT_READ_TIMEOUT_S: u64 = 30;
/// Requests made for one URL before giving up on a transient failure.
pub const DEFAULT_ATTEMPTS: u32 = 5;

/// How to reach the Hub: endpoint, token, cache, offline mode, timeouts and retries.
#[derive(Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// Base URL without a trailing slash (`HF_ENDPOINT`).
    pub endpoint: String,
    /// Access token sent as `Authorization: Bearer` to the endpoint only (`HF_TOKEN`, else the
    /// token file).
    pub token: Option<String>,
    /// Hub cache folder (`HF_HUB_CACHE`, else `$HF_HOME/hub`...); `None` when no home is known.
    pub cache_dir: Option<PathBuf>,
    /// Never use the network (`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set to 1/true/yes/on).
    pub offline: bool,
    /// Limit for connecting and for a response's headers (`HF_HUB_ETAG_TIMEOUT`, seconds).
    pub connect_timeout: Duration,
    /// Limit for each read of a response body, i.e. how long a transfer may stall
    /// (`HF_HUB_DOWNLOAD_TIMEOUT`, seconds).
    pub read_timeout: Duration,
    /// Requests per URL before a transient failure is reported.
    pub attempts: u32,
    /// Wait before the first retry; doubled for each further one.
    pub backoff: Duration,
}

impl std::fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("attempts", &self.attempts)
            .field("backoff", &self.backoff)
            .finish()
    }
}

impl HubSettings {
    /// The settings of the process environment (see [`HubSettings::from_vars`]).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The settings read through `var` (an environment lookup), following `huggingface_hub`:
    /// `HF_ENDPOINT`; `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, else `$HF_HOME/token`);
    /// cache `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
    /// `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE`; `HF_HUB_ETAG_TIMEOUT` and
    /// `HF_HUB_DOWNLOAD_TIMEOUT` in seconds (a value that is not a positive number is ignored).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let non_empty = |name: &str| {
            var(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let home = non_empty("HOME").map(PathBuf::from);
        let expand = |value: String| -> PathBuf {
            match (value.strip_prefix("~/"), &home) {
                (Some(rest), Some(home)) => home.join(rest),
                _ if value == "~" => home.clone().unwrap_or_else(|| PathBuf::from(&value)),
                _ => PathBuf::from(value),
            }
        };
        let hf_home = non_empty("HF_HOME").map(&expand).or_else(|| {
            non_empty("XDG_CACHE_HOME")
                .map(&expand)
                .or_else(|| home.as_ref().map(|h| h.join(".cache")))
                .map(|cache| cache.join("huggingface"))
        });
        let cache_dir = non_empty("HF_HUB_CACHE")
            .or_else(|| non_empty("HUGGINGFACE_HUB_CACHE"))
            .map(&expand)
            .or_else(|| hf_home.as_ref().map(|h| h.join("hub")));
        let token_file = non_empty("HF_TOKEN_PATH")
            .map(&expand)
            .or_else(|| hf_home.as_ref().map(|h| h.join("token")));
        let token = non_empty("HF_TOKEN")
            .or_else(|| non_empty("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let text = std::fs::read_to_string(token_file?).ok()?;
                Some(text.trim().to_string()).filter(|t| !t.is_empty())
            });
        let is_true = |name: &str| {
            non_empty(name).is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
            })
        };
        let seconds = |name: &str, default: u64| {
            non_empty(name)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
                .map_or(Duration::from_secs(default), Duration::from_secs_f64)
        };
        Self {
            endpoint: non_empty("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token,
            cache_dir,
            offline: is_true("HF_HUB_OFFLINE") || is_true("TRANSFORMERS_OFFLINE"),
            connect_timeout: seconds("HF_HUB_ETAG_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_S),
            read_timeout: seconds("HF_HUB_DOWNLOAD_TIMEOUT", DEFAULT_READ_TIMEOUT_S),
            attempts: DEFAULT_ATTEMPTS,
            backoff: Duration::from_secs(1),
        }
    }
}

/// A Hub request failed.
#[derive(Debug, thiserror::Error)]
pub enum HubHttpError {
    /// No usable answer after the retries: connection refused or reset, DNS, TLS, a timeout, a
    /// body cut off.
    #[error(
        "GET {url} failed after {attempts} attempt(s): {message}; check the network connection \
         and proxies, or HF_ENDPOINT (now {endpoint})"
    )]
    Network {
        /// The URL requested.
        url: String,
        /// Requests made.
        attempts: u32,
        /// The last failure.
        message: String,
        /// The endpoint in use.
        endpoint: String,
    },
    /// The Hub answered with an error status (after retries for 429 and 5xx).
    #[error("GET {url} answered HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        /// The URL requested.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The start of the body (200 characters).
        body: String,
    },
    /// A local file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A successful response, read whole.
#[derive(Debug)]
pub struct Fetched {
    /// The HTTP status (2xx, or 3xx when redirects are not followed).
    pub status: u16,
    /// The response headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Vec<u8>,
}

/// A blocking Hub client with the timeouts and retries of its [`HubSettings`].
#[derive(Debug)]
pub struct HubHttp {
    settings: HubSettings,
    follow: Client,
    no_follow: Client,
}

/// Whether `status` may pass on its own (rate limit, server trouble).
fn transient_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

impl HubHttp {
    /// A client for `settings`.
    pub fn new(settings: HubSettings) -> Result<Self, HubHttpError> {
        let build = |redirects: reqwest::redirect::Policy| {
            Client::builder()
                .user_agent(concat!("tt-scale/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(settings.connect_timeout)
                // Blocking reqwest applies this to the headers and to each read of the body:
                // a limit on stalls, not on the length of a transfer.
                .timeout(settings.read_timeout.max(settings.connect_timeout))
                .redirect(redirects)
                .build()
                .map_err(|e| HubHttpError::Network {
                    url: settings.endpoint.clone(),
                    attempts: 0,
                    message: format!("cannot set up the HTTP client: {e}"),
                    endpoint: settings.endpoint.clone(),
                })
        };
        let follow = build(reqwest::redirect::Policy::limited(10))?;
        let no_follow = build(reqwest::redirect::Policy::none())?;
        Ok(Self {
            settings,
            follow,
            no_follow,
        })
    }

    /// The settings in use.
    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    /// Sends one GET of `url` (bytes `start..end` when `range` is given); the token goes only to
    /// the endpoint's origin (reqwest drops it on a redirect to another host).
    fn send(
        &self,
        url: &str,
        range: Option<(u64, u64)>,
        follow: bool,
    ) -> reqwest::Result<Response> {
        let client = if follow {
            &self.follow
        } else {
            &self.no_follow
        };
        let mut request = client.get(url);
        if let Some(token) = &self.settings.token {
            if same_origin(url, &self.settings.endpoint) {
                request = request.header(AUTHORIZATION, format!("Bearer {token}"));
            }
        }
        if let Some((start, end)) = range {
            let end = if end == u64::MAX {
                String::new()
            } else {
                (end - 1).to_string()
            };
            request = request.header(RANGE, format!("bytes={start}-{end}"));
        }
        request.send()
    }

    /// Runs `attempt` until it succeeds, fails for good, or the attempts are spent, waiting
    /// between tries. `attempt` returns `Err(Some(status))` for an error status it got,
    /// `Err(None)` with a message for a transport failure.
    fn retrying<T>(
        &self,
        url: &str,
        mut attempt: impl FnMut() -> Result<T, (Option<(u16, String)>, String)>,
    ) -> Result<T, HubHttpError> {
        let attempts = self.settings.attempts.max(1);
        let mut wait = self.settings.backoff;
        let mut n = 1;
        loop {
            match attempt() {
                Ok(v) => return Ok(v),
                Err((Some((status, body)), _)) if !transient_status(status) || n == attempts => {
                    return Err(HubHttpError::Status {
                        url: url.to_string(),
                        status,
                        body,
                    })
                }
                Err((_, message)) if n == attempts => {
                    return Err(HubHttpError::Network {
                        url: url.to_string(),
                        attempts,
                        message,
                        endpoint: self.settings.endpoint.clone(),
                    })
                }
                Err((_, message)) => {
                    tracing::warn!(
                        "GET {url}: {message}; retrying in {:.0} s (attempt {n} of {attempts})",
                        wait.as_secs_f64()
                    );
                    std::thread::sleep(wait);
                    wait *= 2;
                    n += 1;
                }
            }
        }
    }

    /// GETs `url` (bytes `start..end` when `range` is given) and reads the whole body, retrying
    /// transient failures. Without `follow`, a 3xx answer is returned as it is (its `Location`
    /// in the headers).
    pub fn get(
        &self,
        url: &str,
        range: Option<(u64, u64)>,
        follow: bool,
    ) -> Result<Fetched, HubHttpError> {
        self.retrying(url, || {
            let response = self
                .send(url, range, follow)
                .map_err(|e| (None, describe(&e)))?;
            let status = response.status().as_u16();
            let ok =
                response.status().is_success() || (!follow && response.status().is_redirection());
            if !ok {
                let body: String = response
                    .text()
                    .unwrap_or_default()
                    .chars()
                    .take(200)
                    .collect();
                return Err((Some((status, body)), format!("HTTP {status}")));
            }
            let headers = response.headers().clone();
            let mut body = Vec::new();
            let mut response = response;
            response
                .read_to_end(&mut body)
                .map_err(|e| (None, format!("the body was cut off: {e}")))?;
            Ok(Fetched {
                status,
                headers,
                body,
            })
        })
    }

    /// Downloads `url` into the file `part` (appending to what it already holds, with a range
    /// request, so an interrupted transfer resumes), retrying transient failures; returns the
    /// file's final size. `expected` is the size the file must reach, when known.
    pub fn download(
        &self,
        url: &str,
        part: &Path,
        expected: Option<u64>,
    ) -> Result<u64, HubHttpError> {
        let write_err = |source| HubHttpError::Write {
            path: part.to_path_buf(),
            source,
        };
        if let Some(dir) = part.parent() {
            std::fs::create_dir_all(dir).map_err(write_err)?;
        }
        self.retrying(url, || {
            let have = std::fs::metadata(part).map_or(0, |m| m.len());
            if expected == Some(have) {
                return Ok(have);
            }
            let range = (have > 0).then_some((have, u64::MAX));
            let mut response = self
                .send(url, range, true)
                .map_err(|e| (None, describe(&e)))?;
            let status = response.status().as_u16();
            let append = match status {
                206 => true,
                200 => false,
                416 if expected.is_none() => return Ok(have),
                _ => {
                    let body: String = response
                        .text()
                        .unwrap_or_default()
                        .chars()
                        .take(200)
                        .collect();
                    return Err((Some((status, body)), format!("HTTP {status}")));
                }
            };
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .open(part)
                .map_err(|e| (None, format!("cannot write {}: {e}", part.display())))?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = response
                    .read(&mut buf)
                    .map_err(|e| (None, format!("the transfer stalled or was cut off: {e}")))?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])
                    .map_err(|e| (None, format!("cannot write {}: {e}", part.display())))?;
            }
            let file = out
                .into_inner()
                .map_err(|e| (None, format!("cannot write {}: {e}", part.display())))?;
            file.sync_all()
                .map_err(|e| (None, format!("cannot write {}: {e}", part.display())))?;
            let size = file.metadata().map_or(0, |m| m.len());
            match expected {
                Some(e) if size < e => Err((
                    None,
                    format!("the transfer ended after {size} of {e} bytes"),
                )),
                _ => Ok(size),
            }
        })
    }
}

/// A transport error in words: which phase failed.
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut message = format!("{what}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    message
}

/// Percent-encodes everything but RFC 3986 unreserved characters (and `/` when `keep_slash`),
/// for a value put into a URL path or query.
pub fn percent_encode(text: &str, keep_slash: bool) -> String {
    const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    const UNRESERVED_AND_SLASH: &percent_encoding::AsciiSet = &UNRESERVED.remove(b'/');
    let set = if keep_slash {
        UNRESERVED_AND_SLASH
    } else {
        UNRESERVED
    };
    percent_encoding::utf8_percent_encode(text, set).to_string()
}

/// Whether `url` has the scheme, host and port of `base`.
pub fn same_origin(url: &str, base: &str) -> bool {
    match (reqwest::Url::parse(url), reqwest::Url::parse(base)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_follow_huggingface_hub_variables() {
        let s = HubSettings::from_vars(|name| match name {
            "HF_ENDPOINT" => Some("http://mirror/".into()),
            "HF_HOME" => Some("/data/hf".into()),
            "HF_TOKEN" => Some(" hf_abc ".into()),
            "HF_HUB_OFFLINE" => Some("yes".into()),
            "HF_HUB_ETAG_TIMEOUT" => Some("2.5".into()),
            "HF_HUB_DOWNLOAD_TIMEOUT" => Some("-1".into()),
            _ => None,
        });
        assert_eq!(s.endpoint, "http://mirror");
        assert_eq!(s.cache_dir, Some(PathBuf::from("/data/hf/hub")));
        assert_eq!(s.token.as_deref(), Some("hf_abc"));
        assert!(s.offline);
        assert_eq!(s.connect_timeout, Duration::from_millis(2500));
        assert_eq!(
            s.read_timeout,
            Duration::from_secs(DEFAULT_READ_TIMEOUT_S),
            "a negative timeout is ignored"
        );
        assert!(
            !format!("{s:?}").contains("hf_abc"),
            "the token is redacted"
        );
    }

    #[test]
    fn values_are_percent_encoded_for_url_paths() {
        assert_eq!(percent_encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(percent_encode("unet/a b.json", true), "unet/a%20b.json");
        assert_eq!(percent_encode("ü~", false), "%C3%BC~");
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        assert!(same_origin(
            "https://huggingface.co/a/b",
            "https://huggingface.co"
        ));
        assert!(same_origin(
            "https://huggingface.co:443/a",
            "https://huggingface.co"
        ));
        assert!(!same_origin(
            "https://cdn-lfs.hf.co/a",
            "https://huggingface.co"
        ));
        assert!(!same_origin("http://127.0.0.1:81/a", "http://127.0.0.1:80"));
        assert!(!same_origin("not a url", "https://huggingface.co"));
    }
}
