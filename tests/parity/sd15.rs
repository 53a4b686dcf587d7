//! Stable Diffusion 1.5 pipeline parity with diffusers/transformers on a tiny random-weight model.
//!
//! Fixtures: `tests/fixtures/tiny-sd15/` (the model, diffusers layout) and `tests/fixtures/sd15/`
//! (reference outputs), both written by `tools/reference/make_sd15_fixtures.py`. All parity
//! checks run in fp32 on the CPU.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tt_scale::loading::Dtype;
use tt_scale::loading::ModelSource;
use tt_scale::noise::{torch_randn, Noise, RandnKernel};
use tt_scale::pipelines::common::scheduler_from_file;
use tt_scale::pipelines::sd15::Sd15Pipeline;
use tt_scale::pipelines::CallArgs;
use tt_scale::pipelines::{ImagePipeline, PipelineError};

const PROMPT: &str = "a photo of a cat sitting on a red chair, highly detailed";
const NEGATIVE: &str = "blurry, low quality";

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd15")
}

fn ref_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd15")
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(ref_dir().join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// The call arguments of the reference pipeline runs.
fn call_args(negative: Option<&str>) -> CallArgs {
    CallArgs {
        height: Some(64),
        width: Some(64),
        num_inference_steps: Some(4),
        guidance_scale: Some(7.5),
        negative_prompt: negative.map(str::to_owned),
        ..Default::default()
    }
}

fn load_with(dtype: Dtype, args: &CallArgs) -> Result<Sd15Pipeline, PipelineError> {
    Sd15Pipeline::load(&ModelSource::Local(model_dir()), dtype, &Device::Cpu, args)
}

fn load(args: &CallArgs) -> Sd15Pipeline {
    load_with(Dtype::F32, args).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
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

/// Copies the tiny model into a temporary folder so a test can break it.
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
fn tokenizer_ids_equal_transformers_clip_tokenizer() {
    let pipe = load(&call_args(None));
    let text = std::fs::read_to_string(ref_dir().join("tokens.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            pipe.tokenize(prompt).unwrap(),
            expected,
            "prompt {prompt:?}"
        );
    }
}

#[test]
fn text_encoder_hidden_states_match_transformers_within_1e_4() {
    let pipe = load(&call_args(None));
    let r = reference();
    for i in 0..2 {
        let ids: Vec<u32> = r[&format!("text_ids_{i}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect();
        let ours = pipe.encode_ids(&ids).unwrap();
        let diff = max_abs_diff(&ours, &r[&format!("text_hidden_{i}")]);
        assert!(diff < 1e-4, "text encoder {i}: max abs diff {diff}");
    }
}

#[test]
fn prompt_encoding_uses_the_tokenizer_and_text_encoder_together() {
    let pipe = load(&call_args(None));
    let r = reference();
    let diff = max_abs_diff(&pipe.encode_prompt(PROMPT).unwrap(), &r["text_hidden_0"]);
    assert!(diff < 1e-4, "max abs diff {diff}");
}

#[test]
fn unet_output_matches_diffusers_within_1e_4() {
    let pipe = load(&call_args(None));
    let r = reference();
    let t = r["unet_timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let ours = pipe
        .unet_forward(&r["unet_sample"], t, &r["unet_context"])
        .unwrap();
    let diff = max_abs_diff(&ours, &r["unet_out"]);
    assert!(diff < 1e-4, "unet: max abs diff {diff}");
}

/// The fused kernels check themselves before they serve (`ops::selfcheck`): with the kernels'
/// CPU stand-ins taking the fused path, the UNet still matches diffusers; with a broken group
/// norm or GEGLU kernel, the check catches it once and the plain path keeps the output right,
/// while the same broken kernel, used unchecked, would be far off.
#[test]
fn unet_with_a_faulty_fused_kernel_falls_back_and_still_matches_diffusers() {
    use tt_scale::ops::selfcheck::{checks_run, with_cpu_kernels, with_faulty_kernel, Kernel};
    let pipe = load(&call_args(None));
    let r = reference();
    let t = r["unet_timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let unet = || {
        pipe.unet_forward(&r["unet_sample"], t, &r["unet_context"])
            .unwrap()
    };
    with_cpu_kernels(|| {
        let before = checks_run();
        let diff = max_abs_diff(&unet(), &r["unet_out"]);
        assert!(diff < 1e-4, "fused stand-ins: max abs diff {diff}");
        assert_eq!(
            checks_run() - before,
            2,
            "group norm and GEGLU checked once each"
        );
        let _ = unet();
        assert_eq!(checks_run() - before, 2, "verdicts are remembered");
    });
    for kernel in [Kernel::GroupNorm, Kernel::Gelu] {
        // A fresh thread: verdicts of the CPU stand-ins are per thread.
        std::thread::spawn(move || {
            let pipe = load(&call_args(None));
            let r = reference();
            let t = r["unet_timestep"].to_vec1::<f32>().unwrap()[0] as f64;
            with_cpu_kernels(|| {
                with_faulty_kernel(kernel, || {
                    let ours = pipe
                        .unet_forward(&r["unet_sample"], t, &r["unet_context"])
                        .unwrap();
                    let diff = max_abs_diff(&ours, &r["unet_out"]);
                    assert!(diff < 1e-4, "{kernel:?} faulty: max abs diff {diff}");
                    assert!(!tt_scale::ops::selfcheck::trusted(
                        kernel,
                        &Device::Cpu,
                        DType::F32,
                        0
                    ));
                })
            })
        })
        .join()
        .unwrap();
    }
}

#[test]
fn vae_decode_matches_diffusers_within_1e_4() {
    let pipe = load(&call_args(None));
    let r = reference();
    let ours = pipe.vae_decode(&r["vae_latents"]).unwrap();
    let diff = max_abs_diff(&ours, &r["vae_out"]);
    assert!(diff < 1e-4, "vae: max abs diff {diff}");
}

#[test]
fn noise_shape_is_latent_channels_by_size_over_vae_factor() {
    let pipe = load(&call_args(None));
    assert_eq!(pipe.vae_scale_factor(), 8);
    assert_eq!(pipe.noise_shape(), vec![1, 4, 8, 8]);
}

#[test]
fn default_size_is_unet_sample_size_times_vae_factor() {
    let pipe = load(&CallArgs::default());
    // sample_size 8 × factor 8 = 64 px → 8×8 latents.
    assert_eq!(pipe.noise_shape(), vec![1, 4, 8, 8]);
}

fn assert_pipeline_image(scheduler: Option<&str>, name: &str) {
    let mut pipe = load(&call_args(Some(NEGATIVE)));
    if let Some(file) = scheduler {
        pipe.set_scheduler(scheduler_from_file(&ref_dir().join(file)).unwrap());
    }
    pipe.set_prompt(PROMPT).unwrap();
    let latents = &reference()[&format!("latents_{name}_0")];
    let images = pipe.generate(&[noise_of(latents)]).unwrap();
    assert_eq!(images.len(), 1);
    let diff = max_pixel_diff(&images[0], &format!("image_{name}_0.png"));
    assert!(diff <= 2, "{name}: max pixel diff {diff}/255");
}

#[test]
fn pndm_pipeline_image_matches_diffusers_within_2_of_255() {
    assert_pipeline_image(None, "pndm");
}

#[test]
fn ddim_pipeline_image_matches_diffusers_within_2_of_255() {
    assert_pipeline_image(Some("scheduler_ddim.json"), "ddim");
}

#[test]
fn euler_pipeline_image_matches_diffusers_within_2_of_255() {
    assert_pipeline_image(Some("scheduler_euler.json"), "euler");
}

#[test]
fn batched_candidates_match_diffusers_batched_call_in_order() {
    // diffusers: pipe([prompt] * 2, latents=stacked) with no negative prompt.
    let mut pipe = load(&call_args(None));
    pipe.set_prompt(PROMPT).unwrap();
    let r = reference();
    let noises = [
        noise_of(&r["latents_batch_0"]),
        noise_of(&r["latents_batch_1"]),
    ];
    let images = pipe.generate(&noises).unwrap();
    assert_eq!(images.len(), 2);
    for (i, image) in images.iter().enumerate() {
        let diff = max_pixel_diff(image, &format!("image_batch_{i}.png"));
        assert!(diff <= 2, "batch image {i}: max pixel diff {diff}/255");
    }
}

#[test]
fn generate_before_set_prompt_is_an_error() {
    let mut pipe = load(&call_args(None));
    let noise = noise_of(&reference()["latents_pndm_0"]);
    assert!(matches!(
        pipe.generate(&[noise]),
        Err(PipelineError::InvalidArgument(_))
    ));
}

#[test]
fn noise_of_the_wrong_shape_is_invalid_argument() {
    let mut pipe = load(&call_args(None));
    pipe.set_prompt(PROMPT).unwrap();
    let noise = Noise {
        shape: vec![1, 4, 4, 4],
        data: vec![0.0; 64],
    };
    let err = pipe.generate(&[noise]).unwrap_err();
    assert!(matches!(err, PipelineError::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("[1, 4, 8, 8]"), "{err}");
}

fn runs_in(dtype: Dtype) {
    let args = CallArgs {
        num_inference_steps: Some(2),
        ..call_args(Some(NEGATIVE))
    };
    let mut pipe = load_with(dtype, &args).unwrap();
    pipe.set_prompt(PROMPT).unwrap();
    let noise = noise_of(&reference()["latents_pndm_0"]);
    let images = pipe.generate(&[noise.clone(), noise]).unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0].dimensions(), (64, 64));
}

#[test]
fn fp16_pipeline_runs_with_variant_and_converted_weights() {
    runs_in(Dtype::F16);
}

#[test]
fn bf16_on_the_cpu_is_unsupported_with_a_clear_message() {
    // candle has no CPU bf16 matmul; bf16 runs on CUDA only.
    let err = load_with(Dtype::Bf16, &call_args(None)).err().unwrap();
    assert!(matches!(err, PipelineError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("bf16"), "{err}");
}

#[test]
fn vae_decode_of_a_batch_equals_decoding_each_row() {
    let pipe = load(&call_args(None));
    let r = reference();
    let z = &r["vae_latents"];
    let pair = Tensor::cat(&[z, &(z * 0.5).unwrap()], 0).unwrap();
    let both = pipe.vae_decode(&pair).unwrap();
    let second = pipe.vae_decode(&(z * 0.5).unwrap()).unwrap();
    assert_eq!(max_abs_diff(&both.narrow(0, 1, 1).unwrap(), &second), 0.0);
    assert!(max_abs_diff(&both.narrow(0, 0, 1).unwrap(), &r["vae_out"]) < 1e-4);
}

#[test]
fn torch_randn_noise_reproduces_the_latents_diffusers_drew() {
    // diffusers drew torch.randn((1, 4, 8, 8), generator=manual_seed(42)) on an AVX2 machine.
    let noise = torch_randn(42, &[1, 4, 8, 8], RandnKernel::Vectorized);
    let drawn = noise_of(&reference()["latents_pndm_0"]);
    assert_eq!(noise, drawn);
}

#[test]
fn seeded_pipeline_image_matches_diffusers_generator_run() {
    let mut pipe = load(&call_args(Some(NEGATIVE)));
    pipe.set_prompt(PROMPT).unwrap();
    let noise = torch_randn(42, &pipe.noise_shape(), RandnKernel::Vectorized);
    let images = pipe.generate(&[noise]).unwrap();
    let diff = max_pixel_diff(&images[0], "image_pndm_0.png");
    assert!(diff <= 2, "max pixel diff {diff}/255");
}

#[test]
fn fp16_prefers_the_variant_file_and_falls_back_to_plain_files() {
    let source = ModelSource::Local(model_dir());
    let vae = source.weights("vae", Dtype::F16).unwrap();
    assert!(vae[0].ends_with("vae/diffusion_pytorch_model.fp16.safetensors"));
    let text = source.weights("text_encoder", Dtype::F16).unwrap();
    assert!(text[0].ends_with("text_encoder/model.fp16.safetensors"));
    // The tiny UNet has no fp16 variant: the fp32 file is used and converted.
    let unet = source.weights("unet", Dtype::F16).unwrap();
    assert!(unet[0].ends_with("unet/diffusion_pytorch_model.safetensors"));
}

#[test]
fn fp32_uses_the_plain_files_even_when_a_variant_exists() {
    let source = ModelSource::Local(model_dir());
    let vae = source.weights("vae", Dtype::F32).unwrap();
    assert!(vae[0].ends_with("vae/diffusion_pytorch_model.safetensors"));
}

#[test]
fn unet_config_our_unet_cannot_run_is_unsupported_naming_the_key() {
    let dir = model_copy();
    let path = dir.path().join("unet/config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["upcast_attention"] = serde_json::Value::Bool(true);
    std::fs::write(&path, json.to_string()).unwrap();
    let source = ModelSource::Local(dir.path().to_path_buf());
    let err = Sd15Pipeline::load(&source, Dtype::F32, &Device::Cpu, &call_args(None))
        .err()
        .unwrap();
    assert!(matches!(err, PipelineError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("upcast_attention"), "{err}");
}

#[test]
fn unet_group_count_comes_from_the_config() {
    // candle-transformers' UNet forced 32 groups; ours reads norm_num_groups (the fixture has 4),
    // and a count that does not divide the channels is a config error naming the key.
    let dir = model_copy();
    let path = dir.path().join("unet/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(json["norm_num_groups"], 4);
    json["norm_num_groups"] = serde_json::json!(8);
    std::fs::write(&path, json.to_string()).unwrap();
    let source = ModelSource::Local(dir.path().to_path_buf());
    assert!(Sd15Pipeline::load(&source, Dtype::F32, &Device::Cpu, &call_args(None)).is_ok());
    json["norm_num_groups"] = serde_json::json!(5);
    std::fs::write(&path, json.to_string()).unwrap();
    let err = Sd15Pipeline::load(&source, Dtype::F32, &Device::Cpu, &call_args(None))
        .err()
        .unwrap();
    assert!(err.to_string().contains("norm_num_groups"), "{err}");
}

#[test]
fn missing_unet_config_names_the_file() {
    let dir = model_copy();
    std::fs::remove_file(dir.path().join("unet/config.json")).unwrap();
    let source = ModelSource::resolve(dir.path().to_str().unwrap()).unwrap();
    let err = Sd15Pipeline::load(&source, Dtype::F32, &Device::Cpu, &call_args(None))
        .err()
        .unwrap();
    assert!(matches!(err, PipelineError::ModelFile { .. }), "{err}");
    assert!(err.to_string().contains("unet/config.json"), "{err}");
}

#[test]
fn height_not_a_multiple_of_the_vae_factor_is_invalid_argument() {
    let args = CallArgs {
        height: Some(60),
        ..call_args(None)
    };
    let err = load_with(Dtype::F32, &args).err().unwrap();
    assert!(matches!(err, PipelineError::InvalidArgument(_)), "{err}");
    assert!(
        err.to_string().contains("pipeline_call_args.height"),
        "{err}"
    );
}

#[test]
fn width_not_a_multiple_of_the_vae_factor_is_invalid_argument() {
    let args = CallArgs {
        width: Some(65),
        ..call_args(None)
    };
    let err = load_with(Dtype::F32, &args).err().unwrap();
    assert!(
        err.to_string().contains("pipeline_call_args.width"),
        "{err}"
    );
}

#[test]
fn unsupported_scheduler_is_named() {
    let dir = model_copy();
    let path = dir.path().join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("PNDMScheduler", "MadeUpScheduler")).unwrap();
    let source = ModelSource::Local(dir.path().to_path_buf());
    let err = Sd15Pipeline::load(&source, Dtype::F32, &Device::Cpu, &call_args(None))
        .err()
        .unwrap();
    assert!(err.to_string().contains("MadeUpScheduler"), "{err}");
}

#[test]
fn resolve_treats_an_existing_folder_as_local_and_owner_name_as_hub() {
    assert!(matches!(
        ModelSource::resolve(model_dir().to_str().unwrap()).unwrap(),
        ModelSource::Local(_)
    ));
    assert!(matches!(
        ModelSource::resolve("stable-diffusion-v1-5/stable-diffusion-v1-5").unwrap(),
        ModelSource::Hub { .. }
    ));
}
