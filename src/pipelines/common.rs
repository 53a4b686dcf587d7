//! What every pipeline shares: the initial-noise batch, the one denoise loop ([`Sampler`]:
//! classifier-free guidance where the pipeline uses it, any [`Scheduler`], whole runs and the
//! stepwise strategies' spans) of SD 1.5, SDXL, PixArt and Flux, `generate`, diffusers' image
//! post-processing, and the file helpers of the loaders. Each model family's file holds only what
//! differs.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::{CallArgs, PipelineError};
use super::{Span, StepSchedule};
use crate::loading::{candle_dtype, parse_config, var_builder, Dtype, ModelSource};
use crate::models::clip_text::ClipTextConfig;
use crate::models::vae::{VaeConfig, VaeDecoder};
use crate::noise::Noise;
use crate::schedulers::levels::predicted_x0;
use crate::schedulers::{Scheduler, SchedulerConfig};

/// Builds a fresh scheduler for a number of inference steps (one per generation).
pub type SchedulerFactory = Box<dyn Fn(usize) -> Result<Box<dyn Scheduler>, PipelineError> + Send>;

/// The scheduler factory for a `scheduler_config.json` on disk.
pub fn scheduler_from_file(path: &std::path::Path) -> Result<SchedulerFactory, PipelineError> {
    let config = SchedulerConfig::from_file(path)?;
    Ok(Box::new(move |steps| config.build(steps)))
}

