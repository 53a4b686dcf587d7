//! The Flux.1 rectified-flow transformer (diffusers' `FluxTransformer2DModel`, Black Forest
//! Labs' `Flux`): 19 double-stream and 38 single-stream blocks for FLUX.1-dev/schnell.
//!
//! The network is built with Black Forest Labs' tensor names (fused `qkv`, `linear1`), which is
//! how `flux1-dev.safetensors` stores it; [`DiffusersFluxWeights`] serves the same names from a
//! diffusers `transformer/` folder (concatenating `to_q/to_k/to_v`, swapping the final layer's
//! scale/shift halves). Numerics follow diffusers rather than candle-transformers' `flux`: the
//! rotary tables are computed in float64 and applied in float32, the time and guidance
//! embeddings are float32 sinusoids, and norms accumulate in float32, so bf16 runs stay close
//! to diffusers' bf16 runs.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::ops::{self, fused, Linear};
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

impl super::ModelConfig for FluxConfig {
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

/// Fails with a message naming the tensor when `t` does not have `shape`.
fn check_shape(t: Tensor, shape: &candle_core::Shape, name: &str) -> candle_core::Result<Tensor> {
    if t.shape() != shape {
        candle_core::bail!(
            "tensor {name} has shape {:?}, expected {:?}",
            t.dims(),
            shape.dims()
        );
    }
    Ok(t)
}

/// Serves Black Forest Labs' tensor names from a diffusers `transformer/` folder.
pub struct DiffusersFluxWeights {
    inner: VarBuilder<'static>,
}

impl DiffusersFluxWeights {
    /// A var builder with BFL names over `inner` (diffusers names), in `dtype` on `device`.
    pub fn var_builder(
        inner: VarBuilder<'static>,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Self { inner }), dtype, device.clone())
    }

    /// The diffusers tensors that make up the BFL tensor `name`, and whether the two halves of
    /// the result must be swapped (the final layer's modulation).
    fn sources(name: &str) -> Option<(Vec<String>, bool)> {
        let (stem, leaf) = name.rsplit_once('.')?;
        let one = |s: &str| Some((vec![format!("{s}.{leaf}")], false));
        let parts: Vec<&str> = stem.split('.').collect();
        match parts.as_slice() {
            ["img_in"] => one("x_embedder"),
            ["txt_in"] => one("context_embedder"),
            ["time_in", l] => one(&format!(
                "time_text_embed.timestep_embedder.{}",
                mlp_layer(l)?
            )),
            ["guidance_in", l] => one(&format!(
                "time_text_embed.guidance_embedder.{}",
                mlp_layer(l)?
            )),
            ["vector_in", l] => one(&format!("time_text_embed.text_embedder.{}", mlp_layer(l)?)),
            ["final_layer", "linear"] => one("proj_out"),
            ["final_layer", "adaLN_modulation", "1"] => {
                Some((vec![format!("norm_out.linear.{leaf}")], true))
            }
            ["double_blocks", i, rest @ ..] => {
                let b = format!("transformer_blocks.{i}");
                let s = match rest {
                    ["img_mod", "lin"] => format!("{b}.norm1.linear"),
                    ["txt_mod", "lin"] => format!("{b}.norm1_context.linear"),
                    ["img_attn", "qkv"] => {
                        return Some((
                            ["to_q", "to_k", "to_v"]
                                .iter()
                                .map(|x| format!("{b}.attn.{x}.{leaf}"))
                                .collect(),
                            false,
                        ))
                    }
                    ["txt_attn", "qkv"] => {
                        return Some((
                            ["add_q_proj", "add_k_proj", "add_v_proj"]
                                .iter()
                                .map(|x| format!("{b}.attn.{x}.{leaf}"))
                                .collect(),
                            false,
                        ))
                    }
                    ["img_attn", "proj"] => format!("{b}.attn.to_out.0"),
                    ["txt_attn", "proj"] => format!("{b}.attn.to_add_out"),
                    ["img_attn", "norm", "query_norm"] => {
                        return one_w(&format!("{b}.attn.norm_q"))
                    }
                    ["img_attn", "norm", "key_norm"] => return one_w(&format!("{b}.attn.norm_k")),
                    ["txt_attn", "norm", "query_norm"] => {
                        return one_w(&format!("{b}.attn.norm_added_q"))
                    }
                    ["txt_attn", "norm", "key_norm"] => {
                        return one_w(&format!("{b}.attn.norm_added_k"))
                    }
                    ["img_mlp", "0"] => format!("{b}.ff.net.0.proj"),
                    ["img_mlp", "2"] => format!("{b}.ff.net.2"),
                    ["txt_mlp", "0"] => format!("{b}.ff_context.net.0.proj"),
                    ["txt_mlp", "2"] => format!("{b}.ff_context.net.2"),
                    _ => return None,
                };
                one(&s)
            }
            ["single_blocks", i, rest @ ..] => {
                let b = format!("single_transformer_blocks.{i}");
                let s = match rest {
                    ["modulation", "lin"] => format!("{b}.norm.linear"),
                    ["linear1"] => {
                        return Some((
                            ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                                .iter()
                                .map(|x| format!("{b}.{x}.{leaf}"))
                                .collect(),
                            false,
                        ))
                    }
                    ["linear2"] => format!("{b}.proj_out"),
                    ["norm", "query_norm"] => return one_w(&format!("{b}.attn.norm_q")),
                    ["norm", "key_norm"] => return one_w(&format!("{b}.attn.norm_k")),
                    _ => return None,
                };
                one(&s)
            }
            _ => None,
        }
    }
}

/// BFL `in_layer`/`out_layer` → diffusers `linear_1`/`linear_2`.
fn mlp_layer(l: &str) -> Option<&'static str> {
    match l {
        "in_layer" => Some("linear_1"),
        "out_layer" => Some("linear_2"),
        _ => None,
    }
}

