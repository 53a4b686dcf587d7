//! Qwen2.5-VL (vision encoder + Qwen2 language model with multimodal rotary positions) in
//! candle. [`crate::loading::qwen`] loads it from a Hugging Face repo or folder in the Hub
//! layout (`config.json`, `model.safetensors` or `model-0000x-of-0000N.safetensors` + index,
//! `tokenizer.json`, `preprocessor_config.json`). Used by the local `qwen` verifier.

pub mod processor;
pub mod text;
pub mod vision;

use candle_core::{Device, Tensor};

use serde_json::Value;
use tokenizers::Tokenizer;

pub use processor::{ImageProcessorConfig, ProcessedImage};
pub use text::{AttentionPath, KvCache, TextModel};
pub use vision::VisionModel;

/// Why the Qwen2.5-VL model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum QwenError {
    /// A file could not be fetched or read (the loader's message, naming the file).
    #[error("{0}")]
    Source(String),
    /// A configuration file lacks a key or has a wrong value.
    #[error("{path}: {message}")]
    Config {
        /// The file (and JSON path) in question.
        path: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// `tokenizer.json` could not be loaded or used.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// An input image cannot be processed.
    #[error("image: {0}")]
    Image(String),
    /// A tensor operation failed (including missing or misshapen weights).
    #[error("Qwen2.5-VL tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The vision tower's settings (`vision_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    /// Transformer blocks (32 for 7B).
    pub depth: usize,
    /// Width (1280).
    pub hidden_size: usize,
    /// MLP width (3420).
    pub intermediate_size: usize,
    /// Attention heads (16).
    pub num_heads: usize,
    /// Image channels (3).
    pub in_channels: usize,
    /// Patch side in pixels (14).
    pub patch_size: usize,
    /// Patches merged per side (2).
    pub spatial_merge_size: usize,
    /// Frames per patch (2).
    pub temporal_patch_size: usize,
    /// Window side in pixels for window attention (112).
    pub window_size: usize,
    /// Output width (the language model's hidden size).
    pub out_hidden_size: usize,
    /// Blocks with full (not windowed) attention.
    pub fullatt_block_indexes: Vec<usize>,
    /// Rotary base (10000).
    pub rope_theta: f64,
}

/// The language model's settings (`text_config`, or the top level of older configs).
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// Rotary frequencies driven by the temporal, height and width positions (sums to
    /// head_dim / 2).
    pub mrope_section: Vec<usize>,
}

/// `config.json` of a Qwen2.5-VL model.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen25VlConfig {
    /// The vision tower.
    pub vision: VisionConfig,
    /// The language model.
    pub text: TextConfig,
    /// `<|image_pad|>`.
    pub image_token_id: u32,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

struct Reader<'a> {
    path: &'a str,
}

impl Reader<'_> {
    fn err(&self, key: &str, what: &str) -> QwenError {
        QwenError::Config {
            path: format!("{} ({key})", self.path),
            message: what.to_string(),
        }
    }
    fn usize(&self, v: &Value, key: &str, at: &str) -> Result<usize, QwenError> {
        v.get(key)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| {
                self.err(
                    &format!("{at}{key}"),
                    "missing or not a non-negative integer",
                )
            })
    }
    fn usize_or(&self, v: &Value, key: &str, default: usize) -> usize {
        v.get(key)
            .and_then(Value::as_u64)
            .map_or(default, |x| x as usize)
    }
}

