//! PixArt-Sigma (diffusers' `PixArtSigmaPipeline`): caption cleaning, the T5 encoder with its
//! attention mask over `max_sequence_length` tokens, the PixArt transformer with
//! classifier-free guidance and learned sigma, the scheduler of `scheduler/scheduler_config.json`
//! (DPMSolverMultistep for the Hub repo), the SDXL-family VAE, and diffusers' resolution
//! binning (the image is made at the closest aspect-ratio bin and resized back).

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::caption::preprocess_caption;
use super::common::{
    check_dtype_on_device, decode_rows, latent_noise_shape, sampler_stepwise, scheduler_from_file,
    vae_config, weights_error, Sampler,
};
use super::registry::{Cost, Defaults, Family, KnownRepo};
use super::{CallArgs, ImagePipeline, PipelineError};
use crate::media::MediaKind;
use crate::loading::{
    candle_dtype, mmap, model_config, parse_config, var_builder, Dtype, ModelSource,
};
use crate::models::pixart::{PixArtConfig, PixArtTransformer};
use crate::models::t5::{T5Config, T5Encoder, T5Tokenizer};
use crate::models::vae::VaeDecoder;
use crate::noise::Noise;

/// What the model folder should be, for weight errors.
const MODEL: &str = "a PixArt-Sigma model";

/// `PixArtSigmaPipeline` in the model table. PixArt-Sigma XL/2: 0.61 B parameters, 28 blocks
/// of width 1152; the image tokens attend to themselves and to the text.
pub const FAMILY: Family = Family {
    class_name: "PixArtSigmaPipeline",
    title: "PixArt-Sigma",
    output: MediaKind::Image,
    defaults: Defaults {
        size: 1024,
        steps: 20,
        guidance: 4.5,
    },
    patch: 1,
    unused_args: &[],
    repos: &[KnownRepo {
        id: "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        short_name: "pixart-sigma-1024-ms",
        steps: 20,
    }],
    id_hint: None,
    cost: Cost {
        cfg: true,
        flops: |h, w, text| {
            let tokens = (h / 16 * (w / 16)) as f64;
            super::estimate::transformer_flops(0.61e9, tokens, 28.0, 1152.0, tokens + text as f64)
        },
    },
    load: |r| {
        let mut pipeline = PixArtPipeline::load(&r.source, r.dtype, r.device, r.call_args)?;
        pipeline.set_low_vram(r.low_vram);
        Ok(Box::new(pipeline))
    },
};
/// diffusers' default `max_sequence_length` (T5 tokens).
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 300;

/// diffusers' `ASPECT_RATIO_1024_BIN`: aspect ratio (height / width) → (height, width).
pub const ASPECT_RATIO_1024_BIN: &[(&str, usize, usize)] = &[
    ("0.25", 512, 2048),
    ("0.28", 512, 1856),
    ("0.32", 576, 1792),
    ("0.33", 576, 1728),
    ("0.35", 576, 1664),
    ("0.4", 640, 1600),
    ("0.42", 640, 1536),
    ("0.48", 704, 1472),
    ("0.5", 704, 1408),
    ("0.52", 704, 1344),
    ("0.57", 768, 1344),
    ("0.6", 768, 1280),
    ("0.68", 832, 1216),
    ("0.72", 832, 1152),
    ("0.78", 896, 1152),
    ("0.82", 896, 1088),
    ("0.88", 960, 1088),
    ("0.94", 960, 1024),
    ("1.0", 1024, 1024),
    ("1.07", 1024, 960),
    ("1.13", 1088, 960),
    ("1.21", 1088, 896),
    ("1.29", 1152, 896),
    ("1.38", 1152, 832),
    ("1.46", 1216, 832),
    ("1.67", 1280, 768),
    ("1.75", 1344, 768),
    ("2.0", 1408, 704),
    ("2.09", 1472, 704),
    ("2.4", 1536, 640),
    ("2.5", 1600, 640),
    ("3.0", 1728, 576),
    ("4.0", 2048, 512),
];

/// diffusers' `classify_height_width_bin` over the 1024 bins scaled by `1024 / base` (the 512
/// and 256 bins are the 1024 bins halved and quartered): the bin whose ratio is closest to
/// `height / width` (the first on ties), as (height, width).
pub fn classify_height_width_bin(height: usize, width: usize, base: usize) -> (usize, usize) {
    let ar = height as f64 / width as f64;
    let mut best = ASPECT_RATIO_1024_BIN[0];
    let mut best_d = f64::INFINITY;
    for bin in ASPECT_RATIO_1024_BIN {
        let d = (bin.0.parse::<f64>().unwrap_or(f64::NAN) - ar).abs();
        if d < best_d {
            best_d = d;
            best = *bin;
        }
    }
    (best.1 * base / 1024, best.2 * base / 1024)
}

