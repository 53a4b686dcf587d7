//! `tt-scale bench --model ops`: the denoisers' hot operations one at a time, at the shapes the
//! real models run them for the image size and batch asked, each as the fused kernel (every
//! attention block tile, see [`AttentionTile`]) and as the candle composition the models fall
//! back to, with the arithmetic rate (TFLOP/s) or memory rate (GB/s) of each. It shows where a
//! denoiser step's time goes and what each kernel buys; a step benchmark only gives the sum.
//!
//! On the CPU only the compositions run: the fused ops' CPU implementations are references, not
//! what the models use there.

use candle_core::{DType, Device, Tensor};

use super::{time_steps, BenchOptions, BenchReport};
use crate::models::qwen2_5_vl::text;
use crate::ops::{self, fused, AttentionTile};
use crate::pipelines::PipelineError;

/// Flux.1-dev's text tokens (T5 sequence length).
const FLUX_TEXT_TOKENS: usize = 512;

/// One attention of a model: batch rows (classifier-free guidance counted), heads, tokens, head
/// size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Which model's attention (`flux`, `sdxl`, `pixart-sigma`, `sd15`).
    pub model: &'static str,
    /// Batch rows.
    pub batch: usize,
    /// Attention heads.
    pub heads: usize,
    /// Query and key tokens (self-attention).
    pub tokens: usize,
    /// Head size.
    pub head_dim: usize,
}

impl AttentionShape {
    /// Floating-point operations of one attention: two products of 2·L·L·D each per head.
    pub fn flops(&self) -> f64 {
        4.0 * (self.batch * self.heads) as f64
            * self.tokens as f64
            * self.tokens as f64
            * self.head_dim as f64
    }
}

/// The largest self-attention of each model for `height` x `width` images and `batch` images
/// (doubled where the model runs guidance as a batch): Flux's joint image+text attention, the
/// first attention level of the SDXL and SD 1.5 UNets, PixArt-Sigma's self-attention. SD 1.5 is
/// taken at half the size (its native 512x512 for 1024x1024), as the step benchmarks run it.
pub fn attention_shapes(height: usize, width: usize, batch: usize) -> Vec<AttentionShape> {
    let b = batch.max(1);
    let tokens16 = (height / 16) * (width / 16);
    vec![
        AttentionShape {
            model: "flux",
            batch: b,
            heads: 24,
            tokens: tokens16 + FLUX_TEXT_TOKENS,
            head_dim: 128,
        },
        AttentionShape {
            model: "sdxl",
            batch: 2 * b,
            heads: 10,
            tokens: tokens16,
            head_dim: 64,
        },
        AttentionShape {
            model: "pixart-sigma",
            batch: 2 * b,
            heads: 16,
            tokens: tokens16,
            head_dim: 72,
        },
        AttentionShape {
            model: "sd15",
            batch: 2 * b,
            heads: 8,
            tokens: tokens16,
            head_dim: 40,
        },
    ]
}

/// Text tokens of the Qwen2.5-VL grading chat around the image (the rubric before it, the
/// prompt after it), as `tt-scale bench --model qwen` counts them.
const QWEN_TEXT_TOKENS: usize = 520 + 40;

/// Qwen2.5-VL-7B's language-model prefill for one `height` x `width` image per batch row: causal
/// attention over the chat (image tokens: one per 28x28 pixels, each side rounded), 28 query
/// heads on 4 key/value heads of size 128.
pub fn qwen_prefill_shape(height: usize, width: usize, batch: usize) -> AttentionShape {
    let side = |n: usize| ((n as f64 / 28.0).round() as usize).max(1);
    AttentionShape {
        model: "qwen-prefill",
        batch: batch.max(1),
        heads: 28,
        tokens: side(height) * side(width) + QWEN_TEXT_TOKENS,
        head_dim: 128,
    }
}

/// Key/value heads of Qwen2.5-VL-7B's language model.
const QWEN_KV_HEADS: usize = 4;

