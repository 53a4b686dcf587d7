//! diffusers' `DDIMScheduler` with `eta = 0` (deterministic DDIM, as the Stable Diffusion
//! pipelines call it by default).

use candle_core::Tensor;

use super::{
    alpha_at, check_segment, div_scalar, integer_timestep, integer_timesteps, mul_scalar,
    vp_levels, work_dtype, NoiseLevel, Parameterization, PredictionType, Scheduler,
    SchedulerConfig,
};
use crate::schedulers::SchedulerError;

/// The DDIM scheduler after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    /// float32 cumulative alpha products of the training schedule.
    alphas_cumprod: Vec<f32>,
    /// The alpha product used past timestep 0.
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    /// Clip bound for the predicted clean sample, when clipping is on.
    clip_sample_range: Option<f64>,
    /// `num_train_timesteps // num_inference_steps`.
    step_ratio: i64,
    timesteps: Vec<f64>,
}

impl DdimScheduler {
    /// Builds the scheduler from `config` for `num_inference_steps` (1 to `num_train_timesteps`).
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let n_train = config.num_train_timesteps;
        if num_inference_steps > n_train {
            return Err(config.invalid_steps(format!(
                "DDIMScheduler cannot take {num_inference_steps} inference steps; the model was \
                 trained with {n_train} timesteps, so use at most that many"
            )));
        }
        let alphas_cumprod = config.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let timesteps = integer_timesteps(config, num_inference_steps)
            .into_iter()
            .rev()
            .map(|t| t as f64)
            .collect();
        Ok(DdimScheduler {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction_type: config.prediction_type,
            clip_sample_range: config.clip_sample.then_some(config.clip_sample_range),
            step_ratio: (n_train / num_inference_steps) as i64,
            timesteps,
        })
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let timestep = integer_timestep(timestep)?;
        let out_dtype = sample.dtype();
        let dtype = work_dtype(out_dtype);
        let model_output = model_output.to_dtype(dtype)?;
        let sample = sample.to_dtype(dtype)?;

        let prev_timestep = timestep - self.step_ratio;
        let alpha_prod_t = alpha_at(&self.alphas_cumprod, timestep)?;
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            alpha_at(&self.alphas_cumprod, prev_timestep)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let sqrt_alpha = f64::from(alpha_prod_t.sqrt());
        let sqrt_beta = f64::from(beta_prod_t.sqrt());

        // Formula (12) of the DDIM paper: predicted x_0 and the noise direction.
        let (pred_original, pred_epsilon) = match self.prediction_type {
            PredictionType::Epsilon => {
                let x0 = div_scalar(
                    &(&sample - mul_scalar(&model_output, sqrt_beta)?)?,
                    sqrt_alpha,
                )?;
                (x0, model_output)
            }
            PredictionType::Sample => {
                let eps = div_scalar(
                    &(&sample - mul_scalar(&model_output, sqrt_alpha)?)?,
                    sqrt_beta,
                )?;
                (model_output, eps)
            }
            PredictionType::VPrediction => {
                let x0 =
                    (mul_scalar(&sample, sqrt_alpha)? - mul_scalar(&model_output, sqrt_beta)?)?;
                let eps =
                    (mul_scalar(&model_output, sqrt_alpha)? + mul_scalar(&sample, sqrt_beta)?)?;
                (x0, eps)
            }
        };
        let pred_original = match self.clip_sample_range {
            Some(range) => pred_original.clamp(-range, range)?,
            None => pred_original,
        };
        // eta = 0: no variance term.
        let direction = mul_scalar(&pred_epsilon, f64::from((1.0 - alpha_prod_t_prev).sqrt()))?;
        let prev = (mul_scalar(&pred_original, f64::from(alpha_prod_t_prev.sqrt()))? + direction)?;
        prev.to_dtype(out_dtype)
    }

    fn levels(&self) -> Vec<NoiseLevel> {
        vp_levels(
            self.timesteps.iter().copied(),
            &self.alphas_cumprod,
            self.final_alpha_cumprod,
        )
    }

    fn parameterization(&self) -> Parameterization {
        self.prediction_type.into()
    }

    fn begin_segment(&mut self, from: usize, to: usize) -> Result<Vec<f64>, SchedulerError> {
        check_segment(from, to, self.timesteps.len() + 1)?;
        Ok(self.timesteps[from..to].to_vec())
    }
}
