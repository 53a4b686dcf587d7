//! Noise levels of a schedule and the operations that move a sample between them without the
//! scheduler's own update rule: the forward (noising) transition, the clean-sample prediction,
//! and the stochastic DDIM-eta step. Search over paths and particle search are built on these.
//!
//! Every scheduler writes a sample at a level as `x = alpha · x0 + sigma · eps` in its own latent
//! scale: variance-preserving (DDIM, PNDM, DPM-Solver: `alpha = sqrt(alphas_cumprod)`,
//! `sigma = sqrt(1 - alphas_cumprod)`), variance-exploding (Euler: `alpha = 1`, `sigma` the
//! k-diffusion sigma, latents scaled by `init_noise_sigma`), or the rectified flow (Flux:
//! `alpha = 1 - t`, `sigma = t`). The formulas below hold for all three.

use candle_core::{DType, Tensor};

use super::PredictionType;

/// One point of a denoising schedule: where a step starts (or where the last one ends).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoiseLevel {
    /// The model timestep a step from this level evaluates the denoiser at (0 at the final
    /// level, where nothing is evaluated).
    pub timestep: f64,
    /// Scale of the clean signal in a sample at this level.
    pub alpha: f64,
    /// Scale of the noise in a sample at this level.
    pub sigma: f64,
    /// Where the level lies in the model's noise schedule, 1 = pure noise, 0 = clean: the flow
    /// time `t` for flow models, `timestep / num_train_timesteps` for the diffusion UNets. The
    /// search parameters (`search_start_sigma`, `delta_f`, `delta_b`) are in this unit.
    pub fraction: f64,
}

/// What the denoiser's output is, for turning it into a clean-sample prediction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parameterization {
    /// The added noise (`epsilon`).
    Epsilon,
    /// The velocity `alpha · eps - sigma · x0` of the variance-preserving form
    /// (`v_prediction`).
    VPrediction,
    /// The clean sample itself (`sample`).
    Sample,
    /// The rectified flow's velocity `eps - x0` (Flux).
    FlowVelocity,
}

impl From<PredictionType> for Parameterization {
    fn from(p: PredictionType) -> Self {
        match p {
            PredictionType::Epsilon => Parameterization::Epsilon,
            PredictionType::VPrediction => Parameterization::VPrediction,
            PredictionType::Sample => Parameterization::Sample,
        }
    }
}

fn work(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.dtype() == DType::F64 {
        Ok(t.clone())
    } else {
        t.to_dtype(DType::F32)
    }
}

/// The denoiser's prediction of the clean sample `x0` from its `output` for `sample` at
/// `level`, computed in float32 (float64 stays float64) and returned in `sample`'s dtype.
pub fn predicted_x0(
    parameterization: Parameterization,
    output: &Tensor,
    sample: &Tensor,
    level: &NoiseLevel,
) -> candle_core::Result<Tensor> {
    let (x, out) = (work(sample)?, work(output)?);
    let (a, s) = (level.alpha, level.sigma);
    let x0 = match parameterization {
        Parameterization::Epsilon => ((x - out.affine(s, 0.0)?)? / a)?,
        Parameterization::Sample => out,
        Parameterization::VPrediction => {
            // In the variance-preserving scale c·x (c = 1 / sqrt(a² + s²)): x0 = c a · c x - c s · v.
            let c2 = 1.0 / (a * a + s * s);
            (x.affine(c2 * a, 0.0)? - out.affine(c2.sqrt() * s, 0.0)?)?
        }
        Parameterization::FlowVelocity => (x - out.affine(s, 0.0)?)?,
    };
    x0.to_dtype(sample.dtype())
}

/// The forward process from level `from` to the noisier level `to`:
/// `x_to = (alpha_to / alpha_from) · x + sqrt(sigma_to² - (alpha_to / alpha_from)² · sigma_from²) · noise`,
/// which turns a sample of `alpha_from · x0 + sigma_from · eps` into one of
/// `alpha_to · x0 + sigma_to · eps'` (diffusers' `add_noise` does this from `x0`; for the flow it
/// is the interpolation `(1 - t) x0 + t eps`). `noise` is standard normal, shaped like `sample`.
pub fn renoise(
    sample: &Tensor,
    from: &NoiseLevel,
    to: &NoiseLevel,
    noise: &Tensor,
) -> candle_core::Result<Tensor> {
    if from.alpha <= 0.0 {
        candle_core::bail!("cannot re-noise from a level without signal (alpha = 0)");
    }
    let ratio = to.alpha / from.alpha;
    let var = to.sigma * to.sigma - ratio * ratio * from.sigma * from.sigma;
    if var < -1e-9 {
        candle_core::bail!(
            "cannot re-noise from noise level {} to the less noisy level {}",
            from.fraction,
            to.fraction
        );
    }
    let x = (work(sample)?.affine(ratio, 0.0)? + work(noise)?.affine(var.max(0.0).sqrt(), 0.0)?)?;
    x.to_dtype(sample.dtype())
}

