//! Seeded initial noise, equal to PyTorch's CPU `torch.randn` for the same seed.
//!
//! `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)`
//! is how diffusers (with a CPU generator) and ComfyUI turn a seed into a starting latent. This
//! module reproduces it:
//!
//! * [`Mt19937`] is PyTorch's CPU generator (the standard 32-bit Mersenne Twister seeded with the
//!   low 32 bits of the seed).
//! * [`torch_randn`] follows ATen's CPU normal kernel (`DistributionTemplates.h`):
//!   - 16 elements or more: fill every element with a float uniform `(r & 0xFFFFFF) * 2^-24`
//!     (one 32-bit draw each), then Box-Muller on blocks of 16 (`u1 = 1 - d[j]`, `u2 = d[j + 8]`,
//!     `j < 8`); when the length is not a multiple of 16 the last 16 elements are re-drawn and
//!     transformed again.
//!   - fewer than 16 elements: the serial path, one double-precision Box-Muller normal per element
//!     (53-bit uniforms from 64-bit draws; the second value of each pair is cached and used for the
//!     next element), rounded to `f32`.
//! * The Box-Muller block exists in two versions in PyTorch, which differ in the last bits; pick one
//!   with [`RandnKernel`]:
//!   - [`RandnKernel::Portable`]: the scalar kernel (`ATEN_CPU_CAPABILITY=default`, CPUs without
//!     AVX2, non-x86 builds). It calls the C library's `logf`, `sqrtf`, `sinf`/`cosf`; this
//!     module calls the same functions through `f32::ln`/`sin`/`cos`, so it is bit for bit equal
//!     where both use the same libm (checked against glibc).
//!   - [`RandnKernel::Vectorized`] (default): the AVX2 kernel that x86-64 machines with AVX2 or
//!     AVX-512 run (AVX-512 builds fall back to it). It uses the Cephes-style `log256_ps` and
//!     `sincos256_ps` of `avx_mathfun.h`; this module re-does them in scalar `f32` code with the
//!     multiply-adds fused exactly where the shipped PyTorch binary (GCC, `-mfma`) fuses them, so
//!     the result only depends on IEEE arithmetic and is the same on every platform.
//!
//! Only float32 is generated. PyTorch's float16/bfloat16 `randn` equals the float32 result
//! rounded for lengths that are multiples of 16 (every latent shape); callers that need a half
//! type generate float32 here and cast, which also keeps seeds stable across PyTorch versions.

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

/// A float32 noise tensor on the host, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Noise {
    /// Tensor shape, e.g. `[1, 4, 64, 64]`.
    pub shape: Vec<usize>,
    /// Row-major values; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}

const MT_N: usize = 624;
const MT_M: usize = 397;

/// PyTorch's CPU random engine: the standard 32-bit Mersenne Twister (MT19937).
///
/// Seeded like `torch.Generator("cpu").manual_seed(seed)`: only `seed & 0xffffffff` is used.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; MT_N],
    /// Index of the next state word to temper; `MT_N` means "regenerate first".
    index: usize,
}

impl fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mt19937")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Mt19937 {
    /// A generator in the state `manual_seed(seed)` leaves PyTorch's CPU generator in.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed as u32;
        for i in 1..MT_N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: MT_N }
    }

    /// Regenerates all 624 state words (the "twist").
    fn twist(&mut self) {
        for i in 0..MT_N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % MT_N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.state[i] = self.state[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// The next 32-bit output (PyTorch's `random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// The next 64-bit output (PyTorch's `random64()`): two 32-bit draws, the first one is the
    /// high half.
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32();
        let lo = self.next_u32();
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// A float32 uniform in [0, 1) from one 32-bit draw: `(r & 0xFFFFFF) * 2^-24`.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// A float64 uniform in [0, 1) from one 64-bit draw: `(r & (2^53 - 1)) * 2^-53`.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }
}

/// Which of PyTorch's two float32 Box-Muller kernels to reproduce (they differ in the last bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RandnKernel {
    /// The scalar kernel (`ATEN_CPU_CAPABILITY=default`, CPUs without AVX2, ARM builds).
    Portable,
    /// The AVX2 kernel run on x86-64 machines with AVX2 or AVX-512: what most diffusers users get.
    #[default]
    Vectorized,
}

impl RandnKernel {
    /// The name accepted by [`FromStr`]: `"portable"` or `"vectorized"`.
    pub fn as_str(self) -> &'static str {
        match self {
            RandnKernel::Portable => "portable",
            RandnKernel::Vectorized => "vectorized",
        }
    }
}

