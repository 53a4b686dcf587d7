//! Launching the project's CUDA kernels (PTX embedded at build time, see build.rs), cuBLASLt
//! and cuDNN's convolution: a leaf of launchers, each given a kernel's values
//! ([`super::kernels`]); which kernel may run, and with which tile, is decided above
//! ([`super::selfcheck`], [`super::tuning`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{self, CudaBlasLT, Matmul, MatmulConfig};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

use super::cudnn::{Cudnn, CudnnError, Session};
use super::gpu::{hopper, sm90a};
use super::kernels::{
    Activation, AttentionOp, ConvOp, GatedResidualOp, GeluOp, GroupNormOp, LayerNormModOp,
    LinearOp, QkNormRopeOp,
};
use super::settings::{attention_layout_ok, group_norm_chunks, ATTENTION_HEAD_DIMS};

const ATTENTION_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/attention_sm80.ptx"));
const ATTENTION_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/attention_sm90.ptx"));
const ATTENTION_SM90A: &str = include_str!(concat!(env!("OUT_DIR"), "/attention_sm90a.ptx"));
const NORM_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/norm_sm80.ptx"));
const NORM_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/norm_sm90.ptx"));

/// The PTX of a kernel file for this device, and the name candle caches its module under.
fn module(dev: &CudaDevice, file: Kernels) -> (&'static str, &'static str) {
    match file {
        Kernels::Attention if sm90a(dev) => (ATTENTION_SM90A, "tt-attention-sm90a"),
        Kernels::Attention if hopper(dev) => (ATTENTION_SM90, "tt-attention-sm90"),
        Kernels::Attention => (ATTENTION_SM80, "tt-attention-sm80"),
        Kernels::Norm if hopper(dev) => (NORM_SM90, "tt-norm-sm90"),
        Kernels::Norm => (NORM_SM80, "tt-norm-sm80"),
    }
}

/// The kernel files (kernels/*.cu).
#[derive(Clone, Copy)]
enum Kernels {
    Attention,
    Norm,
}

/// Loads (once per device) and returns kernel `name` of `file`.
macro_rules! kernel {
    ($dev:expr, $file:expr, $name:expr) => {{
        let (ptx, id) = module($dev, $file);
        $dev.get_or_load_custom_func(&$name, id, ptx)?
    }};
}

/// Calls the `f32`/`bf16`/`f16` instance of a generic launcher for a storage dtype.
macro_rules! float_dispatch {
    ($dtype:expr, $what:literal, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            other => bail!("{} takes f32, bf16 or f16, not {other:?}", $what),
        }
    };
}

/// Calls the `bf16`/`f16` instance of a generic launcher (tensor-core kernels, cuBLASLt).
macro_rules! half_dispatch {
    ($dtype:expr, $what:literal, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::BF16 => $f::<half::bf16>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            other => bail!("{} takes bf16 or f16, not {other:?}", $what),
        }
    };
}

/// A launch of `grid` blocks of `threads` threads, no dynamic shared memory.
fn launch_config(grid: (u32, u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => bail!("the fused kernels take f32, bf16 or f16, not {other:?}"),
    })
}

/// `storage` from the layout's start offset on.
fn view<'a, T: CudaDType>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
    Ok(storage.as_cuda_slice::<T>()?.slice(layout.start_offset()..))
}

/// A tensor's storage (read-locked) and layout.
fn hold(t: &Tensor) -> (candle_core::StorageRef<'_>, Layout) {
    let (storage, layout) = t.storage_and_layout();
    (storage, layout.clone())
}

/// A held operand's view from its start offset (any layout; the caller checked it), or an
/// error where it is not on the CUDA device.
fn held_any<'a, T: CudaDType>(
    guard: &'a (candle_core::StorageRef<'a>, Layout),
) -> Result<Option<CudaView<'a, T>>> {
    match &*guard.0 {
        Storage::Cuda(s) => Ok(Some(view::<T>(s, &guard.1)?)),
        _ => bail!("fused op: an operand is not on the CUDA device"),
    }
}

/// Runs `f` with a held tensor's CUDA storage and layout.
fn with_cuda<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => f(s, layout),
        _ => bail!("fused op: an operand is not on the CUDA device"),
    }
}

