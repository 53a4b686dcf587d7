//! Text-to-image pipelines: each turns a prompt and a batch of initial noises into images.
//!
//! One file per model family holding only what differs; [`common`] owns what they share (the
//! guided denoise loop, `generate`, image post-processing). The schedulers are
//! [`crate::schedulers`], the files and weights [`crate::loading`], the networks
//! [`crate::models`].

pub mod caption;
pub mod common;
pub mod estimate;
pub mod flux;
pub mod pixart;
pub mod sd15;
pub mod sdxl;

use image::RgbImage;

use crate::config::Config;
pub use crate::config::PipelineCallArgs as CallArgs;
use crate::loading::{parse_config, ModelSource};
use crate::models::ModelError;
use crate::noise::Noise;
use sd15::Sd15Pipeline;

/// Errors raised while loading or running a pipeline: the model stack's one error type
/// ([`ModelError`]; a file, a Hub fetch, an unsupported model, an invalid argument, a tensor
/// error).
pub type PipelineError = ModelError;

/// The keys of a diffusers `model_index.json` the pipelines read.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct ModelIndex {
    /// The pipeline class (`StableDiffusionPipeline`, `FluxPipeline`, ...).
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// SDXL: zero negative embeddings when no negative prompt is given (default true).
    #[serde(default)]
    pub force_zeros_for_empty_prompt: Option<bool>,
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
    /// Denoiser evaluations spent on one image, the NFEs of the paper's budgets: one a step,
    /// two with classifier-free guidance (the conditional and unconditional passes, though they
    /// run as one batched call); `None` when the pipeline cannot tell.
    fn evaluations_per_image(&self) -> Option<usize> {
        None
    }
}

/// Loads the pipeline that the model's `model_index.json` names (`_class_name`), with the
/// config's dtype and call arguments, onto `device`.
pub fn load(
    config: &Config,
    device: &candle_core::Device,
    low_vram: bool,
) -> Result<Box<dyn ImagePipeline>, PipelineError> {
    let source = ModelSource::resolve(&config.model)?;
    let index: ModelIndex =
        parse_config(&source.read_json("model_index.json")?, "model_index.json")?;
    let class = index.class_name.unwrap_or_default();
    let args = &config.pipeline_call_args;
    // Warns about call arguments the model does not use (they are accepted and ignored).
    let ignored = |model: &str, keys: &[&str]| {
        for key in keys {
            let set = match *key {
                "max_sequence_length" => args.max_sequence_length.is_some(),
                _ => args.clean_caption.is_some(),
            };
            if set {
                tracing::warn!(
                    "{}: pipeline_call_args.{key} does not apply to {model} and is ignored",
                    config.path.display()
                );
            }
        }
    };
    match class.as_str() {
        "StableDiffusionPipeline" => {
            ignored("Stable Diffusion 1.5", &["max_sequence_length", "clean_caption"]);
            Ok(Box::new(Sd15Pipeline::load(&source, config.dtype, device, args)?))
        }
        "FluxPipeline" => {
            ignored("Flux", &["clean_caption"]);
            Ok(Box::new(flux::FluxPipeline::load(
                source,
                config.dtype,
                device,
                args,
                low_vram,
            )?))
        }
        "PixArtSigmaPipeline" => {
            let mut pipeline = pixart::PixArtPipeline::load(&source, config.dtype, device, args)?;
            pipeline.set_low_vram(low_vram);
            Ok(Box::new(pipeline))
        }
        "StableDiffusionXLPipeline" => {
            ignored("SDXL", &["max_sequence_length", "clean_caption"]);
            Ok(Box::new(sdxl::SdxlPipeline::load(
                &source,
                config.dtype,
                device,
                args,
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
