//! Stable Diffusion XL (diffusers' `StableDiffusionXLPipeline`, e.g.
//! stabilityai/stable-diffusion-xl-base-1.0): two CLIP text encoders whose penultimate hidden
//! states are concatenated, the pooled projection of the second as `text_embeds`, the UNet's
//! text-time conditioning (`original_size`, `crops_coords_top_left = (0, 0)`, `target_size`),
//! classifier-free guidance with `negative_prompt` (zeros when it is unset and
//! `force_zeros_for_empty_prompt`), the scheduler of `scheduler/scheduler_config.json`, and the
//! VAE decode with its `scaling_factor`, upcast to fp32 when `force_upcast` and the dtype is fp16.
//!
//! The UNet is ours ([`crate::models::unet`]); the VAE is candle-transformers' (decoded row
//! by row, as in [`crate::pipelines::sd15`]). No invisible watermark is applied (diffusers adds
//! one only when the optional `invisible-watermark` package is installed).

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::common::{check_dtype_on_device, clip_text_config, decode_rows, latent_noise_shape, load_vae, sampler_stepwise, weights_error, Sampler, SchedulerFactory};
use crate::loading::tokenizers::{clip_tokenizer};
use super::registry::{Cost, Defaults, Family, KnownRepo, ModelIndex};
use super::{CallArgs, ImagePipeline, PipelineError};
use crate::media::MediaKind;
use crate::loading::{candle_dtype, model_config, parse_config, var_builder, Dtype, ModelSource};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection};
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::unet::{UNet, UNetConfig};
use crate::models::vae::VaeDecoder;
use crate::noise::Noise;

/// What the model folder should be, for weight errors.
const MODEL: &str = "an SDXL model";

/// `StableDiffusionXLPipeline` in the model table. About 6 TFLOPs a UNet evaluation at 1024²,
/// scaling with the pixel count.
pub const FAMILY: Family = Family {
    class_name: "StableDiffusionXLPipeline",
    title: "SDXL",
    output: MediaKind::Image,
    defaults: Defaults {
        size: 1024,
        steps: 50,
        guidance: 5.0,
    },
    patch: 1,
    unused_args: &["max_sequence_length", "clean_caption"],
    repos: &[KnownRepo {
        id: "stabilityai/stable-diffusion-xl-base-1.0",
        short_name: "sdxl-base",
        steps: 50,
    }],
    id_hint: None,
    cost: Cost {
        cfg: true,
        flops: |h, w, _| 6.0e12 * (h * w) as f64 / (1024.0 * 1024.0),
    },
    load: |r| {
        Ok(Box::new(SdxlPipeline::load(
            &r.source,
            r.dtype,
            r.device,
            r.call_args,
        )?))
    },
};

/// The UNet conditioning of one prompt: `[uncond; cond]` rows under guidance, else `[cond]`.
#[derive(Clone, Debug)]
pub struct SdxlConditioning {
    /// Concatenated penultimate hidden states of both encoders (R, T, D1 + D2).
    pub prompt_embeds: Tensor,
    /// Pooled projection of `text_encoder_2` (R, projection_dim).
    pub text_embeds: Tensor,
}

/// A loaded SDXL pipeline.
pub struct SdxlPipeline {
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    text_encoder: ClipTextModel,
    text_encoder_2: ClipTextModelWithProjection,
    unet: UNet,
    vae: VaeDecoder,
    vae_dtype: DType,
    sampler: Sampler,
    dtype: DType,
    device: Device,
    scaling_factor: f64,
    latents_mean_std: Option<(Vec<f64>, Vec<f64>)>,
    /// [`ImagePipeline::noise_shape`]: (1, latent channels, latent height, latent width).
    noise_shape: Vec<usize>,
    height: usize,
    width: usize,
    negative_prompt: Option<String>,
    force_zeros_for_empty_prompt: bool,
    conditioning: Option<SdxlConditioning>,
}

/// A text encoder's `config.json`: the CLIP config, `projection_dim` and `eos_token_id`
/// (transformers' defaults 512 and 49407 when absent).
fn text_config(
    source: &ModelSource,
    folder: &str,
) -> Result<(ClipTextConfig, usize, u32), PipelineError> {
    let config = clip_text_config(source, folder)?;
    let projection_dim = config.projection_dim.unwrap_or(512);
    let eos = config.eos_token_id.unwrap_or(49407);
    Ok((config, projection_dim, eos))
}

