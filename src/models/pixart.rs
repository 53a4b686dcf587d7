//! PixArt's diffusion transformer (diffusers' `PixArtTransformer2DModel`, as PixArt-Sigma uses
//! it): 2×2 patch embedding with 2-D sin-cos position embeddings, adaLN-single timestep
//! conditioning, blocks of self-attention, cross-attention to the projected T5 tokens (with the
//! caption mask) and a tanh-GELU MLP, and the modulated final layer that unpatchifies to
//! `out_channels` (8 with learned sigma).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::Deserialize;
use serde_json::Value;

use crate::models::ModelError;
use crate::ops::{self, conv2d, fused, linear, Conv2d, Linear};

/// The `transformer/config.json` fields the model needs.
#[derive(Clone, Debug, PartialEq)]
pub struct PixArtConfig {
    /// Attention heads (16 for XL/2).
    pub num_attention_heads: usize,
    /// Width of one head (72 for XL/2); hidden width = heads × head width.
    pub attention_head_dim: usize,
    /// Latent channels in (4).
    pub in_channels: usize,
    /// Channels out (8: noise and learned variance).
    pub out_channels: usize,
    /// Transformer blocks (28 for XL/2).
    pub num_layers: usize,
    /// Latent side the position embeddings are laid out for (128 for the 1024 model).
    pub sample_size: usize,
    /// Patch side (2).
    pub patch_size: usize,
    /// Width of the caption embeddings (4096 for T5 XXL).
    pub caption_channels: usize,
    /// Width the cross-attention keys/values come from (the hidden width).
    pub cross_attention_dim: usize,
    /// Position-embedding interpolation scale (default `max(sample_size / 64, 1)`).
    pub interpolation_scale: f64,
    /// LayerNorm epsilon of the blocks (1e-6).
    pub norm_eps: f64,
    /// Whether q/k/v/out projections have biases.
    pub attention_bias: bool,
}

fn unsupported(key: &str, value: &Value, expected: &str) -> ModelError {
    ModelError::Unsupported(format!(
        "transformer/config.json: {key} = {value} is not supported by the PixArt transformer (expected {expected})"
    ))
}

/// diffusers' `transformer/config.json` (`PixArtTransformer2DModel`'s keys and defaults);
/// [`PixArtConfig`]'s `TryFrom` checks it.
#[derive(Clone, Debug, Deserialize)]
pub struct PixArtConfigJson {
    /// Attention heads (16).
    #[serde(default = "sixteen")]
    pub num_attention_heads: usize,
    /// Head width (72).
    #[serde(default = "seventy_two")]
    pub attention_head_dim: usize,
    /// Latent channels in (4).
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Channels out (default `in_channels`).
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Transformer blocks (28).
    #[serde(default = "twenty_eight")]
    pub num_layers: usize,
    /// Latent side of the position embeddings (128).
    #[serde(default = "one_twenty_eight")]
    pub sample_size: usize,
    /// Patch side (2).
    #[serde(default = "two")]
    pub patch_size: usize,
    /// Width of the caption embeddings (required: 4096 for T5 XXL).
    #[serde(default)]
    pub caption_channels: Option<usize>,
    /// Cross-attention width (default the hidden width).
    #[serde(default)]
    pub cross_attention_dim: Option<usize>,
    /// Position-embedding interpolation scale (default `max(sample_size / 64, 1)`).
    #[serde(default)]
    pub interpolation_scale: Option<Value>,
    /// Block LayerNorm epsilon (1e-6).
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Biases on the attention projections (true).
    #[serde(default = "yes")]
    pub attention_bias: bool,
    /// PixArt-alpha's extra conditioning (default: `sample_size == 128`); must be false.
    #[serde(default)]
    pub use_additional_conditions: Option<bool>,
    /// Every other key, checked against what the transformer implements.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

fn two() -> usize {
    2
}
fn four() -> usize {
    4
}
fn sixteen() -> usize {
    16
}
fn twenty_eight() -> usize {
    28
}
fn seventy_two() -> usize {
    72
}
fn one_twenty_eight() -> usize {
    128
}
fn default_norm_eps() -> f64 {
    1e-6
}
fn yes() -> bool {
    true
}

impl super::ModelConfig for PixArtConfig {
    type Raw = PixArtConfigJson;
}

impl TryFrom<PixArtConfigJson> for PixArtConfig {
    type Error = ModelError;

