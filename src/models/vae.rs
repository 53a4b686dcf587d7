//! diffusers' `AutoencoderKL` decoder (the `vae/` of SD 1.5, SDXL, PixArt-Sigma and Flux in
//! diffusers layout): latents (B, latent_channels, h, w) -> images (B, 3, 8h, 8w) for three
//! up-sampling blocks (2^(levels - 1) in general).
//!
//! It replaces candle-transformers' `AutoEncoderKL`, which loads the encoder too (unused for
//! text-to-image) and runs plain candle operations: here the convolutions go through
//! [`crate::ops::Conv2d`] (cuDNN on a GPU where it is installed; candle unfolds a 3×3 input into a
//! column matrix nine times its size, 2.4 GB for SDXL's last level at 1024×1024) and the group
//! norms through the fused group norm + SiLU. On the CPU the result is candle's composition.
//!
//! Weights: `post_quant_conv`, `decoder.conv_in`, `decoder.mid_block.{resnets.0, attentions.0,
//! resnets.1}`, `decoder.up_blocks.{i}.{resnets.{j}, upsamplers.0.conv}`, `decoder.conv_norm_out`,
//! `decoder.conv_out`; attention projections named `to_q`/`to_k`/`to_v`/`to_out.0` or, in older
//! files, `query`/`key`/`value`/`proj_attn`, as (C, C) or (C, C, 1, 1) weights.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;

use serde::Deserialize;

use super::unet::{conv, ResnetBlock, ResnetShape};
use super::ModelError;
use crate::ops::{group_norm, Conv2d, GroupNorm, Linear};

/// The epsilon of every group norm of the decoder (diffusers' `Decoder`).
const EPS: f64 = 1e-6;

/// Query rows per slice of the mid-block attention: bounds its (rows × tokens) score matrix to
/// 4096 × 16384 at 1024×1024 (256 MB in float32) however large the image.
const QUERY_CHUNK: usize = 4096;

/// diffusers' `AutoencoderKL` config (`vae/config.json`): the keys the decoder and the pipelines
/// read, with diffusers' defaults. [`VaeConfig::check`] refuses what the decoder does not
/// implement.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct VaeConfig {
    /// Channels of each level, lowest resolution last (SD: `[128, 256, 512, 512]`).
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level (the decoder has one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Latent channels (4; Flux 16).
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// Group-norm groups; divides every entry of `block_out_channels`.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Image channels (3).
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Whether the encoder's `quant_conv` exists.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` runs before the decoder.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Latents are divided by it before decoding (SD 1.5: 0.18215).
    #[serde(default = "sd_scaling_factor")]
    pub scaling_factor: f64,
    /// Added after the scaling (Flux: 0.1159); `None`: 0.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// SDXL: decode in float32 when the dtype is fp16 (diffusers' default: true).
    #[serde(default = "yes")]
    pub force_upcast: bool,
    /// Per-channel latent mean, with `latents_std` (both or neither).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviation.
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Must be `silu`.
    #[serde(default = "silu")]
    pub act_fn: String,
    /// Must be true (the decoder always has the mid-block attention).
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Must be `DownEncoderBlock2D` at every level when given.
    #[serde(default)]
    pub down_block_types: Option<Vec<String>>,
    /// Must be `UpDecoderBlock2D` at every level when given.
    #[serde(default)]
    pub up_block_types: Option<Vec<String>>,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}
fn sd_scaling_factor() -> f64 {
    0.18215
}

impl VaeConfig {
    /// FLUX.1's VAE (used when only Black Forest Labs' `ae.safetensors` is present).
    pub fn flux() -> Self {
        Self {
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 16,
            norm_num_groups: 32,
            out_channels: 3,
            use_quant_conv: false,
            use_post_quant_conv: false,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            force_upcast: true,
            latents_mean: None,
            latents_std: None,
            act_fn: silu(),
            mid_block_add_attention: true,
            down_block_types: None,
            up_block_types: None,
        }
    }

