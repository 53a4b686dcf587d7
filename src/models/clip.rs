//! transformers' `CLIPModel` (`openai/clip-vit-large-patch14`, PickScore's CLIP-H): the vision
//! tower with `visual_projection`, the text tower with `text_projection` (from
//! [`super::clip_text`]) and `logit_scale`, configured from the model's `config.json`.
//!
//! Own code rather than `candle_transformers::models::clip`, whose configs are hard-coded
//! presets (no `config.json`), whose activation is fixed per preset, and which has no hook for
//! the batched image path the verifiers need; the encoder layers are shared with our CLIP text
//! model, which the diffusion pipelines already prove against transformers.

use candle_core::{Module, Tensor, D};
use candle_nn::{layer_norm, linear_no_bias, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::clip_text::{
    ClipActivation, ClipTextConfig, ClipTextModelWithProjection, EncoderLayer, TowerShape,
};

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".to_string()
}
fn default_channels() -> usize {
    3
}
fn default_projection() -> usize {
    512
}
fn default_logit_scale() -> f64 {
    2.6592
}

/// `vision_config` of a CLIP `config.json` (transformers' `CLIPVisionConfig`).
#[derive(Clone, Debug, Deserialize)]
pub struct ClipVisionConfig {
    /// Width of the hidden states (1024 for ViT-L/14).
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Input channels.
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Input size in pixels (square).
    pub image_size: usize,
    /// Patch size in pixels.
    pub patch_size: usize,
    /// MLP activation name.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

/// A CLIP `config.json` (transformers' `CLIPConfig`).
#[derive(Clone, Debug, Deserialize)]
pub struct ClipConfig {
    /// The text tower.
    pub text_config: ClipTextConfig,
    /// The vision tower.
    pub vision_config: ClipVisionConfig,
    /// Width of the shared embedding space.
    #[serde(default = "default_projection")]
    pub projection_dim: usize,
    /// Initial `logit_scale` (the weight file has the trained one).
    #[serde(default = "default_logit_scale")]
    pub logit_scale_init_value: f64,
}

/// CLIP's vision transformer with `visual_projection`.
pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: candle_nn::Conv2d,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    image_size: usize,
}

impl ClipVisionModel {
    /// Builds the tower from `vision_model.*` and `visual_projection.weight` under `vb`.
    pub fn new(
        vb: VarBuilder,
        c: &ClipVisionConfig,
        projection_dim: usize,
    ) -> Result<Self, String> {
        let act = ClipActivation::from_name(&c.hidden_act).ok_or_else(|| {
            format!(
                "vision_config.hidden_act {:?} is not supported (quick_gelu, gelu, gelu_new)",
                c.hidden_act
            )
        })?;
        if c.num_attention_heads == 0
            || c.hidden_size % c.num_attention_heads != 0
            || c.patch_size == 0
            || c.image_size % c.patch_size != 0
        {
            return Err(format!(
                "vision_config: hidden_size {} must be a multiple of num_attention_heads {} and \
                 image_size {} of patch_size {}",
                c.hidden_size, c.num_attention_heads, c.image_size, c.patch_size
            ));
        }
        let shape = TowerShape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            eps: c.layer_norm_eps,
            act,
        };
        let patches = (c.image_size / c.patch_size).pow(2);
        let build = || -> candle_core::Result<Self> {
            let v = vb.pp("vision_model");
            let emb = v.pp("embeddings");
            let conv = candle_nn::Conv2dConfig {
                stride: c.patch_size,
                ..Default::default()
            };
            Ok(Self {
                class_embedding: emb.get(c.hidden_size, "class_embedding")?,
                patch_embedding: candle_nn::conv2d_no_bias(
                    c.num_channels,
                    c.hidden_size,
                    c.patch_size,
                    conv,
                    emb.pp("patch_embedding"),
                )?,
                position_embedding: emb
                    .pp("position_embedding")
                    .get((patches + 1, c.hidden_size), "weight")?,
                pre_layrnorm: layer_norm(c.hidden_size, c.layer_norm_eps, v.pp("pre_layrnorm"))?,
                layers: (0..c.num_hidden_layers)
                    .map(|i| EncoderLayer::new(v.pp("encoder").pp("layers").pp(i), &shape))
                    .collect::<candle_core::Result<_>>()?,
                post_layernorm: layer_norm(
                    c.hidden_size,
                    c.layer_norm_eps,
                    v.pp("post_layernorm"),
                )?,
                visual_projection: linear_no_bias(
                    c.hidden_size,
                    projection_dim,
                    vb.pp("visual_projection"),
                )?,
                image_size: c.image_size,
            })
        };
        build().map_err(|e| e.to_string())
    }

    /// The input size in pixels (square).
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// `pixel_values` (B, 3, S, S), normalised → `image_embeds` (B, projection_dim), before
    /// any L2 normalisation (transformers' `get_image_features`).
    pub fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let b = pixel_values.dim(0)?;
        let patches = self
            .patch_embedding
            .forward(pixel_values)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let hidden = self.class_embedding.dim(0)?;
        let class = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((b, 1, hidden))?
            .to_dtype(patches.dtype())?;
        let mut xs = Tensor::cat(&[&class, &patches], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        xs = self.pre_layrnorm.forward(&xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, None)?;
        }
        let pooled = self
            .post_layernorm
            .forward(&xs.narrow(1, 0, 1)?.squeeze(1)?)?;
        self.visual_projection.forward(&pooled)
    }
}

