//! How each fused op runs: candle's `CustomOp` implementations, a plain float32 version of the
//! kernel's function on the CPU (the reference the GPU tests compare against) and the kernel's
//! launch ([`crate::ops::cuda`]) on a CUDA device.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use crate::ops::kernels::{
    Activation, AttentionOp, ConvOp, GatedResidualOp, GeluOp, GroupNormOp, LayerNormModOp,
    LinearOp, QkNormRopeOp,
};

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
        crate::ops::cuda::attention(self, s1, l1, s2, l2, s3, l3)
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
        crate::ops::cuda::layer_norm_modulate(self, s, l)
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
        crate::ops::cuda::group_norm(self, s, l)
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
        crate::ops::cuda::qk_norm_rope(self, s, l)
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
        crate::ops::cuda::gelu(self, s, l)
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
        crate::ops::cuda::linear(self, s, l)
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
        crate::ops::cuda::conv2d(self, s, l)
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
        crate::ops::cuda::gated_residual(self, s1, l1, s2, l2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