/// A BFL norm `scale` is a diffusers RMSNorm `weight`.
fn one_w(stem: &str) -> Option<(Vec<String>, bool)> {
    Some((vec![format!("{stem}.weight")], false))
}

impl SimpleBackend for DiffusersFluxWeights {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        check_shape(t, &s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((sources, swap)) = Self::sources(name) else {
            candle_core::bail!("no diffusers tensor corresponds to the Flux tensor {name}")
        };
        let parts = sources
            .iter()
            .map(|s| self.inner.get_unchecked_dtype(s, dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let t = if parts.len() == 1 {
            parts.into_iter().next().unwrap_or_else(|| unreachable!())
        } else {
            Tensor::cat(&parts, 0)?
        };
        let t = if swap {
            let n = t.dim(0)? / 2;
            Tensor::cat(&[t.narrow(0, n, n)?, t.narrow(0, 0, n)?], 0)?
        } else {
            t
        };
        t.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        Self::sources(name).is_some_and(|(s, _)| s.iter().all(|n| self.inner.contains_tensor(n)))
    }
}

fn linear(i: usize, o: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    ops::linear(i, o, vb)
}

/// Whether a forward over `x` takes the fused CUDA path (bf16/f16 on a CUDA device, a head size
/// the attention kernel has; see [`crate::ops`]). Otherwise the candle composition below runs.
fn fused_path(x: &Tensor, head_dim: usize) -> bool {
    ops::fused_on(x)
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && ops::ATTENTION_HEAD_DIMS.contains(&head_dim)
        && ops::fused_for(ops::Kernel::QkNormRope, x, head_dim)
        && ops::fused_for(ops::Kernel::Attention, x, head_dim)
}

/// `layer_norm(x) · (1 + scale) + shift`, fused on CUDA.
fn norm_mod(
    ln: &PlainLayerNorm,
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
) -> candle_core::Result<Tensor> {
    if ops::fused_for(ops::Kernel::LayerNormModulate, x, 0) {
        fused::layer_norm_modulate(x, None, None, Some(shift), Some(scale), 1e-6)
    } else {
        scale_shift(&ln.forward(x)?, shift, scale)
    }
}

/// Fused path: q, k, v of a fused projection `qkv` (B, L, ≥ 3·H·D), normalised and rotated by
/// the rope rows from `offset` on, as (3, B, L, H, D).
fn fused_prep(
    qkv: &Tensor,
    heads: usize,
    norm: &QkNorm,
    rope: &Rope,
    offset: usize,
) -> candle_core::Result<Tensor> {
    fused::qk_norm_rope(
        qkv, heads, &norm.q, &norm.k, &rope.cos, &rope.sin, offset, 1e-6,
    )
}

/// Fused path: attention over prepared (3, B, L, H, D) q, k, v → (B, L, H·D).
fn fused_attention(prep: &Tensor) -> candle_core::Result<Tensor> {
    let (_, b, l, h, d) = prep.dims5()?;
    let get = |i: usize| prep.get(i)?.transpose(1, 2);
    ops::attention(&get(0)?, &get(1)?, &get(2)?, 1.0 / (d as f64).sqrt(), None)?
        .transpose(1, 2)?
        .reshape((b, l, h * d))
}

/// Layer norm without affine parameters (eps 1e-6), accumulated in float32.
struct PlainLayerNorm {
    ones: Tensor,
    zeros: Tensor,
}

impl PlainLayerNorm {
    fn new(dim: usize, dtype: DType, dev: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, dtype, dev)?,
            zeros: Tensor::zeros(dim, dtype, dev)?,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.ones, &self.zeros, 1e-6)
    }
}

