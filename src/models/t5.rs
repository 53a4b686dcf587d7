//! T5 v1.1 text encoder with an attention mask (transformers' `T5EncoderModel`), and the T5
//! tokenizer built from a SentencePiece `spiece.model` the way transformers' `T5Tokenizer` does.
//!
//! Own code because candle-transformers' `t5::T5EncoderModel` takes no attention mask, and
//! PixArt encodes prompts padded to `max_sequence_length` with the padding masked out.

use std::path::Path;

use base64::Engine;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, linear_no_bias, Embedding, Linear, VarBuilder};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::models::ModelError;

/// Number of `<extra_id_N>` sentinel tokens T5's tokenizer appends to the SentencePiece vocab.
pub const T5_EXTRA_IDS: usize = 100;

/// A T5 tokenizer: SentencePiece unigram pieces plus the sentinel tokens, with the
/// SentencePiece normalizer (`Precompiled` charsmap), `WhitespaceSplit` + `Metaspace`
/// pre-tokenization and `</s>` appended, as transformers' `T5Tokenizer`.
pub struct T5Tokenizer {
    tokenizer: tokenizers::Tokenizer,
    eos_id: u32,
    pad_id: u32,
}

/// The pieces and normalizer charsmap of a SentencePiece model file.
struct SpmModel {
    pieces: Vec<(String, f32)>,
    charsmap: Vec<u8>,
}

/// Reads one protobuf varint at `*pos`.
fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The fields of a protobuf message: (field number, payload) where the payload is the bytes of
/// a length-delimited field, the 4/8 bytes of a fixed field, or the varint as 8 bytes.
fn proto_fields(buf: &[u8]) -> Option<Vec<(u64, Vec<u8>)>> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let payload = match key & 7 {
            0 => varint(buf, &mut pos)?.to_le_bytes().to_vec(),
            1 => {
                let b = buf.get(pos..pos + 8)?.to_vec();
                pos += 8;
                b
            }
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).ok()?;
                let b = buf.get(pos..pos.checked_add(len)?)?.to_vec();
                pos += len;
                b
            }
            5 => {
                let b = buf.get(pos..pos + 4)?.to_vec();
                pos += 4;
                b
            }
            _ => return None,
        };
        out.push((key >> 3, payload));
    }
    Some(out)
}

impl SpmModel {
    /// Parses a SentencePiece `ModelProto`: pieces (field 1: piece, score) and the normalizer
    /// spec's precompiled charsmap (field 3.2).
    fn parse(buf: &[u8]) -> Option<Self> {
        let mut pieces = Vec::new();
        let mut charsmap = Vec::new();
        for (field, payload) in proto_fields(buf)? {
            match field {
                1 => {
                    let mut piece = None;
                    let mut score = 0f32;
                    for (f, p) in proto_fields(&payload)? {
                        match f {
                            1 => piece = Some(String::from_utf8(p).ok()?),
                            2 => score = f32::from_le_bytes(p.get(..4)?.try_into().ok()?),
                            _ => {}
                        }
                    }
                    pieces.push((piece?, score));
                }
                3 => {
                    for (f, p) in proto_fields(&payload)? {
                        if f == 2 {
                            charsmap = p;
                        }
                    }
                }
                _ => {}
            }
        }
        (!pieces.is_empty()).then_some(Self { pieces, charsmap })
    }
}

