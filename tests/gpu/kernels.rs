//! The project's CUDA kernels (kernels/*.cu) and cuBLASLt linear against their CPU
//! implementations (`tt_scale::ops::fused` on the CPU, which tests/unit/ops.rs checks against candle's
//! compositions), and the fused model paths against the unfused ones on the same GPU.
//!
//! Random inputs, odd sizes, strided views, every head size the attention kernel has. Bounds are
//! relative to the largest magnitude of the reference: float32 1e-4 (the kernels accumulate in
//! float32, the CPU in float64), bf16 2e-2 and f16 4e-3 (16-bit roundings of inputs,
//! probabilities and outputs). Model paths (random weights, bf16): fused vs unfused within 5e-2.
//!
//! Compiled only with `--features cuda`; needs a GPU to run (`bench/gpu-check.sh`).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, IndexOp, Tensor, D};
use tt_scale::ops::{self, fused, Activation, AttentionTile};

use crate::tensors::{randn, rel_err, ConvCase};

fn cuda() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU (device 0)")
}

fn bound(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::BF16 => 2e-2,
        _ => 4e-3,
    }
}

fn on(t: &Tensor, dev: &Device) -> Tensor {
    t.to_device(dev).unwrap()
}

#[test]
fn fused_attention_matches_the_cpu_for_every_head_size_dtype_layout_and_mask() {
    let dev = cuda();
    let (b, h) = (2, 3);
    for (i, &d) in ops::ATTENTION_HEAD_DIMS.iter().enumerate() {
        for &(lq, lk) in &[(1, 1), (77, 77), (130, 200), (65, 333)] {
            for dtype in [DType::BF16, DType::F16] {
                let seed = 1000 * i as u64 + lq as u64;
                let q = randn(seed, &[b, h, lq, d]).to_dtype(dtype).unwrap();
                let kv = randn(seed + 1, &[b, lk, 3, h, d]).to_dtype(dtype).unwrap();
                let k = kv.i((.., .., 1)).unwrap().transpose(1, 2).unwrap();
                let v = kv.i((.., .., 2)).unwrap().transpose(1, 2).unwrap();
                let scale = 1.0 / (d as f64).sqrt();
                for lens in [None, Some(vec![(lk as u32).min(5), lk as u32])] {
                    let want = ops::attention(&q, &k, &v, scale, lens.as_deref()).unwrap();
                    let kv_gpu = on(&kv, &dev);
                    let kg = kv_gpu.i((.., .., 1)).unwrap().transpose(1, 2).unwrap();
                    let vg = kv_gpu.i((.., .., 2)).unwrap().transpose(1, 2).unwrap();
                    let qg = on(&q, &dev);
                    assert!(ops::attention_fused_ok(&qg, &kg, &vg));
                    // Every block tile the kernel has for d: within the bound of the CPU, and
                    // bit-identical to the first tile of its family (mma.sync, wgmma on
                    // Hopper): each row takes the same operations in each. Whether the two
                    // families agree bit for bit is printed.
                    let mut firsts: Vec<(AttentionTile, Vec<u32>)> = Vec::new();
                    let mut outputs: Vec<(AttentionTile, Vec<u32>)> = Vec::new();
                    for tile in AttentionTile::ALL.into_iter().filter(|t| t.runs_on(&qg)) {
                        let ours = ops::with_attention_tile(tile, || {
                            ops::attention(&qg, &kg, &vg, scale, lens.as_deref()).unwrap()
                        });
                        let err = rel_err(&ours, &want);
                        assert!(
                            err <= bound(dtype),
                            "attention {} {dtype:?} d={d} lq={lq} lk={lk} lens={lens:?}: {err}",
                            tile.name()
                        );
                        let bits = f32_bits(&ours);
                        match firsts
                            .iter()
                            .find(|(t, _)| t.uses_wgmma() == tile.uses_wgmma())
                        {
                            None => firsts.push((tile, bits.clone())),
                            Some((t0, b0)) => assert!(
                                *b0 == bits,
                                "attention {} and {} differ: {dtype:?} d={d} lq={lq} lk={lk}",
                                t0.name(),
                                tile.name()
                            ),
                        }
                        if let [(t0, b0), (t1, b1)] = &firsts[..] {
                            if *t1 == tile {
                                println!(
                                    "attention {} on cuda {dtype:?} d={d} lq={lq} lk={lk}: error \
                                     {err:.2e}, bit-identical to {}: {}",
                                    t1.name(),
                                    t0.name(),
                                    b0 == b1
                                );
                            }
                        }
                        outputs.push((tile, bits));
                    }
                    // Without a tile asked for, the default (tuned among the identical tiles)
                    // gives the default tile's bits.
                    let default = tt_scale::ops::tuning::choose_tile(&qg);
                    let auto = ops::attention(&qg, &kg, &vg, scale, lens.as_deref()).unwrap();
                    let want_bits = &outputs.iter().find(|(t, _)| *t == default).unwrap().1;
                    assert!(
                        f32_bits(&auto) == *want_bits,
                        "tuned attention differs from {}: {dtype:?} d={d} lq={lq} lk={lk}",
                        default.name()
                    );
                }
            }
        }
    }
}

