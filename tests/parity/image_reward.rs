//! ImageReward against a faithful re-implementation of its code (BLIP's ViT, BLIP's med BERT with
//! cross-attention, the MLP head and the mean/std normalisation; tokenized by transformers' slow
//! BertTokenizer with BLIP's added tokens), on the tiny model written by
//! tools/reference/make_image_reward_fixtures.py: token ids, preprocessing of non-square images
//! (the 301x201 image checks torchvision's half-to-even centre crop) and the scores within 1e-4
//! of the float64 reference.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use tt_scale::models::blip::{BlipTokenizer, IMAGE_REWARD_MAX_LENGTH};
use tt_scale::verifiers::image_reward::ImageRewardVerifier;
use tt_scale::verifiers::{ImageInput, ImageVerifier};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image-reward")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn meta() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("meta.json")).unwrap()).unwrap()
}

fn tokenizer() -> BlipTokenizer {
    BlipTokenizer::from_tokenizer_json(
        &dir().join("bert-tokenizer/tokenizer.json"),
        IMAGE_REWARD_MAX_LENGTH,
    )
    .unwrap()
}

fn verifier(batch: usize) -> ImageRewardVerifier {
    ImageRewardVerifier::load(
        "tiny-image-reward",
        &dir().join("ImageReward.pt"),
        &dir().join("med_config.json"),
        tokenizer(),
        Device::Cpu,
        batch,
    )
    .unwrap()
}

fn ints(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

fn images() -> Vec<image::RgbImage> {
    meta()["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            image::open(Path::new(env!("CARGO_MANIFEST_DIR")).join(p.as_str().unwrap()))
                .unwrap()
                .to_rgb8()
        })
        .collect()
}

/// Lower-casing, punctuation, BLIP's added `[ENC]` token, truncation at 35 and padding: the
/// same ids and masks as the slow BertTokenizer ImageReward uses.
#[test]
fn prompts_tokenize_as_blips_bert_tokenizer() {
    let r = reference();
    let t = tokenizer();
    for (i, prompt) in meta()["prompts"].as_array().unwrap().iter().enumerate() {
        let (ids, mask) = t.encode(prompt.as_str().unwrap()).unwrap();
        assert_eq!(ids, ints(&r[&format!("input_ids_{i}")]), "prompt {i}");
        assert_eq!(mask, ints(&r[&format!("attention_mask_{i}")]), "prompt {i}");
    }
}

#[test]
fn preprocessing_equals_image_rewards_transform() {
    let v = verifier(4);
    let images = images();
    assert_eq!((images[3].width(), images[3].height()), (301, 201));
    let mut px = Vec::new();
    for image in &images {
        let (values, h, w) = v.processor().pixel_values(image);
        assert_eq!((h, w), (224, 224));
        px.extend(values.into_iter().map(f64::from));
    }
    let r = reference();
    let sample: Vec<f64> = px.iter().step_by(13).copied().collect();
    let want: Vec<f64> = r["pixel_values_sample"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(sample.len(), want.len());
    let worst = sample
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-6, "pixel values differ by up to {worst}");
}

/// Scores of every (image, prompt) within 1e-4 of the float64 reference, in batches of 4 and
/// of 1 alike (a batch row does not see its neighbours), with several prompts in one batch.
#[test]
fn scores_match_the_reference_within_1e_4() {
    let r = reference();
    let want = r["score_f64"].to_vec2::<f64>().unwrap();
    let f32_ref = r["score_f32"].to_vec2::<f32>().unwrap();
    let images = images();
    let prompts: Vec<String> = meta()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let inputs: Vec<ImageInput<'_>> = prompts
        .iter()
        .flat_map(|p| {
            images
                .iter()
                .map(move |image| ImageInput { prompt: p, image })
        })
        .collect();
    for batch in [4, 1, 5] {
        let v = verifier(batch);
        let out = v.score(&inputs);
        let mut worst = 0f64;
        for (k, g) in out.iter().enumerate() {
            let (p, i) = (k / images.len(), k % images.len());
            let g = g.as_ref().unwrap();
            assert_eq!(g.len(), 1);
            let got = g["image_reward"].score;
            let err = (got - want[i][p]).abs() / want[i][p].abs().max(0.1);
            assert!(
                err <= 1e-4,
                "batch {batch}, image {i}, prompt {p}: {got} vs {}",
                want[i][p]
            );
            worst = worst.max(err);
        }
        let torch_f32 = (0..images.len())
            .flat_map(|i| (0..prompts.len()).map(move |p| (i, p)))
            .map(|(i, p)| (f64::from(f32_ref[i][p]) - want[i][p]).abs() / want[i][p].abs().max(0.1))
            .fold(0.0, f64::max);
        eprintln!("batch {batch}: ours vs fp64 {worst:.2e}, torch fp32 vs fp64 {torch_f32:.2e}");
    }
}

/// A checkpoint without the reward head, a med_config without cross-attention, and a tokenizer
/// that is not BERT's are refused with what is wrong.
#[test]
fn wrong_files_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let med: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("med_config.json")).unwrap())
            .unwrap();
    let mut no_cross = med.clone();
    no_cross["add_cross_attention"] = Value::Bool(false);
    let med_path = tmp.path().join("med_config.json");
    std::fs::write(&med_path, no_cross.to_string()).unwrap();
    let e = ImageRewardVerifier::load(
        "x",
        &dir().join("ImageReward.pt"),
        &med_path,
        tokenizer(),
        Device::Cpu,
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("add_cross_attention"), "{e}");
    let e = ImageRewardVerifier::load(
        "x",
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip/aesthetic-model.pth"),
        &dir().join("med_config.json"),
        tokenizer(),
        Device::Cpu,
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("mlp.layers.0.weight"), "{e}");
    let t5 =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t5-tokenizer/tokenizer.json");
    let e = BlipTokenizer::from_tokenizer_json(&t5, 35)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("bert-base-uncased"), "{e}");
}
