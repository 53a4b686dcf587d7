//! Network code of our own, where candle-transformers lacks a piece or differs from
//! diffusers/transformers: the CLIP tokenizer built from `vocab.json` + `merges.txt`, and the
//! CLIP text encoder configured from its `config.json`.

pub mod clip_text;
pub mod clip_tokenizer;
pub mod flux_transformer;
pub mod pixart;
pub mod qwen2_5_vl;
pub mod t5;
pub mod unet;
pub mod vae;
