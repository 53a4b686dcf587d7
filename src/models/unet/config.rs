//! The UNet's architecture from `unet/config.json`: the file's keys as diffusers writes them
//! ([`UNetConfigJson`]), checked and resolved per block into [`UNetConfig`].

use serde::Deserialize;
use serde_json::Value;

use crate::models::ModelError;

/// The UNet's architecture, read from `unet/config.json` (diffusers' names).
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    /// Latent channels in (`in_channels`).
    pub in_channels: usize,
    /// Latent channels out (`out_channels`).
    pub out_channels: usize,
    /// Default latent size (`sample_size`; 128 for SDXL, i.e. 1024 px).
    pub sample_size: usize,
    /// Channels per resolution level (`block_out_channels`).
    pub block_out_channels: Vec<usize>,
    /// Whether each down block has cross-attention (`CrossAttnDownBlock2D`) or not (`DownBlock2D`).
    pub down_cross_attention: Vec<bool>,
    /// Whether each up block has cross-attention, in up order (`up_block_types`).
    pub up_cross_attention: Vec<bool>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Transformer blocks per attention, per down block (up blocks use the reverse; the mid
    /// block the last).
    pub transformer_layers_per_block: Vec<usize>,
    /// Attention heads per down block (`num_attention_heads`, else `attention_head_dim`, which
    /// diffusers reads as the head count).
    pub num_attention_heads: Vec<usize>,
    /// Width of the text conditioning (`cross_attention_dim`; 2048 for SDXL).
    pub cross_attention_dim: usize,
    /// Group-norm groups (`norm_num_groups`).
    pub norm_num_groups: usize,
    /// Group-norm epsilon of the resnets and the output norm (`norm_eps`).
    pub norm_eps: f64,
    /// Linear (true) or 1×1 conv (false) transformer in/out projections.
    pub use_linear_projection: bool,
    /// Sinusoidal embedding order: cos first when true (`flip_sin_to_cos`).
    pub flip_sin_to_cos: bool,
    /// Sinusoidal frequency shift (`freq_shift`).
    pub freq_shift: f64,
    /// Padding of the stride-2 downsampling convs (`downsample_padding`).
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets (`mid_block_scale_factor`).
    pub mid_block_scale_factor: f64,
    /// `Some((addition_time_embed_dim, projection_class_embeddings_input_dim))` with
    /// `addition_embed_type: "text_time"`, `None` without an addition embedding.
    pub text_time: Option<(usize, usize)>,
}

const FILE: &str = "unet/config.json";

/// An integer, or a list of one integer per block (diffusers accepts both).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same value for every block.
    One(usize),
    /// One value per block.
    Each(Vec<usize>),
}

impl PerBlock {
    /// One value per block for `n` blocks; `key` names it in the error.
    fn per_block(&self, key: &str, n: usize) -> Result<Vec<usize>, ModelError> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(l) if l.len() == n => Ok(l.clone()),
            PerBlock::Each(l) => Err(key_err(
                key,
                &format!("an integer or a list of {n} integers"),
                &format!("a list of {}", l.len()),
            )),
        }
    }
}