impl SdxlPipeline {
    /// Loads both tokenizers and text encoders, the UNet, the VAE and the scheduler from
    /// `source` in `dtype` onto `device` (the VAE in fp32 when its config has `force_upcast`
    /// and `dtype` is fp16), and checks `call_args` against the model.
    pub fn load(
        source: &ModelSource,
        dtype: Dtype,
        device: &Device,
        call_args: &CallArgs,
    ) -> Result<Self, PipelineError> {
        check_dtype_on_device(dtype, device)?;
        let compute = candle_dtype(dtype);
        let index: ModelIndex =
            parse_config(&source.read_json("model_index.json")?, "model_index.json")?;
        let force_zeros_for_empty_prompt = index.force_zeros_for_empty_prompt.unwrap_or(true);
        let tokenizer = clip_tokenizer(source, "tokenizer")?;
        let tokenizer_2 = clip_tokenizer(source, "tokenizer_2")?;

        let (config_1, _, _) = text_config(source, "text_encoder")?;
        let vb = var_builder(source, "text_encoder", dtype, compute, device)?;
        let text_encoder = ClipTextModel::new(vb, &config_1)
            .map_err(|e| weights_error(source, "text_encoder", MODEL, e))?;
        let (config_2, projection_dim, eos_2) = text_config(source, "text_encoder_2")?;
        let vb = var_builder(source, "text_encoder_2", dtype, compute, device)?;
        let text_encoder_2 = ClipTextModelWithProjection::new(vb, &config_2, projection_dim, eos_2)
            .map_err(|e| weights_error(source, "text_encoder_2", MODEL, e))?;
        if config_1.num_hidden_layers < 2 || config_2.num_hidden_layers < 2 {
            return Err(PipelineError::Unsupported(
                "SDXL conditions on the penultimate hidden state: both text encoders need at \
                 least 2 layers (text_encoder*/config.json num_hidden_layers)"
                    .into(),
            ));
        }

        let unet_config: UNetConfig =
            model_config(&source.read_json("unet/config.json")?, "unet/config.json")?;
        let width = config_1.hidden_size + config_2.hidden_size;
        if unet_config.cross_attention_dim != width {
            return Err(PipelineError::ModelFile {
                path: "unet/config.json".into(),
                message: format!(
                    "cross_attention_dim {} differs from the two text encoders' hidden sizes \
                     {} + {} = {width}",
                    unet_config.cross_attention_dim, config_1.hidden_size, config_2.hidden_size
                ),
            });
        }
        match unet_config.text_time {
            Some((time_dim, input)) if 6 * time_dim + projection_dim == input => {}
            Some((time_dim, input)) => {
                return Err(PipelineError::ModelFile {
                    path: "unet/config.json".into(),
                    message: format!(
                        "projection_class_embeddings_input_dim {input} is not 6 time ids × \
                         addition_time_embed_dim {time_dim} + text_encoder_2 projection_dim \
                         {projection_dim}"
                    ),
                })
            }
            None => {
                return Err(PipelineError::Unsupported(
                    "unet/config.json: an SDXL UNet needs addition_embed_type \"text_time\"".into(),
                ))
            }
        }
        let vb = var_builder(source, "unet", dtype, compute, device)?;
        let unet =
            UNet::new(vb, &unet_config).map_err(|e| weights_error(source, "unet", MODEL, e))?;

        let (vae, vae_model, vae_dtype) = load_vae(
            source,
            dtype,
            device,
            ("UNet", unet_config.in_channels),
            MODEL,
            true,
        )?;
        let vae_scale_factor = vae.scale_factor();
        let (height, width, sampler) = Sampler::for_model(
            source,
            call_args,
            unet_config.sample_size * vae_scale_factor,
            vae_scale_factor,
            (FAMILY.defaults.steps, FAMILY.defaults.guidance),
        )?;
        Ok(Self {
            tokenizer,
            tokenizer_2,
            text_encoder,
            text_encoder_2,
            unet,
            vae: vae_model,
            vae_dtype,
            sampler,
            dtype: compute,
            device: device.clone(),
            scaling_factor: vae.scaling_factor,
            latents_mean_std: vae.latents_mean_std(),
            noise_shape: latent_noise_shape(vae.latent_channels, height, width, vae_scale_factor),
            height,
            width,
            negative_prompt: call_args.negative_prompt.clone(),
            force_zeros_for_empty_prompt,
            conditioning: None,
        })
    }

