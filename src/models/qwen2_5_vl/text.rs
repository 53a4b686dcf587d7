//! The Qwen2 language model of Qwen2.5-VL: token embeddings, decoder layers (RMSNorm, grouped-
//! query attention with biased q/k/v and multimodal rotary embeddings, SwiGLU MLP), the final
//! norm and the LM head, with a per-layer KV cache.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use crate::ops::{self, KeyMask, Linear};

use super::TextConfig;

/// The keys and values of one layer for every row of the batch: (batch, kv_heads, len, hd).
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

/// A KV cache for all layers.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); layers],
        }
    }

    /// Cached positions (keys per row).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.kv.as_ref())
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache with its single row repeated `batch` times (to share a prefix).
    pub fn repeat_rows(&self, batch: usize) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let kv = match &l.kv {
                    Some((k, v)) => {
                        Some((k.repeat((batch, 1, 1, 1))?, v.repeat((batch, 1, 1, 1))?))
                    }
                    None => None,
                };
                Ok(LayerCache { kv })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

struct Layer {
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    /// q, k and v projections as one product: (hidden) -> (heads + 2 kv_heads) · head_dim.
    qkv: Linear,
    o: Linear,
    /// gate and up projections as one product: (hidden) -> 2 · intermediate.
    gate_up: Linear,
    down: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
}

/// Which attention [`TextModel::forward_hidden_with`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// The fused attention ([`ops::attention_masked`]) for a prefill where it applies (CUDA,
    /// bf16/f16, a kernel head size), else the composite.
    Auto,
    /// Always the fused attention (its CPU implementation off CUDA).
    Fused,
    /// Always candle's softmax over an additive mask.
    Composite,
}

/// How the queries of one forward pass see the keys: through the fused kernel with the mask
/// itself, or through candle's softmax with the same mask as an additive f32 tensor (batch, 1,
/// seq, keys) (`None`: nothing hidden).
enum Attend<'a> {
    Fused(&'a KeyMask),
    Additive(Option<Tensor>),
}

