//! diffusers' `UNet2DConditionModel` as SDXL and Stable Diffusion 1.x configure it:
//! `DownBlock2D` / `CrossAttnDownBlock2D` (and their up blocks) with per-block
//! `transformer_layers_per_block` and head counts, linear (SDXL) or 1×1 conv (SD 1.x)
//! transformer projections, any `norm_num_groups`, and optionally the `addition_embed_type:
//! "text_time"` conditioning of SDXL: `add_embedding(concat(text_embeds, add_time_proj(time_ids)))`
//! added to the timestep embedding. On CUDA its attention, group norms (+ SiLU), GEGLU and linear
//! layers take the fused path ([`crate::ops`]).
//!
//! Own code because candle-transformers' UNet has no `add_embedding` (it ignores the pooled text
//! embeds and the size/crop time ids), its plain blocks always use 32 norm groups, and our fused
//! kernels need to be wired in. The architecture read from `unet/config.json` is [`config`].

mod config;

pub use config::{PerBlock, UNetConfig, UNetConfigJson};

use crate::ops::{
    self, conv2d, fused, group_norm, linear, linear_no_bias, Conv2d, GroupNorm, Linear,
};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{layer_norm, Conv2dConfig, LayerNorm, VarBuilder};

/// diffusers' `get_timestep_embedding` in float32, as torch computes it: for `half = dim / 2`,
/// `freq_i = exp(-ln(10000) · i / (half - shift))`, `[sin(t·freq), cos(t·freq)]` (swapped
/// when `flip_sin_to_cos`), zero-padded to an odd `dim`. Returns (len(values), dim) f32.
pub fn timestep_embedding(
    values: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let log_max = -(10000f64.ln() as f32);
    let denom = (half as f64 - shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((log_max * i as f32) / denom).exp())
        .collect();
    let mut data = Vec::with_capacity(values.len() * dim);
    for &t in values {
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            data.extend(cos.chain(sin));
        } else {
            data.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_vec(data, (values.len(), dim), device)
}

/// `linear_1 → SiLU → linear_2` (diffusers' `TimestepEmbedding`).
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(vb: VarBuilder, input: usize, dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: linear(input, dim, vb.pp("linear_1"))?,
            linear_2: linear(dim, dim, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}

/// A `kernel`×`kernel` convolution `cin` -> `cout` with bias, loaded from `vb`.
pub(crate) fn conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    conv2d(cin, cout, kernel, cfg, vb)
}

/// diffusers' `ResnetBlock2D` (default time scale-shift, SiLU), with a time embedding (the
/// UNets) or without one (the VAE decoder).
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl UNetConfig {
    /// The shape of one of this UNet's resnet blocks.
    fn resnet(&self, cin: usize, cout: usize, temb: usize, scale: f64) -> ResnetShape {
        ResnetShape {
            cin,
            cout,
            temb: Some(temb),
            groups: self.norm_num_groups,
            eps: self.norm_eps,
            output_scale_factor: scale,
        }
    }
}

/// The shape of a [`ResnetBlock`]: channels in and out, the time embedding's width (none for
/// the VAE), group norms' groups and epsilon, and the factor the output is divided by.
pub(crate) struct ResnetShape {
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    pub(crate) temb: Option<usize>,
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) output_scale_factor: f64,
}

impl ResnetBlock {
    pub(crate) fn new(vb: VarBuilder, s: ResnetShape) -> candle_core::Result<Self> {
        let (g, cin, cout) = (s.groups, s.cin, s.cout);
        Ok(Self {
            norm1: group_norm(g, cin, s.eps, vb.pp("norm1"))?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: s
                .temb
                .map(|t| linear(t, cout, vb.pp("time_emb_proj")))
                .transpose()?,
            norm2: group_norm(g, cout, s.eps, vb.pp("norm2"))?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(conv(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            output_scale_factor: s.output_scale_factor,
        })
    }

    /// `xs` (B, C_in, H, W), `temb` (B, T) where the block has a time embedding.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        temb: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers' `Attention` with the default processor (no biases on q/k/v).
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    fn new(
        vb: VarBuilder,
        dim: usize,
        context_dim: usize,
        heads: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            to_q: linear_no_bias(dim, dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out").pp("0"))?,
            heads,
        })
    }

    /// `xs`: (B, N, dim); `context`: (B, M, context_dim) → (B, N, dim). The softmax runs in f32.
    fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, dim) = xs.dims3()?;
        let head_dim = dim / self.heads;
        let split = |x: Tensor| -> candle_core::Result<Tensor> {
            let m = x.dim(1)?;
            x.reshape((b, m, self.heads, head_dim))?.transpose(1, 2)
        };
        let q = split(self.to_q.forward(xs)?)?;
        let k = split(self.to_k.forward(context)?)?;
        let v = split(self.to_v.forward(context)?)?;
        let scale = (head_dim as f64).powf(-0.5);
        if ops::attention_fused_ok(&q, &k, &v) {
            let out = ops::attention(&q, &k, &v, scale, None)?;
            return self
                .to_out
                .forward(&out.transpose(1, 2)?.reshape((b, n, dim))?);
        }
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
            .to_dtype(xs.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, dim))?;
        self.to_out.forward(&out)
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, self-attention, cross-attention, GEGLU).
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        context_dim: usize,
        heads: usize,
    ) -> candle_core::Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff_proj: linear(dim, 2 * inner, vb.pp("ff").pp("net").pp("0").pp("proj"))?,
            ff_out: linear(inner, dim, vb.pp("ff").pp("net").pp("2"))?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.norm1.forward(xs)?;
        let xs = (self.attn1.forward(&h, &h)? + xs)?;
        let h = self.norm2.forward(&xs)?;
        let xs = (self.attn2.forward(&h, context)? + xs)?;
        let h = self.ff_proj.forward(&self.norm3.forward(&xs)?)?;
        let inner = h.dim(D::Minus1)? / 2;
        let gated = if ops::fused_for(ops::Kernel::Gelu, &h, 0) {
            fused::geglu(&h)?
        } else {
            (h.narrow(D::Minus1, 0, inner)? * h.narrow(D::Minus1, inner, inner)?.gelu_erf()?)?
        };
        self.ff_out.forward(&gated)? + xs
    }
}