    /// Refuses what the decoder does not implement, naming `file` and the key: another
    /// activation, no mid-block attention, other block types, a group count that does not
    /// divide the channels, `latents_mean`/`latents_std` not of `latent_channels` numbers.
    pub fn check(&self, file: &str) -> std::result::Result<(), ModelError> {
        let bad = |key: &str, expected: &str| ModelError::ModelFile {
            path: file.to_string(),
            message: format!("key {key:?}: expected {expected}"),
        };
        if self.act_fn != "silu" {
            return Err(ModelError::Unsupported(format!(
                "{file}: act_fn = {:?} is not supported (expected \"silu\")",
                self.act_fn
            )));
        }
        if !self.mid_block_add_attention {
            return Err(ModelError::Unsupported(format!(
                "{file}: mid_block_add_attention = false is not supported"
            )));
        }
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return Err(bad("block_out_channels", "a non-empty list of integers"));
        }
        for (key, types, want) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if let Some(types) = types {
                if types.len() != levels || types.iter().any(|t| t != want) {
                    return Err(ModelError::Unsupported(format!(
                        "{file}: {key} must be {levels} × {want:?}"
                    )));
                }
            }
        }
        let groups = self.norm_num_groups;
        if groups == 0 || self.block_out_channels.iter().any(|c| c % groups != 0) {
            return Err(bad(
                "norm_num_groups",
                "a group count dividing every block_out_channels",
            ));
        }
        match (&self.latents_mean, &self.latents_std) {
            (Some(m), Some(s))
                if m.len() != self.latent_channels || s.len() != self.latent_channels =>
            {
                Err(bad(
                    "latents_mean",
                    &format!(
                        "latents_mean and latents_std of {} numbers each",
                        self.latent_channels
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// `(latents_mean, latents_std)` when both are given.
    pub fn latents_mean_std(&self) -> Option<(Vec<f64>, Vec<f64>)> {
        match (&self.latents_mean, &self.latents_std) {
            (Some(m), Some(s)) => Some((m.clone(), s.clone())),
            _ => None,
        }
    }

    /// The image-to-latent downscale, `2^(levels - 1)` (8 for every shipped model).
    pub fn scale_factor(&self) -> usize {
        1usize << self.block_out_channels.len().saturating_sub(1)
    }

    /// The decoder's shape, as candle-transformers names it.
    pub fn decoder_config(&self) -> AutoEncoderKLConfig {
        AutoEncoderKLConfig {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            use_quant_conv: self.use_quant_conv,
            use_post_quant_conv: self.use_post_quant_conv,
        }
    }
}

/// The VAE's decoder half.
pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: AttentionBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// The configuration it was built from.
    pub config: AutoEncoderKLConfig,
}

/// One `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then (but for the last block) a
/// nearest-neighbour ×2 up-sampling and a 3×3 convolution.
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsampler: Option<Conv2d>,
}

/// The mid block's single-head self-attention over all pixels (diffusers' `Attention` with
/// `heads = 1`, biases on every projection, a residual connection).
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let proj = |name: &str| -> Result<Linear> {
            let vb = vb.pp(name);
            // (C, C), or (C, C, 1, 1) as some files store it: tried in that order.
            let weight = match vb.get((channels, channels), "weight") {
                Ok(w) => w,
                Err(flat) => vb
                    .get((channels, channels, 1, 1), "weight")
                    .and_then(|w| w.reshape((channels, channels)))
                    .map_err(|_| flat)?,
            };
            let bias = vb.get(channels, "bias")?;
            Ok(Linear::new(candle_nn::Linear::new(weight, Some(bias))))
        };
        Ok(Self {
            group_norm: group_norm(groups, channels, EPS, vb.pp("group_norm"))?,
            to_q: proj(names[0])?,
            to_k: proj(names[1])?,
            to_v: proj(names[2])?,
            to_out: proj(names[3])?,
        })
    }

    /// `xs` (B, C, H, W) -> (B, C, H, W).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k, v) = (
            self.to_q.forward(&tokens)?,
            self.to_k.forward(&tokens)?,
            self.to_v.forward(&tokens)?,
        );
        let kt = k.t()?.contiguous()?;
        let scale = 1.0 / (c as f64).sqrt();
        let mut rows = Vec::with_capacity((h * w).div_ceil(QUERY_CHUNK));
        for start in (0..h * w).step_by(QUERY_CHUNK) {
            let len = QUERY_CHUNK.min(h * w - start);
            let scores = (q.narrow(1, start, len)?.matmul(&kt)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
            rows.push(probs.to_dtype(v.dtype())?.matmul(&v)?);
        }
        let attended = Tensor::cat(&rows, 1)?;
        let out = self
            .to_out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + xs
    }
}

