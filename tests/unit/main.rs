//! Unit and interface tests that need no model: the architecture's layering, the command line,
//! configs, prompts, noise, schedulers, verifiers against loopback fake servers, the fused ops'
//! CPU implementations, and the CUDA kernels under the host-compiled emulator. One binary, so
//! that candle, tokio and parquet are linked once.

#[path = "../common/fake_verifier.rs"]
mod fake_verifier;
#[path = "../common/tensors.rs"]
mod tensors;

mod architecture;
mod caption;
mod cli;
mod cuda_emulated;
mod hub;
mod model_configs;
mod noise;
mod ops;
mod prompts;
mod schedulers;
mod t5_tokenizer;
mod verifiers;