/// The values of `t` as float32 (exact for 16-bit floats), for bitwise comparisons.
fn f32_bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn masked_grouped_attention_matches_the_cpu_on_every_tile() {
    // The language model's prefill after a cached prefix of 9 keys (rows left-padded by 0 and
    // 70: holes, causal) and a decode step, 28 query heads on 4 key/value heads (Qwen2.5-VL-7B);
    // then causal self-attention with no prefix (the first tiles of the padded row see nothing).
    let dev = cuda();
    let (b, h, hk, d) = (2, 28, 4, 128);
    for &(lq, lk, cached) in &[(200usize, 209usize, 9u32), (1, 300, 9), (150, 150, 0)] {
        for dtype in [DType::BF16, DType::F16] {
            let q = randn(lq as u64, &[b, h, lq, d]).to_dtype(dtype).unwrap();
            let k = randn(7, &[b, hk, lk, d]).to_dtype(dtype).unwrap();
            let v = randn(8, &[b, hk, lk, d]).to_dtype(dtype).unwrap();
            let mask = ops::KeyMask {
                lens: Some(vec![lk as u32, lk as u32 - 3]),
                holes: Some(vec![(cached, cached), (cached, cached + 70)]),
                causal: true,
            };
            let want = ops::attention_masked(&q, &k, &v, 0.088, &mask).unwrap();
            let (qg, kg, vg) = (on(&q, &dev), on(&k, &dev), on(&v, &dev));
            assert!(ops::attention_fused_ok(&qg, &kg, &vg));
            for tile in AttentionTile::ALL.into_iter().filter(|t| t.runs_on(&qg)) {
                let ours = ops::with_attention_tile(tile, || {
                    ops::attention_masked(&qg, &kg, &vg, 0.088, &mask).unwrap()
                });
                let err = rel_err(&ours, &want);
                assert!(
                    err <= bound(dtype),
                    "masked attention {} {dtype:?} lq={lq} lk={lk}: {err}",
                    tile.name()
                );
            }
        }
    }
}

#[test]
fn fused_attention_survives_large_logits_and_empty_key_sets() {
    let dev = cuda();
    let q = (randn(5, &[2, 2, 100, 64]) * 8.0)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let k = (randn(6, &[2, 2, 300, 64]) * 8.0)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let want = ops::attention(&q, &k, &k, 0.125, Some(&[0, 300])).unwrap();
    let ours = ops::attention(
        &on(&q, &dev),
        &on(&k, &dev),
        &on(&k, &dev),
        0.125,
        Some(&[0, 300]),
    )
    .unwrap();
    let err = rel_err(&ours, &want);
    assert!(err <= 2e-2, "large logits: {err}");
    let empty = ours.i(0).unwrap().to_dtype(DType::F32).unwrap();
    let empty = empty.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(empty.iter().all(|&x| x == 0.0));
}

