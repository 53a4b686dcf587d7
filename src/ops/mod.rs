//! Fused operations of the denoisers: the project's own CUDA kernels (`kernels/*.cu`, compiled
//! to PTX by build.rs), cuBLASLt and cuDNN, behind candle custom ops ([`fused`]), each with a CPU
//! implementation of the same function; and the dispatching helpers the models call (this
//! file).
//!
//! Models ask [`fused_on`] (or [`attention_fused_ok`]) whether the fused path applies to a
//! tensor: on a CUDA device, for the dtypes and shapes the kernels cover, unless the environment
//! sets `TT_SCALE_FUSED=0` (the escape hatch, and how the benchmarks time both paths). Otherwise
//! the model's own composition of candle operations runs. Each kernel family checks itself on
//! first use ([`selfcheck`]) and gives way to the plain composition where it disagrees with its
//! reference: models ask [`fused_for`]. The attention kernel's tile is picked by [`tuning`].
//!
//! The files form layers, lowest first: [`gpu`] (the device's compute capability), [`settings`]
//! (tiles, switches), [`kernels`] (what each kernel is called with), `cudnn` and `cuda` (the
//! launchers), [`fused`] (the custom ops), [`selfcheck`] and [`tuning`] (which run the kernels to
//! check and time them), then this file.
//!
//! On the CPU, float32 matrix products of the transformer layers go through [`blas`] (the
//! system's OpenBLAS, opened at run time, about twice candle's GEMM speed) where it is installed.

pub mod blas;
#[cfg(feature = "cuda")]
mod cuda;
mod cudnn;
pub mod fused;
pub mod gpu;
pub mod kernels;
pub mod selfcheck;
pub mod settings;
pub mod tuning;

use candle_core::{DType, Module, Result, Tensor};

pub use kernels::{Activation, KeyMask};
pub use selfcheck::Kernel;
pub use settings::{
    attention_tuning_enabled, fused_enabled, with_attention_tile, with_fused, AttentionTile,
    ATTENTION_HEAD_DIMS,
};

/// Scaled-dot-product attention without a materialised score matrix ([`fused::attention_kernel`]
/// with the tile [`tuning`] picks).
///
/// `q` (B, H, Lq, D), `k` and `v` (B, H, Lk, D), any strides; `scale` (> 0) multiplies the
/// scores (usually `1/sqrt(D)`); `key_lens` (B values) keeps only the first `key_lens[b]` keys of
/// batch row `b` (text padding). Returns (B, H, Lq, D), a transposed view of a contiguous
/// (B, Lq, H, D) tensor, so that `.transpose(1, 2)?.reshape((B, Lq, H·D))` is free.
/// On CUDA: bf16/f16, D in [`ATTENTION_HEAD_DIMS`], strides and offsets multiples of 8.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    key_lens: Option<&[u32]>,
) -> Result<Tensor> {
    let mask = KeyMask {
        lens: key_lens.map(<[u32]>::to_vec),
        ..KeyMask::default()
    };
    attention_masked(q, k, v, scale, &mask)
}

/// [`attention`] with a general [`KeyMask`] and grouped-query attention: `q` (B, H, Lq, D), `k`
/// and `v` (B, Hk, Lk, D) with `H` a multiple of `Hk` (query head `h` reads key/value head
/// `h / (H / Hk)`), any strides. Returns (B, H, Lq, D) as [`attention`] does. Causal attention
/// skips the key tiles above the diagonal on CUDA.
pub fn attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &KeyMask,
) -> Result<Tensor> {
    let chosen = tuning::choose_tile(q);
    let op = kernels::AttentionOp {
        tile: chosen,
        scale: scale as f32,
        mask: mask.clone(),
    };
    let tile = tuning::tuned_tile(q, k, v, &op);
    fused::attention_kernel(q, k, v, scale, mask, tile)
}