/// A device pointer as a kernel argument (0 for an absent operand), with the operand's view
/// kept alive by the caller.
fn ptr<T>(v: Option<&CudaView<'_, T>>, dev: &CudaDevice) -> u64 {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    match v {
        Some(v) => {
            let stream = dev.cuda_stream();
            let (p, _sync) = v.device_ptr(&stream);
            p
        }
        None => 0,
    }
}

pub(super) fn attention(
    op: &AttentionOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    half_dispatch!(
        s1.dtype(),
        "fused attention takes bf16 or f16",
        attention_t(op, s1, l1, s2, l2, s3, l3)
    )
}

#[allow(clippy::too_many_arguments)]
fn attention_t<T: CudaDType + DeviceRepr>(
    op: &AttentionOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s1.device;
    let (b, h, lq, d) = l1.shape().dims4()?;
    let (hk, lk) = (l2.dims()[1], l2.dims()[2]);
    if hk == 0 || h % hk != 0 {
        bail!("fused attention: {h} query heads are not a multiple of {hk} key heads");
    }
    if !ATTENTION_HEAD_DIMS.contains(&d) {
        bail!("fused attention has no kernel for head size {d}");
    }
    for l in [l1, l2, l3] {
        if !attention_layout_ok(l.stride(), l.start_offset()) {
            bail!(
                "fused attention needs unit inner strides and 8-element aligned strides and \
                 offsets, got {:?} at {}",
                l.stride(),
                l.start_offset()
            );
        }
    }
    let tile = op.tile;
    if !tile.supports(d) {
        bail!(
            "fused attention has no {} tile for head size {d}",
            tile.name()
        );
    }
    if tile.uses_wgmma() && !sm90a(dev) {
        bail!(
            "the {} attention tile needs compute capability 9.0 (wgmma)",
            tile.name()
        );
    }
    let func = kernel!(
        dev,
        Kernels::Attention,
        format!("tt_attention_{}_d{d}_{}", suffix(s1.dtype())?, tile.name())
    );
    let smem = tile.smem_bytes(d) as u32;
    if smem > 48 * 1024 {
        // Above 48 KiB a kernel must opt in to its dynamic shared memory.
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
    }
    // SAFETY: uninitialised until the launch below writes every element: each block stores all D
    // columns of each of its rows below lq (zeros for a row that sees no key) for its (head,
    // batch), and the grid's ceil(lq / BM) x h x b blocks cover the (b, lq, h, d) output.
    let out: CudaSlice<T> = unsafe { dev.alloc::<T>(b * lq * h * d)? };
    let (q, k, v) = (view::<T>(s1, l1)?, view::<T>(s2, l2)?, view::<T>(s3, l3)?);
    let ranges: Option<CudaSlice<i32>> = match op.mask.ranges(b, lk) {
        Some(r) => {
            let host: Vec<i32> = r.into_iter().flatten().collect();
            Some(dev.cuda_stream().clone_htod(&host).w()?)
        }
        None => None,
    };
    let ranges_view = ranges.as_ref().map(|l| l.slice(..));
    let ranges_ptr = ptr(ranges_view.as_ref(), dev);
    let (heads, group, lq_i, lk_i) = (h as i32, (h / hk) as i32, lq as i32, lk as i32);
    // Query i sees keys up to i + causal_off: Lk - Lq when causal, else any (the kernel clamps
    // to Lk).
    let causal_off = if op.mask.causal {
        lk_i - lq_i
    } else {
        i32::MAX
    };
    let st = |l: &Layout| -> [i64; 3] {
        let s = l.stride();
        [s[0] as i64, s[1] as i64, s[2] as i64]
    };
    let (qs, ks, vs) = (st(l1), st(l2), st(l3));
    let scale_log2 = op.scale * std::f32::consts::LOG2_E;
    let mut launch = func.builder();
    launch.arg(&q).arg(&k).arg(&v).arg(&out).arg(&ranges_ptr);
    launch
        .arg(&heads)
        .arg(&group)
        .arg(&lq_i)
        .arg(&lk_i)
        .arg(&causal_off);
    for s in [&qs, &ks, &vs] {
        launch.arg(&s[0]).arg(&s[1]).arg(&s[2]);
    }
    launch.arg(&scale_log2);
    let mut cfg = launch_config(
        (lq.div_ceil(tile.block_rows()) as u32, h as u32, b as u32),
        32 * tile.warps() as u32,
    );
    cfg.shared_mem_bytes = smem;
    // SAFETY: the arguments follow tt_attention_*'s C signature in kernels/attention.cu in order
    // and type (q, k, v, out, key_ranges pointers; int heads, kv_group, lq, lk, causal_off; nine
    // long long strides; float scale_log2). q, k, v are (B, H or Hk, L, D) views with unit inner
    // stride and 8-element aligned strides and offsets (checked above), v of k's shape and batch
    // and D shared with q (ops::attention_masked); out holds b·lq·h·d; key_ranges is null or
    // 3·b ints. Threads (32·warps), rows per block and dynamic shared memory are the tile's
    // (AttentionTile mirrors TtAttnTile/TtAttnWgTile; the kernel traps on too little), the
    // attribute raised above 48 KiB; all buffers stay alive until the launch is on the stream.
    unsafe { launch.launch(cfg) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((b, lq, h, d)),
    ))
}

