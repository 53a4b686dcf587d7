//! What each fused kernel is called with: the values of the candle custom ops that
//! [`super::fused`] runs (on the CPU, its float32 implementations) and [`super::cuda`] launches
//! (on a GPU). A leaf of [`super`] but for the tiles of [`super::settings`] and the convolution
//! problem of [`super::cudnn`].

use candle_core::{bail, DType, Result, Tensor};

use super::settings::AttentionTile;

/// The activation fused into [`super::fused::linear`]'s epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU, tanh approximation (`0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))`).
    GeluTanh,
}

/// Which keys each query of [`super::attention_masked`] sees: key `j` is visible to query `i` of batch
/// row `b` when `j < lens[b]`, `j` lies outside `holes[b]`, and, with `causal`, `j <= i + Lk - Lq`
/// (the queries are the last `Lq` positions of the keys). A query that sees no key gets zeros.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyMask {
    /// Per batch row, the keys before which the row's keys end (text padding at the end);
    /// `None`: all `Lk`.
    pub lens: Option<Vec<u32>>,
    /// Per batch row, a range `[start, end)` of hidden keys (left padding after a cached
    /// prefix; empty when `start >= end`); `None`: no hole. Hidden keys are never read.
    pub holes: Option<Vec<(u32, u32)>>,
    /// Causal attention, aligned at the end: query `i` sees keys up to `i + Lk - Lq`.
    pub causal: bool,
}

impl KeyMask {
    /// Whether query `i` of batch row `b` sees key `j` (`lq`, `lk`: query and key counts).
    pub fn sees(&self, b: usize, i: usize, j: usize, lq: usize, lk: usize) -> bool {
        let end = self.lens.as_ref().map_or(lk, |l| (l[b] as usize).min(lk));
        let in_hole = self
            .holes
            .as_ref()
            .is_some_and(|h| j >= h[b].0 as usize && j < h[b].1 as usize);
        j < end && !in_hole && (!self.causal || j + lq <= i + lk)
    }

    /// Whether the mask hides nothing.
    pub fn is_empty(&self) -> bool {
        self.lens.is_none() && self.holes.is_none() && !self.causal
    }

    /// The kernel's `key_ranges`: (end, hole start, hole end) per batch row, ends clamped to
    /// `lk`; `None` without lengths and holes.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn ranges(&self, batch: usize, lk: usize) -> Option<Vec<[i32; 3]>> {
        if self.lens.is_none() && self.holes.is_none() {
            return None;
        }
        let clamp = |n: u32| n.min(lk as u32) as i32;
        Some(
            (0..batch)
                .map(|b| {
                    let end = self.lens.as_ref().map_or(lk as i32, |l| clamp(l[b]));
                    let (lo, hi) = self
                        .holes
                        .as_ref()
                        .map_or((0, 0), |h| (clamp(h[b].0), clamp(h[b].1)));
                    [end, lo, hi]
                })
                .collect(),
        )
    }
}

pub(crate) struct AttentionOp {
    /// The CUDA kernel's block tile (no effect on the CPU, nor on the result).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) tile: AttentionTile,
    pub(crate) scale: f32,
    pub(crate) mask: KeyMask,
}

pub(crate) struct LayerNormModOp {
    pub(crate) weight: Option<Tensor>,
    pub(crate) bias: Option<Tensor>,
    pub(crate) shift: Option<Tensor>,
    pub(crate) scale: Option<Tensor>,
    pub(crate) eps: f32,
    pub(crate) rows_per_group: usize,
}

/// One stream of [`QkNormRopeOp`]: qkv (B, L, ≥ 3·H·D), rows contiguous inside, batch rows
/// L rows apart (any row stride); its q/k norm weights (D).
pub(crate) struct QkStream {
    pub(crate) qkv: Tensor,
    pub(crate) q_weight: Tensor,
    pub(crate) k_weight: Tensor,
}

pub(crate) struct QkNormRopeOp {
    pub(crate) heads: usize,
    pub(crate) dim: usize,
    /// The op's input (its rows come first); kept for its weights.
    pub(crate) first: QkStream,
    /// Rows after the first stream's (the joint sequence of Flux's double blocks).
    pub(crate) second: Option<QkStream>,
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) pos_offset: usize,
    pub(crate) eps: f32,
}

pub(crate) struct GroupNormOp {
    pub(crate) groups: usize,
    pub(crate) weight: Option<Tensor>,
    pub(crate) bias: Option<Tensor>,
    pub(crate) eps: f32,
    pub(crate) silu: bool,
}

pub(crate) enum GeluOp {
    Tanh,
    Geglu,
}

pub(crate) struct LinearOp {
    /// (N, K), rows contiguous (any row stride).
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    pub(crate) activation: Option<Activation>,
    /// A second product added to the output: its input (…, K2), contiguous, and weight (N, K2).
    pub(crate) then: Option<(Tensor, Tensor)>,
}

pub(crate) struct ConvOp {
    /// (K, C / groups, R, S), contiguous.
    pub(crate) weight: Tensor,
    pub(crate) padding: usize,
    pub(crate) stride: usize,
    pub(crate) dilation: usize,
    pub(crate) groups: usize,
}

impl ConvOp {
    /// The convolution of an input of `dims` (N, C, H, W), checked (sizes, groups, dtype).
    pub(crate) fn problem(
        &self,
        dims: &[usize],
        dtype: DType,
    ) -> Result<super::cudnn::ConvProblem> {
        use super::cudnn::{ConvDType, ConvProblem};
        let (k, _, r, s) = self.weight.dims4()?;
        let &[n, c, h, w] = dims else {
            bail!("conv2d: input {dims:?} is not (N, C, H, W)");
        };
        let dtype = match dtype {
            DType::BF16 => ConvDType::BF16,
            DType::F16 => ConvDType::F16,
            DType::F32 => ConvDType::F32,
            other => bail!("conv2d takes bf16, f16 or f32, not {other:?}"),
        };
        let p = ConvProblem {
            n,
            c,
            h,
            w,
            k,
            r,
            s,
            padding: (self.padding, self.padding),
            stride: (self.stride, self.stride),
            dilation: (self.dilation, self.dilation),
            groups: self.groups,
            dtype,
        };
        p.output_hw().map_err(candle_core::Error::wrap)?;
        Ok(p)
    }
}

pub(crate) struct GatedResidualOp {
    /// (B, C), rows contiguous.
    pub(crate) gate: Tensor,
    /// Rows of x per gate row (the tokens of a batch row).
    pub(crate) rows_per_group: usize,
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
}
