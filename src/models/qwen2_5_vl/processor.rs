//! Qwen2.5-VL's input side as the Hugging Face processor does it: `smart_resize` to multiples of
//! 28 within min/max pixels, Pillow's bicubic resampling (8-bit, fixed point, the PIL backend of
//! transformers), rescale + CLIP normalisation, the (merge-block-major) patch order, the chat
//! template, and the multimodal rotary position ids (`get_rope_index`).

use image::RgbImage;
use serde::Deserialize;

use super::QwenError;
use crate::models::ModelError;

/// `preprocessor_config.json`: how images become patches.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    /// Fewest pixels (height x width) after resizing.
    pub min_pixels: usize,
    /// Most pixels after resizing.
    pub max_pixels: usize,
    /// Side of a square patch in pixels (14).
    pub patch_size: usize,
    /// Frames per patch (2; a still image is repeated).
    pub temporal_patch_size: usize,
    /// Patches merged per side by the vision merger (2).
    pub merge_size: usize,
    /// Per-channel mean after rescaling to 0..1.
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation after rescaling to 0..1.
    pub image_std: [f32; 3],
    /// Factor from 0..255 to 0..1.
    pub rescale_factor: f32,
}

impl Default for ImageProcessorConfig {
    /// The values of Qwen2.5-VL-7B-Instruct's `preprocessor_config.json`.
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
            rescale_factor: 1.0 / 255.0,
        }
    }
}

/// `size` of newer `preprocessor_config.json` files.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SizeJson {
    /// Fewest pixels.
    #[serde(default)]
    pub shortest_edge: Option<usize>,
    /// Most pixels.
    #[serde(default)]
    pub longest_edge: Option<usize>,
}

/// `preprocessor_config.json` as transformers writes it (`min_pixels`/`max_pixels`, or
/// `size.shortest_edge`/`size.longest_edge`); missing keys keep [`ImageProcessorConfig`]'s
/// defaults.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ImageProcessorConfigJson {
    /// Fewest pixels after resizing.
    #[serde(default)]
    pub min_pixels: Option<usize>,
    /// Most pixels after resizing.
    #[serde(default)]
    pub max_pixels: Option<usize>,
    /// The pixel bounds in newer files.
    #[serde(default)]
    pub size: Option<SizeJson>,
    /// Patch side.
    #[serde(default)]
    pub patch_size: Option<usize>,
    /// Frames per patch.
    #[serde(default)]
    pub temporal_patch_size: Option<usize>,
    /// Patches merged per side.
    #[serde(default)]
    pub merge_size: Option<usize>,
    /// Per-channel mean.
    #[serde(default)]
    pub image_mean: Option<[f32; 3]>,
    /// Per-channel standard deviation.
    #[serde(default)]
    pub image_std: Option<[f32; 3]>,
    /// Factor from 0..255 to 0..1.
    #[serde(default)]
    pub rescale_factor: Option<f32>,
}

impl crate::models::ModelConfig for ImageProcessorConfig {
    type Raw = ImageProcessorConfigJson;
}

impl TryFrom<ImageProcessorConfigJson> for ImageProcessorConfig {
    type Error = ModelError;

    fn try_from(j: ImageProcessorConfigJson) -> Result<Self, ModelError> {
        let d = Self::default();
        let size = j.size.unwrap_or_default();
        let c = Self {
            min_pixels: j.min_pixels.or(size.shortest_edge).unwrap_or(d.min_pixels),
            max_pixels: j.max_pixels.or(size.longest_edge).unwrap_or(d.max_pixels),
            patch_size: j.patch_size.unwrap_or(d.patch_size),
            temporal_patch_size: j.temporal_patch_size.unwrap_or(d.temporal_patch_size),
            merge_size: j.merge_size.unwrap_or(d.merge_size),
            image_mean: j.image_mean.unwrap_or(d.image_mean),
            image_std: j.image_std.unwrap_or(d.image_std),
            rescale_factor: j.rescale_factor.unwrap_or(d.rescale_factor),
        };
        if c.patch_size == 0 || c.merge_size == 0 || c.temporal_patch_size == 0 {
            return Err(ModelError::ModelFile {
                path: "preprocessor_config.json".into(),
                message: "patch_size, merge_size and temporal_patch_size must be positive".into(),
            });
        }
        Ok(c)
    }
}

