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

mod config;
mod weights;

pub use config::{FluxConfig, FluxConfigJson};
pub use weights::DiffusersFluxWeights;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::ops::{self, fused, Linear};

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
    fn latent_ids_are_row_major_rows_then_columns() {
        let ids = latent_image_ids(2, 3);
        assert_eq!(ids[4], [0.0, 1.0, 1.0]);
        assert_eq!(ids.len(), 6);
    }
}