/// One stochastic DDIM step (Song et al., eq. 12, in the `alpha`/`sigma` form of any of the
/// schedules) from `sample` at level `from` to the less noisy level `to`, given the
/// denoiser's clean-sample prediction `x0` and standard normal `noise`:
/// `x_to = alpha_to · x0 + sqrt(sigma_to² - c²) · eps_hat + c · noise` with
/// `eps_hat = (x - alpha_from · x0) / sigma_from` and
/// `c = eta · sigma_to · sqrt(1 - (alpha_from · sigma_to / (alpha_to · sigma_from))²)`.
/// `eta = 1` samples the DDPM posterior (ancestral sampling; Euler ancestral for the
/// variance-exploding form), `eta = 0` is deterministic DDIM.
pub fn ddim_step(
    sample: &Tensor,
    x0: &Tensor,
    from: &NoiseLevel,
    to: &NoiseLevel,
    eta: f64,
    noise: &Tensor,
) -> candle_core::Result<Tensor> {
    if from.sigma <= 0.0 || to.alpha <= 0.0 {
        candle_core::bail!("a DDIM step needs a noisy start and a destination with signal");
    }
    let r = from.alpha * to.sigma / (to.alpha * from.sigma);
    let c = eta * to.sigma * (1.0 - r * r).max(0.0).sqrt();
    let direction = (to.sigma * to.sigma - c * c).max(0.0).sqrt();
    let (x, x0w) = (work(sample)?, work(x0)?);
    let eps = ((x - x0w.affine(from.alpha, 0.0)?)? / from.sigma)?;
    let next = ((x0w.affine(to.alpha, 0.0)? + eps.affine(direction, 0.0)?)?
        + work(noise)?.affine(c, 0.0)?)?;
    next.to_dtype(sample.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn level(alpha: f64, sigma: f64) -> NoiseLevel {
        NoiseLevel {
            timestep: 0.0,
            alpha,
            sigma,
            fraction: 0.0,
        }
    }

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn v(t: &Tensor) -> Vec<f64> {
        t.to_vec1().unwrap()
    }

    #[test]
    fn renoise_is_the_forward_transition_of_each_form() {
        let x = t(&[0.5, -1.0]);
        let e = t(&[1.0, 2.0]);
        // VP: sqrt(ab/aa) x + sqrt(1 - ab/aa) e.
        let (aa, ab) = (0.8f64, 0.3f64);
        let out = v(&renoise(
            &x,
            &level(aa.sqrt(), (1.0 - aa).sqrt()),
            &level(ab.sqrt(), (1.0 - ab).sqrt()),
            &e,
        )
        .unwrap());
        let k = (ab / aa).sqrt();
        let s = (1.0 - ab / aa).sqrt();
        assert!((out[0] - (k * 0.5 + s)).abs() < 1e-12);
        // VE: x + sqrt(sb² - sa²) e.
        let out = v(&renoise(&x, &level(1.0, 2.0), &level(1.0, 3.0), &e).unwrap());
        assert!((out[1] - (-1.0 + 5f64.sqrt() * 2.0)).abs() < 1e-12);
        // Flow: ((1 - tb)/(1 - ta)) x + sqrt(tb² - (ta (1 - tb)/(1 - ta))²) e.
        let (ta, tb) = (0.11f64, 0.89f64);
        let out = v(&renoise(&x, &level(1.0 - ta, ta), &level(1.0 - tb, tb), &e).unwrap());
        let k = (1.0 - tb) / (1.0 - ta);
        let s = (tb * tb - (ta * k) * (ta * k)).sqrt();
        assert!((out[0] - (k * 0.5 + s)).abs() < 1e-12);
        // Towards less noise is refused.
        assert!(renoise(&x, &level(1.0 - tb, tb), &level(1.0 - ta, ta), &e).is_err());
    }

    #[test]
    fn renoise_of_a_noised_clean_sample_has_the_target_marginal_coefficients() {
        // x_a = a_a x0 + s_a e1; x_b = k x_a + s e2 = a_b x0 + k s_a e1 + s e2 with
        // (k s_a)² + s² = s_b²: the noise has the target level's variance.
        let (from, to) = (level(0.9, 0.3), level(0.5, 0.7));
        let k = to.alpha / from.alpha;
        let s = (to.sigma * to.sigma - k * k * from.sigma * from.sigma).sqrt();
        assert!(((k * from.sigma).powi(2) + s * s - to.sigma * to.sigma).abs() < 1e-12);
        // x0 = 1, e1 = 0.25.
        let xa = t(&[0.9 + 0.3 * 0.25]);
        let e2 = t(&[-0.5]);
        let xb = v(&renoise(&xa, &from, &to, &e2).unwrap())[0];
        assert!((xb - (0.5 * 1.0 + k * 0.3 * 0.25 + s * -0.5)).abs() < 1e-12);
    }

    #[test]
    fn x0_predictions_invert_each_parameterization() {
        let (x0, e) = (0.7f64, -1.3f64);
        // VP level.
        let l = level(0.6, 0.8);
        let x = t(&[l.alpha * x0 + l.sigma * e]);
        let eps = predicted_x0(Parameterization::Epsilon, &t(&[e]), &x, &l).unwrap();
        assert!((v(&eps)[0] - x0).abs() < 1e-12);
        let vel = l.alpha * e - l.sigma * x0;
        let vp = predicted_x0(Parameterization::VPrediction, &t(&[vel]), &x, &l).unwrap();
        assert!((v(&vp)[0] - x0).abs() < 1e-12);
        // v-prediction in Euler's variance-exploding scale: x_ve = x_vp / a_vp.
        let sigma_ve = l.sigma / l.alpha;
        let xve = t(&[x0 + sigma_ve * e]);
        let ve = predicted_x0(
            Parameterization::VPrediction,
            &t(&[vel]),
            &xve,
            &level(1.0, sigma_ve),
        )
        .unwrap();
        assert!((v(&ve)[0] - x0).abs() < 1e-12);
        // Flow: v = eps - x0.
        let f = level(0.25, 0.75);
        let xf = t(&[0.25 * x0 + 0.75 * e]);
        let fl = predicted_x0(Parameterization::FlowVelocity, &t(&[e - x0]), &xf, &f).unwrap();
        assert!((v(&fl)[0] - x0).abs() < 1e-12);
    }

    #[test]
    fn ddim_step_with_eta_zero_is_deterministic_ddim_and_eta_one_is_the_ddpm_posterior() {
        let (from, to) = (level(0.6, 0.8), level(0.8, 0.6));
        let (x0, e) = (0.7f64, -1.3f64);
        let x = t(&[from.alpha * x0 + from.sigma * e]);
        let z = t(&[2.0]);
        // eta = 0: alpha_to x0 + sigma_to eps, whatever the noise.
        let d = v(&ddim_step(&x, &t(&[x0]), &from, &to, 0.0, &z).unwrap())[0];
        assert!((d - (0.8 * x0 + 0.6 * e)).abs() < 1e-12);
        // eta = 1: the posterior variance sigma_to² (1 - (a_f s_t / (a_t s_f))²).
        let r: f64 = 0.6 * 0.6 / (0.8 * 0.8);
        let c = 0.6 * (1.0 - r * r).sqrt();
        let want = 0.8 * x0 + (0.36 - c * c).sqrt() * e + c * 2.0;
        let s = v(&ddim_step(&x, &t(&[x0]), &from, &to, 1.0, &z).unwrap())[0];
        assert!((s - want).abs() < 1e-12);
        // From pure noise (alpha 0, the flow at t = 1) the step keeps no noise direction.
        let start = level(0.0, 1.0);
        let y = v(&ddim_step(&t(&[e]), &t(&[x0]), &start, &to, 1.0, &z).unwrap())[0];
        assert!((y - (0.8 * x0 + 0.6 * 2.0)).abs() < 1e-12);
    }
}
