//! Prompts from a Hugging Face Hub dataset: the split's parquet files are listed with the Hub API,
//! and only each file's footer and the prompt column's chunks are fetched (HTTP range requests), so
//! the images stored next to the prompts are never downloaded. The list is cached in the Hub cache
//! (`<cache>/datasets--<org>--<name>/tt-scale/prompts-<split>-<column>.json`) and reused without
//! any request; `HF_HUB_OFFLINE` forbids the network.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use reqwest::header::{CONTENT_RANGE, LINK};
use serde::{Deserialize, Serialize};

use crate::hub::{Fetched, HubHttp, HubHttpError, HubSettings};

use super::parquet_column::{
    self, ColumnLookupError, Footer, SparseFile, COALESCE_GAP, FOOTER_PREFETCH,
};
use super::{strip_like_python, PromptsError};

/// The dataset the original tool's prompts file was made from.
pub const DEFAULT_DATASET: &str = "data-is-better-together/open-image-preferences-v1-binarized";
/// The split the prompts come from.
pub const DEFAULT_SPLIT: &str = "train";
/// The column holding the prompts.
pub const DEFAULT_COLUMN: &str = "prompt";
/// The dataset revision (branch, tag or commit) read by default.
pub const DEFAULT_REVISION: &str = "main";

/// Concurrent range requests per parquet file.
const MAX_PARALLEL_FETCHES: usize = 8;

/// A column of a Hub dataset split to take prompts from, with the Hub settings to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetSpec {
    /// Dataset repository id, `owner/name`.
    pub repo: String,
    /// Split whose parquet files are read (file names like `data/train-00000-of-00002.parquet`).
    pub split: String,
    /// Flat string column holding the prompts.
    pub column: String,
    /// Branch, tag or commit to read.
    pub revision: String,
    /// How to reach the Hub: endpoint, token, cache, offline mode, timeouts.
    pub hub: HubSettings,
}

impl DatasetSpec {
    /// The default dataset (split `train`, column `prompt`, revision `main`) with the Hub settings
    /// of the process environment (see [`DatasetSpec::from_vars`]).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The default dataset with Hub settings read through `var` (an environment lookup; see
    /// [`HubSettings::from_vars`]).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            repo: DEFAULT_DATASET.to_string(),
            split: DEFAULT_SPLIT.to_string(),
            column: DEFAULT_COLUMN.to_string(),
            revision: DEFAULT_REVISION.to_string(),
            hub: HubSettings::from_vars(var),
        }
    }

    /// Where the prompt list of this spec is cached, if caching is enabled:
    /// `<cache>/datasets--<org>--<name>/tt-scale/prompts-[<revision>-]<split>-<column>.json`
    /// (the revision appears only when it is not `main`).
    pub fn cache_file(&self) -> Option<PathBuf> {
        let dir = self.hub.cache_dir.as_ref()?;
        let repo_folder = format!("datasets--{}", self.repo.replace('/', "--"));
        let revision = if self.revision == DEFAULT_REVISION {
            String::new()
        } else {
            format!("{}-", file_safe(&self.revision))
        };
        let name = format!(
            "prompts-{revision}{}-{}.json",
            file_safe(&self.split),
            file_safe(&self.column)
        );
        Some(dir.join(repo_folder).join("tt-scale").join(name))
    }
}

/// Replaces every character outside `[A-Za-z0-9._-]` with `_`.
fn file_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// One parquet file of the split, as listed by the Hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SplitFile {
    path: String,
    size: u64,
}

/// The cache file's content.
#[derive(Debug, Serialize, Deserialize)]
struct CachedPrompts {
    repo: String,
    split: String,
    column: String,
    revision: String,
    commit: String,
    files: Vec<SplitFile>,
    bytes_fetched: u64,
    prompts: Vec<String>,
}

