//! Where a pipeline's files come from: a local folder in diffusers layout, or a Hugging Face Hub
//! repo, downloaded into the Hub cache in `huggingface_hub`'s layout (`models--owner--name/`
//! with `blobs/`, `snapshots/<commit>/` and `refs/`), so that files cached by Python are reused
//! and ours are seen by Python. Every request has a connect and a read timeout and is retried
//! (see [`crate::hub`]); an interrupted download resumes where it stopped. With `HF_HUB_OFFLINE`
//! only the cache is read. Shared by all pipelines and the local verifiers.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

use super::json::{parse_config, read_json_file};
use crate::hub::{HubHttp, HubHttpError, HubSettings};

/// The folder of `repo` (a model) in the Hub cache `cache`.
fn repo_cache_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// Whether `revision` is a full commit hash (then it names a snapshot directly).
fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cached copy of `rel` of the Hub repo `repo` at `revision`, if the cache holds it:
/// `refs/<revision>` names the commit whose snapshot has the file.
fn cached(settings: &HubSettings, repo: &str, revision: &str, rel: &str) -> Option<PathBuf> {
    let dir = repo_cache_dir(settings.cache_dir.as_ref()?, repo);
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        std::fs::read_to_string(dir.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let path = dir.join("snapshots").join(commit).join(rel);
    path.is_file().then_some(path)
}

/// What the Hub says of a file before it is downloaded.
struct FileMeta {
    commit: String,
    etag: String,
    size: Option<u64>,
    /// Where the bytes are (the resolve URL, or the storage it redirects to).
    url: String,
}

/// The value of header `name`, if it is text.
fn header(fetched: &crate::hub::Fetched, name: &str) -> Option<String> {
    fetched
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Asks the Hub where `rel` of `repo` at `revision` is, its commit, ETag and size (a one-byte
/// range request that does not follow the redirect to storage; a relative redirect, as for a
/// renamed repo, is followed).
fn file_meta(
    http: &HubHttp,
    repo: &str,
    revision: &str,
    rel: &str,
) -> Result<FileMeta, HubHttpError> {
    let endpoint = &http.settings().endpoint;
    let mut url = format!(
        "{endpoint}/{repo}/resolve/{}/{}",
        crate::hub::percent_encode(revision, false),
        crate::hub::percent_encode(rel, true)
    );
    for _ in 0..5 {
        let fetched = http.get(&url, Some((0, 1)), false)?;
        let location = header(&fetched, "location");
        let commit = header(&fetched, "x-repo-commit");
        match (commit, location) {
            (None, Some(loc)) if loc.starts_with('/') => {
                url = format!("{endpoint}{loc}");
                continue;
            }
            (commit, location) => {
                let etag = header(&fetched, "x-linked-etag")
                    .or_else(|| header(&fetched, "etag"))
                    .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
                    .filter(|e| !e.is_empty() && !e.contains(['/', '\\']));
                let size = header(&fetched, "x-linked-size")
                    .and_then(|s| s.parse().ok())
                    .or_else(|| {
                        header(&fetched, "content-range")
                            .and_then(|r| r.rsplit('/').next().and_then(|n| n.parse().ok()))
                    });
                let (Some(commit), Some(etag)) = (commit, etag) else {
                    return Err(HubHttpError::Status {
                        url,
                        status: fetched.status,
                        body: "the answer has no X-Repo-Commit or ETag header: is HF_ENDPOINT a Hugging Face Hub?".into(),
                    });
                };
                let url = match location {
                    Some(loc) if loc.starts_with('/') => format!("{endpoint}{loc}"),
                    Some(loc) => loc,
                    None => url,
                };
                return Ok(FileMeta {
                    commit,
                    etag,
                    size,
                    url,
                });
            }
        }
    }
    Err(HubHttpError::Status {
        url,
        status: 310,
        body: "too many redirects".into(),
    })
}

/// Downloads `rel` of `repo` at `revision` into the cache (unless the snapshot has it) and
/// returns its path in the snapshot.
fn download(
    http: &HubHttp,
    repo: &str,
    revision: &str,
    rel: &str,
) -> Result<PathBuf, HubHttpError> {
    let cache = http
        .settings()
        .cache_dir
        .clone()
        .ok_or_else(|| HubHttpError::Write {
            path: PathBuf::from("(Hub cache)"),
            source: std::io::Error::other(
                "no Hub cache folder is known: set HF_HOME or HF_HUB_CACHE",
            ),
        })?;
    let dir = repo_cache_dir(&cache, repo);
    let meta = file_meta(http, repo, revision, rel)?;
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HubHttpError::Write { path, source }
    };
    if !is_commit(revision) || revision != meta.commit {
        let refs = dir.join("refs");
        std::fs::create_dir_all(&refs).map_err(write_err(&refs))?;
        crate::files::write_atomic(&refs.join(revision), meta.commit.as_bytes())
            .map_err(write_err(&refs.join(revision)))?;
    }
    let snapshot = dir.join("snapshots").join(&meta.commit).join(rel);
    if snapshot.is_file() {
        return Ok(snapshot);
    }
    let blob = dir.join("blobs").join(&meta.etag);
    if !blob.is_file() {
        let part = dir.join("blobs").join(format!("{}.incomplete", meta.etag));
        tracing::info!("downloading {repo}/{rel} from {}", http.settings().endpoint);
        http.download(&meta.url, &part, meta.size)?;
        std::fs::rename(&part, &blob).map_err(write_err(&blob))?;
    }
    if let Some(parent) = snapshot.parent() {
        std::fs::create_dir_all(parent).map_err(write_err(parent))?;
    }
    link_blob(&blob, &snapshot).map_err(write_err(&snapshot))?;
    Ok(snapshot)
}

/// Makes `snapshot` point at `blob`: a relative symlink as `huggingface_hub` makes, or a copy
/// where links are not available.
fn link_blob(blob: &Path, snapshot: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        // From snapshots/<commit>/<rel...> up to the repo folder, then blobs/<etag>.
        let depth = snapshot
            .parent()
            .and_then(|p| p.strip_prefix(blob.parent()?.parent()?).ok())
            .map_or(2, |p| p.components().count());
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(blob.file_name().unwrap_or_default());
        let tmp = snapshot.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)?;
        std::fs::rename(&tmp, snapshot)
    }
    #[cfg(not(unix))]
    {
        std::fs::copy(blob, snapshot).map(|_| ())
    }
}

