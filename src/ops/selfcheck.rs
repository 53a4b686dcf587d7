//! The fused kernels check themselves before they are trusted. They were written and emulated
//! here but have not all run on every GPU generation, so on the first use of each kernel family
//! per (device, dtype, head size where it matters) the kernel runs a small random problem and
//! its output is compared with the same function's float32 CPU implementation (the reference
//! the GPU tests use). Beyond the dtype's tolerance, or on a failed launch, a warning is logged
//! once and the models' plain candle composition serves that family for the rest of the process,
//! as cuDNN and the wgmma attention tiles already do ([`super::conv_cudnn_ok`]).
//!
//! The mechanism runs on the CPU too, for tests: [`with_cpu_kernels`] lets the fused path run
//! there (the CPU implementations stand in for the kernels) and [`with_faulty_kernel`] makes a
//! family's kernel return wrong results where the check runs it ([`fused_for`](super::fused_for)
//! asks for the check), so a test can see the check catch it and the models fall back.
//!
//! cuDNN's convolution is checked here too ([`cudnn_conv_ok`]), against candle's. Above
//! [`super::fused`]: the kernels know nothing of their checks.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device, DeviceLocation, Result, Tensor};

use super::fused;
use super::kernels::{Activation, KeyMask};
use super::settings::with_override;

/// A family of fused kernels, checked as one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Attention ([`super::attention`], [`super::attention_masked`]); per head size.
    Attention,
    /// [`fused::layer_norm_modulate`].
    LayerNormModulate,
    /// [`fused::qk_norm_rope`] and its joint form; per head size.
    QkNormRope,
    /// [`fused::group_norm`] (with and without SiLU).
    GroupNorm,
    /// [`fused::gelu_tanh`] and [`fused::geglu`].
    Gelu,
    /// The cuBLASLt products: [`fused::linear`] (with and without GELU), [`fused::linear_sum`].
    Linear,
    /// [`fused::gated_residual`].
    GatedResidual,
}

impl Kernel {
    /// Every family.
    pub const ALL: [Kernel; 7] = [
        Kernel::Attention,
        Kernel::LayerNormModulate,
        Kernel::QkNormRope,
        Kernel::GroupNorm,
        Kernel::Gelu,
        Kernel::Linear,
        Kernel::GatedResidual,
    ];

    /// Whether the verdict depends on the head size (the kernel is instantiated per size).
    fn per_head_size(self) -> bool {
        matches!(self, Kernel::Attention | Kernel::QkNormRope)
    }
}

/// The largest relative difference (max |kernel - reference| / max |reference|) a kernel may
/// show on its check problem in `dtype`.
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 3e-2,
        DType::F16 => 5e-3,
        _ => 1e-3,
    }
}

type Key = (DeviceLocation, DType, Kernel, usize);

