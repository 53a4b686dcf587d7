//! CUDA against the CPU (built with `--features cuda`, run on a GPU by `bench/gpu-check.sh`):
//! the pipelines, and every fused kernel against its CPU implementation.
#![cfg(feature = "cuda")]

#[path = "../common/tensors.rs"]
mod tensors;

mod kernels;
mod pipelines;
