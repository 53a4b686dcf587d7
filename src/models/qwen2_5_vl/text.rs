//! The Qwen2 language model of Qwen2.5-VL: token embeddings, decoder layers (RMSNorm, grouped-
//! query attention with biased q/k/v and multimodal rotary embeddings, SwiGLU MLP), the final
//! norm and the LM head, with a per-layer KV cache.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{linear, linear_no_bias, Embedding, Linear, RmsNorm, VarBuilder};

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
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Layer {
    fn new(c: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let hd = c.hidden_size / c.num_attention_heads;
        let a = vb.pp("self_attn");
        let m = vb.pp("mlp");
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
            q: linear(c.hidden_size, c.num_attention_heads * hd, a.pp("q_proj"))?,
            k: linear(c.hidden_size, c.num_key_value_heads * hd, a.pp("k_proj"))?,
            v: linear(c.hidden_size, c.num_key_value_heads * hd, a.pp("v_proj"))?,
            o: linear_no_bias(c.num_attention_heads * hd, c.hidden_size, a.pp("o_proj"))?,
            gate: linear_no_bias(c.hidden_size, c.intermediate_size, m.pp("gate_proj"))?,
            up: linear_no_bias(c.hidden_size, c.intermediate_size, m.pp("up_proj"))?,
            down: linear_no_bias(c.intermediate_size, c.hidden_size, m.pp("down_proj"))?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let hd = self.head_dim;
        let h = self.input_norm.forward(x)?;
        let split = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.q.forward(&h)?, self.heads)?;
        let k = split(self.k.forward(&h)?, self.kv_heads)?;
        let v = split(self.v.forward(&h)?, self.kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match &cache.kv {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        cache.kv = Some((k.clone(), v.clone()));
        let rep = self.heads / self.kv_heads;
        let t = k.dim(2)?;
        let expand = |x: &Tensor| -> Result<Tensor> {
            if rep == 1 {
                Ok(x.clone())
            } else {
                x.unsqueeze(2)?
                    .expand((b, self.kv_heads, rep, t, hd))?
                    .reshape((b, self.heads, t, hd))
            }
        };
        let k = expand(&k)?;
        let v = expand(&v)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let w = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let w = match mask {
            Some(m) => w.broadcast_add(m)?,
            None => w,
        };
        let w = candle_nn::ops::softmax_last_dim(&w)?.to_dtype(v.dtype())?;
        let o = w
            .matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .reshape((b, s, self.heads * hd))?;
        let x = (x + self.o.forward(&o)?)?;
        let h = self.post_norm.forward(&x)?;
        let m = self
            .down
            .forward(&(self.gate.forward(&h)?.silu()? * self.up.forward(&h)?)?)?;
        x + m
    }
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
            Some(h) => linear_no_bias(cfg.hidden_size, cfg.vocab_size, h)?,
            None => Linear::new(embed.embeddings().clone(), None),
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

    /// Runs the decoder on `embeds` (batch, seq, hidden) at `positions` with an additive f32
    /// `mask` (batch, 1, seq, cached + seq) (`None`: no masking, for a single causal-free
    /// step), appending to `cache`; returns the final hidden states (batch, seq, hidden).
    pub fn forward_hidden(
        &self,
        embeds: &Tensor,
        positions: &[Vec<[i64; 3]>],
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rotary(positions)?;
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        let mut x = embeds.to_dtype(self.dtype)?;
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &cos, &sin, mask, c)?;
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
