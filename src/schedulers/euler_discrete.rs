//! diffusers' `EulerDiscreteScheduler` (Algorithm 2 of Karras et al. 2022 with `s_churn = 0`,
//! i.e. the deterministic Euler sampler).
//!
//! The schedule is a list of sigmas (noise levels, float32 as in diffusers) with one timestep
//! per step; the scheduler keeps a step index that it sets from the first timestep it is
//! given, as diffusers does.

use candle_core::Tensor;

use super::{
    check_segment, div_scalar, mul_scalar, np_arange, np_linspace, torch_linspace_f32, work_dtype,
    FinalSigmasType, InterpolationType, NoiseLevel, Parameterization, PredictionType, Scheduler,
    SchedulerConfig, TimestepSpacing, TimestepType,
};
use crate::schedulers::SchedulerError;

/// Karras et al.'s `rho` for Karras sigmas.
const KARRAS_RHO: f64 = 7.0;

/// The Euler scheduler after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    /// Noise levels, one per step plus the final one (float32 values).
    sigmas: Vec<f32>,
    /// Model timesteps (float32 values, possibly fractional).
    timesteps: Vec<f64>,
    prediction_type: PredictionType,
    init_noise_sigma: f32,
    /// Index of the next step; set from the first timestep seen.
    step_index: Option<usize>,
    /// Each step's training timestep over `num_train_timesteps` (the levels' `fraction`).
    fractions: Vec<f64>,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler from `config` for `num_inference_steps` (at least 1).
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let n = num_inference_steps;
        let n_train = config.num_train_timesteps;
        // With zero-SNR rescaling the last value is already 2^-24 rather than 0.
        let alphas_cumprod = config.alphas_cumprod();
        let train_sigmas: Vec<f32> = alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();
        let log_sigmas: Vec<f32> = train_sigmas
            .iter()
            .map(|&s| f64::from(s).ln() as f32)
            .collect();

        // Timesteps: float32 values.
        let mut timesteps: Vec<f64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| f64::from(t as f32))
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = n_train / n;
                (0..n)
                    .rev()
                    .map(|i| f64::from((i * ratio) as f32 + config.steps_offset as f32))
                    .collect()
            }
            TimestepSpacing::Trailing => {
                np_arange(n_train as f64, 0.0, -(n_train as f64 / n as f64))
                    .into_iter()
                    .map(|t| f64::from(t.round_ties_even() as f32 - 1.0))
                    .collect()
            }
        };

        let mut sigmas: Vec<f64> = match config.interpolation_type {
            InterpolationType::Linear => timesteps
                .iter()
                .map(|&t| np_interp_index(t, &train_sigmas))
                .collect(),
            InterpolationType::LogLinear => torch_linspace_f32(
                f64::from(log_sigmas[n_train - 1]),
                f64::from(log_sigmas[0]),
                n + 1,
            )
            .into_iter()
            .map(|l| f64::from(l.exp()))
            .collect(),
        };

        if config.use_karras_sigmas || config.use_exponential_sigmas {
            let sigma_min = config
                .sigma_min
                .unwrap_or_else(|| sigmas.last().copied().unwrap_or(0.0));
            let sigma_max = config
                .sigma_max
                .unwrap_or_else(|| sigmas.first().copied().unwrap_or(0.0));
            sigmas = if config.use_karras_sigmas {
                let min_inv_rho = sigma_min.powf(1.0 / KARRAS_RHO);
                let max_inv_rho = sigma_max.powf(1.0 / KARRAS_RHO);
                np_linspace(0.0, 1.0, n)
                    .into_iter()
                    .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(KARRAS_RHO))
                    .collect()
            } else {
                np_linspace(sigma_max.ln(), sigma_min.ln(), n)
                    .into_iter()
                    .map(f64::exp)
                    .collect()
            };
            timesteps = sigmas
                .iter()
                .map(|&s| f64::from(sigma_to_t(s, &log_sigmas) as f32))
                .collect();
        }

        let sigma_last = match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => {
                let a = alphas_cumprod[0];
                f64::from(((1.0 - a) / a).sqrt())
            }
        };
        sigmas.push(sigma_last);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();

        let fractions = timesteps.iter().map(|t| t / n_train as f64).collect();
        if config.timestep_type == TimestepType::Continuous
            && config.prediction_type == PredictionType::VPrediction
        {
            timesteps = sigmas[..sigmas.len() - 1]
                .iter()
                .map(|s| f64::from(0.25 * s.ln()))
                .collect();
        }

        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match config.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(EulerDiscreteScheduler {
            sigmas,
            timesteps,
            prediction_type: config.prediction_type,
            init_noise_sigma,
            step_index: None,
            fractions,
        })
    }

    /// The noise levels of the schedule (one per step plus the final one).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// diffusers' `index_for_timestep`: the position of `timestep` in the schedule (the second
    /// match when it occurs more than once).
    fn index_for_timestep(&self, timestep: f64) -> candle_core::Result<usize> {
        let mut matches = self
            .timesteps
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == timestep)
            .map(|(i, _)| i);
        let first = matches.next();
        let second = matches.next();
        second.or(first).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "EulerDiscreteScheduler: timestep {timestep} is not in the schedule; pass the \
                 scheduler's own timesteps"
            ))
        })
    }

    /// The current step index (from the first timestep when no step has run yet).
    fn current_index(&self, timestep: f64) -> candle_core::Result<usize> {
        match self.step_index {
            Some(i) => Ok(i),
            None => self.index_for_timestep(timestep),
        }
    }
}

