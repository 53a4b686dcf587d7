//! How the fused kernels are set up and switched: the attention kernel's tiles and head sizes,
//! the layouts and splits the kernels take, and the switches (`TT_SCALE_FUSED`,
//! `TT_SCALE_ATTN_TILE`, `TT_SCALE_ATTN_TUNE`, and the thread overrides tests and benchmarks
//! use). A leaf of [`super`] but for [`super::gpu`].

use std::sync::OnceLock;

use candle_core::Tensor;

use super::gpu::sm90a_device;

/// Head sizes the fused attention kernel is instantiated for (SD 1.5: 40, 80, 160; SDXL: 64;
/// PixArt-Sigma: 72; Flux: 128).
pub const ATTENTION_HEAD_DIMS: [usize; 6] = [40, 64, 72, 80, 128, 160];

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    static TILE_OVERRIDE: std::cell::Cell<Option<AttentionTile>> =
        const { std::cell::Cell::new(None) };
}

/// The block tile of the fused attention kernel (`kernels/attention.cu`): how many warps a block
/// has and how many query rows each warp owns. All tiles give bit-identical outputs; they differ
/// only in speed, so the choice never changes an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionTile {
    /// 4 warps of 16 rows (64 rows a block); Q fragments held in registers.
    W4R16,
    /// 8 warps of 16 rows (128 rows): each K/V tile serves twice the rows.
    W8R16,
    /// 4 warps of 32 rows (128 rows; FlashAttention-2's tile for head sizes 64 and 128): each
    /// K/V fragment feeds two products, the Q tile sits in shared memory. Head sizes up to 128.
    W4R32,
    /// 2 warpgroups of 64 rows (128 rows) on Hopper's wgmma: the tensor cores read K and V from
    /// shared memory themselves. Compute capability 9.0 only.
    Wg2,
    /// 1 warpgroup of 64 rows on wgmma: two blocks fit an SM and never wait for each other.
    /// Compute capability 9.0 only.
    Wg1,
    /// [`AttentionTile::Wg2`] pipelined (FlashAttention-3's intra-warpgroup overlap): two K and
    /// two V buffers, one block barrier a tile, each tile's softmax running while the previous
    /// tile's P·V is on the tensor cores. Compute capability 9.0 only.
    Wg2p,
    /// [`AttentionTile::Wg1`] pipelined as [`AttentionTile::Wg2p`]. Compute capability 9.0 only.
    Wg1p,
}

impl AttentionTile {
    /// Every tile, in the order the benchmarks list them.
    pub const ALL: [AttentionTile; 7] = [
        Self::W4R16,
        Self::W8R16,
        Self::W4R32,
        Self::Wg2,
        Self::Wg1,
        Self::Wg2p,
        Self::Wg1p,
    ];

    /// The kernel-name suffix, also the `TT_SCALE_ATTN_TILE` value: `w4r16`, `w8r16`, `w4r32`,
    /// `wg2`, `wg1`, `wg2p`, `wg1p`.
    pub fn name(self) -> &'static str {
        match self {
            Self::W4R16 => "w4r16",
            Self::W8R16 => "w8r16",
            Self::W4R32 => "w4r32",
            Self::Wg2 => "wg2",
            Self::Wg1 => "wg1",
            Self::Wg2p => "wg2p",
            Self::Wg1p => "wg1p",
        }
    }

    /// Parses [`AttentionTile::name`] (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Warps of a block.
    pub fn warps(self) -> usize {
        match self {
            Self::W4R16 | Self::W4R32 | Self::Wg1 | Self::Wg1p => 4,
            Self::W8R16 | Self::Wg2 | Self::Wg2p => 8,
        }
    }

    /// Query rows of a block.
    pub fn block_rows(self) -> usize {
        match self {
            Self::W4R16 | Self::Wg1 | Self::Wg1p => 64,
            Self::W8R16 | Self::W4R32 | Self::Wg2 | Self::Wg2p => 128,
        }
    }

    /// Whether the kernel is instantiated for head size `d`.
    pub fn supports(self, d: usize) -> bool {
        match self {
            Self::W4R32 => ATTENTION_HEAD_DIMS.contains(&d) && d <= 128,
            _ => ATTENTION_HEAD_DIMS.contains(&d),
        }
    }

    /// Whether the tile runs on Hopper's wgmma (compute capability 9.0 only).
    pub fn uses_wgmma(self) -> bool {
        matches!(self, Self::Wg2 | Self::Wg1 | Self::Wg2p | Self::Wg1p)
    }

    /// Whether the tile double-buffers K and V ([`AttentionTile::Wg2p`], [`AttentionTile::Wg1p`]).
    pub fn pipelined(self) -> bool {
        matches!(self, Self::Wg2p | Self::Wg1p)
    }

    /// Whether the tile can run attention over `q` (B, H, L, D) on `q`'s device: the head size,
    /// and for the wgmma tiles a CUDA device of compute capability 9.0.
    pub fn runs_on(self, q: &Tensor) -> bool {
        let d = q.dims().last().copied().unwrap_or(0);
        self.supports(d) && (!self.uses_wgmma() || sm90a_device(q.device()))
    }

    /// Dynamic shared memory of a block, bytes, for head size `d` and 16-bit elements: the K and
    /// V tiles (64 keys each), plus the Q tile for [`AttentionTile::W4R32`], rows of
    /// `ceil(d/16)·16 + 8` elements; the wgmma tiles' rows are not padded, and the pipelined
    /// ones hold two K and two V tiles (`TtAttnTile::SMEM_BYTES`, `TtAttnWgTile::SMEM_BYTES` in
    /// the kernel, which checks it).
    pub fn smem_bytes(self, d: usize) -> usize {
        let padded = d.div_ceil(16) * 16;
        if self.uses_wgmma() {
            let buffers = if self.pipelined() { 2 } else { 1 };
            return 2 * buffers * 64 * padded * 2; // K and V tiles as core matrices
        }
        let row = padded + 8;
        let q_rows = if self == Self::W4R32 {
            self.block_rows()
        } else {
            0
        };
        (2 * 64 + q_rows) * row * 2
    }

    /// The mma.sync tile for `lq` query rows of head size `d`, the override or
    /// `TT_SCALE_ATTN_TILE` aside: [`AttentionTile::W4R32`] where it applies and there are more
    /// than 64 rows, else [`AttentionTile::W4R16`].
    pub fn choose_mma(d: usize, lq: usize) -> Self {
        if Self::W4R32.supports(d) && lq > 64 {
            Self::W4R32
        } else {
            Self::W4R16
        }
    }

    /// The thread's override, else `TT_SCALE_ATTN_TILE` (read once; an unknown value is logged
    /// and ignored).
    pub(super) fn asked() -> Option<Self> {
        static FROM_ENV: OnceLock<Option<AttentionTile>> = OnceLock::new();
        TILE_OVERRIDE.with(|o| o.get()).or_else(|| {
            *FROM_ENV.get_or_init(|| {
                let v = std::env::var("TT_SCALE_ATTN_TILE").ok()?;
                let tile = Self::parse(&v);
                if tile.is_none() {
                    tracing::warn!(
                        "TT_SCALE_ATTN_TILE={v:?} is not a tile (w4r16, w8r16, w4r32, wg2, \
                         wg1, wg2p, wg1p); using the default"
                    );
                }
                tile
            })
        })
    }
}

