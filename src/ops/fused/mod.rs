//! The fused operations as candle custom ops: each runs the project's CUDA kernel on a CUDA
//! device ([`super::cuda`]) and a plain float32 implementation of the same function on the CPU
//! (the reference the GPU tests compare against). These functions always take the fused path;
//! models go through the dispatching helpers of [`super`], which ask the self-check
//! ([`super::selfcheck`]) and pick the attention tile ([`super::tuning`]).

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

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

// ---------------------------------------------------------------------------------------------
// The custom ops: CPU implementations here, CUDA launches in super::cuda.

/// GELU, tanh approximation, in float32.
pub(crate) fn gelu_tanh_f32(a: f32) -> f32 {
    0.5 * a * (1.0 + (0.797_884_6_f32 * (a + 0.044715 * a * a * a)).tanh())
}

fn gelu_erf_f32(a: f32) -> f32 {
    (0.5 * a as f64 * (1.0 + erf(a as f64 / std::f64::consts::SQRT_2))) as f32
}

/// The error function (Abramowitz-Stegun 7.1.26 is too coarse; this is a series/continued
/// fraction pair accurate to ~1e-15).
fn erf(x: f64) -> f64 {
    if x < 0.0 {
        return -erf(-x);
    }
    if x < 2.5 {
        // Maclaurin series.
        let mut term = x;
        let mut sum = x;
        let x2 = x * x;
        for n in 1..200 {
            term *= -x2 / n as f64;
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // Continued fraction for erfc.
        let mut f = 0.0;
        for n in (1..60).rev() {
            f = n as f64 / 2.0 / (x + f);
        }
        1.0 - (-x * x).exp() / std::f64::consts::PI.sqrt() / (x + f)
    }
}

/// `x` rounded to `dtype` and back (the roundings the kernels make between steps).
fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// A tensor's values in logical (row-major) order, as float32.
fn gather(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    fn go<T: Copy>(data: &[T], l: &Layout, f: impl Fn(T) -> f32) -> Vec<f32> {
        let dims = l.dims();
        let strides = l.stride();
        let n = l.shape().elem_count();
        let mut out = Vec::with_capacity(n);
        let mut idx = vec![0usize; dims.len()];
        let mut off = l.start_offset();
        for _ in 0..n {
            out.push(f(data[off]));
            for d in (0..dims.len()).rev() {
                idx[d] += 1;
                off += strides[d];
                if idx[d] < dims[d] {
                    break;
                }
                off -= strides[d] * dims[d];
                idx[d] = 0;
            }
        }
        out
    }
    Ok(match s {
        CpuStorage::F32(v) => go(v, l, |x| x),
        CpuStorage::BF16(v) => go(v, l, |x| x.to_f32()),
        CpuStorage::F16(v) => go(v, l, |x| x.to_f32()),
        CpuStorage::F64(v) => go(v, l, |x| x as f32),
        other => bail!("fused ops take float tensors, not {:?}", other.dtype()),
    })
}

fn store(values: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(values),
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(values.into_iter().map(half::f16::from_f32).collect()),
        DType::F64 => CpuStorage::F64(values.into_iter().map(f64::from).collect()),
        other => bail!("fused ops take float tensors, not {other:?}"),
    })
}

