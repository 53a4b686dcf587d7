//! OpenCLIP checkpoints (HPSv2's `HPS_v2.1_compressed.pt`): their config (`open_clip_config.json`
//! or the built-in ViT-H-14) as a [`ClipConfig`], and their state dict renamed into transformers'
//! `CLIPModel` names, so that [`super::clip::ClipModel`] runs them: the fused attention
//! `in_proj` split into q, k and v, the `x @ proj` projections transposed into linear weights.
//! OpenCLIP's towers are transformers' CLIP towers with GELU (exact) and the text pooled at the
//! highest token id, which is where transformers' legacy `eos_token_id = 2` pools too.

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use serde::Deserialize;

use super::clip::{ClipConfig, ClipVisionConfig};
use super::clip_text::ClipTextConfig;

/// `vision_cfg` of an OpenCLIP model config.
#[derive(Clone, Debug, Deserialize)]
pub struct OpenClipVisionCfg {
    /// Input size, pixels.
    pub image_size: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Width.
    pub width: usize,
    /// Width of one attention head (64 unless given).
    #[serde(default = "default_head_width")]
    pub head_width: usize,
    /// Patch size, pixels.
    pub patch_size: usize,
    /// MLP width over the width.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
}

/// `text_cfg` of an OpenCLIP model config.
#[derive(Clone, Debug, Deserialize)]
pub struct OpenClipTextCfg {
    /// Tokens per prompt.
    #[serde(default = "default_context")]
    pub context_length: usize,
    /// Vocabulary size.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Width.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
    /// Transformer layers.
    pub layers: usize,
}

/// `model_cfg` of an OpenCLIP `open_clip_config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct OpenClipCfg {
    /// Width of the shared embedding.
    pub embed_dim: usize,
    /// The image tower.
    pub vision_cfg: OpenClipVisionCfg,
    /// The text tower.
    pub text_cfg: OpenClipTextCfg,
}

fn default_head_width() -> usize {
    64
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_context() -> usize {
    77
}
fn default_vocab() -> usize {
    49408
}

impl OpenClipCfg {
    /// OpenCLIP's ViT-H-14 (HPSv2, `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`).
    pub fn vit_h_14() -> Self {
        Self {
            embed_dim: 1024,
            vision_cfg: OpenClipVisionCfg {
                image_size: 224,
                layers: 32,
                width: 1280,
                head_width: 80,
                patch_size: 14,
                mlp_ratio: 4.0,
            },
            text_cfg: OpenClipTextCfg {
                context_length: 77,
                vocab_size: 49408,
                width: 1024,
                heads: 16,
                layers: 24,
            },
        }
    }

    /// The same model as transformers' `CLIPConfig`.
    pub fn to_clip_config(&self) -> ClipConfig {
        let (v, t) = (&self.vision_cfg, &self.text_cfg);
        ClipConfig {
            text_config: ClipTextConfig {
                vocab_size: t.vocab_size,
                hidden_size: t.width,
                intermediate_size: 4 * t.width,
                num_hidden_layers: t.layers,
                num_attention_heads: t.heads,
                max_position_embeddings: t.context_length,
                hidden_act: "gelu".into(),
                layer_norm_eps: 1e-5,
                eos_token_id: Some(2),
                projection_dim: Some(self.embed_dim),
            },
            vision_config: ClipVisionConfig {
                hidden_size: v.width,
                intermediate_size: (v.width as f64 * v.mlp_ratio) as usize,
                num_hidden_layers: v.layers,
                num_attention_heads: v.width / v.head_width.max(1),
                num_channels: 3,
                image_size: v.image_size,
                patch_size: v.patch_size,
                hidden_act: "gelu".into(),
                layer_norm_eps: 1e-5,
            },
            projection_dim: self.embed_dim,
            logit_scale_init_value: 2.6592,
        }
    }
}

/// The OpenCLIP state dict `sd` under transformers' `CLIPModel` names (layer counts from `cfg`).
/// A tensor missing from `sd` is an error naming it.
pub fn to_transformers_names(
    sd: &HashMap<String, Tensor>,
    cfg: &OpenClipCfg,
) -> Result<HashMap<String, Tensor>> {
    let get = |name: &str| -> Result<Tensor> {
        sd.get(name)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("the checkpoint has no {name}")))
    };
    let mut out = HashMap::new();
    let tower =
        |from: &str, to: &str, layers: usize, out: &mut HashMap<String, Tensor>| -> Result<()> {
            for i in 0..layers {
                let f = format!("{from}.{i}");
                let t = format!("{to}.{i}");
                let w = get(&format!("{f}.attn.in_proj_weight"))?;
                let b = get(&format!("{f}.attn.in_proj_bias"))?;
                let width = w.dim(1)?;
                for (j, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    out.insert(
                        format!("{t}.self_attn.{p}.weight"),
                        w.narrow(0, j * width, width)?,
                    );
                    out.insert(
                        format!("{t}.self_attn.{p}.bias"),
                        b.narrow(0, j * width, width)?,
                    );
                }
                for (a, b) in [
                    ("attn.out_proj", "self_attn.out_proj"),
                    ("ln_1", "layer_norm1"),
                    ("ln_2", "layer_norm2"),
                    ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"),
                ] {
                    for k in ["weight", "bias"] {
                        out.insert(format!("{t}.{b}.{k}"), get(&format!("{f}.{a}.{k}"))?);
                    }
                }
            }
            Ok(())
        };
    tower(
        "visual.transformer.resblocks",
        "vision_model.encoder.layers",
        cfg.vision_cfg.layers,
        &mut out,
    )?;
    tower(
        "transformer.resblocks",
        "text_model.encoder.layers",
        cfg.text_cfg.layers,
        &mut out,
    )?;
    let pairs = [
        (
            "visual.class_embedding",
            "vision_model.embeddings.class_embedding",
        ),
        (
            "visual.conv1.weight",
            "vision_model.embeddings.patch_embedding.weight",
        ),
        (
            "visual.positional_embedding",
            "vision_model.embeddings.position_embedding.weight",
        ),
        ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),
        ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
        (
            "visual.ln_post.weight",
            "vision_model.post_layernorm.weight",
        ),
        ("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
        (
            "token_embedding.weight",
            "text_model.embeddings.token_embedding.weight",
        ),
        (
            "positional_embedding",
            "text_model.embeddings.position_embedding.weight",
        ),
        ("ln_final.weight", "text_model.final_layer_norm.weight"),
        ("ln_final.bias", "text_model.final_layer_norm.bias"),
        ("logit_scale", "logit_scale"),
    ];
    for (from, to) in pairs {
        out.insert(to.to_string(), get(from)?);
    }
    // OpenCLIP projects with `x @ proj` (width, embed); a linear weight is (embed, width).
    out.insert(
        "visual_projection.weight".into(),
        get("visual.proj")?.t()?.contiguous()?,
    );
    out.insert(
        "text_projection.weight".into(),
        get("text_projection")?.t()?.contiguous()?,
    );
    Ok(out)
}