/// Whether the fused path applies to `t`: a CUDA tensor of a float dtype the kernels take
/// (f32, bf16, f16), with the fused kernels enabled.
pub fn fused_on(t: &Tensor) -> bool {
    (t.device().is_cuda() || selfcheck::cpu_kernels())
        && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && fused_enabled()
}

/// Whether the fused path of `kernel` applies to `t`: [`fused_on`], and the family passed its
/// self-check on `t`'s device and dtype ([`selfcheck::trusted`]; `head_size` matters for
/// attention and qk_norm_rope only).
pub fn fused_for(kernel: Kernel, t: &Tensor, head_size: usize) -> bool {
    fused_on(t) && selfcheck::trusted(kernel, t.device(), t.dtype(), head_size)
}

/// Whether [`attention`] can run `q`, `k`, `v` (B, H, L, D) on their device: CUDA,
/// bf16/f16, a head size of [`ATTENTION_HEAD_DIMS`], kernel-friendly layouts, and the kernel
/// passed its self-check for that head size.
pub fn attention_fused_ok(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    fused_on(q)
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && q.rank() == 4
        && ATTENTION_HEAD_DIMS.contains(&q.dims()[3])
        && [q, k, v].iter().all(|t| {
            let (_, layout) = t.storage_and_layout();
            settings::attention_layout_ok(layout.stride(), layout.start_offset())
        })
        && selfcheck::trusted(Kernel::Attention, q.device(), q.dtype(), q.dims()[3])
}

/// A linear layer that runs as one cuBLASLt product with the bias (and optionally GELU) in the
/// epilogue where [`fused_on`] its input in bf16/f16, and as `candle_nn::Linear` otherwise.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// Wraps a loaded `candle_nn::Linear` (weight (out, in), optional bias (out)).
    pub fn new(inner: candle_nn::Linear) -> Self {
        Self { inner }
    }

    /// The weight, (out, in).
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias, (out), if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    fn fused(&self, x: &Tensor) -> bool {
        matches!(x.dtype(), DType::BF16 | DType::F16) && fused_for(Kernel::Linear, x, 0)
    }

    /// `gelu_tanh(x · Wᵀ + b)`.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        if self.fused(x) {
            linear_fused_or_plain(x, self.weight(), self.bias(), Some(Activation::GeluTanh))
        } else {
            blas::linear(&self.inner, x)?.gelu()
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.fused(x) {
            linear_fused_or_plain(x, self.weight(), self.bias(), None)
        } else {
            blas::linear(&self.inner, x)
        }
    }
}

/// [`fused::linear`], and where cuBLASLt refuses the problem (no algorithm for a shape or an
/// alignment), the same product with candle's matmul (one 2-D GEMM), logged once.
pub fn linear_fused_or_plain(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    activation: Option<Activation>,
) -> Result<Tensor> {
    match fused::linear(x, weight, bias, activation) {
        Ok(y) => Ok(y),
        Err(e) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!("cuBLASLt linear failed ({e}); using candle's matmul instead")
            });
            linear_plain(x, weight, bias, activation)
        }
    }
}

/// `x + gate · y`, the gated residual of the Flux and PixArt blocks (`x`, `y` (B, L, C), `gate`
/// (B, 1, C)): one fused pass ([`fused::gated_residual`]) where the fused path applies and C is a
/// multiple of 8, else candle's multiply and add.
pub fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    if x.dim(candle_core::D::Minus1)? % 8 == 0 && fused_for(Kernel::GatedResidual, x, 0) {
        fused::gated_residual(x, gate, y)
    } else {
        x + gate.broadcast_mul(y)?
    }
}

/// [`fused::linear_sum`], and where cuBLASLt refuses the problem, the same sum with candle's
/// matmuls, logged once.
pub fn linear_sum_fused_or_plain(
    x1: &Tensor,
    w1: &Tensor,
    x2: &Tensor,
    w2: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    match fused::linear_sum(x1, w1, x2, w2, bias) {
        Ok(y) => Ok(y),
        Err(e) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!("cuBLASLt linear sum failed ({e}); using candle's matmuls instead")
            });
            linear_plain(x1, w1, bias, None)? + linear_plain(x2, w2, None, None)?
        }
    }
}

