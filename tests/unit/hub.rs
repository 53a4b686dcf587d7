//! Model files from the Hub: a fake Hub on loopback serving the tiny SD 1.5 folder the way
//! huggingface.co does (the model API's file list; `resolve` answering a one-byte range with
//! `X-Repo-Commit` and the ETag, large files redirected to storage on another origin). Files land
//! in `huggingface_hub`'s cache layout and are then found offline; a cut transfer resumes with a
//! range request; a stalled Hub times out naming the URL and `HF_ENDPOINT`; the token never
//! leaves the endpoint's origin.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tt_scale::hub::HubSettings;
use tt_scale::loading::{Dtype, ModelSource};

const REPO: &str = "tt-scale/tiny-sd15";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd15")
}

/// Every file of `dir`, by its path relative to `dir` with `/` separators.
fn repo_files(dir: &Path, prefix: &str, out: &mut HashMap<String, Vec<u8>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if path.is_dir() {
            repo_files(&path, &rel, out);
        } else {
            out.insert(rel, std::fs::read(&path).unwrap());
        }
    }
}

/// A request as a server saw it: (which server, path, Authorization, Range).
type Seen = (&'static str, String, Option<String>, Option<String>);

#[derive(Default)]
struct State {
    files: HashMap<String, Vec<u8>>,
    /// `Authorization` header required by the Hub (401 without it).
    token: Option<String>,
    /// Every request: (server, path, Authorization, Range).
    requests: Mutex<Vec<Seen>>,
    /// Cut the next storage transfer after this many bytes (0: never).
    cut_after: AtomicUsize,
    /// Never answer.
    stall: AtomicBool,
    /// The storage server's base URL (another origin).
    storage: Mutex<String>,
}

fn etag(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Serves on a new loopback port; returns its base URL.
fn listen(state: Arc<State>, server: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let state = Arc::clone(&state);
            std::thread::spawn(move || serve(stream, &state, server));
        }
    });
    base
}

fn serve(stream: TcpStream, state: &State, server: &'static str) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let auth = headers.get("authorization").cloned();
    let range = headers.get("range").cloned();
    state
        .requests
        .lock()
        .unwrap()
        .push((server, target.clone(), auth.clone(), range.clone()));
    if state.stall.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_secs(30));
        return;
    }
    let mut out = stream;
    let reply = |out: &mut TcpStream, status: u16, extra: &str, body: &[u8], sent: usize| {
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
            body.len()
        );
        let _ = out.write_all(head.as_bytes());
        let _ = out.write_all(&body[..sent.min(body.len())]);
    };
    let needs_token = server == "hub" && state.token.is_some();
    if needs_token && auth != state.token.as_ref().map(|t| format!("Bearer {t}")) {
        return reply(&mut out, 401, "", b"unauthorized", usize::MAX);
    }
    let range_start = |range: &Option<String>| -> Option<usize> {
        range
            .as_deref()?
            .strip_prefix("bytes=")?
            .split('-')
            .next()?
            .parse()
            .ok()
    };
    if server == "storage" {
        let tag = target.trim_start_matches("/blob/");
        let Some(bytes) = state.files.values().find(|b| etag(b) == tag) else {
            return reply(&mut out, 404, "", b"", 0);
        };
        let start = range_start(&range).unwrap_or(0);
        let body = &bytes[start..];
        let cut = state.cut_after.swap(0, Ordering::SeqCst);
        let sent = if cut > 0 { cut } else { usize::MAX };
        let (status, extra) = if range.is_some() {
            (
                206,
                format!(
                    "Content-Range: bytes {start}-{}/{}\r\n",
                    bytes.len() - 1,
                    bytes.len()
                ),
            )
        } else {
            (200, String::new())
        };
        return reply(&mut out, status, &extra, body, sent);
    }
    if let Some(_rev) = target.strip_prefix(&format!("/api/models/{REPO}/revision/")) {
        let siblings: Vec<serde_json::Value> = state
            .files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
        return reply(&mut out, 200, "", body.as_bytes(), usize::MAX);
    }
    let prefix = format!("/{REPO}/resolve/main/");
    let Some(rel) = target.strip_prefix(&prefix) else {
        return reply(&mut out, 404, "", b"", 0);
    };
    let Some(bytes) = state.files.get(rel) else {
        return reply(&mut out, 404, "X-Error-Code: EntryNotFound\r\n", b"", 0);
    };
    let tag = etag(bytes);
    if rel.ends_with(".safetensors") {
        // Large files live in storage on another origin, as LFS files do.
        let storage = state.storage.lock().unwrap().clone();
        let extra = format!(
            "X-Repo-Commit: {COMMIT}\r\nX-Linked-Etag: \"{tag}\"\r\nX-Linked-Size: {}\r\nLocation: {storage}/blob/{tag}\r\n",
            bytes.len()
        );
        return reply(&mut out, 302, &extra, b"", 0);
    }
    // Small files come from the Hub itself; a range is honoured.
    let mut extra = format!("X-Repo-Commit: {COMMIT}\r\nETag: \"{tag}\"\r\n");
    let Some(spec) = range.as_deref().and_then(|r| r.strip_prefix("bytes=")) else {
        return reply(&mut out, 200, &extra, bytes, usize::MAX);
    };
    let (start, end) = spec.split_once('-').unwrap();
    let start: usize = start.parse().unwrap();
    let end: usize = end.parse().map_or(bytes.len(), |e: usize| e + 1);
    extra.push_str(&format!(
        "Content-Range: bytes {start}-{}/{}\r\n",
        end - 1,
        bytes.len()
    ));
    reply(&mut out, 206, &extra, &bytes[start..end], usize::MAX)
}

struct FakeHub {
    endpoint: String,
    state: Arc<State>,
}