#[test]
fn fused_layer_norm_modulate_matches_the_cpu() {
    let dev = cuda();
    for &(b, l, c) in &[(1, 1, 1), (2, 77, 31), (2, 300, 3072), (1, 4096, 1152)] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = (randn(c as u64, &[b, l, c]) * 3.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = randn(2, &[c]).to_dtype(dtype).unwrap();
            let bias = randn(3, &[c]).to_dtype(dtype).unwrap();
            let modv = randn(4, &[b, 1, 6 * c]).to_dtype(dtype).unwrap();
            let chunks = modv.chunk(6, D::Minus1).unwrap();
            for affine in [false, true] {
                let (wo, bo) = if affine {
                    (Some(&w), Some(&bias))
                } else {
                    (None, None)
                };
                let want = fused::layer_norm_modulate(
                    &x,
                    wo,
                    bo,
                    Some(&chunks[0]),
                    Some(&chunks[1]),
                    1e-6,
                )
                .unwrap();
                let g = |t: Option<&Tensor>| t.map(|t| on(t, &dev));
                let gm = on(&modv, &dev).chunk(6, D::Minus1).unwrap();
                let ours = fused::layer_norm_modulate(
                    &on(&x, &dev),
                    g(wo).as_ref(),
                    g(bo).as_ref(),
                    Some(&gm[0]),
                    Some(&gm[1]),
                    1e-6,
                )
                .unwrap();
                let err = rel_err(&ours, &want);
                assert!(
                    err <= bound(dtype),
                    "ln-mod {dtype:?} ({b},{l},{c}) affine={affine}: {err}"
                );
            }
        }
    }
}

#[test]
fn fused_qk_norm_rope_matches_the_cpu() {
    let dev = cuda();
    let (b, l, heads) = (2, 37, 3);
    for d in [16, 128] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (extra, offset) in [(0, 0), (24, 5)] {
                let width = 3 * heads * d + extra;
                let qkv = randn(d as u64, &[b, l, width]).to_dtype(dtype).unwrap();
                let qw = randn(7, &[d])
                    .affine(0.5, 1.0)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let kw = randn(8, &[d])
                    .affine(0.5, 1.0)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let angles = (randn(9, &[offset + l, d / 2]) * 3.0).unwrap();
                let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
                let want =
                    fused::qk_norm_rope(&qkv, heads, &qw, &kw, &cos, &sin, offset, 1e-6).unwrap();
                let ours = fused::qk_norm_rope(
                    &on(&qkv, &dev),
                    heads,
                    &on(&qw, &dev),
                    &on(&kw, &dev),
                    &on(&cos, &dev),
                    &on(&sin, &dev),
                    offset,
                    1e-6,
                )
                .unwrap();
                let err = rel_err(&ours, &want);
                assert!(err <= bound(dtype), "qk-norm-rope {dtype:?} d={d}: {err}");
            }
        }
    }
}

