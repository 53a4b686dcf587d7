//! Specification of `tt_scale::prompts`: a single prompt, a prompts file, or the prompt column of a
//! Hub dataset read through HTTP range requests from a local fake Hub (parquet files written here,
//! with a large image column that must never be downloaded).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::ColumnPath;
use rand::{RngCore, SeedableRng};
use tt_scale::hub::HubSettings;
use tt_scale::prompts::{
    load_prompts, read_prompts_file, DatasetSpec, NumPrompts, PromptSource, PromptsError,
};

const REPO: &str = "test-org/image-prefs";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const MULTILINE: &str = "a lighthouse at dusk,\nwaves crashing,\r\noil painting";

// ---------------------------------------------------------------- parquet files written here

/// One row: a prompt (None = null) and an image of `image_len` random bytes.
fn write_parquet(prompts: &[Option<&str>], rows_per_group: usize, image_len: usize) -> Vec<u8> {
    let schema = parse_message_type(
        "message schema { OPTIONAL BYTE_ARRAY prompt (UTF8); OPTIONAL BYTE_ARRAY image; }",
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_column_dictionary_enabled(ColumnPath::from("image"), false)
        .set_column_statistics_enabled(ColumnPath::from("image"), EnabledStatistics::None)
        .build();
    let mut out = Vec::new();
    let mut writer =
        SerializedFileWriter::new(&mut out, Arc::new(schema), Arc::new(props)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for group in prompts.chunks(rows_per_group) {
        let mut rg = writer.next_row_group().unwrap();
        let defs: Vec<i16> = group.iter().map(|p| i16::from(p.is_some())).collect();
        let values: Vec<ByteArray> = group
            .iter()
            .flatten()
            .map(|p| ByteArray::from(*p))
            .collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&values, Some(&defs), None)
            .unwrap();
        col.close().unwrap();
        let images: Vec<ByteArray> = group
            .iter()
            .map(|_| {
                let mut image = vec![0u8; image_len];
                rng.fill_bytes(&mut image);
                ByteArray::from(image)
            })
            .collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&images, Some(&vec![1; group.len()]), None)
            .unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    writer.close().unwrap();
    out
}

/// The train split's two files' prompts (as written) and the prompts a load must return.
fn train_rows() -> (
    Vec<Option<&'static str>>,
    Vec<Option<&'static str>>,
    Vec<String>,
) {
    let first = vec![
        Some("a bustling manga street, devoid of vehicles"),
        Some("  padded prompt\t"),
        None,
        Some("   "),
        Some(MULTILINE),
        Some("Café au lait ☕ in 東京, “quoted”"),
        Some(""),
        Some("seventh"),
        Some("eighth"),
        Some("ninth"),
    ];
    let second = vec![
        Some("second file, first row"),
        Some("second file, second row"),
        Some("\n  second file, third row  \n"),
    ];
    let expected = vec![
        "a bustling manga street, devoid of vehicles",
        "padded prompt",
        MULTILINE,
        "Café au lait ☕ in 東京, “quoted”",
        "seventh",
        "eighth",
        "ninth",
        "second file, first row",
        "second file, second row",
        "second file, third row",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    (first, second, expected)
}

// ---------------------------------------------------------------- a fake Hub on 127.0.0.1

#[derive(Default)]
struct HubState {
    /// Repository files by path.
    files: HashMap<String, Vec<u8>>,
    /// Token the server demands (401 without it).
    required_token: Option<String>,
    /// Answer range requests with the whole file (200), like a server without range support.
    ignore_ranges: bool,
    /// Every request: (path and query, Authorization header).
    requests: Mutex<Vec<(String, Option<String>)>>,
    /// Body bytes served from repository files.
    file_bytes_served: AtomicU64,
    /// Requests still to answer with 503 before serving normally.
    fail_first: AtomicU64,
    /// Read requests and never answer, like a stalled proxy.
    stall: bool,
}

struct FakeHub {
    endpoint: String,
    state: Arc<HubState>,
}

impl FakeHub {
    fn start(state: HubState) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(state);
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = Arc::clone(&shared);
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        Self { endpoint, state }
    }

    fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    fn file_bytes_served(&self) -> u64 {
        self.state.file_bytes_served.load(Ordering::SeqCst)
    }

    fn spec(&self, cache: &Path) -> DatasetSpec {
        DatasetSpec {
            repo: REPO.to_string(),
            split: "train".to_string(),
            column: "prompt".to_string(),
            revision: "main".to_string(),
            hub: HubSettings {
                endpoint: self.endpoint.clone(),
                token: None,
                cache_dir: Some(cache.to_path_buf()),
                offline: false,
                connect_timeout: Duration::from_secs(5),
                read_timeout: Duration::from_secs(5),
                attempts: 3,
                backoff: Duration::from_millis(10),
            },
        }
    }
}

/// A hub holding the train split in two files, a test split and a README.
fn standard_hub() -> (FakeHub, Vec<String>) {
    let (first, second, expected) = train_rows();
    let mut state = HubState::default();
    state.files.insert(
        "data/train-00000-of-00002.parquet".into(),
        write_parquet(&first, 3, 300_000),
    );
    state.files.insert(
        "data/train-00001-of-00002.parquet".into(),
        write_parquet(&second, 2, 300_000),
    );
    state.files.insert(
        "data/test-00000-of-00001.parquet".into(),
        write_parquet(&[Some("TEST SPLIT PROMPT")], 1, 1000),
    );
    state.files.insert("README.md".into(), b"# card".to_vec());
    (FakeHub::start(state), expected)
}

fn serve(stream: TcpStream, state: &HubState) {
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
    state
        .requests
        .lock()
        .unwrap()
        .push((target.clone(), auth.clone()));
    if state.stall {
        std::thread::sleep(Duration::from_secs(30));
        return;
    }
    let failing = state
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let (status, extra, body) = if failing {
        (503, String::new(), b"overloaded".to_vec())
    } else {
        route(state, &target, auth.as_deref(), headers.get("range"))
    };
    let mut out = stream;
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    );
    let _ = out.write_all(head.as_bytes());
    let _ = out.write_all(&body);
}