pub(super) fn layer_norm_modulate(
    op: &LayerNormModOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    float_dispatch!(
        s.dtype(),
        "fused layer norm takes f32, bf16 or f16",
        layer_norm_modulate_t(op, s, l)
    )
}

/// The held operand's view, if any, and the batch stride of a (B, C) modulation operand.
fn held<'a, T: CudaDType>(
    guard: &'a Option<(candle_core::StorageRef<'a>, Layout)>,
) -> Result<Option<(CudaView<'a, T>, i64)>> {
    match guard {
        None => Ok(None),
        Some((storage, layout)) => match &**storage {
            Storage::Cuda(s) => {
                if layout.stride().last().copied().unwrap_or(1) != 1
                    && layout.dims().last() != Some(&1)
                {
                    bail!("fused op: operand rows must be contiguous");
                }
                let batch = if layout.dims().len() == 2 {
                    layout.stride()[0] as i64
                } else {
                    0
                };
                Ok(Some((view::<T>(s, layout)?, batch)))
            }
            _ => bail!("fused op: an operand is not on the CUDA device"),
        },
    }
}

fn lock(t: &Option<Tensor>) -> Option<(candle_core::StorageRef<'_>, Layout)> {
    t.as_ref().map(hold)
}

fn layer_norm_modulate_t<T: CudaDType + DeviceRepr>(
    op: &LayerNormModOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s.device;
    let cols = *l.dims().last().unwrap_or(&1);
    let rows = l.shape().elem_count() / cols.max(1);
    let func = kernel!(
        dev,
        Kernels::Norm,
        format!("tt_layer_norm_mod_{}", suffix(s.dtype())?)
    );
    // SAFETY: uninitialised until tt_layer_norm_mod_* below writes it: one block per row, each
    // storing all `cols` elements of its row.
    let out: CudaSlice<T> = unsafe { dev.alloc::<T>(rows * cols)? };
    let x = view::<T>(s, l)?;
    let (wg, bg, shg, scg) = (
        lock(&op.weight),
        lock(&op.bias),
        lock(&op.shift),
        lock(&op.scale),
    );
    let (w, b) = (held::<T>(&wg)?, held::<T>(&bg)?);
    let (shift, scale) = (held::<T>(&shg)?, held::<T>(&scg)?);
    if let (Some((_, a)), Some((_, c))) = (&shift, &scale) {
        if a != c {
            bail!("fused layer norm: shift and scale must share one batch stride");
        }
    }
    let mod_stride = shift.as_ref().or(scale.as_ref()).map_or(0, |(_, s)| *s);
    let ptrs = [
        ptr(w.as_ref().map(|(v, _)| v), dev),
        ptr(b.as_ref().map(|(v, _)| v), dev),
        ptr(shift.as_ref().map(|(v, _)| v), dev),
        ptr(scale.as_ref().map(|(v, _)| v), dev),
    ];
    let (cols_i, rpg, eps) = (cols as i32, op.rows_per_group.max(1) as i32, op.eps);
    let mut launch = func.builder();
    launch.arg(&x).arg(&out);
    for p in &ptrs {
        launch.arg(p);
    }
    launch.arg(&cols_i).arg(&rpg).arg(&mod_stride).arg(&eps);
    let cfg = launch_config((rows as u32, 1, 1), 256);
    // SAFETY: arguments in tt_layer_norm_mod_*'s order and types (x, y, then weight, bias, shift,
    // scale as pointers, 0 = null; int cols, int rows_per_group, long long mod_stride, float eps).
    // x is contiguous (rows, cols) (fused::layer_norm_modulate makes it so), out holds rows·cols,
    // weight and bias are (cols), shift and scale (B, cols) rows with unit column stride (`held`
    // checks) for the rows / rows_per_group = B groups; the kernel uses static shared memory only.
    unsafe { launch.launch(cfg) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        l.shape().clone(),
    ))
}