    /// Replaces the scheduler (e.g. diffusers' `from_config` swap to DPM-Solver++).
    pub fn set_scheduler(&mut self, scheduler: SchedulerFactory) {
        self.sampler.scheduler = scheduler;
    }

    /// Whether classifier-free guidance is on (`guidance_scale > 1`, as diffusers).
    pub fn uses_guidance(&self) -> bool {
        self.sampler.uses_guidance()
    }

    /// The dtype the VAE decodes in (fp32 when upcast).
    pub fn vae_dtype(&self) -> DType {
        self.vae_dtype
    }

    /// Token ids of `prompt` from `tokenizer` and `tokenizer_2`, each padded/truncated to 77
    /// (`tokenizer_2` pads with `!` in SDXL base).
    pub fn tokenize(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>), PipelineError> {
        Ok((
            self.tokenizer.encode(prompt)?,
            self.tokenizer_2.encode(prompt)?,
        ))
    }

    /// `text_encoder`'s penultimate hidden states for ids (T) → (1, T, hidden_size).
    pub fn text_encoder_penultimate(&self, ids: &[u32]) -> Result<Tensor, PipelineError> {
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let (_, hidden) = self.text_encoder.forward_with_hidden_states(&ids)?;
        Ok(hidden[hidden.len() - 2].clone())
    }

    /// `text_encoder_2`'s penultimate hidden states (1, T, hidden_size) and pooled projection
    /// (1, projection_dim) for ids (T).
    pub fn text_encoder_2_outputs(&self, ids: &[u32]) -> Result<(Tensor, Tensor), PipelineError> {
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let out = self.text_encoder_2.forward(&ids)?;
        let n = out.hidden_states.len();
        Ok((out.hidden_states[n - 2].clone(), out.text_embeds))
    }

    /// diffusers' `encode_prompt` for one prompt: the concatenated penultimate states
    /// (1, 77, D1 + D2) and the pooled projection (1, projection_dim).
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor, Tensor), PipelineError> {
        let (ids, ids_2) = self.tokenize(prompt)?;
        let h1 = self.text_encoder_penultimate(&ids)?;
        let (h2, pooled) = self.text_encoder_2_outputs(&ids_2)?;
        Ok((Tensor::cat(&[h1, h2], 2)?, pooled))
    }

    /// The UNet's time ids, `original_size + crops_coords_top_left + target_size` =
    /// `[height, width, 0, 0, height, width]` (the same for the negative prompt).
    pub fn add_time_ids(&self) -> [f32; 6] {
        let (h, w) = (self.height as f32, self.width as f32);
        [h, w, 0.0, 0.0, h, w]
    }

    /// The conditioning [`ImagePipeline::set_prompt`] built, if any.
    pub fn conditioning(&self) -> Option<&SdxlConditioning> {
        self.conditioning.as_ref()
    }

    /// One UNet forward: `sample` (B, C, h, w) at `timestep`, with `encoder_hidden_states`
    /// (B, T, D), `text_embeds` (B, P) and `time_ids` (B, 6); returns the prediction (B, C, h, w).
    pub fn unet_forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Result<Tensor, PipelineError> {
        Ok(self.unet.forward(
            &sample.to_dtype(self.dtype)?,
            timestep,
            &encoder_hidden_states.to_dtype(self.dtype)?,
            Some((&text_embeds.to_dtype(self.dtype)?, time_ids)),
        )?)
    }

    /// VAE decode of denoised `latents` (B, C, h, w) in the VAE's dtype: `decode(latents /
    /// scaling_factor)` (or `latents · std / scaling_factor + mean` with `latents_mean/std`),
    /// images in about [-1, 1], (B, 3, h·f, w·f). Rows are decoded one at a time (see sd15).
    pub fn vae_decode(&self, latents: &Tensor) -> Result<Tensor, PipelineError> {
        let latents = latents.to_dtype(self.vae_dtype)?;
        let z = match &self.latents_mean_std {
            None => (latents / self.scaling_factor)?,
            Some((mean, std)) => {
                let c = mean.len();
                let as_tensor = |v: &[f64]| -> candle_core::Result<Tensor> {
                    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                    Tensor::from_vec(v, (1, c, 1, 1), &self.device)?.to_dtype(self.vae_dtype)
                };
                ((latents.broadcast_mul(&as_tensor(std)?)? / self.scaling_factor)?
                    .broadcast_add(&as_tensor(mean)?))?
            }
        };
        decode_rows(&z, |row| self.vae.decode(row))
    }

    /// The UNet call for a batch of `b` images with the conditioning of
    /// [`ImagePipeline::set_prompt`] (rows as [`Sampler::batch_rows`] lays them out).
    fn forward_fn(
        &self,
        b: usize,
    ) -> Result<impl Fn(&Tensor, f64) -> Result<Tensor, PipelineError> + '_, PipelineError> {
        let cond = self.conditioning.as_ref().ok_or_else(|| {
            PipelineError::InvalidArgument("set_prompt must be called before generate".into())
        })?;
        let context = self.sampler.batch_rows(&cond.prompt_embeds, b)?;
        let text_embeds = self.sampler.batch_rows(&cond.text_embeds, b)?;
        let n = context.dim(0)?;
        let ids = self.add_time_ids();
        let time_ids = Tensor::from_vec(ids.repeat(n), (n, 6), &self.device)?;
        Ok(move |input: &Tensor, t: f64| {
            Ok(self
                .unet
                .forward(input, t, &context, Some((&text_embeds, &time_ids)))?)
        })
    }

    /// Denoises initial latents (B, C, h, w), already scaled by `init_noise_sigma`, with the
    /// conditioning of [`ImagePipeline::set_prompt`]; returns the final latents.
    pub fn denoise(&self, latents: &Tensor) -> Result<Tensor, PipelineError> {
        self.sampler
            .denoise(latents, self.forward_fn(latents.dim(0)?)?)
    }
}