impl T5Tokenizer {
    /// Loads a Hugging Face `tokenizer.json` of T5 (as transformers' `save_pretrained` writes
    /// it); ids are those of transformers' `T5TokenizerFast`. `</s>` and `<pad>` must be in its
    /// vocabulary.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, ModelError> {
        let bad = |message: String| ModelError::ModelFile {
            path: path.display().to_string(),
            message,
        };
        let tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| bad(format!("not a Hugging Face tokenizer.json: {e}")))?;
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| bad(format!("has no {token} token; is this T5's tokenizer?")))
        };
        let (eos_id, pad_id) = (id("</s>")?, id("<pad>")?);
        Ok(Self {
            tokenizer,
            eos_id,
            pad_id,
        })
    }

    /// Builds the tokenizer from a SentencePiece model file (`tokenizer/spiece.model`).
    pub fn from_spiece(path: &Path) -> Result<Self, ModelError> {
        let bad = |message: String| ModelError::ModelFile {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let spm = SpmModel::parse(&bytes).ok_or_else(|| {
            bad("not a SentencePiece model (could not parse its pieces); is this T5's spiece.model?".into())
        })?;
        let mut vocab: Vec<Value> = spm.pieces.iter().map(|(p, s)| json!([p, s])).collect();
        for i in (0..T5_EXTRA_IDS).rev() {
            vocab.push(json!([format!("<extra_id_{i}>"), 0.0]));
        }
        let id_of = |token: &str| {
            spm.pieces
                .iter()
                .position(|(p, _)| p == token)
                .map(|i| i as u32)
        };
        let eos_id = id_of("</s>").ok_or_else(|| bad("has no </s> piece".into()))?;
        let pad_id = id_of("<pad>").ok_or_else(|| bad("has no <pad> piece".into()))?;
        let mut added = Vec::new();
        for token in ["<pad>", "</s>", "<unk>"] {
            if let Some(id) = id_of(token) {
                added.push((id, token.to_string()));
            }
        }
        let n = spm.pieces.len();
        for i in 0..T5_EXTRA_IDS {
            added.push(((n + T5_EXTRA_IDS - 1 - i) as u32, format!("<extra_id_{i}>")));
        }
        added.sort();
        let added: Vec<Value> = added
            .into_iter()
            .map(|(id, content)| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let normalizer = if spm.charsmap.is_empty() {
            Value::Null
        } else {
            json!({"type": "Precompiled",
                   "precompiled_charsmap": base64::engine::general_purpose::STANDARD.encode(&spm.charsmap)})
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "WhitespaceSplit"},
                {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true}
            ]},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": false}
        });
        let tokenizer: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| bad(format!("cannot build the T5 tokenizer from it: {e}")))?;
        Ok(Self {
            tokenizer,
            eos_id,
            pad_id,
        })
    }

    /// Token ids of `text` with `</s>` appended, truncated to `max_length` (the `</s>` kept) and
    /// padded with `<pad>` to `max_length`, and the attention mask (1 for real tokens), as
    /// `tokenizer(text, padding="max_length", max_length=..., truncation=True)`.
    pub fn encode(
        &self,
        text: &str,
        max_length: usize,
    ) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
        // Without the file's own post-processing: `</s>` is appended below, after truncation.
        let enc = self.tokenizer.encode(text, false).map_err(|e| {
            ModelError::InvalidArgument(format!("cannot tokenize the prompt {text:?}: {e}"))
        })?;
        let mut ids: Vec<u32> = enc.get_ids().to_vec();
        ids.truncate(max_length.saturating_sub(1));
        if max_length > 0 {
            ids.push(self.eos_id);
        }
        let real = ids.len();
        ids.resize(max_length, self.pad_id);
        let mask = (0..max_length).map(|i| u32::from(i < real)).collect();
        Ok((ids, mask))
    }
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

/// The fields of `text_encoder/config.json` the encoder needs (transformers' `T5Config`).
#[derive(Clone, Debug, Deserialize)]
pub struct T5Config {
    /// Token embeddings.
    pub vocab_size: usize,
    /// Hidden width (4096 for T5 v1.1 XXL).
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Relative-position buckets.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Longest relative distance with its own log bucket.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// RMS norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `relu`, `gated-gelu` (T5 v1.1) or `gated-relu`.
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

/// T5's RMS norm (no mean subtraction, no bias), computed in float32.
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(vb: VarBuilder, d: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(d, "weight")?,
            eps,
        })
    }
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        x.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// The feed-forward activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FeedForward {
    Relu,
    GatedGelu,
    GatedRelu,
}

struct T5Layer {
    attn_norm: T5LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff_norm: T5LayerNorm,
    wi: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
}

/// transformers' `T5EncoderModel`: token embeddings, `num_layers` pre-norm blocks sharing the
/// first layer's relative position bias, and a final RMS norm.
pub struct T5Encoder {
    embed: Embedding,
    layers: Vec<T5Layer>,
    relative_bias: Embedding,
    final_norm: T5LayerNorm,
    config: T5Config,
    ff: FeedForward,
}

