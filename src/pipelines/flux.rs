//! Flux.1-dev / Flux.1-schnell (diffusers' `FluxPipeline`): CLIP-L pooled and T5 text
//! embeddings, the rectified-flow transformer ([`crate::models::flux_transformer`]) with the
//! guidance embedding, `FlowMatchEulerDiscreteScheduler` with the resolution-dependent shift,
//! 2×2 latent packing, and the 16-channel VAE decode with `scaling_factor` and `shift_factor`.
//!
//! Weights load from diffusers layout (`transformer/` shards, `vae/`, `text_encoder/`,
//! `text_encoder_2/`, `tokenizer/`, `tokenizer_2/` with `tokenizer.json` or `spiece.model`) or, where the diffusers
//! transformer/VAE weights are absent, from Black Forest Labs' single files
//! (`flux1-dev.safetensors` / `flux1-schnell.safetensors`, `ae.safetensors`) at the root.
//! Tensors are memory-mapped and converted to the configured dtype one at a time (no full
//! float32 staging copy).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::Module;
use candle_transformers::models::flux::autoencoder as bfl_vae;
use candle_transformers::models::t5;
use image::RgbImage;

use super::common::{clip_text_config, noise_batch, to_images, vae_config, Sampler, SchedulerFactory};
use crate::loading::tokenizers::{clip_tokenizer, optional_file, t5_tokenizer};
use super::registry::{Cost, Defaults, Family, KnownRepo};
use super::{CallArgs, ImagePipeline, PipelineError, Span, StepSchedule};
use crate::media::MediaKind;
use crate::loading::{candle_dtype, mmap, model_config, parse_config, Dtype, ModelSource};
use crate::models::clip_text::ClipTextModel;
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::flux_transformer::{
    latent_image_ids, DiffusersFluxWeights, FluxConfig, FluxTransformer, Modulations, Rope,
};
use crate::models::t5::T5Tokenizer;
use crate::models::vae::{VaeConfig, VaeDecoder};
use crate::noise::Noise;
use crate::schedulers::{FlowMatchConfig, Scheduler};

/// Turns a construction error of a Flux component into a message naming its weights.
fn weights_error(source: &ModelSource, what: &str, e: impl std::fmt::Display) -> PipelineError {
    PipelineError::ModelFile {
        path: format!("{}/{what}", source.display_name()),
        message: format!("the weights do not match the Flux architecture: {e}"),
    }
}

/// `FluxPipeline` in the model table. FLUX.1: 11.9 B parameters, 19 + 38 blocks of width 3072
/// over image and text tokens; guidance is an embedding (one evaluation a step). diffusers'
/// defaults are FLUX.1-dev's; schnell (no guidance embedding) takes 4 steps.
pub const FAMILY: Family = Family {
    class_name: "FluxPipeline",
    title: "Flux",
    output: MediaKind::Image,
    defaults: Defaults {
        size: 1024,
        steps: 28,
        guidance: 3.5,
    },
    patch: 2,
    unused_args: &["clean_caption"],
    repos: &[
        KnownRepo {
            id: "black-forest-labs/FLUX.1-dev",
            short_name: "flux.1-dev",
            steps: 28,
        },
        KnownRepo {
            id: "black-forest-labs/FLUX.1-schnell",
            short_name: "flux.1-schnell",
            steps: SCHNELL_STEPS,
        },
    ],
    id_hint: Some("flux"),
    cost: Cost {
        cfg: false,
        flops: |h, w, text| {
            let tokens = (h / 16 * (w / 16) + text) as f64;
            super::estimate::transformer_flops(11.9e9, tokens, 57.0, 3072.0, tokens)
        },
    },
    load: |r| {
        Ok(Box::new(FluxPipeline::load(
            r.source,
            r.dtype,
            r.device,
            r.call_args,
            r.low_vram,
        )?))
    },
};

