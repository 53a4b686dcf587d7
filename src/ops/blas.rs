//! Float32 matrix products on the CPU through the system's OpenBLAS, opened at run time.
//!
//! candle's CPU backend multiplies with the `gemm` crate, which reaches about 50-65 GFLOP/s on the
//! 2-core development box where OpenBLAS's `cblas_sgemm` (Debian's `libopenblas0-pthread`) gives
//! about 125 GFLOP/s; torch (oneDNN) gives about 100. The CPU paths of the CLIP, BLIP and
//! transformer layers go through [`matmul`] and [`linear`]: with OpenBLAS present they run there,
//! otherwise (or with `TT_SCALE_BLAS=0`) through candle's matmul, unchanged.
//!
//! Like cuDNN ([`super::cudnn`]), the library is not linked: `TT_SCALE_BLAS` names a file, or the
//! dynamic loader is asked for `libopenblas.so.0`, then `libopenblas.so`. On first use one product
//! is checked against candle's; a disagreement disables the library with one warning. Only
//! 32-bit-integer builds export `cblas_sgemm` under that name (the ILP64 builds suffix it), so the
//! signature below is the one resolved.

use std::ffi::c_int;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Library names tried, in order, when `TT_SCALE_BLAS` does not name one.
pub const DEFAULT_NAMES: [&str; 2] = ["libopenblas.so.0", "libopenblas.so"];

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

/// Why the BLAS library is not in use.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BlasError {
    /// Switched off by `TT_SCALE_BLAS=0`.
    #[error("switched off by TT_SCALE_BLAS")]
    Disabled,
    /// No library could be opened.
    #[error("no OpenBLAS found ({tried}); install libopenblas0-pthread (Debian/Ubuntu) or set TT_SCALE_BLAS to the library's path for faster CPU matrix products")]
    NotFound {
        /// Each name tried and the loader's reason.
        tried: String,
    },
    /// The library lacks `cblas_sgemm` (an ILP64 build, or not a CBLAS).
    #[error("{lib} has no cblas_sgemm (an ILP64 or non-CBLAS build?)")]
    MissingSymbol {
        /// The library.
        lib: String,
    },
    /// Its product disagreed with candle's on the check problem.
    #[error("{lib}: cblas_sgemm disagreed with candle's matmul by {diff} on the check problem")]
    CheckFailed {
        /// The library.
        lib: String,
        /// The largest difference seen.
        diff: f32,
    },
}

/// A matrix operand in row-major order: its rows are `ld` apart, or it is stored transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operand {
    /// Stored transposed (column-major), as `k.t()` is.
    pub trans: bool,
    /// Leading dimension of the stored matrix.
    pub ld: usize,
}

impl Operand {
    /// How a (rows, cols) matrix with strides `(s_row, s_col)` can be handed to BLAS without a
    /// copy: unit column stride (row-major, `ld = s_row`) or unit row stride (transposed,
    /// `ld = s_col`); `None` for any other layout.
    pub fn of(rows: usize, cols: usize, s_row: usize, s_col: usize) -> Option<Self> {
        if s_col == 1 || cols <= 1 {
            let ld = if rows <= 1 { cols.max(1) } else { s_row };
            if ld >= cols.max(1) {
                return Some(Self { trans: false, ld });
            }
        }
        if s_row == 1 || rows <= 1 {
            let ld = if cols <= 1 { rows.max(1) } else { s_col };
            if ld >= rows.max(1) {
                return Some(Self { trans: true, ld });
            }
        }
        None
    }

    /// Elements a stored (rows, cols) matrix spans from its first element.
    fn span(self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            return 0;
        }
        if self.trans {
            (cols - 1) * self.ld + rows
        } else {
            (rows - 1) * self.ld + cols
        }
    }
}

/// An opened BLAS library.
pub struct Blas {
    sgemm: Sgemm,
    path: String,
    // Keeps `sgemm` mapped; dropped last.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").field("path", &self.path).finish()
    }
}

