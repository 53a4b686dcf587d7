//! `tt-scale bench --model qwen`: the time to score one image with the local verifier's
//! real-size architecture (Qwen2.5-VL-7B-Instruct) built from random weights: the prefill of the
//! whole chat prompt (system rubric + image + prompt, vision tower included) and that prefill
//! followed by 300 greedy decode steps. The peer of `bench/diffusers_bench.py`'s `qwen_*` cases.

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::bench::{time_steps, BenchOptions, BenchReport, RandomWeights};
use crate::loading::model_config;
use crate::models::qwen2_5_vl::processor::rope_positions;
use crate::models::qwen2_5_vl::{
    ImageProcessorConfig, KvCache, Qwen25VlConfig, TextModel, VisionModel,
};
use crate::ops::KeyMask;
use crate::pipelines::PipelineError;

/// Text tokens before the image: the chat template's system turn with the grading rubric
/// (`src/verifiers/rubric.txt`, 2234 characters, about 4.3 characters per Qwen2 BPE token)
/// and `<|im_start|>user\n<|vision_start|>`. An estimate (no tokenizer is downloaded); the
/// transformers side (`bench/diffusers_bench.py`, `QWEN_PREFIX_TOKENS`) uses the same count.
pub const PREFIX_TOKENS: usize = 520;
/// Text tokens after the image: `<|vision_end|>`, the user's prompt and
/// `<|im_end|>\n<|im_start|>assistant\n` (`QWEN_SUFFIX_TOKENS` on the transformers side).
pub const SUFFIX_TOKENS: usize = 40;
/// Decode steps timed after the prefill.
pub const NEW_TOKENS: usize = 300;

/// `config.json` of Qwen/Qwen2.5-VL-7B-Instruct (transformers 4.x layout), written out:
/// <https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json>.
pub fn qwen2_5_vl_7b_config_json() -> serde_json::Value {
    json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "max_position_embeddings": 128000,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "image_token_id": 151655,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_config": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "hidden_act": "silu"
        }
    })
}