/// Whether attention tiles are tuned on CUDA: `TT_SCALE_ATTN_TUNE` unset, or not `0`/`off`/
/// `false`/`no`. See [`super::tuning`].
pub fn attention_tuning_enabled() -> bool {
    static FROM_ENV: OnceLock<bool> = OnceLock::new();
    *FROM_ENV.get_or_init(|| !env_says_off("TT_SCALE_ATTN_TUNE"))
}

/// Whether environment variable `name` is `0`, `off`, `false` or `no` (any case).
pub(super) fn env_says_off(name: &str) -> bool {
    matches!(
        std::env::var(name)
            .unwrap_or_default()
            .to_ascii_lowercase()
            .as_str(),
        "0" | "off" | "false" | "no"
    )
}

/// The fastest of `timed` (tile, seconds), the first on ties; `None` when empty or no time is
/// finite.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn fastest_tile(timed: &[(AttentionTile, f64)]) -> Option<AttentionTile> {
    timed
        .iter()
        .filter(|(_, t)| t.is_finite())
        .fold(
            None::<(AttentionTile, f64)>,
            |best, &(tile, t)| match best {
                Some((_, bt)) if bt <= t => best,
                _ => Some((tile, t)),
            },
        )
        .map(|(tile, _)| tile)
}

/// Runs `f` with the fused attention using `tile` on this thread where the kernel has it for the
/// head size (benchmarks and tests compare the tiles in one process).
pub fn with_attention_tile<R>(tile: AttentionTile, f: impl FnOnce() -> R) -> R {
    with_override(&TILE_OVERRIDE, tile, f)
}

/// Whether the fused kernels are switched on: `TT_SCALE_FUSED` unset, or not `0`/`off`/
/// `false`/`no`, unless [`with_fused`] overrides it on this thread.
pub fn fused_enabled() -> bool {
    static FROM_ENV: OnceLock<bool> = OnceLock::new();
    OVERRIDE
        .with(|o| o.get())
        .unwrap_or_else(|| *FROM_ENV.get_or_init(|| !env_says_off("TT_SCALE_FUSED")))
}

/// Runs `f` with the fused kernels switched on or off on this thread (tests and benchmarks
/// compare both paths in one process).
pub fn with_fused<R>(on: bool, f: impl FnOnce() -> R) -> R {
    with_override(&OVERRIDE, on, f)
}

/// Runs `f` with the thread-local override `key` set to `value`, restoring the previous value
/// afterwards (also when `f` panics).
pub(super) fn with_override<T: Copy + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<Option<T>>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(
        &'static std::thread::LocalKey<std::cell::Cell<Option<T>>>,
        Option<T>,
    );
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|o| o.set(self.1));
        }
    }
    let _restore = Restore(key, key.with(|o| o.replace(Some(value))));
    f()
}

/// Whether a (B, H, L, D) layout suits the attention kernel: unit innermost stride, other
/// strides and the start offset multiples of 8 elements (16-byte vector loads).
pub(crate) fn attention_layout_ok(stride: &[usize], offset: usize) -> bool {
    stride.len() == 4 && stride[3] == 1 && stride[..3].iter().all(|s| s % 8 == 0) && offset % 8 == 0
}

/// How the CUDA group norm splits each group of `n` elements over blocks: (chunk length,
/// chunks). Enough blocks to fill a large GPU (about 512 over all `groups_x_batch` groups),
/// chunks of at least 4096 elements, each a multiple of `pack` (the 16-byte vector's elements).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn group_norm_chunks(n: usize, groups_x_batch: usize, pack: usize) -> (usize, usize) {
    const TARGET_BLOCKS: usize = 512;
    const MIN_CHUNK: usize = 4096;
    let pack = pack.max(1);
    let want = TARGET_BLOCKS.div_ceil(groups_x_batch.max(1));
    let chunks = want.min(n.div_ceil(MIN_CHUNK)).max(1);
    let chunk = n.div_ceil(chunks).div_ceil(pack).max(1) * pack;
    (chunk, n.div_ceil(chunk).max(1))
}
