//! Qwen2.5-VL (vision encoder + Qwen2 language model with multimodal rotary positions) in
//! candle. [`crate::loading::qwen`] loads it from a Hugging Face repo or folder in the Hub
//! layout (`config.json`, `model.safetensors` or `model-0000x-of-0000N.safetensors` + index,
//! `tokenizer.json`, `preprocessor_config.json`). Used by the local `qwen` verifier.

pub mod processor;
pub mod text;
pub mod vision;

use candle_core::{Device, Tensor};

use serde::Deserialize;
use tokenizers::Tokenizer;

use super::ModelError;

pub use processor::{ImageProcessorConfig, ImageProcessorConfigJson, ProcessedImage};
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

/// Rotary settings (`rope_scaling` in transformers 4.x, `rope_parameters` in 5.x).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RopeJson {
    /// Rotary base.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Multimodal rotary sections (temporal, height, width).
    #[serde(default)]
    pub mrope_section: Option<Vec<usize>>,
}

/// The language model's keys: `text_config` (5.x), or the top level of `config.json` (4.x).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TextConfigJson {
    /// Vocabulary size.
    #[serde(default)]
    pub vocab_size: Option<usize>,
    /// Width.
    #[serde(default)]
    pub hidden_size: Option<usize>,
    /// MLP width.
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    /// Decoder layers.
    #[serde(default)]
    pub num_hidden_layers: Option<usize>,
    /// Query heads.
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// Key/value heads (default: the query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// RMSNorm epsilon (1e-6).
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    /// Rotary base (1e6).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// 5.x rotary settings.
    #[serde(default)]
    pub rope_parameters: Option<RopeJson>,
    /// 4.x rotary settings.
    #[serde(default)]
    pub rope_scaling: Option<RopeJson>,
    /// Whether the LM head shares the embedding matrix (when not at the top level).
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
}

/// `vision_config`.
#[derive(Clone, Debug, Deserialize)]
pub struct VisionConfigJson {
    /// Transformer blocks.
    pub depth: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Image channels (5.x name; default 3).
    #[serde(default)]
    pub in_channels: Option<usize>,
    /// Image channels (4.x name).
    #[serde(default)]
    pub in_chans: Option<usize>,
    /// Patch side (14).
    #[serde(default)]
    pub patch_size: Option<usize>,
    /// Patches merged per side (2).
    #[serde(default)]
    pub spatial_merge_size: Option<usize>,
    /// Frames per patch (2).
    #[serde(default)]
    pub temporal_patch_size: Option<usize>,
    /// Window side in pixels (112).
    #[serde(default)]
    pub window_size: Option<usize>,
    /// Output width (default: the language model's hidden size).
    #[serde(default)]
    pub out_hidden_size: Option<usize>,
    /// Blocks with full attention (default 7, 15, 23, 31).
    #[serde(default)]
    pub fullatt_block_indexes: Option<Vec<usize>>,
    /// 5.x rotary settings (base 10000 by default).
    #[serde(default)]
    pub rope_parameters: Option<RopeJson>,
}

/// `config.json` of a Qwen2.5-VL model as transformers writes it (4.x: text keys at the top
/// level and `rope_scaling`; 5.x: `text_config` and `rope_parameters`); [`Qwen25VlConfig`]'s
/// `TryFrom` checks it.
#[derive(Clone, Debug, Deserialize)]
pub struct Qwen25VlConfigJson {
    /// The vision tower (required).
    #[serde(default)]
    pub vision_config: Option<VisionConfigJson>,
    /// The language model (5.x).
    #[serde(default)]
    pub text_config: Option<TextConfigJson>,
    /// `<|image_pad|>` (151655).
    #[serde(default)]
    pub image_token_id: Option<u32>,
    /// Whether the LM head shares the embedding matrix (false).
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// The language model's keys at the top level (4.x).
    #[serde(flatten)]
    pub top: TextConfigJson,
}

impl super::ModelConfig for Qwen25VlConfig {
    type Raw = Qwen25VlConfigJson;
}