fn route(
    state: &HubState,
    target: &str,
    auth: Option<&str>,
    range: Option<&String>,
) -> (u16, String, Vec<u8>) {
    if let Some(token) = &state.required_token {
        if auth != Some(format!("Bearer {token}").as_str()) {
            return (401, String::new(), b"{\"error\":\"unauthorized\"}".to_vec());
        }
    }
    let api = format!("/api/datasets/{REPO}");
    if target == format!("{api}/revision/main") {
        let body = format!("{{\"id\":\"{REPO}\",\"sha\":\"{COMMIT}\"}}");
        return (200, String::new(), body.into_bytes());
    }
    let tree = format!("{api}/tree/{COMMIT}?recursive=true");
    if target.starts_with(&tree) {
        // Two pages: the folder and README, then the files (cursor-based, like the Hub).
        let mut paths: Vec<&String> = state.files.keys().collect();
        paths.sort();
        if target == tree {
            let body = "[{\"type\":\"directory\",\"oid\":\"d\",\"size\":0,\"path\":\"data\"}]";
            let link = format!("Link: <{tree}&cursor=2>; rel=\"next\"\r\n");
            return (200, link, body.as_bytes().to_vec());
        }
        let entries: Vec<String> = paths
            .iter()
            .map(|p| {
                let size = state.files[*p].len();
                format!(
                    "{{\"type\":\"file\",\"oid\":\"x\",\"size\":{size},\"path\":\"{p}\",\
                     \"lfs\":{{\"oid\":\"y\",\"size\":{size},\"pointerSize\":130}}}}"
                )
            })
            .collect();
        return (
            200,
            String::new(),
            format!("[{}]", entries.join(",")).into_bytes(),
        );
    }
    let resolve = format!("/datasets/{REPO}/resolve/{COMMIT}/");
    if let Some(path) = target.strip_prefix(&resolve) {
        // The Hub redirects file downloads to a storage host; follow the same shape.
        return (302, format!("Location: /blobs/{path}\r\n"), Vec::new());
    }
    if let Some(path) = target.strip_prefix("/blobs/") {
        let Some(file) = state.files.get(path) else {
            return (404, String::new(), Vec::new());
        };
        let parsed = range.and_then(|r| {
            let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
            Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?))
        });
        let (status, extra, body) = match parsed {
            Some((start, end)) if !state.ignore_ranges => {
                let end = end.min(file.len() - 1);
                let header = format!("Content-Range: bytes {start}-{end}/{}\r\n", file.len());
                (206, header, file[start..=end].to_vec())
            }
            _ => (200, String::new(), file.clone()),
        };
        state
            .file_bytes_served
            .fetch_add(body.len() as u64, Ordering::SeqCst);
        return (status, extra, body);
    }
    (404, String::new(), b"{\"error\":\"not found\"}".to_vec())
}

