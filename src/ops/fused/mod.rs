//! The fused operations as candle custom ops: each runs the project's CUDA kernel on a CUDA
//! device ([`super::cuda`]) and a plain float32 implementation of the same function on the CPU
//! (the reference the GPU tests compare against; both in `custom_ops`). These functions always
//! take the fused path; models go through the dispatching helpers of [`super`], which ask the
//! self-check ([`super::selfcheck`]) and pick the attention tile ([`super::tuning`]).

mod custom_ops;

use candle_core::{bail, DType, Result, Tensor};

use super::kernels::{
    Activation, AttentionOp, ConvOp, GatedResidualOp, GeluOp, GroupNormOp, KeyMask, LayerNormModOp,
    LinearOp, QkNormRopeOp, QkStream,
};
use super::settings::AttentionTile;

/// The attention kernel with tile `tile` (see [`super::attention_masked`], which models call: it
/// picks the tile): `q` (B, H, Lq, D), `k`
/// and `v` (B, Hk, Lk, D) with `H` a multiple of `Hk` (query head `h` reads key/value head
/// `h / (H / Hk)`), any strides. Returns (B, H, Lq, D) as [`attention`] does. Causal attention
/// skips the key tiles above the diagonal on CUDA.
pub fn attention_kernel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &KeyMask,
    tile: AttentionTile,
) -> Result<Tensor> {
    let (b, h, _lq, d) = q.dims4()?;
    let (kb, kh, _, kd) = k.dims4()?;
    if (kb, kd) != (b, d) || kh == 0 || h % kh != 0 || v.dims() != k.dims() {
        bail!(
            "attention: q {:?}, k {:?} and v {:?} do not fit (B, H, L, D) with H a multiple of \
             k's heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!("attention: q, k and v must share one dtype");
    }
    if !(scale > 0.0 && scale.is_finite()) {
        bail!("attention: the scale must be positive and finite (usually 1/sqrt(D)), got {scale}");
    }
    if let Some(lens) = &mask.lens {
        if lens.len() != b {
            bail!("attention: {} key lengths for a batch of {b}", lens.len());
        }
    }
    if let Some(holes) = &mask.holes {
        if holes.len() != b {
            bail!("attention: {} key holes for a batch of {b}", holes.len());
        }
    }
    // Lengths past Lk need no clamping here: `KeyMask::sees` and `KeyMask::ranges` clamp them.
    let op = AttentionOp {
        tile,
        scale: scale as f32,
        mask: mask.clone(),
    };
    q.apply_op3_no_bwd(k, v, &op)?.transpose(1, 2)
}

/// Layer norm over the last dimension fused with its optional affine parameters and the adaLN
/// modulation: `((x - mean)/sqrt(var + eps) · weight + bias) · (1 + scale) + shift`.
///
/// `x` (B, L, C); `weight`, `bias` (C); `shift`, `scale` (B, 1, C) or (B, C), any batch stride
/// (e.g. chunks of one modulation vector). Returns (B, L, C) in `x`'s dtype; float32 inside.
pub fn layer_norm_modulate(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    shift: Option<&Tensor>,
    scale: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if let Some(t) = t {
            if t.dims() != [c] {
                bail!("layer_norm_modulate: {name} {:?} is not ({c})", t.dims());
            }
        }
    }
    let modulation = |name: &str, t: Option<&Tensor>| -> Result<Option<Tensor>> {
        t.map(|t| modulation_rows("layer_norm_modulate", name, t, b, c))
            .transpose()
    };
    for t in [weight, bias, shift, scale].into_iter().flatten() {
        if t.dtype() != x.dtype() {
            bail!("layer_norm_modulate: every operand must have x's dtype");
        }
    }
    let op = LayerNormModOp {
        weight: weight.cloned(),
        bias: bias.cloned(),
        shift: modulation("shift", shift)?,
        scale: modulation("scale", scale)?,
        eps: eps as f32,
        rows_per_group: l,
    };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

/// Flux's query/key preparation in one pass. `qkv` (B, L, ≥ 3·H·D) holds q, k and v at columns
/// 0, H·D and 2·H·D (rows may be longer, as in Flux's single blocks); `q_weight`, `k_weight`
/// (D) are the RMS norms' scales; `cos`, `sin` (P, D/2) float32 rotary tables whose rows
/// `pos_offset..pos_offset + L` belong to these tokens. Returns (3, B, L, H, D):
/// rope(rms_norm(q)), rope(rms_norm(k)), v; pairs (2i, 2i+1) rotate by angle i.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope(
    qkv: &Tensor,
    heads: usize,
    q_weight: &Tensor,
    k_weight: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    pos_offset: usize,
    eps: f64,
) -> Result<Tensor> {
    let first = QkStream::new(qkv, heads, q_weight, k_weight)?;
    let op = qk_norm_rope_op(first, None, heads, cos, sin, pos_offset, eps)?;
    op.first.qkv.apply_op1_no_bwd(&op)
}

