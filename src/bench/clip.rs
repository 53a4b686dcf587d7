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