/// FLUX.1-schnell's default `num_inference_steps`.
const SCHNELL_STEPS: usize = 4;

/// `x` rounded to `dtype` and back to f32 (emulates a torch cast).
fn round_to(x: f32, dtype: DType) -> Result<f32, PipelineError> {
    if dtype == DType::F32 {
        return Ok(x);
    }
    let t = Tensor::new(&[x], &Device::Cpu)?
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?;
    Ok(t.to_vec1::<f32>()?[0])
}

/// The value FluxPipeline's transformer embeds for scheduler timestep `t`: `t` cast to the
/// model dtype, divided by 1000 (pipeline), cast, times 1000 (transformer), cast.
pub fn model_timestep(t: f32, dtype: DType) -> Result<f32, PipelineError> {
    let r = round_to(t, dtype)?;
    let r = round_to(r / 1000.0, dtype)?;
    round_to(r * 1000.0, dtype)
}

/// Packs latents (B, C, h, w) into 2×2 patches (B, h/2 · w/2, 4C), as `_pack_latents`.
pub fn pack_latents(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape(vec![b, c, h / 2, 2, w / 2, 2])?
        .permute(vec![0, 2, 4, 1, 3, 5])?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// The inverse of [`pack_latents`]: (B, h/2 · w/2, 4C) → (B, C, h, w).
pub fn unpack_latents(x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, _l, c4) = x.dims3()?;
    let c = c4 / 4;
    x.reshape(vec![b, h / 2, w / 2, c, 2, 2])?
        .permute(vec![0, 3, 1, 4, 2, 5])?
        .reshape((b, c, h, w))
}

/// The VAE decoder in either naming.
enum Vae {
    /// diffusers `vae/` (`AutoencoderKL`).
    Diffusers(Box<VaeDecoder>),
    /// Black Forest Labs `ae.safetensors` (decoder half).
    Bfl(Box<bfl_vae::Decoder>),
}

/// The CLIP and T5 text encoders with their tokenizers.
struct TextEncoders {
    clip: ClipTextModel,
    t5: t5::T5EncoderModel,
}

/// Peak memory a component needs at the configured size and dtype, in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct ComponentMemory {
    /// Component name (`text_encoder`, `text_encoder_2`, `transformer`, `vae`).
    pub component: &'static str,
    /// Weight bytes.
    pub weights: u64,
    /// Largest transient activation bytes during its forward.
    pub activations: u64,
}

/// Estimates the peak memory of each component for `batch` images of `height`×`width` with
/// `max_sequence_length` T5 tokens, from the architecture and `dtype` alone. `t5_params` and
/// `clip_params` are the text encoders' parameter counts (FLUX.1: 4.76e9 and 1.23e8).
#[allow(clippy::too_many_arguments)]
pub fn memory_estimate(
    config: &FluxConfig,
    height: usize,
    width: usize,
    batch: usize,
    max_sequence_length: usize,
    dtype: DType,
    t5_params: u64,
    clip_params: u64,
    vae_decoder_params: u64,
) -> Vec<ComponentMemory> {
    let e = dtype.size_in_bytes() as u64;
    let b = batch as u64;
    let l = ((height / 16) * (width / 16)) as u64 + max_sequence_length as u64;
    let h = config.hidden_size as u64;
    let m = config.mlp_size() as u64;
    let heads = config.num_heads as u64;
    // One row's attention scores (+ softmax output) and the single block's linear1 output for
    // the batch, plus a few (B, L, hidden) residual streams.
    let transformer_act = 2 * heads * l * l * e + b * l * (3 * h + m) * e + 6 * b * l * h * e;
    let t5_act = 64 * max_sequence_length as u64 * max_sequence_length as u64 * e
        + 3 * max_sequence_length as u64 * 10240 * e;
    // VAE decoder: the widest full-resolution feature maps (128 ch × 3 live), and the mid
    // attention over (H/8·W/8)² scores (decoded one image at a time).
    let px = (height * width) as u64;
    let vae_act = 3 * 256 * px * e + (px / 64) * (px / 64) * e;
    vec![
        ComponentMemory {
            component: "text_encoder",
            weights: clip_params * e,
            activations: 12 * 77 * 77 * e + 77 * 3072 * e,
        },
        ComponentMemory {
            component: "text_encoder_2",
            weights: t5_params * e,
            activations: t5_act,
        },
        ComponentMemory {
            component: "transformer",
            weights: config.parameter_count() as u64 * e,
            activations: transformer_act,
        },
        ComponentMemory {
            component: "vae",
            weights: vae_decoder_params * e,
            activations: vae_act,
        },
    ]
}