#[test]
fn fused_joint_qk_norm_rope_matches_the_cpu() {
    // Flux's double block: 11 text rows then 29 image rows (a narrow view of a wider projection),
    // each stream with its own norm weights, into one joint (3, B, L, H, D).
    let dev = cuda();
    let (b, heads, d) = (2, 3, 128);
    let hd = heads * d;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let txt = randn(71, &[b, 11, 3 * hd]).to_dtype(dtype).unwrap();
        let img = randn(72, &[b, 29, 3 * hd + 64])
            .narrow(2, 0, 3 * hd)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let w = |seed| {
            randn(seed, &[d])
                .affine(0.5, 1.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let (tq, tk, iq, ik) = (w(73), w(74), w(75), w(76));
        let angles = (randn(77, &[40, d / 2]) * 3.0).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let run = |dev: &Device| {
            let g = |t: &Tensor| on(t, dev);
            fused::qk_norm_rope_joint(
                (&g(&txt), &g(&tq), &g(&tk)),
                (&g(&img), &g(&iq), &g(&ik)),
                heads,
                (&g(&cos), &g(&sin)),
                0,
                1e-6,
            )
            .unwrap()
        };
        let err = rel_err(&run(&dev), &run(&Device::Cpu));
        assert!(err <= bound(dtype), "joint qk-norm-rope {dtype:?}: {err}");
    }
}

#[test]
fn broadcast_modulations_match_the_cpu() {
    // Flux's cached modulations reach the kernels as (B, 1, C) views of one row (batch stride
    // 0): layer norm + modulation and the gated residual read that row for every batch row.
    let dev = cuda();
    let (b, l, c) = (3, 37, 3072);
    for dtype in [DType::BF16, DType::F16] {
        let x = randn(91, &[b, l, c]).to_dtype(dtype).unwrap();
        let y = randn(92, &[b, l, c]).to_dtype(dtype).unwrap();
        let one = |seed| randn(seed, &[1, 1, c]).to_dtype(dtype).unwrap();
        let (shift, scale, gate) = (one(93), one(94), one(95));
        let wide = |t: &Tensor, d: &Device| on(t, d).broadcast_as((b, 1, c)).unwrap();
        let ln = |d: &Device| {
            let (s, k) = (wide(&shift, d), wide(&scale, d));
            fused::layer_norm_modulate(&on(&x, d), None, None, Some(&s), Some(&k), 1e-6).unwrap()
        };
        let err = rel_err(&ln(&dev), &ln(&Device::Cpu));
        assert!(
            err <= bound(dtype),
            "layer norm, broadcast modulation {dtype:?}: {err}"
        );
        let gr =
            |d: &Device| fused::gated_residual(&on(&x, d), &wide(&gate, d), &on(&y, d)).unwrap();
        let err = rel_err(&gr(&dev), &gr(&Device::Cpu));
        assert!(
            err <= bound(dtype),
            "gated residual, broadcast gate {dtype:?}: {err}"
        );
    }
}

#[test]
fn fused_attention_over_windows_of_a_head_major_tensor_matches_the_cpu() {
    // Qwen2.5-VL's window attention: q/k/v (heads, seq, D 80) cut into windows of 64 tokens
    // and viewed as (windows, heads, 64, 80): the batch stride (64·80) is smaller than the head
    // stride (seq·80).
    let dev = cuda();
    let (heads, count, n, d) = (16, 5, 64, 80);
    for dtype in [DType::BF16, DType::F16] {
        let make = |seed| {
            randn(seed, &[heads, count * n, d])
                .to_dtype(dtype)
                .unwrap()
                .reshape((heads, count, n, d))
                .unwrap()
                .transpose(0, 1)
                .unwrap()
        };
        let (q, k, v) = (make(101), make(102), make(103));
        let want = ops::attention(&q, &k, &v, 0.11, None).unwrap();
        let (gq, gk, gv) = (on(&q, &dev), on(&k, &dev), on(&v, &dev));
        let gq = gq
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(0, 1)
            .unwrap();
        let gk = gk
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(0, 1)
            .unwrap();
        let gv = gv
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(0, 1)
            .unwrap();
        assert!(ops::attention_fused_ok(&gq, &gk, &gv));
        let ours = ops::attention(&gq, &gk, &gv, 0.11, None).unwrap();
        let err = rel_err(&ours, &want);
        assert!(err <= bound(dtype), "window attention {dtype:?}: {err}");
    }
}

#[test]
fn fused_group_norm_matches_the_cpu() {
    let dev = cuda();
    // Odd sizes (one element per thread, one chunk), and groups split over 8 and 16 blocks with
    // 16-byte loads (SDXL's 64x64 level, a VAE level).
    for &(n, c, groups, h, w) in &[
        (1, 4, 2, 1, 1),
        (2, 320, 32, 17, 19),
        (2, 1280, 32, 32, 32),
        (2, 320, 32, 64, 64),
        (1, 128, 32, 256, 192),
    ] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = randn(c as u64, &[n, c, h, w])
                .affine(2.0, 1.5)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let wt = randn(2, &[c]).to_dtype(dtype).unwrap();
            let bt = randn(3, &[c]).to_dtype(dtype).unwrap();
            for silu in [false, true] {
                let want = fused::group_norm(&x, groups, Some(&wt), Some(&bt), 1e-5, silu).unwrap();
                let ours = fused::group_norm(
                    &on(&x, &dev),
                    groups,
                    Some(&on(&wt, &dev)),
                    Some(&on(&bt, &dev)),
                    1e-5,
                    silu,
                )
                .unwrap();
                let err = rel_err(&ours, &want);
                assert!(
                    err <= bound(dtype),
                    "group norm {dtype:?} ({n},{c},{h},{w})/{groups} silu={silu}: {err}"
                );
            }
        }
    }
}