impl FakeHub {
    fn start(token: Option<&str>) -> Self {
        let mut files = HashMap::new();
        repo_files(&tiny_model(), "", &mut files);
        let state = Arc::new(State {
            files,
            token: token.map(str::to_string),
            ..State::default()
        });
        let endpoint = listen(Arc::clone(&state), "hub");
        let storage = listen(Arc::clone(&state), "storage");
        *state.storage.lock().unwrap() = storage;
        Self { endpoint, state }
    }

    fn settings(&self, cache: &Path) -> HubSettings {
        HubSettings {
            endpoint: self.endpoint.clone(),
            token: self.state.token.clone(),
            cache_dir: Some(cache.to_path_buf()),
            offline: false,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            attempts: 3,
            backoff: Duration::from_millis(10),
        }
    }

    fn requests(&self) -> Vec<Seen> {
        self.state.requests.lock().unwrap().clone()
    }
}

#[test]
fn hub_files_land_in_the_huggingface_cache_layout_and_are_found_offline_after() {
    let hub = FakeHub::start(Some("hf_secret"));
    let cache = tempfile::tempdir().unwrap();
    let source = ModelSource::hub_with(REPO, None, hub.settings(cache.path()));
    let config = source.file("unet/config.json").unwrap();
    let weights = source.weights("unet", Dtype::F32).unwrap();
    let repo_dir = cache.path().join("models--tt-scale--tiny-sd15");
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    assert_eq!(config, snapshot.join("unet/config.json"));
    assert_eq!(
        weights,
        [snapshot.join("unet/diffusion_pytorch_model.safetensors")]
    );
    for (rel, path) in [
        ("unet/config.json", &config),
        ("unet/diffusion_pytorch_model.safetensors", &weights[0]),
    ] {
        assert_eq!(
            std::fs::read(path).unwrap(),
            std::fs::read(tiny_model().join(rel)).unwrap(),
            "{rel}"
        );
        // A link to the blob named by its ETag, as huggingface_hub lays it out.
        let bytes = std::fs::read(path).unwrap();
        let target = std::fs::read_link(path).unwrap();
        assert!(target.starts_with("../../.."), "{}", target.display());
        assert!(repo_dir.join("blobs").join(etag(&bytes)).is_file());
    }
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    // The token went to the Hub, never to storage on another origin.
    let requests = hub.requests();
    assert!(requests.iter().any(|r| r.0 == "storage"));
    for (server, path, auth, _) in &requests {
        match *server {
            "hub" => assert_eq!(auth.as_deref(), Some("Bearer hf_secret"), "{path}"),
            _ => assert_eq!(auth, &None, "the token was sent to storage: {path}"),
        }
    }

    // Offline, from the cache alone: no request, the same files; a missing one is named.
    let mut offline = hub.settings(cache.path());
    offline.offline = true;
    offline.endpoint = "http://127.0.0.1:9".into();
    let cached = ModelSource::hub_with(REPO, None, offline);
    assert_eq!(cached.file("unet/config.json").unwrap(), config);
    assert_eq!(cached.weights("unet", Dtype::F32).unwrap(), weights);
    let err = cached.file("vae/config.json").unwrap_err().to_string();
    assert!(
        err.contains("vae/config.json") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    assert_eq!(hub.requests().len(), requests.len());
}

#[test]
fn a_cut_transfer_resumes_where_it_stopped() {
    let hub = FakeHub::start(None);
    hub.state.cut_after.store(1000, Ordering::SeqCst);
    let cache = tempfile::tempdir().unwrap();
    let source = ModelSource::hub_with(REPO, None, hub.settings(cache.path()));
    let weights = source.weights("vae", Dtype::F32).unwrap();
    assert_eq!(
        std::fs::read(&weights[0]).unwrap(),
        std::fs::read(tiny_model().join("vae/diffusion_pytorch_model.safetensors")).unwrap()
    );
    let storage: Vec<Option<String>> = hub
        .requests()
        .into_iter()
        .filter(|r| r.0 == "storage")
        .map(|r| r.3)
        .collect();
    assert_eq!(
        storage,
        [None, Some("bytes=1000-".to_string())],
        "the second request asks for the rest"
    );
}

#[test]
fn a_stalled_hub_times_out_naming_the_url_and_hf_endpoint() {
    let hub = FakeHub::start(None);
    hub.state.stall.store(true, Ordering::SeqCst);
    let cache = tempfile::tempdir().unwrap();
    let mut settings = hub.settings(cache.path());
    settings.read_timeout = Duration::from_millis(400);
    settings.connect_timeout = Duration::from_millis(400);
    settings.attempts = 2;
    let source = ModelSource::hub_with(REPO, None, settings);
    let started = Instant::now();
    let err = source.file("unet/config.json").unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        err.contains(&format!(
            "{}/{REPO}/resolve/main/unet/config.json",
            hub.endpoint
        )) && err.contains("HF_ENDPOINT")
            && err.contains("timed out")
            && err.contains("2 attempt(s)"),
        "{err}"
    );
    assert_eq!(hub.requests().len(), 2);
}

#[test]
fn a_gated_repo_says_to_accept_the_license_and_set_hf_token() {
    let hub = FakeHub::start(Some("hf_secret"));
    let cache = tempfile::tempdir().unwrap();
    let mut settings = hub.settings(cache.path());
    settings.token = None;
    let source = ModelSource::hub_with(REPO, None, settings);
    let err = source.file("unet/config.json").unwrap_err().to_string();
    assert!(
        err.contains("HTTP 401") && err.contains("HF_TOKEN") && err.contains("unet/config.json"),
        "{err}"
    );
    assert_eq!(hub.requests().len(), 1, "a 401 is not retried");
}
