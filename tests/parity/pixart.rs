//! PixArt-Sigma parity with transformers/diffusers on the tiny random-weight model
//! (tests/fixtures/tiny-pixart, references from tools/reference/make_pixart_fixtures.py):
//! T5 tokenizer ids, T5 states with the attention mask, one transformer forward, every
//! DPMSolverMultistep step of several configs, and full pipeline images.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use tt_scale::loading::Dtype;
use tt_scale::loading::ModelSource;
use tt_scale::models::pixart::{PixArtConfig, PixArtTransformer};
use tt_scale::models::t5::{T5Config, T5Encoder, T5Tokenizer};
use tt_scale::noise::{torch_randn, RandnKernel};
use tt_scale::pipelines::pixart::PixArtPipeline;
use tt_scale::pipelines::CallArgs;
use tt_scale::pipelines::ImagePipeline;
use tt_scale::schedulers::SchedulerConfig;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-pixart")
}

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pixart")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(reference_dir().join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

fn read_json(path: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Largest |a - b| relative to the largest |b|.
fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f32> = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn vb(component: &str) -> candle_nn::VarBuilder<'static> {
    let dir = model_dir().join(component);
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[file], DType::F32, &Device::Cpu) }
        .unwrap()
}

#[test]
fn t5_tokenizer_from_spiece_matches_transformers() {
    let tok = T5Tokenizer::from_spiece(&model_dir().join("tokenizer/spiece.model")).unwrap();
    let cases = read_json(reference_dir().join("tokens.json"));
    for case in cases.as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let (ids, mask) = tok.encode(prompt, 300).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let want_mask: Vec<u32> = serde_json::from_value(case["mask"].clone()).unwrap();
        assert_eq!(ids, want, "ids of {prompt:?}");
        assert_eq!(mask, want_mask, "mask of {prompt:?}");
    }
}

#[test]
fn t5_encoder_with_mask_matches_transformers() {
    let r = reference();
    let config: T5Config =
        serde_json::from_value(read_json(model_dir().join("text_encoder/config.json"))).unwrap();
    let t5 = T5Encoder::new(vb("text_encoder"), &config).unwrap();
    let ids = r["t5.input_ids"].to_dtype(DType::U32).unwrap();
    let mask = r["t5.mask"].to_dtype(DType::U32).unwrap();
    let states = t5.forward(&ids, &mask).unwrap();
    let d = max_rel_diff(&states, &r["t5.states"]);
    assert!(d < 1e-4, "relative difference {d}");
}

#[test]
fn transformer_forward_matches_diffusers_on_a_non_square_latent_with_caption_mask() {
    let r = reference();
    let config = tt_scale::loading::model_config::<PixArtConfig>(
        &read_json(model_dir().join("transformer/config.json")),
        "transformer/config.json",
    )
    .unwrap();
    let model = PixArtTransformer::new(&config, vb("transformer")).unwrap();
    let t: Vec<i64> = r["tr.t"].to_vec1().unwrap();
    let t: Vec<f64> = t.into_iter().map(|v| v as f64).collect();
    let mask = r["tr.mask"].to_dtype(DType::U32).unwrap();
    let out = model
        .forward(&r["tr.x"], &t, &r["tr.ctx"], Some(&mask))
        .unwrap();
    let d = max_rel_diff(&out, &r["tr.out"]);
    assert!(d < 1e-4, "relative difference {d}");
}

