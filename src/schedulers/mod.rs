//! Diffusers-compatible noise schedulers, configured from `scheduler/scheduler_config.json`.
//!
//! All share diffusers' small interface: timesteps, `init_noise_sigma`, `scale_model_input`,
//! `step`. A scheduler is built per generation (multistep schedulers keep state between steps).
//!
//! [`SchedulerConfig`] reads a diffusers scheduler config (the `_class_name` picks the
//! scheduler, missing keys take diffusers' defaults for that class) and
//! [`SchedulerConfig::build`] returns the scheduler after diffusers' `set_timesteps`.
//! Supported classes: `PNDMScheduler`, `DDIMScheduler`, `EulerDiscreteScheduler`,
//! `DPMSolverMultistepScheduler`.
//!
//! Numerics follow diffusers: the training schedule (betas, `alphas_cumprod`, sigmas) is
//! float32 as in diffusers, timesteps come from the same float64 (numpy) arithmetic, and the
//! per-step coefficients are float32 scalars. The tensor math of a step runs in float32 for
//! F16/BF16/F32 samples (F64 samples stay F64) and the result is cast back to the input dtype:
//! diffusers' Euler does exactly this; for PNDM/DDIM with half-precision samples diffusers rounds
//! to the half dtype after every operation, so our result can differ from it by a few half-ulps
//! (it is the more accurate of the two).

mod ddim;
mod dpm_solver_multistep;
mod euler_discrete;
pub mod flow_match_euler;
pub mod levels;
mod pndm;

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Deserialize;
use serde_json::Value;

pub use ddim::DdimScheduler;
pub use dpm_solver_multistep::{
    DpmAlgorithm, DpmSolverMultistepScheduler, DpmSolverOptions, DpmSolverType,
};
pub use euler_discrete::EulerDiscreteScheduler;
pub use flow_match_euler::{FlowMatchConfig, FlowMatchEulerScheduler};
pub use levels::{NoiseLevel, Parameterization};
pub use pndm::PndmScheduler;

/// Errors raised while configuring or stepping a scheduler: the model stack's one error type.
pub type SchedulerError = crate::models::ModelError;

/// One denoising schedule, set up for a given number of inference steps
/// (diffusers' scheduler after `set_timesteps`).
pub trait Scheduler: Send {
    /// The timesteps the denoising loop visits, in order (diffusers' `scheduler.timesteps`;
    /// may repeat a value, as PNDM's does).
    fn timesteps(&self) -> &[f64];
    /// Factor the initial noise is multiplied by (`init_noise_sigma`; 1 unless the scheduler
    /// works in sigma space, as Euler's does).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// diffusers' `scale_model_input`: the UNet input for `sample` at `timestep` (the sample
    /// itself unless the scheduler scales it, as Euler's does).
    fn scale_model_input(&self, sample: &Tensor, _timestep: f64) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }
    /// One denoising step: the previous sample from the model output at `timestep`.
    /// Calls must follow the order of [`Scheduler::timesteps`].
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor>;
    /// The schedule's noise levels: the one each step starts from, in order, then the final
    /// one (`steps + 1` levels; PNDM's repeated warm-up timestep counts once).
    fn levels(&self) -> Vec<NoiseLevel>;
    /// What the model output is, for [`levels::predicted_x0`].
    fn parameterization(&self) -> Parameterization;
    /// Sets this freshly built scheduler up to denoise from level `from` to level `to`
    /// (indices into [`Scheduler::levels`], `from < to`) as a fresh start without multistep
    /// history, as diffusers' img2img begins mid-schedule, and returns the timesteps to visit
    /// (one model call and one [`Scheduler::step`] each). `0..steps` visits
    /// [`Scheduler::timesteps`].
    fn begin_segment(&mut self, from: usize, to: usize) -> Result<Vec<f64>, SchedulerError>;
}

/// Checks a segment `from..to` against a schedule of `levels` levels.
fn check_segment(from: usize, to: usize, levels: usize) -> Result<(), SchedulerError> {
    if from < to && to < levels {
        Ok(())
    } else {
        Err(SchedulerError::InvalidArgument(format!(
            "cannot denoise from level {from} to level {to} of a schedule with {levels} levels"
        )))
    }
}