/// `x · weightᵀ + bias` (then `activation`) with candle operations, as one 2-D product over the
/// leading dimensions.
pub fn linear_plain(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    activation: Option<Activation>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / k.max(1);
    let mut y = blas::matmul(&x.reshape((rows, k))?, &weight.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    if activation == Some(Activation::GeluTanh) {
        y = y.gelu()?;
    }
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = weight.dim(0)?;
    }
    y.reshape(out)
}

/// A group norm (affine) that runs as one kernel, optionally fused with the SiLU that follows
/// it, where [`fused_on`] its input, and as `candle_nn::GroupNorm` otherwise.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// `silu(group_norm(x))`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if fused_for(Kernel::GroupNorm, x, 0) {
            let (w, b) = (Some(&self.weight), Some(&self.bias));
            fused::group_norm(x, self.groups, w, b, self.eps, silu)
        } else if silu {
            self.inner.forward(x)?.silu()
        } else {
            self.inner.forward(x)
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }
}

/// A group norm of `channels` in `groups` groups with `weight` and `bias` from `vb` (the
/// names and initial values of `candle_nn::group_norm`).
pub fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: candle_nn::VarBuilder,
) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
    let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm {
        inner,
        weight,
        bias,
        groups,
        eps,
    })
}

/// A 2-D convolution with bias that runs on cuDNN ([`fused::conv2d`]) where
/// [`conv_cudnn_ok`] its input, and as `candle_nn::Conv2d` (on CUDA an unfold and one GEMM)
/// otherwise; where cuDNN fails on a problem, candle's convolution runs instead, logged once.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
}

impl Conv2d {
    /// Wraps a loaded `candle_nn::Conv2d` (weight (K, C / groups, R, S), optional bias (K)).
    pub fn new(inner: candle_nn::Conv2d) -> Self {
        Self { inner }
    }

    /// The weight, (K, C / groups, R, S).
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !conv_cudnn_ok(x) {
            return self.inner.forward(x);
        }
        let cfg = self.inner.config();
        match fused::conv2d(x, self.inner.weight(), self.inner.bias(), cfg) {
            Ok(y) => Ok(y),
            Err(e) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(
                        "cuDNN convolution of {:?} failed ({e}); using candle's instead",
                        x.dims()
                    )
                });
                self.inner.forward(x)
            }
        }
    }
}

/// `candle_nn::conv2d` (with bias), wrapped: `cin` -> `cout` channels, a `kernel`×`kernel`
/// filter.
pub fn conv2d(
    cin: usize,
    cout: usize,
    kernel: usize,
    cfg: candle_nn::Conv2dConfig,
    vb: candle_nn::VarBuilder,
) -> Result<Conv2d> {
    Ok(Conv2d::new(candle_nn::conv2d(cin, cout, kernel, cfg, vb)?))
}

/// Whether [`Conv2d`] runs `x` on cuDNN: the fused path applies ([`fused_on`]: CUDA, bf16, f16
/// or f32 (FMA math, no TF32)), `x` is 4-D, `TT_SCALE_CUDNN` is not `0`, and cuDNN loaded and
/// passed its check against candle's convolution on this device (once per device and dtype; the
/// outcome is logged).
pub fn conv_cudnn_ok(x: &Tensor) -> bool {
    if !(fused_on(x) && x.rank() == 4) {
        return false;
    }
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = x.device() {
        return selfcheck::cudnn_conv_ok(dev, x.dtype());
    }
    false
}

/// `candle_nn::linear` (with bias), wrapped.
pub fn linear(i: usize, o: usize, vb: candle_nn::VarBuilder) -> Result<Linear> {
    Ok(Linear::new(candle_nn::linear(i, o, vb)?))
}

/// `candle_nn::linear_no_bias`, wrapped.
pub fn linear_no_bias(i: usize, o: usize, vb: candle_nn::VarBuilder) -> Result<Linear> {
    Ok(Linear::new(candle_nn::linear_no_bias(i, o, vb)?))
}

