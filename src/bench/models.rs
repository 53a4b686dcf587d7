//! Step benchmarks of the denoisers' and the VAE's real-size architectures, built from
//! [`RandomWeights`]: one guided UNet or transformer step, one VAE decode.

use candle_core::{DType, Tensor};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;

use super::{time_steps, BenchOptions, BenchReport, RandomWeights};
use crate::loading::model_config;
use crate::models::flux_transformer::{latent_image_ids, FluxConfig, FluxTransformer, Rope};
use crate::models::pixart::{PixArtConfig, PixArtTransformer};
use crate::models::unet::{UNet, UNetConfig};
use crate::models::vae::VaeDecoder;
use crate::pipelines::{flux, pixart, sd15, sdxl, Family, PipelineError};

/// Rows of one step of `family` for `opts.batch` images: twice under classifier-free guidance
/// (the model table's cost model says which families use it).
fn step_rows(family: &Family, opts: &BenchOptions) -> usize {
    opts.batch.max(1) * if family.cost.cfg { 2 } else { 1 }
}

/// Checks that the `opts` image size suits `family`: positive multiples of its size factor (the
/// VAE's 8 times the family's patch, from the model table).
fn check_size(family: &Family, opts: &BenchOptions) -> Result<(), PipelineError> {
    let factor = 8 * family.patch;
    if opts.height % factor != 0 || opts.width % factor != 0 || opts.height == 0 || opts.width == 0
    {
        return Err(PipelineError::InvalidArgument(format!(
            "bench height/width {}x{} must be positive multiples of {factor} for {}",
            opts.height, opts.width, family.title
        )));
    }
    Ok(())
}

/// Width and height of the latents of an `opts` image (1/8 of the pixels), an error when the
/// image is smaller than 8 pixels.
fn latent_size(opts: &BenchOptions) -> Result<(usize, usize), PipelineError> {
    let (h, w) = (opts.height / 8, opts.width / 8);
    if h == 0 || w == 0 {
        return Err(PipelineError::InvalidArgument(format!(
            "bench height/width {}x{} must be at least 8 pixels",
            opts.height, opts.width
        )));
    }
    Ok((h, w))
}

/// Times one guided SD 1.5 UNet step (2 × `batch` rows, latents `height/8 × width/8`, a
/// 77-token 768-wide context) with random weights of the real architecture. `opts.layers` does
/// not apply (the UNet is always built at full depth).
pub fn sd15_unet_step(opts: &BenchOptions) -> Result<BenchReport, PipelineError> {
    let spec = sd15::unet_config(&sd15_unet_json())?;
    let (vb, params) = RandomWeights::var_builder(opts.dtype, &opts.device);
    let unet = UNet::new(vb, &spec)?;
    let (h, w) = latent_size(opts)?;
    let rows = step_rows(&sd15::FAMILY, opts);
    let sample = Tensor::randn(0f32, 1.0, (rows, spec.in_channels, h, w), &opts.device)?
        .to_dtype(opts.dtype)?;
    let context = Tensor::randn(0f32, 1.0, (rows, 77, 768), &opts.device)?.to_dtype(opts.dtype)?;
    let details = format!("sample {:?}, context {:?}", sample.dims(), context.dims());
    time_steps(
        "sd-v1.5 unet step (guided)",
        opts,
        params.get(),
        details,
        || unet.forward(&sample, 981.0, &context, None).map(|_| ()),
    )
}

/// Times one guided SDXL UNet step (2 × `batch` rows, latents `height/8 × width/8`, a 77-token
/// 2048-wide context, 1280-wide pooled embeds and 6 time ids) with random weights of SDXL
/// base's UNet (2.6 B parameters). `opts.layers` caps the transformer blocks per attention
/// (10 in the deepest level) to fit a small machine; `None` builds the real depth.
pub fn sdxl_unet_step(opts: &BenchOptions) -> Result<Vec<BenchReport>, PipelineError> {
    let mut config: UNetConfig = model_config(&sdxl_base_unet_json(), "unet/config.json")?;
    if let Some(cap) = opts.layers {
        for l in &mut config.transformer_layers_per_block {
            *l = (*l).min(cap.max(1));
        }
    }
    let (h, w) = latent_size(opts)?;
    let (vb, params) = RandomWeights::var_builder(opts.dtype, &opts.device);
    let unet = UNet::new(vb, &config)?;
    let rows = step_rows(&sdxl::FAMILY, opts);
    let randn = |shape: &[usize]| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1.0, shape, &opts.device)?.to_dtype(opts.dtype)
    };
    let sample = randn(&[rows, config.in_channels, h, w])?;
    let context = randn(&[rows, 77, config.cross_attention_dim])?;
    let text_embeds = randn(&[rows, 1280])?;
    let (hf, wf) = (opts.height as f32, opts.width as f32);
    let time_ids = Tensor::from_vec(
        [hf, wf, 0.0, 0.0, hf, wf].repeat(rows),
        (rows, 6),
        &opts.device,
    )?;
    let details = format!(
        "sample {:?}, context {:?}, text_embeds {:?}, transformer layers {:?}",
        sample.dims(),
        context.dims(),
        text_embeds.dims(),
        config.transformer_layers_per_block
    );
    let report = time_steps(
        "sdxl-base unet step (guided)",
        opts,
        params.get(),
        details,
        || {
            unet.forward(&sample, 981.0, &context, Some((&text_embeds, &time_ids)))
                .map(|_| ())
        },
    )?;
    Ok(vec![report])
}