    fn try_from(j: PixArtConfigJson) -> Result<Self, ModelError> {
        let check = |k: &str, expected: Value| -> Result<(), ModelError> {
            match j.other.get(k).filter(|x| !x.is_null()) {
                Some(x) if *x != expected => Err(unsupported(k, x, &expected.to_string())),
                _ => Ok(()),
            }
        };
        check("norm_type", "ada_norm_single".into())?;
        check("activation_fn", "gelu-approximate".into())?;
        check("norm_elementwise_affine", false.into())?;
        check("attention_type", "default".into())?;
        check("upcast_attention", false.into())?;
        let sample_size = j.sample_size;
        if j.use_additional_conditions.unwrap_or(sample_size == 128) {
            return Err(ModelError::Unsupported(
                "transformer/config.json: use_additional_conditions (PixArt-alpha's resolution and aspect-ratio \
                 conditioning) is not supported; PixArt-Sigma models set it to false"
                    .into(),
            ));
        }
        let caption_channels = j.caption_channels.ok_or_else(|| ModelError::ModelFile {
            path: "transformer/config.json".into(),
            message: "caption_channels is missing; PixArt-Sigma projects T5 embeddings (4096)"
                .into(),
        })?;
        let interpolation_scale = match &j.interpolation_scale {
            None => (sample_size / 64).max(1) as f64,
            Some(x) => x
                .as_f64()
                .ok_or_else(|| unsupported("interpolation_scale", x, "a number"))?,
        };
        let (heads, head_dim) = (j.num_attention_heads, j.attention_head_dim);
        Ok(Self {
            num_attention_heads: heads,
            attention_head_dim: head_dim,
            in_channels: j.in_channels,
            out_channels: j.out_channels.unwrap_or(j.in_channels),
            num_layers: j.num_layers,
            sample_size,
            patch_size: j.patch_size,
            caption_channels,
            cross_attention_dim: j.cross_attention_dim.unwrap_or(heads * head_dim),
            interpolation_scale,
            norm_eps: j.norm_eps,
            attention_bias: j.attention_bias,
        })
    }
}

impl PixArtConfig {
    /// PixArt-Sigma XL/2 at 1024 px (`PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`).
    pub fn sigma_xl_1024() -> Self {
        Self {
            num_attention_heads: 16,
            attention_head_dim: 72,
            in_channels: 4,
            out_channels: 8,
            num_layers: 28,
            sample_size: 128,
            patch_size: 2,
            caption_channels: 4096,
            cross_attention_dim: 1152,
            interpolation_scale: 2.0,
            norm_eps: 1e-6,
            attention_bias: true,
        }
    }

    /// Hidden width (heads × head width).
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
}

/// diffusers' 2-D sin-cos position embeddings for a `gh × gw` patch grid: (gh·gw, dim), float32.
/// Positions are `arange / (grid / base_size) / interpolation_scale` in float32 with
/// `base_size = sample_size / patch_size`; the first half of the channels encodes the column,
/// the second the row (diffusers' meshgrid order), each `[sin, cos]` computed in float64.
pub fn sincos_pos_embed(
    dim: usize,
    gh: usize,
    gw: usize,
    base_size: usize,
    scale: f64,
) -> Vec<f32> {
    let coords = |n: usize| -> Vec<f32> {
        let div = (n as f64 / base_size as f64) as f32;
        (0..n).map(|i| i as f32 / div / scale as f32).collect()
    };
    let (rows, cols) = (coords(gh), coords(gw));
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity(gh * gw * dim);
    for &row in &rows {
        for &col in &cols {
            for pos in [col, row] {
                let p = f64::from(pos);
                out.extend(omega.iter().map(|w| (p * w).sin() as f32));
                out.extend(omega.iter().map(|w| (p * w).cos() as f32));
            }
        }
    }
    out
}

/// diffusers' `get_timestep_embedding` with `flip_sin_to_cos=True`, shift 0: (B, dim) `[cos, sin]`.
fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln() as f32) * i as f32 / half as f32).exp())
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t as f32 * f).collect();
        data.extend(args.iter().map(|a| a.cos()));
        data.extend(args.iter().map(|a| a.sin()));
    }
    Tensor::from_vec(data, (timesteps.len(), dim), device)
}

/// `layer_norm(xs) · (1 + scale) + shift` (no affine parameters, float32 statistics), fused on
/// CUDA; `shift`, `scale` (B, 1, D).
fn norm_mod(xs: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if ops::fused_for(ops::Kernel::LayerNormModulate, xs, 0) {
        fused::layer_norm_modulate(xs, None, None, Some(shift), Some(scale), eps)
    } else {
        layer_norm(xs, eps)?
            .broadcast_mul(&(scale + 1.0)?)?
            .broadcast_add(shift)
    }
}

