//! Where the prompts come from: one prompt given on the command line, a prompts file (one prompt a
//! line), or by default the `prompt` column of the Hugging Face dataset
//! `data-is-better-together/open-image-preferences-v1-binarized` (split `train`).
//!
//! The dataset's parquet files also hold the generated images (about 2 GB), so [`hub`] reads only
//! each file's footer and the byte ranges of the prompt column chunks (HTTP range requests), and
//! caches the resulting list in the Hugging Face Hub cache. Unlike the original tool, a dataset
//! prompt that contains newlines stays one prompt.
//!
//! Selection keeps file order (no shuffling): [`NumPrompts::First`] takes the first N prompts.

mod hub;
mod parquet_column;

use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use hub::{DatasetSpec, DEFAULT_COLUMN, DEFAULT_DATASET, DEFAULT_REVISION, DEFAULT_SPLIT};

/// Where to take the prompts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptSource {
    /// Exactly this prompt, used verbatim (not trimmed: output file names hash the original text).
    Single(String),
    /// A UTF-8 text file, one prompt a line; lines are trimmed and blank lines skipped.
    File(PathBuf),
    /// A column of a Hugging Face Hub dataset split, read from its parquet files.
    Dataset(DatasetSpec),
}

/// How many of the available prompts to use, counted from the start (file/dataset order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumPrompts {
    /// Every available prompt.
    All,
    /// The first N prompts (all of them, with a warning, when fewer are available).
    First(usize),
}

/// A `--num-prompts` value that is neither `all` nor a positive integer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid number of prompts {value:?}: expected a positive integer or \"all\"")]
pub struct ParseNumPromptsError {
    /// The text that failed to parse.
    pub value: String,
}

impl FromStr for NumPrompts {
    type Err = ParseNumPromptsError;

    /// Parses `all` (any case) or a positive integer; surrounding whitespace is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if text.eq_ignore_ascii_case("all") {
            return Ok(NumPrompts::All);
        }
        match text.parse::<usize>() {
            Ok(n) if n > 0 => Ok(NumPrompts::First(n)),
            _ => Err(ParseNumPromptsError {
                value: s.to_string(),
            }),
        }
    }
}

