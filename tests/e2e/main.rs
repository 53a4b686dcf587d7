//! End to end: the `tt-scale` binary on the tiny models with the loopback fake judges, as a user
//! runs it, for every pipeline and the local Qwen judge.

#[path = "../common/fake_verifier.rs"]
mod fake_verifier;

mod flux;
mod pixart;
mod qwen;
mod resume;
mod sd15;
mod sdxl;
mod strategies;
mod sweep;