impl T5Encoder {
    /// Builds the encoder from `vb` (the root of `text_encoder/model.safetensors`).
    pub fn new(vb: VarBuilder, config: &T5Config) -> Result<Self, ModelError> {
        let ff = match config.feed_forward_proj.as_str() {
            "relu" => FeedForward::Relu,
            "gated-gelu" => FeedForward::GatedGelu,
            "gated-relu" => FeedForward::GatedRelu,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "text_encoder/config.json: feed_forward_proj {other:?} is not supported (relu, gated-gelu, gated-relu)"
                )))
            }
        };
        let c = config;
        let inner = c.num_heads * c.d_kv;
        let embed_name = if vb.contains_tensor("shared.weight") {
            "shared"
        } else {
            "encoder.embed_tokens"
        };
        let embed = embedding(c.vocab_size, c.d_model, vb.pp(embed_name))?;
        let enc = vb.pp("encoder");
        let relative_bias = embedding(
            c.relative_attention_num_buckets,
            c.num_heads,
            enc.pp("block.0.layer.0.SelfAttention.relative_attention_bias"),
        )?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let b = enc.pp(format!("block.{i}.layer"));
            let sa = b.pp("0.SelfAttention");
            let dense = b.pp("1.DenseReluDense");
            let gated = ff != FeedForward::Relu;
            layers.push(T5Layer {
                attn_norm: T5LayerNorm::new(b.pp("0.layer_norm"), c.d_model, c.layer_norm_epsilon)?,
                q: linear_no_bias(c.d_model, inner, sa.pp("q"))?,
                k: linear_no_bias(c.d_model, inner, sa.pp("k"))?,
                v: linear_no_bias(c.d_model, inner, sa.pp("v"))?,
                o: linear_no_bias(inner, c.d_model, sa.pp("o"))?,
                ff_norm: T5LayerNorm::new(b.pp("1.layer_norm"), c.d_model, c.layer_norm_epsilon)?,
                wi: linear_no_bias(
                    c.d_model,
                    c.d_ff,
                    dense.pp(if gated { "wi_0" } else { "wi" }),
                )?,
                wi_1: if gated {
                    Some(linear_no_bias(c.d_model, c.d_ff, dense.pp("wi_1"))?)
                } else {
                    None
                },
                wo: linear_no_bias(c.d_ff, c.d_model, dense.pp("wo"))?,
            });
        }
        Ok(Self {
            embed,
            layers,
            relative_bias,
            final_norm: T5LayerNorm::new(
                enc.pp("final_layer_norm"),
                c.d_model,
                c.layer_norm_epsilon,
            )?,
            config: config.clone(),
            ff,
        })
    }

    /// Bidirectional relative-position bucket of `key - query`, in float32 as transformers.
    fn bucket(&self, relative: i64) -> u32 {
        let half = (self.config.relative_attention_num_buckets / 2) as i64;
        let mut bucket = if relative > 0 { half } else { 0 };
        let n = relative.abs();
        let max_exact = half / 2;
        if n < max_exact {
            bucket += n;
        } else {
            let ratio = (n as f32 / max_exact as f32).ln()
                / ((self.config.relative_attention_max_distance as f64 / max_exact as f64).ln()
                    as f32);
            let large = max_exact + (ratio * (half - max_exact) as f32) as i64;
            bucket += large.min(half - 1);
        }
        bucket as u32
    }

    /// The (1, heads, T, T) relative position bias.
    fn position_bias(&self, t: usize, device: &Device) -> candle_core::Result<Tensor> {
        let ids: Vec<u32> = (0..t)
            .flat_map(|q| (0..t).map(move |k| (q, k)))
            .map(|(q, k)| self.bucket(k as i64 - q as i64))
            .collect();
        let ids = Tensor::from_vec(ids, t * t, device)?;
        self.relative_bias
            .forward(&ids)?
            .reshape((t, t, self.config.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// Encodes token ids (B, T) with the attention mask (B, T) (1 keep, 0 padding) into the last
    /// hidden states (B, T, d_model), in the weights' dtype.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (h, dk) = (self.config.num_heads, self.config.d_kv);
        let mut xs = self.embed.forward(ids)?;
        let dtype = xs.dtype();
        // (1 - mask) * finfo(float32).min, broadcast over heads and queries.
        let mask_bias = ((mask.to_dtype(DType::F32)? - 1.0)?.neg()? * f64::from(f32::MIN))?
            .reshape((b, 1, 1, t))?;
        let bias = self
            .position_bias(t, ids.device())?
            .to_dtype(DType::F32)?
            .broadcast_add(&mask_bias)?;
        for layer in &self.layers {
            let normed = layer.attn_norm.forward(&xs)?;
            let split = |x: Tensor| -> candle_core::Result<Tensor> {
                x.reshape((b, t, h, dk))?.transpose(1, 2)?.contiguous()
            };
            let q = split(layer.q.forward(&normed)?)?;
            let k = split(layer.k.forward(&normed)?)?;
            let v = split(layer.v.forward(&normed)?)?;
            let scores = q
                .matmul(&k.t()?)?
                .to_dtype(DType::F32)?
                .broadcast_add(&bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
            let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * dk))?;
            xs = clamp_f16((xs + layer.o.forward(&attn)?)?)?;
            let normed = layer.ff_norm.forward(&xs)?;
            let hidden = layer.wi.forward(&normed)?;
            let hidden = match (self.ff, &layer.wi_1) {
                (FeedForward::GatedGelu, Some(wi_1)) => {
                    (hidden.gelu()? * wi_1.forward(&normed)?)?
                }
                (FeedForward::GatedRelu, Some(wi_1)) => {
                    (hidden.relu()? * wi_1.forward(&normed)?)?
                }
                _ => hidden.relu()?,
            };
            xs = clamp_f16((xs + layer.wo.forward(&hidden)?)?)?;
        }
        self.final_norm.forward(&xs)
    }
}

/// transformers clamps float16 T5 activations just below the float16 maximum to keep them
/// finite.
fn clamp_f16(xs: Tensor) -> candle_core::Result<Tensor> {
    if xs.dtype() == DType::F16 {
        let bound = 65504.0 - 1000.0;
        xs.clamp(-bound, bound)
    } else {
        Ok(xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protobuf_varints_and_fields_are_read() {
        // field 1 (LEN) "ab", field 2 (fixed32) 1.0f32.
        let mut buf = vec![0x0a, 2, b'a', b'b', 0x15];
        buf.extend_from_slice(&1f32.to_le_bytes());
        let fields = proto_fields(&buf).unwrap();
        assert_eq!(fields[0], (1, b"ab".to_vec()));
        assert_eq!(fields[1].0, 2);
        assert_eq!(
            f32::from_le_bytes(fields[1].1[..4].try_into().unwrap()),
            1.0
        );
    }
}