/// A loaded Flux pipeline.
pub struct FluxPipeline {
    source: ModelSource,
    model_dtype: Dtype,
    clip_tokenizer: ClipTokenizer,
    clip_eos: u32,
    t5_tokenizer: T5Tokenizer,
    encoders: Option<TextEncoders>,
    low_vram: bool,
    transformer: FluxTransformer,
    vae: Vae,
    vae_dtype: DType,
    /// The denoise loop: flow-match Euler steps on the schedule of this image size, no
    /// classifier-free guidance (Flux's guidance is an embedding, `guidance_scale`).
    sampler: Sampler,
    dtype: DType,
    device: Device,
    vae_scale_factor: usize,
    latent_channels: usize,
    scaling_factor: f64,
    shift_factor: f64,
    height: usize,
    width: usize,
    guidance_scale: f64,
    max_sequence_length: usize,
    /// (T5 states (1, T, D), CLIP pooled (1, Dv)) of the current prompt.
    prompt: Option<(Tensor, Tensor)>,
    /// The current prompt's modulations per denoising step (keyed by the timestep's and the
    /// guidance's bits), computed for one row on first use and shared by every image of the
    /// prompt; emptied by `set_prompt`.
    modulations: std::sync::Mutex<HashMap<(u32, u32), Arc<Modulations>>>,
}