fn cache_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ---------------------------------------------------------------- dataset

#[test]
fn dataset_prompts_come_in_file_order_trimmed_without_blanks_or_nulls() {
    let (hub, expected) = standard_hub();
    let cache = cache_dir();
    let source = PromptSource::Dataset(hub.spec(cache.path()));
    assert_eq!(load_prompts(&source, NumPrompts::All).unwrap(), expected);
}

#[test]
fn dataset_prompt_with_newlines_stays_one_prompt() {
    let (hub, _) = standard_hub();
    let cache = cache_dir();
    let prompts = load_prompts(
        &PromptSource::Dataset(hub.spec(cache.path())),
        NumPrompts::All,
    )
    .unwrap();
    assert!(prompts.iter().any(|p| p == MULTILINE));
    assert!(!prompts.iter().any(|p| p == "waves crashing,"));
}

#[test]
fn dataset_files_of_other_splits_are_ignored() {
    let (hub, _) = standard_hub();
    let cache = cache_dir();
    let prompts = load_prompts(
        &PromptSource::Dataset(hub.spec(cache.path())),
        NumPrompts::All,
    )
    .unwrap();
    assert!(!prompts.iter().any(|p| p.contains("TEST SPLIT")));
}

#[test]
fn dataset_download_is_a_small_fraction_of_the_parquet_files() {
    let (hub, _) = standard_hub();
    let cache = cache_dir();
    let total: u64 = hub
        .state
        .files
        .iter()
        .filter(|(path, _)| path.contains("train"))
        .map(|(_, bytes)| bytes.len() as u64)
        .sum();
    assert!(total > 3_000_000, "the fixture should be large, is {total}");
    load_prompts(
        &PromptSource::Dataset(hub.spec(cache.path())),
        NumPrompts::All,
    )
    .unwrap();
    let served = hub.file_bytes_served();
    assert!(
        served * 20 < total,
        "served {served} of {total} bytes (must be under 5%)"
    );
}

#[test]
fn dataset_footer_larger_than_the_prefetch_is_read_in_two_steps() {
    let prompts: Vec<String> = (0..1500).map(|i| format!("prompt number {i}")).collect();
    let rows: Vec<Option<&str>> = prompts.iter().map(|p| Some(p.as_str())).collect();
    let file = write_parquet(&rows, 1, 16);
    let tail = &file[file.len() - 8..file.len() - 4];
    let meta_len = u32::from_le_bytes(tail.try_into().unwrap());
    assert!(
        meta_len > 64 * 1024,
        "footer of {meta_len} bytes is too small for this test"
    );
    let mut state = HubState::default();
    state
        .files
        .insert("data/train-00000-of-00001.parquet".into(), file);
    let hub = FakeHub::start(state);
    let cache = cache_dir();
    let loaded = load_prompts(
        &PromptSource::Dataset(hub.spec(cache.path())),
        NumPrompts::All,
    )
    .unwrap();
    assert_eq!(loaded, prompts);
}

#[test]
fn dataset_list_is_cached_and_a_second_load_makes_no_request() {
    let (hub, expected) = standard_hub();
    let cache = cache_dir();
    let source = PromptSource::Dataset(hub.spec(cache.path()));
    load_prompts(&source, NumPrompts::All).unwrap();
    let requests = hub.request_count();
    assert_eq!(load_prompts(&source, NumPrompts::All).unwrap(), expected);
    assert_eq!(hub.request_count(), requests);
}

