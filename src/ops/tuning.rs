//! Which tile the attention kernel runs with: the thread's override or `TT_SCALE_ATTN_TILE`;
//! on Hopper, the wgmma tile once it has matched the mma.sync tile on a check problem; on CUDA
//! with tuning on, the fastest of the tiles whose outputs are bit-identical to the default's,
//! timed once per problem shape. Above [`super::fused`]: it runs the kernel to check and time.

#[cfg(feature = "cuda")]
use std::collections::HashMap;
#[cfg(feature = "cuda")]
use std::sync::{Mutex, OnceLock};

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::DeviceId;
use candle_core::Tensor;
#[cfg(feature = "cuda")]
use candle_core::{CudaDevice, DType, Result};

#[cfg(feature = "cuda")]
use super::gpu::sm90a;
use super::kernels::AttentionOp;
#[cfg(feature = "cuda")]
use super::kernels::KeyMask;
#[cfg(feature = "cuda")]
use super::settings::fastest_tile;
use super::settings::{attention_tuning_enabled, AttentionTile};

/// The tile for attention over `q` (B, H, Lq, D): the thread's override
/// ([`super::with_attention_tile`]), else `TT_SCALE_ATTN_TILE`, where that tile
/// [runs](AttentionTile::runs_on) on `q`; else, with more than 64 query rows,
/// [`AttentionTile::Wg2p`] where it runs and has passed its one-time check against `w4r32`
/// on this device, else [`AttentionTile::W4R32`] (FlashAttention-2's choice) where it
/// applies; else [`AttentionTile::W4R16`].
pub fn choose_tile(q: &Tensor) -> AttentionTile {
    let dims = q.dims();
    let d = dims.last().copied().unwrap_or(0);
    let lq = if dims.len() >= 2 {
        dims[dims.len() - 2]
    } else {
        1
    };
    match AttentionTile::asked() {
        Some(t) if t.runs_on(q) => t,
        _ if lq > 64 && AttentionTile::Wg2p.runs_on(q) && wgmma_checked(q) => AttentionTile::Wg2p,
        _ => AttentionTile::choose_mma(d, lq),
    }
}

/// The tile the attention kernel runs with, `op.tile` being [`choose_tile`]'s: that
/// tile where one was asked for ([`super::with_attention_tile`], `TT_SCALE_ATTN_TILE`); else, on CUDA
/// with tuning on ([`attention_tuning_enabled`]), the fastest of the tiles whose outputs are
/// bit-identical to the default's on this device (checked once per device, dtype and head size),
/// timed once per problem shape on the problem itself (not with 64 query rows or fewer). So
/// tuning never changes a result, only the time it takes.
pub(crate) fn tuned_tile(q: &Tensor, k: &Tensor, v: &Tensor, op: &AttentionOp) -> AttentionTile {
    let default = op.tile;
    // With at most 64 query rows (a decode step, a short run of forced tokens) every tile runs
    // one block per head, and the key count changes with every call: nothing worth timing.
    let few_rows = q.dims().get(2).is_some_and(|&lq| lq <= 64);
    if AttentionTile::asked().is_some() || !attention_tuning_enabled() || few_rows {
        return default;
    }
    match q.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(c) => tuned_attention_tile(c, q, k, v, op, default),
        _ => {
            let _ = (k, v, op);
            default
        }
    }
}

/// Whether the wgmma tile has passed its one-time check for `q`'s device, dtype and head size.
fn wgmma_checked(q: &Tensor) -> bool {
    match q.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(c) => {
            wgmma_attention_ok(c, q.dtype(), q.dims().last().copied().unwrap_or(0))
        }
        _ => false,
    }
}

/// Whether the wgmma attention tile ([`AttentionTile::Wg2p`]) can be the default for `dtype` and
/// head size `d` on this device: compute capability 9.0, and, checked once per device, dtype and
/// head size, it agrees with the `w4r32` tile on a random problem (a guard for a kernel whose
/// shared-memory descriptors only a Hopper GPU can confirm). A disagreement or a failed launch is
/// logged once and leaves the mma.sync tiles in use.
#[cfg(feature = "cuda")]
fn wgmma_attention_ok(dev: &CudaDevice, dtype: DType, d: usize) -> bool {
    if !sm90a(dev) || !AttentionTile::Wg2p.supports(d) || !matches!(dtype, DType::BF16 | DType::F16)
    {
        return false;
    }
    type Verdicts = Mutex<HashMap<(DeviceId, DType, usize), bool>>;
    static CHECKED: OnceLock<Verdicts> = OnceLock::new();
    let key = (dev.id(), dtype, d);
    let checked = CHECKED.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(&ok) = checked.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return ok;
    }
    let check = || -> Result<f32> {
        let run = check_problem(dev, dtype, d)?;
        let want = run(AttentionTile::W4R32)?;
        let got = run(AttentionTile::Wg2p)?;
        let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let norm = want.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok(if diff.is_finite() {
            diff / norm.max(1e-6)
        } else {
            f32::INFINITY
        })
    };
    let bound = if dtype == DType::F16 { 4e-3 } else { 2e-2 };
    let ok = match check() {
        Ok(err) if err <= bound => {
            tracing::info!(
                "attention: the Hopper kernel (wg2p, {dtype:?}, head size {d}) matches w4r32 \
                 (relative difference {err:.1e}); using it"
            );
            true
        }
        Ok(err) => {
            tracing::warn!(
                "the Hopper attention kernel (wg2p, {dtype:?}, head size {d}) disagrees with w4r32 \
                 (relative error {err:.2e}); using w4r32"
            );
            false
        }
        Err(e) => {
            tracing::warn!(
                "the Hopper attention kernel (wg2p, {dtype:?}, head size {d}) failed ({e}); using \
                 w4r32"
            );
            false
        }
    };
    checked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, ok);
    ok
}