pub(super) fn group_norm(
    op: &GroupNormOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    float_dispatch!(
        s.dtype(),
        "fused group norm takes f32, bf16 or f16",
        group_norm_t(op, s, l)
    )
}

fn group_norm_t<T: CudaDType + DeviceRepr>(
    op: &GroupNormOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s.device;
    let dims = l.dims();
    let (n, c) = (dims[0], dims[1]);
    let hw: usize = dims[2..].iter().product();
    let per_group = c / op.groups.max(1);
    let elems = per_group * hw;
    if elems >= 1 << 31 || n > 65535 || op.groups > 65535 {
        bail!(
            "fused group norm: {dims:?} in {} groups is too large",
            op.groups
        );
    }
    let pack = 16 / std::mem::size_of::<T>();
    let vec = hw % pack == 0 && (l.start_offset() * std::mem::size_of::<T>()) % 16 == 0;
    let (chunk, chunks) = group_norm_chunks(elems, op.groups * n, if vec { pack } else { 1 });
    let suffix = suffix(s.dtype())?;
    let stats_fn = kernel!(dev, Kernels::Norm, format!("tt_group_stats_{suffix}"));
    let func = kernel!(dev, Kernels::Norm, format!("tt_group_norm_{suffix}"));
    // SAFETY: uninitialised until tt_group_norm_* writes every element: block (k, g, s) writes
    // [k·chunk, (k + 1)·chunk) of group g of sample s, chunks·chunk >= the group's size
    // (group_norm_chunks) and the groups divide c (fused::group_norm).
    let out: CudaSlice<T> = unsafe { dev.alloc::<T>(l.shape().elem_count())? };
    // SAFETY: uninitialised until tt_group_stats_* writes it: each block of the (chunks, groups,
    // n) grid writes its 3 floats at 3·((s·groups + g)·chunks + k), all before tt_group_norm_*
    // reads them (launched after it on the same stream).
    let partial: CudaSlice<f32> = unsafe { dev.alloc::<f32>(3 * n * op.groups * chunks)? };
    let x = view::<T>(s, l)?;
    let (wg, bg) = (lock(&op.weight), lock(&op.bias));
    let (w, b) = (held::<T>(&wg)?, held::<T>(&bg)?);
    let ptrs = [
        ptr(w.as_ref().map(|(v, _)| v), dev),
        ptr(b.as_ref().map(|(v, _)| v), dev),
    ];
    let (ci, hwi, gi, chunk_i, eps, silu, vec_i) = (
        c as i32,
        hw as i32,
        op.groups as i32,
        chunk as i32,
        op.eps,
        i32::from(op.silu),
        i32::from(vec),
    );
    let grid = (chunks as u32, op.groups as u32, n as u32);
    let mut launch = stats_fn.builder();
    launch.arg(&x).arg(&partial);
    launch.arg(&ci).arg(&hwi).arg(&gi).arg(&chunk_i).arg(&vec_i);
    // SAFETY: arguments match tt_group_stats_*(const T *x, float *partial, int channels, int hw,
    // int groups, int chunk, int vec); x is contiguous (n, c, hw) (fused::group_norm), partial
    // holds 3 floats per block of the grid; with vec, hw and chunk are multiples of the 16-byte
    // pack and x's offset is 16-byte aligned (checked above); static shared memory only.
    unsafe { launch.launch(launch_config(grid, 256)) }.w()?;
    let mut launch = func.builder();
    launch
        .arg(&x)
        .arg(&out)
        .arg(&ptrs[0])
        .arg(&ptrs[1])
        .arg(&partial);
    launch
        .arg(&ci)
        .arg(&hwi)
        .arg(&gi)
        .arg(&chunk_i)
        .arg(&eps)
        .arg(&silu)
        .arg(&vec_i);
    // SAFETY: arguments match tt_group_norm_*(x, y, weight, bias, partial, int channels, int hw,
    // int groups, int chunk, float eps, int silu, int vec); weight and bias are contiguous (c)
    // (fused::group_norm), out is a fresh allocation of x's element count, partial was filled by
    // the launch above; same grid, chunking and packing as that launch; static shared memory only.
    unsafe { launch.launch(launch_config(grid, 256)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        l.shape().clone(),
    ))
}

