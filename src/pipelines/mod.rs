//! Text-to-image pipelines: each turns a prompt and a batch of initial noises into images.
//!
//! One file per model family; `schedulers/` holds the diffusers-compatible schedulers and
//! `hub` resolves a Hub repo id or a local folder in diffusers layout to files.

pub mod caption;
pub mod flux;
pub mod hub;
pub mod pixart;
pub mod schedulers;
pub mod sd15;
pub mod sdxl;
pub mod weights;

use image::RgbImage;
use serde_json::Value;

use crate::config::Config;
use crate::noise::Noise;
use hub::ModelSource;
use sd15::{Sd15CallArgs, Sd15Pipeline};

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

/// Loads the pipeline that the model's `model_index.json` names (`_class_name`), with the
/// config's dtype and call arguments, onto `device`.
pub fn load(
    config: &Config,
    device: &candle_core::Device,
    low_vram: bool,
) -> Result<Box<dyn ImagePipeline>, PipelineError> {
    let source = ModelSource::resolve(&config.model)?;
    let index = source.read_json("model_index.json")?;
    let class = index
        .get("_class_name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let args = &config.pipeline_call_args;
    match class.as_str() {
        "StableDiffusionPipeline" => {
            for (key, set) in [
                ("max_sequence_length", args.max_sequence_length.is_some()),
                ("clean_caption", args.clean_caption.is_some()),
            ] {
                if set {
                    tracing::warn!(
                        "{}: pipeline_call_args.{key} does not apply to Stable Diffusion 1.5 and is ignored",
                        config.path.display()
                    );
                }
            }
            let call = Sd15CallArgs {
                height: args.height,
                width: args.width,
                num_inference_steps: args.num_inference_steps,
                guidance_scale: args.guidance_scale,
                negative_prompt: args.negative_prompt.clone(),
            };
            Ok(Box::new(Sd15Pipeline::load(&source, config.dtype, device, &call)?))
        }
        "FluxPipeline" => {
            if args.clean_caption.is_some() {
                tracing::warn!(
                    "{}: pipeline_call_args.clean_caption does not apply to Flux and is ignored",
                    config.path.display()
                );
            }
            let call = flux::FluxCallArgs {
                height: args.height,
                width: args.width,
                num_inference_steps: args.num_inference_steps,
                guidance_scale: args.guidance_scale,
                max_sequence_length: args.max_sequence_length,
            };
            Ok(Box::new(flux::FluxPipeline::load(
                source,
                config.dtype,
                device,
                &call,
                low_vram,
            )?))
        }
        "PixArtSigmaPipeline" => {
            let call = pixart::PixArtCallArgs {
                height: args.height,
                width: args.width,
                num_inference_steps: args.num_inference_steps,
                guidance_scale: args.guidance_scale,
                negative_prompt: args.negative_prompt.clone(),
                max_sequence_length: args.max_sequence_length,
                clean_caption: args.clean_caption,
            };
            let mut pipeline = pixart::PixArtPipeline::load(&source, config.dtype, device, &call)?;
            pipeline.set_low_vram(low_vram);
            Ok(Box::new(pipeline))
        }
        "StableDiffusionXLPipeline" => {
            for (key, set) in [
                ("max_sequence_length", args.max_sequence_length.is_some()),
                ("clean_caption", args.clean_caption.is_some()),
            ] {
                if set {
                    tracing::warn!(
                        "{}: pipeline_call_args.{key} does not apply to SDXL and is ignored",
                        config.path.display()
                    );
                }
            }
            let call = sdxl::SdxlCallArgs {
                height: args.height,
                width: args.width,
                num_inference_steps: args.num_inference_steps,
                guidance_scale: args.guidance_scale,
                negative_prompt: args.negative_prompt.clone(),
            };
            Ok(Box::new(sdxl::SdxlPipeline::load(
                &source,
                config.dtype,
                device,
                &call,
            )?))
        }
        "" => Err(PipelineError::ModelFile {
            path: format!("{}/model_index.json", config.model),
            message: "has no `_class_name`; is this a diffusers pipeline folder?".into(),
        }),
        other => Err(PipelineError::Unsupported(format!(
            "{}: pipeline class {other} is not supported; tt-scale runs StableDiffusionPipeline models",
            config.model
        ))),
    }
}

/// Checks the call arguments every UNet pipeline shares: height and width positive multiples of
/// the VAE scale factor, at least one step, a finite guidance scale. Errors name the config key.
pub(crate) fn check_call_args(
    height: usize,
    width: usize,
    vae_scale_factor: usize,
    num_inference_steps: usize,
    guidance_scale: f64,
) -> Result<(), PipelineError> {
    for (name, v) in [("height", height), ("width", width)] {
        if v == 0 || v % vae_scale_factor != 0 {
            return Err(PipelineError::InvalidArgument(format!(
                "pipeline_call_args.{name} = {v} must be a positive multiple of \
                 {vae_scale_factor} (the VAE scale factor of this model)"
            )));
        }
    }
    if num_inference_steps == 0 {
        return Err(PipelineError::InvalidArgument(
            "pipeline_call_args.num_inference_steps must be at least 1".into(),
        ));
    }
    if !guidance_scale.is_finite() {
        return Err(PipelineError::InvalidArgument(format!(
            "pipeline_call_args.guidance_scale = {guidance_scale} must be a finite number"
        )));
    }
    Ok(())
}