/// diffusers' `resize_and_crop_tensor` on images (B, C, H, W) in float32: bilinear resize
/// (`align_corners=False`, no antialiasing) so the image covers `new_height × new_width`, then a
/// center crop.
pub fn resize_and_crop(
    images: &Tensor,
    new_height: usize,
    new_width: usize,
) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    if h == new_height && w == new_width {
        return Ok(images.clone());
    }
    let ratio = (new_height as f64 / h as f64).max(new_width as f64 / w as f64);
    let (rh, rw) = ((h as f64 * ratio) as usize, (w as f64 * ratio) as usize);
    let src: Vec<f32> = images.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    // torch's area_pixel_compute_source_index in float32.
    let axis = |input: usize, output: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = input as f32 / output as f32;
        (0..output)
            .map(|o| {
                let s = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
                let i0 = s as usize;
                let step = usize::from(i0 < input - 1);
                let l1 = s - i0 as f32;
                (i0, i0 + step, 1.0 - l1, l1)
            })
            .collect()
    };
    let (ys, xs) = (axis(h, rh), axis(w, rw));
    let (top, left) = ((rh - new_height) / 2, (rw - new_width) / 2);
    let mut out = Vec::with_capacity(b * c * new_height * new_width);
    for plane in src.chunks(h * w) {
        for &(y0, y1, wy0, wy1) in &ys[top..top + new_height] {
            for &(x0, x1, wx0, wx1) in &xs[left..left + new_width] {
                let p = |y: usize, x: usize| plane[y * w + x];
                out.push(
                    wy0 * (wx0 * p(y0, x0) + wx1 * p(y0, x1))
                        + wy1 * (wx0 * p(y1, x0) + wx1 * p(y1, x1)),
                );
            }
        }
    }
    Tensor::from_vec(out, (b, c, new_height, new_width), images.device())
}

/// A loaded PixArt-Sigma pipeline.
pub struct PixArtPipeline {
    tokenizer: T5Tokenizer,
    /// `None` after a `--low-vram` pipeline has encoded its prompt; re-read for the next one.
    text_encoder: Option<T5Encoder>,
    /// What re-reading the text encoder needs: its weight files and config.
    text_encoder_files: (Vec<std::path::PathBuf>, T5Config),
    low_vram: bool,
    transformer: PixArtTransformer,
    vae: VaeDecoder,
    sampler: Sampler,
    dtype: DType,
    device: Device,
    scaling_factor: f64,
    latent_channels: usize,
    /// [`ImagePipeline::noise_shape`]: (1, latent channels, latent height, latent width).
    noise_shape: Vec<usize>,
    /// The requested size.
    height: usize,
    width: usize,
    negative_prompt: String,
    max_sequence_length: usize,
    clean_caption: bool,
    /// `(states, mask)`: `[uncond; cond]` under guidance, else `[cond]`.
    context: Option<(Tensor, Tensor)>,
}