/// `candle_nn::linear_b` (bias when `bias`), wrapped.
pub fn linear_b(i: usize, o: usize, bias: bool, vb: candle_nn::VarBuilder) -> Result<Linear> {
    Ok(Linear::new(candle_nn::linear_b(i, o, bias, vb)?))
}

/// One linear layer made of several that read the same input (q, k and v projections; gate and
/// up projections): their weights (and biases) stacked along the output dimension, so that one
/// product computes them all and `narrow` on the last dimension separates the parts. `parts`:
/// each layer's `VarBuilder` and output size; `in_dim`: the shared input size.
pub fn linear_concat(
    parts: &[(candle_nn::VarBuilder, usize)],
    in_dim: usize,
    bias: bool,
) -> Result<Linear> {
    let weights = parts
        .iter()
        .map(|(vb, out)| vb.get((*out, in_dim), "weight"))
        .collect::<Result<Vec<_>>>()?;
    let bias = if bias {
        let b = parts
            .iter()
            .map(|(vb, out)| vb.get(*out, "bias"))
            .collect::<Result<Vec<_>>>()?;
        Some(Tensor::cat(&b, 0)?)
    } else {
        None
    };
    Ok(Linear::new(candle_nn::Linear::new(
        Tensor::cat(&weights, 0)?,
        bias,
    )))
}