/// One of Flux's linear layers over all of a single block's tokens: `inputs` → `outputs`, with
/// GELU fused where the block applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearShape {
    /// Which layer (`qkv`, `mlp-in+gelu`, `out`).
    pub name: &'static str,
    /// Rows of the product (batch x tokens).
    pub rows: usize,
    /// Input features.
    pub inputs: usize,
    /// Output features.
    pub outputs: usize,
    /// GELU (tanh) after the bias.
    pub gelu: bool,
}

impl LinearShape {
    /// Floating-point operations: 2·rows·inputs·outputs.
    pub fn flops(&self) -> f64 {
        2.0 * self.rows as f64 * self.inputs as f64 * self.outputs as f64
    }
}

/// The linear layers of a Flux single block (hidden 3072, MLP 12288) for `tokens` tokens of
/// `batch` images: the q/k/v projection, the MLP input with GELU (one `linear1` split in two
/// products), and `linear2` over attention output and MLP together.
pub fn flux_linear_shapes(tokens: usize, batch: usize) -> Vec<LinearShape> {
    let rows = tokens * batch.max(1);
    vec![
        LinearShape {
            name: "qkv",
            rows,
            inputs: 3072,
            outputs: 3 * 3072,
            gelu: false,
        },
        LinearShape {
            name: "mlp-in+gelu",
            rows,
            inputs: 3072,
            outputs: 12288,
            gelu: true,
        },
        LinearShape {
            name: "out",
            rows,
            inputs: 3072 + 12288,
            outputs: 3072,
            gelu: false,
        },
    ]
}

