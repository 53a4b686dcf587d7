//! Weight loading and inputs shared by the pipelines.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::hub::ModelSource;
use super::PipelineError;
use crate::config::Dtype;
use crate::noise::Noise;

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
) -> Result<VarBuilder<'static>, PipelineError> {
    let files = source.weights(component, dtype)?;
    // SAFETY: the files are memory-mapped read-only; they are model files we do not modify,
    // as candle's own loaders assume.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, compute, device) }.map_err(|e| {
        PipelineError::ModelFile {
            path: files
                .first()
                .map_or(component.to_string(), |p| p.display().to_string()),
            message: format!("cannot read the safetensors weights: {e}"),
        }
    })
}

/// Stacks a batch of initial noises, each of `shape` (batch dimension 1), into one float32
/// tensor `(B, ...)` on `device`; a noise of another shape is an error naming it.
pub fn noise_batch(
    noises: &[Noise],
    shape: &[usize],
    device: &Device,
) -> Result<Tensor, PipelineError> {
    let mut rows = Vec::with_capacity(noises.len());
    for (i, noise) in noises.iter().enumerate() {
        if noise.shape != shape || noise.data.len() != shape.iter().product::<usize>() {
            return Err(PipelineError::InvalidArgument(format!(
                "noise {i} has shape {:?} ({} values); this pipeline needs {shape:?}",
                noise.shape,
                noise.data.len()
            )));
        }
        rows.push(Tensor::from_slice(&noise.data, shape, device)?);
    }
    Ok(Tensor::cat(&rows, 0)?)
}