/// [`qk_norm_rope`] of two streams into one joint sequence, as Flux's double blocks attend over
/// text then image tokens: `a` = (qkv (B, La, ≥ 3·H·D), q_weight, k_weight) gives rows 0..La,
/// `b` rows La..La + Lb, each with its own norm weights; positions `pos_offset..` run over the
/// joint rows. Returns (3, B, La + Lb, H, D), what [`qk_norm_rope`] of each followed by a
/// concatenation along L gives, without the concatenation's copy.
pub fn qk_norm_rope_joint(
    a: (&Tensor, &Tensor, &Tensor),
    b: (&Tensor, &Tensor, &Tensor),
    heads: usize,
    rope: (&Tensor, &Tensor),
    pos_offset: usize,
    eps: f64,
) -> Result<Tensor> {
    let first = QkStream::new(a.0, heads, a.1, a.2)?;
    let second = QkStream::new(b.0, heads, b.1, b.2)?;
    let (ba, bb) = (a.0.dim(0)?, b.0.dim(0)?);
    if ba != bb || first.q_weight.dims() != second.q_weight.dims() || a.0.dtype() != b.0.dtype() {
        bail!(
            "qk_norm_rope_joint: streams {:?} and {:?} differ in batch, head size or dtype",
            a.0.dims(),
            b.0.dims()
        );
    }
    let op = qk_norm_rope_op(first, Some(second), heads, rope.0, rope.1, pos_offset, eps)?;
    op.first.qkv.apply_op1_no_bwd(&op)
}

impl QkStream {
    /// One stream's rows (rows contiguous inside, any row stride) and norm weights, checked.
    fn new(qkv: &Tensor, heads: usize, q_weight: &Tensor, k_weight: &Tensor) -> Result<Self> {
        let (_b, l, width) = qkv.dims3()?;
        let d = q_weight.dim(0)?;
        if d % 2 != 0 || 3 * heads * d > width || k_weight.dims() != [d] || q_weight.rank() != 1 {
            bail!(
                "qk_norm_rope: qkv {:?} cannot hold 3 x {heads} heads of {d}",
                qkv.dims()
            );
        }
        // The kernel wants rows of qkv contiguous inside (any row stride).
        let qkv = if qkv.stride()[2] == 1 && qkv.stride()[0] == l * qkv.stride()[1] {
            qkv.clone()
        } else {
            qkv.contiguous()?
        };
        Ok(Self {
            qkv,
            q_weight: q_weight.contiguous()?,
            k_weight: k_weight.contiguous()?,
        })
    }
}

/// The op over `first` (and `second`'s rows after them), after checking the rotary tables.
fn qk_norm_rope_op(
    first: QkStream,
    second: Option<QkStream>,
    heads: usize,
    cos: &Tensor,
    sin: &Tensor,
    pos_offset: usize,
    eps: f64,
) -> Result<QkNormRopeOp> {
    let d = first.q_weight.dim(0)?;
    let mut l = first.qkv.dim(1)?;
    if let Some(s) = &second {
        l += s.qkv.dim(1)?;
    }
    let (p, half) = cos.dims2()?;
    if half != d / 2 || sin.dims() != cos.dims() || pos_offset + l > p {
        bail!(
            "qk_norm_rope: rotary tables {:?} do not cover positions {pos_offset}..{} of head size {d}",
            cos.dims(),
            pos_offset + l
        );
    }
    if cos.dtype() != DType::F32 || sin.dtype() != DType::F32 {
        bail!("qk_norm_rope: the rotary tables must be float32");
    }
    Ok(QkNormRopeOp {
        heads,
        dim: d,
        first,
        second,
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        pos_offset,
        eps: eps as f32,
    })
}