/// Times the operations (see the module documentation). Height and width must be positive
/// multiples of 16.
pub fn bench_ops(opts: &BenchOptions) -> Result<Vec<BenchReport>, PipelineError> {
    if opts.height % 16 != 0 || opts.width % 16 != 0 || opts.height == 0 || opts.width == 0 {
        return Err(PipelineError::InvalidArgument(format!(
            "bench height/width {}x{} must be positive multiples of 16 for the ops benchmark",
            opts.height, opts.width
        )));
    }
    let dev = &opts.device;
    let dtype = opts.dtype;
    let cuda = dev.is_cuda();
    let b = opts.batch.max(1);
    let mut reports = Vec::new();

    for shape in attention_shapes(opts.height, opts.width, b) {
        let (q, k, v) = attention_inputs(&shape, dtype, dev)?;
        let scale = 1.0 / (shape.head_dim as f64).sqrt();
        let details = format!(
            "{} rows x {} heads, {} tokens, head size {}, {dtype:?}",
            shape.batch, shape.heads, shape.tokens, shape.head_dim
        );
        let tiles = time_attention_tiles(shape.model, &q, &k, &v, cuda, opts, &details, || {
            ops::attention(&q, &k, &v, scale, None).map(drop)
        })?;
        reports.extend(
            tiles
                .into_iter()
                .map(|r| with_rate(r, Some(shape.flops()), None)),
        );
        let name = format!("attention {} candle", shape.model);
        let r = time_steps(&name, opts, 0, details.clone(), || {
            attention_composition(&q, &k, &v, scale).map(drop)
        })?;
        reports.push(with_rate(r, Some(shape.flops()), None));
    }

    // The verifier's prefill: causal (half the products of a full attention), grouped heads
    // read in place by the kernel, against the model's composite (each key/value head's query
    // heads as one product, an additive mask, the softmax in f32).
    let shape = qwen_prefill_shape(opts.height, opts.width, b);
    let (bq, l, d) = (shape.batch, shape.tokens, shape.head_dim);
    let q = randn(&[bq, shape.heads, l, d], dtype, dev)?;
    let k = randn(&[bq, QWEN_KV_HEADS, l, d], dtype, dev)?;
    let v = randn(&[bq, QWEN_KV_HEADS, l, d], dtype, dev)?;
    let scale = 1.0 / (d as f64).sqrt();
    let causal = ops::KeyMask {
        causal: true,
        ..ops::KeyMask::default()
    };
    let flops = shape.flops() / 2.0;
    let details = format!(
        "{bq} rows x {} heads on {QWEN_KV_HEADS} key/value heads, {l} tokens, causal, head size \
         {d}, {dtype:?}",
        shape.heads
    );
    let tiles = time_attention_tiles(shape.model, &q, &k, &v, cuda, opts, &details, || {
        ops::attention_masked(&q, &k, &v, scale, &causal).map(drop)
    })?;
    reports.extend(tiles.into_iter().map(|r| with_rate(r, Some(flops), None)));
    let mask: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (1, 1, l, l), dev)?;
    let name = format!("attention {} candle", shape.model);
    let r = time_steps(&name, opts, 0, details, || {
        text::grouped_attention(&q, &k, &v, scale, Some(&mask)).map(drop)
    })?;
    reports.push(with_rate(r, Some(flops), None));

    let flux_tokens = (opts.height / 16) * (opts.width / 16) + FLUX_TEXT_TOKENS;
    for shape in flux_linear_shapes(flux_tokens, b) {
        let x = randn(&[b, flux_tokens, shape.inputs], dtype, dev)?;
        let w = (randn(&[shape.outputs, shape.inputs], dtype, dev)? * 0.02)?;
        let bias = randn(&[shape.outputs], dtype, dev)?;
        let layer = ops::Linear::new(candle_nn::Linear::new(w, Some(bias)));
        let details = format!(
            "{} rows, {} -> {}{}, {dtype:?}",
            shape.rows,
            shape.inputs,
            shape.outputs,
            if shape.gelu { ", GELU" } else { "" }
        );
        let run = |layer: &ops::Linear| -> candle_core::Result<()> {
            if shape.gelu {
                layer.forward_gelu(&x).map(drop)
            } else {
                candle_core::Module::forward(layer, &x).map(drop)
            }
        };
        for fused_path in [true, false].into_iter().filter(|&f| cuda || !f) {
            let what = if fused_path { "cublaslt" } else { "candle" };
            let name = format!("linear flux {} {what}", shape.name);
            let r = ops::with_fused(fused_path, || {
                time_steps(&name, opts, 0, details.clone(), || run(&layer))
            })?;
            reports.push(with_rate(r, Some(shape.flops()), None));
        }
    }

    // Flux's single-block linear2: the concatenation of attention output and MLP activations
    // then one product, against two products into one output (ops::fused::linear_sum).
    if cuda && ops::fused_on(&randn(&[1], dtype, dev)?) {
        let attn = randn(&[b, flux_tokens, 3072], dtype, dev)?;
        let mlp = randn(&[b, flux_tokens, 12288], dtype, dev)?;
        let w = (randn(&[3072, 3072 + 12288], dtype, dev)? * 0.02)?;
        let bias = randn(&[3072], dtype, dev)?;
        let (w1, w2) = (w.narrow(1, 0, 3072)?, w.narrow(1, 3072, 12288)?);
        let flops = 2.0 * (b * flux_tokens) as f64 * (3072.0 + 12288.0) * 3072.0;
        let details = format!("{} rows, 3072 + 12288 -> 3072, {dtype:?}", b * flux_tokens);
        let r = time_steps(
            "linear2 flux cat+cublaslt",
            opts,
            0,
            details.clone(),
            || {
                let x = Tensor::cat(&[&attn, &mlp], 2)?;
                fused::linear(&x, &w, Some(&bias), None).map(drop)
            },
        )?;
        reports.push(with_rate(r, Some(flops), None));
        let r = time_steps("linear2 flux sum cublaslt", opts, 0, details, || {
            fused::linear_sum(&attn, &w1, &mlp, &w2, Some(&bias)).map(drop)
        })?;
        reports.push(with_rate(r, Some(flops), None));
    }

    // Flux's gated residual x + gate · y over a block's tokens.
    let x = randn(&[b, flux_tokens, 3072], dtype, dev)?;
    let y = randn(&[b, flux_tokens, 3072], dtype, dev)?;
    let gate = (randn(&[b, 1, 3072], dtype, dev)? * 0.1)?;
    let bytes = 3.0 * (x.elem_count() * dtype.size_in_bytes()) as f64; // read x, y, write out
    let details = format!("{b} x {flux_tokens} x 3072, {dtype:?}");
    if cuda && ops::fused_on(&x) {
        let r = time_steps(
            "gated_residual flux fused",
            opts,
            0,
            details.clone(),
            || fused::gated_residual(&x, &gate, &y).map(drop),
        )?;
        reports.push(with_rate(r, None, Some(bytes)));
    }
    let r = time_steps("gated_residual flux candle", opts, 0, details, || {
        (&x + gate.broadcast_mul(&y)?).map(drop)
    })?;
    reports.push(with_rate(r, None, Some(bytes)));

    // Flux's adaLN: layer norm of a block's tokens with shift and scale.
    let x = randn(&[b, flux_tokens, 3072], dtype, dev)?;
    let shift = (randn(&[b, 1, 3072], dtype, dev)? * 0.1)?;
    let scale = (randn(&[b, 1, 3072], dtype, dev)? * 0.1)?;
    let ones = Tensor::ones(3072, dtype, dev)?;
    let zeros = Tensor::zeros(3072, dtype, dev)?;
    let bytes = 2.0 * (x.elem_count() * dtype.size_in_bytes()) as f64; // read x, write out
    let details = format!("{b} x {flux_tokens} x 3072, {dtype:?}");
    if cuda && ops::fused_on(&x) {
        let r = time_steps(
            "layer_norm_modulate flux fused",
            opts,
            0,
            details.clone(),
            || {
                fused::layer_norm_modulate(&x, None, None, Some(&shift), Some(&scale), 1e-6)
                    .map(drop)
            },
        )?;
        reports.push(with_rate(r, None, Some(bytes)));
    }
    let r = time_steps("layer_norm_modulate flux candle", opts, 0, details, || {
        let n = candle_nn::ops::layer_norm(&x, &ones, &zeros, 1e-6)?;
        n.broadcast_mul(&(&scale + 1.0)?)?
            .broadcast_add(&shift)
            .map(drop)
    })?;
    reports.push(with_rate(r, None, Some(bytes)));

    // The UNets' GroupNorm + SiLU at SDXL's largest resolution (320 channels, 32 groups).
    let (gh, gw) = (opts.height / 8, opts.width / 8);
    let x = randn(&[2 * b, 320, gh, gw], dtype, dev)?;
    let (vb, _) = super::RandomWeights::var_builder(dtype, dev);
    let gn = ops::group_norm(32, 320, 1e-5, vb.pp("norm"))?;
    let bytes = 2.0 * (x.elem_count() * dtype.size_in_bytes()) as f64;
    let details = format!("{} x 320 x {gh} x {gw}, 32 groups, {dtype:?}", 2 * b);
    for fused_path in [true, false].into_iter().filter(|&f| cuda || !f) {
        let what = if fused_path { "fused" } else { "candle" };
        let name = format!("group_norm+silu sdxl {what}");
        let r = ops::with_fused(fused_path, || {
            time_steps(&name, opts, 0, details.clone(), || {
                gn.forward_silu(&x).map(drop)
            })
        })?;
        reports.push(with_rate(r, None, Some(bytes)));
    }

    // The UNets' 3x3 convolution at SDXL's largest level (320 -> 320 channels): cuDNN (loaded at
    // run time; the row is missing where it is not found) against candle's conv2d, which on CUDA
    // is an unfold into a column matrix nine times the input, one GEMM and a transposing copy.
    let conv_cfg = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = ops::conv2d(320, 320, 3, conv_cfg, vb.pp("conv"))?;
    let flops = 2.0 * (2 * b * gh * gw) as f64 * 320.0 * 320.0 * 9.0;
    let details = format!("{} x 320 x {gh} x {gw} -> 320, 3x3, {dtype:?}", 2 * b);
    let with_cudnn = cuda && ops::conv_cudnn_ok(&x);
    for fused_path in [true, false].into_iter().filter(|&f| with_cudnn || !f) {
        let what = if fused_path { "cudnn" } else { "candle" };
        let name = format!("conv2d sdxl 3x3 {what}");
        let r = ops::with_fused(fused_path, || {
            time_steps(&name, opts, 0, details.clone(), || {
                candle_core::Module::forward(&conv, &x).map(drop)
            })
        })?;
        reports.push(with_rate(r, Some(flops), None));
    }
    Ok(reports)
}