/// `unet/config.json` as diffusers writes it (`UNet2DConditionModel`'s keys), with diffusers'
/// defaults; [`UNetConfig`]'s `TryFrom` checks it. Keys of features this UNet lacks are kept as
/// raw values so that a set one is refused by name.
#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfigJson {
    /// Channels per resolution level.
    pub block_out_channels: Vec<usize>,
    /// `CrossAttnDownBlock2D` or `DownBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// `CrossAttnUpBlock2D` or `UpBlock2D` per level, in up order.
    pub up_block_types: Vec<String>,
    /// Heads per level (takes precedence over `attention_head_dim`).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Heads per level, as diffusers reads it for SD 1.x/SDXL.
    #[serde(default)]
    pub attention_head_dim: Option<PerBlock>,
    /// Transformer blocks per attention, per level (default 1).
    #[serde(default)]
    pub transformer_layers_per_block: Option<PerBlock>,
    /// Width of the text conditioning (an integer; a per-block list is refused).
    pub cross_attention_dim: Value,
    /// Latent channels in.
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Latent channels out.
    #[serde(default = "four")]
    pub out_channels: usize,
    /// Default latent size.
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    /// Resnets per down block.
    #[serde(default = "two")]
    pub layers_per_block: usize,
    /// Group-norm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Group-norm epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Linear transformer projections.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Cos first in the timestep embedding.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Timestep-embedding frequency shift.
    #[serde(default)]
    pub freq_shift: f64,
    /// Padding of the downsampling convs.
    #[serde(default = "one")]
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    #[serde(default = "one_f64")]
    pub mid_block_scale_factor: f64,
    /// `text_time` (SDXL) or absent.
    #[serde(default)]
    pub addition_embed_type: Option<Value>,
    /// SDXL: width of each time id's embedding.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL: input width of the added-conditioning projection.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Every other key, checked against what this UNet implements.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn default_sample_size() -> usize {
    128
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn one_f64() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

fn key_err(key: &str, expected: &str, found: &str) -> ModelError {
    ModelError::ModelFile {
        path: FILE.to_string(),
        message: format!("key {key:?}: expected {expected}, found {found}"),
    }
}