impl FluxPipeline {
    /// Loads every component from `source` in `dtype` onto `device`. With `low_vram`, the text
    /// encoders are loaded for each prompt, run, and freed before denoising.
    pub fn load(
        source: ModelSource,
        dtype: Dtype,
        device: &Device,
        call_args: &CallArgs,
        low_vram: bool,
    ) -> Result<Self, PipelineError> {
        let cdt = candle_dtype(dtype);
        let clip_tokenizer = clip_tokenizer(&source, "tokenizer")?;
        let clip_eos = clip_text_config(&source, "text_encoder")?
            .eos_token_id
            .unwrap_or(2);
        let t5_tokenizer = t5_tokenizer(&source, "tokenizer_2")?;

        // Transformer: diffusers shards if present, else the BFL single file.
        let tr_json = optional_file(&source, "transformer/config.json")?;
        let diffusers_tr = source.has_file("transformer/diffusion_pytorch_model.safetensors")?
            || source.has_file("transformer/diffusion_pytorch_model.safetensors.index.json")?;
        let transformer = if diffusers_tr {
            let cfg: FluxConfig = model_config(
                &source.read_json("transformer/config.json")?,
                "transformer/config.json",
            )?;
            let inner = mmap(&source.weights("transformer", dtype)?, cdt, device)?;
            let vb = DiffusersFluxWeights::var_builder(inner, cdt, device);
            FluxTransformer::new(&cfg, vb).map_err(|e| weights_error(&source, "transformer", e))?
        } else {
            let file = ["flux1-dev.safetensors", "flux1-schnell.safetensors"]
                .into_iter()
                .map(|f| source.has_file(f).map(|has| has.then_some(f)))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .flatten()
                .next()
                .ok_or_else(|| PipelineError::ModelFile {
                    path: source.display_name(),
                    message: "no Flux transformer weights: expected transformer/ (diffusers) or \
                              flux1-dev.safetensors / flux1-schnell.safetensors at the root"
                        .into(),
                })?;
            let path = source.file(file)?;
            let vb = mmap(std::slice::from_ref(&path), cdt, device)?;
            let mut cfg = match &tr_json {
                Some(p) => model_config(
                    &source.read_json("transformer/config.json")?,
                    &p.display().to_string(),
                )?,
                None => FluxConfig::dev(),
            };
            cfg.guidance_embed = vb.contains_tensor("guidance_in.in_layer.weight");
            FluxTransformer::new(&cfg, vb).map_err(|e| weights_error(&source, file, e))?
        };
        let tc = transformer.config().clone();

        // VAE: diffusers vae/ if it has weights, else ae.safetensors. candle has no bf16
        // convolution on the CPU, so a bf16 model decodes in float32 there.
        let vae_dtype = if cdt == DType::BF16 && device.is_cpu() {
            DType::F32
        } else {
            cdt
        };
        let vae_spec = match optional_file(&source, "vae/config.json")? {
            Some(_) => vae_config(&source.read_json("vae/config.json")?)?,
            None => VaeConfig::flux(),
        };
        let diffusers_vae = source.has_file("vae/diffusion_pytorch_model.safetensors")?;
        let vae = if diffusers_vae {
            let vb = mmap(&source.weights("vae", dtype)?, vae_dtype, device)?;
            let cfg = vae_spec.decoder_config();
            Vae::Diffusers(Box::new(
                VaeDecoder::new(vb, 3, cfg).map_err(|e| weights_error(&source, "vae", e))?,
            ))
        } else {
            let path = source
                .file("ae.safetensors")
                .map_err(|_| PipelineError::ModelFile {
                    path: source.display_name(),
                    message: "no VAE weights: expected vae/diffusion_pytorch_model.safetensors or \
                          ae.safetensors"
                        .into(),
                })?;
            let ch = vae_spec.block_out_channels[0];
            let cfg = bfl_vae::Config {
                resolution: 256,
                in_channels: 3,
                ch,
                out_ch: 3,
                ch_mult: vae_spec
                    .block_out_channels
                    .iter()
                    .map(|c| c / ch.max(1))
                    .collect(),
                num_res_blocks: vae_spec.layers_per_block,
                z_channels: vae_spec.latent_channels,
                scale_factor: vae_spec.scaling_factor,
                shift_factor: vae_spec.shift_factor.unwrap_or(0.0),
            };
            let vb = mmap(std::slice::from_ref(&path), vae_dtype, device)?;
            Vae::Bfl(Box::new(
                bfl_vae::Decoder::new(&cfg, vb.pp("decoder"))
                    .map_err(|e| weights_error(&source, "ae.safetensors", e))?,
            ))
        };
        let vae_scale_factor = vae_spec.scale_factor();
        if vae_spec.latent_channels * 4 != tc.in_channels {
            return Err(PipelineError::ModelFile {
                path: "vae/config.json".into(),
                message: format!(
                    "latent_channels {} × 4 differs from the transformer's in_channels {}",
                    vae_spec.latent_channels, tc.in_channels
                ),
            });
        }

        let scheduler =
            FlowMatchConfig::from_file(&source.file("scheduler/scheduler_config.json")?)?;
        let schnell = !tc.guidance_embed;
        let multiple = vae_scale_factor * 2;
        let default_size = 128 * vae_scale_factor;
        let height = call_args.height.unwrap_or(default_size);
        let width = call_args.width.unwrap_or(default_size);
        for (name, v) in [("height", height), ("width", width)] {
            if v == 0 || v % multiple != 0 {
                return Err(PipelineError::InvalidArgument(format!(
                    "pipeline_call_args.{name} = {v} must be a positive multiple of {multiple} for \
                     Flux (2 × the VAE scale factor)"
                )));
            }
        }
        let num_inference_steps = call_args.num_inference_steps.unwrap_or(if schnell {
            SCHNELL_STEPS
        } else {
            FAMILY.defaults.steps
        });
        let guidance_scale = call_args.guidance_scale.unwrap_or(FAMILY.defaults.guidance);
        if !guidance_scale.is_finite() {
            return Err(PipelineError::InvalidArgument(format!(
                "pipeline_call_args.guidance_scale = {guidance_scale} must be a finite number"
            )));
        }
        let max_sequence_length =
            call_args
                .max_sequence_length
                .unwrap_or(if schnell { 256 } else { 512 });
        if max_sequence_length == 0 || max_sequence_length > 512 {
            return Err(PipelineError::InvalidArgument(format!(
                "pipeline_call_args.max_sequence_length = {max_sequence_length} must be between 1 \
                 and 512"
            )));
        }
        // The schedule's time shift depends on the packed image's token count.
        let image_seq_len = (height / multiple) * (width / multiple);
        let factory: SchedulerFactory = Box::new(move |steps| {
            Ok(Box::new(scheduler.build(steps, image_seq_len)?) as Box<dyn Scheduler>)
        });
        factory(num_inference_steps)?;
        let sampler = Sampler {
            scheduler: factory,
            num_inference_steps,
            guidance_scale: 1.0,
        };

        let mut pipeline = Self {
            source,
            model_dtype: dtype,
            clip_tokenizer,
            clip_eos,
            t5_tokenizer,
            encoders: None,
            low_vram,
            transformer,
            vae,
            vae_dtype,
            sampler,
            dtype: cdt,
            device: device.clone(),
            vae_scale_factor,
            latent_channels: vae_spec.latent_channels,
            scaling_factor: vae_spec.scaling_factor,
            shift_factor: vae_spec.shift_factor.unwrap_or(0.0),
            height,
            width,
            guidance_scale,
            max_sequence_length,
            prompt: None,
            modulations: Default::default(),
        };
        if !low_vram {
            pipeline.encoders = Some(pipeline.load_encoders()?);
        }
        pipeline.log_memory();
        Ok(pipeline)
    }