/// The levels of a variance-preserving schedule visiting the integer `timesteps` (noisiest
/// first) of `alphas_cumprod`, then the final level, whose alpha product is `final_alpha`.
fn vp_levels(
    timesteps: impl Iterator<Item = f64>,
    alphas_cumprod: &[f32],
    final_alpha: f32,
) -> Vec<NoiseLevel> {
    let n_train = alphas_cumprod.len();
    let mut levels: Vec<NoiseLevel> = timesteps
        .map(|t| {
            let a = usize::try_from(t as i64)
                .ok()
                .and_then(|i| alphas_cumprod.get(i).copied())
                .unwrap_or(1.0);
            vp_level(t, a, n_train)
        })
        .collect();
    let mut last = vp_level(0.0, final_alpha, n_train);
    last.fraction = 0.0;
    levels.push(last);
    levels
}

/// The variance-preserving level of `alphas_cumprod` value `a` at `timestep` of a schedule
/// trained on `n_train` timesteps.
fn vp_level(timestep: f64, a: f32, n_train: usize) -> NoiseLevel {
    let a = f64::from(a);
    NoiseLevel {
        timestep,
        alpha: a.sqrt(),
        sigma: (1.0 - a).max(0.0).sqrt(),
        fraction: timestep / n_train as f64,
    }
}

/// Which diffusers scheduler class a config describes (`_class_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// `PNDMScheduler` (SD 1.5's default, usually with `skip_prk_steps`).
    Pndm,
    /// `DDIMScheduler` (deterministic, `eta = 0`).
    Ddim,
    /// `EulerDiscreteScheduler` (deterministic, `s_churn = 0`).
    EulerDiscrete,
    /// `DPMSolverMultistepScheduler` (deterministic DPM-Solver / DPM-Solver++).
    DpmSolverMultistep,
}

impl SchedulerKind {
    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::EulerDiscrete => "EulerDiscreteScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
        }
    }
}

/// How the training betas are laid out (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linear`: evenly spaced betas from `beta_start` to `beta_end`.
    Linear,
    /// `scaled_linear`: evenly spaced square roots, squared (latent diffusion).
    ScaledLinear,
    /// `squaredcos_cap_v2`: the Glide cosine schedule, betas capped at 0.999.
    SquaredCosCapV2,
}

/// How inference timesteps are spread over the training timesteps (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `linspace`: evenly from 0 to `num_train_timesteps - 1`, ends included.
    Linspace,
    /// `leading`: multiples of `num_train_timesteps / steps` plus `steps_offset`.
    Leading,
    /// `trailing`: counted down from `num_train_timesteps`, minus one.
    Trailing,
}

/// What the denoising model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise.
    Epsilon,
    /// The velocity `alpha * noise - sigma * sample`.
    VPrediction,
    /// The clean sample (`sample`, or Euler's legacy `original_sample`).
    Sample,
}

/// How Euler interpolates sigmas between training timesteps (`interpolation_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterpolationType {
    /// `linear`: piecewise-linear in sigma over the timestep index.
    Linear,
    /// `log_linear`: evenly spaced in log sigma.
    LogLinear,
}

/// How Euler turns training timesteps into model timesteps (`timestep_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepType {
    /// `discrete`: the (possibly fractional) training timestep.
    Discrete,
    /// `continuous`: `0.25 * ln(sigma)` (only with `v_prediction`, as in diffusers).
    Continuous,
}

/// Euler's last sigma (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmasType {
    /// `zero`: the schedule ends at sigma 0.
    Zero,
    /// `sigma_min`: the schedule ends at the smallest training sigma.
    SigmaMin,
}