impl fmt::Display for RandnKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`RandnKernel`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown randn kernel {0:?}: use \"vectorized\" (PyTorch on x86-64 with AVX2/AVX-512, the default) or \"portable\" (ATEN_CPU_CAPABILITY=default, ARM)")]
pub struct ParseRandnKernelError(pub String);

impl FromStr for RandnKernel {
    type Err = ParseRandnKernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" => Ok(RandnKernel::Portable),
            "vectorized" => Ok(RandnKernel::Vectorized),
            _ => Err(ParseRandnKernelError(s.to_string())),
        }
    }
}

/// `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)`.
///
/// `kernel` picks which PyTorch build to match (see [`RandnKernel`]); it only matters for 16
/// elements or more. An empty shape (`[]`) is a scalar: one element.
pub fn torch_randn(seed: u64, shape: &[usize], kernel: RandnKernel) -> Noise {
    let n: usize = shape.iter().product();
    let mut rng = Mt19937::new(seed);
    let data = if n >= 16 {
        block_path(&mut rng, n, kernel)
    } else {
        serial_path(&mut rng, n)
    };
    Noise {
        shape: shape.to_vec(),
        data,
    }
}

/// Fewer than 16 elements: ATen's serial `normal_distribution<double>` (Box-Muller in double on
/// 53-bit uniforms, second value cached for the next element), rounded to f32.
fn serial_path(rng: &mut Mt19937, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    let mut cached: Option<f64> = None;
    for _ in 0..n {
        let value = match cached.take() {
            Some(v) => v,
            None => {
                let u1 = rng.uniform_f64();
                let u2 = rng.uniform_f64();
                let r = (-2.0 * (-u2).ln_1p()).sqrt();
                let theta = 2.0 * PI * u1;
                cached = Some(r * theta.sin());
                r * theta.cos()
            }
        };
        // `value * std + mean` with std = 1, mean = 0 (turns -0 into +0, as PyTorch does).
        out.push((value + 0.0) as f32);
    }
    out
}

/// 16 elements or more: uniforms for all, Box-Muller per block of 16, last 16 redrawn when the
/// length is not a multiple of 16.
fn block_path(rng: &mut Mt19937, n: usize, kernel: RandnKernel) -> Vec<f32> {
    let mut data: Vec<f32> = (0..n).map(|_| rng.uniform_f32()).collect();
    let whole = n - n % 16;
    transform_blocks(&mut data[..whole], kernel);
    if n % 16 != 0 {
        let tail = &mut data[n - 16..];
        for v in tail.iter_mut() {
            *v = rng.uniform_f32();
        }
        transform_blocks(tail, kernel);
    }
    data
}

/// Box-Muller on consecutive blocks of 16 uniforms (`data.len()` a multiple of 16), in place.
fn transform_blocks(data: &mut [f32], kernel: RandnKernel) {
    match kernel {
        RandnKernel::Portable => data.chunks_exact_mut(16).for_each(portable_fill16),
        RandnKernel::Vectorized => vectorized_blocks(data),
    }
}

/// The vectorized kernel over whole blocks, using the CPU's FMA instructions where there are
/// some (the result is the same either way: `mul_add` is always one correctly rounded operation,
/// done in software without hardware FMA, which is several times slower).
fn vectorized_blocks(data: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports the features the function is compiled for (checked above).
        unsafe { vectorized_blocks_fma(data) };
        return;
    }
    vectorized_blocks_generic(data);
}

#[inline(always)]
fn vectorized_blocks_generic(data: &mut [f32]) {
    let mut start = 0;
    while start + 16 <= data.len() {
        vectorized_fill16(&mut data[start..start + 16]);
        start += 16;
    }
}

/// [`vectorized_blocks_generic`] compiled with hardware FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
// SAFETY: unsafe only for its target features: callers must ensure the CPU has AVX2 and FMA
// (`vectorized_blocks` checks with is_x86_feature_detected!); the body is safe code.
unsafe fn vectorized_blocks_fma(data: &mut [f32]) {
    vectorized_blocks_generic(data);
}

/// ATen's scalar `NormalFill16` for float, mean 0, std 1.
fn portable_fill16(d: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        // `2.0f * c10::pi<double> * u2` is evaluated in double, then stored as float.
        let theta = (2.0 * PI * f64::from(u2)) as f32;
        // `fmaf(radius * cos, std, mean)` with std = 1, mean = 0 is an exact `+ 0`.
        d[j] = radius * theta.cos() + 0.0;
        d[j + 8] = radius * theta.sin() + 0.0;
    }
}

