//! CLIP's byte-level BPE tokenizer built from a diffusers `tokenizer/` folder that holds only
//! `vocab.json` + `merges.txt` (no `tokenizer.json`), equal to transformers' `CLIPTokenizer`
//! called as diffusers calls it: `padding="max_length"`, `truncation=True`.

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::models::ModelError;

/// CLIP's pre-tokenization pattern (transformers' `CLIPTokenizer`).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP tokenizer that turns a prompt into exactly `max_length` ids:
/// `[bos, tokens (truncated to max_length - 2)..., eos, pad...]`.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

/// Reads a token given either as a string or as an `AddedToken` object with `content`.
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn read_json_if_exists(path: &Path) -> Result<Option<Value>, ModelError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::ModelFile {
        path: path.display().to_string(),
        message: format!("cannot read: {e}"),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::ModelFile {
            path: path.display().to_string(),
            message: format!("invalid JSON: {e}"),
        })
}

impl ClipTokenizer {
    /// Builds the tokenizer from the files of a diffusers `tokenizer/` folder: `vocab.json`,
    /// `merges.txt`, and optionally `tokenizer_config.json` / `special_tokens_map.json`
    /// (BOS/EOS/pad tokens, `model_max_length`; defaults are CLIP's: `<|startoftext|>`,
    /// `<|endoftext|>`, pad = EOS, 77).
    pub fn from_files(
        vocab: &Path,
        merges: &Path,
        tokenizer_config: Option<&Path>,
        special_tokens_map: Option<&Path>,
    ) -> Result<Self, ModelError> {
        let mut bos = "<|startoftext|>".to_string();
        let mut eos = "<|endoftext|>".to_string();
        let mut pad: Option<String> = None;
        let mut max_length = 77usize;
        // special_tokens_map.json first, tokenizer_config.json overrides (as transformers merges them).
        for file in [special_tokens_map, tokenizer_config].into_iter().flatten() {
            if let Some(json) = read_json_if_exists(file)? {
                if let Some(t) = json.get("bos_token").and_then(token_content) {
                    bos = t;
                }
                if let Some(t) = json.get("eos_token").and_then(token_content) {
                    eos = t;
                }
                if let Some(t) = json.get("pad_token").and_then(token_content) {
                    pad = Some(t);
                }
                if let Some(n) = json.get("model_max_length").and_then(Value::as_u64) {
                    // Some configs store a huge sentinel meaning "no limit"; CLIP's is 77.
                    if n <= 4096 {
                        max_length = n as usize;
                    }
                }
            }
        }
        let pad = pad.unwrap_or_else(|| eos.clone());
        let model_err = |path: &Path, e: String| ModelError::ModelFile {
            path: path.display().to_string(),
            message: e,
        };
        for p in [vocab, merges] {
            if !p.exists() {
                return Err(model_err(
                    p,
                    "not found; the tokenizer/ folder must hold vocab.json and merges.txt".into(),
                ));
            }
        }
        let bpe = BPE::from_file(&vocab.display().to_string(), &merges.display().to_string())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .unk_token(eos.clone())
            .build()
            .map_err(|e| {
                model_err(
                    merges,
                    format!("cannot build the BPE from vocab/merges: {e}"),
                )
            })?;
        let mut tokenizer = Tokenizer::new(bpe);
        let whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".to_string()),
            " ",
        )
        .map_err(|e| model_err(vocab, format!("normalizer: {e}")))?;
        tokenizer
            .with_normalizer(Some(NormalizerSequence::new(vec![
                NFC.into(),
                whitespace.into(),
                Lowercase.into(),
            ])))
            .map_err(|e| model_err(vocab, format!("normalizer: {e}")))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.to_string()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| model_err(vocab, format!("pre-tokenizer: {e}")))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        // transformers treats every special token as one unit that the BPE never merges: a pad
        // token other than BOS/EOS (SDXL's `tokenizer_2` pads with "!") is split out of prompts
        // too (`"moon!!"` gives `moon</w> ! !`).
        let mut special = vec![
            AddedToken::from(bos.clone(), true),
            AddedToken::from(eos.clone(), true),
        ];
        if pad != bos && pad != eos {
            special.push(AddedToken::from(pad.clone(), true));
        }
        tokenizer
            .add_special_tokens(special)
            .map_err(|e| model_err(vocab, format!("special tokens: {e}")))?;
        let id = |t: &str, path: &Path| {
            tokenizer.token_to_id(t).ok_or_else(|| {
                model_err(
                    path,
                    format!("special token {t:?} is not in the vocabulary"),
                )
            })
        };
        let bos_id = id(&bos, vocab)?;
        let eos_id = id(&eos, vocab)?;
        let pad_id = id(&pad, vocab)?;
        if max_length < 2 {
            return Err(model_err(
                tokenizer_config.unwrap_or(vocab),
                format!("model_max_length {max_length} leaves no room for BOS and EOS"),
            ));
        }
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            max_length,
        })
    }

    /// The fixed sequence length every prompt is padded/truncated to (`model_max_length`).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Token ids of `prompt`: BOS, the tokens (truncated so the whole fits `max_length`), EOS,
    /// then the pad id up to `max_length`.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self.tokenizer.encode(prompt, false).map_err(|e| {
            ModelError::InvalidArgument(format!("cannot tokenize the prompt {prompt:?}: {e}"))
        })?;
        let body = encoding.get_ids();
        let keep = body.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }
}