/// A diffusers `scheduler_config.json`, with diffusers' per-class defaults for missing keys.
///
/// Keys the chosen class does not use are ignored, as diffusers ignores them.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Where the config came from (a file path or a name), used in error messages.
    pub source: String,
    /// The scheduler class (`_class_name`).
    pub kind: SchedulerKind,
    /// Number of training timesteps (`num_train_timesteps`, default 1000).
    pub num_train_timesteps: usize,
    /// First beta (`beta_start`, default 0.0001).
    pub beta_start: f64,
    /// Last beta (`beta_end`, default 0.02).
    pub beta_end: f64,
    /// Beta layout (`beta_schedule`, default `linear`).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas (`trained_betas`); when present they replace the beta schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// PNDM: use PLMS only, skipping the Runge-Kutta warm-up (`skip_prk_steps`, default false).
    pub skip_prk_steps: bool,
    /// PNDM/DDIM: the final "previous" alpha product is 1 (`set_alpha_to_one`; default false
    /// for PNDM, true for DDIM).
    pub set_alpha_to_one: bool,
    /// Offset added to `leading` timesteps (`steps_offset`, default 0).
    pub steps_offset: i64,
    /// Timestep spacing (`timestep_spacing`; default `leading` for PNDM/DDIM, `linspace` for Euler).
    pub timestep_spacing: TimestepSpacing,
    /// What the model predicts (`prediction_type`, default `epsilon`).
    pub prediction_type: PredictionType,
    /// DDIM: clip the predicted clean sample (`clip_sample`, default true).
    pub clip_sample: bool,
    /// DDIM: clipping bound (`clip_sample_range`, default 1.0).
    pub clip_sample_range: f64,
    /// DDIM: dynamic thresholding (`thresholding`, default false; `true` is not supported).
    pub thresholding: bool,
    /// DDIM/Euler: rescale betas to zero terminal SNR (`rescale_betas_zero_snr`, default false).
    pub rescale_betas_zero_snr: bool,
    /// Euler: sigma interpolation (`interpolation_type`, default `linear`).
    pub interpolation_type: InterpolationType,
    /// Euler: Karras sigmas (`use_karras_sigmas`, default false).
    pub use_karras_sigmas: bool,
    /// Euler: exponential sigmas (`use_exponential_sigmas`, default false).
    pub use_exponential_sigmas: bool,
    /// Euler: smallest sigma for Karras/exponential sigmas (`sigma_min`; default: the schedule's).
    pub sigma_min: Option<f64>,
    /// Euler: largest sigma for Karras/exponential sigmas (`sigma_max`; default: the schedule's).
    pub sigma_max: Option<f64>,
    /// Euler: model timestep type (`timestep_type`, default `discrete`).
    pub timestep_type: TimestepType,
    /// Euler: last sigma (`final_sigmas_type`, default `zero`).
    pub final_sigmas_type: FinalSigmasType,
    /// DPMSolverMultistep's own keys (`Some` exactly for that class).
    pub dpm_solver: Option<DpmSolverOptions>,
}

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, SchedulerError> {
        let source = path.display().to_string();
        let value = crate::loading::read_json_file(path)?;
        Self::from_json(&value, &source)
    }

    /// Parses an already-loaded scheduler config; `source_name` (a path or a name) is used in
    /// error messages.
    pub fn from_json(value: &Value, source_name: &str) -> Result<Self, SchedulerError> {
        let keys = Keys::parse(value, source_name)?;
        let class_name = keys
            .j
            .class_name
            .clone()
            .ok_or_else(|| SchedulerError::ModelFile {
                path: source_name.to_string(),
                message: "missing key `_class_name`; expected a diffusers scheduler config"
                    .to_string(),
            })?;
        let kind = match class_name.as_str() {
            "PNDMScheduler" => SchedulerKind::Pndm,
            "DDIMScheduler" => SchedulerKind::Ddim,
            "EulerDiscreteScheduler" => SchedulerKind::EulerDiscrete,
            "DPMSolverMultistepScheduler" => SchedulerKind::DpmSolverMultistep,
            other => {
                return Err(SchedulerError::Unsupported(format!(
                    "scheduler config {source_name}: key `_class_name`: scheduler {other:?} is not \
                     supported; use PNDMScheduler, DDIMScheduler, EulerDiscreteScheduler or DPMSolverMultistepScheduler"
                )))
            }
        };
        let j = &keys.j;
        let is_euler = kind == SchedulerKind::EulerDiscrete;

        let num_train_timesteps = j.num_train_timesteps.unwrap_or(1000);
        if num_train_timesteps < 2 {
            return Err(keys.unsupported("num_train_timesteps", "must be at least 2"));
        }
        let beta_schedule = match j.beta_schedule.as_deref() {
            None | Some("linear") => BetaSchedule::Linear,
            Some("scaled_linear") => BetaSchedule::ScaledLinear,
            Some("squaredcos_cap_v2") => BetaSchedule::SquaredCosCapV2,
            Some(other) => {
                return Err(keys.unsupported(
                    "beta_schedule",
                    &format!(
                        "{other:?} is not supported; use linear, scaled_linear or squaredcos_cap_v2"
                    ),
                ))
            }
        };
        let trained_betas = j.trained_betas.clone();
        if let Some(betas) = &trained_betas {
            if betas.len() != num_train_timesteps {
                return Err(keys.unsupported(
                    "trained_betas",
                    &format!(
                        "has {} values but num_train_timesteps is {num_train_timesteps}; they must agree",
                        betas.len()
                    ),
                ));
            }
        }
        let timestep_spacing = match j.timestep_spacing.as_deref() {
            None if is_euler || kind == SchedulerKind::DpmSolverMultistep => {
                TimestepSpacing::Linspace
            }
            None => TimestepSpacing::Leading,
            Some("linspace") => TimestepSpacing::Linspace,
            Some("leading") => TimestepSpacing::Leading,
            Some("trailing") => TimestepSpacing::Trailing,
            Some(other) => {
                return Err(keys.unsupported(
                    "timestep_spacing",
                    &format!("{other:?} is not supported; use linspace, leading or trailing"),
                ))
            }
        };
        let prediction_type = match (kind, j.prediction_type.as_deref()) {
            (_, None | Some("epsilon")) => PredictionType::Epsilon,
            (_, Some("v_prediction")) => PredictionType::VPrediction,
            (SchedulerKind::Ddim, Some("sample")) => PredictionType::Sample,
            (SchedulerKind::DpmSolverMultistep, Some("sample")) => PredictionType::Sample,
            (SchedulerKind::EulerDiscrete, Some("sample" | "original_sample")) => {
                PredictionType::Sample
            }
            (_, Some(other)) => {
                let allowed = match kind {
                    SchedulerKind::Pndm => "epsilon or v_prediction",
                    _ => "epsilon, v_prediction or sample",
                };
                return Err(keys.unsupported(
                    "prediction_type",
                    &format!(
                        "{other:?} is not supported by {}; use {allowed}",
                        kind.class_name()
                    ),
                ));
            }
        };
        let interpolation_type = match j.interpolation_type.as_deref() {
            None | Some("linear") => InterpolationType::Linear,
            Some(_) if !is_euler => InterpolationType::Linear,
            Some("log_linear") => InterpolationType::LogLinear,
            Some(other) => {
                return Err(keys.unsupported(
                    "interpolation_type",
                    &format!("{other:?} is not supported; use linear or log_linear"),
                ))
            }
        };
        let timestep_type = match j.timestep_type.as_deref() {
            None | Some("discrete") => TimestepType::Discrete,
            Some(_) if !is_euler => TimestepType::Discrete,
            Some("continuous") => TimestepType::Continuous,
            Some(other) => {
                return Err(keys.unsupported(
                    "timestep_type",
                    &format!("{other:?} is not supported; use discrete or continuous"),
                ))
            }
        };
        let final_sigmas_type = match j.final_sigmas_type.as_deref() {
            None | Some("zero") => FinalSigmasType::Zero,
            Some(_) if !is_euler => FinalSigmasType::Zero,
            Some("sigma_min") => FinalSigmasType::SigmaMin,
            Some(other) => {
                return Err(keys.unsupported(
                    "final_sigmas_type",
                    &format!("{other:?} is not supported; use zero or sigma_min"),
                ))
            }
        };
        let thresholding = kind == SchedulerKind::Ddim && j.thresholding.unwrap_or(false);
        if thresholding {
            return Err(keys.unsupported(
                "thresholding",
                "dynamic thresholding is not supported by this build; set it to false",
            ));
        }
        let use_karras_sigmas = is_euler && j.use_karras_sigmas.unwrap_or(false);
        let use_exponential_sigmas = is_euler && j.use_exponential_sigmas.unwrap_or(false);
        if is_euler && j.use_beta_sigmas.unwrap_or(false) {
            return Err(keys.unsupported(
                "use_beta_sigmas",
                "beta sigmas are not supported by this build; set it to false",
            ));
        }
        if use_karras_sigmas && use_exponential_sigmas {
            return Err(keys.unsupported(
                "use_karras_sigmas",
                "only one of use_karras_sigmas and use_exponential_sigmas can be true",
            ));
        }

        Ok(SchedulerConfig {
            source: source_name.to_string(),
            kind,
            num_train_timesteps,
            beta_start: j.beta_start.unwrap_or(0.0001),
            beta_end: j.beta_end.unwrap_or(0.02),
            beta_schedule,
            trained_betas,
            skip_prk_steps: j.skip_prk_steps.unwrap_or(false),
            set_alpha_to_one: j.set_alpha_to_one.unwrap_or(kind == SchedulerKind::Ddim),
            steps_offset: j.steps_offset.unwrap_or(0),
            timestep_spacing,
            prediction_type,
            clip_sample: j.clip_sample.unwrap_or(kind == SchedulerKind::Ddim),
            clip_sample_range: j.clip_sample_range.unwrap_or(1.0),
            thresholding,
            rescale_betas_zero_snr: kind != SchedulerKind::Pndm
                && j.rescale_betas_zero_snr.unwrap_or(false),
            interpolation_type,
            use_karras_sigmas,
            use_exponential_sigmas,
            sigma_min: j.sigma_min,
            sigma_max: j.sigma_max,
            timestep_type,
            final_sigmas_type,
            dpm_solver: if kind == SchedulerKind::DpmSolverMultistep {
                Some(dpm_solver_multistep::parse_options(&keys)?)
            } else {
                None
            },
        })
    }

    /// Builds the scheduler set up for `num_inference_steps` denoising steps (diffusers'
    /// constructor followed by `set_timesteps`).
    pub fn build(&self, num_inference_steps: usize) -> Result<Box<dyn Scheduler>, SchedulerError> {
        if num_inference_steps == 0 {
            return Err(SchedulerError::InvalidArgument(
                "the number of inference steps must be at least 1".to_string(),
            ));
        }
        if num_inference_steps > self.num_train_timesteps {
            return Err(self.invalid_steps(format!(
                "pipeline_call_args.num_inference_steps = {num_inference_steps} is more than the \
                 scheduler's num_train_timesteps = {} (diffusers refuses it too); use at most {}",
                self.num_train_timesteps, self.num_train_timesteps
            )));
        }
        Ok(match self.kind {
            SchedulerKind::Pndm => Box::new(PndmScheduler::new(self, num_inference_steps)?),
            SchedulerKind::Ddim => Box::new(DdimScheduler::new(self, num_inference_steps)?),
            SchedulerKind::EulerDiscrete => {
                Box::new(EulerDiscreteScheduler::new(self, num_inference_steps)?)
            }
            SchedulerKind::DpmSolverMultistep => {
                Box::new(DpmSolverMultistepScheduler::new(self, num_inference_steps)?)
            }
        })
    }

    /// The training betas as diffusers computes them (float32), before any zero-SNR rescaling.
    pub fn betas(&self) -> Vec<f32> {
        if let Some(betas) = &self.trained_betas {
            return betas.iter().map(|&b| b as f32).collect();
        }
        let n = self.num_train_timesteps;
        match self.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(self.beta_start, self.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredCosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
        }
    }

    /// The scheduler's cumulative products of `1 - beta` (diffusers' `alphas_cumprod`,
    /// float32): after zero-SNR rescaling when `rescale_betas_zero_snr` is set, where Euler
    /// also raises the last value from 0 to `2^-24` so the first sigma stays finite.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let mut betas = self.betas();
        if self.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = cumprod_f32(&alphas);
        if self.rescale_betas_zero_snr && self.kind == SchedulerKind::EulerDiscrete {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        alphas_cumprod
    }

    fn invalid_steps(&self, message: String) -> SchedulerError {
        SchedulerError::InvalidArgument(format!("scheduler config {}: {message}", self.source))
    }
}

