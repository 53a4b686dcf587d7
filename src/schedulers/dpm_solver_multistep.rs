//! diffusers' `DPMSolverMultistepScheduler` (DPM-Solver / DPM-Solver++, first to third order,
//! deterministic algorithms), the scheduler PixArt-Sigma ships with.
//!
//! Numerics follow diffusers: the schedule is float32 (`alphas_cumprod`, sigmas), the
//! per-step coefficients are float32 scalars, the update runs in float32 and the result is cast
//! back to the model output's dtype. Not supported (an error names the key): the SDE
//! variants, dynamic thresholding, learned variance, and Karras / exponential / beta / Lu /
//! flow sigmas.

use candle_core::{DType, Tensor};

use super::{
    check_segment, mul_scalar, np_arange, np_linspace, Keys, NoiseLevel, Parameterization,
    PredictionType, Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing,
};
use crate::schedulers::SchedulerError;

/// Which DPM-Solver formulation (`algorithm_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpmAlgorithm {
    /// `dpmsolver++`: the solver works on the data prediction (diffusers' default).
    DpmSolverPlusPlus,
    /// `dpmsolver`: the solver works on the noise prediction.
    DpmSolver,
}

/// The second-order update (`solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpmSolverType {
    /// `midpoint` (default).
    Midpoint,
    /// `heun`.
    Heun,
}

/// The keys only `DPMSolverMultistepScheduler` has, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct DpmSolverOptions {
    /// Multistep order 1-3 (`solver_order`, default 2).
    pub solver_order: usize,
    /// `algorithm_type` (default `dpmsolver++`).
    pub algorithm: DpmAlgorithm,
    /// `solver_type` (default `midpoint`).
    pub solver_type: DpmSolverType,
    /// Lower orders for the last steps when fewer than 15 steps (`lower_order_final`, default true).
    pub lower_order_final: bool,
    /// First order for the very last step (`euler_at_final`, default false).
    pub euler_at_final: bool,
    /// The last sigma is the smallest training sigma instead of 0 (`final_sigmas_type =
    /// "sigma_min"`; default `zero`).
    pub final_sigma_min: bool,
    /// Timesteps whose log-SNR is below this are cut off (`lambda_min_clipped`, default -inf).
    pub lambda_min_clipped: f64,
}

/// Reads the DPM-Solver keys of a scheduler config, rejecting what this build does not run.
pub(super) fn parse_options(keys: &Keys) -> Result<DpmSolverOptions, SchedulerError> {
    let solver_order = keys.j.solver_order.unwrap_or(2);
    if !(1..=3).contains(&solver_order) {
        return Err(keys.unsupported("solver_order", "must be 1, 2 or 3"));
    }
    let algorithm = match keys.j.algorithm_type.as_deref() {
        None | Some("dpmsolver++") | Some("deis") => DpmAlgorithm::DpmSolverPlusPlus,
        Some("dpmsolver") => DpmAlgorithm::DpmSolver,
        Some(other) => {
            return Err(keys.unsupported(
                "algorithm_type",
                &format!("{other:?} is not supported (the SDE variants draw noise); use dpmsolver++ or dpmsolver"),
            ))
        }
    };
    let solver_type = match keys.j.solver_type.as_deref() {
        None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => {
            DpmSolverType::Midpoint
        }
        Some("heun") => DpmSolverType::Heun,
        Some(other) => {
            return Err(keys.unsupported(
                "solver_type",
                &format!("{other:?} is not supported; use midpoint or heun"),
            ))
        }
    };
    let final_sigma_min = match keys.j.final_sigmas_type.as_deref() {
        None | Some("zero") => false,
        Some("sigma_min") => true,
        Some(other) => {
            return Err(keys.unsupported(
                "final_sigmas_type",
                &format!("{other:?} is not supported; use zero or sigma_min"),
            ))
        }
    };
    if algorithm == DpmAlgorithm::DpmSolver && !final_sigma_min {
        return Err(keys.unsupported(
            "final_sigmas_type",
            "zero is not supported with algorithm_type dpmsolver (as in diffusers); use sigma_min",
        ));
    }
    let j = &keys.j;
    for (key, on) in [
        ("thresholding", j.thresholding),
        ("use_karras_sigmas", j.use_karras_sigmas),
        ("use_exponential_sigmas", j.use_exponential_sigmas),
        ("use_beta_sigmas", j.use_beta_sigmas),
        ("use_lu_lambdas", j.use_lu_lambdas),
        ("use_flow_sigmas", j.use_flow_sigmas),
        ("use_dynamic_shifting", j.use_dynamic_shifting),
    ] {
        if on.unwrap_or(false) {
            return Err(keys.unsupported(
                key,
                "is not supported by this build's DPMSolverMultistepScheduler; set it to false",
            ));
        }
    }
    if let Some(v) = keys.j.variance_type.as_ref() {
        return Err(keys.unsupported(
            "variance_type",
            &format!("{v:?} (learned variance) is not supported; use null"),
        ));
    }
    if keys.j.prediction_type.as_deref() == Some("flow_prediction") {
        return Err(keys.unsupported("prediction_type", "flow_prediction is not supported"));
    }
    Ok(DpmSolverOptions {
        solver_order,
        algorithm,
        solver_type,
        lower_order_final: keys.j.lower_order_final.unwrap_or(true),
        euler_at_final: keys.j.euler_at_final.unwrap_or(false),
        final_sigma_min,
        lambda_min_clipped: keys.j.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
    })
}

