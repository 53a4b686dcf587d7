//! The same computations on CUDA as on the CPU: torch_randn noise uploaded to the GPU, the tiny
//! SD 1.5 and Flux models (tests/fixtures/tiny-sd15, tiny-flux) run on `Device::new_cuda(0)`
//! in float32 and bfloat16, compared with diffusers' reference outputs (which the CPU path
//! matches, see sd15_parity.rs and flux_parity.rs) and with our own CPU images.
//!
//! Compiled only with `--features cuda`; needs a GPU to run (`bench/gpu-check.sh` runs it on
//! the GPU machine). Tolerances:
//! - noise: bit-exact on the GPU, also after rounding to bf16 there;
//! - float32 (cuBLAS without TF32): network outputs within 1e-3 × max(1, |reference|max) of
//!   diffusers, images within 2/255 of diffusers and of our CPU images;
//! - bfloat16: network outputs within 5e-2 × max(1, |reference|max) of diffusers' float32
//!   output; SD 1.5 images within a mean of 6/255 of our float32 CPU images; Flux images within
//!   8/255 of diffusers' bf16 images (the CPU path, which decodes in float32, is held to 4/255).
//!
//! Fixtures are read from `$TT_SCALE_REPO/tests/fixtures`, else `./tests/fixtures` when the
//! working directory is a checkout, else the checkout this binary was built from.
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use tt_scale::loading::Dtype;
use tt_scale::loading::ModelSource;
use tt_scale::noise::{torch_randn, Noise, RandnKernel};
use tt_scale::pipelines::flux::FluxPipeline;
use tt_scale::pipelines::sd15::Sd15Pipeline;
use tt_scale::pipelines::CallArgs;
use tt_scale::pipelines::ImagePipeline;

const SD15_PROMPT: &str = "a photo of a cat sitting on a red chair, highly detailed";
const SD15_NEGATIVE: &str = "blurry, low quality";

fn fixtures() -> PathBuf {
    if let Some(root) = std::env::var_os("TT_SCALE_REPO") {
        return PathBuf::from(root).join("tests/fixtures");
    }
    let here = PathBuf::from("tests/fixtures");
    if here.join("tiny-sd15").is_dir() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cuda() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU (device 0)")
}

fn reference(file: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(file), &Device::Cpu).unwrap()
}

/// Largest absolute difference between `ours` (any device, any dtype) and `reference`, and the
/// largest magnitude in `reference`.
fn max_diff(ours: &Tensor, reference: &Tensor) -> (f32, f32) {
    let a = ours
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let b = reference.to_dtype(DType::F32).unwrap();
    assert_eq!(a.dims(), b.dims());
    let d = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let m = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    (d.to_scalar().unwrap(), m.to_scalar().unwrap())
}

/// Largest and mean per-channel difference between two images, in 1/255 steps.
fn pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let diffs: Vec<u8> = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .collect();
    let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
    (diffs.into_iter().max().unwrap(), mean)
}

fn png(path: PathBuf) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

fn noise_of(t: &Tensor) -> Noise {
    Noise {
        shape: t.dims().to_vec(),
        data: t.flatten_all().unwrap().to_vec1().unwrap(),
    }
}