/// Group norm of `x` (N, C, spatial...) over `groups` groups of channels, float32 statistics,
/// with the affine `weight`, `bias` (C) when given and SiLU after when `silu`:
/// `act((x - mean_g) / sqrt(var_g + eps) · weight + bias)`. Returns `x`'s shape and dtype.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    if x.rank() < 2 {
        bail!("group_norm: {:?} has no channel dimension", x.dims());
    }
    let c = x.dim(1)?;
    if groups == 0 || c % groups != 0 {
        bail!("group_norm: {groups} groups do not divide {c} channels");
    }
    let per_group = (c / groups) * x.dims()[2..].iter().product::<usize>();
    if per_group >= i32::MAX as usize {
        bail!("group_norm: groups of {per_group} elements are too large");
    }
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if let Some(t) = t {
            if t.dims() != [c] || t.dtype() != x.dtype() {
                bail!(
                    "group_norm: {name} {:?} is not ({c}) of x's dtype",
                    t.dims()
                );
            }
        }
    }
    let op = GroupNormOp {
        groups,
        weight: weight.map(|t| t.contiguous()).transpose()?,
        bias: bias.map(|t| t.contiguous()).transpose()?,
        eps: eps as f32,
        silu,
    };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

/// GELU, tanh approximation, elementwise (float32 inside).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&GeluOp::Tanh)
}

/// diffusers' GEGLU: `x` (…, 2·I) -> (…, I) = `x[.., :I] · gelu_erf(x[.., I:])`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    if x.dim(candle_core::D::Minus1)? % 2 != 0 {
        bail!("geglu: the last dimension of {:?} is odd", x.dims());
    }
    x.contiguous()?.apply_op1_no_bwd(&GeluOp::Geglu)
}

/// `x · weightᵀ + bias`, then `activation`, as one 2-D product over all leading dimensions
/// (cuBLASLt with the bias and the activation in its epilogue on CUDA).
///
/// `x` (…, K), `weight` (N, K), `bias` (N). Returns (…, N). On CUDA: bf16/f16.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    activation: Option<Activation>,
) -> Result<Tensor> {
    let op = linear_op("linear", x, weight, bias, activation, None)?;
    x.contiguous()?.apply_op1_no_bwd(&op)
}

/// The [`LinearOp`] of `x · weightᵀ + bias` (then `activation`, then plus `then`'s product),
/// after checking that `weight` (N, K) fits `x` (…, K) and `bias` is (N); `what` names the
/// operation in errors.
fn linear_op(
    what: &str,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    activation: Option<Activation>,
    then: Option<(Tensor, Tensor)>,
) -> Result<LinearOp> {
    let k = x.dim(candle_core::D::Minus1)?;
    let (n, wk) = weight.dims2()?;
    if wk != k {
        bail!(
            "{what}: input {:?} does not fit weight {:?}",
            x.dims(),
            weight.dims()
        );
    }
    if let Some(b) = bias {
        if b.dims() != [n] {
            bail!("{what}: bias {:?} is not ({n})", b.dims());
        }
    }
    Ok(LinearOp {
        weight: rows_contiguous(weight)?,
        bias: bias.map(|b| b.contiguous()).transpose()?,
        activation,
        then,
    })
}

/// `x1 · w1ᵀ + x2 · w2ᵀ + bias` without concatenating the inputs: Flux's single-block `linear2`
/// over [attention output, MLP activations] as two products into one output (on CUDA the second
/// cuBLASLt product accumulates into the first's output). `x1` (…, K1), `x2` (…, K2) with the
/// same leading dimensions; `w1` (N, K1), `w2` (N, K2), e.g. column ranges of one (N, K1 + K2)
/// weight (rows need not be contiguous, only their elements); `bias` (N). Returns (…, N).
pub fn linear_sum(
    x1: &Tensor,
    w1: &Tensor,
    x2: &Tensor,
    w2: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (lead1, lead2) = (x1.dims(), x2.dims());
    let same_rows = lead1.len() == lead2.len()
        && lead1.len() >= 2
        && lead1[..lead1.len() - 1] == lead2[..lead2.len() - 1];
    if !same_rows {
        bail!(
            "linear_sum: inputs {:?} and {:?} differ in their leading dimensions",
            x1.dims(),
            x2.dims()
        );
    }
    let (n, k2) = w2.dims2()?;
    if w1.dim(0)? != n || x2.dim(candle_core::D::Minus1)? != k2 {
        bail!(
            "linear_sum: input {:?} does not fit weight {:?} next to weight {:?}",
            x2.dims(),
            w2.dims(),
            w1.dims()
        );
    }
    if x2.dtype() != x1.dtype() || w2.dtype() != w1.dtype() {
        bail!("linear_sum: both products must share one dtype");
    }
    let then = Some((x2.contiguous()?, rows_contiguous(w2)?));
    let op = linear_op("linear_sum", x1, w1, bias, None, then)?;
    x1.contiguous()?.apply_op1_no_bwd(&op)
}