impl Layer {
    fn new(c: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let hd = c.hidden_size / c.num_attention_heads;
        let a = vb.pp("self_attn");
        let m = vb.pp("mlp");
        let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        Ok(Self {
            input_norm: candle_nn::rms_norm(
                c.hidden_size,
                c.rms_norm_eps,
                vb.pp("input_layernorm"),
            )?,
            post_norm: candle_nn::rms_norm(
                c.hidden_size,
                c.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            qkv: ops::linear_concat(
                &[
                    (a.pp("q_proj"), q_out),
                    (a.pp("k_proj"), kv_out),
                    (a.pp("v_proj"), kv_out),
                ],
                c.hidden_size,
                true,
            )?,
            o: ops::linear_no_bias(q_out, c.hidden_size, a.pp("o_proj"))?,
            gate_up: ops::linear_concat(
                &[
                    (m.pp("gate_proj"), c.intermediate_size),
                    (m.pp("up_proj"), c.intermediate_size),
                ],
                c.hidden_size,
                false,
            )?,
            down: ops::linear_no_bias(c.intermediate_size, c.hidden_size, m.pp("down_proj"))?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: hd,
            intermediate: c.intermediate_size,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        attend: &Attend,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let hd = self.head_dim;
        let h = self.input_norm.forward(x)?;
        let qkv = self.qkv.forward(&h)?;
        let part = |first: usize, n: usize| -> Result<Tensor> {
            qkv.narrow(2, first * hd, n * hd)?
                .reshape((b, s, n, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = part(0, self.heads)?;
        let k = part(self.heads, self.kv_heads)?;
        let v = part(self.heads + self.kv_heads, self.kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match &cache.kv {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        cache.kv = Some((k.clone(), v.clone()));
        let scale = 1.0 / (hd as f64).sqrt();
        let o = match attend {
            // Grouped heads read straight from the cache; (b, heads, s, hd) as a view of rows.
            Attend::Fused(mask) => ops::attention_masked(&q, &k, &v, scale, mask)?,
            Attend::Additive(mask) => grouped_attention(&q, &k, &v, scale, mask.as_ref())?,
        };
        let o = o.transpose(1, 2)?.reshape((b, s, self.heads * hd))?;
        let x = (x + self.o.forward(&o)?)?;
        let h = self.post_norm.forward(&x)?;
        let gate_up = self.gate_up.forward(&h)?;
        let n = self.intermediate;
        let act = (gate_up.narrow(2, 0, n)?.silu()? * gate_up.narrow(2, n, n)?)?;
        x + self.down.forward(&act)?
    }
}

/// Attention of grouped query heads without the fused kernel (the path on the CPU and for
/// dtypes the kernel lacks): q (B, H, S, D) over k and v (B, Hk, T, D) with H a multiple of Hk,
/// scores scaled by `scale` and taken in f32 plus the additive `mask` (B or 1, 1, S, T) when
/// given, softmax, product; returns (B, H, S, D). The H/Hk query heads of a key/value head are
/// one (H/Hk · S)-row product against its keys: K and V are not copied per query head.
pub fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, s, hd) = q.dims4()?;
    let (_, kvh, t, _) = k.dims4()?;
    let rep = h / kvh;
    let qg = q.reshape((b, kvh, rep * s, hd))?;
    let w = (qg.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let w = match mask {
        Some(m) => w
            .reshape((b, kvh, rep, s, t))?
            .broadcast_add(&m.unsqueeze(1)?)?
            .reshape((b, kvh, rep * s, t))?,
        None => w,
    };
    let w = candle_nn::ops::softmax_last_dim(&w)?.to_dtype(v.dtype())?;
    w.matmul(v)?.reshape((b, h, s, hd))
}

/// The additive f32 mask (batch, 1, seq, keys) of `mask` for `seq` queries over `keys` keys: 0
/// where a query sees a key, -inf elsewhere; a query that sees no key (left padding without a
/// cached prefix) sees its own position instead, so that its softmax stays finite (its output
/// is never used). `None` when nothing is hidden (e.g. a causal decode step without padding).
fn additive_mask(
    mask: &KeyMask,
    batch: usize,
    seq: usize,
    keys: usize,
    dev: &Device,
) -> Result<Option<Tensor>> {
    if mask.is_empty() {
        return Ok(None);
    }
    let mut m = vec![f32::NEG_INFINITY; batch * seq * keys];
    for b in 0..batch {
        for i in 0..seq {
            let row = &mut m[(b * seq + i) * keys..(b * seq + i + 1) * keys];
            for (j, x) in row.iter_mut().enumerate() {
                if mask.sees(b, i, j, seq, keys) {
                    *x = 0.0;
                }
            }
            if row.iter().all(|x| x.is_infinite()) {
                if let Some(own) = (i + keys).checked_sub(seq).and_then(|j| row.get_mut(j)) {
                    *own = 0.0;
                }
            }
        }
    }
    if m.iter().all(|&x| x == 0.0) {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(m, (batch, 1, seq, keys), dev)?))
}

/// The language model with its LM head.
pub struct TextModel {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    cfg: TextConfig,
    device: Device,
    dtype: DType,
}

impl TextModel {
    /// Builds the model from `vb` (at the `model` prefix) and the head from `head_vb` (`None`:
    /// tied to the embeddings).
    pub fn new(cfg: &TextConfig, vb: VarBuilder, head: Option<VarBuilder>) -> Result<Self> {
        let embed = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?;
        let lm_head = match head {
            Some(h) => ops::linear_no_bias(cfg.hidden_size, cfg.vocab_size, h)?,
            None => Linear::new(candle_nn::Linear::new(embed.embeddings().clone(), None)),
        };
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token embeddings, (batch, seq, hidden), for `ids` of shape (batch, seq).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed.forward(ids)
    }

    /// Rotary cos/sin of shape (batch, seq, head_dim/2) for the (t, h, w) positions of each row,
    /// with the mrope sections choosing which position drives each frequency.
    pub fn rotary(&self, positions: &[Vec<[i64; 3]>]) -> Result<(Tensor, Tensor)> {
        let c = &self.cfg;
        let hd = c.hidden_size / c.num_attention_heads;
        let half = hd / 2;
        let inv: Vec<f32> = (0..hd)
            .step_by(2)
            .map(|i| 1.0 / (c.rope_theta as f32).powf(i as f32 / hd as f32))
            .collect();
        let mut axis = Vec::with_capacity(half);
        for (sec_i, &n) in c.mrope_section.iter().enumerate() {
            axis.extend(std::iter::repeat_n(sec_i % 3, n));
        }
        axis.resize(half, 0);
        let b = positions.len();
        let s = positions.first().map_or(0, Vec::len);
        let (mut cos, mut sin) = (
            Vec::with_capacity(b * s * half),
            Vec::with_capacity(b * s * half),
        );
        for row in positions {
            for p in row {
                for (i, f) in inv.iter().enumerate() {
                    let a = p[axis[i]] as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, s, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (b, s, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Runs the decoder on `embeds` (batch, seq, hidden) at `positions`, its queries seeing the
    /// keys (cached + seq of them) that `mask` lets them (with `causal`, the queries being the
    /// last seq positions), appending to `cache`; returns the final hidden states (batch, seq,
    /// hidden). A prefill (seq > 1) runs the fused attention where it applies (CUDA, bf16/f16),
    /// grouped heads reading the cache directly; decode steps and the CPU use candle's softmax
    /// over an additive mask.
    pub fn forward_hidden(
        &self,
        embeds: &Tensor,
        positions: &[Vec<[i64; 3]>],
        mask: &KeyMask,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.forward_hidden_with(embeds, positions, mask, cache, AttentionPath::Auto)
    }

    /// [`TextModel::forward_hidden`] with the attention path chosen by the caller (tests compare
    /// the two on the CPU).
    pub fn forward_hidden_with(
        &self,
        embeds: &Tensor,
        positions: &[Vec<[i64; 3]>],
        mask: &KeyMask,
        cache: &mut KvCache,
        path: AttentionPath,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rotary(positions)?;
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        let mut x = embeds.to_dtype(self.dtype)?;
        let (b, s, _) = x.dims3()?;
        let hd = self.cfg.hidden_size / self.cfg.num_attention_heads;
        let fused = match path {
            AttentionPath::Auto => {
                s > 1
                    && ops::fused_on(&x)
                    && matches!(self.dtype, DType::BF16 | DType::F16)
                    && ops::ATTENTION_HEAD_DIMS.contains(&hd)
                    && ops::fused_for(ops::Kernel::Attention, &x, hd)
            }
            AttentionPath::Fused => true,
            AttentionPath::Composite => false,
        };
        let attend = if fused {
            Attend::Fused(mask)
        } else {
            Attend::Additive(additive_mask(mask, b, s, cache.len() + s, &self.device)?)
        };
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &cos, &sin, &attend, c)?;
        }
        self.norm.forward(&x)
    }

    /// Logits (f32) of hidden states `h` (any leading shape, hidden last).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(h)?.to_dtype(DType::F32)
    }

    /// The compute device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(mask: &KeyMask, batch: usize, seq: usize, keys: usize) -> Option<Vec<Vec<f32>>> {
        additive_mask(mask, batch, seq, keys, &Device::Cpu)
            .unwrap()
            .map(|m| m.reshape((batch * seq, keys)).unwrap().to_vec2().unwrap())
    }

    #[test]
    fn the_additive_mask_hides_holes_and_later_keys_and_keeps_every_row_finite() {
        const X: f32 = f32::NEG_INFINITY;
        // Row 0 after a cached key: unpadded; row 1: its first query is padding (key 1 hidden).
        let mask = KeyMask {
            lens: None,
            holes: Some(vec![(1, 1), (1, 2)]),
            causal: true,
        };
        let m = rows(&mask, 2, 2, 3).unwrap();
        assert_eq!(m[0], vec![0.0, 0.0, X]);
        assert_eq!(m[1], vec![0.0, 0.0, 0.0]);
        assert_eq!(m[2], vec![0.0, X, X]);
        assert_eq!(m[3], vec![0.0, X, 0.0]);
        // Without a cached prefix a padded query sees nothing: it keeps its own key.
        let mask = KeyMask {
            lens: None,
            holes: Some(vec![(0, 1)]),
            causal: true,
        };
        assert_eq!(
            rows(&mask, 1, 2, 2).unwrap(),
            vec![vec![0.0, X], vec![X, 0.0]]
        );
        // A causal decode step without padding hides nothing: no mask at all.
        let causal = KeyMask {
            causal: true,
            ..KeyMask::default()
        };
        assert!(rows(&causal, 2, 1, 5).is_none());
        assert!(rows(&KeyMask::default(), 1, 3, 3).is_none());
    }
}