/// The float32 matrix-product throughput of the CPU in GFLOP/s, measured on the spot: the best
/// of three (512 x 1024) · (1024 x 1024) products with candle (about 1 GFLOP each, tens of
/// milliseconds). For estimates of how long a model takes on this machine.
pub fn cpu_matmul_gflops() -> Result<f64> {
    let device = candle_core::Device::Cpu;
    let a = Tensor::ones((512, 1024), DType::F32, &device)?;
    let b = Tensor::ones((1024, 1024), DType::F32, &device)?;
    // Warm-up: thread pool start and first-touch of the buffers.
    let _ = a.matmul(&b)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let _ = a.matmul(&b)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * 512.0 * 1024.0 * 1024.0 / best.max(1e-9) / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn group_norm_chunks_fill_the_gpu_and_cover_each_group_once() {
        // SDXL's first level (2 x 32 groups of 10 x 128 x 128): 8 chunks a group, 512 blocks.
        assert_eq!(settings::group_norm_chunks(10 * 16384, 64, 8), (20480, 8));
        // The VAE's last level at 1024x1024 (1 x 32 groups of 4 x 1024 x 1024): 16 chunks.
        assert_eq!(settings::group_norm_chunks(4 << 20, 32, 8), (262144, 16));
        // Small groups stay one chunk; a group of one element too.
        assert_eq!(settings::group_norm_chunks(4096, 2, 8), (4096, 1));
        assert_eq!(settings::group_norm_chunks(1, 1, 1), (1, 1));
        for (n, gb, pack) in [
            (37 * 4, 6, 1),
            (100_003, 3, 1),
            (8 * 12345, 1, 8),
            (64, 64, 8),
        ] {
            let (chunk, chunks) = settings::group_norm_chunks(n, gb, pack);
            assert_eq!(chunk % pack, 0);
            assert!(
                chunk * chunks >= n && chunk * (chunks - 1) < n,
                "{n} {gb} {pack}"
            );
        }
    }

    #[test]
    fn attention_tiles_parse_their_names_and_pick_by_head_size_and_length() {
        for t in AttentionTile::ALL {
            assert_eq!(AttentionTile::parse(t.name()), Some(t));
            assert_eq!(AttentionTile::parse(&t.name().to_uppercase()), Some(t));
        }
        assert_eq!(AttentionTile::parse("w2r64"), None);
        assert!(AttentionTile::W4R32.supports(128));
        assert!(!AttentionTile::W4R32.supports(160));
        assert!(!AttentionTile::W4R16.supports(96));
        assert!(AttentionTile::Wg2.supports(160) && !AttentionTile::Wg2.supports(96));
        let q = |lq: usize, d: usize| Tensor::zeros((1, 2, lq, d), DType::F32, &Device::Cpu);
        let q = |lq, d| q(lq, d).unwrap();
        // Flux's 4096+512 tokens at D = 128 take the 128-row tile; a single row or D = 160
        // (no w4r32 kernel) the 64-row one. Never wg2 off a Hopper GPU.
        assert_eq!(tuning::choose_tile(&q(4608, 128)), AttentionTile::W4R32);
        assert_eq!(tuning::choose_tile(&q(1, 128)), AttentionTile::W4R16);
        assert_eq!(tuning::choose_tile(&q(4096, 160)), AttentionTile::W4R16);
        assert!(!AttentionTile::Wg2.runs_on(&q(4608, 128)));
        for t in [AttentionTile::Wg1, AttentionTile::Wg2p, AttentionTile::Wg1p] {
            assert!(!t.runs_on(&q(4608, 128)), "{t:?}");
        }
        assert_eq!(
            AttentionTile::Wg1.smem_bytes(72),
            AttentionTile::Wg2.smem_bytes(72)
        );
        assert_eq!(
            AttentionTile::Wg1p.smem_bytes(72),
            AttentionTile::Wg2p.smem_bytes(72)
        );
        // An override applies where the tile runs, else the default stands.
        with_attention_tile(AttentionTile::W8R16, || {
            assert_eq!(tuning::choose_tile(&q(10, 72)), AttentionTile::W8R16);
        });
        with_attention_tile(AttentionTile::W4R32, || {
            assert_eq!(tuning::choose_tile(&q(4096, 160)), AttentionTile::W4R16);
        });
        with_attention_tile(AttentionTile::Wg2p, || {
            assert_eq!(tuning::choose_tile(&q(4608, 128)), AttentionTile::W4R32);
        });
        assert_eq!(tuning::choose_tile(&q(10, 72)), AttentionTile::W4R16);
        // K and V tiles of 64 rows (+ the 128-row Q tile), rows padded to 16 plus 8 elements;
        // wg2's unpadded, wg2p's twice as many.
        assert_eq!(AttentionTile::W4R16.smem_bytes(128), 128 * 136 * 2);
        assert_eq!(AttentionTile::W4R32.smem_bytes(72), 256 * 88 * 2);
        assert_eq!(AttentionTile::Wg2.smem_bytes(128), 128 * 128 * 2);
        assert_eq!(AttentionTile::Wg2.smem_bytes(72), 128 * 80 * 2);
        assert_eq!(AttentionTile::Wg2p.smem_bytes(128), 256 * 128 * 2);
        assert!(AttentionTile::Wg2p.pipelined() && !AttentionTile::Wg2.pipelined());
    }

    #[test]
    fn tuning_keeps_the_fastest_finite_time_and_the_first_on_ties() {
        use AttentionTile::*;
        assert_eq!(settings::fastest_tile(&[]), None);
        assert_eq!(settings::fastest_tile(&[(Wg2p, f64::NAN)]), None);
        let timed = [
            (Wg2p, 2e-3),
            (Wg1p, 1.5e-3),
            (Wg2, f64::INFINITY),
            (Wg1, 1.5e-3),
        ];
        assert_eq!(settings::fastest_tile(&timed), Some(Wg1p));
        assert_eq!(
            settings::fastest_tile(&[(Wg2p, 1e-3), (Wg1p, 1e-3)]),
            Some(Wg2p)
        );
        // On the CPU there is nothing to tune: the default stands.
        let q = Tensor::zeros((1, 2, 300, 64), DType::F32, &Device::Cpu).unwrap();
        let op = kernels::AttentionOp {
            tile: tuning::choose_tile(&q),
            scale: 0.125,
            mask: KeyMask::default(),
        };
        assert_eq!(tuning::tuned_tile(&q, &q, &q, &op), AttentionTile::W4R32);
    }
}