/// A projection in or out of the transformer: linear, or a 1×1 conv.
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// diffusers' `Transformer2DModel` over continuous input (group norm with eps 1e-6).
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        layers: usize,
        c: &UNetConfig,
    ) -> candle_core::Result<Self> {
        let proj = |name: &str| -> candle_core::Result<Projection> {
            Ok(if c.use_linear_projection {
                Projection::Linear(linear(channels, channels, vb.pp(name))?)
            } else {
                Projection::Conv(conv(vb.pp(name), channels, channels, 1, 1, 0)?)
            })
        };
        Ok(Self {
            norm: group_norm(c.norm_num_groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks: (0..layers)
                .map(|i| {
                    TransformerBlock::new(
                        vb.pp("transformer_blocks").pp(i),
                        channels,
                        c.cross_attention_dim,
                        heads,
                    )
                })
                .collect::<candle_core::Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, ch, h, w) = xs.dims4()?;
        let to_tokens = |x: Tensor| -> candle_core::Result<Tensor> {
            x.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
        };
        let to_map = |x: Tensor| -> candle_core::Result<Tensor> {
            x.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let normed = self.norm.forward(xs)?;
        let mut tokens = match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(normed)?)?,
            Projection::Conv(c) => to_tokens(c.forward(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Linear(l) => to_map(l.forward(&tokens)?)?,
            Projection::Conv(c) => c.forward(&to_map(tokens)?)?,
        };
        out + xs
    }
}

/// One down or up block: resnets, each optionally followed by a transformer, then an optional
/// resampler (stride-2 conv down; nearest ×2 + conv up).
struct Block {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    resampler: Option<Conv2d>,
}

/// The UNet (see the module docs); weights in diffusers' names.
pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down: Vec<Block>,
    mid_resnets: Vec<ResnetBlock>,
    mid_attention: Transformer2D,
    up: Vec<Block>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Builds the UNet from its config and a var builder over `unet/` weights.
    pub fn new(vb: VarBuilder, c: &UNetConfig) -> candle_core::Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = 4 * ch[0];
        let layers = c.layers_per_block;
        let add_embedding = match c.text_time {
            Some((_, input)) => Some(TimestepEmbedding::new(vb.pp("add_embedding"), input, temb)?),
            None => None,
        };

        let mut down = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, &block_ch) in ch.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = block_ch;
            let bvb = vb.pp("down_blocks").pp(i);
            let resnets = (0..layers)
                .map(|j| {
                    let cin = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock::new(bvb.pp("resnets").pp(j), c.resnet(cin, out_ch, temb, 1.0))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let attentions = if c.down_cross_attention[i] {
                (0..layers)
                    .map(|j| {
                        Transformer2D::new(
                            bvb.pp("attentions").pp(j),
                            out_ch,
                            c.num_attention_heads[i],
                            c.transformer_layers_per_block[i],
                            c,
                        )
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?
            } else {
                Vec::new()
            };
            let resampler = if i + 1 < n {
                Some(conv(
                    bvb.pp("downsamplers").pp(0).pp("conv"),
                    out_ch,
                    out_ch,
                    3,
                    2,
                    c.downsample_padding,
                )?)
            } else {
                None
            };
            down.push(Block {
                resnets,
                attentions,
                resampler,
            });
        }

        let last = ch[n - 1];
        let mvb = vb.pp("mid_block");
        let mid_resnets = (0..2)
            .map(|j| {
                ResnetBlock::new(
                    mvb.pp("resnets").pp(j),
                    c.resnet(last, last, temb, c.mid_block_scale_factor),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid_attention = Transformer2D::new(
            mvb.pp("attentions").pp(0),
            last,
            c.num_attention_heads[n - 1],
            c.transformer_layers_per_block[n - 1],
            c,
        )?;

        let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let (rch, rheads, rlayers) = (
            rev(ch),
            rev(&c.num_attention_heads),
            rev(&c.transformer_layers_per_block),
        );
        let mut up = Vec::with_capacity(n);
        let mut out_ch = rch[0];
        for i in 0..n {
            let prev = out_ch;
            out_ch = rch[i];
            let in_ch = rch[(i + 1).min(n - 1)];
            let bvb = vb.pp("up_blocks").pp(i);
            let resnets = (0..=layers)
                .map(|j| {
                    let skip = if j == layers { in_ch } else { out_ch };
                    let cin = if j == 0 { prev } else { out_ch };
                    ResnetBlock::new(
                        bvb.pp("resnets").pp(j),
                        c.resnet(cin + skip, out_ch, temb, 1.0),
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let attentions = if c.up_cross_attention[i] {
                (0..=layers)
                    .map(|j| {
                        Transformer2D::new(
                            bvb.pp("attentions").pp(j),
                            out_ch,
                            rheads[i],
                            rlayers[i],
                            c,
                        )
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?
            } else {
                Vec::new()
            };
            let resampler = if i + 1 < n {
                Some(conv(
                    bvb.pp("upsamplers").pp(0).pp("conv"),
                    out_ch,
                    out_ch,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up.push(Block {
                resnets,
                attentions,
                resampler,
            });
        }

        Ok(Self {
            config: c.clone(),
            conv_in: conv(vb.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb)?,
            add_embedding,
            down,
            mid_resnets,
            mid_attention,
            up,
            conv_norm_out: group_norm(
                c.norm_num_groups,
                ch[0],
                c.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv(vb.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
        })
    }

    /// The config the UNet was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The conditioning embedding (B, 4·block_out_channels[0]): the timestep embedding plus,
    /// with text-time conditioning, `add_embedding(concat(text_embeds, add_time_proj(time_ids)))`.
    fn embedding(
        &self,
        batch: usize,
        timestep: f64,
        text_time: Option<(&Tensor, &Tensor)>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let t = timestep_embedding(
            &vec![timestep as f32; batch],
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
            device,
        )?
        .to_dtype(dtype)?;
        let emb = self.time_embedding.forward(&t)?;
        match (&self.add_embedding, c.text_time, text_time) {
            (Some(add), Some((dim, input)), Some((text_embeds, time_ids))) => {
                let ids: Vec<f32> = time_ids.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let time = timestep_embedding(&ids, dim, c.flip_sin_to_cos, c.freq_shift, device)?
                    .reshape((batch, ()))?
                    .to_dtype(dtype)?;
                let add_in = Tensor::cat(&[&text_embeds.to_dtype(dtype)?, &time], 1)?;
                if add_in.dim(1)? != input {
                    candle_core::bail!(
                        "text embeds ({}) + {} time ids × {dim} give {} features; \
                         projection_class_embeddings_input_dim is {input}",
                        text_embeds.dim(1)?,
                        time_ids.dim(1)?,
                        add_in.dim(1)?
                    );
                }
                emb + add.forward(&add_in)?
            }
            (None, _, _) => Ok(emb),
            _ => candle_core::bail!(
                "this UNet has text-time conditioning (addition_embed_type \"text_time\"): \
                 text_embeds and time_ids are required"
            ),
        }
    }

    /// Predicts the noise for `sample` (B, in_channels, h, w) at `timestep`, conditioned on
    /// `encoder_hidden_states` (B, T, cross_attention_dim) and, for text-time UNets,
    /// `text_time = (text_embeds (B, P), time_ids (B, 6))`. Returns (B, out_channels, h, w).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        text_time: Option<(&Tensor, &Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let batch = sample.dim(0)?;
        let emb = self.embedding(batch, timestep, text_time, sample.dtype(), sample.device())?;
        let ctx = encoder_hidden_states;

        let mut xs = self.conv_in.forward(sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, ctx)?;
                }
                skips.push(xs.clone());
            }
            if let Some(down) = &block.resampler {
                xs = down.forward(&xs)?;
                skips.push(xs.clone());
            }
        }

        xs = self.mid_resnets[0].forward(&xs, Some(&emb))?;
        xs = self.mid_attention.forward(&xs, ctx)?;
        xs = self.mid_resnets[1].forward(&xs, Some(&emb))?;

        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("UNet skip stack underflow".into()))?;
                xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, ctx)?;
                }
            }
            if let Some(up) = &block.resampler {
                // diffusers upsamples to the next skip's size (2× unless a size was odd).
                let (h, w) = match skips.last() {
                    Some(s) => (s.dim(2)?, s.dim(3)?),
                    None => (2 * xs.dim(2)?, 2 * xs.dim(3)?),
                };
                xs = up.forward(&xs.upsample_nearest2d(h, w)?)?;
            }
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_embedding_puts_cos_first_when_flipped() {
        let e = timestep_embedding(&[0.0, 1.0], 4, true, 0.0, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = e.to_vec2().unwrap();
        // t = 0: cos = 1, sin = 0; t = 1, freqs [1, 1e-2]: [cos 1, cos 0.01, sin 1, sin 0.01].
        assert_eq!(v[0], vec![1.0, 1.0, 0.0, 0.0]);
        let want = [1f32.cos(), 0.01f32.cos(), 1f32.sin(), 0.01f32.sin()];
        for (a, b) in v[1].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
