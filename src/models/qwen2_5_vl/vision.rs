//! The Qwen2.5-VL vision encoder: 14x14x2 patch embedding, blocks of RMSNorm + 2-D rotary
//! attention (window attention except in `fullatt_block_indexes`) + SwiGLU MLP, and the 2x2
//! patch merger into the language model's width.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{RmsNorm, VarBuilder};

use super::VisionConfig;
use crate::ops::{self, linear, Linear};

/// Rows of queries per attention chunk in full-attention blocks (bounds the score matrix).
const QUERY_CHUNK: usize = 1024;

struct Mlp {
    /// gate and up projections as one product: (hidden) -> 2 · intermediate.
    gate_up: Linear,
    down: Linear,
    intermediate: usize,
}

impl Mlp {
    fn new(c: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let n = c.intermediate_size;
        Ok(Self {
            gate_up: ops::linear_concat(
                &[(vb.pp("gate_proj"), n), (vb.pp("up_proj"), n)],
                c.hidden_size,
                true,
            )?,
            down: linear(n, c.hidden_size, vb.pp("down_proj"))?,
            intermediate: n,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x)?;
        let last = gu.rank() - 1;
        let n = self.intermediate;
        let g = gu.narrow(last, 0, n)?.silu()?;
        self.down.forward(&(g * gu.narrow(last, n, n)?)?)
    }
}

struct Block {
    norm1: RmsNorm,
    norm2: RmsNorm,
    qkv: Linear,
    proj: Linear,
    mlp: Mlp,
    heads: usize,
}

/// Scaled dot-product attention over `q, k, v` of shape (heads, seq, head_dim), computing the
/// softmax in f32; queries in chunks.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let seq = q.dim(1)?;
    let kt = k.t()?.contiguous()?;
    let mut outs = Vec::new();
    let mut start = 0;
    while start < seq {
        let n = QUERY_CHUNK.min(seq - start);
        let qc = q.narrow(1, start, n)?;
        let w = (qc.matmul(&kt)? * scale)?.to_dtype(DType::F32)?;
        let w = candle_nn::ops::softmax_last_dim(&w)?.to_dtype(v.dtype())?;
        outs.push(w.matmul(v)?);
        start += n;
    }
    Tensor::cat(&outs, 1)
}

/// Attention within each group of consecutive tokens that `cu` delimits (the windows, or one
/// group in full-attention blocks); `q, k, v` (heads, seq, head_dim) -> (heads, seq, head_dim).
/// A run of consecutive groups of one length goes as one batch of windows (a window layer has
/// ~86 windows of 64 tokens at 1024x1024: one batched attention, not 86), through the fused
/// kernel where it applies (CUDA, bf16/f16), else [`attention`].
fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu: &[usize],
    scale: f64,
) -> Result<Tensor> {
    let (heads, _, hd) = q.dims3()?;
    let groups: Vec<(usize, usize)> = cu
        .windows(2)
        .map(|w| (w[0], w[1].saturating_sub(w[0])))
        .filter(|&(_, n)| n > 0)
        .collect();
    let mut outs = Vec::new();
    let mut i = 0;
    while i < groups.len() {
        let (start, n) = groups[i];
        let mut count = 1;
        while i + count < groups.len() && groups[i + count] == (start + count * n, n) {
            count += 1;
        }
        i += count;
        // (count windows, heads, n, hd) views of the run.
        let windows = |t: &Tensor| -> Result<Tensor> {
            t.narrow(1, start, count * n)?
                .contiguous()?
                .reshape((heads, count, n, hd))?
                .transpose(0, 1)
        };
        let (qw, kw, vw) = (windows(q)?, windows(k)?, windows(v)?);
        let o = if crate::ops::attention_fused_ok(&qw, &kw, &vw) {
            crate::ops::attention(&qw, &kw, &vw, scale, None)?
        } else {
            let flat = |t: &Tensor| t.contiguous()?.reshape((count * heads, n, hd));
            attention(&flat(&qw)?, &flat(&kw)?, &flat(&vw)?, scale)?
                .reshape((count, heads, n, hd))?
        };
        outs.push(o.transpose(0, 1)?.reshape((heads, count * n, hd))?);
    }
    Tensor::cat(&outs, 1)
}

