//! The fused operations' CPU implementations (`tt_scale::ops::fused`, the reference the CUDA
//! kernels are tested against in tests/gpu/kernels.rs) compute the same functions as the candle
//! compositions the models use on the CPU: random inputs, odd sizes, strided views, every
//! optional operand, float32 and the 16-bit dtypes. Bounds are relative to the largest
//! magnitude of the composite result: 1e-5 in float32; in bf16/f16 one rounding of the output
//! and the compositions' own intermediate roundings (2e-2 bf16, 4e-3 f16).

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use tt_scale::ops::{self, fused, Activation};

use crate::tensors::{randn, rel_err, ConvCase};

fn bound(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        DType::BF16 => 2e-2,
        _ => 4e-3,
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// softmax(scale · q kᵀ + mask) v in float32 with candle ops, (B, H, Lq, D).
fn attention_composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    lens: Option<&[u32]>,
) -> Tensor {
    let (q, k, v) = (
        q.to_dtype(DType::F32).unwrap(),
        k.to_dtype(DType::F32).unwrap(),
        v.to_dtype(DType::F32).unwrap(),
    );
    let (b, _, _, _) = q.dims4().unwrap();
    let lk = k.dim(2).unwrap();
    let mut scores = (q
        .contiguous()
        .unwrap()
        .matmul(&k.t().unwrap().contiguous().unwrap())
        .unwrap()
        * scale)
        .unwrap();
    if let Some(lens) = lens {
        let mask: Vec<f32> = (0..b)
            .flat_map(|bi| {
                (0..lk).map(move |j| {
                    if (j as u32) < lens[bi] {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, lk), &Device::Cpu).unwrap();
        scores = scores.broadcast_add(&mask).unwrap();
    }
    candle_nn::ops::softmax_last_dim(&scores)
        .unwrap()
        .matmul(&v.contiguous().unwrap())
        .unwrap()
}

#[test]
fn attention_matches_softmax_attention_for_every_dtype_layout_and_mask() {
    let (b, h) = (2, 3);
    for (case, &(lq, lk, d)) in [(1, 1, 8), (77, 77, 40), (65, 129, 64), (13, 200, 72)]
        .iter()
        .enumerate()
    {
        for dtype in DTYPES {
            let seed = 10 * case as u64;
            // Heads-major q; token-major k and v as views of one fused (B, Lk, 3, H, D) buffer.
            let q = randn(seed, &[b, h, lq, d]).to_dtype(dtype).unwrap();
            let kv = randn(seed + 1, &[b, lk, 3, h, d]).to_dtype(dtype).unwrap();
            let k = kv.i((.., .., 1)).unwrap().transpose(1, 2).unwrap();
            let v = kv.i((.., .., 2)).unwrap().transpose(1, 2).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            for lens in [None, Some(vec![lk.min(5) as u32, lk as u32])] {
                let ours = ops::attention(&q, &k, &v, scale, lens.as_deref()).unwrap();
                assert_eq!(ours.dims(), [b, h, lq, d]);
                let want = attention_composite(&q, &k, &v, scale, lens.as_deref());
                let err = rel_err(&ours, &want);
                assert!(
                    err <= bound(dtype),
                    "attention {dtype:?} lq={lq} lk={lk} d={d} lens={lens:?}: {err}"
                );
            }
        }
    }
}

/// softmax(scale · q kᵀ) v in float32 with candle ops over the keys `sees(b, i, j)` says query `i`
/// of batch row `b` sees, k and v heads repeated for grouped queries; (B, H, Lq, D). Every query
/// must see some key.
fn masked_attention_composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    sees: impl Fn(usize, usize, usize) -> bool,
) -> Tensor {
    let (b, h, lq, _) = q.dims4().unwrap();
    let (_, hk, lk, _) = k.dims4().unwrap();
    let repeat = |t: &Tensor| {
        let t = t.to_dtype(DType::F32).unwrap();
        let parts: Vec<Tensor> = (0..h).map(|hi| t.i((.., hi / (h / hk))).unwrap()).collect();
        Tensor::stack(&parts, 1).unwrap().contiguous().unwrap()
    };
    let (k, v) = (repeat(k), repeat(v));
    let q = q.to_dtype(DType::F32).unwrap().contiguous().unwrap();
    let mut mask = vec![f32::NEG_INFINITY; b * lq * lk];
    for bi in 0..b {
        for i in 0..lq {
            for j in 0..lk {
                if sees(bi, i, j) {
                    mask[(bi * lq + i) * lk + j] = 0.0;
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, 1, lq, lk), &Device::Cpu).unwrap();
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
    candle_nn::ops::softmax_last_dim(&scores)
        .unwrap()
        .matmul(&v)
        .unwrap()
}

#[test]
fn masked_attention_matches_softmax_attention_with_holes_causality_and_grouped_heads() {
    // A language model's batched prefill after a shared prefix of 3 cached keys: row 0 unpadded,
    // row 1 left-padded by 4 (keys 3..7 hidden), causal; then one decode step over the cache; 4
    // query heads on 2 key/value heads.
    let (b, h, hk, d, cached) = (2, 4, 2, 16, 3usize);
    let pads = [0usize, 4];
    let in_hole = |bi: usize, j: usize| j >= cached && j < cached + pads[bi];
    for dtype in DTYPES {
        for (lq, lk) in [(7, 10), (1, 12), (9, 9)] {
            let q = randn(40 + lq as u64, &[b, h, lq, d])
                .to_dtype(dtype)
                .unwrap();
            let k = randn(41, &[b, hk, lk, d]).to_dtype(dtype).unwrap();
            let v = randn(42, &[b, hk, lk, d]).to_dtype(dtype).unwrap();
            let holes: Vec<(u32, u32)> = pads
                .iter()
                .map(|&p| (cached as u32, (cached + p) as u32))
                .collect();
            let mask = ops::KeyMask {
                lens: None,
                holes: Some(holes),
                causal: true,
            };
            let ours = ops::attention_masked(&q, &k, &v, 0.25, &mask).unwrap();
            assert_eq!(ours.dims(), [b, h, lq, d]);
            let want = masked_attention_composite(&q, &k, &v, 0.25, |bi, i, j| {
                !in_hole(bi, j) && j <= i + lk - lq
            });
            let err = rel_err(&ours, &want);
            assert!(err <= bound(dtype), "{dtype:?} lq={lq} lk={lk}: {err}");
        }
    }
}

#[test]
fn masked_attention_gives_zeros_to_queries_that_see_no_key() {
    // No cached prefix: the left padding [0, 2) of row 0 hides every key from its first two
    // queries (causal); row 1 also ends its keys at 5.
    let q = randn(50, &[2, 2, 6, 8]);
    let k = randn(51, &[2, 1, 6, 8]);
    let mask = ops::KeyMask {
        lens: Some(vec![6, 5]),
        holes: Some(vec![(0, 2), (0, 0)]),
        causal: true,
    };
    let out = ops::attention_masked(&q, &k, &k, 0.5, &mask).unwrap();
    let rows = out.i(0).unwrap().i((.., 0..2)).unwrap();
    let v = rows.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|&x| x == 0.0), "{v:?}");
    let want = masked_attention_composite(
        &q.i(1..).unwrap(),
        &k.i(1..).unwrap(),
        &k.i(1..).unwrap(),
        0.5,
        |_, i, j| j < 5 && j <= i,
    );
    assert!(rel_err(&out.i(1..).unwrap(), &want) <= 1e-5);
    let rest = out
        .i(0)
        .unwrap()
        .i((.., 2..))
        .unwrap()
        .flatten_all()
        .unwrap();
    assert!(rest.to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
    assert!(mask.sees(0, 2, 2, 6, 6) && !mask.sees(0, 2, 3, 6, 6) && !mask.sees(0, 5, 1, 6, 6));
    assert!(!mask.is_empty() && ops::KeyMask::default().is_empty());
}

#[test]
fn masked_attention_rejects_masks_and_heads_that_do_not_fit() {
    let q = randn(1, &[2, 4, 5, 8]);
    let k = randn(2, &[2, 2, 5, 8]);
    let holes = ops::KeyMask {
        holes: Some(vec![(0, 1)]),
        ..Default::default()
    };
    let err = ops::attention_masked(&q, &k, &k, 0.5, &holes).unwrap_err();
    assert!(err.to_string().contains("holes"), "{err}");
    let k3 = randn(2, &[2, 3, 5, 8]);
    assert!(ops::attention_masked(&q, &k3, &k3, 0.5, &Default::default()).is_err());
    assert!(ops::attention_masked(&q, &k, &k, 0.5, &Default::default()).is_ok());
}

#[test]
fn attention_output_is_a_free_view_of_token_major_rows() {
    let q = randn(1, &[1, 2, 5, 8]);
    let out = ops::attention(&q, &q, &q, 0.3, None).unwrap();
    // (B, H, L, D) as the transpose of a contiguous (B, L, H, D): back to rows without a copy.
    let rows = out.transpose(1, 2).unwrap();
    assert!(rows.is_contiguous());
}

#[test]
fn attention_with_no_keys_is_zero_and_never_nan() {
    let q = randn(2, &[2, 1, 4, 8]);
    let k = randn(3, &[2, 1, 6, 8]);
    let out = ops::attention(&q, &k, &k, 0.5, Some(&[0, 6])).unwrap();
    let first = out
        .i(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(first.iter().all(|&x| x == 0.0));
    let second = out
        .i(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(second.iter().all(|x| x.is_finite()) && second.iter().any(|&x| x != 0.0));
}

#[test]
fn attention_rejects_mismatched_operands() {
    let q = randn(1, &[1, 2, 5, 8]);
    let k = randn(2, &[1, 2, 5, 16]);
    assert!(ops::attention(&q, &k, &k, 1.0, None).is_err());
    let k = randn(2, &[1, 3, 5, 8]);
    assert!(ops::attention(&q, &k, &k, 1.0, None).is_err());
    assert!(ops::attention(&q, &q, &q, 1.0, Some(&[1, 2, 3])).is_err());
    let half = q.to_dtype(DType::BF16).unwrap();
    assert!(ops::attention(&q, &half, &half, 1.0, None).is_err());
    // The kernel takes the maximum of the raw scores, so the scale must be positive.
    for scale in [0.0, -0.5, f64::NAN, f64::INFINITY] {
        let err = ops::attention(&q, &q, &q, scale, None).unwrap_err();
        assert!(err.to_string().contains("positive"), "{err}");
    }
    assert!(ops::attention(&q, &q, &q, 0.5, None).is_ok());
}

/// layer_norm(x) (float32 statistics) · w + b, then · (1 + scale) + shift, with candle ops.
fn layer_norm_mod_composite(
    x: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    shift: Option<&Tensor>,
    scale: Option<&Tensor>,
    eps: f64,
) -> Tensor {
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let xf = f(x);
    let mean = xf.mean_keepdim(D::Minus1).unwrap();
    let centered = xf.broadcast_sub(&mean).unwrap();
    let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let mut y = centered
        .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap();
    if let Some(w) = w {
        y = y.broadcast_mul(&f(w)).unwrap();
    }
    if let Some(b) = b {
        y = y.broadcast_add(&f(b)).unwrap();
    }
    if let Some(s) = scale {
        y = y.broadcast_mul(&(f(s) + 1.0).unwrap()).unwrap();
    }
    if let Some(s) = shift {
        y = y.broadcast_add(&f(s)).unwrap();
    }
    y
}

#[test]
fn layer_norm_modulate_matches_the_composition_with_every_operand_combination() {
    for (i, &(b, l, c)) in [(1, 1, 1), (2, 3, 31), (3, 7, 300)].iter().enumerate() {
        for dtype in DTYPES {
            let seed = 100 + i as u64;
            let x = (randn(seed, &[b, l, c]) * 3.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = randn(seed + 1, &[c]).to_dtype(dtype).unwrap();
            let bias = randn(seed + 2, &[c]).to_dtype(dtype).unwrap();
            // shift and scale as chunks of one modulation vector (B, 1, 6C), as in Flux.
            let modv = randn(seed + 3, &[b, 1, 6 * c]).to_dtype(dtype).unwrap();
            let chunks = modv.chunk(6, D::Minus1).unwrap();
            let (shift, scale) = (&chunks[0], &chunks[1]);
            for mask in 0..16u32 {
                let pick = |bit: u32, t: &Tensor| (mask & (1 << bit) != 0).then(|| t.clone());
                let (w, bias, shift, scale) =
                    (pick(0, &w), pick(1, &bias), pick(2, shift), pick(3, scale));
                let ours = fused::layer_norm_modulate(
                    &x,
                    w.as_ref(),
                    bias.as_ref(),
                    shift.as_ref(),
                    scale.as_ref(),
                    1e-6,
                )
                .unwrap();
                let want = layer_norm_mod_composite(
                    &x,
                    w.as_ref(),
                    bias.as_ref(),
                    shift.as_ref(),
                    scale.as_ref(),
                    1e-6,
                );
                let err = rel_err(&ours, &want);
                assert!(
                    err <= bound(dtype),
                    "ln-mod {dtype:?} ({b},{l},{c}) operands {mask:04b}: {err}"
                );
            }
        }
    }
}

#[test]
fn layer_norm_modulate_rejects_bad_operands() {
    let x = randn(1, &[2, 3, 8]);
    let bad_w = randn(2, &[7]);
    assert!(fused::layer_norm_modulate(&x, Some(&bad_w), None, None, None, 1e-6).is_err());
    let bad_shift = randn(3, &[3, 1, 8]);
    assert!(fused::layer_norm_modulate(&x, None, None, Some(&bad_shift), None, 1e-6).is_err());
    let other_dtype = randn(4, &[8]).to_dtype(DType::BF16).unwrap();
    assert!(fused::layer_norm_modulate(&x, Some(&other_dtype), None, None, None, 1e-6).is_err());
}

/// Flux's composition: RMS norm (candle_nn::ops::rms_norm) then the interleaved rotation.
fn qk_norm_rope_composite(
    qkv: &Tensor,
    heads: usize,
    qw: &Tensor,
    kw: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    offset: usize,
) -> Tensor {
    let (b, l, _) = qkv.dims3().unwrap();
    let d = qw.dim(0).unwrap();
    let hd = heads * d;
    let part = |i: usize| {
        qkv.narrow(2, i * hd, hd)
            .unwrap()
            .reshape((b, l, heads, d))
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let rot = |x: Tensor| {
        let xf = x
            .to_dtype(DType::F32)
            .unwrap()
            .reshape((b, l, heads, d / 2, 2))
            .unwrap();
        let c = cos
            .narrow(0, offset, l)
            .unwrap()
            .reshape((1, l, 1, d / 2))
            .unwrap();
        let s = sin
            .narrow(0, offset, l)
            .unwrap()
            .reshape((1, l, 1, d / 2))
            .unwrap();
        let x0 = xf.narrow(4, 0, 1).unwrap().squeeze(4).unwrap();
        let x1 = xf.narrow(4, 1, 1).unwrap().squeeze(4).unwrap();
        let o0 = (x0.broadcast_mul(&c).unwrap() - x1.broadcast_mul(&s).unwrap()).unwrap();
        let o1 = (x0.broadcast_mul(&s).unwrap() + x1.broadcast_mul(&c).unwrap()).unwrap();
        Tensor::stack(&[o0, o1], 4)
            .unwrap()
            .reshape((b, l, heads, d))
            .unwrap()
    };
    let q = rot(candle_nn::ops::rms_norm(&part(0), qw, 1e-6).unwrap());
    let k = rot(candle_nn::ops::rms_norm(&part(1), kw, 1e-6).unwrap());
    let v = part(2).to_dtype(DType::F32).unwrap();
    Tensor::stack(&[q, k, v], 0).unwrap()
}

#[test]
fn qk_norm_rope_matches_flux_rms_norm_and_rotation() {
    let (b, l, heads) = (2, 5, 3);
    for d in [16, 128] {
        for dtype in DTYPES {
            for (extra, offset) in [(0, 0), (24, 2)] {
                let width = 3 * heads * d + extra;
                let qkv = randn(d as u64 + extra as u64, &[b, l, width])
                    .to_dtype(dtype)
                    .unwrap();
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
                // A narrow view, as Flux's single blocks hand over the q/k/v columns.
                let view = qkv.narrow(2, 0, width).unwrap();
                let ours =
                    fused::qk_norm_rope(&view, heads, &qw, &kw, &cos, &sin, offset, 1e-6).unwrap();
                assert_eq!(ours.dims(), [3, b, l, heads, d]);
                let want = qk_norm_rope_composite(&qkv, heads, &qw, &kw, &cos, &sin, offset);
                let err = rel_err(&ours, &want);
                assert!(
                    err <= bound(dtype),
                    "qk-norm-rope {dtype:?} d={d} offset={offset}: {err}"
                );
                // v passes through untouched.
                let v_ours = ours.i(2).unwrap().to_dtype(DType::F32).unwrap();
                let v_want = want.i(2).unwrap();
                assert_eq!(rel_err(&v_ours, &v_want), 0.0);
            }
        }
    }
}

#[test]
fn qk_norm_rope_rejects_tables_that_do_not_cover_the_tokens() {
    let qkv = randn(1, &[1, 4, 3 * 2 * 8]);
    let w = randn(2, &[8]);
    let short = randn(3, &[3, 4]);
    assert!(fused::qk_norm_rope(&qkv, 2, &w, &w, &short, &short, 0, 1e-6).is_err());
    let wide = randn(3, &[8, 4]);
    assert!(fused::qk_norm_rope(&qkv, 2, &w, &w, &wide, &wide, 5, 1e-6).is_err());
    assert!(fused::qk_norm_rope(&qkv, 3, &w, &w, &wide, &wide, 0, 1e-6).is_err());
}

#[test]
fn joint_qk_norm_rope_equals_the_concatenation_of_each_stream() {
    // Flux's double block: 3 text rows then 6 image rows (the image's q/k/v a narrow view of a
    // wider projection), each stream with its own norm weights, positions over the joint rows.
    let (b, heads, d) = (2, 3, 16);
    let hd = heads * d;
    for dtype in DTYPES {
        let txt = randn(61, &[b, 3, 3 * hd]).to_dtype(dtype).unwrap();
        let img_wide = randn(62, &[b, 6, 3 * hd + 40]).to_dtype(dtype).unwrap();
        let img = img_wide.narrow(2, 0, 3 * hd).unwrap();
        let w = |seed| {
            randn(seed, &[d])
                .affine(0.5, 1.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let (tq, tk, iq, ik) = (w(63), w(64), w(65), w(66));
        let angles = (randn(67, &[2 + 9, d / 2]) * 3.0).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let joint = fused::qk_norm_rope_joint(
            (&txt, &tq, &tk),
            (&img, &iq, &ik),
            heads,
            (&cos, &sin),
            2,
            1e-6,
        )
        .unwrap();
        let t = fused::qk_norm_rope(&txt, heads, &tq, &tk, &cos, &sin, 2, 1e-6).unwrap();
        let i = fused::qk_norm_rope(&img, heads, &iq, &ik, &cos, &sin, 5, 1e-6).unwrap();
        let want = Tensor::cat(&[t, i], 2).unwrap();
        assert_eq!(joint.dims(), [3, b, 9, heads, d]);
        assert_eq!(rel_err(&joint, &want), 0.0, "{dtype:?}");
    }
    // Streams that differ in batch or head size, and tables too short for the joint rows.
    let (w8, w4) = (randn(1, &[8]), randn(1, &[4]));
    let tables = randn(2, &[9, 4]);
    let a = randn(3, &[1, 4, 3 * 2 * 8]);
    let rope = (&tables, &tables);
    let joint = |b: &Tensor, w: &Tensor, rope: (&Tensor, &Tensor)| {
        fused::qk_norm_rope_joint((&a, &w8, &w8), (b, w, w), 2, rope, 0, 1e-6)
    };
    assert!(joint(&randn(4, &[2, 5, 48]), &w8, rope).is_err());
    assert!(joint(&randn(4, &[1, 5, 48]), &w4, rope).is_err());
    assert!(joint(&randn(4, &[1, 5, 48]), &w8, rope).is_ok());
    let short = randn(2, &[8, 4]);
    assert!(joint(&randn(4, &[1, 5, 48]), &w8, (&short, &short)).is_err());
}

#[test]
fn modulations_broadcast_from_one_row_equal_materialised_rows() {
    // Flux's cached modulations: (1, 1, C) chunks broadcast over the batch (stride 0).
    let (b, l, c) = (3, 5, 16);
    for dtype in DTYPES {
        let x = randn(81, &[b, l, c]).to_dtype(dtype).unwrap();
        let y = randn(82, &[b, l, c]).to_dtype(dtype).unwrap();
        let one = |seed| randn(seed, &[1, 1, c]).to_dtype(dtype).unwrap();
        let (shift, scale, gate) = (one(83), one(84), one(85));
        let wide = |t: &Tensor| t.broadcast_as((b, 1, c)).unwrap();
        let copy = |t: &Tensor| wide(t).contiguous().unwrap();
        let ln = |s: &Tensor, k: &Tensor| {
            fused::layer_norm_modulate(&x, None, None, Some(s), Some(k), 1e-6).unwrap()
        };
        assert_eq!(
            rel_err(
                &ln(&wide(&shift), &wide(&scale)),
                &ln(&copy(&shift), &copy(&scale))
            ),
            0.0
        );
        let gr = |g: &Tensor| fused::gated_residual(&x, g, &y).unwrap();
        assert_eq!(rel_err(&gr(&wide(&gate)), &gr(&copy(&gate))), 0.0);
    }
}

#[test]
fn group_norm_matches_candle_group_norm_with_and_without_silu() {
    for dtype in DTYPES {
        for &(n, c, groups, h, w) in &[(1, 4, 2, 1, 1), (2, 12, 3, 5, 7), (2, 64, 32, 8, 9)] {
            let x = randn(c as u64 + 50, &[n, c, h, w])
                .affine(2.0, 1.5)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let wt = randn(51, &[c])
                .affine(0.5, 1.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let bt = randn(52, &[c])
                .affine(0.5, 0.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let gn = candle_nn::GroupNorm::new(
                wt.to_dtype(DType::F32).unwrap(),
                bt.to_dtype(DType::F32).unwrap(),
                c,
                groups,
                1e-5,
            )
            .unwrap();
            let want = gn.forward(&x.to_dtype(DType::F32).unwrap()).unwrap();
            let ours = fused::group_norm(&x, groups, Some(&wt), Some(&bt), 1e-5, false).unwrap();
            let err = rel_err(&ours, &want);
            assert!(
                err <= bound(dtype),
                "group norm {dtype:?} ({n},{c},{h},{w})/{groups}: {err}"
            );
            let ours = fused::group_norm(&x, groups, Some(&wt), Some(&bt), 1e-5, true).unwrap();
            let err = rel_err(&ours, &want.silu().unwrap());
            assert!(err <= bound(dtype), "group norm + silu {dtype:?}: {err}");
        }
    }
    let x = randn(1, &[1, 6, 2, 2]);
    assert!(fused::group_norm(&x, 4, None, None, 1e-5, false).is_err());
    assert!(fused::group_norm(&x, 0, None, None, 1e-5, false).is_err());
    assert!(fused::group_norm(&x, 3, Some(&randn(2, &[5])), None, 1e-5, false).is_err());
    assert!(fused::group_norm(&randn(3, &[6]), 3, None, None, 1e-5, false).is_err());
}

#[test]
fn gelu_tanh_and_geglu_match_candle() {
    for dtype in DTYPES {
        let x = (randn(21, &[3, 7, 74]) * 3.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let err = rel_err(&fused::gelu_tanh(&x).unwrap(), &x.gelu().unwrap());
        assert!(err <= bound(dtype), "gelu {dtype:?}: {err}");
        let geglu = fused::geglu(&x).unwrap();
        let want = (x.narrow(2, 0, 37).unwrap() * x.narrow(2, 37, 37).unwrap().gelu_erf().unwrap())
            .unwrap();
        let err = rel_err(&geglu, &want);
        assert!(err <= bound(dtype), "geglu {dtype:?}: {err}");
    }
    assert!(fused::geglu(&randn(1, &[2, 5])).is_err());
}

#[test]
fn linear_matches_candle_linear_with_and_without_bias_and_gelu() {
    for dtype in DTYPES {
        let x = randn(31, &[2, 9, 33]).to_dtype(dtype).unwrap();
        let w = (randn(32, &[17, 33]) * 0.2)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let b = randn(33, &[17]).to_dtype(dtype).unwrap();
        for bias in [None, Some(&b)] {
            let reference = candle_nn::Linear::new(
                w.to_dtype(DType::F32).unwrap(),
                bias.map(|b| b.to_dtype(DType::F32).unwrap()),
            );
            let want = reference.forward(&x.to_dtype(DType::F32).unwrap()).unwrap();
            let ours = fused::linear(&x, &w, bias, None).unwrap();
            let err = rel_err(&ours, &want);
            assert!(
                err <= bound(dtype),
                "linear {dtype:?} bias={}: {err}",
                bias.is_some()
            );
            let ours = fused::linear(&x, &w, bias, Some(Activation::GeluTanh)).unwrap();
            let err = rel_err(&ours, &want.gelu().unwrap());
            assert!(err <= bound(dtype), "linear+gelu {dtype:?}: {err}");
        }
    }
    let x = randn(1, &[2, 4]);
    assert!(fused::linear(&x, &randn(2, &[3, 5]), None, None).is_err());
    assert!(fused::linear(&x, &randn(2, &[3, 4]), Some(&randn(3, &[4])), None).is_err());
}

#[test]
fn the_plain_linear_fallback_equals_candle_linear() {
    let x = randn(41, &[2, 3, 5]);
    let w = randn(42, &[4, 5]);
    let b = randn(43, &[4]);
    let want = candle_nn::Linear::new(w.clone(), Some(b.clone()))
        .forward(&x)
        .unwrap();
    let ours = ops::linear_plain(&x, &w, Some(&b), None).unwrap();
    assert!(rel_err(&ours, &want) <= 1e-6);
    let ours = ops::linear_plain(&x, &w, Some(&b), Some(Activation::GeluTanh)).unwrap();
    assert!(rel_err(&ours, &want.gelu().unwrap()) <= 1e-6);
    // On the CPU the fused op is the reference implementation; the wrapper agrees with it.
    let fused = ops::linear_fused_or_plain(&x, &w, Some(&b), None).unwrap();
    assert!(rel_err(&fused, &want) <= 1e-5);
}

#[test]
fn the_cpu_never_takes_the_fused_path() {
    let x = randn(1, &[1, 2, 4, 64]).to_dtype(DType::BF16).unwrap();
    assert!(!ops::fused_on(&x));
    assert!(!ops::attention_fused_ok(&x, &x, &x));
    // The wrapper's CPU path is the plain product (on OpenBLAS where present): candle_nn::Linear's
    // function, up to float32 summation order.
    let w = randn(2, &[3, 64]);
    let lin = ops::Linear::new(candle_nn::Linear::new(w.clone(), None));
    let xf = randn(3, &[2, 64]);
    let ours = lin.forward(&xf).unwrap();
    let want = candle_nn::Linear::new(w, None).forward(&xf).unwrap();
    assert!(rel_err(&ours, &want) <= 1e-6);
}

#[test]
fn with_fused_overrides_the_switch_on_this_thread_only() {
    let before = ops::fused_enabled();
    ops::with_fused(!before, || {
        assert_eq!(ops::fused_enabled(), !before);
        let other = std::thread::spawn(ops::fused_enabled).join().unwrap();
        assert_eq!(other, before);
    });
    assert_eq!(ops::fused_enabled(), before);
}

#[test]
fn linear_sum_equals_the_linear_of_the_concatenated_inputs() {
    // Flux's single-block linear2 over [attention, MLP]: the weight's two column ranges are
    // strided views of one (N, K1 + K2) weight, used without copies.
    for dtype in DTYPES {
        let x1 = randn(51, &[2, 7, 24]).to_dtype(dtype).unwrap();
        let x2 = randn(52, &[2, 7, 40]).to_dtype(dtype).unwrap();
        let w = (randn(53, &[16, 64]) * 0.2)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let b = randn(54, &[16]).to_dtype(dtype).unwrap();
        let (w1, w2) = (w.narrow(1, 0, 24).unwrap(), w.narrow(1, 24, 40).unwrap());
        for bias in [None, Some(&b)] {
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let reference = candle_nn::Linear::new(f32(&w), bias.map(f32));
            let cat = Tensor::cat(&[f32(&x1), f32(&x2)], 2).unwrap();
            let want = reference.forward(&cat).unwrap();
            let ours = fused::linear_sum(&x1, &w1, &x2, &w2, bias).unwrap();
            let err = rel_err(&ours, &want);
            assert!(err <= bound(dtype), "linear_sum {dtype:?}: {err}");
            let plain = ops::linear_sum_fused_or_plain(&x1, &w1, &x2, &w2, bias).unwrap();
            assert!(rel_err(&plain, &want) <= bound(dtype));
            // One product with a column range of the weight equals it with a contiguous copy.
            let ours = fused::linear(&x2, &w2, bias, None).unwrap();
            let want = fused::linear(&x2, &w2.contiguous().unwrap(), bias, None).unwrap();
            assert_eq!(rel_err(&ours, &want), 0.0, "strided weight {dtype:?}");
        }
    }
    let (x1, x2) = (randn(1, &[2, 3, 4]), randn(2, &[2, 3, 5]));
    let (w1, w2) = (randn(3, &[6, 4]), randn(4, &[6, 5]));
    assert!(fused::linear_sum(&x1, &w1, &x2, &w2, None).is_ok());
    // Rows that differ, a weight that does not fit its input or the other weight, mixed dtypes.
    assert!(fused::linear_sum(&x1, &w1, &randn(5, &[2, 4, 5]), &w2, None).is_err());
    assert!(fused::linear_sum(&x1, &w1, &x2, &randn(6, &[6, 4]), None).is_err());
    assert!(fused::linear_sum(&x1, &w1, &x2, &randn(7, &[5, 5]), None).is_err());
    let x2_bf16 = x2.to_dtype(DType::BF16).unwrap();
    assert!(fused::linear_sum(&x1, &w1, &x2_bf16, &w2, None).is_err());
}

#[test]
fn gated_residual_matches_the_multiply_and_add() {
    for dtype in DTYPES {
        let x = randn(61, &[2, 5, 24]).to_dtype(dtype).unwrap();
        let y = randn(62, &[2, 5, 24]).to_dtype(dtype).unwrap();
        // The gate as Flux hands it: a chunk of a (B, 1, 3·C) modulation vector.
        let modulation = randn(63, &[2, 1, 72]).to_dtype(dtype).unwrap();
        let gate = modulation.narrow(2, 24, 24).unwrap();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let want = (f32(&x) + f32(&gate).broadcast_mul(&f32(&y)).unwrap()).unwrap();
        let ours = fused::gated_residual(&x, &gate, &y).unwrap();
        assert_eq!(ours.dtype(), dtype);
        let err = rel_err(&ours, &want);
        assert!(err <= bound(dtype) / 4.0, "gated_residual {dtype:?}: {err}");
        // (B, C) gates are taken as well.
        let flat = fused::gated_residual(&x, &gate.squeeze(1).unwrap(), &y).unwrap();
        assert_eq!(rel_err(&flat, &ours), 0.0);
        // The models' dispatcher takes candle's multiply and add on the CPU.
        let plain = ops::gated_residual(&x, &gate, &y).unwrap();
        let composed = (&x + gate.broadcast_mul(&y).unwrap()).unwrap();
        assert_eq!(rel_err(&plain, &composed), 0.0);
    }
    let (x, y) = (randn(1, &[2, 3, 8]), randn(2, &[2, 3, 8]));
    assert!(fused::gated_residual(&x, &randn(3, &[2, 1, 8]), &y).is_ok());
    assert!(fused::gated_residual(&x, &randn(3, &[3, 1, 8]), &y).is_err());
    assert!(fused::gated_residual(&x, &randn(3, &[2, 1, 7]), &y).is_err());
    assert!(fused::gated_residual(&x, &randn(3, &[2, 1, 8]), &randn(4, &[2, 4, 8])).is_err());
    let bf16_gate = randn(3, &[2, 1, 8]).to_dtype(DType::BF16).unwrap();
    assert!(fused::gated_residual(&x, &bf16_gate, &y).is_err());
}

/// The convolutions the UNets, the VAE and PixArt's patch embedding run, and odd ones.
const CONVS: [ConvCase; 7] = [
    ([2, 6, 9, 11], 5, 3, 1, 1, 1, 1),
    ([2, 6, 9, 11], 5, 3, 1, 2, 1, 1),
    ([1, 6, 8, 8], 7, 1, 0, 1, 1, 1),
    ([1, 4, 8, 12], 6, 2, 0, 2, 1, 1),
    ([2, 6, 10, 7], 4, 3, 2, 1, 2, 1),
    ([1, 6, 7, 9], 4, 3, 1, 1, 1, 2),
    ([1, 3, 5, 5], 2, 5, 0, 3, 1, 1),
];

#[test]
fn conv2d_matches_candle_conv2d_for_every_dtype_stride_dilation_and_group_count() {
    for (seed, &(dims, k, kernel, padding, stride, dilation, groups)) in CONVS.iter().enumerate() {
        let seed = seed as u64 * 10;
        let cfg = candle_nn::Conv2dConfig {
            padding,
            stride,
            dilation,
            groups,
            ..Default::default()
        };
        let x = randn(seed + 1, &dims);
        let w = (randn(seed + 2, &[k, dims[1] / groups, kernel, kernel]) * 0.3).unwrap();
        let b = randn(seed + 3, &[k]);
        for dtype in DTYPES {
            let (x, w, b) = (
                x.to_dtype(dtype).unwrap(),
                w.to_dtype(dtype).unwrap(),
                b.to_dtype(dtype).unwrap(),
            );
            for bias in [None, Some(&b)] {
                let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let reference = candle_nn::Conv2d::new(f32_of(&w), bias.map(f32_of), cfg);
                let want = reference.forward(&f32_of(&x)).unwrap();
                let ours = fused::conv2d(&x, &w, bias, &cfg).unwrap();
                assert_eq!(ours.dtype(), dtype);
                let err = rel_err(&ours, &want);
                assert!(
                    err <= bound(dtype),
                    "conv2d {dims:?} k{k} {kernel}x{kernel} p{padding} s{stride} d{dilation} \
                     g{groups} {dtype:?} bias={}: {err}",
                    bias.is_some()
                );
            }
        }
    }
    // A strided input view gives the same result as its contiguous copy.
    let cfg = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let x = randn(91, &[2, 9, 11, 6]).permute((0, 3, 1, 2)).unwrap();
    let w = randn(92, &[5, 6, 3, 3]);
    let a = fused::conv2d(&x, &w, None, &cfg).unwrap();
    let b = fused::conv2d(&x.contiguous().unwrap(), &w, None, &cfg).unwrap();
    assert_eq!(rel_err(&a, &b), 0.0);
}

#[test]
fn conv2d_rejects_operands_that_do_not_fit() {
    let cfg = candle_nn::Conv2dConfig::default();
    let x = randn(1, &[1, 4, 6, 6]);
    let err = |x: &Tensor, w: &Tensor, b: Option<&Tensor>, cfg: &candle_nn::Conv2dConfig| {
        fused::conv2d(x, w, b, cfg).unwrap_err().to_string()
    };
    // Channels that the weight (in its groups) does not take.
    let e = err(&x, &randn(2, &[3, 5, 3, 3]), None, &cfg);
    assert!(e.contains("does not fit weight"), "{e}");
    let grouped = candle_nn::Conv2dConfig { groups: 3, ..cfg };
    let e = err(&x, &randn(2, &[3, 2, 3, 3]), None, &grouped);
    assert!(e.contains("in 3 groups"), "{e}");
    // Output channels the groups do not divide.
    let two = candle_nn::Conv2dConfig { groups: 2, ..cfg };
    let e = err(&x, &randn(2, &[3, 2, 3, 3]), None, &two);
    assert!(e.contains("2 groups do not divide"), "{e}");
    // A filter larger than the padded input.
    let e = err(&x, &randn(2, &[3, 4, 7, 7]), None, &cfg);
    assert!(e.contains("larger than the padded input"), "{e}");
    // A zero stride.
    let still = candle_nn::Conv2dConfig { stride: 0, ..cfg };
    let e = err(&x, &randn(2, &[3, 4, 3, 3]), None, &still);
    assert!(e.contains("zero"), "{e}");
    // A bias of the wrong length; mixed dtypes; an input that is not 4-D.
    let w = randn(2, &[3, 4, 3, 3]);
    let e = err(&x, &w, Some(&randn(3, &[4])), &cfg);
    assert!(e.contains("bias [4] is not (3)"), "{e}");
    let e = err(&x.to_dtype(DType::BF16).unwrap(), &w, None, &cfg);
    assert!(e.contains("one dtype"), "{e}");
    assert!(fused::conv2d(&randn(1, &[4, 6, 6]), &w, None, &cfg).is_err());
}

#[test]
fn the_conv2d_wrapper_is_candle_conv2d_on_the_cpu() {
    let cfg = candle_nn::Conv2dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    };
    let inner = candle_nn::Conv2d::new(randn(5, &[4, 3, 3, 3]), Some(randn(6, &[4])), cfg);
    let x = randn(7, &[2, 3, 9, 8]);
    assert!(!ops::conv_cudnn_ok(&x));
    assert!(!ops::conv_cudnn_ok(&x.to_dtype(DType::BF16).unwrap()));
    let ours = ops::Conv2d::new(inner.clone()).forward(&x).unwrap();
    let want = inner.forward(&x).unwrap();
    assert_eq!(rel_err(&ours, &want), 0.0);
}

// ------------------------------------------------------------ self-checks of the fused kernels

/// Every kernel family passes its check where its CPU implementation stands in for it, once per
/// family (and head size where it matters), and the verdict is remembered.
#[test]
fn every_kernel_family_passes_its_self_check_once() {
    use tt_scale::ops::selfcheck::{checks_run, trusted, with_cpu_kernels, Kernel};
    std::thread::spawn(|| {
        with_cpu_kernels(|| {
            let before = checks_run();
            for kernel in Kernel::ALL {
                assert!(trusted(kernel, &Device::Cpu, DType::F32, 64), "{kernel:?}");
                assert!(trusted(kernel, &Device::Cpu, DType::F32, 64), "{kernel:?}");
            }
            assert_eq!(checks_run() - before, Kernel::ALL.len());
            // Attention and qk_norm_rope are checked per head size; the others are not.
            assert!(trusted(Kernel::Attention, &Device::Cpu, DType::F32, 128));
            assert!(trusted(
                Kernel::GatedResidual,
                &Device::Cpu,
                DType::F32,
                128
            ));
            assert_eq!(checks_run() - before, Kernel::ALL.len() + 1);
        })
    })
    .join()
    .unwrap();
}

/// A kernel that returns wrong results is caught by its check and the dispatching helper takes
/// the plain path; the check measures the fault (so the test can fail) and, without it, passes.
#[test]
fn a_faulty_kernel_fails_its_check_and_the_plain_path_serves() {
    use tt_scale::ops::selfcheck::{
        check, checks_run, tolerance, trusted, with_cpu_kernels, with_faulty_kernel, Kernel,
    };
    std::thread::spawn(|| {
        let x = randn(1, &[2, 16, 64]);
        let gate = randn(2, &[2, 1, 64]);
        let y = randn(3, &[2, 16, 64]);
        let plain = (&x + gate.broadcast_mul(&y).unwrap()).unwrap();
        let sound = check(Kernel::GatedResidual, &Device::Cpu, DType::F32, 0).unwrap();
        assert!(sound <= tolerance(DType::F32), "{sound}");
        with_cpu_kernels(|| {
            with_faulty_kernel(Kernel::GatedResidual, || {
                let err = check(Kernel::GatedResidual, &Device::Cpu, DType::F32, 0).unwrap();
                assert!(err > 0.1, "the injected fault is real: {err}");
                let before = checks_run();
                let served = ops::gated_residual(&x, &gate, &y).unwrap();
                assert!(rel_err(&served, &plain) < 1e-6);
                assert_eq!(checks_run() - before, 1);
                assert!(!trusted(Kernel::GatedResidual, &Device::Cpu, DType::F32, 0));
                let _ = ops::gated_residual(&x, &gate, &y).unwrap();
                assert_eq!(checks_run() - before, 1, "checked once");
                // Other families are not affected.
                assert!(trusted(Kernel::GroupNorm, &Device::Cpu, DType::F32, 0));
            });
        });
    })
    .join()
    .unwrap();
}

/// OpenBLAS present (CI installs it and sets TT_SCALE_REQUIRE_BLAS), or this machine has none.
fn blas_or_skip() -> bool {
    match tt_scale::ops::blas::Blas::global() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("TT_SCALE_REQUIRE_BLAS").is_none(),
                "TT_SCALE_REQUIRE_BLAS is set but OpenBLAS is not in use: {e}"
            );
            eprintln!("skipped: {e}");
            false
        }
    }
}

/// The BLAS products equal candle's on the layouts the models hand them: row-major, transposed
/// (`k.t()`), a batch of heads, a strided view that needs a copy, broadcast batch strides, and a
/// linear layer with its bias added inside the product.
#[test]
fn blas_products_equal_candles_on_every_layout() {
    use tt_scale::ops::blas;
    if !blas_or_skip() {
        return;
    }
    let dev = Device::Cpu;
    let close = |a: &Tensor, b: &Tensor| {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "differ by {d}");
    };
    let a = Tensor::randn(0f32, 1.0, (37, 29), &dev).unwrap();
    let b = Tensor::randn(0f32, 1.0, (29, 41), &dev).unwrap();
    close(&blas::matmul(&a, &b).unwrap(), &a.matmul(&b).unwrap());
    let bt = Tensor::randn(0f32, 1.0, (41, 29), &dev)
        .unwrap()
        .t()
        .unwrap();
    close(&blas::matmul(&a, &bt).unwrap(), &a.matmul(&bt).unwrap());
    let at = Tensor::randn(0f32, 1.0, (29, 37), &dev)
        .unwrap()
        .t()
        .unwrap();
    close(&blas::matmul(&at, &b).unwrap(), &at.matmul(&b).unwrap());
    // Attention: (B, H, L, D) · (B, H, L, D)ᵀ from a transposed (B, L, H, D) view.
    let q = Tensor::randn(0f32, 1.0, (2, 5, 3, 8), &dev)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let k = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
    let kt = k.t().unwrap();
    close(
        &blas::matmul(&q, &kt).unwrap(),
        &q.contiguous().unwrap().matmul(&kt).unwrap(),
    );
    // Every other column: no BLAS layout, copied first.
    let wide = Tensor::randn(0f32, 1.0, (37, 58), &dev).unwrap();
    let strided = wide
        .reshape((37, 29, 2))
        .unwrap()
        .narrow(2, 0, 1)
        .unwrap()
        .squeeze(2)
        .unwrap();
    close(
        &blas::matmul(&strided, &b).unwrap(),
        &strided.contiguous().unwrap().matmul(&b).unwrap(),
    );
    // One matrix broadcast over a batch (stride 0).
    let shared = b.unsqueeze(0).unwrap().broadcast_as((3, 29, 41)).unwrap();
    let batch = Tensor::randn(0f32, 1.0, (3, 37, 29), &dev).unwrap();
    close(
        &blas::matmul(&batch, &shared).unwrap(),
        &batch.matmul(&shared.contiguous().unwrap()).unwrap(),
    );
    // A linear layer over (B, L, in) with its bias.
    let w = Tensor::randn(0f32, 1.0, (41, 29), &dev).unwrap();
    let bias = Tensor::randn(0f32, 1.0, 41, &dev).unwrap();
    let layer = candle_nn::Linear::new(w, Some(bias));
    let x = Tensor::randn(0f32, 1.0, (2, 7, 29), &dev).unwrap();
    close(
        &blas::linear(&layer, &x).unwrap(),
        &candle_core::Module::forward(&layer, &x).unwrap(),
    );
    // Shapes that do not multiply are an error, not a crash.
    assert!(blas::matmul(&a, &a).is_err());
}