impl Blas {
    /// Opens the library at `path` (a file or a name the loader searches for) and resolves
    /// `cblas_sgemm`.
    pub fn open(path: &str) -> std::result::Result<Self, BlasError> {
        // SAFETY: loading runs the library's initialisers; OpenBLAS's detect the CPU and set up
        // its thread pool.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| BlasError::NotFound {
            tried: format!("{path}: {e}"),
        })?;
        // SAFETY: the type is cblas_sgemm's C signature in cblas.h with 32-bit ints (the enums
        // are C ints), which is what a library exporting this unsuffixed name implements.
        let symbol = unsafe { lib.get::<Sgemm>(b"cblas_sgemm\0") };
        let sgemm = *symbol.map_err(|_| BlasError::MissingSymbol {
            lib: path.to_string(),
        })?;
        Ok(Self {
            sgemm,
            path: path.to_string(),
            _lib: lib,
        })
    }

    /// Opens what `TT_SCALE_BLAS` names (`0`, `off`, `false`, `no`: none), else the first of
    /// [`DEFAULT_NAMES`] the loader finds.
    pub fn load() -> std::result::Result<Self, BlasError> {
        if let Some(v) = std::env::var_os("TT_SCALE_BLAS") {
            let v = v.to_string_lossy().to_string();
            if matches!(
                v.to_ascii_lowercase().as_str(),
                "0" | "off" | "false" | "no"
            ) {
                return Err(BlasError::Disabled);
            }
            return Self::open(&v);
        }
        let mut tried = Vec::new();
        for name in DEFAULT_NAMES {
            match Self::open(name) {
                Ok(lib) => return Ok(lib),
                Err(BlasError::NotFound { tried: why }) => tried.push(why),
                Err(e) => return Err(e),
            }
        }
        Err(BlasError::NotFound {
            tried: tried.join("; "),
        })
    }

    /// The process's library: [`Blas::load`] and the check against candle on first use (the
    /// outcome is kept, and logged once).
    pub fn global() -> std::result::Result<&'static Blas, BlasError> {
        static LIB: OnceLock<std::result::Result<Blas, BlasError>> = OnceLock::new();
        LIB.get_or_init(|| {
            let outcome = Self::load().and_then(|lib| lib.check().map(|()| lib));
            match &outcome {
                Ok(lib) => tracing::debug!("CPU matrix products on {}", lib.path),
                Err(BlasError::Disabled) => {}
                Err(e) => tracing::debug!("CPU matrix products on candle's gemm: {e}"),
            }
            outcome
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    /// The library's path as opened.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `c = a · b + beta · c` for a (m, k) and b (k, n) stored as `oa` and `ob` describe,
    /// starting at the slices' first elements; `c` row-major (m, n) with rows `n` apart (`beta`
    /// 0: its contents are ignored). Checks that every operand's span lies inside its slice and
    /// that the sizes fit C ints.
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        oa: Operand,
        b: &[f32],
        ob: Operand,
        beta: f32,
        c: &mut [f32],
    ) -> Result<()> {
        let fits = |v: usize| c_int::try_from(v).is_ok();
        if ![m, n, k, oa.ld, ob.ld].into_iter().all(fits) {
            candle_core::bail!("blas: sizes {m}x{k}x{n} exceed a C int");
        }
        if oa.span(m, k) > a.len() || ob.span(k, n) > b.len() || m * n > c.len() {
            candle_core::bail!("blas: an operand lies outside its buffer");
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            c[..m * n].iter_mut().for_each(|v| *v *= beta);
            return Ok(());
        }
        let t = |o: Operand| if o.trans { TRANS } else { NO_TRANS };
        // SAFETY: the spans of a and b (as read with their transposition flags and leading
        // dimensions) were checked to lie inside the slices, c holds m·n elements written with
        // ldc = n, every size fits a C int, and cblas_sgemm keeps no pointer after returning.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                t(oa),
                t(ob),
                m as c_int,
                n as c_int,
                k as c_int,
                1.0,
                a.as_ptr(),
                oa.ld as c_int,
                b.as_ptr(),
                ob.ld as c_int,
                beta,
                c.as_mut_ptr(),
                n as c_int,
            )
        };
        Ok(())
    }

    /// Multiplies a fixed pseudo-random 67x45 by 45x71 problem both ways and compares.
    fn check(&self) -> std::result::Result<(), BlasError> {
        let (m, k, n) = (67usize, 45usize, 71usize);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
            .collect();
        let mut c = vec![0f32; m * n];
        let failed = |diff: f32| BlasError::CheckFailed {
            lib: self.path.clone(),
            diff,
        };
        self.sgemm(
            (m, n, k),
            &a,
            Operand {
                trans: false,
                ld: k,
            },
            &b,
            Operand {
                trans: false,
                ld: n,
            },
            0.0,
            &mut c,
        )
        .map_err(|_| failed(f32::NAN))?;
        let dev = candle_core::Device::Cpu;
        let want = Tensor::from_vec(a, (m, k), &dev)
            .and_then(|ta| ta.matmul(&Tensor::from_vec(b, (k, n), &dev)?))
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|_| failed(f32::NAN))?;
        let diff = c
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        if diff <= 1e-4 {
            Ok(())
        } else {
            Err(failed(diff))
        }
    }
}

/// Whether [`matmul`] and [`linear`] use BLAS for `t` (float32 on the CPU, library present).
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && Blas::global().is_ok()
}

/// The batched product as a candle op: a (…, m, k) · b (…, k, n) with equal batch dimensions,
/// plus `bias` (n) on every row when given (BLAS adds it: the output starts as the bias rows and
/// the product accumulates onto them, saving a pass over the output).
struct MatMulOp {
    bias: Option<Vec<f32>>,
}

/// Offsets of every batch matrix of a tensor with `layout` (all dimensions before the last two).
fn batch_offsets(layout: &Layout) -> Vec<usize> {
    let dims = layout.dims();
    let strides = layout.stride();
    let batch_dims = dims.len().saturating_sub(2);
    let mut offsets = vec![layout.start_offset()];
    for d in 0..batch_dims {
        let mut next = Vec::with_capacity(offsets.len() * dims[d]);
        for &o in &offsets {
            for i in 0..dims[d] {
                next.push(o + i * strides[d]);
            }
        }
        offsets = next;
    }
    offsets
}