#[test]
fn dataset_cache_file_follows_hub_cache_layout_and_records_the_commit() {
    let (hub, expected) = standard_hub();
    let cache = cache_dir();
    load_prompts(
        &PromptSource::Dataset(hub.spec(cache.path())),
        NumPrompts::First(1),
    )
    .unwrap();
    let path = cache
        .path()
        .join("datasets--test-org--image-prefs/tt-scale/prompts-train-prompt.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(json["commit"], COMMIT);
    assert_eq!(
        json["files"][0]["path"],
        "data/train-00000-of-00002.parquet"
    );
    assert_eq!(
        json["files"][1]["path"],
        "data/train-00001-of-00002.parquet"
    );
    assert_eq!(json["prompts"].as_array().unwrap().len(), expected.len());
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary files left behind: {leftovers:?}"
    );
}

#[test]
fn offline_with_a_cached_list_needs_no_network() {
    let (hub, expected) = standard_hub();
    let cache = cache_dir();
    load_prompts(
        &PromptSource::Dataset(hub.spec(cache.path())),
        NumPrompts::All,
    )
    .unwrap();
    let mut spec = hub.spec(cache.path());
    spec.hub.offline = true;
    spec.hub.endpoint = "http://127.0.0.1:9".to_string();
    let requests = hub.request_count();
    assert_eq!(
        load_prompts(&PromptSource::Dataset(spec), NumPrompts::All).unwrap(),
        expected
    );
    assert_eq!(hub.request_count(), requests);
}