/// ATen's AVX2 `NormalFill16<float>` for mean 0, std 1, one lane at a time.
#[inline(always)]
fn vectorized_fill16(d: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: 2*pi rounded to float.
    const TWO_PI_F32: f32 = (2.0 * PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (cephes_logf(u1) * -2.0).sqrt();
        let (sin, cos) = cephes_sincosf(TWO_PI_F32 * u2);
        d[j] = radius * cos + 0.0;
        d[j + 8] = radius * sin + 0.0;
    }
}

// Constants of avx_mathfun.h (Cephes single precision), as the float bit patterns stored in the
// PyTorch binary; the Cephes decimal each one rounds from is in the comment.
const SQRTHF: f32 = f32::from_bits(0x3f35_04f3); // 0.707106781186547524
const LOG_P: [f32; 9] = [
    f32::from_bits(0x3d90_21bb), // 7.0376836292E-2
    f32::from_bits(0xbdeb_d1b8), // -1.1514610310E-1
    f32::from_bits(0x3def_251a), // 1.1676998740E-1
    f32::from_bits(0xbdfe_5d4f), // -1.2420140846E-1
    f32::from_bits(0x3e11_e9bf), // 1.4249322787E-1
    f32::from_bits(0xbe2a_ae50), // -1.6668057665E-1
    f32::from_bits(0x3e4c_ceac), // 2.0000714765E-1
    f32::from_bits(0xbe7f_fffc), // -2.4999993993E-1
    f32::from_bits(0x3eaa_aaaa), // 3.3333331174E-1
];
const LOG_Q1: f32 = f32::from_bits(0xb95e_8083); // -2.12194440e-4
const LOG_Q2: f32 = f32::from_bits(0x3f31_8000); // 0.693359375
const FOPI: f32 = f32::from_bits(0x3fa2_f983); // 4 / pi = 1.27323954473516
const MINUS_DP1: f32 = f32::from_bits(0xbf49_0000); // -0.78515625
const MINUS_DP2: f32 = f32::from_bits(0xb97d_a000); // -2.4187564849853515625e-4
const MINUS_DP3: f32 = f32::from_bits(0xb322_2169); // -3.77489497744594108e-8
const SINCOF: [f32; 3] = [
    f32::from_bits(0xb94c_a1f9), // -1.9515295891E-4
    f32::from_bits(0x3c08_839e), // 8.3321608736E-3
    f32::from_bits(0xbe2a_aaa3), // -1.6666654611E-1
];
const COSCOF: [f32; 3] = [
    f32::from_bits(0x37cc_f5ce), // 2.443315711809948E-5
    f32::from_bits(0xbab6_061a), // -1.388731625493765E-3
    f32::from_bits(0x3d2a_aaa5), // 4.166664568298827E-2
];

/// One lane of `log256_ps` (natural log, NaN for `x <= 0`), with the fused multiply-adds of the
/// shipped binary: the polynomial is a Horner chain of FMAs, `y*z + e*q1`, `y - z/2` and
/// `(x + y) + e*q2` are fused; `y * x` and `e * q1` are rounded separately.
#[inline(always)]
fn cephes_logf(x: f32) -> f32 {
    let invalid = x <= 0.0;
    // `_mm256_max_ps(x, min_norm_pos)`: cut off denormals (and NaN, which max drops here).
    let x = if x > f32::MIN_POSITIVE {
        x
    } else {
        f32::MIN_POSITIVE
    };
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    // Keep the mantissa, set the exponent of 0.5: m in [0.5, 1).
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below = m < SQRTHF;
    let tmp = if below { m } else { 0.0 };
    m -= 1.0;
    e -= if below { 1.0 } else { 0.0 };
    m += tmp;
    let z = m * m;
    let mut y = LOG_P[0];
    for &p in &LOG_P[1..] {
        y = y.mul_add(m, p);
    }
    y *= m;
    y = y.mul_add(z, e * LOG_Q1);
    y = (-z).mul_add(0.5, y);
    let r = e.mul_add(LOG_Q2, m + y);
    if invalid {
        f32::NAN
    } else {
        r
    }
}

