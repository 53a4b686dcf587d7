//! A rough estimate of the denoising time of one image on the CPU, for the warning `tt-scale run`
//! prints before it loads Flux, SDXL or PixArt onto a CPU: the denoiser's arithmetic per step at
//! the configured size (from the model's size; the text encoders and the VAE are left out, so it
//! is a lower bound) over the matrix-product throughput measured on this machine.

use crate::config::{known_model_short_name, Config};

/// The estimate for one image.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuEstimate {
    /// Seconds of denoising per image.
    pub seconds_per_image: f64,
    /// Denoising steps.
    pub steps: usize,
    /// Denoiser evaluations per step (2 with classifier-free guidance).
    pub evals_per_step: usize,
    /// Image height and width, pixels.
    pub size: (usize, usize),
}

/// The architecture facts of a known model the estimate needs.
struct Arch {
    /// Default steps and size of the pipeline.
    steps: usize,
    size: usize,
    /// Whether guidance is classifier-free (two evaluations a step) rather than distilled.
    cfg: bool,
    /// FLOPs of one evaluation at `h` x `w` pixels with `text` text tokens.
    flops: fn(h: usize, w: usize, text: usize) -> f64,
}

/// FLOPs of a DiT-style transformer of `params` parameters over `tokens` tokens, with `layers`
/// attention layers of width `hidden` over `attended` tokens.
fn transformer_flops(params: f64, tokens: f64, layers: f64, hidden: f64, attended: f64) -> f64 {
    2.0 * params * tokens + 4.0 * layers * hidden * tokens * attended
}

fn arch(model: &str) -> Option<Arch> {
    Some(match known_model_short_name(model)? {
        // FLUX.1: 11.9 B parameters, 19 + 38 blocks of width 3072 over image and text tokens.
        short @ ("flux.1-dev" | "flux.1-schnell") => Arch {
            steps: if short == "flux.1-dev" { 28 } else { 4 },
            size: 1024,
            cfg: false,
            flops: |h, w, text| {
                let tokens = (h / 16 * (w / 16) + text) as f64;
                transformer_flops(11.9e9, tokens, 57.0, 3072.0, tokens)
            },
        },
        // PixArt-Sigma XL/2: 0.61 B parameters, 28 blocks of width 1152; the image tokens attend
        // to themselves and to the text.
        "pixart-sigma-1024-ms" => Arch {
            steps: 20,
            size: 1024,
            cfg: true,
            flops: |h, w, text| {
                let tokens = (h / 16 * (w / 16)) as f64;
                transformer_flops(0.61e9, tokens, 28.0, 1152.0, tokens + text as f64)
            },
        },
        // UNets: about 6 TFLOPs an evaluation for SDXL at 1024², 0.8 for SD 1.5 at 512²,
        // scaling with the pixel count.
        "sdxl-base" => Arch {
            steps: 50,
            size: 1024,
            cfg: true,
            flops: |h, w, _| 6.0e12 * (h * w) as f64 / (1024.0 * 1024.0),
        },
        "sd-v1.5" => Arch {
            steps: 50,
            size: 512,
            cfg: true,
            flops: |h, w, _| 0.8e12 * (h * w) as f64 / (512.0 * 512.0),
        },
        _ => return None,
    })
}

/// The denoising time of one image of `config` at `gflops` (the measured matrix-product
/// throughput, GFLOP/s); `None` for a model whose size is not known (a local folder, a repo
/// other than the shipped configs').
pub fn cpu_estimate(config: &Config, gflops: f64) -> Option<CpuEstimate> {
    let arch = arch(&config.model)?;
    let args = &config.pipeline_call_args;
    let h = args.height.unwrap_or(arch.size);
    let w = args.width.unwrap_or(arch.size);
    let steps = args.num_inference_steps.unwrap_or(arch.steps);
    let cfg = arch.cfg && args.guidance_scale.is_none_or(|g| g > 1.0);
    let evals_per_step = if cfg { 2 } else { 1 };
    let text = args.max_sequence_length.unwrap_or(512);
    let flops = (arch.flops)(h, w, text) * (steps * evals_per_step) as f64;
    Some(CpuEstimate {
        seconds_per_image: flops / (gflops.max(1e-3) * 1e9),
        steps,
        evals_per_step,
        size: (h, w),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(model: &str, extra: &str) -> Config {
        let text = format!(
            r#"{{"pretrained_model_name_or_path": "{model}", "torch_dtype": "fp32",
                "pipeline_call_args": {{{extra}}},
                "verifier_args": {{"name": "gemini", "choice_of_metric": "overall_score"}},
                "search_args": {{"search_method": "random", "search_rounds": 1}}}}"#
        );
        Config::parse(&text, std::path::Path::new("c.json")).unwrap()
    }

    #[test]
    fn flux_at_1024_is_hours_on_a_cpu_and_sd15_minutes() {
        // 100 GFLOP/s, about what 2 cores give in float32.
        let flux = cpu_estimate(
            &config(
                "black-forest-labs/FLUX.1-dev",
                r#""num_inference_steps": 50"#,
            ),
            100.0,
        )
        .unwrap();
        assert_eq!(
            (flux.steps, flux.evals_per_step, flux.size),
            (50, 1, (1024, 1024))
        );
        // 2 · 11.9e9 · 4608 + attention ≈ 1.25e14 FLOPs a step.
        let per_step = flux.seconds_per_image / 50.0;
        assert!((1000.0..1400.0).contains(&per_step), "{per_step}");
        let sd = cpu_estimate(
            &config("stable-diffusion-v1-5/stable-diffusion-v1-5", ""),
            100.0,
        )
        .unwrap();
        assert_eq!((sd.steps, sd.evals_per_step, sd.size), (50, 2, (512, 512)));
        assert!((700.0..900.0).contains(&sd.seconds_per_image));
        // Half the pixels, half the UNet's work; guidance 1 means one evaluation.
        let small = cpu_estimate(
            &config(
                "stabilityai/stable-diffusion-xl-base-1.0",
                r#""height": 512, "width": 1024, "guidance_scale": 1.0"#,
            ),
            100.0,
        )
        .unwrap();
        assert_eq!(small.evals_per_step, 1);
        assert!((small.seconds_per_image - 50.0 * 3e12 / 1e11).abs() < 1.0);
    }

    #[test]
    fn a_model_of_unknown_size_has_no_estimate() {
        assert_eq!(cpu_estimate(&config("someone/some-model", ""), 100.0), None);
    }
}
