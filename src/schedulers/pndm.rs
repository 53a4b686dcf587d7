//! diffusers' `PNDMScheduler`: pseudo numerical methods for diffusion models.
//!
//! With `skip_prk_steps` (Stable Diffusion 1.5) it is crowsonkb's PLMS sampler: linear
//! multistep steps that reuse up to four previous model outputs, with a second call at the
//! second timestep to warm up. Without it, the first twelve calls are four Runge-Kutta steps
//! (F-PNDM) and the rest are PLMS steps.

use candle_core::Tensor;

use super::{
    alpha_at, check_segment, div_scalar, integer_timestep, integer_timesteps, mul_scalar,
    vp_levels, work_dtype, NoiseLevel, Parameterization, PredictionType, Scheduler,
    SchedulerConfig,
};
use crate::schedulers::SchedulerError;

/// The PNDM scheduler after `set_timesteps`, with its multistep state.
#[derive(Debug)]
pub struct PndmScheduler {
    /// float32 cumulative alpha products of the training schedule.
    alphas_cumprod: Vec<f32>,
    /// The alpha product used past timestep 0.
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    skip_prk_steps: bool,
    /// `num_train_timesteps // num_inference_steps`.
    step_ratio: i64,
    /// The Runge-Kutta timesteps (empty with `skip_prk_steps`).
    prk_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    /// The schedule's distinct timesteps, noisiest first (the levels' timesteps).
    grid: Vec<i64>,
    counter: usize,
    /// Previous model outputs (at most four are used).
    ets: Vec<Tensor>,
    /// Runge-Kutta running sum of weighted model outputs.
    cur_model_output: Option<Tensor>,
    /// The sample a multi-call step started from.
    cur_sample: Option<Tensor>,
}