impl VaeDecoder {
    /// Loads the decoder from a `vae/` var builder for `config`, with `out_channels` image
    /// channels (3).
    pub fn new(vb: VarBuilder, out_channels: usize, config: AutoEncoderKLConfig) -> Result<Self> {
        let ch = &config.block_out_channels;
        let Some(&last) = ch.last() else {
            candle_core::bail!("the VAE config has no block_out_channels");
        };
        let groups = config.norm_num_groups;
        let resnet = |cin, cout| ResnetShape {
            cin,
            cout,
            temb: None,
            groups,
            eps: EPS,
            output_scale_factor: 1.0,
        };
        let latent = config.latent_channels;
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv(vb.pp("post_quant_conv"), latent, latent, 1, 1, 0)?)
        } else {
            None
        };
        let dvb = vb.pp("decoder");
        let mvb = dvb.pp("mid_block");
        let mid_resnets = [
            ResnetBlock::new(mvb.pp("resnets").pp(0), resnet(last, last))?,
            ResnetBlock::new(mvb.pp("resnets").pp(1), resnet(last, last))?,
        ];
        let mid_attention = AttentionBlock::new(mvb.pp("attentions").pp(0), last, groups)?;
        let mut up_blocks = Vec::with_capacity(ch.len());
        let mut cin = last;
        for (i, &cout) in ch.iter().rev().enumerate() {
            let bvb = dvb.pp("up_blocks").pp(i);
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    ResnetBlock::new(bvb.pp("resnets").pp(j), resnet(c, cout))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < ch.len() {
                Some(conv(
                    bvb.pp("upsamplers").pp(0).pp("conv"),
                    cout,
                    cout,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
            cin = cout;
        }
        Ok(Self {
            post_quant_conv,
            conv_in: conv(dvb.pp("conv_in"), latent, last, 3, 1, 1)?,
            mid_resnets,
            mid_attention,
            up_blocks,
            conv_norm_out: group_norm(groups, ch[0], EPS, dvb.pp("conv_norm_out"))?,
            conv_out: conv(dvb.pp("conv_out"), ch[0], out_channels, 3, 1, 1)?,
            config,
        })
    }

    /// Decodes latents `z` (B, latent_channels, h, w), already unscaled (divided by the scaling
    /// factor, shift added back), into images (B, out_channels, h·2^(levels-1), ...) in about
    /// [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut xs = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        xs = self.conv_in.forward(&xs)?;
        xs = self.mid_resnets[0].forward(&xs, None)?;
        xs = self.mid_attention.forward(&xs)?;
        xs = self.mid_resnets[1].forward(&xs, None)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, None)?;
            }
            if let Some(up) = &block.upsampler {
                let (h, w) = (xs.dim(D::Minus2)?, xs.dim(D::Minus1)?);
                xs = up.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    fn config() -> AutoEncoderKLConfig {
        AutoEncoderKLConfig {
            block_out_channels: vec![8, 16],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 4,
            use_quant_conv: false,
            use_post_quant_conv: true,
        }
    }

    /// Random weights for [`config`] under today's names, as a map.
    fn weights() -> HashMap<String, Tensor> {
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        VaeDecoder::new(vb, 3, config()).unwrap();
        let data = map.data().lock().unwrap();
        data.iter()
            .map(|(k, v)| {
                // Non-trivial norms and biases too: VarMap starts them at 1 and 0.
                let t = v.as_tensor();
                let noise = t.randn_like(0.0, 0.3).unwrap();
                (k.clone(), (t + noise).unwrap())
            })
            .collect()
    }

    #[test]
    fn old_attention_names_and_conv_shaped_weights_load_the_same_model() {
        let new = weights();
        let renamed: HashMap<String, Tensor> = new
            .iter()
            .map(|(k, v)| {
                let old = k
                    .replace("attentions.0.to_q", "attentions.0.query")
                    .replace("attentions.0.to_k", "attentions.0.key")
                    .replace("attentions.0.to_v", "attentions.0.value")
                    .replace("attentions.0.to_out.0", "attentions.0.proj_attn");
                let v = if old != *k && v.rank() == 2 {
                    v.unsqueeze(2).unwrap().unsqueeze(3).unwrap()
                } else {
                    v.clone()
                };
                (old, v)
            })
            .collect();
        assert_eq!(
            renamed.keys().filter(|k| k.contains("query")).count(),
            2,
            "weight and bias renamed"
        );
        let load = |m: HashMap<String, Tensor>| {
            VaeDecoder::new(
                VarBuilder::from_tensors(m, DType::F32, &Device::Cpu),
                3,
                config(),
            )
            .unwrap()
        };
        let z = Tensor::randn(0f32, 1.0, (2, 4, 5, 6), &Device::Cpu).unwrap();
        let a = load(new).decode(&z).unwrap();
        let b = load(renamed).decode(&z).unwrap();
        assert_eq!(a.dims(), [2, 3, 10, 12]);
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn chunked_attention_equals_one_softmax_over_all_queries() {
        // 70 x 64 = 4480 pixels: two query slices of the mid-block attention.
        let map: HashMap<String, Tensor> = weights()
            .into_iter()
            .filter(|(k, _)| k.contains("mid_block.attentions.0"))
            .map(|(k, v)| (k.replace("decoder.mid_block.attentions.0.", ""), v))
            .collect();
        let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
        let block = AttentionBlock::new(vb, 16, 4).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (1, 16, 70, 64), &Device::Cpu).unwrap();
        let ours = block.forward(&xs).unwrap();
        // The same attention with a single softmax over every query.
        let (b, c, h, w) = xs.dims4().unwrap();
        let t = block
            .group_norm
            .forward(&xs)
            .unwrap()
            .reshape((b, c, h * w))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let (q, k, v) = (
            block.to_q.forward(&t).unwrap(),
            block.to_k.forward(&t).unwrap(),
            block.to_v.forward(&t).unwrap(),
        );
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (c as f64).sqrt()).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
        let o = block.to_out.forward(&p.matmul(&v).unwrap()).unwrap();
        let want = (o.transpose(1, 2).unwrap().reshape((b, c, h, w)).unwrap() + &xs).unwrap();
        let diff = (ours - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