/// The prompts of the dataset split: from the cache when present, else fetched from the Hub (and
/// then cached).
pub(crate) fn dataset_prompts(spec: &DatasetSpec) -> Result<Vec<String>, PromptsError> {
    let cache_file = spec.cache_file();
    if let Some(path) = &cache_file {
        match read_cache(spec, path) {
            Ok(Some(cached)) => {
                tracing::debug!(path = %path.display(), "using cached dataset prompts");
                return Ok(cached.prompts);
            }
            Ok(None) => {}
            Err(err) if spec.hub.offline => return Err(err),
            Err(err) => tracing::warn!("{err}; fetching the prompts again"),
        }
    }
    if spec.hub.offline {
        return Err(PromptsError::OfflineWithoutCache {
            repo: spec.repo.clone(),
            split: spec.split.clone(),
            column: spec.column.clone(),
            cache: cache_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(no cache directory: set HF_HOME or HF_HUB_CACHE)".into()),
        });
    }
    let fetched = fetch_prompts(spec)?;
    if let Some(path) = &cache_file {
        if let Err(err) = write_cache(path, &fetched) {
            tracing::warn!("{err}");
        }
    }
    Ok(fetched.prompts)
}

/// Reads the cached list; `Ok(None)` when absent or made for another dataset/split/column/revision.
fn read_cache(spec: &DatasetSpec, path: &Path) -> Result<Option<CachedPrompts>, PromptsError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(PromptsError::BadCache {
                path: path.to_path_buf(),
                detail: err.to_string(),
            })
        }
    };
    let cached: CachedPrompts =
        serde_json::from_slice(&text).map_err(|err| PromptsError::BadCache {
            path: path.to_path_buf(),
            detail: err.to_string(),
        })?;
    let matches = cached.repo == spec.repo
        && cached.split == spec.split
        && cached.column == spec.column
        && cached.revision == spec.revision;
    Ok(matches.then_some(cached))
}

/// Writes the cache file atomically: a temporary sibling, then a rename.
fn write_cache(path: &Path, cached: &CachedPrompts) -> Result<(), PromptsError> {
    let write_err = |path: &Path, source| PromptsError::WriteCache {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    let tmp = path.with_extension(format!("json.tmp-{}", std::process::id()));
    let json = serde_json::to_vec_pretty(cached).map_err(|e| write_err(path, e.into()))?;
    std::fs::write(&tmp, json).map_err(|e| write_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        write_err(path, e)
    })
}

/// A blocking HTTP client for one dataset, counting the body bytes it receives.
struct Hub<'a> {
    spec: &'a DatasetSpec,
    http: HubHttp,
    bytes_fetched: AtomicU64,
}

impl<'a> Hub<'a> {
    fn new(spec: &'a DatasetSpec) -> Result<Self, PromptsError> {
        let http = HubHttp::new(spec.hub.clone()).map_err(|e| PromptsError::Network {
            url: spec.hub.endpoint.clone(),
            message: e.to_string(),
        })?;
        Ok(Self {
            spec,
            http,
            bytes_fetched: AtomicU64::new(0),
        })
    }

    /// GETs `url` (bytes `start..end` when a range is given) with the token, retrying what may
    /// pass, and reads the body (counted); an error status becomes the matching error.
    fn get(&self, url: &str, range: Option<(u64, u64)>) -> Result<Fetched, PromptsError> {
        let fetched = self.http.get(url, range, true).map_err(|e| match e {
            HubHttpError::Status {
                status: status @ (401 | 403),
                ..
            } => PromptsError::Unauthorized {
                url: url.to_string(),
                status,
            },
            HubHttpError::Status { status: 404, .. } => PromptsError::NotFound {
                url: url.to_string(),
            },
            HubHttpError::Status { status: 416, .. } => {
                let (start, end) = range.unwrap_or((0, 0));
                PromptsError::BadRange {
                    url: url.to_string(),
                    start,
                    end,
                    status: 416,
                    got: 0,
                }
            }
            HubHttpError::Status { status, body, .. } => PromptsError::Status {
                url: url.to_string(),
                status,
                body,
            },
            other => PromptsError::Network {
                url: url.to_string(),
                message: other.to_string(),
            },
        })?;
        self.bytes_fetched
            .fetch_add(fetched.body.len() as u64, Ordering::Relaxed);
        Ok(fetched)
    }

