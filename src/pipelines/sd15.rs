//! Stable Diffusion 1.5 (diffusers' `StableDiffusionPipeline`): CLIP text encoder, UNet with
//! classifier-free guidance, the scheduler named in `scheduler/scheduler_config.json`, and the
//! VAE decoder, all sized from the components' `config.json` files.
//!
//! The UNet is ours ([`crate::models::unet`], the one SDXL uses, without the text-time
//! embedding; `attention_head_dim` read as the number of heads, as diffusers does for SD 1.x),
//! so it runs the fused CUDA kernels ([`crate::ops`]) and any `norm_num_groups`; the VAE is
//! candle-transformers' `stable_diffusion::vae`; the tokenizer and the text encoder are ours.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde_json::Value;

use super::common::{check_dtype_on_device, clip_text_config, decode_rows, latent_noise_shape, load_vae, sampler_stepwise, weights_error, Sampler, SchedulerFactory};
use crate::loading::tokenizers::{clip_tokenizer};
use super::registry::{Cost, Defaults, Family, KnownRepo};
use super::{CallArgs, ImagePipeline, PipelineError};
use crate::media::MediaKind;
use crate::loading::{candle_dtype, model_config, parse_config, var_builder, Dtype, ModelSource};
use crate::models::clip_text::ClipTextModel;
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::unet::{UNet, UNetConfig};
use crate::models::vae::VaeDecoder;
use crate::noise::Noise;

/// What the model folder should be, for weight errors.
const MODEL: &str = "a Stable Diffusion 1.x model";

/// `StableDiffusionPipeline` in the model table. About 0.8 TFLOPs a UNet evaluation at 512²,
/// scaling with the pixel count.
pub const FAMILY: Family = Family {
    class_name: "StableDiffusionPipeline",
    title: "Stable Diffusion 1.5",
    output: MediaKind::Image,
    defaults: Defaults {
        size: 512,
        steps: 50,
        guidance: 7.5,
    },
    patch: 1,
    unused_args: &["max_sequence_length", "clean_caption"],
    repos: &[KnownRepo {
        id: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        short_name: "sd-v1.5",
        steps: 50,
    }],
    id_hint: None,
    cost: Cost {
        cfg: true,
        flops: |h, w, _| 0.8e12 * (h * w) as f64 / (512.0 * 512.0),
    },
    load: |r| {
        Ok(Box::new(Sd15Pipeline::load(
            &r.source,
            r.dtype,
            r.device,
            r.call_args,
        )?))
    },
};

/// A loaded Stable Diffusion 1.5 pipeline.
pub struct Sd15Pipeline {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet,
    vae: VaeDecoder,
    sampler: Sampler,
    dtype: DType,
    device: Device,
    vae_scale_factor: usize,
    scaling_factor: f64,
    shift_factor: f64,
    /// [`ImagePipeline::noise_shape`]: (1, latent channels, latent height, latent width).
    noise_shape: Vec<usize>,
    negative_prompt: String,
    /// `[uncond; cond]` (2, T, D) under guidance, else `[cond]` (1, T, D).
    context: Option<Tensor>,
}

/// The keys of `unet/config.json` an SD 1.x pipeline reads beyond the UNet's own.
#[derive(serde::Deserialize)]
struct Sd15UNetKeys {
    /// Must be absent (SDXL's `text_time` is refused).
    #[serde(default)]
    addition_embed_type: Option<Value>,
    /// Must be false.
    #[serde(default)]
    center_input_sample: Option<Value>,
    /// diffusers' UNet2DConditionModel defaults it to None; SD 1.x configs set it (64).
    #[serde(default)]
    sample_size: Option<usize>,
}

/// The UNet's config from `unet/config.json`: what [`UNetConfig`] accepts, without an
/// addition embedding (an SD 1.x UNet) and without input centring.
pub fn unet_config(value: &Value) -> Result<UNetConfig, PipelineError> {
    const FILE: &str = "unet/config.json";
    let keys: Sd15UNetKeys = parse_config(value, FILE)?;
    let unsupported = |key: &str, v: &Value, expected: &str| {
        PipelineError::Unsupported(format!(
            "{FILE}: {key} = {v} is not supported by the SD 1.5 pipeline (expected {expected})"
        ))
    };
    if let Some(v) = &keys.addition_embed_type {
        return Err(unsupported("addition_embed_type", v, "null"));
    }
    if let Some(v) = keys.center_input_sample.as_ref().filter(|v| **v != false) {
        return Err(unsupported("center_input_sample", v, "false"));
    }
    let mut config: UNetConfig = model_config(value, FILE)?;
    config.sample_size = keys.sample_size.unwrap_or(64);
    Ok(config)
}