/// A held operand's values (CPU tensors only).
fn gather_tensor(t: &Tensor) -> Result<Vec<f32>> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => gather(s, layout),
        _ => bail!("fused op: an operand is not on the CPU"),
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "tt-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, lq, d) = l1.shape().dims4()?;
        let (hk, lk) = (l2.dims()[1], l2.dims()[2]);
        let group = h / hk.max(1);
        let (q, k, v) = (gather(s1, l1)?, gather(s2, l2)?, gather(s3, l3)?);
        let mut out = vec![0f32; b * lq * h * d];
        let mut scores = vec![0f32; lk];
        for bi in 0..b {
            for hi in 0..h {
                let base_q = (bi * h + hi) * lq * d;
                let base_k = (bi * hk + hi / group) * lk * d;
                for i in 0..lq {
                    let qi = &q[base_q + i * d..base_q + (i + 1) * d];
                    let sees = |j: usize| self.mask.sees(bi, i, j, lq, lk);
                    let mut max = f32::NEG_INFINITY;
                    for (j, s) in scores.iter_mut().enumerate().filter(|(j, _)| sees(*j)) {
                        let kj = &k[base_k + j * d..base_k + (j + 1) * d];
                        let dot: f64 = qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        *s = dot as f32 * self.scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0f64;
                    let mut acc = vec![0f64; d];
                    for (j, s) in scores.iter().enumerate().filter(|(j, _)| sees(*j)) {
                        let p = ((*s - max) as f64).exp();
                        sum += p;
                        let vj = &v[base_k + j * d..base_k + (j + 1) * d];
                        for (a, x) in acc.iter_mut().zip(vj) {
                            *a += p * *x as f64;
                        }
                    }
                    let o = ((bi * lq + i) * h + hi) * d;
                    for (c, a) in acc.iter().enumerate() {
                        out[o + c] = if sum > 0.0 { (a / sum) as f32 } else { 0.0 };
                    }
                }
            }
        }
        Ok((store(out, s1.dtype())?, Shape::from((b, lq, h, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::attention(self, s1, l1, s2, l2, s3, l3)
    }
}

impl CustomOp1 for LayerNormModOp {
    fn name(&self) -> &'static str {
        "tt-layer-norm-modulate"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = gather(s, l)?;
        let c = *l.dims().last().unwrap_or(&1);
        let held = |t: &Option<Tensor>| t.as_ref().map(gather_tensor).transpose();
        let (w, bias) = (held(&self.weight)?, held(&self.bias)?);
        let (shift, scale) = (held(&self.shift)?, held(&self.scale)?);
        let mut out = vec![0f32; x.len()];
        for (r, (xr, yr)) in x.chunks(c).zip(out.chunks_mut(c)).enumerate() {
            let g = r / self.rows_per_group;
            let mean = xr.iter().map(|&a| a as f64).sum::<f64>() / c as f64;
            let var = xr.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / c as f64;
            let rstd = 1.0 / (var + self.eps as f64).sqrt();
            for (i, (a, y)) in xr.iter().zip(yr.iter_mut()).enumerate() {
                let mut v = ((*a as f64 - mean) * rstd) as f32;
                if let Some(w) = &w {
                    v *= w[i];
                }
                if let Some(b) = &bias {
                    v += b[i];
                }
                if let Some(s) = &scale {
                    v *= 1.0 + s[g * c + i];
                }
                if let Some(s) = &shift {
                    v += s[g * c + i];
                }
                *y = v;
            }
        }
        Ok((store(out, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::layer_norm_modulate(self, s, l)
    }
}

impl CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "tt-group-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = gather(s, l)?;
        let dims = l.dims();
        let c = dims[1];
        let hw: usize = dims[2..].iter().product();
        let per = c / self.groups * hw;
        let held = |t: &Option<Tensor>| t.as_ref().map(gather_tensor).transpose();
        let (w, b) = (held(&self.weight)?, held(&self.bias)?);
        let mut out = vec![0f32; x.len()];
        for (gi, (xg, yg)) in x
            .chunks(per.max(1))
            .zip(out.chunks_mut(per.max(1)))
            .enumerate()
        {
            let mean = xg.iter().map(|&a| a as f64).sum::<f64>() / per as f64;
            let var = xg.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / per as f64;
            let rstd = 1.0 / (var + self.eps as f64).sqrt();
            let c0 = (gi % self.groups) * (c / self.groups);
            for (i, (a, y)) in xg.iter().zip(yg.iter_mut()).enumerate() {
                let ch = c0 + i / hw.max(1);
                let mut v = ((*a as f64 - mean) * rstd) as f32;
                if let Some(w) = &w {
                    v *= w[ch];
                }
                if let Some(b) = &b {
                    v += b[ch];
                }
                if self.silu {
                    v /= 1.0 + (-v).exp();
                }
                *y = v;
            }
        }
        Ok((store(out, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::group_norm(self, s, l)
    }
}

impl CustomOp1 for QkNormRopeOp {
    fn name(&self) -> &'static str {
        "tt-qk-norm-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, len_a, width_a) = l.shape().dims3()?;
        let dtype = s.dtype();
        // Each stream's rows (gathered), row width, row count and weights.
        let mut streams = vec![(
            gather(s, l)?,
            width_a,
            len_a,
            gather_tensor(&self.first.q_weight)?,
            gather_tensor(&self.first.k_weight)?,
        )];
        if let Some(st) = &self.second {
            let (_, len_b, width_b) = st.qkv.dims3()?;
            streams.push((
                gather_tensor(&st.qkv)?,
                width_b,
                len_b,
                gather_tensor(&st.q_weight)?,
                gather_tensor(&st.k_weight)?,
            ));
        }
        let len: usize = streams.iter().map(|s| s.2).sum();
        let (cos, sin) = (gather_tensor(&self.cos)?, gather_tensor(&self.sin)?);
        let (h, d) = (self.heads, self.dim);
        let hd = h * d;
        let plane = b * len * hd;
        let mut out = vec![0f32; 3 * plane];
        for bl in 0..b * len {
            let (bi, li) = (bl / len, bl % len);
            let pos = self.pos_offset + li;
            let (x, width, rows, qw, kw) = if li < len_a { &streams[0] } else { &streams[1] };
            let r = if li < len_a { li } else { li - len_a };
            let row = &x[(bi * rows + r) * width..(bi * rows + r + 1) * width];
            for hi in 0..h {
                for (which, w) in [(0, qw), (1, kw)] {
                    let src = &row[which * hd + hi * d..which * hd + (hi + 1) * d];
                    let ss: f32 = src.iter().map(|a| a * a).sum();
                    let rstd = 1.0 / (ss / d as f32 + self.eps).sqrt();
                    let dst = which * plane + bl * hd + hi * d;
                    for p in 0..d / 2 {
                        let n = |i: usize| round_to(dtype, round_to(dtype, src[i] * rstd) * w[i]);
                        let (a, bb) = (n(2 * p), n(2 * p + 1));
                        let (c, sn) = (cos[pos * d / 2 + p], sin[pos * d / 2 + p]);
                        out[dst + 2 * p] = a * c - bb * sn;
                        out[dst + 2 * p + 1] = a * sn + bb * c;
                    }
                }
                let dst = 2 * plane + bl * hd + hi * d;
                out[dst..dst + d].copy_from_slice(&row[2 * hd + hi * d..2 * hd + (hi + 1) * d]);
            }
        }
        Ok((store(out, dtype)?, Shape::from((3, b, len, h, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::qk_norm_rope(self, s, l)
    }
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        match self {
            GeluOp::Tanh => "tt-gelu-tanh",
            GeluOp::Geglu => "tt-geglu",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = gather(s, l)?;
        let dtype = s.dtype();
        match self {
            GeluOp::Tanh => Ok((
                store(x.into_iter().map(gelu_tanh_f32).collect(), dtype)?,
                l.shape().clone(),
            )),
            GeluOp::Geglu => {
                let two = *l.dims().last().unwrap_or(&0);
                let inner = two / 2;
                let mut out = Vec::with_capacity(x.len() / 2);
                for row in x.chunks(two.max(1)) {
                    for c in 0..inner {
                        out.push(row[c] * round_to(dtype, gelu_erf_f32(row[inner + c])));
                    }
                }
                let mut dims = l.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = inner;
                }
                Ok((store(out, dtype)?, Shape::from(dims)))
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::gelu(self, s, l)
    }
}

impl CustomOp1 for LinearOp {
    fn name(&self) -> &'static str {
        "tt-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = gather(s, l)?;
        let w = gather_tensor(&self.weight)?;
        let bias = self.bias.as_ref().map(gather_tensor).transpose()?;
        let (n, k) = self.weight.dims2()?;
        let m = x.len() / k.max(1);
        let then = match &self.then {
            Some((x2, w2)) => Some((gather_tensor(x2)?, gather_tensor(w2)?, w2.dim(1)?)),
            None => None,
        };
        let dot = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let mut out = vec![0f32; m * n];
        for (r, (xr, yr)) in x.chunks(k.max(1)).zip(out.chunks_mut(n.max(1))).enumerate() {
            for (j, y) in yr.iter_mut().enumerate() {
                let mut acc = dot(xr, &w[j * k..(j + 1) * k]);
                if let Some((x2, w2, k2)) = &then {
                    acc += dot(&x2[r * k2..(r + 1) * k2], &w2[j * k2..(j + 1) * k2]);
                }
                if let Some(b) = &bias {
                    acc += b[j] as f64;
                }
                *y = match self.activation {
                    Some(Activation::GeluTanh) => gelu_tanh_f32(acc as f32),
                    None => acc as f32,
                };
            }
        }
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((store(out, s.dtype())?, Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::linear(self, s, l)
    }
}

impl CustomOp1 for ConvOp {
    fn name(&self) -> &'static str {
        "tt-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = self.problem(l.dims(), s.dtype())?;
        let (oh, ow) = p.output_hw().map_err(candle_core::Error::wrap)?;
        let x = gather(s, l)?;
        let w = gather_tensor(&self.weight)?;
        let (cpg, kpg) = (p.c / p.groups, p.k / p.groups);
        let mut out = vec![0f32; p.n * p.k * oh * ow];
        for (i, o) in out.iter_mut().enumerate() {
            let (ox, oy) = (i % ow, (i / ow) % oh);
            let (k, n) = ((i / (ow * oh)) % p.k, i / (ow * oh * p.k));
            let c0 = (k / kpg) * cpg;
            let mut acc = 0f64;
            for cg in 0..cpg {
                let plane = &x[(n * p.c + c0 + cg) * p.h * p.w..][..p.h * p.w];
                let filter = &w[(k * cpg + cg) * p.r * p.s..][..p.r * p.s];
                for ry in 0..p.r {
                    let iy = (oy * p.stride.0 + ry * p.dilation.0).wrapping_sub(p.padding.0);
                    if iy >= p.h {
                        continue;
                    }
                    for sx in 0..p.s {
                        let ix = (ox * p.stride.1 + sx * p.dilation.1).wrapping_sub(p.padding.1);
                        if ix < p.w {
                            acc += plane[iy * p.w + ix] as f64 * filter[ry * p.s + sx] as f64;
                        }
                    }
                }
            }
            *o = acc as f32;
        }
        Ok((store(out, s.dtype())?, Shape::from((p.n, p.k, oh, ow))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::conv2d(self, s, l)
    }
}

impl CustomOp2 for GatedResidualOp {
    fn name(&self) -> &'static str {
        "tt-gated-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, y) = (gather(s1, l1)?, gather(s2, l2)?);
        let gate = gather_tensor(&self.gate)?;
        let c = *l1.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; x.len()];
        for (r, ((xr, yr), or)) in x
            .chunks(c.max(1))
            .zip(y.chunks(c.max(1)))
            .zip(out.chunks_mut(c.max(1)))
            .enumerate()
        {
            let g = &gate[(r / self.rows_per_group.max(1)) * c..][..c];
            for (((o, a), b), g) in or.iter_mut().zip(xr).zip(yr).zip(g) {
                *o = g.mul_add(*b, *a);
            }
        }
        Ok((store(out, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::gated_residual(self, s1, l1, s2, l2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_key_ranges_clamp_lengths_and_holes_to_the_keys() {
        let mask = KeyMask {
            lens: Some(vec![100, 3]),
            holes: Some(vec![(5, 9), (1, 2)]),
            causal: false,
        };
        assert_eq!(mask.ranges(2, 6), Some(vec![[6, 5, 6], [3, 1, 2]]));
        assert!(mask.sees(0, 0, 4, 1, 6) && !mask.sees(0, 0, 5, 1, 6));
        assert_eq!(KeyMask::default().ranges(2, 6), None);
    }

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (-1.0, -0.842_700_792_949_714_9),
        ] {
            assert!((erf(x) - want).abs() < 1e-13, "erf({x}) = {}", erf(x));
        }
    }
}