impl Block {
    fn new(c: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: candle_nn::rms_norm(c.hidden_size, 1e-6, vb.pp("norm1"))?,
            norm2: candle_nn::rms_norm(c.hidden_size, 1e-6, vb.pp("norm2"))?,
            qkv: linear(c.hidden_size, 3 * c.hidden_size, vb.pp("attn").pp("qkv"))?,
            proj: linear(c.hidden_size, c.hidden_size, vb.pp("attn").pp("proj"))?,
            mlp: Mlp::new(c, vb.pp("mlp"))?,
            heads: c.num_heads,
        })
    }

    /// `x`: (seq, hidden); `cu`: boundaries of the attention groups; `cos, sin`: (seq, hd/2).
    fn forward(&self, x: &Tensor, cu: &[usize], cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (seq, hidden) = x.dims2()?;
        let hd = hidden / self.heads;
        let h = self.norm1.forward(x)?;
        let qkv = self.qkv.forward(&h)?.reshape((seq, 3, self.heads, hd))?;
        let dtype = x.dtype();
        // (1, heads, seq, hd), rotated in f32 as transformers does.
        let to_heads = |i: usize| -> Result<Tensor> {
            qkv.narrow(1, i, 1)?
                .squeeze(1)?
                .transpose(0, 1)?
                .unsqueeze(0)?
                .contiguous()
        };
        let q = candle_nn::rotary_emb::rope(&to_heads(0)?.to_dtype(DType::F32)?, cos, sin)?
            .to_dtype(dtype)?
            .squeeze(0)?;
        let k = candle_nn::rotary_emb::rope(&to_heads(1)?.to_dtype(DType::F32)?, cos, sin)?
            .to_dtype(dtype)?
            .squeeze(0)?;
        let v = to_heads(2)?.squeeze(0)?;
        let o = grouped_attention(&q, &k, &v, cu, 1.0 / (hd as f64).sqrt())?
            .transpose(0, 1)?
            .reshape((seq, hidden))?;
        let x = (x + self.proj.forward(&o)?)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?)?;
        x + m
    }
}

/// The vision tower (`visual.*` weights).
pub struct VisionModel {
    patch_embed: Tensor,
    blocks: Vec<Block>,
    ln_q: RmsNorm,
    mlp0: Linear,
    mlp2: Linear,
    cfg: VisionConfig,
    device: Device,
    dtype: DType,
}

