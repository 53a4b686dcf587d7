//! A rough estimate of the denoising time of one image on the CPU, for the warning `tt-scale run`
//! prints before it loads Flux, SDXL or PixArt onto a CPU: the denoiser's arithmetic per step at
//! the configured size (from the model's size; the text encoders and the VAE are left out, so it
//! is a lower bound) over the matrix-product throughput measured on this machine.

use super::registry::known_repo;
use super::CallArgs;

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

/// FLOPs of a DiT-style transformer of `params` parameters over `tokens` tokens, with `layers`
/// attention layers of width `hidden` over `attended` tokens.
pub fn transformer_flops(params: f64, tokens: f64, layers: f64, hidden: f64, attended: f64) -> f64 {
    2.0 * params * tokens + 4.0 * layers * hidden * tokens * attended
}

/// The denoising time of one image of `model` with call arguments `args` at `gflops` (the
/// measured matrix-product throughput, GFLOP/s), from its family's cost model
/// ([`super::registry::Cost`]); `None` for a model whose size is not known (a local folder, a
/// repo the original tool does not know).
pub fn cpu_estimate(model: &str, args: &CallArgs, gflops: f64) -> Option<CpuEstimate> {
    let (family, repo) = known_repo(model)?;
    let h = args.height.unwrap_or(family.defaults.size);
    let w = args.width.unwrap_or(family.defaults.size);
    let steps = args.num_inference_steps.unwrap_or(repo.steps);
    let cfg = family.cost.cfg && args.guidance_scale.is_none_or(|g| g > 1.0);
    let evals_per_step = if cfg { 2 } else { 1 };
    let text = args.max_sequence_length.unwrap_or(512);
    let flops = (family.cost.flops)(h, w, text) * (steps * evals_per_step) as f64;
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

    fn estimate(model: &str, args: CallArgs) -> Option<CpuEstimate> {
        // 100 GFLOP/s, about what 2 cores give in float32.
        cpu_estimate(model, &args, 100.0)
    }

    #[test]
    fn flux_at_1024_is_hours_on_a_cpu_and_sd15_minutes() {
        let flux = estimate(
            "black-forest-labs/FLUX.1-dev",
            CallArgs {
                num_inference_steps: Some(50),
                ..CallArgs::default()
            },
        )
        .unwrap();
        assert_eq!(
            (flux.steps, flux.evals_per_step, flux.size),
            (50, 1, (1024, 1024))
        );
        // 2 · 11.9e9 · 4608 + attention ≈ 1.25e14 FLOPs a step.
        let per_step = flux.seconds_per_image / 50.0;
        assert!((1000.0..1400.0).contains(&per_step), "{per_step}");
        let sd = estimate(
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            CallArgs::default(),
        )
        .unwrap();
        assert_eq!((sd.steps, sd.evals_per_step, sd.size), (50, 2, (512, 512)));
        assert!((700.0..900.0).contains(&sd.seconds_per_image));
        // Half the pixels, half the UNet's work; guidance 1 means one evaluation.
        let small = estimate(
            "stabilityai/stable-diffusion-xl-base-1.0",
            CallArgs {
                height: Some(512),
                width: Some(1024),
                guidance_scale: Some(1.0),
                ..CallArgs::default()
            },
        )
        .unwrap();
        assert_eq!(small.evals_per_step, 1);
        assert!((small.seconds_per_image - 50.0 * 3e12 / 1e11).abs() < 1.0);
    }

    #[test]
    fn a_model_of_unknown_size_has_no_estimate() {
        assert_eq!(estimate("someone/some-model", CallArgs::default()), None);
        // schnell's own default step count.
        let schnell = estimate("black-forest-labs/FLUX.1-schnell", CallArgs::default()).unwrap();
        assert_eq!(schnell.steps, 4);
    }
}