/// A diffusers `scheduler_config.json` as the file has it: every key any supported class reads
/// (all optional; each class applies its own defaults).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SchedulerConfigJson {
    /// The scheduler class.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Training timesteps.
    #[serde(default)]
    pub num_train_timesteps: Option<usize>,
    /// First beta.
    #[serde(default)]
    pub beta_start: Option<f64>,
    /// Last beta.
    #[serde(default)]
    pub beta_end: Option<f64>,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    #[serde(default)]
    pub beta_schedule: Option<String>,
    /// Explicit betas, one per training timestep.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// `linspace`, `leading` or `trailing`.
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// `epsilon`, `v_prediction`, `sample` (...).
    #[serde(default)]
    pub prediction_type: Option<String>,
    /// Euler: `linear` or `log_linear`.
    #[serde(default)]
    pub interpolation_type: Option<String>,
    /// Euler: `discrete` or `continuous`.
    #[serde(default)]
    pub timestep_type: Option<String>,
    /// Euler, DPM-Solver: `zero` or `sigma_min`.
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    /// Added to the leading timesteps.
    #[serde(default)]
    pub steps_offset: Option<i64>,
    /// PNDM: PLMS only.
    #[serde(default)]
    pub skip_prk_steps: Option<bool>,
    /// DDIM/PNDM: the final alpha product is 1.
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// DDIM: clip the predicted sample.
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// DDIM: the clipping range.
    #[serde(default)]
    pub clip_sample_range: Option<f64>,
    /// Dynamic thresholding (refused).
    #[serde(default)]
    pub thresholding: Option<bool>,
    /// Zero terminal SNR rescaling.
    #[serde(default)]
    pub rescale_betas_zero_snr: Option<bool>,
    /// Euler: Karras sigmas.
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    /// Euler: exponential sigmas.
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
    /// Beta sigmas (refused).
    #[serde(default)]
    pub use_beta_sigmas: Option<bool>,
    /// DPM-Solver: Lu lambdas (refused).
    #[serde(default)]
    pub use_lu_lambdas: Option<bool>,
    /// DPM-Solver: flow sigmas (refused).
    #[serde(default)]
    pub use_flow_sigmas: Option<bool>,
    /// Flow matching: resolution-dependent shift.
    #[serde(default)]
    pub use_dynamic_shifting: Option<bool>,
    /// Flow matching: inverted sigmas (refused).
    #[serde(default)]
    pub invert_sigmas: Option<bool>,
    /// Flow matching: stochastic sampling (refused).
    #[serde(default)]
    pub stochastic_sampling: Option<bool>,
    /// Euler: smallest sigma of the Karras/exponential schedule.
    #[serde(default)]
    pub sigma_min: Option<f64>,
    /// Euler: largest sigma of the Karras/exponential schedule.
    #[serde(default)]
    pub sigma_max: Option<f64>,
    /// DPM-Solver: order 1, 2 or 3.
    #[serde(default)]
    pub solver_order: Option<usize>,
    /// DPM-Solver: `dpmsolver++` or `dpmsolver`.
    #[serde(default)]
    pub algorithm_type: Option<String>,
    /// DPM-Solver: `midpoint` or `heun`.
    #[serde(default)]
    pub solver_type: Option<String>,
    /// DPM-Solver: lower orders for the last steps.
    #[serde(default)]
    pub lower_order_final: Option<bool>,
    /// DPM-Solver: an Euler last step.
    #[serde(default)]
    pub euler_at_final: Option<bool>,
    /// DPM-Solver: the log-SNR cut-off.
    #[serde(default)]
    pub lambda_min_clipped: Option<f64>,
    /// DPM-Solver: learned variance (refused).
    #[serde(default)]
    pub variance_type: Option<String>,
    /// Flow matching: static shift.
    #[serde(default)]
    pub shift: Option<f64>,
    /// Flow matching: `mu` at `base_image_seq_len`.
    #[serde(default)]
    pub base_shift: Option<f64>,
    /// Flow matching: `mu` at `max_image_seq_len`.
    #[serde(default)]
    pub max_shift: Option<f64>,
    /// Flow matching: tokens where `mu = base_shift`.
    #[serde(default)]
    pub base_image_seq_len: Option<usize>,
    /// Flow matching: tokens where `mu = max_shift`.
    #[serde(default)]
    pub max_image_seq_len: Option<usize>,
    /// Flow matching: terminal shift (refused).
    #[serde(default)]
    pub shift_terminal: Option<Value>,
    /// Flow matching: `exponential` (or refused).
    #[serde(default)]
    pub time_shift_type: Option<Value>,
}

