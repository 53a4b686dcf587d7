//! Tensor helpers shared by the fused-op tests (tests/unit/ops.rs, tests/gpu/kernels.rs):
//!
//! ```ignore
//! #[path = "../common/tensors.rs"]
//! mod tensors;
//! use tensors::{randn, rel_err};
//! ```
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};

/// A (0, 1) normal tensor on the CPU from a small deterministic generator (xorshift +
/// Box-Muller), independent of candle's RNG, so the CPU and GPU tests see the same inputs.
pub fn randn(seed: u64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let values: Vec<f32> = (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// max |a - b| / max(1e-6, max |b|), both read as float32 on the CPU; infinite when either
/// holds a NaN or an infinity.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let f = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (f(a), f(b));
    let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| {
        if x.is_finite() && y.is_finite() {
            m.max((x - y).abs())
        } else {
            f32::INFINITY
        }
    });
    diff / scale
}

/// A convolution case of the fused-op tests: (input dims (N, C, H, W), output channels, square
/// kernel size, padding, stride, dilation, groups).
pub type ConvCase = ([usize; 4], usize, usize, usize, usize, usize, usize);