#[test]
fn fused_gelu_and_geglu_match_the_cpu() {
    let dev = cuda();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let x = (randn(21, &[3, 701, 74]) * 3.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let xg = on(&x, &dev);
        let err = rel_err(
            &fused::gelu_tanh(&xg).unwrap(),
            &fused::gelu_tanh(&x).unwrap(),
        );
        assert!(err <= bound(dtype), "gelu {dtype:?}: {err}");
        let err = rel_err(&fused::geglu(&xg).unwrap(), &fused::geglu(&x).unwrap());
        assert!(err <= bound(dtype), "geglu {dtype:?}: {err}");
    }
}

#[test]
fn cublaslt_linear_matches_the_cpu_with_bias_and_gelu_epilogues() {
    let dev = cuda();
    for dtype in [DType::BF16, DType::F16] {
        for &(m, k, n) in &[(1, 8, 8), (77, 320, 640), (333, 1152, 4608)] {
            let x = randn(31, &[1, m, k]).to_dtype(dtype).unwrap();
            let w = (randn(32, &[n, k]) * (1.0 / (k as f64).sqrt()))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let b = randn(33, &[n]).to_dtype(dtype).unwrap();
            for bias in [None, Some(&b)] {
                for act in [None, Some(Activation::GeluTanh)] {
                    let want = fused::linear(&x, &w, bias, act).unwrap();
                    let gb = bias.map(|b| on(b, &dev));
                    let ours =
                        fused::linear(&on(&x, &dev), &on(&w, &dev), gb.as_ref(), act).unwrap();
                    let err = rel_err(&ours, &want);
                    assert!(
                        err <= bound(dtype),
                        "linear {dtype:?} ({m},{k},{n}) bias={} act={act:?}: {err}",
                        bias.is_some()
                    );
                }
            }
        }
    }
}