/// The boolean keys: Python's `None` is falsy, so a `null` reads as false (not as the default).
const FLAGS: &[&str] = &[
    "skip_prk_steps",
    "set_alpha_to_one",
    "clip_sample",
    "thresholding",
    "rescale_betas_zero_snr",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "use_dynamic_shifting",
    "invert_sigmas",
    "stochastic_sampling",
    "lower_order_final",
    "euler_at_final",
];

/// A parsed scheduler config with the name of its source, for errors naming the file and key.
pub(crate) struct Keys<'a> {
    pub(crate) j: SchedulerConfigJson,
    source: &'a str,
}

impl<'a> Keys<'a> {
    /// Reads `value` through the typed config reader; `source` names it in errors.
    pub(crate) fn parse(value: &Value, source: &'a str) -> Result<Self, SchedulerError> {
        let mut value = value.clone();
        if let Value::Object(map) = &mut value {
            for key in FLAGS {
                if let Some(v) = map.get_mut(*key).filter(|v| v.is_null()) {
                    *v = Value::Bool(false);
                }
            }
        }
        Ok(Self {
            j: crate::loading::parse_config(&value, source)?,
            source,
        })
    }

    pub(crate) fn unsupported(&self, key: &str, message: &str) -> SchedulerError {
        SchedulerError::Unsupported(format!(
            "scheduler config {}: key `{key}`: {message}",
            self.source
        ))
    }
}