pub(super) fn qk_norm_rope(
    op: &QkNormRopeOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    float_dispatch!(
        s.dtype(),
        "fused q/k norm takes f32, bf16 or f16",
        qk_norm_rope_t(op, s, l)
    )
}

fn qk_norm_rope_t<T: CudaDType + DeviceRepr>(
    op: &QkNormRopeOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s.device;
    let (b, len_a, _width) = l.shape().dims3()?;
    let len_b = match &op.second {
        Some(st) => st.qkv.dim(1)?,
        None => 0,
    };
    let len = len_a + len_b;
    let (h, d) = (op.heads, op.dim);
    let func = kernel!(
        dev,
        Kernels::Norm,
        format!("tt_qk_norm_rope_{}", suffix(s.dtype())?)
    );
    // SAFETY: uninitialised until tt_qk_norm_rope_* below writes it: one warp per (b, l, h) over
    // ceil(b·len·h / 8) blocks of 8 warps, each writing d elements of q, of k (d is even, checked
    // in QkStream::new) and of v.
    let out: CudaSlice<T> = unsafe { dev.alloc::<T>(3 * b * len * h * d)? };
    let x = view::<T>(s, l)?;
    let row_stride = l.stride()[1] as i64;
    // The second stream's rows, row stride and weights (null pointers without one).
    let second = op
        .second
        .as_ref()
        .map(|st| (hold(&st.qkv), hold(&st.q_weight), hold(&st.k_weight)));
    let (qkv_b, qw_b, kw_b) = match &second {
        Some((x2, q2, k2)) => (held_any::<T>(x2)?, held_any::<T>(q2)?, held_any::<T>(k2)?),
        None => (None, None, None),
    };
    let row_stride_b = second
        .as_ref()
        .map_or(0, |(x2, _, _)| x2.1.stride()[1] as i64);
    let ptrs_b = [
        ptr(qkv_b.as_ref(), dev),
        ptr(qw_b.as_ref(), dev),
        ptr(kw_b.as_ref(), dev),
    ];
    with_cuda(&op.first.q_weight, |qs, ql| {
        with_cuda(&op.first.k_weight, |kst, kl| {
            with_cuda(&op.cos, |cs, cl| {
                with_cuda(&op.sin, |ss, sl| {
                    let (qw, kw) = (view::<T>(qs, ql)?, view::<T>(kst, kl)?);
                    let (cos, sin) = (view::<f32>(cs, cl)?, view::<f32>(ss, sl)?);
                    let (pos, bi, li, hi, di, la) = (
                        op.pos_offset as i32,
                        b as i32,
                        len as i32,
                        h as i32,
                        d as i32,
                        len_a as i32,
                    );
                    let eps = op.eps;
                    let mut launch = func.builder();
                    launch
                        .arg(&x)
                        .arg(&row_stride)
                        .arg(&ptrs_b[0])
                        .arg(&row_stride_b);
                    launch.arg(&la).arg(&out).arg(&qw).arg(&kw);
                    launch.arg(&ptrs_b[1]).arg(&ptrs_b[2]);
                    launch
                        .arg(&cos)
                        .arg(&sin)
                        .arg(&pos)
                        .arg(&bi)
                        .arg(&li)
                        .arg(&hi)
                        .arg(&di);
                    launch.arg(&eps);
                    let items = (b * len * h) as u32;
                    let cfg = launch_config((items.div_ceil(8), 1, 1), 256);
                    // SAFETY: arguments in tt_qk_norm_rope_*'s order and types (qkv, long long
                    // row_stride, qkv_b, long long row_stride_b, int len_a, out, q_weight,
                    // k_weight, q_weight_b, k_weight_b (0 = null), cos, sin, int pos_offset,
                    // batch, len, heads, dim, float eps). Each stream has unit column stride,
                    // batch rows len rows apart and >= 3·h·d columns (QkStream::new), weights
                    // contiguous (d), cos/sin contiguous f32 (P, d/2) with pos_offset + len <= P
                    // (qk_norm_rope_op); out holds 3·b·len·h·d; 256 threads = the kernel's 8
                    // warps a block; no dynamic shared memory.
                    unsafe { launch.launch(cfg) }.w()?;
                    Ok(())
                })
            })
        })
    })?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((3, b, len, h, d)),
    ))
}

