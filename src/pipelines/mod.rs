//! Pipelines: each turns a prompt and a batch of initial noises into media (images, or videos).
//!
//! One file per model family holding only what differs, registered by one line of `families!`
//! below ([`registry`] is the table: class name, defaults, size factor, cost model, loader);
//! [`common`] owns what they share (the guided denoise loop, `generate`, image
//! post-processing). The schedulers are [`crate::schedulers`], the files and weights
//! [`crate::loading`], the networks [`crate::models`].

pub mod args;
pub mod caption;
pub mod common;
pub mod estimate;
pub mod registry;

use candle_core::Tensor;
use image::RgbImage;

use crate::media::Media;
use crate::models::ModelError;
use crate::noise::Noise;
use crate::schedulers::{NoiseLevel, Parameterization};
pub use args::CallArgs;
pub use registry::{Family, LoadOptions};

/// Declares each model family's module and registers its `FAMILY` ([`registry::Family`]) in
/// [`FAMILIES`]: one line a family.
macro_rules! families {
    ($( $(#[cfg($cfg:meta)])? $vis:vis mod $m:ident ),* $(,)?) => {
        $( $(#[cfg($cfg)])? $vis mod $m; )*
        /// Every model family, as registered.
        pub static FAMILIES: &[&registry::Family] = &[ $( $(#[cfg($cfg)])? &$m::FAMILY, )* ];
    };
}

families! {
    pub mod sd15,
    pub mod sdxl,
    pub mod pixart,
    pub mod flux,
    #[cfg(test)] mod fake_video,
}

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

/// A loaded text-to-image pipeline: a [`Pipeline`] whose media are images.
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

/// A loaded pipeline as the search sees it: noises in, [`Media`] out (images or videos), with
/// the stepwise interface of the strategies that denoise step by step. Every [`ImagePipeline`]
/// is one; a video pipeline implements it directly.
pub trait Pipeline {
    /// What it makes.
    fn output(&self) -> crate::media::MediaKind {
        crate::media::MediaKind::Image
    }
    /// See [`ImagePipeline::noise_shape`].
    fn noise_shape(&self) -> Vec<usize>;
    /// See [`ImagePipeline::set_prompt`].
    fn set_prompt(&mut self, prompt: &str) -> Result<(), PipelineError>;
    /// Denoises a batch of initial noises (each of [`Pipeline::noise_shape`], float32) into
    /// media, in the same order.
    fn generate(&mut self, noises: &[Noise]) -> Result<Vec<Media>, PipelineError>;
    /// See [`ImagePipeline::evaluations_per_image`].
    fn evaluations_per_image(&self) -> Option<usize> {
        None
    }
    /// See [`ImagePipeline::schedule`].
    fn schedule(&self) -> Result<StepSchedule, PipelineError> {
        Err(stepwise_unsupported())
    }
    /// See [`ImagePipeline::noise_latents`].
    fn noise_latents(&self, _noises: &[Noise]) -> Result<Tensor, PipelineError> {
        Err(stepwise_unsupported())
    }
    /// See [`ImagePipeline::denoise_span`].
    fn denoise_span(
        &self,
        _latents: &Tensor,
        _from: usize,
        _to: usize,
    ) -> Result<Span, PipelineError> {
        Err(stepwise_unsupported())
    }
    /// See [`ImagePipeline::predict_x0`].
    fn predict_x0(&self, _latents: &Tensor, _level: usize) -> Result<Tensor, PipelineError> {
        Err(stepwise_unsupported())
    }
    /// Decodes latents (a batch, latent layout; clean or a clean-sample prediction) to media.
    fn decode_latents(&self, _latents: &Tensor) -> Result<Vec<Media>, PipelineError> {
        Err(stepwise_unsupported())
    }
}

/// An image pipeline's images as media.
fn images(images: Vec<RgbImage>) -> Vec<Media> {
    images.into_iter().map(Media::Image).collect()
}

impl<P: ImagePipeline + ?Sized> Pipeline for P {
    fn noise_shape(&self) -> Vec<usize> {
        ImagePipeline::noise_shape(self)
    }
    fn set_prompt(&mut self, prompt: &str) -> Result<(), PipelineError> {
        ImagePipeline::set_prompt(self, prompt)
    }
    fn generate(&mut self, noises: &[Noise]) -> Result<Vec<Media>, PipelineError> {
        ImagePipeline::generate(self, noises).map(images)
    }
    fn evaluations_per_image(&self) -> Option<usize> {
        ImagePipeline::evaluations_per_image(self)
    }
    fn schedule(&self) -> Result<StepSchedule, PipelineError> {
        ImagePipeline::schedule(self)
    }
    fn noise_latents(&self, noises: &[Noise]) -> Result<Tensor, PipelineError> {
        ImagePipeline::noise_latents(self, noises)
    }
    fn denoise_span(
        &self,
        latents: &Tensor,
        from: usize,
        to: usize,
    ) -> Result<Span, PipelineError> {
        ImagePipeline::denoise_span(self, latents, from, to)
    }
    fn predict_x0(&self, latents: &Tensor, level: usize) -> Result<Tensor, PipelineError> {
        ImagePipeline::predict_x0(self, latents, level)
    }
    fn decode_latents(&self, latents: &Tensor) -> Result<Vec<Media>, PipelineError> {
        ImagePipeline::decode_latents(self, latents).map(images)
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