    fn load_encoders(&self) -> Result<TextEncoders, PipelineError> {
        let source = &self.source;
        let clip_cfg = clip_text_config(source, "text_encoder")?;
        let vb = mmap(
            &source.weights("text_encoder", self.model_dtype)?,
            self.dtype,
            &self.device,
        )?;
        let clip = ClipTextModel::new(vb, &clip_cfg)
            .map_err(|e| weights_error(source, "text_encoder", e))?;
        let t5_cfg: t5::Config = parse_config(
            &source.read_json("text_encoder_2/config.json")?,
            "text_encoder_2/config.json",
        )?;
        let vb = mmap(
            &source.weights("text_encoder_2", self.model_dtype)?,
            self.dtype,
            &self.device,
        )?;
        let t5 = t5::T5EncoderModel::load(vb, &t5_cfg)
            .map_err(|e| weights_error(source, "text_encoder_2", e))?;
        Ok(TextEncoders { clip, t5 })
    }

    fn log_memory(&self) {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let c = self.transformer.config();
        let real = c.hidden_size == 3072;
        let est = memory_estimate(
            c,
            self.height,
            self.width,
            1,
            self.max_sequence_length,
            self.dtype,
            if real { 4_762_310_656 } else { 0 },
            if real { 123_060_480 } else { 0 },
            if real { 49_490_199 } else { 0 },
        );
        for m in est {
            tracing::debug!(
                "flux {}: weights {:.2} GiB + activations {:.2} GiB per image at {}x{} ({:?})",
                m.component,
                gib(m.weights),
                gib(m.activations),
                self.height,
                self.width,
                self.dtype
            );
        }
    }