impl Sd15Pipeline {
    /// Loads tokenizer, text encoder, UNet, VAE and scheduler from `source` in `dtype` onto
    /// `device`, and checks `call_args` against the model (height/width multiples of the VAE
    /// scale factor). The safety checker and feature extractor are not loaded.
    pub fn load(
        source: &ModelSource,
        dtype: Dtype,
        device: &Device,
        call_args: &CallArgs,
    ) -> Result<Self, PipelineError> {
        check_dtype_on_device(dtype, device)?;
        let tokenizer = clip_tokenizer(source, "tokenizer")?;
        let text_config = clip_text_config(source, "text_encoder")?;
        let vb = var_builder(source, "text_encoder", dtype, candle_dtype(dtype), device)?;
        let text_encoder = ClipTextModel::new(vb, &text_config)
            .map_err(|e| weights_error(source, "text_encoder", MODEL, e))?;

        let unet = unet_config(&source.read_json("unet/config.json")?)?;
        let vb = var_builder(source, "unet", dtype, candle_dtype(dtype), device)?;
        let sample_size = unet.sample_size;
        let unet_model =
            UNet::new(vb, &unet).map_err(|e| weights_error(source, "unet", MODEL, e))?;

        let (vae, vae_model, _) = load_vae(
            source,
            dtype,
            device,
            ("UNet", unet.in_channels),
            MODEL,
            false,
        )?;
        let vae_scale_factor = vae.scale_factor();
        let (height, width, sampler) = Sampler::for_model(
            source,
            call_args,
            sample_size * vae_scale_factor,
            vae_scale_factor,
            (FAMILY.defaults.steps, FAMILY.defaults.guidance),
        )?;
        Ok(Self {
            tokenizer,
            text_encoder,
            unet: unet_model,
            vae: vae_model,
            sampler,
            dtype: candle_dtype(dtype),
            device: device.clone(),
            vae_scale_factor,
            scaling_factor: vae.scaling_factor,
            shift_factor: vae.shift_factor.unwrap_or(0.0),
            noise_shape: latent_noise_shape(vae.latent_channels, height, width, vae_scale_factor),
            negative_prompt: call_args.negative_prompt.clone().unwrap_or_default(),
            context: None,
        })
    }

    /// Replaces the scheduler (e.g. diffusers' `from_config` swap to DDIM or Euler).
    pub fn set_scheduler(&mut self, scheduler: SchedulerFactory) {
        self.sampler.scheduler = scheduler;
    }

    /// The VAE scale factor, `2^(len(vae.block_out_channels) - 1)` (8 for SD 1.5).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_scale_factor
    }

    /// Whether classifier-free guidance is on (`guidance_scale > 1`, as diffusers).
    pub fn uses_guidance(&self) -> bool {
        self.sampler.uses_guidance()
    }

    /// CLIP token ids of `prompt`, padded/truncated to `model_max_length` (77).
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>, PipelineError> {
        self.tokenizer.encode(prompt)
    }

    /// Text-encoder hidden states of token ids (1, T) → (1, T, hidden_size), in the model dtype.
    pub fn encode_ids(&self, ids: &[u32]) -> Result<Tensor, PipelineError> {
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        Ok(self.text_encoder.forward(&ids)?)
    }

    /// Text-encoder hidden states of `prompt`: (1, 77, hidden_size), in the model dtype.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor, PipelineError> {
        self.encode_ids(&self.tokenize(prompt)?)
    }

    /// One UNet forward: `sample` (B, C, h, w) at `timestep`, conditioned on
    /// `encoder_hidden_states` (B, T, D); returns the predicted noise (B, C, h, w).
    pub fn unet_forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor, PipelineError> {
        Ok(self
            .unet
            .forward(sample, timestep, encoder_hidden_states, None)?)
    }

    /// VAE decode of denoised `latents` (B, C, h, w): `decode(latents / scaling_factor +
    /// shift_factor)`, returning images in about [-1, 1], (B, 3, h·f, w·f).
    ///
    /// Rows are decoded one at a time ([`decode_rows`]).
    pub fn vae_decode(&self, latents: &Tensor) -> Result<Tensor, PipelineError> {
        let z = ((latents.to_dtype(self.dtype)? / self.scaling_factor)? + self.shift_factor)?;
        decode_rows(&z, |row| self.vae.decode(row))
    }

    /// The UNet call for a batch of `b` images with the embeddings of
    /// [`ImagePipeline::set_prompt`] (rows as [`Sampler::batch_rows`] lays them out).
    fn forward_fn(
        &self,
        b: usize,
    ) -> Result<impl Fn(&Tensor, f64) -> Result<Tensor, PipelineError> + '_, PipelineError> {
        let context = self.context.as_ref().ok_or_else(|| {
            PipelineError::InvalidArgument("set_prompt must be called before generate".into())
        })?;
        let context = self.sampler.batch_rows(context, b)?;
        Ok(move |input: &Tensor, t: f64| Ok(self.unet.forward(input, t, &context, None)?))
    }

    /// Denoises initial latents (B, C, h, w), already scaled by `init_noise_sigma`, with the
    /// embeddings of [`ImagePipeline::set_prompt`]; returns the final latents.
    pub fn denoise(&self, latents: &Tensor) -> Result<Tensor, PipelineError> {
        self.sampler
            .denoise(latents, self.forward_fn(latents.dim(0)?)?)
    }
}

impl ImagePipeline for Sd15Pipeline {
    fn evaluations_per_image(&self) -> Option<usize> {
        self.sampler.evaluations()
    }

    fn noise_shape(&self) -> Vec<usize> {
        self.noise_shape.clone()
    }

    fn set_prompt(&mut self, prompt: &str) -> Result<(), PipelineError> {
        let cond = self.encode_prompt(prompt)?;
        let [context] = self
            .sampler
            .pair([cond], || Ok([self.encode_prompt(&self.negative_prompt)?]))?;
        self.context = Some(context);
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
    fn sd15_vae_config_gives_scale_factor_8_and_its_scaling_factor() {
        let cfg = json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D",
                                 "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": 512,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D",
                               "UpDecoderBlock2D", "UpDecoderBlock2D"]
        });
        let spec = vae_config(&cfg).unwrap();
        assert_eq!(1usize << (spec.block_out_channels.len() - 1), 8);
        assert_eq!(spec.layers_per_block, 2);
        assert_eq!(spec.scaling_factor, 0.18215);
        assert_eq!(spec.shift_factor.unwrap_or(0.0), 0.0);
    }
}
