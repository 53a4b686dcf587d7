//! Where a pipeline's files come from: a local folder in diffusers layout, or a Hugging Face Hub
//! repo (downloaded through hf-hub's sync API into its cache, with `HF_TOKEN` or the cached
//! login token for gated repos). Shared by all pipelines and
//! the local verifiers.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Repo, RepoType};
use serde_json::Value;

use super::json::{parse_config, read_json_file};

/// Whether the Hub must not be contacted: `HF_HUB_OFFLINE` (or transformers'
/// `TRANSFORMERS_OFFLINE`) set to 1, true, yes or on, as huggingface_hub reads it.
fn hub_offline() -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
        .iter()
        .any(|var| {
            std::env::var(var).is_ok_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
        })
}

/// The cached copy of `rel` of the Hub repo `repo` at `revision` (default `main`), if the
/// hf-hub cache (`HF_HOME`, else `~/.cache/huggingface`) holds it.
fn cached(repo: &str, revision: &Option<String>, rel: &str) -> Option<PathBuf> {
    let rev = revision.clone().unwrap_or_else(|| "main".to_string());
    hf_hub::Cache::from_env()
        .repo(Repo::with_revision(repo.to_string(), RepoType::Model, rev))
        .get(rel)
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

/// The first HTTP status code in an hf-hub error message, if any.
fn http_status(message: &str) -> Option<u16> {
    let at = message.find("status code ")?;
    message[at + "status code ".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
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
        Self::Hub {
            repo: repo.to_string(),
            revision,
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

    fn api_repo(
        repo: &str,
        revision: &Option<String>,
    ) -> Result<hf_hub::api::sync::ApiRepo, LoadError> {
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty());
        let mut builder = ApiBuilder::from_env().with_progress(false);
        if token.is_some() {
            builder = builder.with_token(token);
        }
        let api: Api = builder.build().map_err(|e| LoadError::Hub {
            repo: repo.to_string(),
            file: String::new(),
            message: format!("cannot set up the Hub client: {e}"),
        })?;
        let rev = revision.clone().unwrap_or_else(|| "main".to_string());
        Ok(api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, rev)))
    }

    fn hub_error(repo: &str, file: &str, err: &dyn std::fmt::Display) -> LoadError {
        let raw = err.to_string();
        let message = match http_status(&raw) {
            Some(401) | Some(403) => format!(
                "access denied (HTTP {}): the repo is gated or private; accept its license on \
                 huggingface.co/{repo} and set HF_TOKEN (or run `huggingface-cli login`)",
                http_status(&raw).unwrap_or(0)
            ),
            Some(404) => "not found (HTTP 404): check the repo id, the revision and the file name"
                .to_string(),
            _ => format!("{raw}; check the network connection (HF_ENDPOINT, proxies) and retry"),
        };
        LoadError::Hub {
            repo: repo.to_string(),
            file: file.to_string(),
            message,
        }
    }

    /// Whether the model has the file `rel` (a path inside the repo/folder, e.g.
    /// `unet/config.json`), without downloading it. Offline (`HF_HUB_OFFLINE`), a Hub model
    /// has what the cache holds.
    pub fn has_file(&self, rel: &str) -> Result<bool, LoadError> {
        match self {
            Self::Local(dir) => Ok(dir.join(rel).is_file()),
            Self::Hub { repo, revision, .. } if hub_offline() => {
                Ok(cached(repo, revision, rel).is_some())
            }
            Self::Hub {
                repo,
                revision,
                listing,
            } => {
                let listing = listing.get_or_init(|| {
                    Self::api_repo(repo, revision)
                        .map_err(|e| e.to_string())
                        .and_then(|r| {
                            r.info()
                                .map(|info| {
                                    info.siblings.into_iter().map(|s| s.rfilename).collect()
                                })
                                .map_err(|e| Self::hub_error(repo, "", &e).to_string())
                        })
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
            Self::Hub { repo, revision, .. } if hub_offline() => cached(repo, revision, rel)
                .ok_or_else(|| LoadError::Hub {
                    repo: repo.clone(),
                    file: rel.to_string(),
                    message: format!(
                        "not in the Hugging Face cache ({}) and HF_HUB_OFFLINE forbids \
                         downloading it: run once with the network (or copy the file into the \
                         cache), or unset HF_HUB_OFFLINE",
                        hf_hub::Cache::from_env().path().display()
                    ),
                }),
            Self::Hub { repo, revision, .. } => Self::api_repo(repo, revision)?
                .get(rel)
                .map_err(|e| Self::hub_error(repo, rel, &e)),
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

    #[test]
    fn http_status_is_read_from_hf_hub_messages() {
        assert_eq!(http_status("https://x/y: status code 403"), Some(403));
        assert_eq!(http_status("timeout"), None);
    }
}