/// `np.interp(x, arange(len(fp)), fp)` for one point, in float64 like numpy.
fn np_interp_index(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x > last as f64 {
        return f64::from(fp[last]);
    }
    if x < 0.0 {
        return f64::from(fp[0]);
    }
    let j = x.floor() as usize;
    if j >= last || x == j as f64 {
        return f64::from(fp[j.min(last)]);
    }
    let (lo, hi) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    let slope = hi - lo;
    let y = slope * (x - j as f64) + lo;
    if y.is_nan() {
        slope * (x - (j + 1) as f64) + hi
    } else {
        y
    }
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log sigma is `sigma`'s,
/// by linear interpolation in log sigma (with diffusers' mix of float32 and float64).
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // Index of the last log sigma not above `log_sigma` (0 if none), at most len - 2.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - f64::from(l) >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

impl Scheduler for EulerDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.init_noise_sigma)
    }

    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> candle_core::Result<Tensor> {
        let index = self.current_index(timestep)?;
        let sigma = *self.sigmas.get(index).ok_or_else(|| {
            candle_core::Error::Msg("EulerDiscreteScheduler: all steps have run".to_string())
        })?;
        let out_dtype = sample.dtype();
        let scaled = div_scalar(
            &sample.to_dtype(work_dtype(out_dtype))?,
            f64::from((sigma * sigma + 1.0).sqrt()),
        )?;
        scaled.to_dtype(out_dtype)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let index = self.current_index(timestep)?;
        if index + 1 >= self.sigmas.len() {
            return Err(candle_core::Error::Msg(
                "EulerDiscreteScheduler: step called after the last step".to_string(),
            ));
        }
        let out_dtype = model_output.dtype();
        let dtype = work_dtype(out_dtype);
        let sample = sample.to_dtype(dtype)?;
        let model_output = model_output.to_dtype(dtype)?;

        // s_churn = 0: gamma = 0 and sigma_hat = sigma.
        let sigma = self.sigmas[index];
        let sigma_hat = sigma;
        let pred_original = match self.prediction_type {
            PredictionType::Sample => model_output,
            PredictionType::Epsilon => {
                (&sample - mul_scalar(&model_output, f64::from(sigma_hat))?)?
            }
            PredictionType::VPrediction => {
                let var = sigma * sigma + 1.0;
                (mul_scalar(&model_output, f64::from(-sigma / var.sqrt()))?
                    + div_scalar(&sample, f64::from(var))?)?
            }
        };
        // Convert to an ODE derivative and take one Euler step.
        let derivative = div_scalar(&(&sample - pred_original)?, f64::from(sigma_hat))?;
        let dt = self.sigmas[index + 1] - sigma_hat;
        let prev = (sample + mul_scalar(&derivative, f64::from(dt))?)?;
        self.step_index = Some(index + 1);
        prev.to_dtype(out_dtype)
    }

    fn levels(&self) -> Vec<NoiseLevel> {
        self.sigmas
            .iter()
            .enumerate()
            .map(|(i, &s)| NoiseLevel {
                timestep: self.timesteps.get(i).copied().unwrap_or(0.0),
                alpha: 1.0,
                sigma: f64::from(s),
                fraction: self.fractions.get(i).copied().unwrap_or(0.0),
            })
            .collect()
    }

    fn parameterization(&self) -> Parameterization {
        self.prediction_type.into()
    }

    fn begin_segment(&mut self, from: usize, to: usize) -> Result<Vec<f64>, SchedulerError> {
        check_segment(from, to, self.sigmas.len())?;
        self.step_index = Some(from);
        Ok(self.timesteps[from..to].to_vec())
    }
}