    /// CLIP ids of `prompt` (padded/truncated to 77).
    pub fn clip_ids(&self, prompt: &str) -> Result<Vec<u32>, PipelineError> {
        self.clip_tokenizer.encode(prompt)
    }

    /// T5 ids of `prompt`, truncated (keeping `</s>`) and padded to `max_len` as diffusers'
    /// `tokenizer_2(padding="max_length", truncation=True)`.
    pub fn t5_ids(&self, prompt: &str, max_len: usize) -> Result<Vec<u32>, PipelineError> {
        Ok(self.t5_tokenizer.encode(prompt, max_len)?.0)
    }

    /// CLIP pooled output (1, hidden) of `prompt`: the final-norm state at the end token.
    pub fn clip_pooled(&mut self, prompt: &str) -> Result<Tensor, PipelineError> {
        let ids = self.clip_ids(prompt)?;
        let pos = if self.clip_eos == 2 {
            ids.iter()
                .enumerate()
                .max_by_key(|(i, v)| (**v, std::cmp::Reverse(*i)))
                .map_or(0, |(i, _)| i)
        } else {
            ids.iter()
                .position(|&v| v == self.clip_eos)
                .unwrap_or(ids.len() - 1)
        };
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let enc = self.encoders_mut()?;
        let states = enc.clip.forward(&ids)?;
        Ok(states.narrow(1, pos, 1)?.squeeze(1)?)
    }

    /// T5 hidden states (1, max_len, d_model) of `prompt`.
    pub fn t5_states(&mut self, prompt: &str, max_len: usize) -> Result<Tensor, PipelineError> {
        let ids = self.t5_ids(prompt, max_len)?;
        let dev = self.device.clone();
        let enc = self.encoders_mut()?;
        Ok(enc
            .t5
            .forward(&Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?)?)
    }

    fn encoders_mut(&mut self) -> Result<&mut TextEncoders, PipelineError> {
        if self.encoders.is_none() {
            self.encoders = Some(self.load_encoders()?);
        }
        self.encoders
            .as_mut()
            .ok_or_else(|| PipelineError::InvalidArgument("text encoders are not loaded".into()))
    }

