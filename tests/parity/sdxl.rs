//! SDXL pipeline parity with diffusers/transformers on a tiny random-weight model.
//!
//! Fixtures: `tests/fixtures/tiny-sdxl/` (the model, diffusers layout) and `tests/fixtures/sdxl/`
//! (reference outputs), both written by `tools/reference/make_sdxl_fixtures.py`. All parity
//! checks run in fp32 on the CPU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tt_scale::loading::Dtype;
use tt_scale::loading::ModelSource;
use tt_scale::noise::Noise;
use tt_scale::pipelines::common::scheduler_from_file;
use tt_scale::pipelines::sdxl::SdxlPipeline;
use tt_scale::pipelines::CallArgs;
use tt_scale::pipelines::{ImagePipeline, PipelineError};

const PROMPT: &str = "a photo of a cat sitting on a red chair, highly detailed";
const NEGATIVE: &str = "blurry, low quality";

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl")
}

fn ref_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdxl")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(ref_dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn args(negative: Option<&str>, guidance: f64, height: usize, width: usize) -> CallArgs {
    CallArgs {
        height: Some(height),
        width: Some(width),
        num_inference_steps: Some(4),
        guidance_scale: Some(guidance),
        negative_prompt: negative.map(str::to_owned),
        ..Default::default()
    }
}

fn load_from(dir: &Path, dtype: Dtype, a: &CallArgs) -> Result<SdxlPipeline, PipelineError> {
    SdxlPipeline::load(
        &ModelSource::Local(dir.to_path_buf()),
        dtype,
        &Device::Cpu,
        a,
    )
}

fn load(a: &CallArgs) -> SdxlPipeline {
    load_from(&model_dir(), Dtype::F32, a).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("max abs diff {d:e}");
    d
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

fn noise_of(t: &Tensor) -> Noise {
    Noise {
        shape: t.dims().to_vec(),
        data: t.flatten_all().unwrap().to_vec1().unwrap(),
    }
}

/// Largest per-channel difference between our image and a reference PNG, in 1/255 steps.
fn max_pixel_diff(ours: &image::RgbImage, png: &str) -> u8 {
    let theirs = image::open(ref_dir().join(png)).unwrap().to_rgb8();
    assert_eq!(ours.dimensions(), theirs.dimensions());
    ours.as_raw()
        .iter()
        .zip(theirs.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap()
}

/// Copies the tiny model into a temporary folder so a test can change it.
fn model_copy() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&model_dir(), dir.path());
    dir
}