/// Stacks a batch of initial noises, each of `shape` (batch dimension 1), into one float32
/// tensor `(B, ...)` on `device`; a noise of another shape is an error naming it.
pub fn noise_batch(
    noises: &[Noise],
    shape: &[usize],
    device: &Device,
) -> Result<Tensor, PipelineError> {
    let mut rows = Vec::with_capacity(noises.len());
    for (i, noise) in noises.iter().enumerate() {
        if noise.shape != shape || noise.data.len() != shape.iter().product::<usize>() {
            return Err(PipelineError::InvalidArgument(format!(
                "noise {i} has shape {:?} ({} values); this pipeline needs {shape:?}",
                noise.shape,
                noise.data.len()
            )));
        }
        rows.push(Tensor::from_slice(&noise.data, shape, device)?);
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// diffusers' postprocess + `numpy_to_pil`: `(x / 2 + 0.5).clamp(0, 1)`, then
/// `(x * 255).round()` (half to even, as NumPy) to u8, one RGB image per batch row of
/// `decoded` (B, 3, H, W).
pub fn to_images(decoded: &Tensor) -> Result<Vec<RgbImage>, PipelineError> {
    let (b, c, h, w) = decoded.dims4()?;
    if c != 3 {
        return Err(PipelineError::Unsupported(format!(
            "the VAE decodes {c} channels; only RGB (3) images are supported"
        )));
    }
    let x = ((decoded.to_dtype(DType::F32)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let data: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let per_image = h * w * 3;
    (0..b)
        .map(|i| {
            let bytes: Vec<u8> = data[i * per_image..(i + 1) * per_image]
                .iter()
                .map(|v| (v * 255.0).round_ties_even() as u8)
                .collect();
            RgbImage::from_raw(w as u32, h as u32, bytes).ok_or_else(|| {
                PipelineError::InvalidArgument("decoded image has an unexpected size".into())
            })
        })
        .collect()
}

/// Turns a component's construction error (usually a missing or mis-shaped tensor) into a
/// message naming the component's weights; `model` says what the folder should be (e.g. "an
/// SDXL model").
pub fn weights_error(
    source: &ModelSource,
    component: &str,
    model: &str,
    e: impl std::fmt::Display,
) -> PipelineError {
    PipelineError::ModelFile {
        path: format!("{}/{component}", source.display_name()),
        message: format!(
            "the weights do not match {component}/config.json: {e}; is this {model} in \
             diffusers layout?"
        ),
    }
}

/// A CLIP text encoder's `folder/config.json` (transformers' `CLIPTextConfig`).
pub fn clip_text_config(
    source: &ModelSource,
    folder: &str,
) -> Result<ClipTextConfig, PipelineError> {
    let file = format!("{folder}/config.json");
    parse_config(&source.read_json(&file)?, &file)
}

/// A model's `vae/config.json` (already read as `value`), checked against what the decoder
/// implements.
pub fn vae_config(value: &serde_json::Value) -> Result<VaeConfig, PipelineError> {
    const FILE: &str = "vae/config.json";
    let config: VaeConfig = parse_config(value, FILE)?;
    config.check(FILE)?;
    Ok(config)
}

/// The VAE decoder of a latent-diffusion pipeline: `vae/config.json` checked, its
/// `latent_channels` against the denoiser's `in_channels` (`denoiser` names it), the weights
/// loaded in `dtype`'s compute type, or in float32 when `upcast` and the model's `force_upcast`
/// ask for it in fp16 (SDXL). Returns the config, the decoder and the dtype it runs in.
pub fn load_vae(
    source: &ModelSource,
    dtype: Dtype,
    device: &Device,
    (denoiser, in_channels): (&str, usize),
    model: &str,
    upcast: bool,
) -> Result<(VaeConfig, VaeDecoder, DType), PipelineError> {
    let vae = vae_config(&source.read_json("vae/config.json")?)?;
    if vae.latent_channels != in_channels {
        return Err(PipelineError::ModelFile {
            path: "vae/config.json".into(),
            message: format!(
                "latent_channels {} differs from the {denoiser}'s in_channels {in_channels}",
                vae.latent_channels
            ),
        });
    }
    let compute = candle_dtype(dtype);
    let vae_dtype = if upcast && compute == DType::F16 && vae.force_upcast {
        DType::F32
    } else {
        compute
    };
    let vb = var_builder(source, "vae", dtype, vae_dtype, device)?;
    let decoder = VaeDecoder::new(vb, vae.out_channels, vae.decoder_config())
        .map_err(|e| weights_error(source, "vae", model, e))?;
    Ok((vae, decoder, vae_dtype))
}

/// Refuses bf16 on the CPU for the UNet pipelines: candle has no bf16 matmul there.
pub fn check_dtype_on_device(dtype: Dtype, device: &Device) -> Result<(), PipelineError> {
    if dtype == Dtype::Bf16 && device.is_cpu() {
        return Err(PipelineError::Unsupported(
            "torch_dtype \"bf16\" needs a CUDA device (candle has no bf16 matmul on the \
             CPU); use \"fp32\" or \"fp16\" on the CPU"
                .into(),
        ));
    }
    Ok(())
}

/// The initial-noise shape of a latent-diffusion pipeline: `(1, channels, height / factor,
/// width / factor)`, as diffusers draws it.
pub fn latent_noise_shape(
    channels: usize,
    height: usize,
    width: usize,
    factor: usize,
) -> Vec<usize> {
    vec![1, channels, height / factor, width / factor]
}

/// The sampling settings of a pipeline and the loop they drive.
pub struct Sampler {
    /// The scheduler, built afresh for every generation.
    pub scheduler: SchedulerFactory,
    /// Denoising steps.
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale; guidance is on when it is above 1, as in diffusers.
    pub guidance_scale: f64,
}

impl Sampler {
    /// [`Sampler::from_call_args`] with the scheduler of the model's
    /// `scheduler/scheduler_config.json`.
    pub fn for_model(
        source: &ModelSource,
        call_args: &CallArgs,
        default_size: usize,
        vae_scale_factor: usize,
        (default_steps, default_guidance): (usize, f64),
    ) -> Result<(usize, usize, Self), PipelineError> {
        let scheduler = scheduler_from_file(&source.file("scheduler/scheduler_config.json")?)?;
        Self::from_call_args(
            call_args,
            scheduler,
            default_size,
            vae_scale_factor,
            default_steps,
            default_guidance,
        )
    }

    /// Resolves the call arguments of a scheduler-driven pipeline against the model: height and
    /// width (default `default_size`), steps and guidance (the pipeline's defaults), checked by
    /// [`super::check_call_args`]; the schedule is built once so that an unsupported scheduler
    /// or step count fails at load. Returns `(height, width, sampler)`.
    pub fn from_call_args(
        call_args: &CallArgs,
        scheduler: SchedulerFactory,
        default_size: usize,
        vae_scale_factor: usize,
        default_steps: usize,
        default_guidance: f64,
    ) -> Result<(usize, usize, Self), PipelineError> {
        let height = call_args.height.unwrap_or(default_size);
        let width = call_args.width.unwrap_or(default_size);
        let num_inference_steps = call_args.num_inference_steps.unwrap_or(default_steps);
        let guidance_scale = call_args.guidance_scale.unwrap_or(default_guidance);
        super::check_call_args(
            height,
            width,
            vae_scale_factor,
            num_inference_steps,
            guidance_scale,
        )?;
        scheduler(num_inference_steps)?;
        let sampler = Sampler {
            scheduler,
            num_inference_steps,
            guidance_scale,
        };
        Ok((height, width, sampler))
    }

    /// Denoiser evaluations per image: the scheduler's timesteps (PNDM visits one twice), twice
    /// under guidance.
    pub fn evaluations(&self) -> Option<usize> {
        let steps = (self.scheduler)(self.num_inference_steps)
            .ok()?
            .timesteps()
            .len();
        Some(steps * if self.uses_guidance() { 2 } else { 1 })
    }

    /// Whether classifier-free guidance is on (`guidance_scale > 1`, as diffusers).
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// One prompt's conditioning rows: each of the `N` tensors of `cond` (1, ...) as
    /// `[uncond; cond]` (2, ...) with its counterpart of `uncond` under guidance, else as it is;
    /// `uncond` is computed only when guidance is on.
    pub fn pair<const N: usize>(
        &self,
        cond: [Tensor; N],
        uncond: impl FnOnce() -> Result<[Tensor; N], PipelineError>,
    ) -> Result<[Tensor; N], PipelineError> {
        if !self.uses_guidance() {
            return Ok(cond);
        }
        let rows = uncond()?
            .into_iter()
            .zip(cond)
            .map(|(u, c)| Tensor::cat(&[u, c], 0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        rows.try_into().map_err(|_: Vec<Tensor>| {
            PipelineError::InvalidArgument("conditioning rows lost in pairing".into())
        })
    }

    /// One prompt's conditioning `t` (rows `[uncond; cond]` under guidance, else `[cond]`)
    /// repeated for a batch of `b` images: `[uncond × b, cond × b]` under guidance (diffusers'
    /// order), else `[cond × b]`.
    pub fn batch_rows(&self, t: &Tensor, b: usize) -> Result<Tensor, PipelineError> {
        let reps: Vec<usize> = std::iter::once(b)
            .chain(std::iter::repeat_n(1, t.rank() - 1))
            .collect();
        if self.uses_guidance() {
            Ok(Tensor::cat(
                &[
                    t.narrow(0, 0, 1)?.repeat(reps.as_slice())?,
                    t.narrow(0, 1, 1)?.repeat(reps.as_slice())?,
                ],
                0,
            )?)
        } else {
            Ok(t.repeat(reps.as_slice())?)
        }
    }

    /// The guided prediction for `latents` (B, C, h, w) at `t`: the model input (latents twice
    /// under guidance) is scaled by the scheduler, `forward(input, t)` predicts (2B or B rows),
    /// and under guidance the rows are combined as `uncond + scale · (cond − uncond)`.
    fn guided(
        &self,
        scheduler: &dyn Scheduler,
        latents: &Tensor,
        t: f64,
        forward: &mut impl FnMut(&Tensor, f64) -> Result<Tensor, PipelineError>,
    ) -> Result<Tensor, PipelineError> {
        let b = latents.dim(0)?;
        let guided = self.uses_guidance();
        let input = if guided {
            Tensor::cat(&[latents, latents], 0)?
        } else {
            latents.clone()
        };
        let input = scheduler.scale_model_input(&input, t)?;
        let pred = forward(&input, t)?;
        Ok(if guided {
            let uncond = pred.narrow(0, 0, b)?;
            let cond = pred.narrow(0, b, b)?;
            (&uncond + ((cond - &uncond)? * self.guidance_scale)?)?
        } else {
            pred
        })
    }

    /// The one denoise loop: from `latents`, for each timestep of `visits` the guided prediction
    /// ([`Sampler::guided`]) and a step of `scheduler`. Returns the last latents and, with
    /// `keep_x0`, the clean-sample prediction of the last model call.
    fn run(
        &self,
        mut scheduler: Box<dyn Scheduler>,
        visits: &[f64],
        latents: &Tensor,
        keep_x0: bool,
        forward: &mut impl FnMut(&Tensor, f64) -> Result<Tensor, PipelineError>,
    ) -> Result<(Tensor, Option<Tensor>), PipelineError> {
        let levels = if keep_x0 {
            scheduler.levels()
        } else {
            Vec::new()
        };
        let mut latents = latents.clone();
        let mut x0 = None;
        for (i, &t) in visits.iter().enumerate() {
            let pred = self.guided(scheduler.as_ref(), &latents, t, forward)?;
            if keep_x0 && i + 1 == visits.len() {
                let level = levels.iter().find(|l| l.timestep == t).ok_or_else(|| {
                    PipelineError::InvalidArgument(format!("timestep {t} has no noise level"))
                })?;
                x0 = Some(predicted_x0(
                    scheduler.parameterization(),
                    &pred,
                    &latents,
                    level,
                )?);
            }
            latents = scheduler.step(&pred, t, &latents)?;
        }
        Ok((latents, x0))
    }

    /// The guided denoise loop over the whole schedule: from initial `latents` (B, C, h, w),
    /// already scaled by `init_noise_sigma`, for each timestep the guided prediction
    /// ([`Sampler::guided`]) and a scheduler step. Returns the final latents.
    pub fn denoise(
        &self,
        latents: &Tensor,
        mut forward: impl FnMut(&Tensor, f64) -> Result<Tensor, PipelineError>,
    ) -> Result<Tensor, PipelineError> {
        let scheduler = (self.scheduler)(self.num_inference_steps)?;
        let visits = scheduler.timesteps().to_vec();
        Ok(self
            .run(scheduler, &visits, latents, false, &mut forward)?
            .0)
    }

    /// The schedule of [`super::ImagePipeline::schedule`].
    pub fn schedule(&self) -> Result<StepSchedule, PipelineError> {
        let n = self.num_inference_steps;
        let scheduler = (self.scheduler)(n)?;
        // A whole run from a fresh start shows the warm-up's extra calls.
        let full = (self.scheduler)(n)?
            .begin_segment(0, n)
            .map_or(n, |v| v.len());
        Ok(StepSchedule {
            levels: scheduler.levels(),
            parameterization: scheduler.parameterization(),
            init_noise_sigma: scheduler.init_noise_sigma(),
            evaluations_per_call: if self.uses_guidance() { 2 } else { 1 },
            warmup_calls: full.saturating_sub(n),
        })
    }

    /// [`super::ImagePipeline::denoise_span`]: a fresh scheduler denoises `latents` from level
    /// `from` to level `to` ([`Scheduler::begin_segment`]); the clean-sample prediction of the
    /// last model call is kept.
    pub fn span(
        &self,
        latents: &Tensor,
        (from, to): (usize, usize),
        mut forward: impl FnMut(&Tensor, f64) -> Result<Tensor, PipelineError>,
    ) -> Result<Span, PipelineError> {
        let mut scheduler = (self.scheduler)(self.num_inference_steps)?;
        let visits = scheduler.begin_segment(from, to)?;
        let (latents, x0) = self.run(scheduler, &visits, latents, true, &mut forward)?;
        let x0 = x0.ok_or_else(|| PipelineError::InvalidArgument("an empty segment".into()))?;
        let evaluations = visits.len() * if self.uses_guidance() { 2 } else { 1 };
        Ok(Span {
            latents,
            x0,
            evaluations,
        })
    }

    /// [`super::ImagePipeline::predict_x0`]: one guided model call on `latents` at `level`.
    pub fn predict_x0(
        &self,
        latents: &Tensor,
        level: usize,
        mut forward: impl FnMut(&Tensor, f64) -> Result<Tensor, PipelineError>,
    ) -> Result<Tensor, PipelineError> {
        let mut scheduler = (self.scheduler)(self.num_inference_steps)?;
        let levels = scheduler.levels();
        // Sets the scheduler's step index (Euler scales the input by its level's sigma).
        scheduler.begin_segment(level, level + 1)?;
        let at = levels.get(level).ok_or_else(|| {
            PipelineError::InvalidArgument(format!("the schedule has no level {level}"))
        })?;
        let pred = self.guided(scheduler.as_ref(), latents, at.timestep, &mut forward)?;
        Ok(predicted_x0(
            scheduler.parameterization(),
            &pred,
            latents,
            at,
        )?)
    }

    /// `generate` of a scheduler-driven pipeline: stacks `noises` (each of `shape`), scales
    /// them by the scheduler's `init_noise_sigma` in `dtype`, runs `denoise_and_decode` on them
    /// (to images in about [-1, 1]) and post-processes as diffusers does. No noises, no images.
    pub fn generate(
        &self,
        noises: &[Noise],
        shape: &[usize],
        dtype: DType,
        device: &Device,
        denoise_and_decode: impl FnOnce(&Tensor) -> Result<Tensor, PipelineError>,
    ) -> Result<Vec<RgbImage>, PipelineError> {
        if noises.is_empty() {
            return Ok(Vec::new());
        }
        let batch = noise_batch(noises, shape, device)?;
        let sigma = (self.scheduler)(self.num_inference_steps)?.init_noise_sigma();
        let latents = (batch.to_dtype(dtype)? * sigma)?;
        to_images(&denoise_and_decode(&latents)?)
    }
}

/// The stepwise methods of [`super::ImagePipeline`] for a scheduler-driven pipeline: one with
/// fields `sampler`, `noise_shape`, `dtype` and `device`, a method `forward_fn(b)` giving the
/// model call for a batch of `b` images, and the decode method named by `$decode` (latents to
/// images in about [-1, 1]).
macro_rules! sampler_stepwise {
    ($decode:ident) => {
        fn schedule(&self) -> Result<$crate::pipelines::StepSchedule, PipelineError> {
            self.sampler.schedule()
        }
        fn noise_latents(
            &self,
            noises: &[$crate::noise::Noise],
        ) -> Result<candle_core::Tensor, PipelineError> {
            let batch =
                $crate::pipelines::common::noise_batch(noises, &self.noise_shape, &self.device)?;
            Ok(batch.to_dtype(self.dtype)?)
        }
        fn denoise_span(
            &self,
            latents: &candle_core::Tensor,
            from: usize,
            to: usize,
        ) -> Result<$crate::pipelines::Span, PipelineError> {
            let forward = self.forward_fn(latents.dim(0)?)?;
            self.sampler.span(latents, (from, to), forward)
        }
        fn predict_x0(
            &self,
            latents: &candle_core::Tensor,
            level: usize,
        ) -> Result<candle_core::Tensor, PipelineError> {
            let forward = self.forward_fn(latents.dim(0)?)?;
            self.sampler.predict_x0(latents, level, forward)
        }
        fn decode_latents(
            &self,
            latents: &candle_core::Tensor,
        ) -> Result<Vec<image::RgbImage>, PipelineError> {
            $crate::pipelines::common::to_images(&self.$decode(latents)?)
        }
    };
}
pub(crate) use sampler_stepwise;

/// Decodes `z` (B, C, h, w) one row at a time with `decode` and stacks the images: candle's
/// VAE attention gave wrong results for batches of more than one row (its strided batched
/// matmul), and the decode is a small part of the cost.
pub fn decode_rows(
    z: &Tensor,
    decode: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor, PipelineError> {
    let rows = (0..z.dim(0)?)
        .map(|i| decode(&z.narrow(0, i, 1)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_images_denormalizes_clamps_and_rounds_like_diffusers() {
        // (x/2 + 0.5).clamp(0, 1) * 255, rounded: -1 → 0, 1 → 255, 3 → 255 (clamped),
        // -0.5 → 63.75 → 64, 0 → 127.5 → 128 (half to even).
        let t = Tensor::from_vec(
            vec![-1f32, 1.0, 3.0, -0.5, 0.0, -2.0],
            (2, 3, 1, 1),
            &Device::Cpu,
        )
        .unwrap();
        let img = to_images(&t).unwrap();
        assert_eq!(img.len(), 2);
        assert_eq!(img[0].as_raw(), &vec![0, 255, 255]);
        assert_eq!(img[1].as_raw(), &vec![64, 128, 0]);
    }
}