/// cuDNN's convolution (loaded at run time: these tests need it, as PyTorch's wheels ship it; see
/// bench/README.md) against the CPU reference: the UNets' 3×3 (stride 1 and 2) and 1×1
/// convolutions at real channel counts on small images, odd sizes, dilation and groups; and the
/// models' wrapper takes it (its one-time check against candle's convolution passed).
#[test]
fn cudnn_conv2d_matches_the_cpu_and_serves_the_models() {
    let dev = cuda();
    let cases: [ConvCase; 6] = [
        ([2, 320, 24, 20], 320, 3, 1, 1, 1, 1),
        ([2, 640, 16, 16], 640, 3, 1, 2, 1, 1),
        ([2, 640, 12, 12], 1280, 1, 0, 1, 1, 1),
        ([1, 4, 33, 31], 320, 3, 1, 1, 1, 1),
        ([1, 6, 17, 13], 5, 3, 2, 1, 2, 1),
        ([1, 8, 9, 7], 6, 3, 1, 1, 1, 2),
    ];
    for (i, &(dims, k, kernel, padding, stride, dilation, groups)) in cases.iter().enumerate() {
        let cfg = candle_nn::Conv2dConfig {
            padding,
            stride,
            dilation,
            groups,
            ..Default::default()
        };
        let seed = 700 + 10 * i as u64;
        let fan_in = (dims[1] / groups * kernel * kernel) as f64;
        let x = randn(seed, &dims);
        let w = (randn(seed + 1, &[k, dims[1] / groups, kernel, kernel]) / fan_in.sqrt()).unwrap();
        let b = randn(seed + 2, &[k]);
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let (x, w, b) = (
                x.to_dtype(dtype).unwrap(),
                w.to_dtype(dtype).unwrap(),
                b.to_dtype(dtype).unwrap(),
            );
            let want = fused::conv2d(&x, &w, Some(&b), &cfg).unwrap();
            let ours = fused::conv2d(&on(&x, &dev), &on(&w, &dev), Some(&on(&b, &dev)), &cfg)
                .unwrap_or_else(|e| panic!("cuDNN convolution {dims:?} {dtype:?}: {e}"));
            let err = rel_err(&ours, &want);
            assert!(
                err <= bound(dtype),
                "conv2d {dims:?} -> {k}, {kernel}x{kernel} p{padding} s{stride} d{dilation} \
                 g{groups} {dtype:?}: {err}"
            );
        }
    }
    let x = on(
        &randn(1, &[1, 8, 8, 8]).to_dtype(DType::BF16).unwrap(),
        &dev,
    );
    assert!(
        ops::conv_cudnn_ok(&x),
        "the models' convolution wrapper does not take cuDNN (see the log for why)"
    );
}

#[test]
fn cublaslt_linear_sum_and_strided_weights_match_the_cpu() {
    // Flux's single-block linear2 at 1024x1024 (4608 tokens, 3072 + 12288 inputs, 3072 outputs)
    // scaled down in rows, and a small odd case: the second product accumulates into the first's
    // output, both weights column ranges of one weight (leading dimension K1 + K2).
    let dev = cuda();
    for dtype in [DType::BF16, DType::F16] {
        for &(m, k1, k2, n) in &[(5, 8, 24, 16), (333, 3072, 12288, 3072)] {
            let x1 = randn(41, &[1, m, k1]).to_dtype(dtype).unwrap();
            let x2 = randn(42, &[1, m, k2]).to_dtype(dtype).unwrap();
            let w = (randn(43, &[n, k1 + k2]) * (1.0 / ((k1 + k2) as f64).sqrt()))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let b = randn(44, &[n]).to_dtype(dtype).unwrap();
            let (w1, w2) = (w.narrow(1, 0, k1).unwrap(), w.narrow(1, k1, k2).unwrap());
            let want = fused::linear_sum(&x1, &w1, &x2, &w2, Some(&b)).unwrap();
            let wg = on(&w, &dev);
            let (wg1, wg2) = (wg.narrow(1, 0, k1).unwrap(), wg.narrow(1, k1, k2).unwrap());
            let (xg1, xg2, bg) = (on(&x1, &dev), on(&x2, &dev), on(&b, &dev));
            let ours = fused::linear_sum(&xg1, &wg1, &xg2, &wg2, Some(&bg)).unwrap();
            let err = rel_err(&ours, &want);
            assert!(
                err <= bound(dtype),
                "linear_sum {dtype:?} ({m},{k1}+{k2},{n}): {err}"
            );
            let ours = fused::linear(&xg2, &wg2, None, None).unwrap();
            let want = fused::linear(&x2, &w2, None, None).unwrap();
            let err = rel_err(&ours, &want);
            assert!(
                err <= bound(dtype),
                "strided-weight linear {dtype:?}: {err}"
            );
        }
    }
}

