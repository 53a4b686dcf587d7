//! The Flux transformer's architecture: `transformer/config.json` as diffusers writes it
//! ([`FluxConfigJson`]), checked into [`FluxConfig`], and the released models' values.

use serde::Deserialize;

use crate::models::ModelError;

/// The architecture of a Flux transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct FluxConfig {
    /// Packed latent channels in and out (`in_channels`, 64 = 16 latent channels × 2 × 2).
    pub in_channels: usize,
    /// Width of the token streams (`num_attention_heads × attention_head_dim`, 3072).
    pub hidden_size: usize,
    /// Attention heads (`num_attention_heads`, 24).
    pub num_heads: usize,
    /// Double-stream blocks (`num_layers`, 19).
    pub depth: usize,
    /// Single-stream blocks (`num_single_layers`, 38).
    pub depth_single_blocks: usize,
    /// T5 hidden size (`joint_attention_dim`, 4096).
    pub context_in_dim: usize,
    /// CLIP pooled size (`pooled_projection_dim`, 768).
    pub vec_in_dim: usize,
    /// MLP width / hidden size (4.0).
    pub mlp_ratio: f64,
    /// Rotary dimensions per position axis (`axes_dims_rope`, [16, 56, 56]; sums to the head size).
    pub axes_dim: Vec<usize>,
    /// Rotary base (10000).
    pub theta: f64,
    /// Whether the model embeds the guidance scale (`guidance_embeds`: dev yes, schnell no).
    pub guidance_embed: bool,
}

/// diffusers' `transformer/config.json` (`FluxTransformer2DModel`'s keys and defaults);
/// [`FluxConfig`]'s `TryFrom` checks it.
#[derive(Clone, Debug, Deserialize)]
pub struct FluxConfigJson {
    /// Must be 1.
    #[serde(default = "one")]
    pub patch_size: usize,
    /// Packed latent channels in (64).
    #[serde(default = "sixty_four")]
    pub in_channels: usize,
    /// Must equal `in_channels` when given.
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Attention heads (24).
    #[serde(default = "twenty_four")]
    pub num_attention_heads: usize,
    /// Head size (128).
    #[serde(default = "one_twenty_eight")]
    pub attention_head_dim: usize,
    /// Rotary sizes per position axis ([16, 56, 56]).
    #[serde(default = "default_axes")]
    pub axes_dims_rope: Vec<usize>,
    /// Double-stream blocks (19).
    #[serde(default = "nineteen")]
    pub num_layers: usize,
    /// Single-stream blocks (38).
    #[serde(default = "thirty_eight")]
    pub num_single_layers: usize,
    /// T5 hidden size (4096).
    #[serde(default = "four_thousand_ninety_six")]
    pub joint_attention_dim: usize,
    /// CLIP pooled size (768).
    #[serde(default = "seven_sixty_eight")]
    pub pooled_projection_dim: usize,
    /// Whether the guidance scale is embedded (dev: true; absent: false, as diffusers).
    #[serde(default)]
    pub guidance_embeds: bool,
}

fn one() -> usize {
    1
}
fn sixty_four() -> usize {
    64
}
fn twenty_four() -> usize {
    24
}
fn one_twenty_eight() -> usize {
    128
}
fn default_axes() -> Vec<usize> {
    vec![16, 56, 56]
}
fn nineteen() -> usize {
    19
}
fn thirty_eight() -> usize {
    38
}
fn four_thousand_ninety_six() -> usize {
    4096
}
fn seven_sixty_eight() -> usize {
    768
}

impl crate::models::ModelConfig for FluxConfig {
    type Raw = FluxConfigJson;
}

impl TryFrom<FluxConfigJson> for FluxConfig {
    type Error = ModelError;

    fn try_from(j: FluxConfigJson) -> Result<Self, ModelError> {
        const FILE: &str = "transformer/config.json";
        if j.patch_size != 1 {
            return Err(ModelError::Unsupported(format!(
                "{FILE}: patch_size other than 1 is not supported"
            )));
        }
        if let Some(out) = j.out_channels.filter(|&o| o != j.in_channels) {
            return Err(ModelError::Unsupported(format!(
                "{FILE}: out_channels = {out} differs from in_channels; not supported"
            )));
        }
        let head_dim = j.attention_head_dim;
        let axes_dim = j.axes_dims_rope;
        if axes_dim.iter().sum::<usize>() != head_dim || axes_dim.iter().any(|a| a % 2 == 1) {
            return Err(ModelError::ModelFile {
                path: FILE.into(),
                message: format!(
                    "key \"axes_dims_rope\": expected even sizes summing to attention_head_dim \
                     {head_dim}, found {axes_dim:?}"
                ),
            });
        }
        Ok(Self {
            in_channels: j.in_channels,
            hidden_size: j.num_attention_heads * head_dim,
            num_heads: j.num_attention_heads,
            depth: j.num_layers,
            depth_single_blocks: j.num_single_layers,
            context_in_dim: j.joint_attention_dim,
            vec_in_dim: j.pooled_projection_dim,
            mlp_ratio: 4.0,
            axes_dim,
            theta: 10_000.0,
            guidance_embed: j.guidance_embeds,
        })
    }
}

impl FluxConfig {
    /// FLUX.1-dev's architecture.
    pub fn dev() -> Self {
        Self {
            in_channels: 64,
            hidden_size: 3072,
            num_heads: 24,
            depth: 19,
            depth_single_blocks: 38,
            context_in_dim: 4096,
            vec_in_dim: 768,
            mlp_ratio: 4.0,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            guidance_embed: true,
        }
    }

    /// FLUX.1-schnell's architecture (no guidance embedding).
    pub fn schnell() -> Self {
        Self {
            guidance_embed: false,
            ..Self::dev()
        }
    }

    /// Head size (`hidden_size / num_heads`, 128).
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// MLP width (`hidden_size × mlp_ratio`).
    pub fn mlp_size(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Parameters of the network (for memory estimates).
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let m = self.mlp_size();
        let hd = self.head_dim();
        let lin = |i: usize, o: usize| i * o + o;
        let double =
            2 * (lin(h, 6 * h) + lin(h, 3 * h) + 2 * hd + lin(h, h) + lin(h, m) + lin(m, h));
        let single = lin(h, 3 * h) + lin(h, 3 * h + m) + lin(h + m, h) + 2 * hd;
        let embed = lin(self.in_channels, h)
            + lin(self.context_in_dim, h)
            + lin(256, h)
            + lin(h, h)
            + lin(self.vec_in_dim, h)
            + lin(h, h)
            + if self.guidance_embed {
                lin(256, h) + lin(h, h)
            } else {
                0
            };
        let last = lin(h, 2 * h) + lin(h, self.in_channels);
        self.depth * double + self.depth_single_blocks * single + embed + last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_parameter_count_is_about_twelve_billion() {
        let n = FluxConfig::dev().parameter_count();
        assert!((11_800_000_000..12_000_000_000).contains(&n), "{n}");
    }
}