    /// GETs a Hub API URL and parses its JSON body; also returns the `Link: rel="next"` URL.
    fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        url: &str,
    ) -> Result<(T, Option<String>), PromptsError> {
        let fetched = self.get(url, None)?;
        let next = fetched
            .headers
            .get(LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(next_link)
            .map(|next| {
                if next.starts_with('/') {
                    format!("{}{next}", self.spec.hub.endpoint)
                } else {
                    next
                }
            });
        let value =
            serde_json::from_slice(&fetched.body).map_err(|err| PromptsError::BadApiResponse {
                url: url.to_string(),
                detail: err.to_string(),
            })?;
        Ok((value, next))
    }

    /// Bytes `start..end` of the file at `url` (of `size` bytes), by an HTTP range request.
    fn get_range(&self, url: &str, start: u64, end: u64, size: u64) -> Result<Bytes, PromptsError> {
        let fetched = self.get(url, Some((start, end)))?;
        let status = fetched.status;
        let whole_file = start == 0 && end == size;
        let bad = |got| PromptsError::BadRange {
            url: url.to_string(),
            start,
            end,
            status,
            got,
        };
        if status != 206 && !(status == 200 && whole_file) {
            return Err(bad(0));
        }
        if status == 206 {
            let expected = format!("bytes {start}-{}/", end - 1);
            let content_range = fetched
                .headers
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok());
            if content_range.is_some_and(|cr| !cr.starts_with(&expected)) {
                return Err(bad(0));
            }
        }
        let bytes = Bytes::from(fetched.body);
        if bytes.len() as u64 != end - start {
            return Err(bad(bytes.len() as u64));
        }
        Ok(bytes)
    }

    /// The commit a revision points to.
    fn commit(&self) -> Result<String, PromptsError> {
        #[derive(Deserialize)]
        struct RevisionInfo {
            sha: String,
        }
        let url = format!(
            "{}/api/datasets/{}/revision/{}",
            self.spec.hub.endpoint,
            self.spec.repo,
            crate::hub::percent_encode(&self.spec.revision, false)
        );
        let (info, _) = self.get_json::<RevisionInfo>(&url)?;
        Ok(info.sha)
    }

    /// Every file of the repository at `commit`, following the listing's pagination.
    fn list_files(&self, commit: &str) -> Result<Vec<SplitFile>, PromptsError> {
        #[derive(Deserialize)]
        struct Lfs {
            size: u64,
        }
        #[derive(Deserialize)]
        struct Entry {
            #[serde(rename = "type")]
            kind: String,
            path: String,
            #[serde(default)]
            size: u64,
            #[serde(default)]
            lfs: Option<Lfs>,
        }
        let mut url = Some(format!(
            "{}/api/datasets/{}/tree/{commit}?recursive=true",
            self.spec.hub.endpoint, self.spec.repo
        ));
        let mut files = Vec::new();
        while let Some(page) = url.take() {
            let (entries, next) = self.get_json::<Vec<Entry>>(&page)?;
            files.extend(
                entries
                    .into_iter()
                    .filter(|e| e.kind == "file")
                    .map(|e| SplitFile {
                        size: e.lfs.map_or(e.size, |l| l.size),
                        path: e.path,
                    }),
            );
            url = next;
        }
        Ok(files)
    }

    /// The resolve URL of a file of the repository at `commit`.
    fn resolve_url(&self, commit: &str, path: &str) -> String {
        format!(
            "{}/datasets/{}/resolve/{commit}/{}",
            self.spec.hub.endpoint,
            self.spec.repo,
            crate::hub::percent_encode(path, true)
        )
    }

    /// The prompts of one parquet file, in row order (trimmed, blank and null rows skipped).
    fn file_prompts(&self, url: &str, size: u64) -> Result<Vec<String>, PromptsError> {
        let parquet_err = |detail: String| PromptsError::Parquet {
            url: url.to_string(),
            detail,
        };
        let tail_start = size.saturating_sub(FOOTER_PREFETCH);
        let mut footer_start = tail_start;
        let mut footer = self.get_range(url, tail_start, size, size)?;
        let meta = match parquet_column::parse_footer(size, &footer).map_err(parquet_err)? {
            Footer::Decoded(meta) => meta,
            Footer::StartsAt(start) => {
                let head = self.get_range(url, start, tail_start, size)?;
                footer = [head, footer].concat().into();
                footer_start = start;
                match parquet_column::parse_footer(size, &footer).map_err(parquet_err)? {
                    Footer::Decoded(meta) => meta,
                    Footer::StartsAt(_) => {
                        return Err(parquet_err("footer metadata length is inconsistent".into()))
                    }
                }
            }
        };
        let column = parquet_column::find_string_column(&meta, &self.spec.column).map_err(
            |err| match err {
                ColumnLookupError::Missing(available) => PromptsError::MissingColumn {
                    url: url.to_string(),
                    column: self.spec.column.clone(),
                    available,
                },
                ColumnLookupError::NotString(found) => PromptsError::NotAStringColumn {
                    url: url.to_string(),
                    column: self.spec.column.clone(),
                    found,
                },
            },
        )?;

        let mut file = SparseFile::new(size);
        file.insert(footer_start, footer);
        let chunks = parquet_column::chunk_ranges(&meta, column);
        if let Some(&(_, end)) = chunks.iter().find(|(_, end)| *end > size) {
            return Err(parquet_err(format!(
                "a column chunk ends at byte {end}, past the end of the file"
            )));
        }
        let missing: Vec<(u64, u64)> = chunks
            .into_iter()
            .filter(|&(s, e)| e > s && !file.covers(s, e))
            .collect();
        let ranges = parquet_column::coalesce(&missing, COALESCE_GAP);
        for (start, bytes) in self.fetch_ranges(url, &ranges, size)? {
            file.insert(start, bytes);
        }

        let file = Arc::new(file);
        let rows = parquet_column::read_byte_array_column(&file, &meta, column)
            .map_err(|e| parquet_err(e.to_string()))?;
        let mut prompts = Vec::with_capacity(rows.len());
        for (row, value) in rows.into_iter().enumerate() {
            let Some(value) = value else { continue };
            let text =
                std::str::from_utf8(value.data()).map_err(|_| PromptsError::InvalidUtf8Value {
                    url: url.to_string(),
                    column: self.spec.column.clone(),
                    row: row as u64,
                })?;
            let prompt = strip_like_python(text);
            if !prompt.is_empty() {
                prompts.push(prompt.to_string());
            }
        }
        Ok(prompts)
    }

    /// Fetches the ranges with up to [`MAX_PARALLEL_FETCHES`] concurrent requests.
    fn fetch_ranges(
        &self,
        url: &str,
        ranges: &[(u64, u64)],
        size: u64,
    ) -> Result<Vec<(u64, Bytes)>, PromptsError> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let per_worker = ranges.len().div_ceil(MAX_PARALLEL_FETCHES);
        std::thread::scope(|scope| {
            let workers: Vec<_> = ranges
                .chunks(per_worker)
                .map(|batch| {
                    scope.spawn(move || {
                        batch
                            .iter()
                            .map(|&(s, e)| Ok((s, self.get_range(url, s, e, size)?)))
                            .collect::<Result<Vec<_>, PromptsError>>()
                    })
                })
                .collect();
            let mut fetched = Vec::with_capacity(ranges.len());
            for worker in workers {
                match worker.join() {
                    Ok(batch) => fetched.extend(batch?),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            Ok(fetched)
        })
    }
}