#[test]
fn torch_randn_noise_is_bit_exact_on_the_gpu_in_f32_and_after_bf16_rounding() {
    let dev = cuda();
    let noise = torch_randn(42, &[2, 16, 64, 64], RandnKernel::Vectorized);
    let cpu = Tensor::from_vec(noise.data.clone(), noise.shape.as_slice(), &Device::Cpu).unwrap();
    let gpu = cpu.to_device(&dev).unwrap();
    let back: Vec<f32> = gpu.flatten_all().unwrap().to_vec1().unwrap();
    assert!(back
        .iter()
        .zip(&noise.data)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    let bf_gpu: Vec<f32> = gpu
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let bf_cpu: Vec<f32> = cpu
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mismatches = bf_gpu
        .iter()
        .zip(&bf_cpu)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(mismatches, 0, "{mismatches} bf16 values differ");
}

fn sd15_args(steps: usize) -> CallArgs {
    CallArgs {
        height: Some(64),
        width: Some(64),
        num_inference_steps: Some(steps),
        guidance_scale: Some(7.5),
        negative_prompt: Some(SD15_NEGATIVE.to_string()),
        ..Default::default()
    }
}

fn sd15(dtype: Dtype, device: &Device) -> Sd15Pipeline {
    let source = ModelSource::Local(fixtures().join("tiny-sd15"));
    Sd15Pipeline::load(&source, dtype, device, &sd15_args(4)).unwrap()
}

fn sd15_unet_diff(dtype: Dtype) -> (f32, f32) {
    let dev = cuda();
    let pipe = sd15(dtype, &dev);
    let r = reference("sd15/reference.safetensors");
    let t = r["unet_timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let on = |k: &str| {
        r[k].to_device(&dev)
            .unwrap()
            .to_dtype(pipe_dtype(dtype))
            .unwrap()
    };
    let out = pipe
        .unet_forward(&on("unet_sample"), t, &on("unet_context"))
        .unwrap();
    max_diff(&out, &r["unet_out"])
}

fn pipe_dtype(dtype: Dtype) -> DType {
    match dtype {
        Dtype::Bf16 => DType::BF16,
        Dtype::F16 => DType::F16,
        _ => DType::F32,
    }
}

#[test]
fn sd15_unet_on_cuda_f32_matches_diffusers_within_1e_3() {
    let (d, m) = sd15_unet_diff(Dtype::F32);
    eprintln!("sd15 unet f32 on cuda: max abs diff {d} (reference max {m})");
    assert!(d <= 1e-3 * m.max(1.0), "differs by {d}");
}

#[test]
fn sd15_unet_on_cuda_bf16_is_within_5e_2_of_diffusers_f32() {
    let (d, m) = sd15_unet_diff(Dtype::Bf16);
    eprintln!("sd15 unet bf16 on cuda: max abs diff {d} (reference max {m})");
    assert!(d <= 5e-2 * m.max(1.0), "differs by {d}");
}

fn sd15_image(dtype: Dtype, device: &Device) -> image::RgbImage {
    let mut pipe = sd15(dtype, device);
    pipe.set_prompt(SD15_PROMPT).unwrap();
    let noise = noise_of(&reference("sd15/reference.safetensors")["latents_pndm_0"]);
    let mut images = pipe.generate(&[noise]).unwrap();
    assert_eq!(images.len(), 1);
    images.remove(0)
}

#[test]
fn sd15_pipeline_on_cuda_f32_matches_diffusers_and_the_cpu_within_2_of_255() {
    let gpu = sd15_image(Dtype::F32, &cuda());
    let cpu = sd15_image(Dtype::F32, &Device::Cpu);
    let theirs = png(fixtures().join("sd15/image_pndm_0.png"));
    let (d_cpu, _) = pixel_diff(&gpu, &cpu);
    let (d_ref, _) = pixel_diff(&gpu, &theirs);
    eprintln!("sd15 f32 image on cuda: {d_cpu}/255 from the CPU, {d_ref}/255 from diffusers");
    assert!(d_cpu <= 2 && d_ref <= 2, "{d_cpu}/255, {d_ref}/255");
}

#[test]
fn sd15_pipeline_on_cuda_bf16_is_within_a_mean_of_6_of_255_of_the_cpu_f32_image() {
    let gpu = sd15_image(Dtype::Bf16, &cuda());
    let cpu = sd15_image(Dtype::F32, &Device::Cpu);
    let (max, mean) = pixel_diff(&gpu, &cpu);
    eprintln!("sd15 bf16 image on cuda vs f32 on the CPU: max {max}/255, mean {mean:.2}/255");
    assert!(mean <= 6.0, "mean difference {mean}/255");
}

fn flux_args(h: usize, w: usize, steps: usize, guidance: f64, msl: usize) -> CallArgs {
    CallArgs {
        height: Some(h),
        width: Some(w),
        num_inference_steps: Some(steps),
        guidance_scale: Some(guidance),
        max_sequence_length: Some(msl),
        ..Default::default()
    }
}

fn flux(dtype: Dtype, device: &Device) -> FluxPipeline {
    FluxPipeline::load(
        ModelSource::Local(fixtures().join("tiny-flux")),
        dtype,
        device,
        &flux_args(32, 32, 3, 3.5, 16),
        false,
    )
    .unwrap()
}

fn flux_transformer_diff(dtype: Dtype) -> (f32, f32) {
    let dev = cuda();
    let p = flux(dtype, &dev);
    let r = reference("flux/reference.safetensors");
    let on = |k: &str| {
        r[k].to_device(&dev)
            .unwrap()
            .to_dtype(pipe_dtype(dtype))
            .unwrap()
    };
    let t: Vec<f32> = r["tr_timestep"].to_vec1().unwrap();
    let g: Vec<f32> = r["tr_guidance"].to_vec1().unwrap();
    let out = p
        .transformer_forward(
            &on("tr_hidden_states"),
            8,
            8,
            &on("tr_encoder_hidden_states"),
            &on("tr_pooled"),
            &t,
            Some(&g),
        )
        .unwrap();
    max_diff(&out, &r["tr_out"])
}

#[test]
fn flux_transformer_on_cuda_f32_matches_diffusers_within_1e_3() {
    let (d, m) = flux_transformer_diff(Dtype::F32);
    eprintln!("flux transformer f32 on cuda: max abs diff {d} (reference max {m})");
    assert!(d <= 1e-3 * m.max(1.0), "differs by {d}");
}

#[test]
fn flux_transformer_on_cuda_bf16_is_within_5e_2_of_diffusers_f32() {
    let (d, m) = flux_transformer_diff(Dtype::Bf16);
    eprintln!("flux transformer bf16 on cuda: max abs diff {d} (reference max {m})");
    assert!(d <= 5e-2 * m.max(1.0), "differs by {d}");
}

/// The two images of the `fp32`/`bf16` runs of tests/fixtures/flux/pipeline.json (seeds 0
/// and 7, 32×32, 3 steps, guidance 3.5, 16 T5 tokens).
fn flux_images(dtype: Dtype, device: &Device) -> Vec<image::RgbImage> {
    let mut p = flux(dtype, device);
    p.set_prompt(
        "a tiny astronaut hatching from an egg on the moon, highly detailed, cinematic lighting",
    )
    .unwrap();
    let noises: Vec<Noise> = [0u64, 7]
        .iter()
        .map(|&s| torch_randn(s, &p.noise_shape(), RandnKernel::Vectorized))
        .collect();
    p.generate(&noises).unwrap()
}

#[test]
fn flux_pipeline_on_cuda_f32_matches_diffusers_and_the_cpu_within_2_of_255() {
    let gpu = flux_images(Dtype::F32, &cuda());
    let cpu = flux_images(Dtype::F32, &Device::Cpu);
    for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        let theirs = png(fixtures().join(format!("flux/image_fp32_{i}.png")));
        let (d_cpu, _) = pixel_diff(g, c);
        let (d_ref, _) = pixel_diff(g, &theirs);
        eprintln!(
            "flux f32 image {i} on cuda: {d_cpu}/255 from the CPU, {d_ref}/255 from diffusers"
        );
        assert!(
            d_cpu <= 2 && d_ref <= 2,
            "image {i}: {d_cpu}/255, {d_ref}/255"
        );
    }
}

#[test]
fn flux_pipeline_on_cuda_bf16_is_within_8_of_255_of_diffusers_bf16() {
    let gpu = flux_images(Dtype::Bf16, &cuda());
    for (i, g) in gpu.iter().enumerate() {
        let theirs = png(fixtures().join(format!("flux/image_bf16_{i}.png")));
        let (max, mean) = pixel_diff(g, &theirs);
        eprintln!(
            "flux bf16 image {i} on cuda vs diffusers bf16: max {max}/255, mean {mean:.2}/255"
        );
        assert!(max <= 8, "image {i} differs by {max}/255");
    }
}