#[test]
fn dpm_solver_multistep_matches_diffusers_at_every_step() {
    let r = reference();
    let variants = read_json(reference_dir().join("schedulers.json"));
    for (name, v) in variants.as_object().unwrap() {
        let config = SchedulerConfig::from_json(&v["config"], name).unwrap();
        let steps = v["steps"].as_u64().unwrap() as usize;
        let mut s = config.build(steps).unwrap();
        let want_t: Vec<f64> = v["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(s.timesteps(), want_t.as_slice(), "{name}: timesteps");
        let outs = &r[&format!("sched.{name}.model_outputs")];
        let samples = &r[&format!("sched.{name}.samples")];
        let mut sample = r[&format!("sched.{name}.init")].clone();
        for (i, t) in want_t.iter().enumerate() {
            sample = s.step(&outs.get(i).unwrap(), *t, &sample).unwrap();
            let d = max_rel_diff(&sample, &samples.get(i).unwrap());
            assert!(d < 1e-5, "{name}: step {i} (t={t}) relative difference {d}");
        }
    }
}

#[test]
fn dpm_solver_sigmas_match_diffusers() {
    let variants = read_json(reference_dir().join("schedulers.json"));
    for (name, v) in variants.as_object().unwrap() {
        let config = SchedulerConfig::from_json(&v["config"], name).unwrap();
        let s = tt_scale::schedulers::DpmSolverMultistepScheduler::new(
            &config,
            v["steps"].as_u64().unwrap() as usize,
        )
        .unwrap();
        let want: Vec<f32> = v["sigmas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(s.sigmas().len(), want.len(), "{name}");
        for (a, b) in s.sigmas().iter().zip(&want) {
            // torch's vectorized division/power may differ from ours in the last bit.
            assert!((a - b).abs() <= b.abs() * 4e-7, "{name}: sigma {a} vs {b}");
        }
    }
}

#[test]
fn sde_variants_are_unsupported_by_name() {
    let cfg = serde_json::json!({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"});
    let err = SchedulerConfig::from_json(&cfg, "x").unwrap_err();
    assert!(err.to_string().contains("algorithm_type"), "{err}");
}

#[test]
fn full_pipeline_images_match_diffusers_within_2_of_255() {
    let runs = read_json(reference_dir().join("pipeline.json"));
    let source = ModelSource::resolve(model_dir().to_str().unwrap()).unwrap();
    for run in runs.as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let args = CallArgs {
            height: Some(run["height"].as_u64().unwrap() as usize),
            width: Some(run["width"].as_u64().unwrap() as usize),
            num_inference_steps: Some(run["steps"].as_u64().unwrap() as usize),
            guidance_scale: Some(run["guidance_scale"].as_f64().unwrap()),
            negative_prompt: Some(run["negative_prompt"].as_str().unwrap().to_string()),
            max_sequence_length: None,
            clean_caption: None,
        };
        let mut pipe = PixArtPipeline::load(&source, Dtype::F32, &Device::Cpu, &args).unwrap();
        pipe.set_prompt(run["prompt"].as_str().unwrap()).unwrap();
        let noise = torch_randn(
            run["seed"].as_u64().unwrap(),
            &pipe.noise_shape(),
            RandnKernel::Vectorized,
        );
        let image = pipe.generate(&[noise]).unwrap().remove(0);
        let want = image::open(reference_dir().join(format!("image_{name}.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!(image.dimensions(), want.dimensions(), "{name}");
        let worst = image
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(worst <= 2, "{name}: max pixel difference {worst}/255");
    }
}

#[test]
fn low_vram_frees_and_rereads_t5_with_the_same_images() {
    let runs = read_json(reference_dir().join("pipeline.json"));
    let source = ModelSource::resolve(model_dir().to_str().unwrap()).unwrap();
    let run = &runs.as_array().unwrap()[0];
    let args = CallArgs {
        height: Some(run["height"].as_u64().unwrap() as usize),
        width: Some(run["width"].as_u64().unwrap() as usize),
        num_inference_steps: Some(run["steps"].as_u64().unwrap() as usize),
        guidance_scale: Some(run["guidance_scale"].as_f64().unwrap()),
        negative_prompt: Some(run["negative_prompt"].as_str().unwrap().to_string()),
        max_sequence_length: None,
        clean_caption: None,
    };
    let mut plain = PixArtPipeline::load(&source, Dtype::F32, &Device::Cpu, &args).unwrap();
    let mut low = PixArtPipeline::load(&source, Dtype::F32, &Device::Cpu, &args).unwrap();
    low.set_low_vram(true);
    let noise = torch_randn(7, &plain.noise_shape(), RandnKernel::Vectorized);
    // Two prompts in a row: the second one needs the text encoder read again.
    for prompt in ["a red fox", run["prompt"].as_str().unwrap()] {
        plain.set_prompt(prompt).unwrap();
        low.set_prompt(prompt).unwrap();
        assert!(
            low.encode_prompt(prompt).is_err(),
            "the text encoder is freed after set_prompt"
        );
        let a = plain.generate(std::slice::from_ref(&noise)).unwrap();
        let b = low.generate(std::slice::from_ref(&noise)).unwrap();
        assert_eq!(a, b, "{prompt}");
    }
}