/// One lane of `sincos256_ps`, returning `(sin, cos)`, with the fused multiply-adds of the shipped
/// binary: the three-part range reduction and both Horner chains are FMAs, as are
/// `z*y - z/2` (cosine) and `x*y + x` (sine).
#[inline(always)]
fn cephes_sincosf(theta: f32) -> (f32, f32) {
    let sign_in = theta.to_bits() & 0x8000_0000;
    let x = theta.abs();
    // Octant: j = (trunc(x * 4/pi) + 1) & !1. `as i32` truncates like cvttps2dq for the
    // arguments used here (0 <= x < 2*pi).
    let j = ((x * FOPI) as i32).wrapping_add(1) & !1;
    let yj = j as f32;
    let swap_sin = ((j & 4) as u32) << 29;
    let sign_cos = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;
    let poly_mask = (j & 2) == 0;
    let sign_sin = sign_in ^ swap_sin;

    // Extended-precision reduction x - j*pi/4, one FMA per part of pi/4.
    let x = yj.mul_add(MINUS_DP1, x);
    let x = yj.mul_add(MINUS_DP2, x);
    let x = yj.mul_add(MINUS_DP3, x);

    let z = x * x;
    let half_z = z * 0.5;
    let mut yc = COSCOF[0].mul_add(z, COSCOF[1]);
    yc = yc.mul_add(z, COSCOF[2]);
    yc *= z;
    yc = z.mul_add(yc, -half_z);
    yc += 1.0;

    let mut ys = SINCOF[0].mul_add(z, SINCOF[1]);
    ys = ys.mul_add(z, SINCOF[2]);
    ys *= z;
    ys = x.mul_add(ys, x);

    // The vector code selects with masks and adds/subtracts the masked parts; do the same so
    // signed zeros come out identical.
    let ysin2 = if poly_mask { ys } else { 0.0 };
    let ysin1 = if poly_mask { 0.0 } else { yc };
    let s = ysin1 + ysin2;
    let c = (yc - ysin1) + (ys - ysin2);
    (
        f32::from_bits(s.to_bits() ^ sign_sin),
        f32::from_bits(c.to_bits() ^ sign_cos),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_the_cephes_decimals_rounded_to_f32() {
        let pairs: [(f32, &str); 22] = [
            (SQRTHF, "0.707106781186547524"),
            (LOG_P[0], "7.0376836292E-2"),
            (LOG_P[1], "-1.1514610310E-1"),
            (LOG_P[2], "1.1676998740E-1"),
            (LOG_P[3], "-1.2420140846E-1"),
            (LOG_P[4], "1.4249322787E-1"),
            (LOG_P[5], "-1.6668057665E-1"),
            (LOG_P[6], "2.0000714765E-1"),
            (LOG_P[7], "-2.4999993993E-1"),
            (LOG_P[8], "3.3333331174E-1"),
            (LOG_Q1, "-2.12194440e-4"),
            (LOG_Q2, "0.693359375"),
            (FOPI, "1.27323954473516"),
            (MINUS_DP1, "-0.78515625"),
            (MINUS_DP2, "-2.4187564849853515625e-4"),
            (MINUS_DP3, "-3.77489497744594108e-8"),
            (SINCOF[0], "-1.9515295891E-4"),
            (SINCOF[1], "8.3321608736E-3"),
            (SINCOF[2], "-1.6666654611E-1"),
            (COSCOF[0], "2.443315711809948E-005"),
            (COSCOF[1], "-1.388731625493765E-003"),
            (COSCOF[2], "4.166664568298827E-002"),
        ];
        for (value, text) in pairs {
            assert_eq!(value, text.parse::<f32>().unwrap(), "{text}");
        }
    }

    #[test]
    fn cephes_logf_is_close_to_ln_on_the_unit_interval() {
        for i in 1..=1000 {
            let x = i as f32 / 1000.0;
            let got = cephes_logf(x);
            assert!(
                (got - x.ln()).abs() <= 2e-7 * x.ln().abs().max(1.0),
                "x={x}"
            );
        }
    }

    #[test]
    fn vectorized_kernel_gives_the_same_bits_with_and_without_hardware_fma() {
        let mut rng = Mt19937::new(11);
        let uniforms: Vec<f32> = (0..4096).map(|_| rng.uniform_f32()).collect();
        let mut generic = uniforms.clone();
        vectorized_blocks_generic(&mut generic);
        let mut dispatched = uniforms;
        vectorized_blocks(&mut dispatched);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&generic), bits(&dispatched));
    }

    #[test]
    fn cephes_logf_of_non_positive_is_nan() {
        assert!(cephes_logf(0.0).is_nan());
        assert!(cephes_logf(-1.0).is_nan());
    }

    #[test]
    fn cephes_sincosf_is_close_to_sin_cos_over_a_turn() {
        for i in 0..1000 {
            let t = i as f32 * (2.0 * std::f32::consts::PI / 1000.0);
            let (s, c) = cephes_sincosf(t);
            assert!((s - t.sin()).abs() < 3e-7, "sin({t})");
            assert!((c - t.cos()).abs() < 3e-7, "cos({t})");
        }
    }
}