/// Everything that can go wrong while loading prompts; each message names the file, URL or HTTP
/// status concerned and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PromptsError {
    /// `--prompt` was given but is empty or only whitespace.
    #[error("the prompt is empty: pass a non-empty --prompt, or use --prompts-file / the default dataset")]
    EmptyPrompt,
    /// The prompts file could not be read.
    #[error("cannot read prompts file {path}: {source}")]
    ReadFile {
        /// The prompts file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The prompts file is not valid UTF-8.
    #[error(
        "prompts file {path} is not valid UTF-8 at line {line} (byte {column} of that line): \
         save it as UTF-8"
    )]
    NotUtf8 {
        /// The prompts file.
        path: PathBuf,
        /// 1-based line number of the first invalid line.
        line: usize,
        /// 1-based byte offset of the first invalid byte within that line.
        column: usize,
    },
    /// The source exists but holds no non-blank prompt.
    #[error("no prompts found in {what}: it holds no non-blank prompt")]
    NoPrompts {
        /// The file or dataset that was read.
        what: String,
    },
    /// Offline mode (HF_HUB_OFFLINE) and no cached prompt list.
    #[error(
        "HF_HUB_OFFLINE is set and the prompts of dataset {repo} (split {split}, column {column}) \
         are not cached at {cache}: run once online (unset HF_HUB_OFFLINE) to cache them, \
         or pass --prompt / --prompts-file"
    )]
    OfflineWithoutCache {
        /// Dataset repository id.
        repo: String,
        /// Dataset split.
        split: String,
        /// Column holding the prompts.
        column: String,
        /// Where the cached list was looked for.
        cache: String,
    },
    /// The request could not be sent or its body not received (DNS, TLS, connection, timeout),
    /// after the retries.
    #[error("{message}; or pass --prompt / --prompts-file")]
    Network {
        /// The URL requested.
        url: String,
        /// What failed, with the URL, the attempts and `HF_ENDPOINT`.
        message: String,
    },
    /// The Hub refused access (401/403): the dataset is gated or private, or the token is wrong.
    #[error(
        "{url} answered HTTP {status}: the dataset is gated, private or does not exist; \
         set HF_TOKEN to a Hugging Face token with read access (and accept the dataset's terms \
         on its Hub page if it is gated)"
    )]
    Unauthorized {
        /// The URL requested.
        url: String,
        /// 401 or 403.
        status: u16,
    },
    /// The Hub answered 404.
    #[error("{url} answered HTTP 404 Not Found: check the dataset name and revision")]
    NotFound {
        /// The URL requested.
        url: String,
    },
    /// Any other unexpected HTTP status.
    #[error("{url} answered HTTP {status}: {body}; retry later or pass --prompt / --prompts-file")]
    Status {
        /// The URL requested.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body, for diagnosis.
        body: String,
    },
    /// A range request was answered with something other than the requested bytes.
    #[error(
        "{url} did not honour the byte range {start}..{end} (HTTP {status}, {got} bytes): \
         the server must support HTTP range requests (check HF_ENDPOINT)"
    )]
    BadRange {
        /// The URL requested.
        url: String,
        /// First byte requested.
        start: u64,
        /// One past the last byte requested.
        end: u64,
        /// The HTTP status received.
        status: u16,
        /// How many body bytes came back (0 when the body was not read).
        got: u64,
    },
    /// A Hub API answer was not the JSON expected.
    #[error(
        "unexpected answer from {url}: {detail}; check HF_ENDPOINT points to a Hugging Face Hub"
    )]
    BadApiResponse {
        /// The URL requested.
        url: String,
        /// What was wrong with it.
        detail: String,
    },
    /// No parquet file of the split was found in the dataset repository.
    #[error(
        "no parquet files for split {split:?} in dataset {repo} at revision {revision} \
         (parquet files found: {found:?}); check the split name"
    )]
    NoSplitFiles {
        /// Dataset repository id.
        repo: String,
        /// Requested split.
        split: String,
        /// Revision listed.
        revision: String,
        /// Every parquet file of the repository, for comparison.
        found: Vec<String>,
    },
    /// A parquet file could not be decoded.
    #[error("cannot decode parquet file {url}: {detail}")]
    Parquet {
        /// The file's URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The parquet file has no top-level column of that name.
    #[error("parquet file {url} has no column {column:?} (columns: {available:?}); check the column name")]
    MissingColumn {
        /// The file's URL.
        url: String,
        /// The requested column.
        column: String,
        /// The columns the file has.
        available: Vec<String>,
    },
    /// The column is not a flat string column.
    #[error("column {column:?} of parquet file {url} is not a string column ({found}): it cannot hold prompts")]
    NotAStringColumn {
        /// The file's URL.
        url: String,
        /// The requested column.
        column: String,
        /// What the column is instead.
        found: String,
    },
    /// A prompt in the dataset is not valid UTF-8.
    #[error("row {row} of column {column:?} in parquet file {url} is not valid UTF-8")]
    InvalidUtf8Value {
        /// The file's URL.
        url: String,
        /// The column read.
        column: String,
        /// 0-based row index within the file.
        row: u64,
    },
    /// The cached prompt list could not be read back.
    #[error("cached prompt list {path} is unreadable ({detail}): delete it and run once online")]
    BadCache {
        /// The cache file.
        path: PathBuf,
        /// What was wrong with it.
        detail: String,
    },
    /// The cached prompt list could not be written.
    #[error("cannot write cached prompt list {path}: {source}; check that the Hub cache directory (HF_HUB_CACHE / HF_HOME) is writable")]
    WriteCache {
        /// The cache file (or its temporary sibling).
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

/// Loads the prompts of `source` and keeps the first `num` of them (a single prompt ignores `num`).
///
/// Dataset prompts come from the Hub cache when present, else from the Hub (see [`DatasetSpec`]).
pub fn load_prompts(source: &PromptSource, num: NumPrompts) -> Result<Vec<String>, PromptsError> {
    match source {
        PromptSource::Single(prompt) => {
            if prompt.trim().is_empty() {
                return Err(PromptsError::EmptyPrompt);
            }
            Ok(vec![prompt.clone()])
        }
        PromptSource::File(path) => {
            let prompts = read_prompts_file(path)?;
            Ok(select_prompts(prompts, num))
        }
        PromptSource::Dataset(spec) => {
            let prompts = hub::dataset_prompts(spec)?;
            if prompts.is_empty() {
                return Err(PromptsError::NoPrompts {
                    what: format!(
                        "dataset {} (split {}, column {})",
                        spec.repo, spec.split, spec.column
                    ),
                });
            }
            Ok(select_prompts(prompts, num))
        }
    }
}

/// Reads a prompts file: UTF-8, one prompt a line (`\n`, `\r\n` or `\r` line ends, as Python's
/// text mode), each line trimmed, blank lines skipped, order kept. A leading byte-order mark is
/// dropped. Errors when the file is missing, not UTF-8 (naming the line), or has no prompt.
pub fn read_prompts_file(path: &Path) -> Result<Vec<String>, PromptsError> {
    // 64 MiB: DrawBench is 20 kB; a larger file is a wrong path (or /dev/zero).
    let bytes =
        crate::files::read_capped(path, 64 << 20).map_err(|source| PromptsError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut prompts = Vec::new();
    for (index, line) in split_lines(bytes).enumerate() {
        let text = std::str::from_utf8(line).map_err(|err| PromptsError::NotUtf8 {
            path: path.to_path_buf(),
            line: index + 1,
            column: err.valid_up_to() + 1,
        })?;
        let prompt = strip_like_python(text);
        if !prompt.is_empty() {
            prompts.push(prompt.to_string());
        }
    }
    if prompts.is_empty() {
        return Err(PromptsError::NoPrompts {
            what: format!("prompts file {}", path.display()),
        });
    }
    Ok(prompts)
}

/// Keeps the first `num` prompts; asking for more than there are keeps all, with a warning.
pub fn select_prompts(mut prompts: Vec<String>, num: NumPrompts) -> Vec<String> {
    if let NumPrompts::First(n) = num {
        if n > prompts.len() {
            tracing::warn!(
                requested = n,
                available = prompts.len(),
                "asked for {n} prompts but only {} are available; using all of them",
                prompts.len()
            );
        }
        prompts.truncate(n);
    }
    prompts
}

/// Trims the characters Python's `str.strip()` removes: Unicode whitespace plus the ASCII
/// separators U+001C..U+001F.
pub(crate) fn strip_like_python(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// Splits on `\r\n`, `\n` or a lone `\r`; a final line end does not start an empty line.
fn split_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            None => {
                let line = rest;
                rest = &[];
                Some(line)
            }
            Some(end) => {
                let line = &rest[..end];
                let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[end + skip..];
                Some(line)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_lines_handles_every_python_line_end() {
        let lines: Vec<&[u8]> = split_lines(b"a\r\nb\rc\n\nd").collect();
        assert_eq!(lines, vec![&b"a"[..], b"b", b"c", b"", b"d"]);
    }

    #[test]
    fn strip_like_python_removes_ascii_separators_and_unicode_spaces() {
        assert_eq!(strip_like_python("\u{1f}\u{3000} a b \t\u{85}"), "a b");
    }
}