pub(super) fn gelu(op: &GeluOp, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    float_dispatch!(
        s.dtype(),
        "fused GELU takes f32, bf16 or f16",
        gelu_t(op, s, l)
    )
}

fn gelu_t<T: CudaDType + DeviceRepr>(
    op: &GeluOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s.device;
    let sfx = suffix(s.dtype())?;
    let n = l.shape().elem_count();
    let x = view::<T>(s, l)?;
    let blocks = |work: usize| (work.div_ceil(256).clamp(1, 65_535)) as u32;
    let (out, shape, grid) = match op {
        GeluOp::Tanh => {
            // SAFETY: uninitialised until tt_gelu_tanh_* below writes all n elements
            // (grid-stride loop).
            let out: CudaSlice<T> = unsafe { dev.alloc::<T>(n)? };
            (out, l.shape().clone(), blocks(n))
        }
        GeluOp::Geglu => {
            let mut dims = l.dims().to_vec();
            let two = dims.last().copied().unwrap_or(0);
            if let Some(last) = dims.last_mut() {
                *last = two / 2;
            }
            // SAFETY: uninitialised until tt_geglu_* below writes all rows·inner = n / 2 elements
            // (grid-stride loop; the last dimension is even, checked in fused::geglu).
            let out: CudaSlice<T> = unsafe { dev.alloc::<T>(n / 2)? };
            (out, Shape::from(dims), blocks(n / 2))
        }
    };
    let cfg = launch_config((grid, 1, 1), 256);
    match op {
        GeluOp::Tanh => {
            let func = kernel!(dev, Kernels::Norm, format!("tt_gelu_tanh_{sfx}"));
            let count = n as i64;
            let mut launch = func.builder();
            launch.arg(&x).arg(&out).arg(&count);
            // SAFETY: arguments match tt_gelu_tanh_*(const T *x, T *y, long long n); x is
            // contiguous (fused::gelu_tanh) with n elements and out holds n; no shared memory.
            unsafe { launch.launch(cfg) }.w()?;
        }
        GeluOp::Geglu => {
            let func = kernel!(dev, Kernels::Norm, format!("tt_geglu_{sfx}"));
            let inner = (l.dims().last().copied().unwrap_or(0) / 2) as i32;
            let rows = (n / 2 / (inner.max(1) as usize)) as i64;
            let mut launch = func.builder();
            launch.arg(&x).arg(&out).arg(&rows).arg(&inner);
            // SAFETY: arguments match tt_geglu_*(const T *x, T *y, long long rows, int inner); x is
            // contiguous (rows, 2·inner) (fused::geglu) and out holds rows·inner; no shared memory.
            unsafe { launch.launch(cfg) }.w()?;
        }
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
}

pub(super) fn gated_residual(
    op: &GatedResidualOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    float_dispatch!(
        s1.dtype(),
        "the fused gated residual takes f32, bf16 or f16",
        gated_residual_t(op, s1, l1, s2, l2)
    )
}

fn gated_residual_t<T: CudaDType + DeviceRepr>(
    op: &GatedResidualOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &s1.device;
    let cols = *l1.dims().last().unwrap_or(&1);
    let n = l1.shape().elem_count();
    // 16 bytes of each operand per thread: whole packs per row, packs aligned.
    let pack = 16 / std::mem::size_of::<T>();
    if cols % pack != 0 || l1.start_offset() % pack != 0 || l2.start_offset() % pack != 0 {
        bail!(
            "the fused gated residual needs rows of a multiple of {pack} elements and aligned \
             operands, got {cols} columns at offsets {} and {}",
            l1.start_offset(),
            l2.start_offset()
        );
    }
    let func = kernel!(
        dev,
        Kernels::Norm,
        format!("tt_gated_residual_{}", suffix(s1.dtype())?)
    );
    // SAFETY: uninitialised until tt_gated_residual_* below writes all n / pack packs of it
    // (grid-stride loop; cols is a multiple of pack, checked above).
    let out: CudaSlice<T> = unsafe { dev.alloc::<T>(n)? };
    let (x, y) = (view::<T>(s1, l1)?, view::<T>(s2, l2)?);
    let gate_held = Some(op.gate.clone());
    let gate_guard = lock(&gate_held);
    let (gate, gate_stride) = held::<T>(&gate_guard)?
        .ok_or_else(|| candle_core::Error::Msg("gated residual without a gate".into()))?;
    let rows = (n / cols.max(1)) as i64;
    let (cols_i, rows_per_group) = (cols as i32, op.rows_per_group.max(1) as i64);
    let mut launch = func.builder();
    launch
        .arg(&x)
        .arg(&gate)
        .arg(&gate_stride)
        .arg(&y)
        .arg(&out);
    launch.arg(&rows).arg(&cols_i).arg(&rows_per_group);
    let grid = (n / pack).div_ceil(256).clamp(1, 65_535) as u32;
    // SAFETY: arguments match tt_gated_residual_*(x, gate, long long gate_stride, y, out, long
    // long rows, int cols, long long rows_per_group); x and y are contiguous (rows, cols) of one
    // shape (fused::gated_residual) at pack-aligned (16-byte) offsets (checked above), out is a
    // fresh allocation of n, gate is (B, cols) rows with unit column stride (`held` checks) for
    // the rows / rows_per_group = B groups; no shared memory.
    unsafe { launch.launch(launch_config((grid, 1, 1), 256)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        l1.shape().clone(),
    ))
}

fn lt_error(e: cublaslt::result::CublasError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt: {e:?}"))
}

/// One cuBLASLt handle (with its workspace) per device.
fn blas_lt(dev: &CudaDevice) -> Result<Arc<CudaBlasLT>> {
    static HANDLES: OnceLock<Mutex<HashMap<DeviceId, Arc<CudaBlasLT>>>> = OnceLock::new();
    let mut map = HANDLES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(h) = map.get(&dev.id()) {
        return Ok(h.clone());
    }
    let handle = Arc::new(CudaBlasLT::new(dev.cuda_stream()).map_err(lt_error)?);
    map.insert(dev.id(), handle.clone());
    Ok(handle)
}

pub(super) fn linear(op: &LinearOp, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    half_dispatch!(
        s.dtype(),
        "the cuBLASLt linear takes bf16 or f16",
        linear_t(op, s, l)
    )
}

fn linear_t<T: CudaDType + DeviceRepr>(
    op: &LinearOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)>
where
    CudaBlasLT: Matmul<T>,
{
    let dev = &s.device;
    let (n, k) = op.weight.dims2()?;
    let m = l.shape().elem_count() / k.max(1);
    let lt = blas_lt(dev)?;
    // SAFETY: uninitialised until the first cuBLASLt product below writes all m·n elements (beta
    // 0: C is not read); the second product (beta 1) reads it only after that, on the same stream.
    let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(m * n)? };
    let x = view::<T>(s, l)?;
    // Row-major out (m, n) = x (m, k) · wᵀ is column-major outᵀ (n, m) = w (n, k) · xᵀ; w's rows
    // may lie further apart than k (a column range of a wider weight): its leading dimension.
    let config = |k: usize, wl: &Layout, beta: f32| -> Result<MatmulConfig> {
        let row_stride = wl.stride()[0];
        if wl.stride()[1] != 1 || row_stride < k {
            bail!("the cuBLASLt linear needs weight rows contiguous in memory");
        }
        Ok(MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha: 1.0,
            lda: row_stride as i64,
            ldb: k as i64,
            beta,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        })
    };
    with_cuda(&op.weight, |ws, wl| {
        let w = view::<T>(ws, wl)?;
        let bias_guard = op.bias.as_ref().map(|b| {
            let (st, lay) = b.storage_and_layout();
            (st, lay.clone())
        });
        let bias = held::<T>(&bias_guard)?.map(|(v, _)| v);
        let act = op.activation.map(|a| match a {
            Activation::GeluTanh => cublaslt::Activation::Gelu,
        });
        let cfg = config(k, wl, 0.0)?;
        // SAFETY: `cfg` describes the buffers: w (n, k) with rows `lda` >= k apart and unit
        // column stride (checked in `config`), x contiguous (m, k) (m = its elements / k), out
        // (m, n); bias is None or a contiguous (n) of T (fused::linear_op); all on the device's
        // stream, which is the handle's, and alive (held guards) until the product is enqueued.
        unsafe { lt.matmul(cfg, &w, &x, &mut out, bias.as_ref(), act.as_ref()) }.map_err(lt_error)
    })?;
    if let Some((x2, w2)) = &op.then {
        // out += x2 · w2ᵀ: the second product reads the first's output as C (beta 1).
        let k2 = w2.dim(1)?;
        if x2.elem_count() != m * k2 {
            bail!("linear_sum: the second input does not have the first's rows");
        }
        with_cuda(w2, |w2s, w2l| {
            with_cuda(x2, |x2s, x2l| {
                let (w2v, x2v) = (view::<T>(w2s, w2l)?, view::<T>(x2s, x2l)?);
                let cfg = config(k2, w2l, 1.0)?;
                // SAFETY: as above for w2 (n, k2) and x2 contiguous (m, k2) (its m·k2
                // elements checked above); beta 1 reads `out`, which the first product wrote
                // earlier on the same stream.
                unsafe { lt.matmul(cfg, &w2v, &x2v, &mut out, None, None) }.map_err(lt_error)
            })
        })?;
    }
    let mut dims = l.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(dims),
    ))
}