thread_local! {
    static CPU_KERNELS: Cell<Option<bool>> = const { Cell::new(None) };
    static FAULTY: Cell<Option<Kernel>> = const { Cell::new(None) };
    /// Verdicts for the CPU stand-ins, per thread, so tests do not see each other's.
    static CPU_VERDICTS: RefCell<HashMap<Key, bool>> = RefCell::new(HashMap::new());
    static CHECKS_RUN: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f` with the fused path taken on the CPU too (the kernels' CPU implementations stand in
/// for them), on this thread: for tests of the self-check and of the models' dispatch.
pub fn with_cpu_kernels<R>(f: impl FnOnce() -> R) -> R {
    with_override(&CPU_KERNELS, true, f)
}

/// Whether [`with_cpu_kernels`] is in effect on this thread.
pub fn cpu_kernels() -> bool {
    CPU_KERNELS.with(Cell::get).unwrap_or(false)
}

/// Runs `f` with `kernel`'s outputs corrupted (1 added to every element) where its check runs it
/// on this thread, as a broken kernel's would be: for tests that the self-check catches it.
pub fn with_faulty_kernel<R>(kernel: Kernel, f: impl FnOnce() -> R) -> R {
    with_override(&FAULTY, kernel, f)
}

/// `out` as the check sees kernel `kernel`'s output: corrupted under [`with_faulty_kernel`].
fn as_checked(kernel: Kernel, out: Vec<Tensor>) -> Result<Vec<Tensor>> {
    if FAULTY.with(Cell::get) == Some(kernel) {
        out.into_iter().map(|t| t.affine(1.0, 1.0)).collect()
    } else {
        Ok(out)
    }
}

/// How many self-checks have run on this thread (tests: a verdict is reached once).
pub fn checks_run() -> usize {
    CHECKS_RUN.with(Cell::get)
}

/// Whether `kernel` may serve tensors on `device` in `dtype` (`head_size` matters for attention
/// and qk_norm_rope only): decided by one check on first use, remembered for the process (for
/// the CPU stand-ins, for the thread).
pub fn trusted(kernel: Kernel, device: &Device, dtype: DType, head_size: usize) -> bool {
    let class = if kernel.per_head_size() { head_size } else { 0 };
    let key = (device.location(), dtype, kernel, class);
    let decide = || {
        CHECKS_RUN.with(|c| c.set(c.get() + 1));
        match check(kernel, device, dtype, class) {
            Ok(err) if err <= tolerance(dtype) => {
                tracing::debug!(
                    "fused {kernel:?} kernel ({dtype:?}{}) matches its reference (relative \
                     difference {err:.1e})",
                    head(class)
                );
                true
            }
            Ok(err) => {
                tracing::warn!(
                    "the fused {kernel:?} kernel ({dtype:?}{}) on {:?} disagrees with its \
                     reference (relative difference {err:.2e} > {:.0e}); using the plain candle \
                     path for it from now on",
                    head(class),
                    device.location(),
                    tolerance(dtype)
                );
                false
            }
            Err(e) => {
                tracing::warn!(
                    "the fused {kernel:?} kernel ({dtype:?}{}) on {:?} failed its check ({e}); \
                     using the plain candle path for it from now on",
                    head(class),
                    device.location()
                );
                false
            }
        }
    };
    if device.is_cpu() {
        if let Some(v) = CPU_VERDICTS.with(|m| m.borrow().get(&key).copied()) {
            return v;
        }
        let v = decide();
        CPU_VERDICTS.with(|m| m.borrow_mut().insert(key, v));
        return v;
    }
    static VERDICTS: OnceLock<Mutex<HashMap<Key, bool>>> = OnceLock::new();
    let verdicts = VERDICTS.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(&v) = verdicts.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return v;
    }
    // Decided outside the lock: the check runs kernels, which may take the lock's time.
    let v = decide();
    *verdicts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_insert(v)
}

fn head(class: usize) -> String {
    if class > 0 {
        format!(", head size {class}")
    } else {
        String::new()
    }
}

/// A random tensor of `shape` on the CPU in float32.
fn randn(shape: &[usize]) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
}

/// The relative difference between `kernel` on `device` in `dtype` and the float32 CPU
/// implementation, on a small random problem of the family: what the check compares with
/// [`tolerance`] (public for tests of injected faults).
pub fn check(kernel: Kernel, device: &Device, dtype: DType, head_size: usize) -> Result<f32> {
    // Inputs drawn once on the CPU; `run` gets them on its device and dtype.
    let compare = |inputs: Vec<Tensor>, run: &dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>| {
        let on = |device: &Device, dtype: DType| -> Result<Vec<Tensor>> {
            inputs
                .iter()
                .map(|t| t.to_dtype(dtype)?.to_device(device))
                .collect()
        };
        let got = as_checked(kernel, run(&on(device, dtype)?)?)?;
        // The reference is the CPU implementation as it is, whatever fault a test injected
        // into the kernel.
        let want = run(&on(&Device::Cpu, DType::F32)?)?;
        let mut worst = 0f32;
        for (g, w) in got.iter().zip(&want) {
            let g = g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            let diff = (&g - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let norm = w.abs()?.max_all()?.to_scalar::<f32>()?;
            let rel = if diff.is_finite() {
                diff / norm.max(1e-6)
            } else {
                f32::INFINITY
            };
            worst = worst.max(rel);
        }
        Ok(worst)
    };
    match kernel {
        Kernel::Attention => {
            let d = head_size;
            // Token-major views (B, H, L, D) of (B, L, H, D), as the models pass them.
            let view = |l: usize| -> Result<Tensor> { randn(&[1, l, 2, d]) };
            compare(vec![view(40)?, view(48)?, view(48)?], &|t| {
                let [q, k, v] = [0, 1, 2].map(|i| t[i].transpose(1, 2));
                let (q, k, v) = (q?, k?, v?);
                let scale = 1.0 / (d as f64).sqrt();
                let mask = KeyMask {
                    lens: Some(vec![45]),
                    ..KeyMask::default()
                };
                let tile = super::tuning::choose_tile(&q);
                Ok(vec![fused::attention_kernel(
                    &q, &k, &v, scale, &mask, tile,
                )?])
            })
        }
        Kernel::LayerNormModulate => compare(
            vec![
                randn(&[2, 8, 64])?,
                randn(&[2, 1, 64])?,
                randn(&[2, 1, 64])?,
            ],
            &|t| {
                Ok(vec![fused::layer_norm_modulate(
                    &t[0],
                    None,
                    None,
                    Some(&t[1]),
                    Some(&t[2]),
                    1e-6,
                )?])
            },
        ),
        Kernel::QkNormRope => {
            let d = head_size;
            let angles = Tensor::arange(0f32, (16 * d / 2) as f32, &Device::Cpu)?
                .reshape((16, d / 2))?
                .affine(0.01, 0.0)?;
            let (cos, sin) = (angles.cos()?, angles.sin()?);
            compare(
                vec![randn(&[1, 16, 3 * 2 * d])?, randn(&[d])?, randn(&[d])?],
                &|t| {
                    let (cos, sin) = (cos.to_device(t[0].device())?, sin.to_device(t[0].device())?);
                    Ok(vec![fused::qk_norm_rope(
                        &t[0], 2, &t[1], &t[2], &cos, &sin, 0, 1e-6,
                    )?])
                },
            )
        }
        Kernel::GroupNorm => compare(
            vec![randn(&[1, 32, 8, 8])?, randn(&[32])?, randn(&[32])?],
            &|t| {
                Ok(vec![
                    fused::group_norm(&t[0], 8, Some(&t[1]), Some(&t[2]), 1e-5, true)?,
                    fused::group_norm(&t[0], 8, Some(&t[1]), Some(&t[2]), 1e-5, false)?,
                ])
            },
        ),
        Kernel::Gelu => compare(vec![randn(&[2, 16, 128])?], &|t| {
            Ok(vec![fused::gelu_tanh(&t[0])?, fused::geglu(&t[0])?])
        }),
        Kernel::Linear => compare(
            vec![
                randn(&[2, 16, 64])?,
                randn(&[96, 64])?.affine(0.125, 0.0)?,
                randn(&[96])?,
                randn(&[2, 16, 32])?,
                randn(&[96, 32])?.affine(0.125, 0.0)?,
            ],
            &|t| {
                let gelu = Some(Activation::GeluTanh);
                Ok(vec![
                    fused::linear(&t[0], &t[1], Some(&t[2]), None)?,
                    fused::linear(&t[0], &t[1], Some(&t[2]), gelu)?,
                    fused::linear_sum(&t[0], &t[1], &t[3], &t[4], Some(&t[2]))?,
                ])
            },
        ),
        Kernel::GatedResidual => compare(
            vec![
                randn(&[2, 16, 64])?,
                randn(&[2, 1, 64])?,
                randn(&[2, 16, 64])?,
            ],
            &|t| Ok(vec![fused::gated_residual(&t[0], &t[1], &t[2])?]),
        ),
    }
}

/// Whether cuDNN's convolution can serve `dtype` on this device: the library loads (the
/// outcome is logged once), a session opens, and, checked once per device and dtype, it agrees
/// with candle's convolution on random problems like the UNets' (3×3 stride 1 and 2, 1×1, odd
/// sizes, with a bias). `TT_SCALE_CUDNN=0` answers no.
#[cfg(feature = "cuda")]
pub fn cudnn_conv_ok(dev: &candle_core::CudaDevice, dtype: DType) -> bool {
    use super::cudnn::Cudnn;
    use candle_core::cuda_backend::DeviceId;
    static OFF: OnceLock<bool> = OnceLock::new();
    if *OFF.get_or_init(|| super::settings::env_says_off("TT_SCALE_CUDNN")) {
        return false;
    }
    type Verdicts = Mutex<HashMap<(DeviceId, DType), bool>>;
    static CHECKED: OnceLock<Verdicts> = OnceLock::new();
    let key = (dev.id(), dtype);
    let checked = CHECKED.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(&ok) = checked.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return ok;
    }
    let ok = match cudnn_check(dev, dtype) {
        Ok(err) => {
            let bound = match dtype {
                DType::F32 => 1e-4,
                DType::F16 => 4e-3,
                _ => 2e-2,
            };
            if err <= bound {
                let lib = Cudnn::global().map(|l| (l.path().to_string(), l.version()));
                if let Ok((path, version)) = lib {
                    tracing::info!(
                        "conv2d: cuDNN {version} ({path}) matches candle's convolution                          ({dtype:?}, relative difference {err:.1e}); using it"
                    );
                }
                true
            } else {
                tracing::warn!(
                    "conv2d: cuDNN disagrees with candle's convolution ({dtype:?}, relative                      error {err:.2e}); using candle's"
                );
                false
            }
        }
        Err(e) => {
            tracing::warn!("conv2d: cuDNN unavailable ({e}); using candle's convolution");
            false
        }
    };
    checked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, ok);
    ok
}

/// The largest relative difference (to the largest magnitude) between cuDNN's and candle's
/// convolution over a few random problems on `dev`, in `dtype`.
#[cfg(feature = "cuda")]
fn cudnn_check(dev: &candle_core::CudaDevice, dtype: DType) -> Result<f32> {
    use candle_core::bail;
    let device = candle_core::Device::Cuda(dev.clone());
    let cfg = |padding, stride| candle_nn::Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    let mut worst = 0f32;
    for (c, k, kernel, conv) in [
        (20, 24, 3, cfg(1, 1)),
        (20, 24, 3, cfg(1, 2)),
        (24, 16, 1, cfg(0, 1)),
    ] {
        let x = Tensor::randn(0f32, 1.0, (2, c, 13, 11), &device)?.to_dtype(dtype)?;
        let w = (Tensor::randn(0f32, 1.0, (k, c, kernel, kernel), &device)?
            / ((c * kernel * kernel) as f64).sqrt())?
        .to_dtype(dtype)?;
        let b = Tensor::randn(0f32, 1.0, k, &device)?.to_dtype(dtype)?;
        let got = super::fused::conv2d(&x, &w, Some(&b), &conv)?.to_dtype(DType::F32)?;
        let want = x
            .conv2d(&w, conv.padding, conv.stride, conv.dilation, conv.groups)?
            .broadcast_add(&b.reshape((1, k, 1, 1))?)?
            .to_dtype(DType::F32)?;
        if got.dims() != want.dims() {
            bail!(
                "cuDNN gave {:?} where candle gives {:?}",
                got.dims(),
                want.dims()
            );
        }
        let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let norm = want.abs()?.max_all()?.to_scalar::<f32>()?;
        let err = if diff.is_finite() {
            diff / norm.max(1e-6)
        } else {
            f32::INFINITY
        };
        worst = worst.max(err);
    }
    Ok(worst)
}