// ---- schedule arithmetic shared by the schedulers (mirrors torch/numpy bit for bit where
// ---- practical) ----

/// `torch.linspace(start, end, n, dtype=float32)` on CPU: a float32 step, each value one fused
/// multiply-add from the nearer end.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` of a float32 vector (torch accumulates in float64 on CPU).
fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut bar_sqrt: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = bar_sqrt[0];
    let last = bar_sqrt[bar_sqrt.len() - 1];
    let scale = first / (first - last);
    for v in &mut bar_sqrt {
        *v = (*v - last) * scale;
    }
    let bar: Vec<f32> = bar_sqrt.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    out.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// `np.linspace(start, stop, num)` in float64.
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut out: Vec<f64> = (0..num)
        .map(|i| {
            if step == 0.0 {
                i as f64 / div * delta + start
            } else {
                i as f64 * step + start
            }
        })
        .collect();
    out[num - 1] = stop;
    out
}

/// `np.arange(start, stop, step)` in float64 (numpy's length rule and fill rule).
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    // A NaN length (a zero step) or a non-positive one gives an empty range, as in numpy.
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// The integer timesteps of PNDM and DDIM as diffusers computes them for the configured
/// spacing, in ascending order.
fn integer_timesteps(config: &SchedulerConfig, steps: usize) -> Vec<i64> {
    let n_train = config.num_train_timesteps;
    match config.timestep_spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps)
            .into_iter()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (n_train / steps) as i64;
            (0..steps as i64)
                .map(|i| i * ratio + config.steps_offset)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            np_arange(n_train as f64, 0.0, -ratio)
                .into_iter()
                .rev()
                .map(|t| t.round_ties_even() as i64 - 1)
                .collect()
        }
    }
}