impl CustomOp2 for MatMulOp {
    fn name(&self) -> &'static str {
        "blas-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let blas = Blas::global().map_err(candle_core::Error::wrap)?;
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("blas-matmul: float32 operands only");
        };
        let (da, db) = (l1.dims(), l2.dims());
        let r = da.len();
        if r < 2 || db.len() != r || da[..r - 2] != db[..r - 2] || da[r - 1] != db[r - 2] {
            candle_core::bail!("blas-matmul: shapes {da:?} and {db:?} do not multiply");
        }
        let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
        let (sa, sb) = (l1.stride(), l2.stride());
        let oa = Operand::of(m, k, sa[r - 2], sa[r - 1])
            .ok_or_else(|| candle_core::Error::Msg("blas-matmul: a's layout".into()))?;
        let ob = Operand::of(k, n, sb[r - 2], sb[r - 1])
            .ok_or_else(|| candle_core::Error::Msg("blas-matmul: b's layout".into()))?;
        let (offs_a, offs_b) = (batch_offsets(l1), batch_offsets(l2));
        let (mut out, beta) = match &self.bias {
            Some(bias) if bias.len() == n => (bias.repeat(offs_a.len() * m), 1.0),
            Some(bias) => {
                candle_core::bail!("blas-matmul: a bias of {} for {n} columns", bias.len())
            }
            None => (vec![0f32; offs_a.len() * m * n], 0.0),
        };
        for ((&oa_off, &ob_off), c) in offs_a
            .iter()
            .zip(&offs_b)
            .zip(out.chunks_mut((m * n).max(1)))
        {
            let a_slice = a
                .get(oa_off..)
                .ok_or_else(|| candle_core::Error::Msg("blas-matmul: a's offset".into()))?;
            let b_slice = b
                .get(ob_off..)
                .ok_or_else(|| candle_core::Error::Msg("blas-matmul: b's offset".into()))?;
            blas.sgemm((m, n, k), a_slice, oa, b_slice, ob, beta, c)?;
        }
        let mut shape = da.to_vec();
        shape[r - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// Whether the last two dimensions of `t` can be handed to BLAS as they are stored.
fn blas_layout(t: &Tensor) -> bool {
    let (dims, strides) = (t.dims(), t.stride());
    let r = dims.len();
    r >= 2 && Operand::of(dims[r - 2], dims[r - 1], strides[r - 2], strides[r - 1]).is_some()
}

/// `a.matmul(b)` (batch dimensions equal): on OpenBLAS for float32 CPU tensors where it is
/// available (operands in any row- or column-major layout, copied otherwise), else candle's.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !(applies(a) && b.dtype() == DType::F32 && b.device().is_cpu()) {
        return a.matmul(b);
    }
    product(a, b, None)
}

/// [`matmul`]'s BLAS path, with `bias` (n) added to every row inside the product.
fn product(a: &Tensor, b: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let a = if blas_layout(a) {
        a.clone()
    } else {
        a.contiguous()?
    };
    let b = if blas_layout(b) {
        b.clone()
    } else {
        b.contiguous()?
    };
    let bias = match bias {
        Some(t) => Some(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    a.apply_op2_no_bwd(&b, &MatMulOp { bias })
}

/// `x · weightᵀ + bias` over the leading dimensions of `x` (…, in) → (…, out): [`matmul`] on one
/// 2-D product where BLAS applies, else `candle_nn::Linear`'s own forward.
pub fn linear(layer: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    if !applies(x) || layer.weight().dtype() != DType::F32 {
        return layer.forward(x);
    }
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / k.max(1);
    let y = product(&x.reshape((rows, k))?, &layer.weight().t()?, layer.bias())?;
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = layer.weight().dim(0)?;
    }
    y.reshape(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_map_to_blas_operands() {
        // Row-major with padding, transposed, a vector, and a strided view BLAS cannot take.
        assert_eq!(
            Operand::of(3, 4, 6, 1),
            Some(Operand {
                trans: false,
                ld: 6
            })
        );
        assert_eq!(
            Operand::of(3, 4, 1, 3),
            Some(Operand { trans: true, ld: 3 })
        );
        assert_eq!(
            Operand::of(1, 5, 5, 1),
            Some(Operand {
                trans: false,
                ld: 5
            })
        );
        assert_eq!(Operand::of(3, 4, 8, 2), None);
        assert_eq!(
            Operand {
                trans: false,
                ld: 6
            }
            .span(3, 4),
            16
        );
        assert_eq!(Operand { trans: true, ld: 3 }.span(3, 4), 12);
    }

    #[test]
    fn batch_offsets_follow_the_strides() {
        let t = Tensor::zeros((2, 3, 4, 5), DType::F32, &candle_core::Device::Cpu).unwrap();
        let t = t.transpose(0, 1).unwrap();
        let (_, layout) = t.storage_and_layout();
        assert_eq!(
            batch_offsets(layout),
            vec![0, 60, 20, 80, 40, 100],
            "(3, 2) batch of a transposed (2, 3) one"
        );
    }
}
