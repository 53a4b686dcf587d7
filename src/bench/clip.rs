//! `tt-scale bench --model clip-l14`: the CLIP verifiers' work on a batch of `opts.batch`
//! images: CLIP ViT-L/14 (`openai/clip-vit-large-patch14`'s architecture, random weights) embeds
//! the images (224x224, preprocessed) and one 77-token prompt, and the cosines are taken. The
//! peer of `bench/diffusers_bench.py`'s `clip_l14` case (transformers' `CLIPModel`).

use candle_core::{DType, Tensor};
use serde_json::json;

use crate::bench::{time_steps, BenchOptions, BenchReport, RandomWeights};
use crate::loading::parse_config;
use crate::models::clip::{l2_normalize, ClipConfig, ClipModel};
use crate::pipelines::PipelineError;

/// `config.json` of openai/clip-vit-large-patch14, written out.
pub fn clip_vit_large_patch14_config_json() -> serde_json::Value {
    json!({
        "projection_dim": 768,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 2,
            "projection_dim": 768
        },
        "vision_config": {
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768
        }
    })
}

/// Times scoring `opts.batch` preprocessed images against one prompt with CLIP ViT-L/14 in
/// float32 (the verifiers' dtype) on `opts.device`: the vision tower on the batch, the text tower
/// on the prompt, normalisation and cosines. `opts.layers` caps both towers' depth.
pub fn bench_clip_scoring(opts: &BenchOptions) -> Result<BenchReport, PipelineError> {
    let mut cfg: ClipConfig = parse_config(
        &clip_vit_large_patch14_config_json(),
        "clip-vit-large-patch14 config.json (built in)",
    )?;
    if let Some(l) = opts.layers {
        cfg.vision_config.num_hidden_layers = cfg.vision_config.num_hidden_layers.min(l);
        cfg.text_config.num_hidden_layers = cfg.text_config.num_hidden_layers.min(l);
    }
    let dtype = DType::F32;
    let (vb, count) = RandomWeights::var_builder(dtype, &opts.device);
    let model = ClipModel::new(vb, &cfg).map_err(PipelineError::InvalidArgument)?;
    let b = opts.batch;
    let pixels = Tensor::randn(0f32, 1.0, (b, 3, 224, 224), &opts.device)?;
    let ids: Vec<u32> = (0..77u32)
        .map(|i| if i == 76 { 49407 } else { 320 + i })
        .collect();
    let ids = Tensor::new(ids.as_slice(), &opts.device)?.unsqueeze(0)?;
    let details = format!(
        "{b} images 224x224 + 1 prompt of 77 tokens, fp32, vision {} layers, text {} layers",
        cfg.vision_config.num_hidden_layers, cfg.text_config.num_hidden_layers
    );
    time_steps(
        &format!("clip-vit-l14 score b{b}"),
        opts,
        count.get(),
        details,
        || {
            let images = l2_normalize(&model.vision.forward(&pixels)?)?;
            let text = l2_normalize(&model.text_embeds(&ids)?)?;
            let cos = images.matmul(&text.t()?)?;
            cos.to_vec2::<f32>().map(|_| ())
        },
    )
}

/// ImageReward v1.0's `med_config.json` (BLIP's BERT-base with cross-attention), written out.
pub fn image_reward_med_config_json() -> serde_json::Value {
    json!({
        "vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "encoder_width": 768,
        "add_cross_attention": true
    })
}

/// Times ImageReward v1.0 (random weights, the published sizes: BLIP ViT-L/16 at 224 px, BERT-base
/// with cross-attention, the 768-1024-128-64-16-1 head) on `opts.batch` preprocessed images and
/// one 35-token prompt, float32 on `opts.device`. `opts.layers` caps both encoders' depth.
pub fn bench_image_reward(opts: &BenchOptions) -> Result<BenchReport, PipelineError> {
    use crate::models::blip::{BlipVisionConfig, BlipVisionTransformer, MedBertModel, MedConfig};
    let mut vision_cfg = BlipVisionConfig::default();
    let mut med: MedConfig = parse_config(
        &image_reward_med_config_json(),
        "ImageReward med_config.json (built in)",
    )?;
    if let Some(l) = opts.layers {
        vision_cfg.depth = vision_cfg.depth.min(l);
        med.num_hidden_layers = med.num_hidden_layers.min(l);
    }
    let (vb, count) = RandomWeights::var_builder(DType::F32, &opts.device);
    let vision = BlipVisionTransformer::new(vb.pp("blip.visual_encoder"), &vision_cfg)?;
    let text = MedBertModel::new(vb.pp("blip.text_encoder"), &med, vision_cfg.hidden_size)?;
    let head = crate::verifiers::clip::AestheticHead::from_lookup(
        &|name| {
            let widths = [
                (0, 1024, 768),
                (2, 128, 1024),
                (4, 64, 128),
                (6, 16, 64),
                (7, 1, 16),
            ];
            let Some(&(_, out, inp)) = widths
                .iter()
                .find(|(i, _, _)| name.starts_with(&format!("mlp.layers.{i}.")))
            else {
                return Ok(None);
            };
            let shape: &[usize] = if name.ends_with("weight") {
                &[out, inp]
            } else {
                &[out]
            };
            Tensor::randn(0f32, 0.02, shape, &opts.device)
                .map(Some)
                .map_err(|e| e.to_string())
        },
        "mlp.",
        "the benchmark's head",
        &opts.device,
    )
    .map_err(PipelineError::InvalidArgument)?;
    let b = opts.batch;
    let pixels = Tensor::randn(0f32, 1.0, (b, 3, 224, 224), &opts.device)?;
    let ids: Vec<u32> = (0..35u32).map(|i| 1000 + i).collect();
    let ids = Tensor::new(ids.as_slice(), &opts.device)?
        .unsqueeze(0)?
        .repeat((b, 1))?;
    let mask = Tensor::ones((b, 35), DType::U32, &opts.device)?;
    let details = format!(
        "{b} images 224x224 + 1 prompt of 35 tokens, fp32, ViT-L/16 {} blocks, BERT {} layers",
        vision_cfg.depth, med.num_hidden_layers
    );
    time_steps(
        &format!("image-reward score b{b}"),
        opts,
        count.get(),
        details,
        || {
            let tokens = vision.forward(&pixels)?;
            let hidden = text.forward(&ids, &mask, &tokens)?;
            let rewards = head.forward(&hidden.narrow(1, 0, 1)?.squeeze(1)?)?;
            rewards.to_vec1::<f32>().map(|_| ())
        },
    )
}
