//! A model folder's tokenizers and optional files: the CLIP tokenizer of a diffusers folder or
//! a transformers CLIP repo, the T5 tokenizer of Flux's and PixArt's folders. The pipelines and
//! the CLIP verifiers read them here.

use std::path::PathBuf;

use super::{LoadError, ModelSource};
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::t5::T5Tokenizer;

/// `Some(path)` when the model has `rel`, `None` when it does not.
pub fn optional_file(source: &ModelSource, rel: &str) -> Result<Option<PathBuf>, LoadError> {
    if source.has_file(rel)? {
        Ok(source.file(rel).map(Some)?)
    } else {
        Ok(None)
    }
}

/// The CLIP tokenizer of a diffusers `folder` (`tokenizer`, `tokenizer_2`; `""` for the root,
/// as transformers' CLIP repos have it): `vocab.json`, `merges.txt` and, when present,
/// `tokenizer_config.json` and `special_tokens_map.json`.
pub fn clip_tokenizer(source: &ModelSource, folder: &str) -> Result<ClipTokenizer, LoadError> {
    let rel = |file: &str| {
        if folder.is_empty() {
            file.to_string()
        } else {
            format!("{folder}/{file}")
        }
    };
    let config = optional_file(source, &rel("tokenizer_config.json"))?;
    let special = optional_file(source, &rel("special_tokens_map.json"))?;
    ClipTokenizer::from_files(
        &source.file(&rel("vocab.json"))?,
        &source.file(&rel("merges.txt"))?,
        config.as_deref(),
        special.as_deref(),
    )
}

/// The T5 tokenizer of a diffusers `folder` (Flux's `tokenizer_2`, PixArt's `tokenizer`):
/// `tokenizer.json` where the folder has one (transformers' fast tokenizer, as
/// `save_pretrained` writes it), else the SentencePiece `spiece.model`; either gives
/// transformers' ids.
pub fn t5_tokenizer(source: &ModelSource, folder: &str) -> Result<T5Tokenizer, LoadError> {
    let json = format!("{folder}/tokenizer.json");
    let spiece = format!("{folder}/spiece.model");
    if source.has_file(&json)? {
        T5Tokenizer::from_tokenizer_json(&source.file(&json)?)
    } else if source.has_file(&spiece)? {
        T5Tokenizer::from_spiece(&source.file(&spiece)?)
    } else {
        Err(LoadError::ModelFile {
            path: format!("{}/{folder}", source.display_name()),
            message: "has neither tokenizer.json nor spiece.model; the T5 tokenizer needs one of \
                      them"
                .into(),
        })
    }
}