#[test]
fn offline_without_a_cached_list_is_a_clear_error() {
    let (hub, _) = standard_hub();
    let cache = cache_dir();
    let mut spec = hub.spec(cache.path());
    spec.hub.offline = true;
    let err = load_prompts(&PromptSource::Dataset(spec), NumPrompts::All).unwrap_err();
    assert!(
        matches!(err, PromptsError::OfflineWithoutCache { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("HF_HUB_OFFLINE"), "{message}");
    assert!(message.contains("--prompts-file"), "{message}");
    assert_eq!(hub.request_count(), 0);
}

#[test]
fn unauthorized_dataset_error_tells_to_set_hf_token() {
    let (first, _, _) = train_rows();
    let mut state = HubState {
        required_token: Some("hf_secret".into()),
        ..HubState::default()
    };
    state.files.insert(
        "data/train-00000-of-00001.parquet".into(),
        write_parquet(&first, 3, 10),
    );
    let hub = FakeHub::start(state);
    let cache = cache_dir();
    let err = load_prompts(
        &PromptSource::Dataset(hub.spec(cache.path())),
        NumPrompts::All,
    )
    .unwrap_err();
    assert!(
        matches!(err, PromptsError::Unauthorized { status: 401, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
}

#[test]
fn transient_hub_failures_are_retried() {
    let (hub, expected) = standard_hub();
    hub.state.fail_first.store(2, Ordering::SeqCst);
    let cache = cache_dir();
    let prompts = load_prompts(
        &PromptSource::Dataset(hub.spec(cache.path())),
        NumPrompts::All,
    )
    .unwrap();
    assert_eq!(prompts, expected);
    assert_eq!(hub.state.fail_first.load(Ordering::SeqCst), 0);
}

#[test]
fn a_stalled_hub_times_out_naming_the_url_and_hf_endpoint() {
    let hub = FakeHub::start(HubState {
        stall: true,
        ..HubState::default()
    });
    let cache = cache_dir();
    let mut spec = hub.spec(cache.path());
    spec.hub.read_timeout = Duration::from_millis(500);
    spec.hub.connect_timeout = Duration::from_millis(500);
    spec.hub.attempts = 2;
    let started = std::time::Instant::now();
    let err = load_prompts(&PromptSource::Dataset(spec), NumPrompts::All).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, PromptsError::Network { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&hub.endpoint) && message.contains("HF_ENDPOINT"),
        "{message}"
    );
    assert!(
        message.contains("2 attempt(s)") && message.contains("timed out"),
        "{message}"
    );
    assert_eq!(hub.request_count(), 2, "retried once");
}

#[test]
fn token_is_sent_as_bearer_authorization() {
    let (first, _, _) = train_rows();
    let mut state = HubState {
        required_token: Some("hf_secret".into()),
        ..HubState::default()
    };
    state.files.insert(
        "data/train-00000-of-00001.parquet".into(),
        write_parquet(&first, 3, 10),
    );
    let hub = FakeHub::start(state);
    let cache = cache_dir();
    let mut spec = hub.spec(cache.path());
    spec.hub.token = Some("hf_secret".into());
    let prompts = load_prompts(&PromptSource::Dataset(spec), NumPrompts::First(1)).unwrap();
    assert_eq!(prompts, vec!["a bustling manga street, devoid of vehicles"]);
    let requests = hub.state.requests.lock().unwrap();
    assert!(requests
        .iter()
        .all(|(_, auth)| auth.as_deref() == Some("Bearer hf_secret")));
}

#[test]
fn server_without_range_support_is_an_error_not_a_full_download() {
    let (hub_files, _) = standard_hub();
    let files = hub_files.state.files.clone();
    let hub = FakeHub::start(HubState {
        files,
        ignore_ranges: true,
        ..HubState::default()
    });
    let cache = cache_dir();
    let err = load_prompts(
        &PromptSource::Dataset(hub.spec(cache.path())),
        NumPrompts::All,
    )
    .unwrap_err();
    assert!(
        matches!(err, PromptsError::BadRange { status: 200, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("range"), "{err}");
}

#[test]
fn missing_column_error_lists_the_columns() {
    let (hub, _) = standard_hub();
    let cache = cache_dir();
    let mut spec = hub.spec(cache.path());
    spec.column = "caption".into();
    let err = load_prompts(&PromptSource::Dataset(spec), NumPrompts::All).unwrap_err();
    assert!(matches!(err, PromptsError::MissingColumn { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("caption") && message.contains("image"),
        "{message}"
    );
}

#[test]
fn unknown_split_error_lists_the_parquet_files() {
    let (hub, _) = standard_hub();
    let cache = cache_dir();
    let mut spec = hub.spec(cache.path());
    spec.split = "validation".into();
    let err = load_prompts(&PromptSource::Dataset(spec), NumPrompts::All).unwrap_err();
    assert!(matches!(err, PromptsError::NoSplitFiles { .. }), "{err:?}");
    assert!(
        err.to_string().contains("data/test-00000-of-00001.parquet"),
        "{err}"
    );
}

#[test]
fn default_dataset_spec_is_the_open_image_preferences_train_prompts() {
    let spec = DatasetSpec::from_vars(|name| match name {
        "HF_HUB_CACHE" => Some("/cache/hub".into()),
        "HF_TOKEN" => Some("hf_x".into()),
        _ => None,
    });
    assert_eq!(
        spec.repo,
        "data-is-better-together/open-image-preferences-v1-binarized"
    );
    assert_eq!(
        (spec.split.as_str(), spec.column.as_str()),
        ("train", "prompt")
    );
    assert_eq!(spec.hub.endpoint, "https://huggingface.co");
    assert_eq!(spec.hub.token.as_deref(), Some("hf_x"));
    assert!(!spec.hub.offline);
    assert_eq!(
        spec.cache_file().unwrap(),
        PathBuf::from("/cache/hub/datasets--data-is-better-together--open-image-preferences-v1-binarized/tt-scale/prompts-train-prompt.json")
    );
    assert!(
        !format!("{spec:?}").contains("hf_x"),
        "Debug must not show the token"
    );
}

// ---------------------------------------------------------------- selection

#[test]
fn first_n_keeps_the_first_prompts_in_order() {
    let (hub, expected) = standard_hub();
    let cache = cache_dir();
    let source = PromptSource::Dataset(hub.spec(cache.path()));
    assert_eq!(
        load_prompts(&source, NumPrompts::First(2)).unwrap(),
        expected[..2]
    );
}

#[test]
fn asking_for_more_prompts_than_available_gives_all() {
    let dir = cache_dir();
    let path = dir.path().join("p.txt");
    std::fs::write(&path, "one\ntwo\n").unwrap();
    let prompts = load_prompts(&PromptSource::File(path), NumPrompts::First(10)).unwrap();
    assert_eq!(prompts, vec!["one", "two"]);
}

#[test]
fn num_prompts_parses_all_in_any_case_and_positive_integers() {
    assert_eq!("all".parse::<NumPrompts>().unwrap(), NumPrompts::All);
    assert_eq!("ALL".parse::<NumPrompts>().unwrap(), NumPrompts::All);
    assert_eq!(" 3 ".parse::<NumPrompts>().unwrap(), NumPrompts::First(3));
    for bad in ["0", "-1", "two", "none", ""] {
        let err = bad.parse::<NumPrompts>().unwrap_err();
        assert!(err.to_string().contains("\"all\""), "{bad}: {err}");
    }
}

#[test]
fn single_prompt_is_used_verbatim_whatever_the_number() {
    let source = PromptSource::Single("  a tiny astronaut  ".into());
    assert_eq!(
        load_prompts(&source, NumPrompts::First(5)).unwrap(),
        vec!["  a tiny astronaut  "]
    );
}

#[test]
fn blank_single_prompt_is_an_error() {
    let err = load_prompts(&PromptSource::Single(" \n".into()), NumPrompts::All).unwrap_err();
    assert!(matches!(err, PromptsError::EmptyPrompt), "{err:?}");
}

// ---------------------------------------------------------------- prompts file

fn prompts_file(content: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prompts.txt");
    std::fs::write(&path, content).unwrap();
    (dir, path)
}

#[test]
fn prompts_file_lines_are_trimmed_and_blank_lines_skipped() {
    let (_dir, path) = prompts_file(b"  first  \n\n   \n\tsecond\n\nthird");
    assert_eq!(
        read_prompts_file(&path).unwrap(),
        vec!["first", "second", "third"]
    );
}

#[test]
fn prompts_file_accepts_crlf_line_ends() {
    let (_dir, path) = prompts_file(b"first\r\nsecond\r\n\r\nthird\r\n");
    assert_eq!(
        read_prompts_file(&path).unwrap(),
        vec!["first", "second", "third"]
    );
}

#[test]
fn prompts_file_keeps_non_ascii_text() {
    let (_dir, path) = prompts_file("\u{feff}Café ☕\nit\u{2019}s latest scandal\n".as_bytes());
    assert_eq!(
        read_prompts_file(&path).unwrap(),
        vec!["Café ☕", "it\u{2019}s latest scandal"]
    );
}

#[test]
fn prompts_file_that_is_not_utf8_names_file_and_line() {
    let (_dir, path) = prompts_file(b"fine\n\nalso fine\nbad \xff byte\n");
    let err = read_prompts_file(&path).unwrap_err();
    assert!(
        matches!(
            err,
            PromptsError::NotUtf8 {
                line: 4,
                column: 5,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("prompts.txt") && message.contains("line 4"),
        "{message}"
    );
}

#[test]
fn missing_prompts_file_error_names_the_file() {
    let path = PathBuf::from("/nonexistent/dir/my-prompts.txt");
    let err = load_prompts(&PromptSource::File(path), NumPrompts::All).unwrap_err();
    assert!(matches!(err, PromptsError::ReadFile { .. }), "{err:?}");
    assert!(err.to_string().contains("my-prompts.txt"), "{err}");
}

#[test]
fn prompts_file_without_prompts_is_an_error() {
    let (_dir, path) = prompts_file(b"\n  \r\n\t\n");
    let err = read_prompts_file(&path).unwrap_err();
    assert!(matches!(err, PromptsError::NoPrompts { .. }), "{err:?}");
}

#[test]
fn prompts_file_selection_takes_the_first_n() {
    let (_dir, path) = prompts_file(b"a\nb\nc\n");
    let prompts = load_prompts(&PromptSource::File(path), NumPrompts::First(2)).unwrap();
    assert_eq!(prompts, vec!["a", "b"]);
}
