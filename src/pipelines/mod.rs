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

use candle_core::Tensor;
use image::RgbImage;

use crate::config::Config;
pub use crate::config::PipelineCallArgs as CallArgs;
use crate::loading::{parse_config, ModelSource};
use crate::models::ModelError;
use crate::noise::Noise;
use crate::schedulers::{NoiseLevel, Parameterization};
use sd15::Sd15Pipeline;

/// The denoising schedule as the stepwise search strategies see it (search over paths,
/// particles): where a sample can be held, and what a model call costs.
#[derive(Clone, Debug, PartialEq)]
pub struct StepSchedule {
    /// The levels each step starts from, then the final one (`steps + 1`).
    pub levels: Vec<NoiseLevel>,
    /// What the denoiser predicts.
    pub parameterization: Parameterization,
    /// Factor the initial noise is multiplied by before the first step.
    pub init_noise_sigma: f64,
    /// Denoiser evaluations per model call and image: 2 under classifier-free guidance, else 1.
    pub evaluations_per_call: usize,
    /// Extra model calls a segment of more than one step costs when the scheduler starts
    /// fresh (1 for PNDM's second-order warm-up, else 0).
    pub warmup_calls: usize,
}

impl StepSchedule {
    /// Denoiser evaluations per image of [`ImagePipeline::denoise_span`] from `from` to `to`.
    pub fn span_evaluations(&self, from: usize, to: usize) -> usize {
        let steps = to.saturating_sub(from);
        let warmup = if steps > 1 { self.warmup_calls } else { 0 };
        (steps + warmup) * self.evaluations_per_call
    }

    /// The index of the final level (the number of steps).
    pub fn last(&self) -> usize {
        self.levels.len().saturating_sub(1)
    }
}

/// What [`ImagePipeline::denoise_span`] returns.
#[derive(Clone, Debug)]
pub struct Span {
    /// The latents at the segment's last level, in the pipeline's latent layout.
    pub latents: Tensor,
    /// The clean-sample prediction of the segment's last model call, same layout.
    pub x0: Tensor,
    /// Denoiser evaluations spent per image (model calls, twice under guidance).
    pub evaluations: usize,
}

fn stepwise_unsupported() -> PipelineError {
    PipelineError::Unsupported(
        "this pipeline cannot denoise step by step, which search over paths and particle \
         search need; use search_method random or zero-order"
            .into(),
    )
}

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
    /// The denoising schedule, for the stepwise strategies.
    fn schedule(&self) -> Result<StepSchedule, PipelineError> {
        Err(stepwise_unsupported())
    }
    /// Standard normal `noises` (each of [`ImagePipeline::noise_shape`]) as one batch in the
    /// pipeline's latent layout and dtype (Flux packs them), not yet scaled.
    fn noise_latents(&self, _noises: &[Noise]) -> Result<Tensor, PipelineError> {
        Err(stepwise_unsupported())
    }
    /// Denoises `latents` (a batch, latent layout) from level `from` to level `to` of
    /// [`ImagePipeline::schedule`] with the pipeline's scheduler, started fresh at `from` (as
    /// diffusers' img2img does), with the prompt of [`ImagePipeline::set_prompt`].
    fn denoise_span(
        &self,
        _latents: &Tensor,
        _from: usize,
        _to: usize,
    ) -> Result<Span, PipelineError> {
        Err(stepwise_unsupported())
    }
    /// One model call on `latents` at `level`: the predicted clean latents.
    fn predict_x0(&self, _latents: &Tensor, _level: usize) -> Result<Tensor, PipelineError> {
        Err(stepwise_unsupported())
    }
    /// Decodes latents (a batch, latent layout; clean or a clean-sample prediction) to images.
    fn decode_latents(&self, _latents: &Tensor) -> Result<Vec<RgbImage>, PipelineError> {
        Err(stepwise_unsupported())
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
