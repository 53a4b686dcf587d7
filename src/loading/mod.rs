//! Where a model's files come from and how they are read: a Hub repo or a local folder in
//! diffusers layout ([`hub`]), memory-mapped safetensors weights ([`weights`]), and the one typed
//! reader of JSON config files ([`json`]): `serde`-derived structs with defaults, whose errors
//! name the file and the JSON path of the offending key.

pub mod hub;
pub mod json;
pub mod qwen;
pub mod tokenizers;
pub mod weights;

pub use hub::ModelSource;
pub use json::{model_config, parse_config, read_config, read_json_file};
pub use weights::{candle_dtype, mmap, var_builder};

use crate::models::ModelError;

/// Weight and compute precision (`torch_dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// `"fp32"`
    F32,
    /// `"fp16"`
    F16,
    /// `"bf16"`
    Bf16,
}

impl Dtype {
    /// The config spelling: `fp32`, `fp16` or `bf16`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Dtype::F32 => "fp32",
            Dtype::F16 => "fp16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// The one parser of a dtype a user gives (`torch_dtype`, `tt-scale bench --dtype`):
    /// `fp32`, `fp16`, `bf16`, also `f32` and `f16`, any case, surrounding blanks ignored.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "f32" => Some(Dtype::F32),
            "fp16" | "f16" => Some(Dtype::F16),
            "bf16" => Some(Dtype::Bf16),
            _ => None,
        }
    }
}

/// Errors raised while finding, fetching or reading a model's files: the model stack's one
/// error type ([`ModelError`]), whose `Hub` variant is this layer's.
pub type LoadError = ModelError;