#[test]
fn fused_gated_residual_matches_the_cpu() {
    let dev = cuda();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for &(b, l, c) in &[(1, 1, 8), (2, 333, 72), (2, 4608, 3072)] {
            let x = randn(51, &[b, l, c]).to_dtype(dtype).unwrap();
            let y = (randn(52, &[b, l, c]) * 3.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            // The gate as a chunk of a (B, 1, 3·C) modulation vector.
            let modulation = randn(53, &[b, 1, 3 * c]).to_dtype(dtype).unwrap();
            let gate = modulation.narrow(2, c, c).unwrap();
            let want = fused::gated_residual(&x, &gate, &y).unwrap();
            let gate_gpu = on(&modulation, &dev).narrow(2, c, c).unwrap();
            let ours = fused::gated_residual(&on(&x, &dev), &gate_gpu, &on(&y, &dev)).unwrap();
            let err = rel_err(&ours, &want);
            assert!(
                err <= bound(dtype),
                "gated_residual {dtype:?} ({b},{l},{c}): {err}"
            );
        }
    }
}

/// The Flux transformer at head size 128 (2 heads, one double and two single blocks, random
/// weights, bf16): the fused path agrees with candle's composition on the same GPU.
#[test]
fn flux_fused_path_matches_the_unfused_path_on_the_gpu() {
    use tt_scale::models::flux_transformer::{latent_image_ids, FluxConfig, FluxTransformer, Rope};
    let dev = cuda();
    let mut c = FluxConfig::dev();
    c.hidden_size = 256;
    c.num_heads = 2;
    c.depth = 1;
    c.depth_single_blocks = 2;
    c.context_in_dim = 64;
    c.vec_in_dim = 32;
    let (vb, _) = tt_scale::bench::RandomWeights::var_builder(DType::BF16, &dev);
    let model = FluxTransformer::new(&c, vb).unwrap();
    let (rows, cols, nt) = (12, 10, 17);
    let img = on(&randn(1, &[2, rows * cols, c.in_channels]), &dev);
    let txt = on(&randn(2, &[2, nt, c.context_in_dim]), &dev);
    let pooled = on(&randn(3, &[2, c.vec_in_dim]), &dev);
    let mut ids = vec![[0f32; 3]; nt];
    ids.extend(latent_image_ids(rows, cols));
    let rope = Rope::new(&ids, &c.axes_dim, c.theta, &dev).unwrap();
    let run = |fused_on: bool| {
        ops::with_fused(fused_on, || {
            let vec = model
                .conditioning(&[500.0, 20.0], Some(&[3500.0, 3500.0]), &pooled)
                .unwrap();
            model.forward(&img, &txt, &vec, &rope).unwrap()
        })
    };
    let err = rel_err(&run(true), &run(false));
    assert!(err <= 5e-2, "flux fused vs unfused: {err}");
}

/// PixArt at head size 72 (2 heads, 2 blocks, random weights, bf16) with a padded caption
/// mask: the fused path (key lengths) agrees with the additive-bias composition.
#[test]
fn pixart_fused_path_matches_the_unfused_path_on_the_gpu() {
    use tt_scale::models::pixart::{PixArtConfig, PixArtTransformer};
    let dev = cuda();
    let mut c = PixArtConfig::sigma_xl_1024();
    c.num_attention_heads = 2;
    c.num_layers = 2;
    c.caption_channels = 64;
    c.cross_attention_dim = c.num_attention_heads * c.attention_head_dim;
    let (vb, _) = tt_scale::bench::RandomWeights::var_builder(DType::BF16, &dev);
    let model = PixArtTransformer::new(&c, vb).unwrap();
    let xs = on(&randn(1, &[2, c.in_channels, 16, 16]), &dev)
        .to_dtype(DType::BF16)
        .unwrap();
    let context = on(&randn(2, &[2, 20, c.caption_channels]), &dev)
        .to_dtype(DType::BF16)
        .unwrap();
    let mut mask = vec![0f32; 40];
    mask[..7].iter_mut().for_each(|m| *m = 1.0);
    mask[20..40].iter_mut().for_each(|m| *m = 1.0);
    let mask = Tensor::from_vec(mask, (2, 20), &dev).unwrap();
    let run = |fused_on: bool| {
        ops::with_fused(fused_on, || {
            model
                .forward(&xs, &[500.0, 20.0], &context, Some(&mask))
                .unwrap()
        })
    };
    let err = rel_err(&run(true), &run(false));
    assert!(err <= 5e-2, "pixart fused vs unfused: {err}");
}

