//! diffusers' `FlowMatchEulerDiscreteScheduler` as Flux uses it: explicit sigmas
//! (`linspace(1, 1/steps, steps)`), the resolution-dependent exponential time shift with `mu`
//! (`use_dynamic_shifting`) or the static `shift`, and the Euler step
//! `x + (sigma_next - sigma) * v`.
//!
//! Numerics follow diffusers with NumPy 2: the sigmas are float32 from the start and every
//! shift operation is float32; timesteps are `sigma * num_train_timesteps` in float32.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::Value;

use crate::schedulers::SchedulerError;

/// The keys of a `FlowMatchEulerDiscreteScheduler` `scheduler_config.json` that Flux uses.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowMatchConfig {
    /// Training timesteps (`num_train_timesteps`, default 1000).
    pub num_train_timesteps: usize,
    /// Static shift (`shift`, default 1.0), used when dynamic shifting is off.
    pub shift: f64,
    /// Resolution-dependent shift with `mu` (`use_dynamic_shifting`, default false).
    pub use_dynamic_shifting: bool,
    /// `mu` at `base_image_seq_len` (`base_shift`, default 0.5).
    pub base_shift: f64,
    /// `mu` at `max_image_seq_len` (`max_shift`, default 1.15).
    pub max_shift: f64,
    /// Packed image tokens where `mu = base_shift` (`base_image_seq_len`, default 256).
    pub base_image_seq_len: usize,
    /// Packed image tokens where `mu = max_shift` (`max_image_seq_len`, default 4096).
    pub max_image_seq_len: usize,
}

impl Default for FlowMatchConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
        }
    }
}

impl FlowMatchConfig {
    /// Reads a diffusers scheduler config; `source` names it in errors. Options this
    /// implementation lacks (Karras/exponential/beta sigmas, `invert_sigmas`, `shift_terminal`,
    /// stochastic sampling, linear time shift) are refused by name.
    pub fn from_json(value: &Value, source: &str) -> Result<Self, SchedulerError> {
        let j = super::Keys::parse(value, source)?.j;
        let class = j.class_name.as_deref().unwrap_or("");
        if class != "FlowMatchEulerDiscreteScheduler" {
            return Err(SchedulerError::Unsupported(format!(
                "{source}: scheduler {class:?} is not supported by the Flux pipeline \
                 (FlowMatchEulerDiscreteScheduler)"
            )));
        }
        for (key, on) in [
            ("use_karras_sigmas", j.use_karras_sigmas),
            ("use_exponential_sigmas", j.use_exponential_sigmas),
            ("use_beta_sigmas", j.use_beta_sigmas),
            ("invert_sigmas", j.invert_sigmas),
            ("stochastic_sampling", j.stochastic_sampling),
        ] {
            if on == Some(true) {
                return Err(SchedulerError::Unsupported(format!(
                    "{source}: {key} = true is not supported (expected false)"
                )));
            }
        }
        if j.shift_terminal.is_some() {
            return Err(SchedulerError::Unsupported(format!(
                "{source}: shift_terminal is not supported (expected null)"
            )));
        }
        if let Some(v) = j.time_shift_type.as_ref().filter(|v| *v != "exponential") {
            return Err(SchedulerError::Unsupported(format!(
                "{source}: time_shift_type = {v} is not supported (expected \"exponential\")"
            )));
        }
        let d = Self::default();
        let c = Self {
            num_train_timesteps: j.num_train_timesteps.unwrap_or(d.num_train_timesteps),
            shift: j.shift.unwrap_or(d.shift),
            use_dynamic_shifting: j.use_dynamic_shifting.unwrap_or(false),
            base_shift: j.base_shift.unwrap_or(d.base_shift),
            max_shift: j.max_shift.unwrap_or(d.max_shift),
            base_image_seq_len: j.base_image_seq_len.unwrap_or(d.base_image_seq_len),
            max_image_seq_len: j.max_image_seq_len.unwrap_or(d.max_image_seq_len),
        };
        if c.max_image_seq_len == c.base_image_seq_len {
            return Err(SchedulerError::ModelFile {
                path: source.to_string(),
                message: format!(
                    "key \"max_image_seq_len\": expected a value different from \
                     base_image_seq_len, found {}",
                    c.max_image_seq_len
                ),
            });
        }
        Ok(c)
    }

    /// Reads `scheduler/scheduler_config.json` from disk.
    pub fn from_file(path: &Path) -> Result<Self, SchedulerError> {
        let source = path.display().to_string();
        let value = crate::loading::read_json_file(path)?;
        Self::from_json(&value, &source)
    }