/// q, k, v as the models hand them to attention: views (B, H, L, D) of token-major (B, L, H, D)
/// projections (Flux: of one (3, B, L, H, D) tensor).
fn attention_inputs(
    s: &AttentionShape,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let qkv = randn(&[3, s.batch, s.tokens, s.heads, s.head_dim], dtype, dev)?;
    let get = |i: usize| qkv.get(i)?.transpose(1, 2);
    Ok((get(0)?, get(1)?, get(2)?))
}

/// The unfused attention the models run without the kernel: scaled scores, softmax, product.
fn attention_composition(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let q = (q * scale)?.contiguous()?;
    let k = k.contiguous()?;
    let v = v.contiguous()?;
    let w = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
    w.matmul(&v)
}

/// Times `step` once per fused attention tile that runs on `q` (none off CUDA or where the
/// kernel does not take these inputs), each report named `attention <model> <tile>`.
#[allow(clippy::too_many_arguments)]
fn time_attention_tiles(
    model: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cuda: bool,
    opts: &BenchOptions,
    details: &str,
    mut step: impl FnMut() -> candle_core::Result<()>,
) -> Result<Vec<BenchReport>, PipelineError> {
    let fused_ok = cuda && ops::attention_fused_ok(q, k, v);
    let mut reports = Vec::new();
    for tile in AttentionTile::ALL
        .into_iter()
        .filter(|t| fused_ok && t.runs_on(q))
    {
        let name = format!("attention {model} {}", tile.name());
        let r = ops::with_attention_tile(tile, || {
            time_steps(&name, opts, 0, details.to_string(), &mut step)
        })?;
        reports.push(r);
    }
    Ok(reports)
}