impl PixArtPipeline {
    /// Loads tokenizer (`tokenizer/tokenizer.json` or `tokenizer/spiece.model`), T5 encoder, transformer, VAE and scheduler
    /// from `source` in `dtype` onto `device` and resolves the call arguments (resolution bin).
    pub fn load(
        source: &ModelSource,
        dtype: Dtype,
        device: &Device,
        args: &CallArgs,
    ) -> Result<Self, PipelineError> {
        check_dtype_on_device(dtype, device)?;
        let tokenizer = crate::loading::tokenizers::t5_tokenizer(source, "tokenizer")?;
        let t5_config: T5Config = parse_config(
            &source.read_json("text_encoder/config.json")?,
            "text_encoder/config.json",
        )?;
        let text_encoder = T5Encoder::new(
            var_builder(source, "text_encoder", dtype, candle_dtype(dtype), device)?,
            &t5_config,
        )
        .map_err(|e| weights_error(source, "text_encoder", MODEL, e))?;
        let text_encoder_files = (source.weights("text_encoder", dtype)?, t5_config.clone());
        let tr_config: PixArtConfig = model_config(
            &source.read_json("transformer/config.json")?,
            "transformer/config.json",
        )?;
        let transformer = PixArtTransformer::new(
            &tr_config,
            var_builder(source, "transformer", dtype, candle_dtype(dtype), device)?,
        )
        .map_err(|e| weights_error(source, "transformer", MODEL, e))?;
        let vae_cfg = vae_config(&source.read_json("vae/config.json")?)?;
        let scaling_factor = vae_cfg.scaling_factor;
        let vae_scale = vae_cfg.scale_factor();
        let latent_channels = vae_cfg.latent_channels;
        if latent_channels != tr_config.in_channels {
            return Err(PipelineError::ModelFile {
                path: "vae/config.json".into(),
                message: format!("latent_channels {latent_channels} differs from the transformer's in_channels {}", tr_config.in_channels),
            });
        }
        let vae = VaeDecoder::new(
            var_builder(source, "vae", dtype, candle_dtype(dtype), device)?,
            3,
            vae_cfg.decoder_config(),
        )
        .map_err(|e| weights_error(source, "vae", MODEL, e))?;
        let scheduler = scheduler_from_file(&source.file("scheduler/scheduler_config.json")?)?;

        let default = tr_config.sample_size * vae_scale;
        let height = args.height.unwrap_or(default);
        let width = args.width.unwrap_or(default);
        if height == 0 || width == 0 {
            return Err(PipelineError::InvalidArgument(
                "pipeline_call_args.height and width must be positive".into(),
            ));
        }
        let base = match tr_config.sample_size {
            128 => 1024,
            64 => 512,
            32 => 256,
            other => {
                return Err(PipelineError::Unsupported(format!(
                    "transformer/config.json: sample_size {other} has no aspect-ratio bins in this build (32, 64, 128 do)"
                )))
            }
        };
        let (bin_height, bin_width) = classify_height_width_bin(height, width, base);
        let num_inference_steps = args
            .num_inference_steps
            .unwrap_or(FAMILY.defaults.steps);
        scheduler(num_inference_steps)?;
        let guidance_scale = args.guidance_scale.unwrap_or(FAMILY.defaults.guidance);
        if !guidance_scale.is_finite() {
            return Err(PipelineError::InvalidArgument(format!(
                "pipeline_call_args.guidance_scale = {guidance_scale} must be a finite number"
            )));
        }
        let sampler = Sampler {
            scheduler,
            num_inference_steps,
            guidance_scale,
        };
        let max_sequence_length = args
            .max_sequence_length
            .unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH);
        if max_sequence_length == 0 {
            return Err(PipelineError::InvalidArgument(
                "pipeline_call_args.max_sequence_length must be at least 1".into(),
            ));
        }
        Ok(Self {
            tokenizer,
            text_encoder: Some(text_encoder),
            text_encoder_files,
            low_vram: false,
            transformer,
            vae,
            sampler,
            dtype: candle_dtype(dtype),
            device: device.clone(),
            scaling_factor,
            noise_shape: latent_noise_shape(latent_channels, bin_height, bin_width, 8),
            latent_channels,
            height,
            width,
            negative_prompt: args.negative_prompt.clone().unwrap_or_default(),
            max_sequence_length,
            clean_caption: args.clean_caption.unwrap_or(true),
            context: None,
        })
    }

    /// The T5 tokenizer.
    pub fn tokenizer(&self) -> &T5Tokenizer {
        &self.tokenizer
    }

    /// With `on`, the T5 text encoder is freed after each prompt is encoded and read again for
    /// the next prompt (`--low-vram`).
    pub fn set_low_vram(&mut self, on: bool) {
        self.low_vram = on;
    }

    /// T5 states (1, max_sequence_length, d_model) and mask (1, max_sequence_length) of `text`
    /// after diffusers' caption preprocessing.
    pub fn encode_prompt(&self, text: &str) -> Result<(Tensor, Tensor), PipelineError> {
        let text = preprocess_caption(text, self.clean_caption);
        let (ids, mask) = self.tokenizer.encode(&text, self.max_sequence_length)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let mask = Tensor::new(mask.as_slice(), &self.device)?.unsqueeze(0)?;
        let encoder = self.text_encoder.as_ref().ok_or_else(|| {
            PipelineError::InvalidArgument(
                "the T5 text encoder was freed (--low-vram); set_prompt re-reads it".into(),
            )
        })?;
        let states = encoder.forward(&ids, &mask)?;
        Ok((states, mask))
    }

    /// Whether classifier-free guidance is on (`guidance_scale > 1`).
    pub fn uses_guidance(&self) -> bool {
        self.sampler.uses_guidance()
    }

    /// The transformer call for a batch of `b` images with the prompt of
    /// [`ImagePipeline::set_prompt`]; a learned-sigma output keeps its noise half (the
    /// guidance that follows is elementwise, so taking the half first gives the same values).
    fn forward_fn(
        &self,
        b: usize,
    ) -> Result<impl Fn(&Tensor, f64) -> Result<Tensor, PipelineError> + '_, PipelineError> {
        let (states, mask) = self.context.as_ref().ok_or_else(|| {
            PipelineError::InvalidArgument("set_prompt must be called before generate".into())
        })?;
        let context = self.sampler.batch_rows(states, b)?;
        let mask = self.sampler.batch_rows(mask, b)?;
        let learned_sigma = self.transformer.config().out_channels / 2 == self.latent_channels;
        Ok(move |input: &Tensor, t: f64| {
            let ts = vec![t; input.dim(0)?];
            let pred = self
                .transformer
                .forward(input, &ts, &context, Some(&mask))?;
            Ok(if learned_sigma {
                pred.narrow(1, 0, self.latent_channels)?
            } else {
                pred
            })
        })
    }

    /// Denoises initial latents (B, C, h, w) with the prompt of [`ImagePipeline::set_prompt`].
    pub fn denoise(&self, latents: &Tensor) -> Result<Tensor, PipelineError> {
        self.sampler
            .denoise(latents, self.forward_fn(latents.dim(0)?)?)
    }

    /// VAE decode of latents (B, C, h, w) → images in about [-1, 1], resized back to the
    /// requested size when binning changed it.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, PipelineError> {
        let z = (latents.to_dtype(self.dtype)? / self.scaling_factor)?;
        let images = decode_rows(&z, |row| self.vae.decode(row))?.to_dtype(DType::F32)?;
        Ok(resize_and_crop(&images, self.height, self.width)?)
    }
}