impl VisionModel {
    /// Builds the tower from `vb` (at the `visual` prefix).
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg;
        let k = (
            c.hidden_size,
            c.in_channels,
            c.temporal_patch_size,
            c.patch_size,
            c.patch_size,
        );
        let patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size;
        let patch_embed = vb
            .pp("patch_embed")
            .pp("proj")
            .get(k, "weight")?
            .reshape((c.hidden_size, patch_dim))?
            .t()?
            .contiguous()?;
        let blocks = (0..c.depth)
            .map(|i| Block::new(c, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let merged = c.hidden_size * c.spatial_merge_size * c.spatial_merge_size;
        let m = vb.pp("merger");
        Ok(Self {
            patch_embed,
            blocks,
            ln_q: candle_nn::rms_norm(c.hidden_size, 1e-6, m.pp("ln_q"))?,
            mlp0: linear(merged, merged, m.pp("mlp").pp("0"))?,
            mlp2: linear(merged, c.out_hidden_size, m.pp("mlp").pp("2"))?,
            cfg: c.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The window order of the merged units and the window boundaries (in patches), as
    /// transformers' `get_vision_window_index` for one image.
    pub fn window_index(&self, grid_thw: [usize; 3]) -> (Vec<usize>, Vec<usize>) {
        let c = &self.cfg;
        let unit = c.spatial_merge_size * c.spatial_merge_size;
        let ws = (c.window_size / c.spatial_merge_size / c.patch_size).max(1);
        let (gt, gh, gw) = (
            grid_thw[0],
            grid_thw[1] / c.spatial_merge_size,
            grid_thw[2] / c.spatial_merge_size,
        );
        let mut index = Vec::with_capacity(gt * gh * gw);
        let mut cu = vec![0usize];
        for t in 0..gt {
            for wy in 0..gh.div_ceil(ws) {
                for wx in 0..gw.div_ceil(ws) {
                    let before = index.len();
                    for y in wy * ws..((wy + 1) * ws).min(gh) {
                        for x in wx * ws..((wx + 1) * ws).min(gw) {
                            index.push(t * gh * gw + y * gw + x);
                        }
                    }
                    if index.len() > before {
                        cu.push(index.len() * unit);
                    }
                }
            }
        }
        (index, cu)
    }

    /// Rotary cos/sin (seq, head_dim/2) in the processor's patch order.
    fn rotary(&self, grid_thw: [usize; 3]) -> (Vec<f32>, Vec<f32>) {
        let c = &self.cfg;
        let hd = c.hidden_size / c.num_heads;
        let dim = hd / 2;
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / (c.rope_theta as f32).powf(i as f32 / dim as f32))
            .collect();
        let m = c.spatial_merge_size;
        let (gh, gw) = (grid_thw[1], grid_thw[2]);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for _ in 0..grid_thw[0] {
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            let (y, x) = ((bh * m + mh) as f32, (bw * m + mw) as f32);
                            for p in [y, x] {
                                for f in &inv {
                                    cos.push((p * f).cos());
                                    sin.push((p * f).sin());
                                }
                            }
                        }
                    }
                }
            }
        }
        (cos, sin)
    }

    /// Encodes one image's patches (`pixel_values`: (patches, patch_dim) f32 on any device)
    /// into (patches / merge^2, out_hidden_size) features, in the processor's order.
    pub fn forward(&self, pixel_values: &Tensor, grid_thw: [usize; 3]) -> Result<Tensor> {
        let c = &self.cfg;
        let unit = c.spatial_merge_size * c.spatial_merge_size;
        let seq = grid_thw[0] * grid_thw[1] * grid_thw[2];
        let x = pixel_values
            .to_device(&self.device)?
            .to_dtype(self.dtype)?
            .matmul(&self.patch_embed)?;
        let (index, cu_window) = self.window_index(grid_thw);
        let perm: Vec<u32> = index
            .iter()
            .flat_map(|&i| (0..unit).map(move |j| (i * unit + j) as u32))
            .collect();
        let perm_t = Tensor::new(perm.as_slice(), &self.device)?;
        let mut x = x.index_select(&perm_t, 0)?;
        let (cos, sin) = self.rotary(grid_thw);
        let half = cos.len() / seq;
        let cos = Tensor::from_vec(cos, (seq, half), &self.device)?.index_select(&perm_t, 0)?;
        let sin = Tensor::from_vec(sin, (seq, half), &self.device)?.index_select(&perm_t, 0)?;
        let full = [0, seq];
        for (i, b) in self.blocks.iter().enumerate() {
            let cu: &[usize] = if c.fullatt_block_indexes.contains(&i) {
                &full
            } else {
                &cu_window
            };
            x = b.forward(&x, cu, &cos, &sin)?;
        }
        let merged = c.hidden_size * unit;
        let h = self.ln_q.forward(&x)?.reshape((seq / unit, merged))?;
        let h = self.mlp2.forward(&self.mlp0.forward(&h)?.gelu_erf()?)?;
        let mut reverse = vec![0u32; index.len()];
        for (pos, &i) in index.iter().enumerate() {
            reverse[i] = pos as u32;
        }
        h.index_select(&Tensor::new(reverse.as_slice(), &self.device)?, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_attention_equals_attention_group_by_group() {
        // Runs of equal windows, an empty group, windows of other lengths, a lone last one.
        let cu = [0, 4, 8, 12, 15, 18, 18, 23, 28, 33, 40];
        let dev = Device::Cpu;
        let (heads, hd) = (3, 8);
        let seq = *cu.last().unwrap();
        let r = |seed: u64| {
            let n = heads * seq * hd;
            let v: Vec<f32> = (0..n)
                .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            Tensor::from_vec(v, (heads, seq, hd), &dev).unwrap()
        };
        let (q, k, v) = (r(1), r(2), r(3));
        let scale = 0.3;
        let ours = grouped_attention(&q, &k, &v, &cu, scale).unwrap();
        let mut parts = Vec::new();
        for w in cu.windows(2) {
            let (a, n) = (w[0], w[1] - w[0]);
            if n > 0 {
                let g = |t: &Tensor| t.narrow(1, a, n).unwrap().contiguous().unwrap();
                parts.push(attention(&g(&q), &g(&k), &g(&v), scale).unwrap());
            }
        }
        let want = Tensor::cat(&parts, 1).unwrap();
        assert_eq!(ours.dims(), [heads, seq, hd]);
        let diff = (ours - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