/// `rel` inside the folder `component` (the root when it is empty).
fn in_folder(component: &str, rel: &str) -> String {
    if component.is_empty() {
        rel.to_string()
    } else {
        format!("{component}/{rel}")
    }
}
use super::{Dtype, LoadError};

/// A model given as a local diffusers folder or a Hub repo id.
pub enum ModelSource {
    /// A folder on disk laid out as the Hub repo (`model_index.json`, `unet/`, ...).
    Local(PathBuf),
    /// A Hub repo `owner/name`, at `revision` (default branch `main` when `None`).
    Hub {
        /// Repo id, `owner/name`.
        repo: String,
        /// Branch, tag or commit; `None` for `main`.
        revision: Option<String>,
        /// How to reach the Hub.
        settings: HubSettings,
        /// File names in the repo, fetched once on first need.
        #[doc(hidden)]
        listing: OnceLock<Result<Vec<String>, String>>,
    },
}

impl std::fmt::Debug for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => f.debug_tuple("Local").field(p).finish(),
            Self::Hub { repo, revision, .. } => f
                .debug_struct("Hub")
                .field("repo", repo)
                .field("revision", revision)
                .finish(),
        }
    }
}

/// Does `s` look like a Hub repo id (`owner/name`, letters, digits, `-_.`)?
fn is_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

impl ModelSource {
    /// An existing directory is a local model; otherwise `owner/name` is a Hub repo id
    /// (revision `main`); anything else is an error naming the value.
    pub fn resolve(name_or_path: &str) -> Result<Self, LoadError> {
        let path = Path::new(name_or_path);
        if path.is_dir() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        if is_repo_id(name_or_path) {
            return Ok(Self::hub(name_or_path, None));
        }
        Err(LoadError::InvalidArgument(format!(
            "pretrained_model_name_or_path {name_or_path:?} is neither an existing folder nor a \
             Hugging Face repo id of the form owner/name"
        )))
    }

    /// A Hub source for `repo` at `revision` (`None`: `main`).
    pub fn hub(repo: &str, revision: Option<String>) -> Self {
        Self::hub_with(repo, revision, HubSettings::from_env())
    }