/// Fails with `Unsupported` unless `key` is absent/null or one of `allowed`.
fn require(
    other: &serde_json::Map<String, Value>,
    key: &str,
    allowed: &[Value],
) -> Result<(), ModelError> {
    match other.get(key).filter(|v| !v.is_null()) {
        None => Ok(()),
        Some(v) if allowed.contains(v) => Ok(()),
        Some(v) => Err(ModelError::Unsupported(format!(
            "{FILE}: {key} = {v} is not supported by the UNet (supported: {})",
            if allowed.is_empty() {
                "null".to_string()
            } else {
                allowed
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ))),
    }
}

impl crate::models::ModelConfig for UNetConfig {
    type Raw = UNetConfigJson;
}

impl TryFrom<UNetConfigJson> for UNetConfig {
    type Error = ModelError;

    /// Checks `unet/config.json`: keys naming features this UNet lacks fail with
    /// [`ModelError::Unsupported`] naming the key, inconsistent keys with
    /// [`ModelError::ModelFile`] naming the file and key.
    fn try_from(j: UNetConfigJson) -> Result<Self, ModelError> {
        let other = &j.other;
        for key in [
            "class_embed_type",
            "time_cond_proj_dim",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "num_class_embeds",
            "timestep_post_act",
            "time_embedding_act_fn",
            "time_embedding_dim",
            "cross_attention_norm",
            "reverse_transformer_layers_per_block",
        ] {
            require(other, key, &[])?;
        }
        let mut added = serde_json::Map::new();
        if let Some(v) = &j.addition_embed_type {
            added.insert("addition_embed_type".into(), v.clone());
        }
        require(&added, "addition_embed_type", &["text_time".into()])?;
        require(other, "act_fn", &["silu".into()])?;
        require(other, "resnet_time_scale_shift", &["default".into()])?;
        require(other, "time_embedding_type", &["positional".into()])?;
        require(other, "mid_block_type", &["UNetMidBlock2DCrossAttn".into()])?;
        require(other, "conv_in_kernel", &[3.into()])?;
        require(other, "conv_out_kernel", &[3.into()])?;
        require(other, "only_cross_attention", &[false.into()])?;
        require(other, "mid_block_only_cross_attention", &[false.into()])?;
        require(other, "dual_cross_attention", &[false.into()])?;
        require(other, "upcast_attention", &[false.into()])?;
        require(other, "attention_type", &["default".into()])?;
        require(other, "resnet_skip_time_act", &[false.into()])?;
        require(other, "resnet_out_scale_factor", &[1.into(), 1.0.into()])?;
        require(other, "class_embeddings_concat", &[false.into()])?;

        let block_out_channels = j.block_out_channels;
        if block_out_channels.is_empty() || block_out_channels.contains(&0) {
            return Err(key_err(
                "block_out_channels",
                "a non-empty list of positive integers",
                &format!("{block_out_channels:?}"),
            ));
        }
        let n = block_out_channels.len();
        let kinds = |key: &str, types: &[String], cross: &str, plain: &str| {
            if types.len() != n {
                return Err(key_err(
                    key,
                    &format!("{n} block types (one per block_out_channels)"),
                    &format!("{types:?}"),
                ));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    t if t == cross => Ok(true),
                    t if t == plain => Ok(false),
                    other => Err(ModelError::Unsupported(format!(
                        "{FILE}: {key} entry {other:?} is not supported ({cross}, {plain})"
                    ))),
                })
                .collect::<Result<Vec<bool>, ModelError>>()
        };
        let down_cross_attention = kinds(
            "down_block_types",
            &j.down_block_types,
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        )?;
        let up_cross_attention = kinds(
            "up_block_types",
            &j.up_block_types,
            "CrossAttnUpBlock2D",
            "UpBlock2D",
        )?;
        let num_attention_heads = match (&j.num_attention_heads, &j.attention_head_dim) {
            (Some(h), _) => h.per_block("num_attention_heads", n)?,
            (None, Some(h)) => h.per_block("attention_head_dim", n)?,
            (None, None) => {
                return Err(key_err(
                    "attention_head_dim",
                    &format!("an integer or a list of {n} integers"),
                    "nothing",
                ))
            }
        };
        for (i, (&c, &h)) in block_out_channels
            .iter()
            .zip(&num_attention_heads)
            .enumerate()
        {
            if h == 0 || c % h != 0 {
                return Err(key_err(
                    "attention_head_dim",
                    &format!("head counts dividing block_out_channels[{i}] = {c}"),
                    &format!("{num_attention_heads:?}"),
                ));
            }
        }
        let transformer_layers_per_block = match &j.transformer_layers_per_block {
            None => vec![1; n],
            Some(l) => l.per_block("transformer_layers_per_block", n)?,
        };
        let cross_attention_dim = match &j.cross_attention_dim {
            Value::Array(_) => {
                return Err(ModelError::Unsupported(format!(
                    "{FILE}: a per-block cross_attention_dim is not supported"
                )))
            }
            v => v.as_u64().map(|d| d as usize).ok_or_else(|| {
                key_err(
                    "cross_attention_dim",
                    "a non-negative integer",
                    &v.to_string(),
                )
            })?,
        };
        let norm_num_groups = j.norm_num_groups;
        if norm_num_groups == 0 || block_out_channels.iter().any(|c| c % norm_num_groups != 0) {
            return Err(key_err(
                "norm_num_groups",
                "a group count dividing every block_out_channels",
                &norm_num_groups.to_string(),
            ));
        }
        let text_time = match j.addition_embed_type {
            None => None,
            Some(_) => {
                let need = |key: &str, v: Option<usize>| {
                    v.ok_or_else(|| key_err(key, "a non-negative integer", "nothing"))
                };
                Some((
                    need("addition_time_embed_dim", j.addition_time_embed_dim)?,
                    need(
                        "projection_class_embeddings_input_dim",
                        j.projection_class_embeddings_input_dim,
                    )?,
                ))
            }
        };
        Ok(Self {
            in_channels: j.in_channels,
            out_channels: j.out_channels,
            sample_size: j.sample_size,
            block_out_channels,
            down_cross_attention,
            up_cross_attention,
            layers_per_block: j.layers_per_block,
            transformer_layers_per_block,
            num_attention_heads,
            cross_attention_dim,
            norm_num_groups,
            norm_eps: j.norm_eps,
            use_linear_projection: j.use_linear_projection,
            flip_sin_to_cos: j.flip_sin_to_cos,
            freq_shift: j.freq_shift,
            downsample_padding: j.downsample_padding,
            mid_block_scale_factor: j.mid_block_scale_factor,
            text_time,
        })
    }
}