/// The DPM-Solver multistep scheduler after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    options: DpmSolverOptions,
    prediction_type: PredictionType,
    timesteps: Vec<f64>,
    /// One sigma per timestep plus the final one (float32, as diffusers).
    sigmas: Vec<f32>,
    /// The last `solver_order` converted model outputs, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    step_index: usize,
    num_train_timesteps: usize,
}

/// `alpha_t, sigma_t` of a sigma, float32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverMultistepScheduler {
    /// Builds the scheduler from `config` (a `DPMSolverMultistepScheduler` config) for
    /// `num_inference_steps`.
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let options = match (&config.dpm_solver, config.kind) {
            (Some(o), SchedulerKind::DpmSolverMultistep) => o.clone(),
            _ => {
                return Err(
                    config.invalid_steps("is not a DPMSolverMultistepScheduler config".to_string())
                )
            }
        };
        let n_train = config.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n_train {
            return Err(config.invalid_steps(format!(
                "DPMSolverMultistepScheduler cannot take {num_inference_steps} inference steps; use 1 to {n_train}"
            )));
        }
        let mut alphas_cumprod = config.alphas_cumprod();
        if config.rescale_betas_zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let train_sigmas: Vec<f32> = alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();
        // searchsorted(flip(lambda_t), lambda_min_clipped): lambdas below the clip.
        let clipped = alphas_cumprod
            .iter()
            .map(|a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
            .filter(|l| f64::from(*l) < options.lambda_min_clipped)
            .count();
        let last = n_train - clipped;
        let n = num_inference_steps;
        let timesteps: Vec<i64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut t: Vec<i64> = np_linspace(0.0, last as f64 - 1.0, n + 1)
                    .into_iter()
                    .map(|v| v.round_ties_even() as i64)
                    .collect();
                t.reverse();
                t.pop();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = (last / (n + 1)) as i64;
                (1..=n as i64)
                    .rev()
                    .map(|i| i * ratio + config.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / n as f64;
                np_arange(last as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|v| v.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        let mut sigmas = Vec::with_capacity(timesteps.len() + 1);
        for &t in &timesteps {
            let s = usize::try_from(t)
                .ok()
                .and_then(|i| train_sigmas.get(i))
                .ok_or_else(|| {
                    config.invalid_steps(format!(
                        "timestep {t} falls outside the training schedule (0..{n_train})"
                    ))
                })?;
            sigmas.push(*s);
        }
        sigmas.push(if options.final_sigma_min {
            train_sigmas[0]
        } else {
            0.0
        });
        Ok(Self {
            model_outputs: vec![None; options.solver_order],
            options,
            prediction_type: config.prediction_type,
            timesteps: timesteps.into_iter().map(|t| t as f64).collect(),
            sigmas,
            lower_order_nums: 0,
            step_index: 0,
            num_train_timesteps: n_train,
        })
    }

    /// The sigmas of the schedule (one per timestep plus the final one).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// diffusers' `convert_model_output`: the data prediction (dpmsolver++) or the noise
    /// prediction (dpmsolver) from the model output.
    fn convert(&self, model_output: &Tensor, sample: &Tensor) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[self.step_index]);
        let (a, s) = (f64::from(alpha_t), f64::from(sigma_t));
        let sample = sample.to_dtype(model_output.dtype())?;
        match (self.options.algorithm, self.prediction_type) {
            (DpmAlgorithm::DpmSolverPlusPlus, PredictionType::Epsilon) => {
                super::div_scalar(&(&sample - mul_scalar(model_output, s)?)?, a)
            }
            (DpmAlgorithm::DpmSolverPlusPlus, PredictionType::Sample) => Ok(model_output.clone()),
            (DpmAlgorithm::DpmSolverPlusPlus, PredictionType::VPrediction) => {
                mul_scalar(&sample, a)? - mul_scalar(model_output, s)?
            }
            (DpmAlgorithm::DpmSolver, PredictionType::Epsilon) => Ok(model_output.clone()),
            (DpmAlgorithm::DpmSolver, PredictionType::Sample) => {
                super::div_scalar(&(&sample - mul_scalar(model_output, a)?)?, s)
            }
            (DpmAlgorithm::DpmSolver, PredictionType::VPrediction) => {
                mul_scalar(model_output, a)? + mul_scalar(&sample, s)?
            }
        }
    }

    /// `(alpha, sigma, lambda)` of `sigmas[i]`.
    fn point(&self, i: usize) -> (f32, f32, f32) {
        let (a, s) = alpha_sigma(self.sigmas[i]);
        (a, s, lambda(a, s))
    }

    fn first_order(&self, m0: &Tensor, sample: &Tensor) -> candle_core::Result<Tensor> {
        let i = self.step_index;
        let (alpha_t, sigma_t, lambda_t) = self.point(i + 1);
        let (alpha_s, sigma_s, lambda_s) = self.point(i);
        let h = lambda_t - lambda_s;
        match self.options.algorithm {
            DpmAlgorithm::DpmSolverPlusPlus => {
                mul_scalar(sample, f64::from(sigma_t / sigma_s))?
                    - mul_scalar(m0, f64::from(alpha_t * ((-h).exp() - 1.0)))?
            }
            DpmAlgorithm::DpmSolver => {
                mul_scalar(sample, f64::from(alpha_t / alpha_s))?
                    - mul_scalar(m0, f64::from(sigma_t * (h.exp() - 1.0)))?
            }
        }
    }

    fn second_order(
        &self,
        sample: &Tensor,
        m0: &Tensor,
        m1: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let i = self.step_index;
        let (alpha_t, sigma_t, lambda_t) = self.point(i + 1);
        let (alpha_s0, sigma_s0, lambda_s0) = self.point(i);
        let (_, _, lambda_s1) = self.point(i - 1);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d0 = m0;
        let d1 = mul_scalar(&(m0 - m1)?, f64::from(1.0 / r0))?;
        let c = |v: f32| f64::from(v);
        match (self.options.algorithm, self.options.solver_type) {
            (DpmAlgorithm::DpmSolverPlusPlus, DpmSolverType::Midpoint) => {
                let k = alpha_t * ((-h).exp() - 1.0);
                (mul_scalar(sample, c(sigma_t / sigma_s0))? - mul_scalar(d0, c(k))?)?
                    - mul_scalar(&d1, c(0.5 * k))?
            }
            (DpmAlgorithm::DpmSolverPlusPlus, DpmSolverType::Heun) => {
                (mul_scalar(sample, c(sigma_t / sigma_s0))?
                    - mul_scalar(d0, c(alpha_t * ((-h).exp() - 1.0)))?)?
                    + mul_scalar(&d1, c(alpha_t * (((-h).exp() - 1.0) / h + 1.0)))?
            }
            (DpmAlgorithm::DpmSolver, DpmSolverType::Midpoint) => {
                let k = sigma_t * (h.exp() - 1.0);
                (mul_scalar(sample, c(alpha_t / alpha_s0))? - mul_scalar(d0, c(k))?)?
                    - mul_scalar(&d1, c(0.5 * k))?
            }
            (DpmAlgorithm::DpmSolver, DpmSolverType::Heun) => {
                (mul_scalar(sample, c(alpha_t / alpha_s0))?
                    - mul_scalar(d0, c(sigma_t * (h.exp() - 1.0)))?)?
                    - mul_scalar(&d1, c(sigma_t * ((h.exp() - 1.0) / h - 1.0)))?
            }
        }
    }

    fn third_order(
        &self,
        sample: &Tensor,
        m0: &Tensor,
        m1: &Tensor,
        m2: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let i = self.step_index;
        let (alpha_t, sigma_t, lambda_t) = self.point(i + 1);
        let (alpha_s0, sigma_s0, lambda_s0) = self.point(i);
        let (_, _, lambda_s1) = self.point(i - 1);
        let (_, _, lambda_s2) = self.point(i - 2);
        let (h, h_0, h_1) = (
            lambda_t - lambda_s0,
            lambda_s0 - lambda_s1,
            lambda_s1 - lambda_s2,
        );
        let (r0, r1) = (h_0 / h, h_1 / h);
        let c = |v: f32| f64::from(v);
        let d1_0 = mul_scalar(&(m0 - m1)?, c(1.0 / r0))?;
        let d1_1 = mul_scalar(&(m1 - m2)?, c(1.0 / r1))?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + mul_scalar(&diff, c(r0 / (r0 + r1)))?)?;
        let d2 = mul_scalar(&diff, c(1.0 / (r0 + r1)))?;
        match self.options.algorithm {
            DpmAlgorithm::DpmSolverPlusPlus => {
                let e = (-h).exp();
                ((mul_scalar(sample, c(sigma_t / sigma_s0))?
                    - mul_scalar(m0, c(alpha_t * (e - 1.0)))?)?
                    + mul_scalar(&d1, c(alpha_t * ((e - 1.0) / h + 1.0)))?)?
                    - mul_scalar(&d2, c(alpha_t * ((e - 1.0 + h) / (h * h) - 0.5)))?
            }
            DpmAlgorithm::DpmSolver => {
                let e = h.exp();
                ((mul_scalar(sample, c(alpha_t / alpha_s0))?
                    - mul_scalar(m0, c(sigma_t * (e - 1.0)))?)?
                    - mul_scalar(&d1, c(sigma_t * ((e - 1.0) / h - 1.0)))?)?
                    - mul_scalar(&d2, c(sigma_t * ((e - 1.0 - h) / (h * h) - 0.5)))?
            }
        }
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let n = self.timesteps.len();
        if self.step_index >= n || self.timesteps[self.step_index] != timestep {
            return Err(candle_core::Error::Msg(format!(
                "DPMSolverMultistepScheduler: step {} got timestep {timestep}; steps must follow the scheduler's timesteps",
                self.step_index
            )));
        }
        let o = &self.options;
        let last = self.step_index == n - 1;
        let lower_order_final =
            last && (o.euler_at_final || (o.lower_order_final && n < 15) || !o.final_sigma_min);
        let lower_order_second = self.step_index + 2 == n && o.lower_order_final && n < 15;
        let out_dtype = model_output.dtype();
        let work = if out_dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let converted = self.convert(model_output, sample)?;
        self.model_outputs.rotate_left(1);
        if let Some(slot) = self.model_outputs.last_mut() {
            *slot = Some(converted.clone());
        }
        let sample = sample.to_dtype(work)?;
        let m = |k: usize| -> candle_core::Result<Tensor> {
            let len = self.model_outputs.len();
            self.model_outputs[len - 1 - k]
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("missing DPM-Solver history".into()))?
                .to_dtype(work)
        };
        let prev = if o.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&converted.to_dtype(work)?, &sample)?
        } else if o.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(&sample, &m(0)?, &m(1)?)?
        } else {
            self.third_order(&sample, &m(0)?, &m(1)?, &m(2)?)?
        };
        if self.lower_order_nums < o.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        prev.to_dtype(out_dtype)
    }

    fn levels(&self) -> Vec<NoiseLevel> {
        self.sigmas
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let (alpha, sigma) = alpha_sigma(s);
                let timestep = self.timesteps.get(i).copied().unwrap_or(0.0);
                NoiseLevel {
                    timestep,
                    alpha: f64::from(alpha),
                    sigma: f64::from(sigma),
                    fraction: timestep / self.num_train_timesteps as f64,
                }
            })
            .collect()
    }

    fn parameterization(&self) -> Parameterization {
        self.prediction_type.into()
    }

    fn begin_segment(&mut self, from: usize, to: usize) -> Result<Vec<f64>, SchedulerError> {
        check_segment(from, to, self.sigmas.len())?;
        self.step_index = from;
        self.lower_order_nums = 0;
        self.model_outputs.iter_mut().for_each(|m| *m = None);
        Ok(self.timesteps[from..to].to_vec())
    }
}