    /// A Hub source for `repo` at `revision` reached with `settings` (instead of the
    /// environment's).
    pub fn hub_with(repo: &str, revision: Option<String>, settings: HubSettings) -> Self {
        Self::Hub {
            repo: repo.to_string(),
            revision,
            settings,
            listing: OnceLock::new(),
        }
    }

    /// A short name for messages: the folder or the repo id.
    pub fn display_name(&self) -> String {
        match self {
            Self::Local(p) => p.display().to_string(),
            Self::Hub { repo, .. } => repo.clone(),
        }
    }

    fn client(repo: &str, settings: &HubSettings) -> Result<HubHttp, LoadError> {
        HubHttp::new(settings.clone()).map_err(|e| Self::hub_error(repo, "", &e))
    }

    fn hub_error(repo: &str, file: &str, err: &HubHttpError) -> LoadError {
        let message = match err {
            HubHttpError::Status {
                status: status @ (401 | 403),
                ..
            } => format!(
                "access denied (HTTP {status}): the repo is gated or private; accept its license on \
                 huggingface.co/{repo} and set HF_TOKEN (or run `huggingface-cli login`)"
            ),
            HubHttpError::Status { status: 404, url, .. } => format!(
                "not found (HTTP 404 from {url}): check the repo id, the revision and the file name"
            ),
            other => other.to_string(),
        };
        LoadError::Hub {
            repo: repo.to_string(),
            file: file.to_string(),
            message,
        }
    }

    /// The revision asked for (`main` by default).
    fn revision_or_main(revision: &Option<String>) -> &str {
        revision.as_deref().unwrap_or("main")
    }

    /// The repo's file names at `revision`, from the Hub's model API.
    fn list_files(
        repo: &str,
        revision: &str,
        settings: &HubSettings,
    ) -> Result<Vec<String>, LoadError> {
        #[derive(serde::Deserialize)]
        struct Sibling {
            rfilename: String,
        }
        #[derive(serde::Deserialize)]
        struct Info {
            #[serde(default)]
            siblings: Vec<Sibling>,
        }
        let http = Self::client(repo, settings)?;
        let url = format!(
            "{}/api/models/{repo}/revision/{}",
            settings.endpoint,
            crate::hub::percent_encode(revision, false)
        );
        let fetched = http
            .get(&url, None, true)
            .map_err(|e| Self::hub_error(repo, "", &e))?;
        let info: Info = serde_json::from_slice(&fetched.body).map_err(|e| LoadError::Hub {
            repo: repo.to_string(),
            file: String::new(),
            message: format!("{url} did not answer with the repo's file list ({e}); is HF_ENDPOINT ({}) a Hugging Face Hub?", settings.endpoint),
        })?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    /// Whether the model has the file `rel` (a path inside the repo/folder, e.g.
    /// `unet/config.json`), without downloading it. Offline (`HF_HUB_OFFLINE`), a Hub model
    /// has what the cache holds.
    pub fn has_file(&self, rel: &str) -> Result<bool, LoadError> {
        match self {
            Self::Local(dir) => Ok(dir.join(rel).is_file()),
            Self::Hub {
                repo,
                revision,
                settings,
                ..
            } if settings.offline => {
                Ok(cached(settings, repo, Self::revision_or_main(revision), rel).is_some())
            }
            Self::Hub {
                repo,
                revision,
                settings,
                listing,
            } => {
                let listing = listing.get_or_init(|| {
                    Self::list_files(repo, Self::revision_or_main(revision), settings)
                        .map_err(|e| e.to_string())
                });
                match listing {
                    Ok(files) => Ok(files.iter().any(|f| f == rel)),
                    Err(message) => Err(LoadError::Hub {
                        repo: repo.clone(),
                        file: rel.to_string(),
                        message: format!("cannot list the repo's files: {message}"),
                    }),
                }
            }
        }
    }

    /// The local path of `rel`, downloading it into the hf-hub cache when the source is the Hub.
    /// A missing file is an error naming it.
    pub fn file(&self, rel: &str) -> Result<PathBuf, LoadError> {
        match self {
            Self::Local(dir) => {
                let path = dir.join(rel);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(LoadError::ModelFile {
                        path: path.display().to_string(),
                        message: format!(
                            "not found; {} must be a diffusers model folder containing {rel}",
                            dir.display()
                        ),
                    })
                }
            }
            Self::Hub {
                repo,
                revision,
                settings,
                ..
            } if settings.offline => cached(settings, repo, Self::revision_or_main(revision), rel)
                .ok_or_else(|| LoadError::Hub {
                    repo: repo.clone(),
                    file: rel.to_string(),
                    message: format!(
                        "not in the Hugging Face cache ({}) and HF_HUB_OFFLINE forbids \
                         downloading it: run once with the network (or copy the file into the \
                         cache), or unset HF_HUB_OFFLINE",
                        settings.cache_dir.as_ref().map_or_else(
                            || "none: set HF_HOME".to_string(),
                            |d| d.display().to_string()
                        )
                    ),
                }),
            Self::Hub {
                repo,
                revision,
                settings,
                ..
            } => {
                let http = Self::client(repo, settings)?;
                download(&http, repo, Self::revision_or_main(revision), rel)
                    .map_err(|e| Self::hub_error(repo, rel, &e))
            }
        }
    }