/// A random attention problem for the tile checks on `dev`: (1, 2 heads, 200 queries, `d`) against
/// 300 keys with the last 37 masked, as token-major views like the models'. Returns a function
/// that runs it with a given tile and returns the output in float32.
#[cfg(feature = "cuda")]
fn check_problem(
    dev: &CudaDevice,
    dtype: DType,
    d: usize,
) -> Result<impl Fn(AttentionTile) -> Result<Tensor>> {
    let device = candle_core::Device::Cuda(dev.clone());
    let qkv = |l: usize| -> Result<Tensor> {
        Tensor::randn(0f32, 1.0, (1, l, 2, d), &device)?
            .to_dtype(dtype)?
            .transpose(1, 2)
    };
    let (q, k, v) = (qkv(200)?, qkv(300)?, qkv(300)?);
    let scale = 1.0 / (d as f64).sqrt();
    let mask = KeyMask {
        lens: Some(vec![263]),
        ..KeyMask::default()
    };
    Ok(move |tile| {
        super::fused::attention_kernel(&q, &k, &v, scale, &mask, tile)?.to_dtype(DType::F32)
    })
}

/// The tiles of `default`'s family (mma.sync or wgmma) for head size `d` whose outputs are bit
/// for bit `default`'s on this device, `default` first: checked once per device, dtype, head size
/// and default on [`check_problem`]. The tiles are built to be identical (every query row takes
/// the same operations in each); this confirms it before tuning may switch between them.
#[cfg(feature = "cuda")]
fn identical_tiles(
    dev: &CudaDevice,
    dtype: DType,
    d: usize,
    default: AttentionTile,
) -> Vec<AttentionTile> {
    type Families = Mutex<HashMap<(DeviceId, DType, usize, AttentionTile), Vec<AttentionTile>>>;
    static CHECKED: OnceLock<Families> = OnceLock::new();
    let key = (dev.id(), dtype, d, default);
    let checked = CHECKED.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(tiles) = checked.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return tiles.clone();
    }
    let family: Vec<AttentionTile> = AttentionTile::ALL
        .into_iter()
        .filter(|t| {
            *t != default
                && t.supports(d)
                && t.uses_wgmma() == default.uses_wgmma()
                && (!t.uses_wgmma() || sm90a(dev))
        })
        .collect();
    let check = || -> Result<Vec<AttentionTile>> {
        let run = check_problem(dev, dtype, d)?;
        let want = run(default)?;
        let mut same = vec![default];
        for tile in family {
            let equal = match run(tile) {
                Ok(got) => (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0,
                Err(e) => {
                    tracing::debug!("attention tile {} failed its check: {e}", tile.name());
                    false
                }
            };
            if equal {
                same.push(tile);
            } else {
                tracing::info!(
                    "attention: the {} tile is not bit-identical to {} ({dtype:?}, head size \
                     {d}); it is left out of tuning",
                    tile.name(),
                    default.name()
                );
            }
        }
        Ok(same)
    };
    let tiles = check().unwrap_or_else(|e| {
        tracing::warn!("attention: the tile check failed ({e}); not tuning");
        vec![default]
    });
    checked
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, tiles.clone());
    tiles
}

/// [`tuned_tile`] on CUDA: the fastest of [`identical_tiles`] for `default`,
/// each timed (one warm-up, best of three, synchronised) on the problem itself the first time a
/// (device, dtype, q shape, k shape, masked or not, causal or not) is seen, and remembered for the
/// process.
#[cfg(feature = "cuda")]
fn tuned_attention_tile(
    dev: &CudaDevice,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    op: &AttentionOp,
    default: AttentionTile,
) -> AttentionTile {
    type Key = (DeviceId, DType, Vec<usize>, Vec<usize>, bool, bool);
    static TUNED: OnceLock<Mutex<HashMap<Key, AttentionTile>>> = OnceLock::new();
    let key = (
        dev.id(),
        q.dtype(),
        q.dims().to_vec(),
        k.dims().to_vec(),
        op.mask.lens.is_some() || op.mask.holes.is_some(),
        op.mask.causal,
    );
    let tuned = TUNED.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(&tile) = tuned.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return tile;
    }
    let d = q.dims().last().copied().unwrap_or(0);
    let candidates: Vec<AttentionTile> = identical_tiles(dev, q.dtype(), d, default)
        .into_iter()
        .filter(|t| t.runs_on(q))
        .collect();
    let chosen = if candidates.len() < 2 {
        default
    } else {
        let device = candle_core::Device::Cuda(dev.clone());
        let time = |tile: AttentionTile| -> Result<f64> {
            let op = AttentionOp {
                tile,
                scale: op.scale,
                mask: op.mask.clone(),
            };
            drop(q.apply_op3_no_bwd(k, v, &op)?);
            device.synchronize()?;
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let start = std::time::Instant::now();
                drop(q.apply_op3_no_bwd(k, v, &op)?);
                device.synchronize()?;
                best = best.min(start.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let timed: Vec<(AttentionTile, f64)> = candidates
            .iter()
            .map(|&t| (t, time(t).unwrap_or(f64::INFINITY)))
            .collect();
        let chosen = fastest_tile(&timed).unwrap_or(default);
        let list: Vec<String> = timed
            .iter()
            .map(|(t, s)| format!("{} {:.3} ms", t.name(), s * 1e3))
            .collect();
        tracing::info!(
            "attention tuned for q {:?} k {:?} ({:?}): {}; using {}",
            q.dims(),
            k.dims(),
            q.dtype(),
            list.join(", "),
            chosen.name()
        );
        chosen
    };
    tuned
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, chosen);
    chosen
}