fn cudnn_error(e: CudnnError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// Runs `f` with this device's cuDNN session (created on first use, on the device's context).
fn with_cudnn<R>(
    dev: &CudaDevice,
    f: impl FnOnce(&mut Session) -> std::result::Result<R, CudnnError>,
) -> Result<R> {
    static SESSIONS: OnceLock<Mutex<HashMap<DeviceId, Session>>> = OnceLock::new();
    let lib = Cudnn::global().map_err(cudnn_error)?;
    dev.cuda_stream().context().bind_to_thread().w()?;
    let mut map = SESSIONS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let session = match map.entry(dev.id()) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(Session::new(lib).map_err(cudnn_error)?)
        }
    };
    f(session).map_err(cudnn_error)
}

pub(super) fn conv2d(op: &ConvOp, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    match s.dtype() {
        DType::BF16 => conv2d_t::<half::bf16>(op, s, l),
        DType::F16 => conv2d_t::<half::f16>(op, s, l),
        DType::F32 => conv2d_t::<f32>(op, s, l),
        other => bail!("the cuDNN convolution takes bf16, f16 or f32, not {other:?}"),
    }
}

fn conv2d_t<T: CudaDType + DeviceRepr>(
    op: &ConvOp,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    let p = op.problem(l.dims(), s.dtype())?;
    if !l.is_contiguous() {
        bail!("the cuDNN convolution takes a contiguous input");
    }
    let (oh, ow) = p.output_hw().map_err(cudnn_error)?;
    let dev = &s.device;
    let stream = dev.cuda_stream();
    let len = p.output_len().map_err(cudnn_error)?;
    // SAFETY: uninitialised until cuDNN's forward below overwrites all n·k·oh·ow = len elements
    // (beta 0: y is not read).
    let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(len)? };
    let x = view::<T>(s, l)?;
    with_cuda(&op.weight, |ws, wl| {
        let w = view::<T>(ws, wl)?;
        let plan = with_cudnn(dev, |session| session.plan(&p))?;
        let mut workspace: Option<CudaSlice<u8>> = match plan.workspace {
            0 => None,
            // SAFETY: cuDNN's scratch, written before read; `bytes` is the plan's workspace size,
            // what forward is told it holds.
            bytes => Some(unsafe { dev.alloc::<u8>(bytes)? }),
        };
        // The guards record the stream's use of each buffer when they drop, after the call.
        let (xp, _xg) = x.device_ptr(&stream);
        let (wp, _wg) = w.device_ptr(&stream);
        let (yp, _yg) = out.device_ptr_mut(&stream);
        let (sp, _sg) = match workspace.as_mut() {
            Some(ws) => {
                let (p, g) = ws.device_ptr_mut(&stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        with_cudnn(dev, |session| {
            // SAFETY: contiguous NCHW buffers of `p`'s shapes and dtype on this device, a
            // workspace of the plan's size, candle's stream of the same context; all outlive
            // the call's place in the stream (candle frees through the same stream).
            unsafe { session.forward(stream.cu_stream().cast(), &p, xp, wp, yp, sp) }
        })
    })?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((p.n, p.k, oh, ow)),
    ))
}