/// The URL of a `Link` header's `rel="next"` entry.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"" || p.trim() == "rel=next");
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| target.to_string())
    })
}

/// Whether a repository file belongs to `split`, following the `datasets` library's default
/// patterns: a folder named after the split (or `<split>-…`), or a file name starting with the
/// split followed by `-`, `.`, `_`, a space or a digit (e.g. `data/train-00000-of-00002.parquet`).
fn belongs_to_split(path: &str, split: &str) -> bool {
    let mut parts: Vec<&str> = path.split('/').collect();
    let Some(name) = parts.pop() else {
        return false;
    };
    let dir_match = parts
        .iter()
        .any(|dir| *dir == split || dir.strip_prefix(split).is_some_and(|r| r.starts_with('-')));
    let name_match = name.strip_prefix(split).is_some_and(|rest| {
        rest.chars()
            .next()
            .is_some_and(|c| matches!(c, '-' | '.' | '_' | ' ') || c.is_ascii_digit())
    });
    dir_match || name_match
}

/// Lists the split's parquet files and reads the column from each, in path order.
fn fetch_prompts(spec: &DatasetSpec) -> Result<CachedPrompts, PromptsError> {
    let hub = Hub::new(spec)?;
    let commit = hub.commit()?;
    let all_files = hub.list_files(&commit)?;
    let parquet: Vec<SplitFile> = all_files
        .into_iter()
        .filter(|f| f.path.ends_with(".parquet"))
        .collect();
    let mut files: Vec<SplitFile> = parquet
        .iter()
        .filter(|f| belongs_to_split(&f.path, &spec.split))
        .cloned()
        .collect();
    if files.is_empty() {
        return Err(PromptsError::NoSplitFiles {
            repo: spec.repo.clone(),
            split: spec.split.clone(),
            revision: spec.revision.clone(),
            found: parquet.into_iter().map(|f| f.path).collect(),
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    tracing::info!(
        repo = %spec.repo,
        commit = %commit,
        files = files.len(),
        "fetching the {:?} column of split {:?} (footers and column chunks only)",
        spec.column,
        spec.split
    );
    let mut prompts = Vec::new();
    for file in &files {
        let url = hub.resolve_url(&commit, &file.path);
        prompts.extend(hub.file_prompts(&url, file.size)?);
    }
    let bytes_fetched = hub.bytes_fetched.load(Ordering::Relaxed);
    let total: u64 = files.iter().map(|f| f.size).sum();
    tracing::info!(
        prompts = prompts.len(),
        bytes_fetched,
        "read {} prompts, fetching {bytes_fetched} of the files' {total} bytes",
        prompts.len()
    );
    Ok(CachedPrompts {
        repo: spec.repo.clone(),
        split: spec.split.clone(),
        column: spec.column.clone(),
        revision: spec.revision.clone(),
        commit,
        files,
        bytes_fetched,
        prompts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_files_follow_the_datasets_naming_patterns() {
        assert!(belongs_to_split(
            "data/train-00000-of-00002.parquet",
            "train"
        ));
        assert!(belongs_to_split("train/0000.parquet", "train"));
        assert!(belongs_to_split("default/train/0000.parquet", "train"));
        assert!(!belongs_to_split(
            "data/test-00000-of-00001.parquet",
            "train"
        ));
        assert!(!belongs_to_split("data/trainer.parquet", "train"));
    }

    #[test]
    fn next_link_finds_the_next_page() {
        let header = "<https://hub/api/x?cursor=abc>; rel=\"next\"";
        assert_eq!(
            next_link(header).as_deref(),
            Some("https://hub/api/x?cursor=abc")
        );
        assert_eq!(next_link("<https://hub/a>; rel=\"prev\""), None);
    }

    #[test]
    fn percent_encode_keeps_slashes_only_in_paths() {
        assert_eq!(
            crate::hub::percent_encode("refs/convert/parquet", false),
            "refs%2Fconvert%2Fparquet"
        );
        assert_eq!(
            crate::hub::percent_encode("data/a b.parquet", true),
            "data/a%20b.parquet"
        );
    }

    #[test]
    fn from_vars_follows_hub_cache_conventions() {
        let spec = DatasetSpec::from_vars(|k| match k {
            "HOME" => Some("/home/u".into()),
            _ => None,
        });
        assert_eq!(
            spec.hub.cache_dir,
            Some(PathBuf::from("/home/u/.cache/huggingface/hub"))
        );
        let spec = DatasetSpec::from_vars(|k| match k {
            "HOME" => Some("/home/u".into()),
            "HF_HOME" => Some("~/hf".into()),
            _ => None,
        });
        assert_eq!(spec.hub.cache_dir, Some(PathBuf::from("/home/u/hf/hub")));
        let spec = DatasetSpec::from_vars(|k| match k {
            "HF_HOME" => Some("/x".into()),
            "HF_HUB_CACHE" => Some("/y".into()),
            "HF_HUB_OFFLINE" => Some("Yes".into()),
            "HF_ENDPOINT" => Some("http://mirror/".into()),
            _ => None,
        });
        assert_eq!(spec.hub.cache_dir, Some(PathBuf::from("/y")));
        assert!(spec.hub.offline);
        assert_eq!(spec.hub.endpoint, "http://mirror");
    }
}