impl ImagePipeline for SdxlPipeline {
    fn evaluations_per_image(&self) -> Option<usize> {
        self.sampler.evaluations()
    }

    fn noise_shape(&self) -> Vec<usize> {
        self.noise_shape.clone()
    }

    fn set_prompt(&mut self, prompt: &str) -> Result<(), PipelineError> {
        let (embeds, pooled) = self.encode_prompt(prompt)?;
        let negative = || -> Result<[Tensor; 2], PipelineError> {
            let (neg, neg_pooled) = match &self.negative_prompt {
                None if self.force_zeros_for_empty_prompt => {
                    (embeds.zeros_like()?, pooled.zeros_like()?)
                }
                negative => self.encode_prompt(negative.as_deref().unwrap_or(""))?,
            };
            Ok([neg, neg_pooled])
        };
        let [prompt_embeds, text_embeds] =
            self.sampler.pair([embeds.clone(), pooled.clone()], negative)?;
        self.conditioning = Some(SdxlConditioning {
            prompt_embeds,
            text_embeds,
        });
        Ok(())
    }

    fn generate(&mut self, noises: &[Noise]) -> Result<Vec<RgbImage>, PipelineError> {
        let run = |l: &Tensor| self.vae_decode(&self.denoise(l)?);
        self.sampler
            .generate(noises, &self.noise_shape, self.dtype, &self.device, run)
    }

    sampler_stepwise!(vae_decode);
}

#[cfg(test)]
mod tests {
    use crate::pipelines::common::vae_config;
    use serde_json::json;

    #[test]
    fn sdxl_vae_config_reads_scaling_factor_and_force_upcast() {
        let spec = vae_config(&json!({
            "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "force_upcast": true,
            "latent_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "scaling_factor": 0.13025
        }))
        .unwrap();
        assert_eq!(spec.scaling_factor, 0.13025);
        assert!(spec.force_upcast);
        assert!(spec.latents_mean_std().is_none());
        assert_eq!(1usize << (spec.block_out_channels.len() - 1), 8);
    }

    #[test]
    fn latents_mean_without_a_matching_std_names_the_key() {
        let err = vae_config(&json!({
            "block_out_channels": [32],
            "latent_channels": 4,
            "latents_mean": [0.1, 0.2],
            "latents_std": [1.0, 1.0]
        }))
        .err()
        .unwrap();
        assert!(err.to_string().contains("latents_mean"), "{err}");
    }
}
