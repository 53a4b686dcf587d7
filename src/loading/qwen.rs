//! Loading the local verifier's Qwen2.5-VL ([`crate::models::qwen2_5_vl`]) from a Hub repo
//! or a folder in the Hub layout: `config.json`, `preprocessor_config.json` (optional),
//! `tokenizer.json`, and `model.safetensors` or the shards its index names.

use std::path::Path;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use super::{mmap, model_config, Dtype, LoadError, ModelSource};
use crate::models::qwen2_5_vl::{
    ImageProcessorConfig, Qwen25Vl, Qwen25VlConfig, QwenError, TextModel, VisionModel,
};

impl From<LoadError> for QwenError {
    fn from(e: LoadError) -> Self {
        QwenError::Source(e.to_string())
    }
}

/// A Hub repo id (`owner/name`) or an existing folder, as a [`ModelSource`].
pub fn model_source(name: &str) -> Result<ModelSource, QwenError> {
    let p = Path::new(name);
    if p.is_dir() {
        return Ok(ModelSource::Local(p.to_path_buf()));
    }
    let parts: Vec<&str> = name.split('/').collect();
    if parts.len() == 2
        && parts
            .iter()
            .all(|s| !s.is_empty() && !s.contains(char::is_whitespace))
    {
        return Ok(ModelSource::hub(name, None));
    }
    Err(QwenError::Config {
        path: "verifier_args.model_name".into(),
        message: format!(
            "{name:?} is neither an existing folder nor a Hugging Face repo id (owner/name)"
        ),
    })
}

impl Qwen25Vl {
    /// Loads `name` (a Hub repo id or a folder) in `dtype` on `device`.
    pub fn load(name: &str, dtype: DType, device: &Device) -> Result<Self, QwenError> {
        Self::from_source(&model_source(name)?, dtype, device)
    }

    /// Loads the model from `src` in `dtype` on `device`.
    pub fn from_source(
        src: &ModelSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, QwenError> {
        let name = src.display_name();
        let config: Qwen25VlConfig = model_config(
            &src.read_json("config.json")?,
            &format!("{name}/config.json"),
        )?;
        let processor = if src.has_file("preprocessor_config.json")? {
            model_config(
                &src.read_json("preprocessor_config.json")?,
                &format!("{name}/preprocessor_config.json"),
            )?
        } else {
            ImageProcessorConfig::default()
        };
        let tok_path = src.file("tokenizer.json")?;
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| QwenError::Tokenizer {
            path: tok_path.display().to_string(),
            message: e.to_string(),
        })?;
        let files = src.weights("", Dtype::F32)?;
        let vb = mmap(&files, dtype, device)?;
        let new_layout = vb.contains_tensor("model.language_model.embed_tokens.weight");
        let (text_vb, vis_vb) = if new_layout {
            (
                vb.pp("model").pp("language_model"),
                vb.pp("model").pp("visual"),
            )
        } else {
            (vb.pp("model"), vb.pp("visual"))
        };
        let head = (!config.tie_word_embeddings && vb.contains_tensor("lm_head.weight"))
            .then(|| vb.pp("lm_head"));
        let text = TextModel::new(&config.text, text_vb, head)?;
        let vision = VisionModel::new(&config.vision, vis_vb)?;
        Ok(Self {
            config,
            processor,
            tokenizer,
            vision,
            text,
        })
    }
}
