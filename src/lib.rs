//! tt-scale: inference-time scaling for text-to-image diffusion models.
//!
//! The modules form layers; each imports only from the layers below it (a test,
//! `tests/unit/architecture.rs`, reads every `crate::` path and fails on an upward one):
//!
//! ```text
//!  bench                      benchmarks of every layer below (tt-scale bench)
//!  rescore                    grade a finished run's images with another verifier
//!  cli, run                   the argument parser; a run: prompts -> search -> files
//!  report                     report.html: scaling curves and every round's thumbnails
//!  collage, sweep             collages of a run folder; shards of a sweep, status, merge
//!  output                     every file format: run folders, PNGs, the per-round JSON, journals
//!  search                     random / zero-order search; its observer is the layer above
//!  verifiers                  judges: Gemini, OpenAI(-compatible), local Qwen2.5-VL, the
//!                             local reward models (CLIP, PickScore, HPSv2, ImageReward), ensemble
//!  pipelines                  Flux, SDXL, PixArt-Sigma, SD 1.5 on one shared denoise loop
//!  config                     the experiment file, typed and validated
//!  schedulers                 diffusers' schedulers
//!  prompts                    prompt files and the Hub dataset
//!  loading                    Hub / local files, weights mmap, the typed JSON-config reader
//!  models                     the networks, their serde-derived configs, ModelError
//!  ops                        fused kernels (CUDA, cuDNN), their CPU references, OpenBLAS
//!  noise, device, files, hub  torch-exact seeded noise; the one device parser; bounded reads
//!                             and atomic writes; Hub HTTP with timeouts and retries
//! ```

pub mod device;
pub mod files;
pub mod hub;
pub mod noise;
pub mod ops;

pub mod models;

pub mod loading;
pub mod prompts;

pub mod schedulers;

pub mod config;

pub mod pipelines;

pub mod search;
pub mod verifiers;

pub mod collage;
pub mod output;
pub mod sweep;

pub mod report;

pub mod cli;
pub mod run;

pub mod rescore;

pub mod bench;
