//! Parity with the reference implementations (diffusers, transformers): tiny random-weight
//! models in the real formats, written by `tools/reference/`, against their recorded outputs.

mod clip;
mod flux;
mod image_reward;
mod paths;
mod pixart;
mod qwen;
mod sd15;
mod sdxl;