/// Query/key RMS norms of one attention (eps 1e-6).
struct QkNorm {
    q: Tensor,
    k: Tensor,
}

impl QkNorm {
    fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            q: vb.get(dim, "query_norm.scale")?,
            k: vb.get(dim, "key_norm.scale")?,
        })
    }
}

/// The rotary tables: cos and sin, (L, head_dim/2) float32.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for position ids `ids` (L rows of 3 axes), as diffusers' `FluxPosEmbed` computes
    /// them (float64 frequencies, cast to float32).
    pub fn new(
        ids: &[[f32; 3]],
        axes_dim: &[usize],
        theta: f64,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let half: usize = axes_dim.iter().sum::<usize>() / 2;
        let mut cos = Vec::with_capacity(ids.len() * half);
        let mut sin = Vec::with_capacity(ids.len() * half);
        for id in ids {
            for (axis, &dim) in axes_dim.iter().enumerate() {
                for j in 0..dim / 2 {
                    let freq = 1.0 / theta.powf((2 * j) as f64 / dim as f64);
                    let angle = id[axis] as f64 * freq;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (ids.len(), half), dev)?,
            sin: Tensor::from_vec(sin, (ids.len(), half), dev)?,
        })
    }

    /// Rotates `x` (B, H, L, D) pairwise, in float32, returning `x`'s dtype.
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, h, l, d) = x.dims4()?;
        let xf = x.to_dtype(DType::F32)?.reshape((b, h, l, d / 2, 2))?;
        let x0 = xf.narrow(4, 0, 1)?.squeeze(4)?;
        let x1 = xf.narrow(4, 1, 1)?.squeeze(4)?;
        let o0 = (x0.broadcast_mul(&self.cos)? - x1.broadcast_mul(&self.sin)?)?;
        let o1 = (x0.broadcast_mul(&self.sin)? + x1.broadcast_mul(&self.cos)?)?;
        Tensor::stack(&[o0, o1], 4)?
            .reshape((b, h, l, d))?
            .to_dtype(x.dtype())
    }
}

/// Position ids of the packed latent grid: row `i`, column `j` → `[0, i, j]`, row-major.
pub fn latent_image_ids(rows: usize, cols: usize) -> Vec<[f32; 3]> {
    (0..rows)
        .flat_map(|i| (0..cols).map(move |j| [0.0, i as f32, j as f32]))
        .collect()
}

/// `[q; k; v]` (each (B, H, L, D)) from a fused projection (B, L, 3·H·D).
fn split_qkv(
    qkv: &Tensor,
    heads: usize,
    norm: &QkNorm,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (b, l, three_hd) = qkv.dims3()?;
    let d = three_hd / 3 / heads;
    let qkv = qkv.reshape((b, l, 3, heads, d))?;
    let get =
        |i: usize| -> candle_core::Result<Tensor> { qkv.narrow(2, i, 1)?.squeeze(2)?.contiguous() };
    let q = candle_nn::ops::rms_norm(&get(0)?, &norm.q, 1e-6)?.transpose(1, 2)?;
    let k = candle_nn::ops::rms_norm(&get(1)?, &norm.k, 1e-6)?.transpose(1, 2)?;
    let v = get(2)?.transpose(1, 2)?;
    Ok((q, k, v))
}