    /// Reads and parses the JSON file `rel` (e.g. `unet/config.json`).
    pub fn read_json(&self, rel: &str) -> Result<Value, LoadError> {
        read_json_file(&self.file(rel)?)
    }

    /// The safetensors weight files of `component` (e.g. `unet`, `text_encoder`; `""` for the
    /// repo's root, as transformers lays out a model) for `dtype`:
    /// for fp16, the `*.fp16.safetensors` variant when the model has it, otherwise the plain
    /// files (the caller converts). Both single files (`diffusion_pytorch_model.safetensors`,
    /// `model.safetensors`) and sharded ones (`*.safetensors.index.json`) are found.
    pub fn weights(&self, component: &str, dtype: Dtype) -> Result<Vec<PathBuf>, LoadError> {
        let stems = ["diffusion_pytorch_model", "model"];
        let variants: &[&str] = match dtype {
            Dtype::F16 => &[".fp16", ""],
            Dtype::F32 | Dtype::Bf16 => &[""],
        };
        for variant in variants {
            for stem in stems {
                let single = in_folder(component, &format!("{stem}{variant}.safetensors"));
                if self.has_file(&single)? {
                    return Ok(vec![self.file(&single)?]);
                }
                // diffusers names a variant index `<stem>.safetensors.index.fp16.json`.
                let index = in_folder(
                    component,
                    &format!("{stem}.safetensors.index{variant}.json"),
                );
                let index_alt = in_folder(
                    component,
                    &format!("{stem}{variant}.safetensors.index.json"),
                );
                for idx in [index, index_alt] {
                    if self.has_file(&idx)? {
                        return self.sharded(component, &idx);
                    }
                }
            }
        }
        let missing = format!(
            "{} or {}",
            in_folder(component, "diffusion_pytorch_model.safetensors"),
            in_folder(component, "model.safetensors")
        );
        match self {
            Self::Local(dir) => Err(LoadError::ModelFile {
                path: dir.join(component).display().to_string(),
                message: format!("no safetensors weights found (looked for {missing})"),
            }),
            Self::Hub { repo, .. } => Err(LoadError::Hub {
                repo: repo.clone(),
                file: missing,
                message: "the repo has no safetensors weights for this component".to_string(),
            }),
        }
    }

    fn sharded(&self, component: &str, index_rel: &str) -> Result<Vec<PathBuf>, LoadError> {
        /// `*.safetensors.index.json`: which shard holds each tensor.
        #[derive(serde::Deserialize)]
        struct WeightIndex {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let index: WeightIndex = parse_config(&self.read_json(index_rel)?, index_rel)?;
        let mut shards: Vec<String> = index.weight_map.into_values().collect();
        shards.sort();
        shards.dedup();
        shards
            .iter()
            .map(|s| self.file(&in_folder(component, s)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_owner_slash_name() {
        assert!(is_repo_id("stable-diffusion-v1-5/stable-diffusion-v1-5"));
        assert!(!is_repo_id("no-slash"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("../x"));
    }

    #[test]
    fn resolve_rejects_what_is_neither_folder_nor_repo_id() {
        let err = ModelSource::resolve("not a/valid repo").unwrap_err();
        assert!(err.to_string().contains("not a/valid repo"));
    }
}