#[test]
fn both_tokenizers_equal_transformers_including_the_bang_padding_of_tokenizer_2() {
    let pipe = load(&args(None, 5.0, 64, 64));
    let text = std::fs::read_to_string(ref_dir().join("tokens.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        let (a, b) = pipe.tokenize(prompt).unwrap();
        assert_eq!(a, ids(&case["ids"]), "tokenizer, prompt {prompt:?}");
        assert_eq!(b, ids(&case["ids_2"]), "tokenizer_2, prompt {prompt:?}");
    }
    // "!" is id 0: tokenizer_2 pads with it where tokenizer pads with EOS.
    let short = cases
        .iter()
        .find(|c| c["prompt"] == "a photo of a cat")
        .unwrap();
    assert_eq!(*ids(&short["ids_2"]).last().unwrap(), 0);
    assert_ne!(*ids(&short["ids"]).last().unwrap(), 0);
}

#[test]
fn text_encoder_penultimate_hidden_states_match_transformers_within_1e_4() {
    let pipe = load(&args(None, 5.0, 64, 64));
    let r = reference();
    for i in 0..2 {
        let ours = pipe
            .text_encoder_penultimate(&ids_of(&r[&format!("text_ids_{i}")]))
            .unwrap();
        let diff = max_abs_diff(&ours, &r[&format!("text_penultimate_{i}")]);
        assert!(diff < 1e-4, "text_encoder {i}: max abs diff {diff}");
    }
}

#[test]
fn text_encoder_2_penultimate_states_and_pooled_projection_match_within_1e_4() {
    let pipe = load(&args(None, 5.0, 64, 64));
    let r = reference();
    for i in 0..2 {
        let (hidden, pooled) = pipe
            .text_encoder_2_outputs(&ids_of(&r[&format!("text_ids2_{i}")]))
            .unwrap();
        let d = max_abs_diff(&hidden, &r[&format!("text2_penultimate_{i}")]);
        assert!(d < 1e-4, "text_encoder_2 {i} hidden: max abs diff {d}");
        let d = max_abs_diff(&pooled, &r[&format!("text2_pooled_{i}")]);
        assert!(d < 1e-4, "text_encoder_2 {i} pooled: max abs diff {d}");
    }
}

#[test]
fn encode_prompt_concatenates_both_encoders_like_diffusers() {
    let pipe = load(&args(None, 5.0, 64, 64));
    let r = reference();
    for (i, prompt) in [PROMPT, NEGATIVE].iter().enumerate() {
        let (embeds, pooled) = pipe.encode_prompt(prompt).unwrap();
        let d = max_abs_diff(&embeds, &r[&format!("prompt_embeds_{i}")]);
        assert!(d < 1e-4, "prompt_embeds {i}: {d}");
        let d = max_abs_diff(&pooled, &r[&format!("pooled_prompt_embeds_{i}")]);
        assert!(d < 1e-4, "pooled {i}: {d}");
    }
}

#[test]
fn negative_prompt_is_encoded_as_the_uncond_rows() {
    let mut pipe = load(&args(Some(NEGATIVE), 5.0, 64, 64));
    pipe.set_prompt(PROMPT).unwrap();
    let r = reference();
    let c = pipe.conditioning().unwrap();
    let d = max_abs_diff(
        &c.prompt_embeds.narrow(0, 0, 1).unwrap(),
        &r["negative_prompt_embeds"],
    );
    assert!(d < 1e-4, "{d}");
    let d = max_abs_diff(
        &c.text_embeds.narrow(0, 0, 1).unwrap(),
        &r["negative_pooled_prompt_embeds"],
    );
    assert!(d < 1e-4, "{d}");
    let d = max_abs_diff(
        &c.prompt_embeds.narrow(0, 1, 1).unwrap(),
        &r["prompt_embeds_0"],
    );
    assert!(d < 1e-4, "{d}");
}

#[test]
fn unset_negative_prompt_gives_zero_uncond_rows_with_force_zeros_for_empty_prompt() {
    let mut pipe = load(&args(None, 5.0, 64, 64));
    pipe.set_prompt(PROMPT).unwrap();
    let c = pipe.conditioning().unwrap();
    let zero = |t: &Tensor| {
        t.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(zero(&c.prompt_embeds.narrow(0, 0, 1).unwrap()), 0.0);
    assert_eq!(zero(&c.text_embeds.narrow(0, 0, 1).unwrap()), 0.0);
    assert!(zero(&c.prompt_embeds.narrow(0, 1, 1).unwrap()) > 0.0);
}

#[test]
fn unset_negative_prompt_encodes_the_empty_string_without_force_zeros() {
    let dir = model_copy();
    let index = dir.path().join("model_index.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    json["force_zeros_for_empty_prompt"] = serde_json::json!(false);
    std::fs::write(&index, json.to_string()).unwrap();
    let mut pipe = load_from(dir.path(), Dtype::F32, &args(None, 5.0, 64, 64)).unwrap();
    pipe.set_prompt(PROMPT).unwrap();
    let (empty, empty_pooled) = pipe.encode_prompt("").unwrap();
    let c = pipe.conditioning().unwrap();
    assert_eq!(
        max_abs_diff(&c.prompt_embeds.narrow(0, 0, 1).unwrap(), &empty),
        0.0
    );
    assert_eq!(
        max_abs_diff(&c.text_embeds.narrow(0, 0, 1).unwrap(), &empty_pooled),
        0.0
    );
}

#[test]
fn time_ids_are_original_size_zero_crop_and_target_size_from_height_and_width() {
    let pipe = load(&args(None, 5.0, 64, 96));
    assert_eq!(pipe.add_time_ids(), [64.0, 96.0, 0.0, 0.0, 64.0, 96.0]);
    assert_eq!(pipe.noise_shape(), vec![1, 4, 8, 12]);
}

#[test]
fn default_size_is_unet_sample_size_times_vae_factor() {
    let pipe = load(&CallArgs::default());
    assert_eq!(pipe.noise_shape(), vec![1, 4, 8, 8]);
    assert_eq!(pipe.add_time_ids(), [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]);
}

#[test]
fn unet_with_text_time_conditioning_matches_diffusers_within_1e_4() {
    let pipe = load(&args(None, 5.0, 64, 64));
    let r = reference();
    let out = pipe
        .unet_forward(
            &r["unet_sample"],
            981.0,
            &r["unet_context"],
            &r["unet_text_embeds"],
            &r["unet_time_ids"],
        )
        .unwrap();
    let diff = max_abs_diff(&out, &r["unet_out"]);
    assert!(diff < 1e-4, "unet: max abs diff {diff}");
}

#[test]
fn unet_output_depends_on_the_time_ids() {
    let pipe = load(&args(None, 5.0, 64, 64));
    let r = reference();
    let flipped = Tensor::cat(
        &[
            r["unet_time_ids"].narrow(0, 1, 1).unwrap(),
            r["unet_time_ids"].narrow(0, 0, 1).unwrap(),
        ],
        0,
    )
    .unwrap();
    let out = pipe
        .unet_forward(
            &r["unet_sample"],
            981.0,
            &r["unet_context"],
            &r["unet_text_embeds"],
            &flipped,
        )
        .unwrap();
    assert!(max_abs_diff(&out, &r["unet_out"]) > 1e-2);
}

#[test]
fn unet_matches_diffusers_at_an_odd_latent_size_and_fractional_timestep() {
    let pipe = load(&args(None, 5.0, 64, 64));
    let r = reference();
    let first = |t: &Tensor| t.narrow(0, 0, 1).unwrap();
    let out = pipe
        .unet_forward(
            &r["unet_sample_odd"],
            517.25,
            &first(&r["unet_context"]),
            &first(&r["unet_text_embeds"]),
            &first(&r["unet_time_ids"]),
        )
        .unwrap();
    let diff = max_abs_diff(&out, &r["unet_out_odd"]);
    assert!(diff < 1e-4, "unet (12x10 latents): max abs diff {diff}");
}

#[test]
fn vae_decode_matches_diffusers_within_1e_4() {
    let pipe = load(&args(None, 5.0, 64, 64));
    let r = reference();
    let out = pipe.vae_decode(&r["vae_latents"]).unwrap();
    let diff = max_abs_diff(&out, &r["vae_out"]);
    assert!(diff < 1e-4, "vae: max abs diff {diff}");
}

/// Runs the reference case `name` from pipeline.json and compares with its PNG.
fn assert_pipeline_image(name: &str) {
    let runs: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(ref_dir().join("pipeline.json")).unwrap())
            .unwrap();
    let run = runs.iter().find(|r| r["name"] == name).unwrap();
    let a = args(
        run["negative_prompt"].as_str(),
        run["guidance_scale"].as_f64().unwrap(),
        run["height"].as_u64().unwrap() as usize,
        run["width"].as_u64().unwrap() as usize,
    );
    let mut pipe = load(&a);
    if run["scheduler"] == "dpm" {
        pipe.set_scheduler(scheduler_from_file(&ref_dir().join("scheduler_dpm.json")).unwrap());
    }
    pipe.set_prompt(run["prompt"].as_str().unwrap()).unwrap();
    let latents = &reference()[&format!("latents_{name}")];
    let images = pipe.generate(&[noise_of(latents)]).unwrap();
    let diff = max_pixel_diff(&images[0], &format!("image_{name}.png"));
    eprintln!("{name}: max pixel diff {diff}/255");
    assert!(diff <= 2, "{name}: max pixel diff {diff}/255");
}

#[test]
fn euler_pipeline_image_with_negative_prompt_matches_diffusers_within_2_of_255() {
    assert_pipeline_image("euler");
}

#[test]
fn euler_pipeline_image_with_zeroed_negative_matches_diffusers_within_2_of_255() {
    assert_pipeline_image("euler_zero_negative");
}

#[test]
fn pipeline_image_without_guidance_matches_diffusers_within_2_of_255() {
    assert_pipeline_image("euler_no_guidance");
}

#[test]
fn non_square_pipeline_image_matches_diffusers_within_2_of_255() {
    assert_pipeline_image("euler_wide");
}

#[test]
fn dpm_solver_pipeline_image_matches_diffusers_within_2_of_255() {
    assert_pipeline_image("dpm");
}

#[test]
fn batched_candidates_equal_one_at_a_time_generation() {
    let mut pipe = load(&args(Some(NEGATIVE), 5.0, 64, 64));
    pipe.set_prompt(PROMPT).unwrap();
    let r = reference();
    let a = noise_of(&r["latents_euler"]);
    let b = noise_of(&r["latents_dpm"]);
    let together = pipe.generate(&[a.clone(), b.clone()]).unwrap();
    let one = pipe.generate(&[a]).unwrap();
    let two = pipe.generate(&[b]).unwrap();
    for (x, y) in [(&together[0], &one[0]), (&together[1], &two[0])] {
        let d = x
            .as_raw()
            .iter()
            .zip(y.as_raw())
            .map(|(p, q)| p.abs_diff(*q))
            .max()
            .unwrap();
        assert!(d <= 1, "batched vs single: {d}");
    }
}

#[test]
fn generate_before_set_prompt_is_an_error() {
    let mut pipe = load(&args(None, 5.0, 64, 64));
    let err = pipe
        .generate(&[noise_of(&reference()["latents_euler"])])
        .unwrap_err();
    assert!(err.to_string().contains("set_prompt"), "{err}");
}

#[test]
fn noise_of_the_wrong_shape_is_invalid_argument() {
    let mut pipe = load(&args(None, 5.0, 64, 64));
    pipe.set_prompt(PROMPT).unwrap();
    let bad = Noise {
        shape: vec![1, 4, 4, 4],
        data: vec![0.0; 64],
    };
    assert!(matches!(
        pipe.generate(&[bad]),
        Err(PipelineError::InvalidArgument(_))
    ));
}

#[test]
fn fp16_upcasts_the_vae_when_force_upcast_and_runs() {
    let mut pipe = load_from(&model_dir(), Dtype::F16, &args(Some(NEGATIVE), 5.0, 64, 64)).unwrap();
    assert_eq!(pipe.vae_dtype(), DType::F32);
    pipe.set_prompt(PROMPT).unwrap();
    let images = pipe
        .generate(&[noise_of(&reference()["latents_euler"])])
        .unwrap();
    // fp16 is not a parity target; it must still land near the fp32 reference.
    let diff = max_pixel_diff(&images[0], "image_euler.png");
    eprintln!("fp16 vs fp32 reference: {diff}/255");
    assert!(diff <= 40, "fp16 vs fp32 reference: {diff}/255");
}

#[test]
fn fp16_keeps_the_vae_in_fp16_without_force_upcast() {
    let dir = model_copy();
    let cfg = dir.path().join("vae/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    json["force_upcast"] = serde_json::json!(false);
    std::fs::write(&cfg, json.to_string()).unwrap();
    let pipe = load_from(dir.path(), Dtype::F16, &args(None, 5.0, 64, 64)).unwrap();
    assert_eq!(pipe.vae_dtype(), DType::F16);
}

#[test]
fn fp16_prefers_variant_files_and_falls_back_to_plain_ones() {
    let source = ModelSource::Local(model_dir());
    let te2 = source.weights("text_encoder_2", Dtype::F16).unwrap();
    assert!(te2[0].ends_with("text_encoder_2/model.fp16.safetensors"));
    let unet = source.weights("unet", Dtype::F16).unwrap();
    assert!(unet[0].ends_with("unet/diffusion_pytorch_model.safetensors"));
}

#[test]
fn bf16_on_the_cpu_is_unsupported() {
    let err = load_from(&model_dir(), Dtype::Bf16, &args(None, 5.0, 64, 64))
        .err()
        .unwrap();
    assert!(matches!(err, PipelineError::Unsupported(_)));
}

#[test]
fn height_not_a_multiple_of_the_vae_factor_is_invalid_argument() {
    let err = load_from(&model_dir(), Dtype::F32, &args(None, 5.0, 60, 64))
        .err()
        .unwrap();
    assert!(matches!(err, PipelineError::InvalidArgument(_)));
    assert!(err.to_string().contains("height"), "{err}");
}

#[test]
fn a_unet_without_text_time_conditioning_is_unsupported_naming_the_key() {
    let dir = model_copy();
    let cfg = dir.path().join("unet/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    json["addition_embed_type"] = serde_json::json!("text");
    std::fs::write(&cfg, json.to_string()).unwrap();
    let err = load_from(dir.path(), Dtype::F32, &args(None, 5.0, 64, 64))
        .err()
        .unwrap();
    assert!(matches!(err, PipelineError::Unsupported(_)));
    assert!(err.to_string().contains("addition_embed_type"), "{err}");
}

#[test]
fn a_cross_attention_dim_unlike_the_encoders_names_the_file() {
    let dir = model_copy();
    let cfg = dir.path().join("unet/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    json["cross_attention_dim"] = serde_json::json!(64);
    std::fs::write(&cfg, json.to_string()).unwrap();
    let err = load_from(dir.path(), Dtype::F32, &args(None, 5.0, 64, 64))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("unet/config.json") && msg.contains("cross_attention_dim"),
        "{msg}"
    );
}

#[test]
fn clip_pools_at_the_largest_id_for_legacy_eos_2_and_at_the_first_eos_otherwise() {
    use tt_scale::models::clip_text::clip_pooling_positions;
    let rows = vec![vec![49406, 5, 49407, 49407], vec![49406, 7, 8, 49407]];
    assert_eq!(clip_pooling_positions(&rows, 2), vec![2, 3]);
    let rows = vec![vec![10, 5, 3, 3, 99]];
    assert_eq!(clip_pooling_positions(&rows, 3), vec![2]);
    assert_eq!(clip_pooling_positions(&rows, 2), vec![4]);
}