    /// One transformer forward as diffusers' `FluxTransformer2DModel.forward`: packed latents
    /// (B, L, 64) on a `rows`×`cols` packed grid, T5 states (B, T, D), pooled (B, Dv),
    /// `timestep` (B values, diffusers' `timestep` argument, i.e. t/1000) and `guidance`.
    #[allow(clippy::too_many_arguments)]
    pub fn transformer_forward(
        &self,
        latents: &Tensor,
        rows: usize,
        cols: usize,
        txt: &Tensor,
        pooled: &Tensor,
        timestep: &[f32],
        guidance: Option<&[f32]>,
    ) -> Result<Tensor, PipelineError> {
        let t: Vec<f32> = timestep
            .iter()
            .map(|&t| round_to(round_to(t, self.dtype)? * 1000.0, self.dtype))
            .collect::<Result<_, _>>()?;
        let g: Option<Vec<f32>> = guidance
            .map(|g| {
                g.iter()
                    .map(|&g| round_to(round_to(g, self.dtype)? * 1000.0, self.dtype))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let vec = self.transformer.conditioning(&t, g.as_deref(), pooled)?;
        let rope = self.rope(txt.dim(1)?, rows, cols)?;
        Ok(self.transformer.forward(latents, txt, &vec, &rope)?)
    }

    fn rope(&self, txt_len: usize, rows: usize, cols: usize) -> Result<Rope, PipelineError> {
        let mut ids = vec![[0f32; 3]; txt_len];
        ids.extend(latent_image_ids(rows, cols));
        let c = self.transformer.config();
        Ok(Rope::new(&ids, &c.axes_dim, c.theta, &self.device)?)
    }

    /// VAE decode of unpacked latents (B, 16, h, w): `decode(z / scaling_factor + shift_factor)`,
    /// images in about [-1, 1] (B, 3, H, W), one row at a time.
    pub fn vae_decode(&self, latents: &Tensor) -> Result<Tensor, PipelineError> {
        let z = ((latents.to_dtype(self.dtype)? / self.scaling_factor)? + self.shift_factor)?
            .to_dtype(self.vae_dtype)?;
        let rows = (0..z.dim(0)?)
            .map(|i| {
                let zi = z.narrow(0, i, 1)?;
                match &self.vae {
                    Vae::Diffusers(v) => v.decode(&zi),
                    Vae::Bfl(d) => d.forward(&zi),
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Denoises packed latents with the prompt set by [`ImagePipeline::set_prompt`]; returns the
    /// final unpacked latents (B, 16, h, w).
    pub fn denoise(&self, packed: &Tensor) -> Result<Tensor, PipelineError> {
        let (h, w) = self.latent_hw();
        let forward = self.forward_fn(packed.dim(0)?)?;
        Ok(unpack_latents(&self.sampler.denoise(packed, forward)?, h, w)?)
    }

    /// The transformer call for a batch of `b` packed latents (B, L, 64) at scheduler timestep
    /// `t`, with the prompt of [`ImagePipeline::set_prompt`]: the step's modulations (cached per
    /// prompt and step) and the velocity prediction.
    fn forward_fn(
        &self,
        b: usize,
    ) -> Result<impl Fn(&Tensor, f64) -> Result<Tensor, PipelineError> + '_, PipelineError> {
        let (txt, pooled) = self.prompt.as_ref().ok_or_else(|| {
            PipelineError::InvalidArgument("set_prompt must be called before generate".into())
        })?;
        let (h, w) = self.latent_hw();
        let txt = txt.repeat((b, 1, 1))?;
        let rope = self.rope(txt.dim(1)?, h / 2, w / 2)?;
        let g = round_to(
            round_to(self.guidance_scale as f32, self.dtype)? * 1000.0,
            self.dtype,
        )?;
        Ok(move |latents: &Tensor, t: f64| {
            // The scheduler's timesteps are float32 values.
            let mods = self.step_modulations(model_timestep(t as f32, self.dtype)?, g, pooled)?;
            Ok(self
                .transformer
                .forward_modulated(latents, &txt, &mods, &rope)?)
        })
    }

    /// The modulations of the step at model timestep `t` with guidance value `g` for the
    /// prompt's pooled embedding `pooled` (1, Dv): from the cache, or computed for one row
    /// and kept. Every row of a batch has the same conditioning, so one row serves all.
    fn step_modulations(
        &self,
        t: f32,
        g: f32,
        pooled: &Tensor,
    ) -> Result<Arc<Modulations>, PipelineError> {
        let key = (t.to_bits(), g.to_bits());
        let cache = || self.modulations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cache().get(&key) {
            return Ok(m.clone());
        }
        let guidance = [g];
        let guidance = self.transformer.has_guidance().then_some(&guidance[..]);
        let vec = self.transformer.conditioning(&[t], guidance, pooled)?;
        let mods = Arc::new(self.transformer.modulations(&vec)?);
        cache().insert(key, mods.clone());
        Ok(mods)
    }

    /// How many steps' modulations the current prompt has cached (see `step_modulations`).
    pub fn cached_modulations(&self) -> usize {
        self.modulations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Unpacked latent height and width, `2 · (H / (2 · vae_scale_factor))`.
    pub fn latent_hw(&self) -> (usize, usize) {
        let m = self.vae_scale_factor * 2;
        (2 * (self.height / m), 2 * (self.width / m))
    }

    /// Whether the transformer embeds the guidance scale (dev yes, schnell no).
    pub fn has_guidance(&self) -> bool {
        self.transformer.has_guidance()
    }
}

impl ImagePipeline for FluxPipeline {
    fn evaluations_per_image(&self) -> Option<usize> {
        // Guidance is distilled into the model (its guidance embedding): one pass a step.
        self.sampler.evaluations()
    }

    fn noise_shape(&self) -> Vec<usize> {
        let (h, w) = self.latent_hw();
        vec![1, self.latent_channels, h, w]
    }

    fn set_prompt(&mut self, prompt: &str) -> Result<(), PipelineError> {
        let pooled = self.clip_pooled(prompt)?;
        let txt = self.t5_states(prompt, self.max_sequence_length)?;
        if self.low_vram {
            // Free the encoders (T5-XXL is ~9.5 GB in bf16) before the transformer runs; they
            // are memory-mapped again for the next prompt.
            self.encoders = None;
            tracing::debug!("--low-vram: text encoders freed after encoding the prompt");
        }
        self.prompt = Some((txt.to_dtype(self.dtype)?, pooled.to_dtype(self.dtype)?));
        self.modulations
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(())
    }

    fn generate(&mut self, noises: &[Noise]) -> Result<Vec<RgbImage>, PipelineError> {
        if noises.is_empty() {
            return Ok(Vec::new());
        }
        let latents = self.denoise(&self.noise_latents(noises)?)?;
        to_images(&self.vae_decode(&latents)?)
    }

    fn schedule(&self) -> Result<StepSchedule, PipelineError> {
        self.sampler.schedule()
    }

    /// Packed (B, L, 64), in the model dtype.
    fn noise_latents(&self, noises: &[Noise]) -> Result<Tensor, PipelineError> {
        let batch = noise_batch(noises, &self.noise_shape(), &self.device)?;
        Ok(pack_latents(&batch.to_dtype(self.dtype)?)?)
    }

    fn denoise_span(
        &self,
        latents: &Tensor,
        from: usize,
        to: usize,
    ) -> Result<Span, PipelineError> {
        let forward = self.forward_fn(latents.dim(0)?)?;
        self.sampler.span(latents, (from, to), forward)
    }

    fn predict_x0(&self, latents: &Tensor, level: usize) -> Result<Tensor, PipelineError> {
        let forward = self.forward_fn(latents.dim(0)?)?;
        self.sampler.predict_x0(latents, level, forward)
    }

    fn decode_latents(&self, latents: &Tensor) -> Result<Vec<RgbImage>, PipelineError> {
        let (h, w) = self.latent_hw();
        to_images(&self.vae_decode(&unpack_latents(latents, h, w)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_then_unpack_is_the_identity_and_groups_2x2_patches() {
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4, 6))
            .unwrap();
        let p = pack_latents(&x).unwrap();
        assert_eq!(p.dims(), &[2, 6, 12]);
        // First token, first four values: channel 0's top-left 2×2 patch.
        let first: Vec<f32> = p.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert_eq!(&first[..4], &[0.0, 1.0, 6.0, 7.0]);
        let u = unpack_latents(&p, 4, 6).unwrap();
        let d = (u - &x)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }

    #[test]
    fn bf16_timesteps_are_rounded_as_diffusers_casts_them() {
        assert_eq!(model_timestep(1000.0, DType::F32).unwrap(), 1000.0);
        // 937.5 → bf16 936, /1000 → 0.93603516 (bf16), ×1000 → 936.
        assert_eq!(model_timestep(937.5, DType::BF16).unwrap(), 936.0);
    }

    #[test]
    fn memory_estimate_of_dev_at_1024_puts_the_transformer_near_24_gib() {
        let m = memory_estimate(
            &FluxConfig::dev(),
            1024,
            1024,
            1,
            512,
            DType::BF16,
            4_762_310_656,
            123_060_480,
            49_490_199,
        );
        let tr = m.iter().find(|c| c.component == "transformer").unwrap();
        let gib = tr.weights as f64 / (1u64 << 30) as f64;
        assert!((22.0..23.0).contains(&gib), "{gib}");
    }
}
