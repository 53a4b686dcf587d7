//! Network code of our own, where candle-transformers lacks a piece or differs from
//! diffusers/transformers: the networks (UNet, Flux and PixArt transformers, VAE decoder, CLIP
//! and T5 text encoders, Qwen2.5-VL), their tokenizers, and their configs as `serde`-derived
//! structs. Models only build networks from a `VarBuilder` and a config value: where the files
//! come from is [`crate::loading`]'s business, one layer up.

pub mod blip;
pub mod clip;
pub mod clip_text;
pub mod clip_tokenizer;
pub mod flux_transformer;
pub mod open_clip;
pub mod pil_resize;
pub mod pixart;
pub mod qwen2_5_vl;
pub mod t5;
pub mod unet;
pub mod vae;

/// Errors raised while configuring, loading or running a network. The layers above that load
/// and drive networks report the same kinds of failure and use this type under their own names
/// (`loading::LoadError`, `schedulers::SchedulerError`, `pipelines::PipelineError`).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model file (a `config.json`, a tokenizer file, a weights file) is missing, unreadable
    /// or malformed.
    #[error("model file {path}: {message}")]
    ModelFile {
        /// The file in question (or `component/config.json` as the pipeline names it).
        path: String,
        /// What went wrong and what to do.
        message: String,
    },
    /// The Hugging Face Hub could not deliver a file.
    #[error("could not fetch {file} from the Hugging Face Hub repo {repo}: {message}")]
    Hub {
        /// Repo id.
        repo: String,
        /// File inside the repo.
        file: String,
        /// What went wrong and what to do.
        message: String,
    },
    /// The model is of a kind this build cannot run (a config value we do not implement).
    #[error("{0}")]
    Unsupported(String),
    /// An input is not valid for this model (a prompt that cannot be tokenized, a bad shape).
    #[error("{0}")]
    InvalidArgument(String),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// A network config read from a model's JSON file: [`ModelConfig::Raw`] is the file's
/// `serde`-derived form (diffusers' or transformers' keys and defaults) and `TryFrom` checks it
/// against what the network implements. [`crate::loading`] reads the file.
pub trait ModelConfig: TryFrom<Self::Raw, Error = ModelError> {
    /// The file's form.
    type Raw: serde::de::DeserializeOwned;
}