impl TryFrom<Qwen25VlConfigJson> for Qwen25VlConfig {
    type Error = ModelError;

    fn try_from(v: Qwen25VlConfigJson) -> Result<Self, ModelError> {
        const FILE: &str = "config.json";
        let err = |key: &str, what: &str| ModelError::ModelFile {
            path: FILE.into(),
            message: format!("key {key}: {what}"),
        };
        let (t, at) = match &v.text_config {
            Some(t) if t.hidden_size.is_some() => (t, "text_config."),
            _ => (&v.top, ""),
        };
        let need = |value: Option<usize>, key: &str| {
            value.ok_or_else(|| {
                err(
                    &format!("{at}{key}"),
                    "missing or not a non-negative integer",
                )
            })
        };
        let vc = v
            .vision_config
            .as_ref()
            .ok_or_else(|| err("vision_config", "missing; is this a Qwen2.5-VL model?"))?;
        let rope = t
            .rope_parameters
            .as_ref()
            .or(t.rope_scaling.as_ref())
            .or(v.top.rope_scaling.as_ref());
        let rope_theta = t
            .rope_theta
            .or_else(|| rope.and_then(|r| r.rope_theta))
            .unwrap_or(1_000_000.0);
        let heads = need(t.num_attention_heads, "num_attention_heads")?;
        let hidden = need(t.hidden_size, "hidden_size")?;
        if heads == 0 || hidden % heads != 0 {
            return Err(err("num_attention_heads", "must divide hidden_size"));
        }
        let half = hidden / heads / 2;
        let mrope_section = match rope {
            Some(r) => r.mrope_section.clone().unwrap_or_default(),
            None => vec![16, 24, 24],
        };
        if mrope_section.iter().sum::<usize>() != half {
            return Err(err(
                "rope_scaling.mrope_section",
                &format!("must sum to head_dim / 2 = {half}, got {mrope_section:?}"),
            ));
        }
        let text = TextConfig {
            vocab_size: need(t.vocab_size, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: need(t.intermediate_size, "intermediate_size")?,
            num_hidden_layers: need(t.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: t.num_key_value_heads.unwrap_or(heads),
            rms_norm_eps: t.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            mrope_section,
        };
        if text.num_key_value_heads == 0 || heads % text.num_key_value_heads != 0 {
            return Err(err(
                "num_key_value_heads",
                "must divide num_attention_heads",
            ));
        }
        if vc.num_heads == 0 || vc.hidden_size % (vc.num_heads * 4) != 0 {
            return Err(err(
                "vision_config.num_heads",
                "hidden_size / num_heads must be a multiple of 4",
            ));
        }
        let vision = VisionConfig {
            depth: vc.depth,
            hidden_size: vc.hidden_size,
            intermediate_size: vc.intermediate_size,
            num_heads: vc.num_heads,
            in_channels: vc.in_channels.or(vc.in_chans).unwrap_or(3),
            patch_size: vc.patch_size.unwrap_or(14),
            spatial_merge_size: vc.spatial_merge_size.unwrap_or(2),
            temporal_patch_size: vc.temporal_patch_size.unwrap_or(2),
            window_size: vc.window_size.unwrap_or(112),
            out_hidden_size: vc.out_hidden_size.unwrap_or(hidden),
            fullatt_block_indexes: vc
                .fullatt_block_indexes
                .clone()
                .unwrap_or_else(|| vec![7, 15, 23, 31]),
            rope_theta: vc
                .rope_parameters
                .as_ref()
                .and_then(|r| r.rope_theta)
                .unwrap_or(10_000.0),
        };
        if vision.out_hidden_size != hidden {
            return Err(err(
                "vision_config.out_hidden_size",
                &format!("must equal the language model's hidden_size {hidden}"),
            ));
        }
        Ok(Self {
            vision,
            text,
            image_token_id: v.image_token_id.unwrap_or(151_655),
            tie_word_embeddings: v
                .tie_word_embeddings
                .or(t.tie_word_embeddings)
                .unwrap_or(false),
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