    /// FluxPipeline's `calculate_shift`: `mu` for `image_seq_len` packed tokens, linear between
    /// (`base_image_seq_len`, `base_shift`) and (`max_image_seq_len`, `max_shift`).
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }

    /// The scheduler after FluxPipeline's `set_timesteps(steps, sigmas=linspace(1, 1/steps,
    /// steps), mu)` for an image of `image_seq_len` packed tokens.
    pub fn build(
        &self,
        num_inference_steps: usize,
        image_seq_len: usize,
    ) -> Result<FlowMatchEulerScheduler, SchedulerError> {
        if num_inference_steps == 0 {
            return Err(SchedulerError::InvalidArgument(
                "pipeline_call_args.num_inference_steps must be at least 1".into(),
            ));
        }
        if num_inference_steps > self.num_train_timesteps {
            return Err(SchedulerError::InvalidArgument(format!(
                "pipeline_call_args.num_inference_steps = {num_inference_steps} is more than the \
                 scheduler's num_train_timesteps = {}; use at most {}",
                self.num_train_timesteps, self.num_train_timesteps
            )));
        }
        let n = num_inference_steps;
        // np.linspace(1.0, 1/n, n) in float64, then .astype(float32).
        let end = 1.0 / n as f64;
        let base: Vec<f32> = (0..n)
            .map(|i| {
                if n == 1 {
                    1.0
                } else if i == n - 1 {
                    end as f32
                } else {
                    (1.0 + i as f64 * ((end - 1.0) / (n - 1) as f64)) as f32
                }
            })
            .collect();
        let mut sigmas: Vec<f32> = if self.use_dynamic_shifting {
            let e = self.mu(image_seq_len).exp() as f32;
            base.iter().map(|&s| e / (e + (1.0 / s - 1.0))).collect()
        } else {
            let shift = self.shift as f32;
            base.iter()
                .map(|&s| shift * s / (1.0 + (shift - 1.0) * s))
                .collect()
        };
        let train = self.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|&s| f64::from(s * train)).collect();
        sigmas.push(0.0);
        Ok(FlowMatchEulerScheduler {
            sigmas,
            timesteps,
            step_index: 0,
        })
    }
}

/// One flow-matching Euler schedule (diffusers' scheduler after `set_timesteps`), a
/// [`Scheduler`](super::Scheduler) like the others: the model output is a velocity, the model
/// input is the sample as it is, and `init_noise_sigma` is 1.
#[derive(Clone, Debug)]
pub struct FlowMatchEulerScheduler {
    sigmas: Vec<f32>,
    /// `sigma * num_train_timesteps` in float32, as diffusers computes them, widened.
    timesteps: Vec<f64>,
    step_index: usize,
}

impl FlowMatchEulerScheduler {
    /// The sigmas, one per step and a final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl super::Scheduler for FlowMatchEulerScheduler {
    /// The timesteps (`sigma * num_train_timesteps`, float32 values), one per step.
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// One Euler step: `sample + (sigma_next - sigma) * model_output`, computed in float32 and
    /// returned in `model_output`'s dtype (as diffusers). Steps must be taken in order.
    fn step(
        &mut self,
        model_output: &Tensor,
        _timestep: f64,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let i = self.step_index;
        if i + 1 >= self.sigmas.len() {
            candle_core::bail!("flow-match scheduler stepped past its {} steps", i);
        }
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        let dtype = model_output.dtype();
        let out =
            (sample.to_dtype(DType::F32)? + (model_output.to_dtype(DType::F32)? * dt as f64)?)?;
        self.step_index += 1;
        out.to_dtype(dtype)
    }

    /// The noise levels: one per step and the final one, `alpha = 1 - t`, `sigma = t`.
    fn levels(&self) -> Vec<super::NoiseLevel> {
        self.sigmas
            .iter()
            .enumerate()
            .map(|(i, &s)| super::NoiseLevel {
                timestep: self.timesteps.get(i).copied().unwrap_or(0.0),
                alpha: 1.0 - f64::from(s),
                sigma: f64::from(s),
                fraction: f64::from(s),
            })
            .collect()
    }

    fn parameterization(&self) -> super::Parameterization {
        super::Parameterization::FlowVelocity
    }

    /// Starts at level `from` (diffusers' `set_begin_index`); the Euler step keeps no
    /// history, so a segment is the same steps as in a full run.
    fn begin_segment(&mut self, from: usize, to: usize) -> Result<Vec<f64>, SchedulerError> {
        super::check_segment(from, to, self.sigmas.len())?;
        self.step_index = from;
        Ok(self.timesteps[from..to].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> FlowMatchConfig {
        FlowMatchConfig::from_json(
            &serde_json::json!({
                "_class_name": "FlowMatchEulerDiscreteScheduler",
                "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
                "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                "use_dynamic_shifting": true
            }),
            "s.json",
        )
        .unwrap()
    }

    #[test]
    fn mu_is_base_shift_at_base_len_and_max_shift_at_max_len() {
        let c = dev();
        assert!((c.mu(256) - 0.5).abs() < 1e-12);
        assert!((c.mu(4096) - 1.15).abs() < 1e-12);
    }

    #[test]
    fn schedule_starts_at_one_and_ends_with_zero() {
        use crate::schedulers::Scheduler;
        let s = dev().build(4, 4096).unwrap();
        assert_eq!(s.sigmas().len(), 5);
        assert_eq!(s.sigmas()[0], 1.0);
        assert_eq!(*s.sigmas().last().unwrap(), 0.0);
        assert_eq!(s.timesteps()[0], 1000.0);
    }

    #[test]
    fn karras_sigmas_are_refused_by_name() {
        let err = FlowMatchConfig::from_json(
            &serde_json::json!({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                "use_karras_sigmas": true}),
            "s.json",
        )
        .unwrap_err();
        assert!(err.to_string().contains("use_karras_sigmas"), "{err}");
    }
}