/// Rotary attention over (B, H, L, D) → (B, L, H·D), one batch row at a time (bounds memory).
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope) -> candle_core::Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    let scale = 1.0 / (d as f64).sqrt();
    let q = rope.apply(q)?;
    let k = rope.apply(k)?;
    let rows = (0..b)
        .map(|i| {
            let qi = (q.narrow(0, i, 1)? * scale)?.contiguous()?;
            let ki = k.narrow(0, i, 1)?.contiguous()?;
            let vi = v.narrow(0, i, 1)?.contiguous()?;
            let w = qi.matmul(&ki.t()?)?;
            let w = candle_nn::ops::softmax_last_dim(&w)?;
            w.matmul(&vi)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)?
        .transpose(1, 2)?
        .reshape((b, l, h * d))
}

/// Every block's adaLN modulation chunks for one conditioning vector (see
/// [`FluxTransformer::modulations`]): each chunk (B, 1, hidden).
#[derive(Debug, Clone)]
pub struct Modulations {
    batch: usize,
    /// Per double block: the image stream's 6 chunks and the text stream's 6.
    double: Vec<(Vec<Tensor>, Vec<Tensor>)>,
    /// Per single block: 3 chunks.
    single: Vec<Vec<Tensor>>,
    /// The final layer's shift and scale.
    last: Vec<Tensor>,
}

impl Modulations {
    /// The batch these were computed for.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Modulations computed for one row, as views broadcast over `b` rows (no copies).
    pub fn for_batch(&self, b: usize) -> candle_core::Result<Modulations> {
        if self.batch != 1 {
            candle_core::bail!(
                "modulations for {} rows cannot serve a batch of {b}; compute them for 1 row",
                self.batch
            );
        }
        let wide = |chunks: &Vec<Tensor>| -> candle_core::Result<Vec<Tensor>> {
            chunks
                .iter()
                .map(|c| {
                    let (_, one, h) = c.dims3()?;
                    c.broadcast_as((b, one, h))
                })
                .collect()
        };
        Ok(Modulations {
            batch: b,
            double: self
                .double
                .iter()
                .map(|(i, t)| Ok((wide(i)?, wide(t)?)))
                .collect::<candle_core::Result<Vec<_>>>()?,
            single: self
                .single
                .iter()
                .map(wide)
                .collect::<candle_core::Result<_>>()?,
            last: wide(&self.last)?,
        })
    }
}

/// `n` modulation chunks (each (B, 1, hidden)) from `silu(vec) @ lin`.
fn modulation(lin: &Linear, vec: &Tensor, n: usize) -> candle_core::Result<Vec<Tensor>> {
    vec.silu()?.apply(lin)?.unsqueeze(1)?.chunk(n, D::Minus1)
}

