//! Text-to-image pipelines: each turns a prompt and a batch of initial noises into images.
//!
//! One file per model family; `schedulers/` holds the diffusers-compatible schedulers and
//! `hub` resolves a Hub repo id or a local folder in diffusers layout to files.

pub mod hub;
pub mod schedulers;
pub mod sd15;

use image::RgbImage;

use crate::noise::Noise;

/// Errors raised while loading or running a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
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
    /// The model (or its scheduler) is of a kind this build cannot run.
    #[error("{0}")]
    Unsupported(String),
    /// A call argument is not valid for this model.
    #[error("{0}")]
    InvalidArgument(String),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// A loaded text-to-image pipeline.
pub trait ImagePipeline {
    /// Shape of one candidate's initial noise with batch dimension 1, as diffusers draws it
    /// (before any packing), e.g. `[1, 4, H/8, W/8]` for SD 1.5.
    fn noise_shape(&self) -> Vec<usize>;
    /// Encodes `prompt` (and the negative prompt) once; later [`ImagePipeline::generate`]
    /// calls reuse the embeddings.
    fn set_prompt(&mut self, prompt: &str) -> Result<(), PipelineError>;
    /// Denoises a batch of initial noises (each of [`ImagePipeline::noise_shape`], float32)
    /// into RGB images, in the same order.
    fn generate(&mut self, noises: &[Noise]) -> Result<Vec<RgbImage>, PipelineError>;
}