/// A small SDXL-style UNet (head size 64, random weights, bf16, text-time conditioning): the
/// fused path (attention, group norm + SiLU, GEGLU, cuBLASLt linears) agrees with candle's
/// composition on the same GPU.
#[test]
fn sdxl_unet_fused_path_matches_the_unfused_path_on_the_gpu() {
    use tt_scale::bench::models::sdxl_base_unet_json;
    use tt_scale::models::unet::{UNet, UNetConfig};
    let dev = cuda();
    let mut json = sdxl_base_unet_json();
    json["block_out_channels"] = serde_json::json!([64, 128]);
    json["down_block_types"] = serde_json::json!(["DownBlock2D", "CrossAttnDownBlock2D"]);
    json["up_block_types"] = serde_json::json!(["CrossAttnUpBlock2D", "UpBlock2D"]);
    json["attention_head_dim"] = serde_json::json!([1, 2]);
    json["transformer_layers_per_block"] = serde_json::json!([1, 1]);
    json["layers_per_block"] = serde_json::json!(1);
    json["cross_attention_dim"] = serde_json::json!(64);
    json["addition_time_embed_dim"] = serde_json::json!(8);
    json["projection_class_embeddings_input_dim"] = serde_json::json!(64 + 6 * 8);
    let config: UNetConfig = tt_scale::loading::model_config(&json, "unet/config.json").unwrap();
    let (vb, _) = tt_scale::bench::RandomWeights::var_builder(DType::BF16, &dev);
    let unet = UNet::new(vb, &config).unwrap();
    let bf = |t: Tensor| t.to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap();
    let sample = bf(randn(1, &[2, 4, 16, 16]));
    let context = bf(randn(2, &[2, 77, 64]));
    let text_embeds = bf(randn(3, &[2, 64]));
    let time_ids = Tensor::new(&[[1024f32, 1024., 0., 0., 1024., 1024.]; 2], &dev).unwrap();
    let run = |fused_on: bool| {
        ops::with_fused(fused_on, || {
            unet.forward(&sample, 500.0, &context, Some((&text_embeds, &time_ids)))
                .unwrap()
        })
    };
    let err = rel_err(&run(true), &run(false));
    assert!(err <= 5e-2, "sdxl unet fused vs unfused: {err}");
}

#[test]
fn vae_decoder_fused_path_matches_the_unfused_path_on_the_gpu() {
    // cuDNN convolutions and fused group norms (+ SiLU) against candle's, through our decoder.
    use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;
    use tt_scale::models::vae::VaeDecoder;
    let dev = cuda();
    let config = AutoEncoderKLConfig {
        block_out_channels: vec![32, 64],
        layers_per_block: 1,
        latent_channels: 4,
        norm_num_groups: 8,
        use_quant_conv: true,
        use_post_quant_conv: true,
    };
    let map = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&map, DType::BF16, &dev);
    let vae = VaeDecoder::new(vb, 3, config).unwrap();
    let z = randn(5, &[2, 4, 24, 20])
        .to_device(&dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let run = |fused_on: bool| ops::with_fused(fused_on, || vae.decode(&z).unwrap());
    let (fused_out, plain) = (run(true), run(false));
    assert_eq!(fused_out.dims(), [2, 3, 48, 40]);
    let err = rel_err(&fused_out, &plain);
    assert!(err <= 5e-2, "vae decoder fused vs unfused: {err}");
}