fn scale_shift(x: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

struct Mlp {
    l0: Linear,
    l2: Linear,
}

impl Mlp {
    fn new(h: usize, m: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            l0: linear(h, m, vb.pp("0"))?,
            l2: linear(m, h, vb.pp("2"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.l0.forward_gelu(x)?.apply(&self.l2)
    }
}

struct StreamHalf {
    modulation: Linear,
    qkv: Linear,
    norm: QkNorm,
    proj: Linear,
    mlp: Mlp,
}

impl StreamHalf {
    fn new(c: &FluxConfig, vb: VarBuilder, side: &str) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let attn = vb.pp(format!("{side}_attn"));
        Ok(Self {
            modulation: linear(h, 6 * h, vb.pp(format!("{side}_mod")).pp("lin"))?,
            qkv: linear(h, 3 * h, attn.pp("qkv"))?,
            norm: QkNorm::new(c.head_dim(), attn.pp("norm"))?,
            proj: linear(h, h, attn.pp("proj"))?,
            mlp: Mlp::new(h, c.mlp_size(), vb.pp(format!("{side}_mlp")))?,
        })
    }
}

struct DoubleBlock {
    img: StreamHalf,
    txt: StreamHalf,
    heads: usize,
}

impl DoubleBlock {
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        (im, tm): (&[Tensor], &[Tensor]),
        rope: &Rope,
        ln: &PlainLayerNorm,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let img_in = norm_mod(ln, img, &im[0], &im[1])?;
        let txt_in = norm_mod(ln, txt, &tm[0], &tm[1])?;
        let nt = txt.dim(1)?;
        let img_qkv = img_in.apply(&self.img.qkv)?;
        let txt_qkv = txt_in.apply(&self.txt.qkv)?;
        let attn = if fused_path(img, self.img.norm.q.dim(0)?) {
            // Text then image rows straight into one (3, B, L, H, D) tensor: no concatenation.
            let (tn, inorm) = (&self.txt.norm, &self.img.norm);
            let joint = fused::qk_norm_rope_joint(
                (&txt_qkv, &tn.q, &tn.k),
                (&img_qkv, &inorm.q, &inorm.k),
                self.heads,
                (&rope.cos, &rope.sin),
                0,
                1e-6,
            )?;
            fused_attention(&joint)?
        } else {
            let (iq, ik, iv) = split_qkv(&img_qkv, self.heads, &self.img.norm)?;
            let (tq, tk, tv) = split_qkv(&txt_qkv, self.heads, &self.txt.norm)?;
            let q = Tensor::cat(&[tq, iq], 2)?;
            let k = Tensor::cat(&[tk, ik], 2)?;
            let v = Tensor::cat(&[tv, iv], 2)?;
            attention(&q, &k, &v, rope)?
        };
        let txt_attn = attn.narrow(1, 0, nt)?;
        let img_attn = attn.narrow(1, nt, attn.dim(1)? - nt)?;

        let img = ops::gated_residual(img, &im[2], &img_attn.apply(&self.img.proj)?)?;
        let img_ff = norm_mod(ln, &img, &im[3], &im[4])?;
        let img = ops::gated_residual(&img, &im[5], &self.img.mlp.forward(&img_ff)?)?;

        let txt = ops::gated_residual(txt, &tm[2], &txt_attn.apply(&self.txt.proj)?)?;
        let txt_ff = norm_mod(ln, &txt, &tm[3], &tm[4])?;
        let txt = ops::gated_residual(&txt, &tm[5], &self.txt.mlp.forward(&txt_ff)?)?;
        Ok((img, txt))
    }
}

struct SingleBlock {
    modulation: Linear,
    linear1: Linear,
    linear2: Linear,
    norm: QkNorm,
    hidden: usize,
    mlp: usize,
    heads: usize,
}

impl SingleBlock {
    fn new(c: &FluxConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let m = c.mlp_size();
        Ok(Self {
            modulation: linear(h, 3 * h, vb.pp("modulation").pp("lin"))?,
            linear1: linear(h, 3 * h + m, vb.pp("linear1"))?,
            linear2: linear(h + m, h, vb.pp("linear2"))?,
            norm: QkNorm::new(c.head_dim(), vb.pp("norm"))?,
            hidden: h,
            mlp: m,
            heads: c.num_heads,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        m: &[Tensor],
        rope: &Rope,
        ln: &PlainLayerNorm,
    ) -> candle_core::Result<Tensor> {
        let xn = norm_mod(ln, x, &m[0], &m[1])?;
        let h3 = 3 * self.hidden;
        let out = if fused_path(x, self.norm.q.dim(0)?) {
            // linear1 as two products: q/k/v, and the MLP input with GELU in the epilogue.
            let w = self.linear1.weight();
            let b = self.linear1.bias();
            let part = |start: usize, len: usize, act| -> candle_core::Result<Tensor> {
                let bias = b.map(|b| b.narrow(0, start, len)).transpose()?;
                ops::linear_fused_or_plain(&xn, &w.narrow(0, start, len)?, bias.as_ref(), act)
            };
            let qkv = part(0, h3, None)?;
            let mlp = part(h3, self.mlp, Some(ops::Activation::GeluTanh))?;
            let prep = fused_prep(&qkv, self.heads, &self.norm, rope, 0)?;
            let attn = fused_attention(&prep)?;
            // linear2 over [attn, mlp] as two products into one output: no concatenation.
            let w2 = self.linear2.weight();
            ops::linear_sum_fused_or_plain(
                &attn,
                &w2.narrow(1, 0, self.hidden)?,
                &mlp,
                &w2.narrow(1, self.hidden, self.mlp)?,
                self.linear2.bias(),
            )?
        } else {
            let xm = xn.apply(&self.linear1)?;
            let qkv = xm.narrow(D::Minus1, 0, h3)?;
            let mlp = xm.narrow(D::Minus1, h3, self.mlp)?;
            let (q, k, v) = split_qkv(&qkv.contiguous()?, self.heads, &self.norm)?;
            let attn = attention(&q, &k, &v, rope)?;
            Tensor::cat(&[attn, mlp.gelu()?], 2)?.apply(&self.linear2)?
        };
        ops::gated_residual(x, &m[2], &out)
    }
}

/// Time-like MLP embedder (`in_layer` → SiLU → `out_layer`).
struct Embedder {
    inl: Linear,
    outl: Linear,
}

impl Embedder {
    fn new(i: usize, h: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            inl: linear(i, h, vb.pp("in_layer"))?,
            outl: linear(h, h, vb.pp("out_layer"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.apply(&self.inl)?.silu()?.apply(&self.outl)
    }
}

/// diffusers' `get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)`
/// in float32 for values `t` (B,) (already multiplied by 1000), cast to `dtype`.
fn sinusoid(t: &[f32], dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let half = 128usize;
    let log = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((log * i as f32) / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(t.len() * 2 * half);
    for &tv in t {
        let args: Vec<f32> = freqs.iter().map(|f| tv * f).collect();
        out.extend(args.iter().map(|a| a.cos()));
        out.extend(args.iter().map(|a| a.sin()));
    }
    Tensor::from_vec(out, (t.len(), 2 * half), dev)?.to_dtype(dtype)
}

/// The Flux transformer with its weights.
pub struct FluxTransformer {
    config: FluxConfig,
    img_in: Linear,
    txt_in: Linear,
    time_in: Embedder,
    vector_in: Embedder,
    guidance_in: Option<Embedder>,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    final_norm_mod: Linear,
    final_linear: Linear,
    ln: PlainLayerNorm,
    dtype: DType,
    device: Device,
}

impl FluxTransformer {
    /// Builds the network from a var builder with BFL tensor names (a `flux1-dev.safetensors`
    /// file, [`DiffusersFluxWeights`] or random weights).
    pub fn new(config: &FluxConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let c = config;
        let h = c.hidden_size;
        let double_blocks = (0..c.depth)
            .map(|i| {
                let b = vb.pp("double_blocks").pp(i);
                Ok(DoubleBlock {
                    img: StreamHalf::new(c, b.clone(), "img")?,
                    txt: StreamHalf::new(c, b, "txt")?,
                    heads: c.num_heads,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let single_blocks = (0..c.depth_single_blocks)
            .map(|i| SingleBlock::new(c, vb.pp("single_blocks").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config: c.clone(),
            img_in: linear(c.in_channels, h, vb.pp("img_in"))?,
            txt_in: linear(c.context_in_dim, h, vb.pp("txt_in"))?,
            time_in: Embedder::new(256, h, vb.pp("time_in"))?,
            vector_in: Embedder::new(c.vec_in_dim, h, vb.pp("vector_in"))?,
            guidance_in: if c.guidance_embed {
                Some(Embedder::new(256, h, vb.pp("guidance_in"))?)
            } else {
                None
            },
            double_blocks,
            single_blocks,
            final_norm_mod: linear(
                h,
                2 * h,
                vb.pp("final_layer").pp("adaLN_modulation").pp("1"),
            )?,
            final_linear: linear(h, c.in_channels, vb.pp("final_layer").pp("linear"))?,
            ln: PlainLayerNorm::new(h, vb.dtype(), vb.device())?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// The conditioning vector (B, hidden): time + guidance + pooled-text embeddings.
    /// `timesteps` and `guidance` are the values the sinusoids see (diffusers' `timestep * 1000`).
    pub fn conditioning(
        &self,
        timesteps: &[f32],
        guidance: Option<&[f32]>,
        pooled: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let mut vec = self
            .time_in
            .forward(&sinusoid(timesteps, self.dtype, &self.device)?)?;
        if let (Some(g_in), Some(g)) = (&self.guidance_in, guidance) {
            vec = (vec + g_in.forward(&sinusoid(g, self.dtype, &self.device)?)?)?;
        }
        vec + self.vector_in.forward(&pooled.to_dtype(self.dtype)?)?
    }

    /// One forward: packed latents `img` (B, L, in_channels), T5 states `txt` (B, T,
    /// context_in_dim), the conditioning of [`FluxTransformer::conditioning`] (B, hidden) and the
    /// rotary tables for the T text tokens then the L image tokens; returns the predicted
    /// velocity (B, L, in_channels) in the model dtype.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        rope: &Rope,
    ) -> candle_core::Result<Tensor> {
        self.forward_modulated(img, txt, &self.modulations(vec)?, rope)
    }

    /// Every block's adaLN modulation for the conditioning `vec` (B, hidden): what
    /// [`FluxTransformer::forward`] computes first. It depends on the timestep, the guidance and
    /// the prompt only, not on the latents, so a pipeline computes it once per prompt and step
    /// (with B = 1) and reuses it for every image of a search ([`Modulations::for_batch`]).
    pub fn modulations(&self, vec: &Tensor) -> candle_core::Result<Modulations> {
        let double = self
            .double_blocks
            .iter()
            .map(|b| {
                Ok((
                    modulation(&b.img.modulation, vec, 6)?,
                    modulation(&b.txt.modulation, vec, 6)?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let single = self
            .single_blocks
            .iter()
            .map(|b| modulation(&b.modulation, vec, 3))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Modulations {
            batch: vec.dim(0)?,
            double,
            single,
            last: modulation(&self.final_norm_mod, vec, 2)?,
        })
    }

    /// [`FluxTransformer::forward`] with the modulations already computed (their batch `img`'s,
    /// or 1, broadcast).
    pub fn forward_modulated(
        &self,
        img: &Tensor,
        txt: &Tensor,
        mods: &Modulations,
        rope: &Rope,
    ) -> candle_core::Result<Tensor> {
        let b = img.dim(0)?;
        let owned;
        let mods = if mods.batch == b {
            mods
        } else {
            owned = mods.for_batch(b)?;
            &owned
        };
        let mut img = img.to_dtype(self.dtype)?.apply(&self.img_in)?;
        let mut txt = txt.to_dtype(self.dtype)?.apply(&self.txt_in)?;
        for (block, (im, tm)) in self.double_blocks.iter().zip(&mods.double) {
            (img, txt) = block.forward(&img, &txt, (im, tm), rope, &self.ln)?;
        }
        let nt = txt.dim(1)?;
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for (block, m) in self.single_blocks.iter().zip(&mods.single) {
            x = block.forward(&x, m, rope, &self.ln)?;
        }
        let img = x.narrow(1, nt, x.dim(1)? - nt)?;
        let m = &mods.last;
        norm_mod(&self.ln, &img, &m[0], &m[1])?.apply(&self.final_linear)
    }

    /// Whether the model embeds the guidance scale.
    pub fn has_guidance(&self) -> bool {
        self.guidance_in.is_some()
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

    #[test]
    fn diffusers_qkv_names_map_to_the_three_projections() {
        let (s, swap) = DiffusersFluxWeights::sources("double_blocks.3.txt_attn.qkv.bias").unwrap();
        assert_eq!(
            s,
            vec![
                "transformer_blocks.3.attn.add_q_proj.bias",
                "transformer_blocks.3.attn.add_k_proj.bias",
                "transformer_blocks.3.attn.add_v_proj.bias"
            ]
        );
        assert!(!swap);
        let (_, swap) =
            DiffusersFluxWeights::sources("final_layer.adaLN_modulation.1.weight").unwrap();
        assert!(swap);
    }

    #[test]
    fn latent_ids_are_row_major_rows_then_columns() {
        let ids = latent_image_ids(2, 3);
        assert_eq!(ids[4], [0.0, 1.0, 1.0]);
        assert_eq!(ids.len(), 6);
    }
}
