//! tt-scale: inference-time scaling for text-to-image diffusion models.
//!
//! Data flows one way: [`config`] -> [`prompts`] -> [`search`] (asks a [`pipelines`] pipeline for
//! images of [`noise`] tensors, asks a [`verifiers`] verifier for scores) -> [`output`].

pub mod bench;
pub mod cli;
pub mod collage;
pub mod config;
pub mod models;
pub mod noise;
pub mod ops;
pub mod output;
pub mod pipelines;
pub mod prompts;
pub mod run;
pub mod search;
pub mod verifiers;
