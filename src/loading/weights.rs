//! Safetensors weights, memory-mapped and converted to the compute dtype tensor by tensor (no
//! full float32 staging copy). The one place weights are mapped.

use std::path::PathBuf;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::hub::ModelSource;
use super::{Dtype, LoadError};

/// The candle dtype of a config's `torch_dtype`.
pub fn candle_dtype(dtype: Dtype) -> DType {
    match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    }
}

/// Memory-maps a component's safetensors weights (the fp16 variant when `dtype` is fp16 and
/// the model has one), converting each tensor to `compute` as it is read.
pub fn var_builder(
    source: &ModelSource,
    component: &str,
    dtype: Dtype,
    compute: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, LoadError> {
    let files = source.weights(component, dtype)?;
    mmap(&files, compute, device)
}

/// Memory-maps safetensors `files` as one var builder whose tensors are converted to `dtype`
/// on `device` as they are read. An unreadable file is a [`LoadError::ModelFile`] naming it.
pub fn mmap(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, LoadError> {
    // SAFETY: the files are memory-mapped read-only; they are model files that neither this
    // process nor (by the user's contract with any model cache) another one modifies while they
    // are mapped, as candle's own loaders assume.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(|e| {
        LoadError::ModelFile {
            path: files
                .first()
                .map_or(String::new(), |p| p.display().to_string()),
            message: format!("cannot read the safetensors weights: {e}"),
        }
    })
}
