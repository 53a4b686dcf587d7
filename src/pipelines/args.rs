//! `pipeline_call_args`: what the config forwards to the pipeline call, read and checked against
//! the model's family ([`super::registry`]) before anything loads.

use crate::keys::{KeyError, Section};

/// The keys of `pipeline_call_args`.
pub const KEYS: [&str; 7] = [
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "max_sequence_length",
    "clean_caption",
];

/// The most denoising steps a config may ask for: diffusers' schedulers train on 1000
/// timesteps, and a pipeline refuses more steps than its scheduler's `num_train_timesteps`.
pub const MAX_INFERENCE_STEPS: u64 = 1000;

/// `pipeline_call_args`: forwarded to the pipeline call. Absent values take the model's defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallArgs {
    /// Image height in pixels; a multiple of the model's factor (8, or 16 for Flux).
    pub height: Option<usize>,
    /// Image width in pixels; a multiple of the model's factor.
    pub width: Option<usize>,
    /// Denoising steps (>= 1).
    pub num_inference_steps: Option<usize>,
    /// Classifier-free guidance scale (Flux: the guidance embedding).
    pub guidance_scale: Option<f64>,
    /// Negative prompt for classifier-free guidance.
    pub negative_prompt: Option<String>,
    /// Text encoder token budget (T5-based models).
    pub max_sequence_length: Option<usize>,
    /// PixArt caption cleaning.
    pub clean_caption: Option<bool>,
}

impl CallArgs {
    /// Reads `pipeline_call_args` for `model`, whose height and width must be multiples of
    /// `factor` (the model's size factor, [`super::registry::size_factor`]).
    pub fn read(s: &Section<'_>, model: &str, factor: usize) -> Result<Self, KeyError> {
        s.check_keys(&KEYS);
        let mut dims = [None, None];
        for (slot, key) in dims.iter_mut().zip(["height", "width"]) {
            let v = s.uint(key, 1)?.and_then(|v| usize::try_from(v).ok());
            if let Some(v) = v {
                if v % factor != 0 {
                    return Err(s.invalid(
                        key,
                        format!(
                            "is {v}; it must be a multiple of {factor} for {model} (e.g. {})",
                            (v / factor).max(1) * factor
                        ),
                    ));
                }
                if v > 8192 {
                    return Err(s.invalid(key, format!("is {v}; at most 8192")));
                }
            }
            *slot = v;
        }
        Ok(CallArgs {
            height: dims[0],
            width: dims[1],
            num_inference_steps: s.count_in("num_inference_steps", 1, MAX_INFERENCE_STEPS)?,
            guidance_scale: s.number_in("guidance_scale", (-1000.0, false), 1000.0)?,
            negative_prompt: s.string("negative_prompt")?,
            max_sequence_length: s.count_in("max_sequence_length", 1, 4096)?,
            clean_caption: s.boolean("clean_caption")?,
        })
    }

    /// Whether the call argument `key` (one of [`KEYS`]) is set.
    pub fn is_set(&self, key: &str) -> bool {
        match key {
            "height" => self.height.is_some(),
            "width" => self.width.is_some(),
            "num_inference_steps" => self.num_inference_steps.is_some(),
            "guidance_scale" => self.guidance_scale.is_some(),
            "negative_prompt" => self.negative_prompt.is_some(),
            "max_sequence_length" => self.max_sequence_length.is_some(),
            "clean_caption" => self.clean_caption.is_some(),
            _ => false,
        }
    }
}