/// transformers' `CLIPModel`: both towers and the trained `logit_scale`.
pub struct ClipModel {
    /// The vision tower.
    pub vision: ClipVisionModel,
    /// The text tower.
    pub text: ClipTextModelWithProjection,
    /// `logit_scale` (its exponential multiplies the cosines).
    pub logit_scale: f32,
}

impl ClipModel {
    /// Builds the model from its config and weights (`vision_model.*`, `text_model.*`,
    /// `visual_projection.weight`, `text_projection.weight`, `logit_scale`).
    pub fn new(vb: VarBuilder, c: &ClipConfig) -> Result<Self, String> {
        let eos = c.text_config.eos_token_id.unwrap_or(2);
        let logit_scale = vb
            .get((), "logit_scale")
            .and_then(|t| t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>())
            .map_err(|e| format!("logit_scale: {e}"))?;
        Ok(Self {
            vision: ClipVisionModel::new(vb.clone(), &c.vision_config, c.projection_dim)?,
            text: ClipTextModelWithProjection::new(vb, &c.text_config, c.projection_dim, eos)?,
            logit_scale,
        })
    }

    /// `text_embeds` (B, projection_dim) of token ids (B, T).
    pub fn text_embeds(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.text.forward(input_ids)?.text_embeds)
    }
}

/// `x` (B, N) scaled to unit L2 norm per row.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

/// A size in `preprocessor_config.json`: a number, `{"shortest_edge": n}` or
/// `{"height": h, "width": w}`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(untagged)]
pub enum ProcessorSize {
    /// One number.
    Plain(usize),
    /// The shortest edge.
    Shortest {
        /// Pixels.
        shortest_edge: usize,
    },
    /// Height and width.
    HeightWidth {
        /// Pixels.
        height: usize,
        /// Pixels.
        width: usize,
    },
}

impl ProcessorSize {
    fn edge(self) -> usize {
        match self {
            Self::Plain(n) | Self::Shortest { shortest_edge: n } => n,
            Self::HeightWidth { height, .. } => height,
        }
    }
    fn height_width(self) -> (usize, usize) {
        match self {
            Self::Plain(n) | Self::Shortest { shortest_edge: n } => (n, n),
            Self::HeightWidth { height, width } => (height, width),
        }
    }
}

fn default_true() -> bool {
    true
}
fn openai_mean() -> [f32; 3] {
    [0.481_454_66, 0.457_827_5, 0.408_210_73]
}
fn openai_std() -> [f32; 3] {
    [0.268_629_54, 0.261_302_6, 0.275_777_1]
}
fn default_resample() -> u32 {
    3
}