/// Times scoring one `opts.height` x `opts.width` random image with Qwen2.5-VL-7B's
/// architecture (random weights, `opts.dtype` on `opts.device`; `opts.layers` caps both the
/// language model's layers and the vision blocks). Two reports: the prefill of the full chat
/// prompt (vision tower + language model, from processed pixels to the first logits), and the
/// prefill plus [`NEW_TOKENS`] greedy decode steps (KV cache, the logits copied to the host each
/// step as the verifier does; no stop token). Image processing (resize, patchify) is done once,
/// untimed; `opts.batch` is ignored (one image).
pub fn bench_score_image(opts: &BenchOptions) -> Result<Vec<BenchReport>, PipelineError> {
    let mut cfg: Qwen25VlConfig = model_config(
        &qwen2_5_vl_7b_config_json(),
        "Qwen2.5-VL-7B-Instruct config.json (built in)",
    )?;
    if let Some(n) = opts.layers {
        let n = n.max(1);
        cfg.text.num_hidden_layers = cfg.text.num_hidden_layers.min(n);
        cfg.vision.depth = cfg.vision.depth.min(n);
        let depth = cfg.vision.depth;
        cfg.vision.fullatt_block_indexes.retain(|&i| i < depth);
    }
    let dev = &opts.device;
    let (vb, count) = RandomWeights::var_builder(opts.dtype, dev);
    let text = TextModel::new(&cfg.text, vb.pp("model"), Some(vb.pp("lm_head")))?;
    let vision = VisionModel::new(&cfg.vision, vb.pp("visual"))?;
    let parameters = count.get();

    let processor = ImageProcessorConfig::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let (w, h) = (opts.width as u32, opts.height as u32);
    let raw: Vec<u8> = (0..(w as usize) * (h as usize) * 3)
        .map(|_| rng.random())
        .collect();
    let image = RgbImage::from_raw(w, h, raw)
        .ok_or_else(|| PipelineError::InvalidArgument(format!("cannot make a {w}x{h} image")))?;
    let processed = processor
        .preprocess(&image)
        .map_err(|e| PipelineError::InvalidArgument(format!("--height/--width: {e}")))?;
    let grid = processed.grid_thw;
    let merge = cfg.vision.spatial_merge_size;
    let n_img = processed.num_tokens(merge);
    let pixels = Tensor::from_slice(
        &processed.pixel_values,
        (grid.iter().product::<usize>(), processor.patch_dim()),
        &Device::Cpu,
    )?
    .to_device(dev)?;
    let vocab = cfg.text.vocab_size as u32;
    let prefix: Vec<u32> = (0..PREFIX_TOKENS)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let suffix: Vec<u32> = (0..SUFFIX_TOKENS)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let prefix = Tensor::new(prefix.as_slice(), dev)?.unsqueeze(0)?;
    let suffix = Tensor::new(suffix.as_slice(), dev)?.unsqueeze(0)?;
    let (positions, delta) = rope_positions(PREFIX_TOKENS, grid, merge, SUFFIX_TOKENS);
    let seq = positions.len();

    // Prefill: vision tower, embeddings, causal pass over the whole prompt; the first logits.
    let prefill = |cache: &mut KvCache| -> candle_core::Result<Tensor> {
        let feats = vision.forward(&pixels, grid)?.to_dtype(text.dtype())?;
        let embeds = Tensor::cat(
            &[
                text.embed(&prefix)?,
                feats.unsqueeze(0)?,
                text.embed(&suffix)?,
            ],
            1,
        )?;
        let mask = KeyMask {
            causal: true,
            ..KeyMask::default()
        };
        let hidden =
            text.forward_hidden(&embeds, std::slice::from_ref(&positions), &mask, cache)?;
        text.logits(&hidden.narrow(1, seq - 1, 1)?.squeeze(1)?)
    };
    let details = format!(
        "{}x{} image -> grid {}x{} patches, {n_img} image + {} text tokens ({seq} in all), \
         {} LM layers, {} vision blocks, vocab {}",
        opts.width,
        opts.height,
        grid[1],
        grid[2],
        PREFIX_TOKENS + SUFFIX_TOKENS,
        cfg.text.num_hidden_layers,
        cfg.vision.depth,
        cfg.text.vocab_size
    );
    let prefill_report = time_steps(
        &format!(
            "qwen2.5-vl-7b prefill ({}x{} image)",
            opts.width, opts.height
        ),
        opts,
        parameters,
        details.clone(),
        || {
            let mut cache = KvCache::new(text.num_layers());
            prefill(&mut cache).map(|_| ())
        },
    )?;
    let generate_report = time_steps(
        &format!("qwen2.5-vl-7b prefill + {NEW_TOKENS} tokens"),
        opts,
        parameters,
        format!("{details}; {NEW_TOKENS} greedy decode steps, logits to the host each step"),
        || {
            let mut cache = KvCache::new(text.num_layers());
            let mut logits = prefill(&mut cache)?;
            let first = seq as i64 + delta;
            for next in first..first + NEW_TOKENS as i64 {
                let host: Vec<Vec<f32>> = logits.to_vec2()?;
                let token = argmax(host.first().map_or(&[][..], Vec::as_slice));
                let ids = Tensor::new(&[token], dev)?.unsqueeze(0)?;
                let hidden = text.forward_hidden(
                    &text.embed(&ids)?,
                    &[vec![[next, next, next]]],
                    &KeyMask::default(),
                    &mut cache,
                )?;
                logits = text.logits(&hidden.squeeze(1)?)?;
            }
            Ok(())
        },
    )?;
    Ok(vec![prefill_report, generate_report])
}

/// Index of the largest value (0 for an empty slice).
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_config_is_the_7b_architecture() {
        let c: Qwen25VlConfig = model_config(&qwen2_5_vl_7b_config_json(), "test").unwrap();
        assert_eq!(c.text.hidden_size, 3584);
        assert_eq!(c.text.num_hidden_layers, 28);
        assert_eq!(c.vision.depth, 32);
        assert_eq!(c.vision.fullatt_block_indexes, vec![7, 15, 23, 31]);
    }

    #[test]
    fn argmax_picks_the_first_largest_value() {
        assert_eq!(argmax(&[0.5, 2.0, -1.0, 2.0]), 1);
        assert_eq!(argmax(&[]), 0);
    }
}
