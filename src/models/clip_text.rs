//! CLIP text encoder (transformers' `CLIPTextModel`), configured from `text_encoder/config.json`.
//!
//! Own code rather than `candle_transformers::models::stable_diffusion::clip` because that
//! one's `Config` has private fields (only hard-coded presets), maps `hidden_act: "gelu"` to the
//! tanh approximation (transformers uses the exact erf GELU) and fixes the layer-norm epsilon.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::ops::blas;

/// The MLP activation named by `hidden_act`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipActivation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (SD 1.5's CLIP ViT-L/14).
    QuickGelu,
    /// `gelu`: the exact erf GELU.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
}

impl ClipActivation {
    /// Parses transformers' `hidden_act` name; `None` for names this build does not implement.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    fn apply(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
        }
    }
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".to_string()
}

/// The fields of `text_encoder/config.json` the text model needs (transformers' `CLIPTextConfig`).
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    /// Number of token embeddings.
    pub vocab_size: usize,
    /// Width of the hidden states (768 for SD 1.5).
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Number of position embeddings (the maximum sequence length, 77).
    pub max_position_embeddings: usize,
    /// MLP activation name (`quick_gelu`, `gelu`, ...).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// The end-of-text token the pooled state is taken at (the caller's default when absent:
    /// transformers' default changed from 2 to 49407).
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`; transformers' default 512).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

/// The shape of one CLIP transformer tower (the text one here, the vision one in
/// [`super::clip_vision`]): both use the same encoder layers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TowerShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub eps: f64,
    pub act: ClipActivation,
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, shape: &TowerShape) -> candle_core::Result<Self> {
        let d = shape.hidden;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            heads: shape.heads,
            head_dim: d / shape.heads,
        })
    }

    /// `xs`: (B, T, D); `mask`: (T, T) additive mask in f32 (causal for text), or none.
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let split = |x: Tensor| -> candle_core::Result<Tensor> {
            x.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(DType::F32)
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = split(blas::linear(&self.q_proj, xs)?)?;
        let k = split(blas::linear(&self.k_proj, xs)?)?;
        let v = split(blas::linear(&self.v_proj, xs)?)?;
        let scores = (blas::matmul(&q, &k.t()?)? * scale)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = blas::matmul(&probs, &v)?
            .to_dtype(xs.dtype())?
            .transpose(1, 2)?
            .reshape((b, t, d))?;
        blas::linear(&self.out_proj, &out)
    }
}

/// One pre-norm transformer layer of a CLIP tower (`layer_norm1`, `self_attn`, `layer_norm2`,
/// `mlp.fc1`, `mlp.fc2`).
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: ClipActivation,
}

impl EncoderLayer {
    pub(crate) fn new(vb: VarBuilder, shape: &TowerShape) -> candle_core::Result<Self> {
        let d = shape.hidden;
        Ok(Self {
            layer_norm1: layer_norm(d, shape.eps, vb.pp("layer_norm1"))?,
            self_attn: Attention::new(vb.pp("self_attn"), shape)?,
            layer_norm2: layer_norm(d, shape.eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, shape.intermediate, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(shape.intermediate, d, vb.pp("mlp").pp("fc2"))?,
            act: shape.act,
        })
    }

    /// `xs` (B, T, D) through the layer; `mask` as for the attention.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let h = (self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?
            + xs)?;
        let mlp = blas::linear(
            &self.fc2,
            &self
                .act
                .apply(&blas::linear(&self.fc1, &self.layer_norm2.forward(&h)?)?)?,
        )?;
        mlp + h
    }
}

/// CLIP's text transformer; [`ClipTextModel::forward`] returns `last_hidden_state`
/// (after the final layer norm), which is what Stable Diffusion conditions on.
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    max_positions: usize,
}

impl ClipTextModel {
    /// Builds the model from its config and weights (`text_model.*` tensors, or the same
    /// names without the prefix).
    /// Fails with a message naming an unsupported `hidden_act`.
    pub fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self, String> {
        let act = ClipActivation::from_name(&c.hidden_act).ok_or_else(|| {
            format!(
                "hidden_act {:?} is not supported (quick_gelu, gelu, gelu_new)",
                c.hidden_act
            )
        })?;
        if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            ));
        }
        let shape = TowerShape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            eps: c.layer_norm_eps,
            act,
        };
        // transformers <= 4 saves `text_model.*`; 5 saves the same tensors without the prefix.
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let build = || -> candle_core::Result<Self> {
            let emb = vb.pp("embeddings");
            let enc = vb.pp("encoder").pp("layers");
            Ok(Self {
                token_embedding: embedding(c.vocab_size, c.hidden_size, emb.pp("token_embedding"))?,
                position_embedding: embedding(
                    c.max_position_embeddings,
                    c.hidden_size,
                    emb.pp("position_embedding"),
                )?,
                layers: (0..c.num_hidden_layers)
                    .map(|i| EncoderLayer::new(enc.pp(i), &shape))
                    .collect::<candle_core::Result<_>>()?,
                final_layer_norm: layer_norm(
                    c.hidden_size,
                    c.layer_norm_eps,
                    vb.pp("final_layer_norm"),
                )?,
                max_positions: c.max_position_embeddings,
            })
        };
        build().map_err(|e| e.to_string())
    }

    fn causal_mask(t: usize, device: &Device) -> candle_core::Result<Tensor> {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (t, t), device)
    }

    /// `input_ids`: (B, T) u32 with T <= `max_position_embeddings`; returns (B, T, hidden_size).
    pub fn forward(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_b, t) = input_ids.dims2()?;
        if t > self.max_positions {
            candle_core::bail!(
                "sequence of {t} tokens is longer than max_position_embeddings {}",
                self.max_positions
            );
        }
        let positions = Tensor::arange(0u32, t as u32, input_ids.device())?;
        let mut xs = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = Self::causal_mask(t, input_ids.device())?;
        for layer in &self.layers {
            xs = layer.forward(&xs, Some(&mask))?;
        }
        self.final_layer_norm.forward(&xs)
    }
}

impl ClipTextModel {
    /// Like [`ClipTextModel::forward`], also returning every hidden state as transformers'
    /// `output_hidden_states=True` does: `hidden_states[0]` is the embedding output and
    /// `hidden_states[i]` the output of layer `i` (before the final layer norm), so
    /// `hidden_states[len - 2]` is the penultimate state SDXL conditions on.
    /// Returns `(last_hidden_state, hidden_states)`, each (B, T, hidden_size).
    pub fn forward_with_hidden_states(
        &self,
        input_ids: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let (_b, t) = input_ids.dims2()?;
        if t > self.max_positions {
            candle_core::bail!(
                "sequence of {t} tokens is longer than max_position_embeddings {}",
                self.max_positions
            );
        }
        let positions = Tensor::arange(0u32, t as u32, input_ids.device())?;
        let mut xs = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = Self::causal_mask(t, input_ids.device())?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(xs.clone());
        for layer in &self.layers {
            xs = layer.forward(&xs, Some(&mask))?;
            hidden_states.push(xs.clone());
        }
        Ok((self.final_layer_norm.forward(&xs)?, hidden_states))
    }
}

/// The token position transformers' CLIP text model pools at, per row of `ids`: with the legacy
/// `eos_token_id == 2` in the config, the first position of the largest id (CLIP's EOS is the
/// last vocabulary entry); otherwise the first position of `eos_token_id` (0 when absent, as
/// `argmax` of all zeros).
pub fn clip_pooling_positions(ids: &[Vec<u32>], eos_token_id: u32) -> Vec<usize> {
    ids.iter()
        .map(|row| {
            if eos_token_id == 2 {
                let max = row.iter().copied().max().unwrap_or(0);
                row.iter().position(|&id| id == max).unwrap_or(0)
            } else {
                row.iter().position(|&id| id == eos_token_id).unwrap_or(0)
            }
        })
        .collect()
}

/// What [`ClipTextModelWithProjection::forward`] returns.
pub struct ClipProjectionOutput {
    /// The final-layer-normed states (B, T, hidden_size).
    pub last_hidden_state: Tensor,
    /// Embedding output and each layer's output (see
    /// [`ClipTextModel::forward_with_hidden_states`]).
    pub hidden_states: Vec<Tensor>,
    /// The pooled state through `text_projection` (B, projection_dim): transformers'
    /// `text_embeds`, SDXL's pooled prompt embedding.
    pub text_embeds: Tensor,
}

/// transformers' `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`): the text model plus
/// a bias-free `text_projection` of the pooled (EOS-position) state.
pub struct ClipTextModelWithProjection {
    text_model: ClipTextModel,
    text_projection: Linear,
    eos_token_id: u32,
}

impl ClipTextModelWithProjection {
    /// Builds the model from its config, `projection_dim` and `eos_token_id` (both from the same
    /// `config.json`) and weights (`text_model.*` or unprefixed, plus `text_projection.weight`).
    pub fn new(
        vb: VarBuilder,
        c: &ClipTextConfig,
        projection_dim: usize,
        eos_token_id: u32,
    ) -> Result<Self, String> {
        let text_projection =
            candle_nn::linear_no_bias(c.hidden_size, projection_dim, vb.pp("text_projection"))
                .map_err(|e| e.to_string())?;
        Ok(Self {
            text_model: ClipTextModel::new(vb, c)?,
            text_projection,
            eos_token_id,
        })
    }

    /// `input_ids`: (B, T) u32 → hidden states and the projected pooled embedding.
    pub fn forward(&self, input_ids: &Tensor) -> candle_core::Result<ClipProjectionOutput> {
        let (last_hidden_state, hidden_states) =
            self.text_model.forward_with_hidden_states(input_ids)?;
        let ids: Vec<Vec<u32>> = input_ids.to_vec2()?;
        let rows = clip_pooling_positions(&ids, self.eos_token_id)
            .into_iter()
            .enumerate()
            .map(|(b, pos)| last_hidden_state.get(b)?.narrow(0, pos, 1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = Tensor::cat(&rows, 0)?;
        Ok(ClipProjectionOutput {
            text_embeds: self.text_projection.forward(&pooled)?,
            last_hidden_state,
            hidden_states,
        })
    }
}