impl ImagePipeline for PixArtPipeline {
    fn evaluations_per_image(&self) -> Option<usize> {
        self.sampler.evaluations()
    }

    fn noise_shape(&self) -> Vec<usize> {
        self.noise_shape.clone()
    }

    fn set_prompt(&mut self, prompt: &str) -> Result<(), PipelineError> {
        if self.text_encoder.is_none() {
            let (files, config) = &self.text_encoder_files;
            let vb = mmap(files, self.dtype, &self.device)?;
            self.text_encoder = Some(T5Encoder::new(vb, config).map_err(|e| {
                PipelineError::ModelFile {
                    path: files
                        .first()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    message: format!("cannot re-read the T5 text encoder: {e}"),
                }
            })?);
        }
        let (cond, cond_mask) = self.encode_prompt(prompt)?;
        let [states, mask] = self.sampler.pair([cond, cond_mask], || {
            let (uncond, uncond_mask) = self.encode_prompt(&self.negative_prompt)?;
            Ok([uncond, uncond_mask])
        })?;
        self.context = Some((states, mask));
        if self.low_vram {
            // T5-XXL is ~9 GB in fp16: free it before the transformer runs.
            self.text_encoder = None;
            tracing::debug!("--low-vram: T5 text encoder freed after encoding the prompt");
        }
        Ok(())
    }

    fn generate(&mut self, noises: &[Noise]) -> Result<Vec<RgbImage>, PipelineError> {
        let run = |l: &Tensor| self.decode(&self.denoise(l)?);
        self.sampler
            .generate(noises, &self.noise_shape, self.dtype, &self.device, run)
    }

    sampler_stepwise!(decode);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_requests_bin_to_the_square_bin() {
        assert_eq!(classify_height_width_bin(1024, 1024, 1024), (1024, 1024));
        assert_eq!(classify_height_width_bin(256, 256, 256), (256, 256));
    }

    #[test]
    fn wide_requests_bin_to_the_closest_ratio() {
        // 200/256 = 0.78125 → the "0.78" bin, (896, 1152) at 1024, quartered at 256.
        assert_eq!(classify_height_width_bin(200, 256, 256), (224, 288));
        assert_eq!(classify_height_width_bin(720, 1280, 1024), (768, 1344));
    }

    #[test]
    fn resize_and_crop_keeps_a_constant_image_constant() {
        let t = Tensor::full(0.25f32, (1, 3, 4, 6), &Device::Cpu).unwrap();
        let r = resize_and_crop(&t, 5, 5).unwrap();
        assert_eq!(r.dims(), &[1, 3, 5, 5]);
        let v: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| (x - 0.25).abs() < 1e-6));
    }
}