/// Key lengths from a caption mask (B, S) of ones then zeros, for the fused attention's key
/// masking; `None` when a row is not of that form (the additive bias handles it then).
fn prefix_lengths(mask: &Tensor) -> candle_core::Result<Option<Vec<u32>>> {
    let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .map(|row| {
            let n = row.iter().take_while(|&&m| m > 0.5).count();
            row[n..].iter().all(|&m| m <= 0.5).then_some(n as u32)
        })
        .collect())
}

/// LayerNorm without affine parameters, computed in float32.
fn layer_norm(xs: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = xs.dtype();
    let x = xs.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_sub(&mean)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

fn maybe_bias_linear(
    i: usize,
    o: usize,
    bias: bool,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    ops::linear_b(i, o, bias, vb)
}

impl Attention {
    fn new(
        dim: usize,
        kv_dim: usize,
        heads: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            to_q: maybe_bias_linear(dim, dim, bias, vb.pp("to_q"))?,
            to_k: maybe_bias_linear(kv_dim, dim, bias, vb.pp("to_k"))?,
            to_v: maybe_bias_linear(kv_dim, dim, bias, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    /// `xs` (B, N, D) attending to `context` (B, S, Dc); `bias` (B, 1, 1, S) is added to the
    /// scores (0 keep, -10000 masked); on the fused path `key_lens` (the mask's lengths) masks
    /// the keys instead.
    fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        bias: Option<&Tensor>,
        key_lens: Option<&[u32]>,
    ) -> candle_core::Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let s = context.dim(1)?;
        let hd = d / self.heads;
        let split = |x: Tensor, m: usize| -> candle_core::Result<Tensor> {
            x.reshape((b, m, self.heads, hd))?.transpose(1, 2)
        };
        let q = split(self.to_q.forward(xs)?, n)?;
        let k = split(self.to_k.forward(context)?, s)?;
        let v = split(self.to_v.forward(context)?, s)?;
        if (bias.is_none() || key_lens.is_some()) && ops::attention_fused_ok(&q, &k, &v) {
            let scale = 1.0 / (hd as f64).sqrt();
            let out = ops::attention(&q, &k, &v, scale, key_lens)?;
            return self
                .to_out
                .forward(&out.transpose(1, 2)?.reshape((b, n, d))?);
        }
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = match bias {
            Some(bias) => scores.broadcast_add(bias)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
            .to_dtype(xs.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        self.to_out.forward(&out)
    }
}

struct Block {
    attn1: Attention,
    attn2: Attention,
    ff_in: Linear,
    ff_out: Linear,
    scale_shift_table: Tensor,
    eps: f64,
}

impl Block {
    fn new(c: &PixArtConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = c.inner_dim();
        Ok(Self {
            attn1: Attention::new(
                dim,
                dim,
                c.num_attention_heads,
                c.attention_bias,
                vb.pp("attn1"),
            )?,
            attn2: Attention::new(
                dim,
                c.cross_attention_dim,
                c.num_attention_heads,
                c.attention_bias,
                vb.pp("attn2"),
            )?,
            ff_in: linear(dim, 4 * dim, vb.pp("ff.net.0.proj"))?,
            ff_out: linear(4 * dim, dim, vb.pp("ff.net.2"))?,
            scale_shift_table: vb.get((6, dim), "scale_shift_table")?,
            eps: c.norm_eps,
        })
    }

    /// `t6` is the adaLN-single output (B, 6, D).
    fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        bias: Option<&Tensor>,
        key_lens: Option<&[u32]>,
        t6: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let mods = self.scale_shift_table.unsqueeze(0)?.broadcast_add(t6)?;
        let m = |i: usize| mods.narrow(1, i, 1);
        let (shift_msa, scale_msa, gate_msa) = (m(0)?, m(1)?, m(2)?);
        let (shift_mlp, scale_mlp, gate_mlp) = (m(3)?, m(4)?, m(5)?);
        let normed = norm_mod(xs, &shift_msa, &scale_msa, self.eps)?;
        let attn = self.attn1.forward(&normed, &normed, None, None)?;
        let xs = ops::gated_residual(xs, &gate_msa, &attn)?;
        let xs = (&xs + self.attn2.forward(&xs, context, bias, key_lens)?)?;
        let normed = norm_mod(&xs, &shift_mlp, &scale_mlp, self.eps)?;
        let ff = self.ff_out.forward(&self.ff_in.forward_gelu(&normed)?)?;
        ops::gated_residual(&xs, &gate_mlp, &ff)
    }
}

/// diffusers' `PixArtTransformer2DModel` (PixArt-Sigma configuration).
pub struct PixArtTransformer {
    proj: Conv2d,
    t_linear_1: Linear,
    t_linear_2: Linear,
    adaln_linear: Linear,
    caption_1: Linear,
    caption_2: Linear,
    blocks: Vec<Block>,
    scale_shift_table: Tensor,
    proj_out: Linear,
    config: PixArtConfig,
}

impl PixArtTransformer {
    /// Builds the transformer from `vb` (the root of `transformer/*.safetensors`).
    pub fn new(config: &PixArtConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let c = config;
        let dim = c.inner_dim();
        let p = c.patch_size;
        let proj = conv2d(
            c.in_channels,
            dim,
            p,
            Conv2dConfig {
                stride: p,
                ..Default::default()
            },
            vb.pp("pos_embed.proj"),
        )?;
        let blocks = (0..c.num_layers)
            .map(|i| Block::new(c, vb.pp(format!("transformer_blocks.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            proj,
            t_linear_1: linear(
                256,
                dim,
                vb.pp("adaln_single.emb.timestep_embedder.linear_1"),
            )?,
            t_linear_2: linear(
                dim,
                dim,
                vb.pp("adaln_single.emb.timestep_embedder.linear_2"),
            )?,
            adaln_linear: linear(dim, 6 * dim, vb.pp("adaln_single.linear"))?,
            caption_1: linear(
                c.caption_channels,
                dim,
                vb.pp("caption_projection.linear_1"),
            )?,
            caption_2: linear(dim, dim, vb.pp("caption_projection.linear_2"))?,
            blocks,
            scale_shift_table: vb.get((2, dim), "scale_shift_table")?,
            proj_out: linear(dim, p * p * c.out_channels, vb.pp("proj_out"))?,
            config: config.clone(),
        })
    }

    /// The model's config.
    pub fn config(&self) -> &PixArtConfig {
        &self.config
    }

    /// Predicts from latents `xs` (B, in_channels, h, w) at `timesteps` (one per row), given
    /// caption embeddings `context` (B, S, caption_channels) and their mask `mask` (B, S) (1 keep,
    /// 0 padding): returns (B, out_channels, h, w).
    pub fn forward(
        &self,
        xs: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, _, h, w) = xs.dims4()?;
        let dtype = xs.dtype();
        let p = c.patch_size;
        let (gh, gw) = (h / p, w / p);
        let dim = c.inner_dim();
        let pos = sincos_pos_embed(dim, gh, gw, c.sample_size / p, c.interpolation_scale);
        let pos = Tensor::from_vec(pos, (1, gh * gw, dim), xs.device())?;
        let tokens = self.proj.forward(xs)?.flatten_from(2)?.transpose(1, 2)?;
        let mut hidden = tokens
            .to_dtype(DType::F32)?
            .broadcast_add(&pos)?
            .to_dtype(dtype)?;

        let temb = timestep_embedding(timesteps, 256, xs.device())?.to_dtype(dtype)?;
        let embedded = self
            .t_linear_2
            .forward(&self.t_linear_1.forward(&temb)?.silu()?)?;
        let t6 = self
            .adaln_linear
            .forward(&embedded.silu()?)?
            .reshape((b, 6, dim))?;

        let context = self
            .caption_2
            .forward(&self.caption_1.forward(context)?.gelu()?)?;
        let bias = match mask {
            Some(mask) => {
                let s = mask.dim(1)?;
                Some(
                    ((mask.to_dtype(dtype)?.affine(-1.0, 1.0)?) * -10000.0)?
                        .reshape((b, 1, 1, s))?,
                )
            }
            None => None,
        };
        let key_lens = match mask {
            Some(mask) if ops::fused_on(&hidden) => prefix_lengths(mask)?,
            _ => None,
        };
        for block in &self.blocks {
            hidden = block.forward(&hidden, &context, bias.as_ref(), key_lens.as_deref(), &t6)?;
        }
        let mods = self
            .scale_shift_table
            .unsqueeze(0)?
            .broadcast_add(&embedded.unsqueeze(1)?)?;
        let (shift, scale) = (mods.narrow(1, 0, 1)?, mods.narrow(1, 1, 1)?);
        let hidden = norm_mod(&hidden, &shift, &scale, 1e-6)?;
        let out = self.proj_out.forward(&hidden)?;
        let oc = c.out_channels;
        // (B, gh, gw, p, p, C) -> (B, C, gh, p, gw, p)
        out.reshape((b, gh, gw, p, p, oc))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((b, oc, gh * p, gw * p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_embedding_of_the_origin_is_sin_zero_cos_one() {
        let e = sincos_pos_embed(8, 2, 3, 16, 1.0);
        assert_eq!(e.len(), 2 * 3 * 8);
        assert_eq!(&e[..8], &[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
    }
}