/// The configuration of SDXL's VAE (`stabilityai/stable-diffusion-xl-base-1.0`, `vae/`): 83.7 M
/// parameters, of which the decoder is 49.5 M.
pub fn sdxl_vae_config() -> AutoEncoderKLConfig {
    AutoEncoderKLConfig {
        block_out_channels: vec![128, 256, 512, 512],
        layers_per_block: 2,
        latent_channels: 4,
        norm_num_groups: 32,
        use_quant_conv: true,
        use_post_quant_conv: true,
    }
}

/// Times one VAE decode of `opts.batch` latents (4 × height/8 × width/8) into images with random
/// weights of SDXL's VAE decoder (SD 1.5's and PixArt's have the same architecture; Flux's
/// differs only in its 16 latent channels): what each image costs after its last step.
pub fn sdxl_vae_decode(opts: &BenchOptions) -> Result<BenchReport, PipelineError> {
    let (vb, params) = RandomWeights::var_builder(opts.dtype, &opts.device);
    let vae = VaeDecoder::new(vb, 3, sdxl_vae_config())?;
    let (h, w) = latent_size(opts)?;
    let z = Tensor::randn(0f32, 1.0, (opts.batch.max(1), 4, h, w), &opts.device)?
        .to_dtype(opts.dtype)?;
    let details = format!(
        "latents {:?} -> images {:?}",
        z.dims(),
        [z.dim(0)?, 3, 8 * h, 8 * w]
    );
    time_steps("sdxl vae decode", opts, params.get(), details, || {
        vae.decode(&z).map(|_| ())
    })
}

/// Times one denoising step of the real-size FLUX.1-dev transformer (19 double + 38 single
/// blocks, 3072 wide, 24 heads; `opts.layers` builds fewer of each) with random weights on
/// packed latents of `opts.height`×`opts.width`, `opts.batch` rows and 512 T5 tokens.
pub fn flux_transformer_step(opts: &BenchOptions) -> Result<Vec<BenchReport>, PipelineError> {
    check_size(&flux::FAMILY, opts)?;
    let mut cfg = FluxConfig::dev();
    if let Some(n) = opts.layers {
        cfg.depth = n.min(cfg.depth);
        cfg.depth_single_blocks = (2 * n).min(cfg.depth_single_blocks);
    }
    let (vb, params) = RandomWeights::var_builder(opts.dtype, &opts.device);
    let model = FluxTransformer::new(&cfg, vb)?;
    let b = step_rows(&flux::FAMILY, opts);
    let (rows, cols) = (opts.height / 16, opts.width / 16);
    let txt_len = 512;
    let img = Tensor::randn(0f32, 1.0, (b, rows * cols, 64), &opts.device)?.to_dtype(opts.dtype)?;
    let txt = Tensor::randn(0f32, 1.0, (b, txt_len, 4096), &opts.device)?.to_dtype(opts.dtype)?;
    let pooled = Tensor::randn(0f32, 1.0, (b, 768), &opts.device)?.to_dtype(opts.dtype)?;
    let mut ids = vec![[0f32; 3]; txt_len];
    ids.extend(latent_image_ids(rows, cols));
    let rope = Rope::new(&ids, &cfg.axes_dim, cfg.theta, &opts.device)?;
    let t = vec![500f32; b];
    let g = vec![3500f32; b];
    let details = format!(
        "{} double + {} single blocks, batch {b}, {} image + {txt_len} text tokens",
        cfg.depth,
        cfg.depth_single_blocks,
        rows * cols
    );
    let report = time_steps(
        "flux.1-dev transformer step",
        opts,
        params.get(),
        details,
        || {
            let vec = model.conditioning(&t, Some(&g), &pooled)?;
            model.forward(&img, &txt, &vec, &rope).map(|_| ())
        },
    )?;
    Ok(vec![report])
}