fn randn(shape: &[usize], dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dtype)
}

/// Adds the rates of `flops` floating-point operations or `bytes` moved per step.
fn with_rate(mut r: BenchReport, flops: Option<f64>, bytes: Option<f64>) -> BenchReport {
    let secs = r.median_ms * 1e-3;
    if secs > 0.0 {
        r.tflop_s = flops.map(|f| f / secs / 1e12);
        r.gb_s = bytes.map(|b| b / secs / 1e9);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_follow_the_models_at_1024() {
        let a = attention_shapes(1024, 1024, 1);
        assert_eq!(a[0].tokens, 4096 + 512);
        // Flux at 1024x1024: 24 heads x 4608^2 x 128 x 4 = 261 GFLOP per attention, 57 of
        // them a step (the 14.9 TFLOP of issue 7).
        assert!(
            (a[0].flops() * 57.0 / 1e12 - 14.9).abs() < 0.1,
            "{}",
            a[0].flops()
        );
        assert_eq!((a[1].batch, a[1].heads, a[1].tokens), (2, 10, 4096));
        assert_eq!(a[3].tokens, 64 * 64);
        // Qwen's prefill at 1024x1024: 37 x 37 image tokens and 560 of text.
        let qw = qwen_prefill_shape(1024, 1024, 1);
        assert_eq!((qw.tokens, qw.heads, qw.head_dim), (37 * 37 + 560, 28, 128));
        let l = flux_linear_shapes(4608, 2);
        assert_eq!(l[0].rows, 9216);
        assert_eq!(l[2].inputs, 15360);
        assert_eq!(l[1].flops(), 2.0 * 9216.0 * 3072.0 * 12288.0);
    }
}
