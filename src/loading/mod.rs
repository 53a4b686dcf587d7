//! Where a model's files come from and how they are read: a Hub repo or a local folder in
//! diffusers layout ([`hub`]), memory-mapped safetensors weights ([`weights`]), and the one typed
//! reader of JSON config files ([`json`]): `serde`-derived structs with defaults, whose errors
//! name the file and the JSON path of the offending key.

pub mod hub;
pub mod json;
pub mod qwen;
pub mod weights;

pub use hub::ModelSource;
pub use json::{model_config, parse_config, read_config, read_json_file};
pub use weights::{candle_dtype, mmap, var_builder};

use crate::models::ModelError;

/// Weight and compute precision (`torch_dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// `"fp32"`
    F32,
    /// `"fp16"`
    F16,
    /// `"bf16"`
    Bf16,
}

impl Dtype {
    /// The config spelling: `fp32`, `fp16` or `bf16`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Dtype::F32 => "fp32",
            Dtype::F16 => "fp16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// Errors raised while finding, fetching or reading a model's files.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A model file is missing, unreadable or malformed.
    #[error("model file {path}: {message}")]
    ModelFile {
        /// The file in question.
        path: String,
        /// What went wrong and what to do.
        message: String,
    },
    /// The Hub could not deliver a file.
    #[error("could not fetch {file} from the Hugging Face Hub repo {repo}: {message}")]
    Hub {
        /// Repo id.
        repo: String,
        /// File inside the repo.
        file: String,
        /// What went wrong and what to do.
        message: String,
    },
    /// The model is of a kind this build cannot run.
    #[error("{0}")]
    Unsupported(String),
    /// A name or argument is not valid (neither a folder nor a repo id, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<ModelError> for LoadError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::ModelFile { path, message } => LoadError::ModelFile { path, message },
            ModelError::Unsupported(m) => LoadError::Unsupported(m),
            ModelError::InvalidArgument(m) => LoadError::InvalidArgument(m),
            ModelError::Candle(e) => LoadError::Candle(e),
        }
    }
}