/// Times one guided PixArt-Sigma XL/2 transformer step (2 × `batch` rows, latents
/// `height/8 × width/8`, 300 T5 tokens of width 4096) with random weights; `opts.layers` limits
/// the number of transformer blocks (28 in the real model).
pub fn pixart_transformer_step(opts: &BenchOptions) -> Result<Vec<BenchReport>, PipelineError> {
    let mut config = PixArtConfig::sigma_xl_1024();
    if let Some(layers) = opts.layers {
        config.num_layers = layers.min(config.num_layers);
    }
    // The transformer's 2x2 patches need latents of even size.
    let (h, w) = (opts.height / 8, opts.width / 8);
    if h < 2 || w < 2 || h % 2 != 0 || w % 2 != 0 {
        return Err(PipelineError::InvalidArgument(format!(
            "bench height/width {}x{} must be positive multiples of 16 pixels",
            opts.height, opts.width
        )));
    }
    let (vb, params) = RandomWeights::var_builder(opts.dtype, &opts.device);
    let model = PixArtTransformer::new(&config, vb)?;
    let rows = step_rows(&pixart::FAMILY, opts);
    let sample = Tensor::randn(0f32, 1.0, (rows, 4, h, w), &opts.device)?.to_dtype(opts.dtype)?;
    let context = Tensor::randn(
        0f32,
        1.0,
        (rows, pixart::DEFAULT_MAX_SEQUENCE_LENGTH, 4096),
        &opts.device,
    )?
    .to_dtype(opts.dtype)?;
    let mask = Tensor::ones(
        (rows, pixart::DEFAULT_MAX_SEQUENCE_LENGTH),
        DType::U32,
        &opts.device,
    )?;
    let ts = vec![999.0; rows];
    let details = format!(
        "{} of 28 blocks, sample {:?}, context {:?}",
        config.num_layers,
        sample.dims(),
        context.dims()
    );
    let report = time_steps(
        "pixart-sigma-xl-2-1024 transformer step (guided)",
        opts,
        params.get(),
        details,
        || {
            model
                .forward(&sample, &ts, &context, Some(&mask))
                .map(|_| ())
        },
    )?;
    Ok(vec![report])
}

/// `unet/config.json` of stable-diffusion-v1-5/stable-diffusion-v1-5 (diffusers 0.6.0 keys).
pub fn sd15_unet_json() -> serde_json::Value {
    serde_json::json!({
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": false,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                           "CrossAttnUpBlock2D"]
    })
}

/// `unet/config.json` of stabilityai/stable-diffusion-xl-base-1.0 (the keys that shape the
/// network), for the step benchmark and tests.
pub fn sdxl_base_unet_json() -> serde_json::Value {
    serde_json::json!({
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": false,
        "class_embed_type": null,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": false,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": null,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": null,
        "use_linear_projection": true
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipelines::sd15::unet_config;
    use crate::pipelines::PipelineError;
    use serde_json::{json, Value};

    fn sd15_unet() -> Value {
        sd15_unet_json()
    }

    #[test]
    fn sd15_unet_config_maps_attention_head_dim_to_head_count() {
        let c = unet_config(&sd15_unet()).unwrap();
        assert_eq!(c.sample_size, 64);
        assert_eq!(c.cross_attention_dim, 768);
        assert_eq!(c.layers_per_block, 2);
        assert!(c.flip_sin_to_cos);
        assert!(!c.use_linear_projection);
        assert_eq!(c.text_time, None);
        assert_eq!(c.block_out_channels, [320, 640, 1280, 1280]);
        assert_eq!(c.down_cross_attention, [true, true, true, false]);
        assert_eq!(c.up_cross_attention, [false, true, true, true]);
        assert_eq!(c.num_attention_heads, [8, 8, 8, 8]);
        assert_eq!(c.transformer_layers_per_block, [1, 1, 1, 1]);
        assert_eq!(c.norm_num_groups, 32);
    }

    #[test]
    fn num_attention_heads_takes_precedence_over_attention_head_dim() {
        let mut cfg = sd15_unet();
        cfg["num_attention_heads"] = json!([5, 10, 20, 20]);
        let c = unet_config(&cfg).unwrap();
        assert_eq!(c.num_attention_heads, [5, 10, 20, 20]);
    }

    #[test]
    fn unknown_block_types_are_unsupported_by_name() {
        let mut cfg = sd15_unet();
        cfg["up_block_types"][0] = json!("AttnUpBlock2D");
        let err = unet_config(&cfg).err().unwrap();
        assert!(matches!(err, PipelineError::Unsupported(_)));
        assert!(err.to_string().contains("up_block_types"), "{err}");
    }

    #[test]
    fn centred_input_is_unsupported_by_name() {
        let mut cfg = sd15_unet();
        cfg["center_input_sample"] = json!(true);
        let err = unet_config(&cfg).err().unwrap();
        assert!(err.to_string().contains("center_input_sample"), "{err}");
    }

    #[test]
    fn unet_features_sd15_lacks_are_unsupported_by_name() {
        let mut cfg = sd15_unet();
        cfg["addition_embed_type"] = json!("text_time");
        let err = unet_config(&cfg).err().unwrap();
        assert!(matches!(err, PipelineError::Unsupported(_)));
        assert!(err.to_string().contains("addition_embed_type"), "{err}");
    }

    #[test]
    fn missing_unet_key_names_the_file_and_key() {
        let mut cfg = sd15_unet();
        cfg.as_object_mut().unwrap().remove("cross_attention_dim");
        let err = unet_config(&cfg).err().unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("unet/config.json") && msg.contains("cross_attention_dim"),
            "{msg}"
        );
    }
}
