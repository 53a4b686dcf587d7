//! tt-scale: inference-time scaling for text-to-image diffusion models.
//!
//! The modules form layers; each imports only from the layers below it (a test,
//! `tests/unit/architecture.rs`, reads every `crate::` path and fails on an upward one):
//!
//! ```text
//!  bench                      benchmarks of every layer below (tt-scale bench)
//!  rescore                    grade a finished run's media with another verifier
//!  cli                        the argument parser: the command line into a run's options
//!  run                        a run: its plan -> prompts -> search -> files; resume, workers
//!  report                     report.html: scaling curves and every round's thumbnails
//!  collage, sweep             collages of a run folder; shards of a sweep, status, merge
//!  config, output             the experiment file, each section read by its owner below;
//!                             every file format: run folders, media, round JSON, journals
//!  search                     the strategies (registry: random, zero-order, paths, particles);
//!                             its observer and store are the layers above
//!  verifiers                  judges (registry: Gemini, OpenAI(-compatible), local Qwen2.5-VL,
//!                             CLIP, PickScore, HPSv2, ImageReward, the ensemble)
//!  pipelines                  the model families (registry: SD 1.5, SDXL, PixArt-Sigma, Flux)
//!                             on one shared denoise loop
//!  schedulers                 diffusers' schedulers
//!  loading, prompts           Hub / local files, weights mmap, the typed JSON-config reader;
//!                             prompt files and the Hub dataset
//!  models                     the networks, their serde-derived configs, ModelError
//!  ops                        fused kernels (CUDA, cuDNN), their CPU references, OpenBLAS
//!  noise, device, files, hub, torch-exact seeded noise; the one device parser; bounded reads
//!  media, keys                and atomic writes; Hub HTTP with timeouts and retries; images and
//!                             videos; the reader of config sections
//! ```

pub mod device;
pub mod files;
pub mod hub;
pub mod keys;
pub mod media;
pub mod noise;
pub mod ops;

pub mod models;

pub mod loading;
pub mod prompts;

pub mod schedulers;

pub mod pipelines;
pub mod verifiers;

pub mod search;

pub mod config;
pub mod output;

pub mod collage;
pub mod sweep;

pub mod report;

pub mod run;

pub mod cli;

pub mod rescore;

pub mod bench;

#[cfg(test)]
mod extension_tests;