/// A modulation operand (B, 1, C) or (B, C) as (B, C) rows (a view); `op` and `name` for the
/// error when it has another shape.
fn modulation_rows(op: &str, name: &str, t: &Tensor, b: usize, c: usize) -> Result<Tensor> {
    let t = match t.rank() {
        3 if t.dim(1)? == 1 => t.squeeze(1)?,
        _ => t.clone(),
    };
    if t.dims() != [b, c] {
        bail!(
            "{op}: {name} {:?} is not (B, 1, C) = ({b}, 1, {c})",
            t.dims()
        );
    }
    Ok(t)
}

/// `t` (2-D) itself where its rows are contiguous in memory (unit column stride, as a column
/// range of a wider weight), else a contiguous copy.
fn rows_contiguous(t: &Tensor) -> Result<Tensor> {
    let (_, layout) = t.storage_and_layout();
    if t.rank() == 2 && layout.stride()[1] == 1 {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Flux's gated residual `x + gate · y` in one pass (one fused multiply-add and one rounding per
/// element). `x`, `y` (B, L, C); `gate` (B, 1, C) or (B, C), any batch stride (a chunk of the
/// modulation vector). Returns (B, L, C) in `x`'s dtype.
pub fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    if y.dims() != x.dims() {
        bail!(
            "gated_residual: y {:?} is not x's shape {:?}",
            y.dims(),
            x.dims()
        );
    }
    let gate = modulation_rows("gated_residual", "gate", gate, b, c)?;
    if gate.dtype() != x.dtype() || y.dtype() != x.dtype() {
        bail!("gated_residual: x, gate and y must share one dtype");
    }
    let op = GatedResidualOp {
        gate,
        rows_per_group: l,
    };
    x.contiguous()?.apply_op2_no_bwd(&y.contiguous()?, &op)
}

/// A 2-D convolution (cross-correlation, as PyTorch's `conv2d`) plus a per-channel bias: cuDNN
/// on CUDA (loaded at run time, see [`super::cudnn`]; an error where it is missing), a direct
/// float64-accumulated loop on the CPU.
///
/// `x` (N, C, H, W); `weight` (K, C / groups, R, S); `bias` (K). Returns (N, K, H', W') with
/// PyTorch's output sizes. Square padding, stride and dilation, as `cfg` gives them.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &candle_nn::Conv2dConfig,
) -> Result<Tensor> {
    let (k, cpg, _, _) = weight.dims4()?;
    let (_, c, _, _) = x.dims4()?;
    if cfg.groups == 0 || cpg * cfg.groups != c {
        bail!(
            "conv2d: input {:?} does not fit weight {:?} in {} groups",
            x.dims(),
            weight.dims(),
            cfg.groups
        );
    }
    if x.dtype() != weight.dtype() {
        bail!("conv2d: input and weight must share one dtype");
    }
    let op = ConvOp {
        weight: weight.contiguous()?,
        padding: cfg.padding,
        stride: cfg.stride,
        dilation: cfg.dilation,
        groups: cfg.groups,
    };
    // Checks the sizes before any kernel runs.
    op.problem(x.dims(), x.dtype())?;
    let y = x.contiguous()?.apply_op1_no_bwd(&op)?;
    match bias {
        None => Ok(y),
        Some(b) if b.dims() == [k] => y.broadcast_add(&b.reshape((1, k, 1, 1))?),
        Some(b) => bail!("conv2d: bias {:?} is not ({k})", b.dims()),
    }
}