impl ImageProcessorConfig {
    /// Length of one flattened patch: channels x temporal x patch x patch (1176).
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// The target (height, width), multiples of `factor`, with height x width within
/// `[min_pixels, max_pixels]` and the aspect ratio kept as well as possible (transformers'
/// `smart_resize`, Python's round-half-to-even included).
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), QwenError> {
    if height == 0 || width == 0 {
        return Err(QwenError::Image(format!(
            "the image is empty ({width}x{height})"
        )));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(QwenError::Image(format!(
            "the image's aspect ratio ({width}x{height}) is above 200"
        )));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

pub use crate::models::pil_resize::resize_bicubic;

/// One image turned into vision-encoder input.
#[derive(Clone, Debug)]
pub struct ProcessedImage {
    /// Flattened patches, `grid_h * grid_w` rows of [`ImageProcessorConfig::patch_dim`] values,
    /// row-major, in the processor's order (merge blocks, then the patches inside a block).
    pub pixel_values: Vec<f32>,
    /// (temporal, height, width) grid in patches: `(1, H/14, W/14)`.
    pub grid_thw: [usize; 3],
}

impl ProcessedImage {
    /// Image placeholder tokens in the prompt: `grid_h * grid_w / merge^2`.
    pub fn num_tokens(&self, merge: usize) -> usize {
        self.grid_thw[0] * self.grid_thw[1] * self.grid_thw[2] / (merge * merge)
    }
}

impl ImageProcessorConfig {
    /// Resizes, rescales, normalises and patchifies `img` as transformers'
    /// `Qwen2VLImageProcessor` (PIL backend) does.
    pub fn preprocess(&self, img: &RgbImage) -> Result<ProcessedImage, QwenError> {
        let factor = self.patch_size * self.merge_size;
        let (h, w) = smart_resize(
            img.height() as usize,
            img.width() as usize,
            factor,
            self.min_pixels,
            self.max_pixels,
        )?;
        let resized = resize_bicubic(img, w, h);
        let raw = resized.as_raw();
        let (p, m, t) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (gh, gw) = (h / p, w / p);
        let dim = self.patch_dim();
        let mut out = Vec::with_capacity(gh * gw * dim);
        let norm: Vec<(f32, f32)> = (0..3)
            .map(|c| (self.image_mean[c], self.image_std[c]))
            .collect();
        let value = |y: usize, x: usize, c: usize| -> f32 {
            let v = raw[(y * w + x) * 3 + c] as f32 * self.rescale_factor;
            (v - norm[c].0) / norm[c].1
        };
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (py, px) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for c in 0..3 {
                            for _ in 0..t {
                                for y in 0..p {
                                    for x in 0..p {
                                        out.push(value(py + y, px + x, c));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(ProcessedImage {
            pixel_values: out,
            grid_thw: [1, gh, gw],
        })
    }
}

/// The chat (Qwen2.5-VL-Instruct's template) split at the image: the text before the image
/// placeholder tokens and the text after them. `system` is the rubric, `prompt` the user text
/// after the image; the generation prompt (`<|im_start|>assistant\n`) ends the second part.
pub fn chat_parts(system: &str, prompt: &str) -> (String, String) {
    (
        format!("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>"),
        format!("<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"),
    )
}

/// Multimodal rotary positions (temporal, height, width) of a sequence made of `prefix` text
/// tokens, one image of `grid_thw` patches (merged `merge` x `merge`), then `suffix` text
/// tokens; also the offset that later (generated) tokens add to their index. As transformers'
/// `get_rope_index` for one image.
pub fn rope_positions(
    prefix: usize,
    grid_thw: [usize; 3],
    merge: usize,
    suffix: usize,
) -> (Vec<[i64; 3]>, i64) {
    let mut pos = Vec::new();
    for i in 0..prefix {
        let i = i as i64;
        pos.push([i, i, i]);
    }
    let start = prefix as i64;
    let (gt, gh, gw) = (grid_thw[0], grid_thw[1] / merge, grid_thw[2] / merge);
    for t in 0..gt {
        for y in 0..gh {
            for x in 0..gw {
                pos.push([start + t as i64, start + y as i64, start + x as i64]);
            }
        }
    }
    let next = start + gh.max(gw) as i64;
    for i in 0..suffix {
        let p = next + i as i64;
        pos.push([p, p, p]);
    }
    let max = pos
        .iter()
        .flat_map(|p| p.iter())
        .copied()
        .max()
        .unwrap_or(-1);
    let delta = max + 1 - pos.len() as i64;
    (pos, delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_half_to_even_like_python() {
        // 42 / 28 = 1.5 -> 2; 70 / 28 = 2.5 -> 2.
        assert_eq!(smart_resize(42, 70, 28, 1, 1 << 30).unwrap(), (56, 56));
    }

    #[test]
    fn smart_resize_keeps_within_max_pixels() {
        let (h, w) = smart_resize(1024, 1024, 28, 3136, 12_845_056).unwrap();
        assert_eq!((h, w), (1036, 1036));
        let (h, w) = smart_resize(1024, 1024, 28, 3136, 28 * 28 * 256).unwrap();
        assert!(
            h * w <= 28 * 28 * 256 && h % 28 == 0 && w % 28 == 0,
            "{h}x{w}"
        );
    }

    #[test]
    fn resizing_to_the_same_size_is_the_identity() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        assert_eq!(resize_bicubic(&img, 5, 4), img);
    }

    #[test]
    fn a_flat_image_stays_flat_after_resizing() {
        let img = RgbImage::from_pixel(90, 60, image::Rgb([200, 10, 77]));
        let out = resize_bicubic(&img, 84, 56);
        assert!(out.pixels().all(|p| p.0 == [200, 10, 77]));
    }

    #[test]
    fn rope_positions_jump_past_the_image_by_its_longest_side() {
        let (pos, delta) = rope_positions(2, [1, 4, 6], 2, 2);
        assert_eq!(pos.len(), 2 + 6 + 2);
        assert_eq!(pos[2], [2, 2, 2]);
        assert_eq!(pos[7], [2, 3, 4]);
        assert_eq!(pos[8], [5, 5, 5]);
        assert_eq!(delta, 7 - 10);
    }
}