/// `preprocessor_config.json` of a CLIP model (transformers' `CLIPImageProcessor`): resize the
/// shortest edge with Pillow's bicubic, centre-crop, scale to [0, 1], normalise.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipImageProcessor {
    /// The shortest edge after resizing.
    pub size: ProcessorSize,
    /// The centre crop.
    pub crop_size: ProcessorSize,
    /// Whether to resize.
    #[serde(default = "default_true")]
    pub do_resize: bool,
    /// Whether to centre-crop.
    #[serde(default = "default_true")]
    pub do_center_crop: bool,
    /// Per-channel mean.
    #[serde(default = "openai_mean")]
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation.
    #[serde(default = "openai_std")]
    pub image_std: [f32; 3],
    /// Pillow's resampling filter; 3 (bicubic) is the only one implemented.
    #[serde(default = "default_resample")]
    pub resample: u32,
    /// How the centre crop's offsets round (transformers: down; torchvision: half to even).
    #[serde(skip)]
    pub crop_rounding: CropRounding,
}

/// How a centre crop of `crop` pixels out of `size` places its first pixel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CropRounding {
    /// `(size - crop) // 2`, as transformers' image processors.
    #[default]
    Floor,
    /// `int(round((size - crop) / 2.0))`, Python's round half to even, as torchvision's
    /// `CenterCrop` (OpenCLIP, HPSv2).
    HalfEven,
}

impl CropRounding {
    fn offset(self, size: usize, crop: usize) -> usize {
        let margin = size - crop;
        match self {
            Self::Floor => margin / 2,
            // margin / 2 is exact or .5; .5 goes to the even neighbour.
            Self::HalfEven if margin % 2 == 1 && (margin / 2) % 2 == 1 => margin / 2 + 1,
            Self::HalfEven => margin / 2,
        }
    }
}

impl ClipImageProcessor {
    /// The processor of `openai/clip-vit-large-patch14` for `size` pixels.
    pub fn openai(size: usize) -> Self {
        Self {
            size: ProcessorSize::Plain(size),
            crop_size: ProcessorSize::Plain(size),
            do_resize: true,
            do_center_crop: true,
            image_mean: openai_mean(),
            image_std: openai_std(),
            resample: 3,
            crop_rounding: CropRounding::Floor,
        }
    }

    /// The image as the model sees it, (3, H, W) channel-major float32, exactly as
    /// transformers computes it: resize so the shortest edge is `size` (the other edge
    /// truncated), crop the centre (top-left offset rounded down), `x / 255` in float64 then
    /// float32, then `(x - mean) / std` in float32.
    pub fn pixel_values(&self, image: &image::RgbImage) -> (Vec<f32>, usize, usize) {
        let mut img = image.clone();
        if self.do_resize {
            let (w, h) = (img.width() as usize, img.height() as usize);
            let edge = self.size.edge();
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            if short != edge {
                let long = (edge as f64 * long as f64 / short as f64) as usize;
                let (nw, nh) = if w <= h { (edge, long) } else { (long, edge) };
                img = super::pil_resize::resize_bicubic(&img, nw, nh);
            }
        }
        if self.do_center_crop {
            let (ch, cw) = self.crop_size.height_width();
            let (w, h) = (img.width() as usize, img.height() as usize);
            if w >= cw && h >= ch {
                let (top, left) = (
                    self.crop_rounding.offset(h, ch),
                    self.crop_rounding.offset(w, cw),
                );
                img =
                    image::imageops::crop_imm(&img, left as u32, top as u32, cw as u32, ch as u32)
                        .to_image();
            }
        }
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut out = vec![0f32; 3 * h * w];
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                let v = (f64::from(p[c]) * (1.0 / 255.0)) as f32;
                out[c * h * w + y as usize * w + x as usize] =
                    (v - self.image_mean[c]) / self.image_std[c];
            }
        }
        (out, h, w)
    }

    /// A batch of images as (B, 3, H, W) on `device` in `dtype`; the images must give the same
    /// size (they do after the centre crop).
    pub fn batch(
        &self,
        images: &[&image::RgbImage],
        device: &candle_core::Device,
        dtype: candle_core::DType,
    ) -> candle_core::Result<Tensor> {
        let mut rows = Vec::with_capacity(images.len());
        for image in images {
            let (values, h, w) = self.pixel_values(image);
            rows.push(Tensor::from_vec(values, (1, 3, h, w), device)?);
        }
        Tensor::cat(&rows, 0)?.to_dtype(dtype)
    }
}