/// The dtype the step math runs in for a sample of `dtype` (see the module docs).
fn work_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `t / divisor` with a true division (not a multiplication by the reciprocal), as torch does.
fn div_scalar(t: &Tensor, divisor: f64) -> candle_core::Result<Tensor> {
    let d = Tensor::new(divisor, t.device())?.to_dtype(t.dtype())?;
    t.broadcast_div(&d)
}

/// `t * factor` in `t`'s dtype.
fn mul_scalar(t: &Tensor, factor: f64) -> candle_core::Result<Tensor> {
    t.affine(factor, 0.0)
}

/// Looks up `alphas_cumprod[timestep]` for an integer timestep, or explains why it cannot.
fn alpha_at(alphas_cumprod: &[f32], timestep: i64) -> candle_core::Result<f32> {
    usize::try_from(timestep)
        .ok()
        .and_then(|t| alphas_cumprod.get(t).copied())
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "timestep {timestep} is outside the training schedule (0..{})",
                alphas_cumprod.len()
            ))
        })
}

/// Converts a timestep passed to `step` into the integer training timestep it must be.
fn integer_timestep(timestep: f64) -> candle_core::Result<i64> {
    if timestep.fract() != 0.0 || !timestep.is_finite() {
        return Err(candle_core::Error::Msg(format!(
            "timestep {timestep} is not an integer training timestep; pass one of the scheduler's timesteps"
        )));
    }
    Ok(timestep as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn np_arange_matches_numpy_length_quirk() {
        // np.arange(1000, 0, -1000/61) has 62 elements in numpy.
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 50.0).len(), 50);
    }

    #[test]
    fn np_linspace_ends_exactly_at_stop() {
        let v = np_linspace(0.0, 999.0, 7);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[6], 999.0);
        assert_eq!(v[3], 499.5);
    }
}