impl PndmScheduler {
    /// Builds the scheduler from `config` for `num_inference_steps` (at least 1; at least 4
    /// without `skip_prk_steps`, where diffusers needs four timesteps for its Runge-Kutta steps).
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let n_train = config.num_train_timesteps;
        let alphas_cumprod = config.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let base = integer_timesteps(config, num_inference_steps);
        let len = base.len();
        let grid: Vec<i64> = base.iter().rev().copied().collect();
        let (prk_timesteps, plms_timesteps): (Vec<i64>, Vec<i64>) = if config.skip_prk_steps {
            // concat(t[:-1], t[-2:-1], t[-1:]) reversed: the second-to-last timestep repeats.
            let mut plms: Vec<i64> = base[..len - 1].to_vec();
            if len >= 2 {
                plms.push(base[len - 2]);
            }
            plms.push(base[len - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if len < 4 {
                return Err(config.invalid_steps(format!(
                    "PNDMScheduler without skip_prk_steps needs at least 4 inference steps, got \
                     {num_inference_steps}; use more steps or set skip_prk_steps to true"
                )));
            }
            let half = (n_train / num_inference_steps / 2) as i64;
            // Each of the last four timesteps t gives (t, t + half); drop the last value,
            // repeat each value twice and trim both ends, then reverse.
            let pairs: Vec<i64> = base[len - 4..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            let doubled: Vec<i64> = pairs[..pairs.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..len - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let timesteps = prk_timesteps
            .iter()
            .chain(plms_timesteps.iter())
            .map(|&t| t as f64)
            .collect();
        Ok(PndmScheduler {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction_type: config.prediction_type,
            skip_prk_steps: config.skip_prk_steps,
            step_ratio: (n_train / num_inference_steps) as i64,
            prk_timesteps,
            timesteps,
            grid,
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        })
    }

    /// One Runge-Kutta sub-step (diffusers' `step_prk`); tensors are in the work dtype.
    fn step_prk(
        &mut self,
        model_output: Tensor,
        timestep: i64,
        sample: Tensor,
    ) -> candle_core::Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 {
            0
        } else {
            self.step_ratio / 2
        };
        let prev_timestep = timestep - diff_to_prev;
        let timestep = self.prk_timesteps[self.counter / 4 * 4];
        let mut model_output = model_output;
        match self.counter % 4 {
            0 => {
                self.accumulate(&model_output, 1.0 / 6.0)?;
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
            }
            1 | 2 => self.accumulate(&model_output, 1.0 / 3.0)?,
            _ => {
                let weighted = mul_scalar(&model_output, 1.0 / 6.0)?;
                model_output = match self.cur_model_output.take() {
                    Some(sum) => (sum + weighted)?,
                    None => weighted,
                };
            }
        }
        let cur_sample = self.cur_sample.clone().unwrap_or(sample);
        let prev = self.prev_sample(&cur_sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    /// Adds `weight * model_output` to the Runge-Kutta running sum.
    fn accumulate(&mut self, model_output: &Tensor, weight: f64) -> candle_core::Result<()> {
        let weighted = mul_scalar(model_output, weight)?;
        self.cur_model_output = Some(match self.cur_model_output.take() {
            Some(sum) => (sum + weighted)?,
            None => weighted,
        });
        Ok(())
    }

    /// One linear multistep step (diffusers' `step_plms`); tensors are in the work dtype.
    fn step_plms(
        &mut self,
        model_output: Tensor,
        timestep: i64,
        sample: Tensor,
    ) -> candle_core::Result<Tensor> {
        if !self.skip_prk_steps && self.ets.len() < 3 {
            return Err(candle_core::Error::Msg(
                "PNDM: PLMS steps need the 12 Runge-Kutta steps to have run first".to_string(),
            ));
        }
        let mut timestep = timestep;
        let mut prev_timestep = timestep - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_timestep = timestep;
            timestep += self.step_ratio;
        }

        let ets = &self.ets;
        let n = ets.len();
        let mut sample = sample;
        let model_output = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output
        } else if n == 1 && self.counter == 1 {
            if let Some(start) = self.cur_sample.take() {
                sample = start;
            }
            mul_scalar(&(model_output + &ets[0])?, 0.5)?
        } else if n == 2 {
            let sum = (mul_scalar(&ets[1], 3.0)? - &ets[0])?;
            mul_scalar(&sum, 0.5)?
        } else if n == 3 {
            let sum = ((mul_scalar(&ets[2], 23.0)? - mul_scalar(&ets[1], 16.0)?)?
                + mul_scalar(&ets[0], 5.0)?)?;
            div_scalar(&sum, 12.0)?
        } else {
            let sum = (((mul_scalar(&ets[n - 1], 55.0)? - mul_scalar(&ets[n - 2], 59.0)?)?
                + mul_scalar(&ets[n - 3], 37.0)?)?
                - mul_scalar(&ets[n - 4], 9.0)?)?;
            mul_scalar(&sum, 1.0 / 24.0)?
        };
        let prev = self.prev_sample(&sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    /// Formula (9) of the PNDM paper (diffusers' `_get_prev_sample`), scalars in float32.
    fn prev_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        prev_timestep: i64,
        model_output: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let alpha_prod_t = alpha_at(&self.alphas_cumprod, timestep)?;
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            alpha_at(&self.alphas_cumprod, prev_timestep)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;

        let model_output = match self.prediction_type {
            PredictionType::VPrediction => {
                (mul_scalar(model_output, f64::from(alpha_prod_t.sqrt()))?
                    + mul_scalar(sample, f64::from(beta_prod_t.sqrt()))?)?
            }
            _ => model_output.clone(),
        };
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_t_prev.sqrt()
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        let correction = div_scalar(
            &mul_scalar(&model_output, f64::from(alpha_prod_t_prev - alpha_prod_t))?,
            f64::from(denom),
        )?;
        mul_scalar(sample, f64::from(sample_coeff))? - correction
    }
}

impl Scheduler for PndmScheduler {
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
        let prev = if self.counter < self.prk_timesteps.len() && !self.skip_prk_steps {
            self.step_prk(model_output, timestep, sample)?
        } else {
            self.step_plms(model_output, timestep, sample)?
        };
        prev.to_dtype(out_dtype)
    }

    fn levels(&self) -> Vec<NoiseLevel> {
        vp_levels(
            self.grid.iter().map(|&t| t as f64),
            &self.alphas_cumprod,
            self.final_alpha_cumprod,
        )
    }

    fn parameterization(&self) -> Parameterization {
        self.prediction_type.into()
    }

    /// PLMS from a fresh start takes the same warm-up as from the first step: the first
    /// timestep once, the next one twice (a second-order start), then one call a step. So a
    /// segment of `k > 1` steps costs `k + 1` model calls.
    fn begin_segment(&mut self, from: usize, to: usize) -> Result<Vec<f64>, SchedulerError> {
        check_segment(from, to, self.grid.len() + 1)?;
        if !self.skip_prk_steps {
            return Err(SchedulerError::Unsupported(
                "PNDMScheduler without skip_prk_steps cannot start mid-schedule (its Runge-Kutta \
                 warm-up spans the first steps); set skip_prk_steps to true in \
                 scheduler/scheduler_config.json or use another scheduler"
                    .into(),
            ));
        }
        self.counter = 0;
        self.ets.clear();
        self.cur_sample = None;
        self.cur_model_output = None;
        let mut visits = vec![self.grid[from] as f64];
        if to - from > 1 {
            visits.push(self.grid[from + 1] as f64);
            visits.extend(self.grid[from + 1..to].iter().map(|&t| t as f64));
        }
        Ok(visits)
    }
}