impl Qwen25VlConfig {
    /// Parses `config.json` (transformers 4.x layout with text keys at the top level and
    /// `rope_scaling`, or 5.x with `text_config` and `rope_parameters`). `path` names the file.
    pub fn from_json(v: &Value, path: &str) -> Result<Self, QwenError> {
        let r = Reader { path };
        let (t, at) = match v.get("text_config") {
            Some(t) if t.get("hidden_size").is_some() => (t, "text_config."),
            _ => (v, ""),
        };
        let vc = v
            .get("vision_config")
            .ok_or_else(|| r.err("vision_config", "missing; is this a Qwen2.5-VL model?"))?;
        let rope = t
            .get("rope_parameters")
            .or_else(|| t.get("rope_scaling"))
            .or_else(|| v.get("rope_scaling"));
        let rope_theta = t
            .get("rope_theta")
            .or_else(|| rope.and_then(|r| r.get("rope_theta")))
            .and_then(Value::as_f64)
            .unwrap_or(1_000_000.0);
        let heads = r.usize(t, "num_attention_heads", at)?;
        let hidden = r.usize(t, "hidden_size", at)?;
        if heads == 0 || hidden % heads != 0 {
            return Err(r.err("num_attention_heads", "must divide hidden_size"));
        }
        let half = hidden / heads / 2;
        let mrope_section: Vec<usize> = match rope.and_then(|r| r.get("mrope_section")) {
            Some(s) => s
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_u64)
                        .map(|x| x as usize)
                        .collect()
                })
                .unwrap_or_default(),
            None => vec![16, 24, 24],
        };
        if mrope_section.iter().sum::<usize>() != half {
            return Err(r.err(
                "rope_scaling.mrope_section",
                &format!("must sum to head_dim / 2 = {half}, got {mrope_section:?}"),
            ));
        }
        let text = TextConfig {
            vocab_size: r.usize(t, "vocab_size", at)?,
            hidden_size: hidden,
            intermediate_size: r.usize(t, "intermediate_size", at)?,
            num_hidden_layers: r.usize(t, "num_hidden_layers", at)?,
            num_attention_heads: heads,
            num_key_value_heads: r.usize_or(t, "num_key_value_heads", heads),
            rms_norm_eps: t
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            mrope_section,
        };
        if text.num_key_value_heads == 0 || heads % text.num_key_value_heads != 0 {
            return Err(r.err("num_key_value_heads", "must divide num_attention_heads"));
        }
        let vat = "vision_config.";
        let vheads = r.usize(vc, "num_heads", vat)?;
        let vhidden = r.usize(vc, "hidden_size", vat)?;
        if vheads == 0 || vhidden % (vheads * 4) != 0 {
            return Err(r.err(
                "vision_config.num_heads",
                "hidden_size / num_heads must be a multiple of 4",
            ));
        }
        let vision = VisionConfig {
            depth: r.usize(vc, "depth", vat)?,
            hidden_size: vhidden,
            intermediate_size: r.usize(vc, "intermediate_size", vat)?,
            num_heads: vheads,
            in_channels: vc
                .get("in_channels")
                .or_else(|| vc.get("in_chans"))
                .and_then(Value::as_u64)
                .map_or(3, |x| x as usize),
            patch_size: r.usize_or(vc, "patch_size", 14),
            spatial_merge_size: r.usize_or(vc, "spatial_merge_size", 2),
            temporal_patch_size: r.usize_or(vc, "temporal_patch_size", 2),
            window_size: r.usize_or(vc, "window_size", 112),
            out_hidden_size: r.usize_or(vc, "out_hidden_size", hidden),
            fullatt_block_indexes: vc
                .get("fullatt_block_indexes")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_u64)
                        .map(|x| x as usize)
                        .collect()
                })
                .unwrap_or_else(|| vec![7, 15, 23, 31]),
            rope_theta: vc
                .get("rope_parameters")
                .and_then(|r| r.get("rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0),
        };
        if vision.out_hidden_size != hidden {
            return Err(r.err(
                "vision_config.out_hidden_size",
                &format!("must equal the language model's hidden_size {hidden}"),
            ));
        }
        let image_token_id = v
            .get("image_token_id")
            .and_then(Value::as_u64)
            .unwrap_or(151_655) as u32;
        let tie_word_embeddings = v
            .get("tie_word_embeddings")
            .or_else(|| t.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Self {
            vision,
            text,
            image_token_id,
            tie_word_embeddings,
        })
    }
}

/// A loaded Qwen2.5-VL: processor settings, tokenizer, vision tower and language model.
pub struct Qwen25Vl {
    /// `config.json`.
    pub config: Qwen25VlConfig,
    /// `preprocessor_config.json`.
    pub processor: ImageProcessorConfig,
    /// `tokenizer.json`.
    pub tokenizer: Tokenizer,
    /// The vision tower.
    pub vision: VisionModel,
    /// The language model and head.
    pub text: TextModel,
}

impl Qwen25Vl {
    /// Token ids of `text` (special tokens such as `<|im_start|>` recognised).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, QwenError> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| QwenError::Tokenizer {
                path: "tokenizer.json".into(),
                message: e.to_string(),
            })
    }

    /// The vision features (tokens, hidden) of a processed image.
    pub fn image_features(&self, img: &ProcessedImage) -> Result<Tensor, QwenError> {
        let n = img.grid_thw.iter().product::<usize>();
        let dim = self.processor.patch_dim();
        let pv = Tensor::from_slice(&img.pixel_values, (n, dim), &Device::Cpu)?;
        Ok(self.vision.forward(&pv, img.grid_thw)?)
    }
}
