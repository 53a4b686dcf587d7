//! BLIP's networks as ImageReward v1.0 uses them (`THUDM/ImageReward`'s `ImageReward.pt`): the
//! ViT image encoder (BLIP's `models/vit.py`, timm-style pre-norm blocks with a fused `qkv`,
//! LayerNorm eps 1e-6, exact GELU; ViT-L/16 at 224 px for ImageReward) and the "med" BERT text
//! encoder (BLIP's `models/med.py`) in its multimodal mode: word and absolute position embeddings
//! (no token types), and in every layer self-attention, cross-attention to the image tokens, then
//! the feed-forward block, post-norm, with BERT's additive mask `(1 - m) · -10000`.
//!
//! Own code: candle-transformers' BLIP is the Salesforce captioning model in transformers' layout
//! (other weight names, a decoder with causal self-attention), and its BERT has token-type
//! embeddings and no cross-attention; ImageReward's checkpoint is neither.

use candle_core::{DType, Module, Tensor};
use candle_nn::{layer_norm, linear, Conv2dConfig, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::ModelError;
use crate::ops::blas;

fn vit_image_size() -> usize {
    224
}
fn vit_patch() -> usize {
    16
}
fn vit_width() -> usize {
    1024
}
fn vit_depth() -> usize {
    24
}
fn vit_heads() -> usize {
    16
}
fn vit_mlp_ratio() -> f64 {
    4.0
}
fn vit_eps() -> f64 {
    1e-6
}

/// The image encoder's sizes (`blip_vision_config.json` beside the checkpoint, a tt-scale file;
/// every field defaults to ImageReward's ViT-L/16 at 224 px, BLIP's `create_vit("large", 224)`).
#[derive(Clone, Debug, Deserialize)]
pub struct BlipVisionConfig {
    /// Input size in pixels (square).
    #[serde(default = "vit_image_size")]
    pub image_size: usize,
    /// Patch size in pixels.
    #[serde(default = "vit_patch")]
    pub patch_size: usize,
    /// Width of the tokens.
    #[serde(default = "vit_width")]
    pub hidden_size: usize,
    /// Transformer blocks.
    #[serde(default = "vit_depth")]
    pub depth: usize,
    /// Attention heads.
    #[serde(default = "vit_heads")]
    pub num_heads: usize,
    /// MLP width over the token width.
    #[serde(default = "vit_mlp_ratio")]
    pub mlp_ratio: f64,
    /// LayerNorm epsilon.
    #[serde(default = "vit_eps")]
    pub layer_norm_eps: f64,
}

impl Default for BlipVisionConfig {
    fn default() -> Self {
        Self {
            image_size: vit_image_size(),
            patch_size: vit_patch(),
            hidden_size: vit_width(),
            depth: vit_depth(),
            num_heads: vit_heads(),
            mlp_ratio: vit_mlp_ratio(),
            layer_norm_eps: vit_eps(),
        }
    }
}

/// Softmax attention of `q` (B, Lq, H·D) over `k`, `v` (B, Lk, H·D) in `heads` heads, with an
/// optional additive mask broadcast to (B, H, Lq, Lk); scores in float32. Returns (B, Lq, H·D).
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, lq, width) = q.dims3()?;
    let lk = k.dim(1)?;
    let hd = width / heads;
    let split = |x: &Tensor, l: usize| -> candle_core::Result<Tensor> {
        x.reshape((b, l, heads, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .to_dtype(DType::F32)
    };
    let (qh, kh, vh) = (split(q, lq)?, split(k, lk)?, split(v, lk)?);
    let mut scores = (blas::matmul(&qh, &kh.t()?)? * (hd as f64).powf(-0.5))?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    blas::matmul(&candle_nn::ops::softmax_last_dim(&scores)?, &vh)?
        .to_dtype(q.dtype())?
        .transpose(1, 2)?
        .reshape((b, lq, width))
}

/// One block of BLIP's ViT (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`).
struct VitBlock {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl VitBlock {
    fn new(vb: VarBuilder, c: &BlipVisionConfig) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        let mlp = (d as f64 * c.mlp_ratio) as usize;
        Ok(Self {
            norm1: layer_norm(d, c.layer_norm_eps, vb.pp("norm1"))?,
            qkv: linear(d, 3 * d, vb.pp("attn").pp("qkv"))?,
            proj: linear(d, d, vb.pp("attn").pp("proj"))?,
            norm2: layer_norm(d, c.layer_norm_eps, vb.pp("norm2"))?,
            fc1: linear(d, mlp, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(mlp, d, vb.pp("mlp").pp("fc2"))?,
            heads: c.num_heads,
        })
    }

    /// x + attn(norm1(x)), then + mlp(norm2(x)).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let d = x.dim(2)?;
        let qkv = blas::linear(&self.qkv, &self.norm1.forward(x)?)?;
        let (q, k, v) = (
            qkv.narrow(2, 0, d)?,
            qkv.narrow(2, d, d)?,
            qkv.narrow(2, 2 * d, d)?,
        );
        let x = (x + blas::linear(&self.proj, &attend(&q, &k, &v, self.heads, None)?)?)?;
        let h = blas::linear(&self.fc1, &self.norm2.forward(&x)?)?.gelu_erf()?;
        x + blas::linear(&self.fc2, &h)?
    }
}

/// BLIP's ViT image encoder (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.*`, `norm`).
pub struct BlipVisionTransformer {
    patch_embed: candle_nn::Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<VitBlock>,
    norm: LayerNorm,
    config: BlipVisionConfig,
}

impl BlipVisionTransformer {
    /// Builds the encoder from the weights under `vb` (ImageReward: `blip.visual_encoder`).
    pub fn new(vb: VarBuilder, c: &BlipVisionConfig) -> Result<Self, ModelError> {
        if c.num_heads == 0
            || c.hidden_size % c.num_heads != 0
            || c.patch_size == 0
            || c.image_size % c.patch_size != 0
            || c.mlp_ratio <= 0.0
        {
            return Err(ModelError::Unsupported(format!(
                "BLIP vision config: hidden_size {} must be a multiple of num_heads {}, \
                 image_size {} of patch_size {}, and mlp_ratio {} positive",
                c.hidden_size, c.num_heads, c.image_size, c.patch_size, c.mlp_ratio
            )));
        }
        let d = c.hidden_size;
        let tokens = (c.image_size / c.patch_size).pow(2) + 1;
        let conv = Conv2dConfig {
            stride: c.patch_size,
            ..Default::default()
        };
        Ok(Self {
            patch_embed: candle_nn::conv2d(
                3,
                d,
                c.patch_size,
                conv,
                vb.pp("patch_embed").pp("proj"),
            )?,
            cls_token: vb.get((1, 1, d), "cls_token")?,
            pos_embed: vb.get((1, tokens, d), "pos_embed")?,
            blocks: (0..c.depth)
                .map(|i| VitBlock::new(vb.pp("blocks").pp(i), c))
                .collect::<candle_core::Result<_>>()?,
            norm: layer_norm(d, c.layer_norm_eps, vb.pp("norm"))?,
            config: c.clone(),
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &BlipVisionConfig {
        &self.config
    }

    /// Normalised pixels (B, 3, S, S) → image tokens (B, 1 + (S/P)², D) after the final norm,
    /// the class token first.
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let b = pixels.dim(0)?;
        let patches = self
            .patch_embed
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let d = patches.dim(2)?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        self.norm.forward(&x)
    }
}

fn default_eps_bert() -> f64 {
    1e-12
}
fn default_act_bert() -> String {
    "gelu".into()
}
fn default_position_type() -> String {
    "absolute".into()
}

/// BLIP's `med_config.json` (a transformers `BertConfig` with `encoder_width` and
/// `add_cross_attention`). `encoder_width` is replaced by the image encoder's width, as BLIP does.
#[derive(Clone, Debug, Deserialize)]
pub struct MedConfig {
    /// Vocabulary size (30524: bert-base-uncased and BLIP's [DEC] and [ENC]).
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Position embeddings (the longest input).
    pub max_position_embeddings: usize,
    /// Feed-forward activation; `gelu` (exact) is implemented.
    #[serde(default = "default_act_bert")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps_bert")]
    pub layer_norm_eps: f64,
    /// Whether the layers have cross-attention (ImageReward's: yes).
    #[serde(default)]
    pub add_cross_attention: bool,
    /// Position embedding kind; `absolute` is implemented.
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

/// `query`, `key`, `value` and `output.dense` / `output.LayerNorm` of one BERT attention block.
struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: usize,
}

impl BertAttention {
    fn new(vb: VarBuilder, c: &MedConfig, kv_width: usize) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        let s = vb.pp("self");
        Ok(Self {
            query: linear(d, d, s.pp("query"))?,
            key: linear(kv_width, d, s.pp("key"))?,
            value: linear(kv_width, d, s.pp("value"))?,
            dense: linear(d, d, vb.pp("output").pp("dense"))?,
            norm: layer_norm(d, c.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            heads: c.num_attention_heads,
        })
    }

    /// LayerNorm(x + dense(attention of x over `kv`)).
    fn forward(
        &self,
        x: &Tensor,
        kv: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let ctx = attend(
            &blas::linear(&self.query, x)?,
            &blas::linear(&self.key, kv)?,
            &blas::linear(&self.value, kv)?,
            self.heads,
            mask,
        )?;
        self.norm.forward(&(blas::linear(&self.dense, &ctx)? + x)?)
    }
}

/// One layer of the med BERT: self-attention, cross-attention, feed-forward.
struct BertLayer {
    attention: BertAttention,
    crossattention: BertAttention,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
}

impl BertLayer {
    fn new(vb: VarBuilder, c: &MedConfig, encoder_width: usize) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            attention: BertAttention::new(vb.pp("attention"), c, d)?,
            crossattention: BertAttention::new(vb.pp("crossattention"), c, encoder_width)?,
            intermediate: linear(d, c.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            output: linear(c.intermediate_size, d, vb.pp("output").pp("dense"))?,
            norm: layer_norm(d, c.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, image: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.attention.forward(x, x, Some(mask))?;
        // The image tokens are all valid: BLIP's encoder mask is zero everywhere.
        let x = self.crossattention.forward(&x, image, None)?;
        let h = blas::linear(&self.intermediate, &x)?.gelu_erf()?;
        self.norm.forward(&(blas::linear(&self.output, &h)? + x)?)
    }
}

/// BLIP's med BERT text encoder in multimodal mode (`embeddings.*`, `encoder.layer.*`).
pub struct MedBertModel {
    word_embeddings: candle_nn::Embedding,
    position_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<BertLayer>,
}

impl MedBertModel {
    /// Builds the encoder from the weights under `vb` (ImageReward: `blip.text_encoder`), its
    /// cross-attention reading `encoder_width`-wide image tokens.
    pub fn new(vb: VarBuilder, c: &MedConfig, encoder_width: usize) -> Result<Self, ModelError> {
        if c.hidden_act != "gelu" {
            return Err(ModelError::Unsupported(format!(
                "med_config.json: hidden_act {:?} is not implemented (gelu is)",
                c.hidden_act
            )));
        }
        if c.position_embedding_type != "absolute" {
            return Err(ModelError::Unsupported(format!(
                "med_config.json: position_embedding_type {:?} is not implemented (absolute is)",
                c.position_embedding_type
            )));
        }
        if !c.add_cross_attention {
            return Err(ModelError::Unsupported(
                "med_config.json: add_cross_attention is false; ImageReward's text encoder \
                 attends to the image in every layer"
                    .into(),
            ));
        }
        if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 {
            return Err(ModelError::Unsupported(format!(
                "med_config.json: hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        let d = c.hidden_size;
        let emb = vb.pp("embeddings");
        Ok(Self {
            word_embeddings: candle_nn::embedding(c.vocab_size, d, emb.pp("word_embeddings"))?,
            position_embeddings: emb
                .pp("position_embeddings")
                .get((c.max_position_embeddings, d), "weight")?,
            embeddings_norm: layer_norm(d, c.layer_norm_eps, emb.pp("LayerNorm"))?,
            layers: (0..c.num_hidden_layers)
                .map(|i| BertLayer::new(vb.pp("encoder").pp("layer").pp(i), c, encoder_width))
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// The longest input it takes, in tokens.
    pub fn max_positions(&self) -> usize {
        self.position_embeddings.dim(0).unwrap_or(0)
    }

    /// `input_ids` (B, T) u32 with `attention_mask` (B, T) (1 = token, 0 = padding), attending to
    /// `image` tokens (B, N, encoder_width) → `last_hidden_state` (B, T, hidden_size).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        image: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let positions = self.position_embeddings.narrow(0, 0, t)?;
        let mut x = self
            .word_embeddings
            .forward(input_ids)?
            .broadcast_add(&positions)?;
        x = self.embeddings_norm.forward(&x)?;
        // BERT's extended mask: (1 - m) · -10000, added to every head's scores.
        let mask = ((attention_mask.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * -10000.0)?)
            .reshape((b, 1, 1, t))?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask, image)?;
        }
        Ok(x)
    }
}

/// BLIP's tokenizer (`init_tokenizer`): bert-base-uncased's WordPiece from a Hugging Face
/// `tokenizer.json`, with BLIP's added special tokens `[DEC]` and `[ENC]` (ids 30522 and 30523
/// on bert-base-uncased), padded and truncated to a fixed length as ImageReward asks
/// (`padding="max_length", truncation=True, max_length=35`).
pub struct BlipTokenizer {
    tokenizer: tokenizers::Tokenizer,
    length: usize,
}

/// The fixed token count ImageReward encodes prompts to.
pub const IMAGE_REWARD_MAX_LENGTH: usize = 35;

impl BlipTokenizer {
    /// Loads `path` (bert-base-uncased's `tokenizer.json`) and sets it up for `length` tokens.
    pub fn from_tokenizer_json(path: &std::path::Path, length: usize) -> Result<Self, ModelError> {
        let bad = |message: String| ModelError::ModelFile {
            path: path.display().to_string(),
            message,
        };
        let mut tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| bad(format!("not a Hugging Face tokenizer.json: {e}")))?;
        let id = |token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                bad(format!(
                    "has no {token} token; is this bert-base-uncased's tokenizer?"
                ))
            })
        };
        let (pad_id, _, _) = (id("[PAD]")?, id("[CLS]")?, id("[SEP]")?);
        tokenizer
            .add_special_tokens([
                tokenizers::AddedToken::from("[DEC]", true),
                tokenizers::AddedToken::from("[ENC]", true),
            ])
            .map_err(|e| bad(format!("cannot add BLIP's [DEC] and [ENC] tokens: {e}")))?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: length,
                ..Default::default()
            }))
            .map_err(|e| bad(format!("cannot truncate to {length} tokens: {e}")))?;
        tokenizer.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(length),
            pad_id,
            pad_token: "[PAD]".into(),
            ..Default::default()
        }));
        Ok(Self { tokenizer, length })
    }

    /// The ids and attention mask (1 = token, 0 = padding) of `prompt`, `length` of each:
    /// `[CLS] tokens [SEP] [PAD]...`.
    pub fn encode(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
        let enc = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| ModelError::InvalidArgument(format!("cannot tokenize the prompt: {e}")))?;
        let (ids, mask) = (enc.get_ids().to_vec(), enc.get_attention_mask().to_vec());
        if ids.len() != self.length {
            return Err(ModelError::InvalidArgument(format!(
                "the tokenizer gave {} tokens, not {}",
                ids.len(),
                self.length
            )));
        }
        Ok((ids, mask))
    }
}
