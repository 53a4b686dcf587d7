// Fused scaled-dot-product attention (FlashAttention-2 style) on tensor cores.
//
// out[b, i, h, :] = sum_j softmax_j(scale * q[b, h, i, :] . k[b, h/G, j, :]) v[b, h/G, j, :],
// scale > 0, over the keys j that row i of batch row b sees (TtKeyMask: below an end, outside a
// hole, at most causal_off past i; every key without key_ranges and causality). G = kv_group
// query heads share one key/value head (grouped-query attention; 1 otherwise). A row that sees no
// key comes out as zeros; a block's tiles stop at the last key its rows may see (causal
// attention skips the tiles above the diagonal). The score matrix is never materialised: each warp keeps 16 query rows per m-tile (one or two m-tiles), streams 64-key
// tiles of K and V through shared memory, and keeps a running maximum and sum per row (online
// softmax), all in float32. Tiles arrive by cp.async, V(t) overlapping the scores of K(t) and
// K(t+1) the product with V(t); K and V reach the tensor cores through ldmatrix (V transposed on
// the way), the probabilities straight from the score accumulators (their layout is the A
// fragment's).
//
// Block tiles (the kernel name's suffix): w4r16, 4 warps of 16 query rows (64 rows a block, the
// warp's Q fragments held in registers); w8r16, 8 warps of 16 rows (128 rows: a K/V tile serves
// twice the rows); w4r32, 4 warps of 32 rows (128 rows, FlashAttention-2's tile for head sizes
// 64 and 128: every K and V fragment read from shared memory feeds two products, the Q tile sits
// in shared memory). Every row is computed by the same sequence of operations in every tile, so
// the three give bit-identical outputs; they differ only in speed. On Hopper (the compute_90a
// PTX), the wgmma tiles at the end of this file (wg2, wg1 and their pipelined wg2p, wg1p) run both
// products on wgmma instead.
//
// q, k, v: 16-bit (bf16 or f16), innermost dimension contiguous, any batch/head/sequence strides
// that are multiples of 8 elements, 16-byte aligned bases. out: contiguous (B, Lq, H, D).
// Head sizes: D a multiple of 8 up to 160 (instantiated for 40, 64, 72, 80, 128, 160); the
// product over D is zero-padded to a multiple of 16 in shared memory.
// Launch: grid (ceil(Lq / BM), H, B), WARPS * 32 threads, TtAttnTile::SMEM_BYTES of dynamic
// shared memory (more than 48 KiB needs the function attribute raised first).
#include "tt_common.cuh"

#define TT_ATT_BN 64  // keys per K/V tile

// The shape of a block tile: WARPS warps of MT m-tiles (16 query rows each).
template <typename T, int D, int WARPS, int MT>
struct TtAttnTile {
  static constexpr int DP = (D + 15) / 16 * 16;  // padded head size: the k extent of Q·Kᵀ
  static constexpr int SROW = DP + 8;            // shared row stride; +8 spreads rows over banks
  static constexpr int BM = WARPS * 16 * MT;     // query rows of a block
  static constexpr int THREADS = WARPS * 32;
  static constexpr bool Q_IN_SMEM = MT > 1;  // else each warp keeps its Q fragments in registers
  // K tile, V tile, and the Q tile where it lives in shared memory.
  static constexpr int SMEM_BYTES =
      (2 * TT_ATT_BN + (Q_IN_SMEM ? BM : 0)) * SROW * static_cast<int>(sizeof(T));
};

// Which keys a query row sees: key j is visible to row i when j < end (text padding at the end),
// j lies outside the hole [hole_lo, hole_hi) (left padding after a cached prefix), and
// j <= i + causal_off (causal attention, the queries being the last Lq of the keys: Lk - Lq;
// without causality, Lk). Keys from end on and in the hole are never read (the tiles get zeros
// there), so they may hold anything; keys hidden only by causality must be finite.
struct TtKeyMask {
  int end, hole_lo, hole_hi, causal_off;

  // Whether a key row is loaded (not past the end, not in the hole).
  __device__ __forceinline__ bool stored(int key) const {
    return key < end && (key < hole_lo || key >= hole_hi);
  }
  // How many leading keys rows up to `last_row` may see.
  __device__ __forceinline__ int keys_for(int last_row) const {
    const int n = last_row + causal_off + 1;
    return n < 0 ? 0 : (n < end ? n : end);
  }
  // Whether some key of [kb, kb + n) is hidden from row `row` or from a later row.
  __device__ __forceinline__ bool any_hidden(int kb, int n, int row) const {
    const int last = kb + n - 1;
    return last >= end || (kb < hole_hi && last >= hole_lo) || last > row + causal_off;
  }
};

// The key mask of batch row b: key_ranges (3 ints a batch row: end, clamped to [0, lk]; hole
// start; hole end) or every key, and causal_off clamped to lk (no causality: anything >= lk).
__device__ __forceinline__ TtKeyMask tt_key_mask(const int *key_ranges, int b, int lk,
                                                 int causal_off) {
  TtKeyMask m{lk, 0, 0, causal_off < lk ? causal_off : lk};
  if (key_ranges != nullptr) {
    const int n = key_ranges[3 * b];
    m.end = n > lk ? lk : (n < 0 ? 0 : n);
    m.hole_lo = key_ranges[3 * b + 1];
    m.hole_hi = key_ranges[3 * b + 2];
    if (m.hole_hi <= m.hole_lo) m.hole_lo = m.hole_hi = 0;
  }
  return m;
}

// Where a thread of an attention block works: batch row b (blockIdx.z), head h (blockIdx.y), its
// thread index, warp, lane and fragment coordinates (g = lane / 4, t = lane % 4), the keys of its
// batch row, and the (b, h) slices of q and the (b, h / kv_group) slices of k and v.
template <typename T>
struct TtAttnPlace {
  int b, h, tid, warp, lane, g, t;
  TtKeyMask mask;
  const T *qp, *kp, *vp;
};

template <typename T>
__device__ __forceinline__ TtAttnPlace<T> tt_attention_place(
    const T *q, const T *k, const T *v, const int *key_ranges, int kv_group, int lk,
    int causal_off, long long q_sb, long long q_sh, long long k_sb, long long k_sh, long long v_sb,
    long long v_sh) {
  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const int hk = h / kv_group;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  return TtAttnPlace<T>{b,
                        h,
                        tid,
                        tid >> 5,
                        lane,
                        lane >> 2,
                        lane & 3,
                        tt_key_mask(key_ranges, b, lk, causal_off),
                        q + b * q_sb + h * q_sh,
                        k + b * k_sb + hk * k_sh,
                        v + b * v_sb + hk * v_sh};
}

// The A fragments of a warp's 16 query rows (this thread's rows r0 and r0 + 8), one per 16 head
// dimensions, straight from global memory: zeros past lq and past the head size D.
template <typename T, int D, int KT>
__device__ __forceinline__ void tt_load_q_fragments(uint32_t (&qf)[KT][4], const T *qp,
                                                    long long q_sl, int r0, int lq, int t) {
  const T zero = tt_from_float<T>(0.0f);
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = r0 + ((r & 1) ? 8 : 0);
      const int col = kk * 16 + 2 * t + ((r & 2) ? 8 : 0);
      T lo = zero, hi = zero;
      if (row < lq && col < D) {
        lo = qp[row * q_sl + col];
        hi = qp[row * q_sl + col + 1];
      }
      qf[kk][r] = tt_pack2_raw<T>(lo, hi);
    }
  }
}

// One tile of the online softmax for a thread's two rows of one m-tile, row0 (rr = 0: the row of
// elements 0-1 of each score n-tile) and row0 + 8 (rr = 1: elements 2-3): masks the keys from kb
// on that the rows do not see (tiles without such keys skip the check), turns the raw scores into
// probabilities against the running maximum in log2 units (shared by the quad of lanes that hold
// a row; one fused multiply-add and one exp2 per score), and updates the running sum. alpha
// receives each row's factor exp2(old max - new max), by which the output accumulators must be
// rescaled before the tile's P·V (tt_rescale). A row that has seen no key yet keeps the maximum
// -inf, its probabilities and alpha 0 (not the NaNs of -inf - -inf). scale_log2 must be positive
// (the maximum of the scaled scores is then the scaled maximum). (Starting the maxima at the
// lowest finite float instead of -inf would need no select here, but makes ptxas spill in
// w4r32 for sm_90a.)
template <int ST>
__device__ __forceinline__ void tt_softmax_tile(float (&s)[ST][4], float (&row_max)[2],
                                                float (&row_sum)[2], float (&alpha)[2], int kb,
                                                const TtKeyMask &mask, int row0, int t,
                                                float scale_log2) {
  if (mask.any_hidden(kb, ST * 8, row0)) {
    // Per row, the keys below its limit (end and causality) that lie outside the hole.
    const int lo = mask.hole_lo, hi = mask.hole_hi;
    const int limit[2] = {mask.keys_for(row0), mask.keys_for(row0 + 8)};
#pragma unroll
    for (int j = 0; j < ST; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = kb + j * 8 + 2 * t + (e & 1);
        if (key >= limit[e >> 1] || (key >= lo && key < hi)) s[j][e] = -INFINITY;
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < ST; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * rr], s[j][2 * rr + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(TT_FULL_MASK, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(TT_FULL_MASK, mx, 2));
    const float new_max = fmaxf(row_max[rr], mx * scale_log2);
    const float base = new_max == -INFINITY ? 0.0f : new_max;
    alpha[rr] = exp2f(row_max[rr] - base);
    const float shift = -base;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < ST; ++j) {
      s[j][2 * rr] = exp2f(fmaf(s[j][2 * rr], scale_log2, shift));
      s[j][2 * rr + 1] = exp2f(fmaf(s[j][2 * rr + 1], scale_log2, shift));
      sum += s[j][2 * rr] + s[j][2 * rr + 1];
    }
    row_sum[rr] = row_sum[rr] * alpha[rr] + sum;
    row_max[rr] = new_max;
  }
}

// Rescales a thread's output accumulators (two rows of one m-tile) by their rows' alpha.
template <int NT>
__device__ __forceinline__ void tt_rescale(float (&acc)[NT][4], const float (&alpha)[2]) {
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    acc[n][0] *= alpha[0];
    acc[n][1] *= alpha[0];
    acc[n][2] *= alpha[1];
    acc[n][3] *= alpha[1];
  }
}

// tt_softmax_tile, then tt_rescale: the whole online-softmax step for one tile.
template <int ST, int NT>
__device__ __forceinline__ void tt_online_softmax(float (&s)[ST][4], float (&row_max)[2],
                                                  float (&row_sum)[2], float (&acc)[NT][4],
                                                  int kb, const TtKeyMask &mask, int row0, int t,
                                                  float scale_log2) {
  float alpha[2];
  tt_softmax_tile<ST>(s, row_max, row_sum, alpha, kb, mask, row0, t, scale_log2);
  tt_rescale<NT>(acc, alpha);
}

// The probabilities of keys 16kk..16kk+15 of a score tile as the A fragment of the P·V product
// (the score accumulators' layout is the A fragment's).
template <typename T, int ST>
__device__ __forceinline__ void tt_probability_fragment(const float (&s)[ST][4], int kk,
                                                        uint32_t (&pf)[4]) {
  pf[0] = tt_pack2<T>(s[2 * kk][0], s[2 * kk][1]);
  pf[1] = tt_pack2<T>(s[2 * kk][2], s[2 * kk][3]);
  pf[2] = tt_pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  pf[3] = tt_pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Writes a thread's two output rows of one m-tile, row0 and row0 + 8 (those below lq): the
// accumulators over the row's sum (summed over the quad), zeros for a row without keys.
template <typename T, int D, int NT>
__device__ __forceinline__ void tt_attention_store(const float (&acc)[NT][4],
                                                   const float (&row_sum)[2], T *out, int b,
                                                   int h, int heads, int lq, int row0, int t) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float l = row_sum[rr];
    l += __shfl_xor_sync(TT_FULL_MASK, l, 1);
    l += __shfl_xor_sync(TT_FULL_MASK, l, 2);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const int row = row0 + 8 * rr;
    if (row < lq) {
      T *op = out + ((static_cast<long long>(b) * lq + row) * heads + h) * D;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int col = n * 8 + 2 * t;
        op[col] = tt_from_float<T>(acc[n][2 * rr] * inv);
        op[col + 1] = tt_from_float<T>(acc[n][2 * rr + 1] * inv);
      }
    }
  }
}

template <typename T, int D, int WARPS, int MT>
__device__ __forceinline__ void tt_attention_impl(
    const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, T *__restrict__ out,
    const int *__restrict__ key_ranges, int heads, int kv_group, int lq, int lk, int causal_off,
    long long q_sb, long long q_sh, long long q_sl, long long k_sb, long long k_sh,
    long long k_sl, long long v_sb, long long v_sh, long long v_sl, float scale_log2) {
  using Tile = TtAttnTile<T, D, WARPS, MT>;
  constexpr int SROW = Tile::SROW;
  constexpr int BM = Tile::BM;
  constexpr int THREADS = Tile::THREADS;
  constexpr int KT = Tile::DP / 16;  // k-steps of Q·Kᵀ
  constexpr int NT = D / 8;          // n-tiles of the output
  constexpr int CH = Tile::DP / 8;   // 16-byte chunks per shared row
  constexpr int ST = TT_ATT_BN / 8;  // n-tiles of a score tile
  TT_DYNAMIC_SMEM(smem);
  if (tt_dynamic_smem_bytes() < static_cast<unsigned>(Tile::SMEM_BYTES)) __trap();  // launcher bug
  T *ks = reinterpret_cast<T *>(smem);
  T *vs = ks + TT_ATT_BN * SROW;
  T *qs = vs + TT_ATT_BN * SROW;  // (Q_IN_SMEM) the block's BM query rows

  const auto [b, h, tid, warp, lane, g, t, mask, qp, kp, vp] = tt_attention_place(
      q, k, v, key_ranges, kv_group, lk, causal_off, q_sb, q_sh, k_sb, k_sh, v_sb, v_sh);
  const int wrow = warp * 16 * MT;           // the warp's first row within the block
  const int r0 = blockIdx.x * BM + wrow + g;  // this thread's rows: r0 + 16 mt and r0 + 16 mt + 8
  // With two m-tiles (w4r32) the loop reads the mask from shared memory: the accumulators take
  // nearly every register (ptxas spills there otherwise, and in w8r16 when it does so there).
  __shared__ TtKeyMask shared_keys;
  const TtKeyMask own_keys = mask;
  if constexpr (MT > 1) {
    if (tid == 0) shared_keys = mask;
    __syncthreads();
  }
  const TtKeyMask &keys = MT > 1 ? shared_keys : own_keys;

  // `rows` rows of K, V or Q from row `first` into shared memory with cp.async, zeros for the
  // rows `rows_of` does not store and past the head.
  auto load_rows = [&](T *buf, const T *base, long long sl, int first, const TtKeyMask &rows_of,
                       int rows) {
    for (int i = tid; i < rows * CH; i += THREADS) {
      const int row = i / CH;
      const int c = (i % CH) * 8;
      const int r = first + row;
      const bool valid = rows_of.stored(r) && c < D;
      tt_cp_async16(&buf[row * SROW + c], valid ? base + r * sl + c : base, valid);
    }
  };

  // With one m-tile, the warp's 16 query rows as A fragments, straight from global memory
  // (read once); with more, the Q tile goes to shared memory with the first K tile.
  uint32_t qf[Tile::Q_IN_SMEM ? 1 : KT][4];
  if constexpr (!Tile::Q_IN_SMEM) tt_load_q_fragments<T, D, KT>(qf, qp, q_sl, r0, lq, t);

  float row_max[MT][2];
  float row_sum[MT][2];  // this thread's share; summed over the quad at the end
  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.0f;
  }

  // Pipeline: V(t) streams in while the scores of K(t) are computed, K(t+1) while V(t) is
  // multiplied. One buffer each; barriers separate a buffer's readers from its next writer.
  const int block_end = static_cast<int>(blockIdx.x + 1) * BM;
  const int last_row = (lq < block_end ? lq : block_end) - 1;
  const int tiles = (mask.keys_for(last_row) + TT_ATT_BN - 1) / TT_ATT_BN;
  if (tiles > 0) {
    load_rows(ks, kp, k_sl, 0, mask, TT_ATT_BN);
    if constexpr (Tile::Q_IN_SMEM)
      load_rows(qs, qp, q_sl, blockIdx.x * BM, TtKeyMask{lq, 0, 0, 0}, BM);  // rows below lq
    tt_cp_async_commit();
  }
  for (int tile = 0; tile < tiles; ++tile) {
    const int kb = tile * TT_ATT_BN;
    // vs is free: the last P·V ended with a barrier.
    load_rows(vs, vp, v_sl, kb, keys, TT_ATT_BN);
    tt_cp_async_commit();
    tt_cp_async_wait<1>();  // K(tile) (and Q) have landed (V(tile) may still be in flight)
    __syncthreads();

    // Scores of the warp's rows against the tile's 64 keys. Per k-step: the A fragments of each
    // m-tile, then two 8-key n-tiles at a time, one ldmatrix.x4 giving the B fragments (keys as
    // n, head dims as k) of both, each used by every m-tile.
    float s[MT][ST][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < ST; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (Tile::Q_IN_SMEM) {
          // Matrix m = lane / 8: rows (m % 2)·8.., head dims kk·16 + (m / 2)·8..
          const int row = wrow + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          tt_ldmatrix_x4(a[mt], &qs[row * SROW + kk * 16 + (lane >> 4) * 8]);
        } else {
#pragma unroll
          for (int r = 0; r < 4; ++r) a[mt][r] = qf[kk][r];
        }
      }
#pragma unroll
      for (int j = 0; j < ST; j += 2) {
        // Matrix m = lane / 8: keys (j + m / 2)·8.., head dims kk·16 + (m % 2)·8..
        const int m = lane >> 3;
        uint32_t kf[4];
        tt_ldmatrix_x4(kf, &ks[((j + (m >> 1)) * 8 + (lane & 7)) * SROW + kk * 16 + (m & 1) * 8]);
        const uint32_t b0[2] = {kf[0], kf[1]};
        const uint32_t b1[2] = {kf[2], kf[3]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          tt_mma_16816<T>(s[mt][j], a[mt], b0);
          tt_mma_16816<T>(s[mt][j + 1], a[mt], b1);
        }
      }
    }
    // Online softmax, per m-tile.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      tt_online_softmax<ST, NT>(s[mt], row_max[mt], row_sum[mt], acc[mt], kb, keys, r0 + 16 * mt,
                                t, scale_log2);

    __syncthreads();  // every warp is done with K(tile)
    if (tile + 1 < tiles) {
      load_rows(ks, kp, k_sl, kb + TT_ATT_BN, keys, TT_ATT_BN);
      tt_cp_async_commit();
      tt_cp_async_wait<1>();  // V(tile) has landed (K(tile + 1) may still be in flight)
    } else {
      tt_cp_async_wait<0>();
    }
    __syncthreads();

    // acc += P·V; the score accumulators are already laid out as A fragments.
#pragma unroll
    for (int kk = 0; kk < TT_ATT_BN / 16; ++kk) {
      uint32_t pf[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) tt_probability_fragment<T, ST>(s[mt], kk, pf[mt]);
      // B fragments of V (keys as k, head dims as n) by transposing ldmatrix, two n-tiles per
      // x4: matrix m = lane / 8 holds keys kk·16 + (m % 2)·8.., head dims (n + m / 2)·8..
      const int m = lane >> 3;
      const T *vrow = &vs[(kk * 16 + (m & 1) * 8 + (lane & 7)) * SROW];
#pragma unroll
      for (int n = 0; n + 1 < NT; n += 2) {
        uint32_t vf[4];
        tt_ldmatrix_x4_trans(vf, vrow + (n + (m >> 1)) * 8);
        const uint32_t b0[2] = {vf[0], vf[1]};
        const uint32_t b1[2] = {vf[2], vf[3]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          tt_mma_16816<T>(acc[mt][n], pf[mt], b0);
          tt_mma_16816<T>(acc[mt][n + 1], pf[mt], b1);
        }
      }
      if (NT & 1) {  // an odd number of n-tiles (D = 40, 72): the last one alone
        uint32_t vf[2];
        tt_ldmatrix_x2_trans(vf, vrow + (NT - 1) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) tt_mma_16816<T>(acc[mt][NT - 1], pf[mt], vf);
      }
    }
    __syncthreads();  // every warp is done with V(tile) before the next tile overwrites it
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    tt_attention_store<T, D, NT>(acc[mt], row_sum[mt], out, b, h, heads, lq, r0 + 16 * mt, t);
}

// tt_attention_<dtype>_d<D>_w<WARPS>r<rows per warp>
#define TT_ATTENTION(TN, T, D, W, R)                                                             \
  extern "C" __global__ void __launch_bounds__(W * 32) tt_attention_##TN##_d##D##_w##W##r##R(    \
      const T *q, const T *k, const T *v, T *out, const int *key_ranges, int heads,             \
      int kv_group, int lq, int lk, int causal_off, long long q_sb, long long q_sh,              \
      long long q_sl, long long k_sb, long long k_sh, long long k_sl, long long v_sb,            \
      long long v_sh, long long v_sl, float scale_log2) {                                        \
    tt_attention_impl<T, D, W, R / 16>(q, k, v, out, key_ranges, heads, kv_group, lq, lk,        \
                                       causal_off, q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb,     \
                                       v_sh, v_sl, scale_log2);                                  \
  }

// Every head size in the w4r16 and w8r16 tiles; w4r32 where its accumulators fit the registers
// (up to D = 128: ptxas reports no spills there).
#define TT_ATTENTION_ALL(TN, T)   \
  TT_ATTENTION(TN, T, 40, 4, 16)  \
  TT_ATTENTION(TN, T, 64, 4, 16)  \
  TT_ATTENTION(TN, T, 72, 4, 16)  \
  TT_ATTENTION(TN, T, 80, 4, 16)  \
  TT_ATTENTION(TN, T, 128, 4, 16) \
  TT_ATTENTION(TN, T, 160, 4, 16) \
  TT_ATTENTION(TN, T, 40, 8, 16)  \
  TT_ATTENTION(TN, T, 64, 8, 16)  \
  TT_ATTENTION(TN, T, 72, 8, 16)  \
  TT_ATTENTION(TN, T, 80, 8, 16)  \
  TT_ATTENTION(TN, T, 128, 8, 16) \
  TT_ATTENTION(TN, T, 160, 8, 16) \
  TT_ATTENTION(TN, T, 40, 4, 32)  \
  TT_ATTENTION(TN, T, 64, 4, 32)  \
  TT_ATTENTION(TN, T, 72, 4, 32)  \
  TT_ATTENTION(TN, T, 80, 4, 32)  \
  TT_ATTENTION(TN, T, 128, 4, 32)

TT_ATTENTION_ALL(bf16, tt_bf16)
TT_ATTENTION_ALL(f16, tt_f16)

#ifdef TT_HAVE_WGMMA
// ---------------------------------------------------------------------------------------------
// The wgmma tiles (Hopper, sm_90a): 2 warpgroups of 64 query rows (128 rows, 256 threads: a K/V
// tile serves twice the rows) or 1 (64 rows, 128 threads: two blocks fit an SM, and their
// warpgroups never wait for each other at a barrier), both products on wgmma. Each warp still
// owns 16 rows with the same fragments as w8r16 (Q from registers as the A operand, the score
// accumulators as mma's), so the softmax is the same code; the tensor cores read K and V straight
// from shared memory through descriptors, no ldmatrix. K and V tiles are stored as 8x8 core
// matrices (8 rows of 16 bytes, 128 contiguous bytes): the 16-byte chunk c of row r at byte
// ((r / 8)·CH + c)·128 + (r % 8)·16, CH = ceil(D / 16)·2 (the chunks past the head size are
// zeros, for the k-steps of Q·Kᵀ), which reads as K-major for K (keys as N) and MN-major for V
// (head dims as N, the product m64nDk16). Every head size.
//
// Two schedules (the kernel name's suffix):
//   wg2, wg1: one K and one V buffer; per tile S = Q·Kᵀ, wait, softmax, P·V, wait, with V(t)
//     arriving during S and K(t+1) during P·V; four block barriers a tile.
//   wg2p, wg1p (pipelined, FlashAttention-3's intra-warpgroup overlap): two K and two V buffers;
//     per tile the products S(t) = Q·K(t)ᵀ and acc += P(t-1)·V(t-1) are issued together, the
//     softmax of S(t) runs while P(t-1)·V(t-1) is still on the tensor cores, and the rescale of
//     acc waits for it; K(t+1) and V(t) arrive during the whole tile; one block barrier a tile.
// Each row's accumulators see the same products, rescales and roundings in the same order in
// both schedules (acc = acc·alpha(t) + P(t)·V(t)), so all four give bit-identical outputs.

template <typename T, int D, int WG, bool PIPE>
struct TtAttnWgTile {
  static constexpr int DP = (D + 15) / 16 * 16;  // padded head size: the k extent of Q·Kᵀ
  static constexpr int CH = DP / 8;              // 16-byte chunks of a row
  static constexpr int BM = 64 * WG;
  static constexpr int THREADS = 128 * WG;
  static constexpr int TILE_ELEMS = TT_ATT_BN * DP;  // one K or V tile
  static constexpr int BUFFERS = PIPE ? 2 : 1;       // of K and of V
  static constexpr int SMEM_BYTES = 2 * BUFFERS * TILE_ELEMS * static_cast<int>(sizeof(T));
};

// Copies (cp.async) 64 rows of K or V from `first` into `buf` as core matrices, zeros for the
// rows `mask` does not store and past the head size; consecutive threads take consecutive rows
// of a core matrix, so each 8 of them fill 128 contiguous bytes.
template <typename T, int D, int THREADS>
__device__ __forceinline__ void tt_wg_load_tile(T *buf, const T *base, long long sl, int first,
                                                const TtKeyMask &mask, int tid) {
  constexpr int CH = (D + 15) / 16 * 2;
  for (int i = tid; i < TT_ATT_BN * CH; i += THREADS) {
    const int r8 = i & 7;
    const int c = (i >> 3) % CH;
    const int rb = (i >> 3) / CH;
    const int r = first + rb * 8 + r8;
    const bool valid = mask.stored(r) && c * 8 < D;
    tt_cp_async16(&buf[(rb * CH + c) * 64 + r8 * 8], valid ? base + r * sl + c * 8 : base, valid);
  }
}

// Issues S = Q·Kᵀ for the warpgroup's 64 rows and a tile's 64 keys in `ks` (K-major B, one k-step
// of 16 head dims per product: chunks 2kk and 2kk + 1 of each key); s must have been zeroed and
// fenced (tt_wgmma_fence). Does not commit.
template <typename T, int D>
__device__ __forceinline__ void tt_wg_scores(float (&s)[TT_ATT_BN / 8][4],
                                             const uint32_t (&qf)[(D + 15) / 16][4],
                                             const T *ks) {
  constexpr int CH = (D + 15) / 16 * 2;
#pragma unroll
  for (int kk = 0; kk < (D + 15) / 16; ++kk)
    tt_wgmma_rs<T, TT_ATT_BN, 0>(&s[0][0], qf[kk], tt_wgmma_desc(ks + 2 * kk * 64, 128, CH * 128));
}

// Issues acc += P·V for a tile: the probabilities as A fragments, V in `vs` as an MN-major B (head
// dims as N), one k-step of 16 keys (core-matrix rows 2kk and 2kk + 1) per product. Does not
// commit.
template <typename T, int D>
__device__ __forceinline__ void tt_wg_pv(float (&acc)[D / 8][4],
                                         const uint32_t (&pf)[TT_ATT_BN / 16][4], const T *vs) {
  constexpr int CH = (D + 15) / 16 * 2;
#pragma unroll
  for (int kk = 0; kk < TT_ATT_BN / 16; ++kk)
    tt_wgmma_rs<T, D, 1>(&acc[0][0], pf[kk], tt_wgmma_desc(vs + 2 * kk * CH * 64, CH * 128, 128));
}

// The probabilities of a whole score tile as the A fragments of P·V.
template <typename T>
__device__ __forceinline__ void tt_wg_probabilities(const float (&s)[TT_ATT_BN / 8][4],
                                                    uint32_t (&pf)[TT_ATT_BN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < TT_ATT_BN / 16; ++kk)
    tt_probability_fragment<T, TT_ATT_BN / 8>(s, kk, pf[kk]);
}

template <typename T, int D, int WG, bool PIPE>
__device__ __forceinline__ void tt_attention_wg_impl(
    const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, T *__restrict__ out,
    const int *__restrict__ key_ranges, int heads, int kv_group, int lq, int lk, int causal_off,
    long long q_sb, long long q_sh, long long q_sl, long long k_sb, long long k_sh,
    long long k_sl, long long v_sb, long long v_sh, long long v_sl, float scale_log2) {
  static_assert(D % 8 == 0 && D <= 256, "wgmma attention takes head sizes that are multiples of 8");
  using Tile = TtAttnWgTile<T, D, WG, PIPE>;
  constexpr int KT = Tile::DP / 16;
  constexpr int NT = D / 8;
  constexpr int ST = TT_ATT_BN / 8;
  constexpr int PT = TT_ATT_BN / 16;
  TT_DYNAMIC_SMEM(smem);
  if (tt_dynamic_smem_bytes() < static_cast<unsigned>(Tile::SMEM_BYTES)) __trap();  // launcher bug
  // K buffers, then V buffers.
  T *const kbuf = reinterpret_cast<T *>(smem);
  T *const vbuf = kbuf + Tile::BUFFERS * Tile::TILE_ELEMS;

  const auto [b, h, tid, warp, lane, g, t, mask, qp, kp, vp] = tt_attention_place(
      q, k, v, key_ranges, kv_group, lk, causal_off, q_sb, q_sh, k_sb, k_sh, v_sb, v_sh);
  const int r0 = blockIdx.x * Tile::BM + warp * 16 + g;  // this thread's rows: r0 and r0 + 8
  // Inside the loop the mask is read from shared memory (registers are scarce).
  __shared__ TtKeyMask keys;
  if (tid == 0) keys = mask;
  __syncthreads();
  auto load_k = [&](int tile) {
    tt_wg_load_tile<T, D, Tile::THREADS>(kbuf + (tile % Tile::BUFFERS) * Tile::TILE_ELEMS, kp,
                                         k_sl, tile * TT_ATT_BN, keys, tid);
    tt_cp_async_commit();
  };
  auto load_v = [&](int tile) {
    tt_wg_load_tile<T, D, Tile::THREADS>(vbuf + (tile % Tile::BUFFERS) * Tile::TILE_ELEMS, vp,
                                         v_sl, tile * TT_ATT_BN, keys, tid);
    tt_cp_async_commit();
  };
  auto k_tile = [&](int tile) { return kbuf + (tile % Tile::BUFFERS) * Tile::TILE_ELEMS; };
  auto v_tile = [&](int tile) { return vbuf + (tile % Tile::BUFFERS) * Tile::TILE_ELEMS; };
  // The block's copies have landed and are visible to the tensor cores' (async proxy) reads.
  auto landed = [&] {
    tt_fence_proxy_async();
    __syncthreads();
  };

  uint32_t qf[KT][4];
  tt_load_q_fragments<T, D, KT>(qf, qp, q_sl, r0, lq, t);

  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};
  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  float s[ST][4];
  uint32_t pf[PT][4];
  auto zero_scores = [&] {
#pragma unroll
    for (int j = 0; j < ST; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
  };

  const int block_end = static_cast<int>(blockIdx.x + 1) * Tile::BM;
  const int last_row = (lq < block_end ? lq : block_end) - 1;
  const int tiles = (mask.keys_for(last_row) + TT_ATT_BN - 1) / TT_ATT_BN;
  if constexpr (!PIPE) {
    if (tiles > 0) load_k(0);
    for (int tile = 0; tile < tiles; ++tile) {
      load_v(tile);
      tt_cp_async_wait<1>();  // K(tile) has landed
      landed();

      zero_scores();
      tt_wgmma_fence_regs(&s[0][0], 4 * ST);
      tt_wgmma_fence_regs(&qf[0][0], 4 * KT);
      tt_wgmma_fence();
      tt_wg_scores<T, D>(s, qf, k_tile(tile));
      tt_wgmma_commit();
      tt_wgmma_wait<0>();
      tt_wgmma_fence_regs(&s[0][0], 4 * ST);

      tt_online_softmax<ST, NT>(s, row_max, row_sum, acc, tile * TT_ATT_BN, keys, r0, t,
                                scale_log2);

      __syncthreads();  // the warpgroups are done with K(tile) (their products have completed)
      if (tile + 1 < tiles) {
        load_k(tile + 1);
        tt_cp_async_wait<1>();  // V(tile) has landed
      } else {
        tt_cp_async_wait<0>();
      }
      landed();

      tt_wg_probabilities<T>(s, pf);
      tt_wgmma_fence_regs(&acc[0][0], 4 * NT);
      tt_wgmma_fence_regs(&pf[0][0], 4 * PT);
      tt_wgmma_fence();  // acc was rescaled and pf written since the last product
      tt_wg_pv<T, D>(acc, pf, v_tile(tile));
      tt_wgmma_commit();
      tt_wgmma_wait<0>();
      tt_wgmma_fence_regs(&acc[0][0], 4 * NT);
      __syncthreads();  // the warpgroups are done with V(tile) before the next tile overwrites it
    }
  } else if (tiles > 0) {
    // S(0) and its softmax alone; K(1) and V(0) arrive meanwhile.
    load_k(0);
    load_v(0);
    if (tiles > 1) {
      load_k(1);
      tt_cp_async_wait<2>();  // K(0) has landed
    } else {
      tt_cp_async_wait<1>();
    }
    landed();
    zero_scores();
    tt_wgmma_fence_regs(&s[0][0], 4 * ST);
    tt_wgmma_fence_regs(&qf[0][0], 4 * KT);
    tt_wgmma_fence();
    tt_wg_scores<T, D>(s, qf, k_tile(0));
    tt_wgmma_commit();
    tt_wgmma_wait<0>();
    tt_wgmma_fence_regs(&s[0][0], 4 * ST);
    float alpha[2];
    tt_softmax_tile<ST>(s, row_max, row_sum, alpha, 0, keys, r0, t, scale_log2);
    tt_rescale<NT>(acc, alpha);
    tt_wg_probabilities<T>(s, pf);

    // Tile t issues S(t) and P(t-1)·V(t-1), waits for S(t) only and runs its softmax while
    // P(t-1)·V(t-1) is still on the tensor cores. The wait for that product, the rescale and the
    // probabilities of S(t) open the next iteration, behind a branch: ptxas moves a
    // wgmma.wait_group to the start of its basic block, and the softmax must stay before it.
    for (int tile = 1; tile < tiles; ++tile) {
      if (tile > 1) {
        tt_wgmma_wait<0>();  // P(tile-2)·V(tile-2)
        tt_wgmma_fence_regs(&acc[0][0], 4 * NT);
        tt_rescale<NT>(acc, alpha);
        tt_wg_probabilities<T>(s, pf);
      }
      // K(tile) and V(tile - 1) have landed; past this barrier every warpgroup is done with
      // K(tile - 1) and V(tile - 2), whose buffers the next copies take.
      tt_cp_async_wait<0>();
      landed();
      load_v(tile);
      if (tile + 1 < tiles) load_k(tile + 1);

      zero_scores();
      tt_wgmma_fence_regs(&s[0][0], 4 * ST);
      tt_wgmma_fence_regs(&qf[0][0], 4 * KT);
      tt_wgmma_fence_regs(&acc[0][0], 4 * NT);
      tt_wgmma_fence_regs(&pf[0][0], 4 * PT);
      tt_wgmma_fence();  // s zeroed, acc rescaled and pf written since the last products
      tt_wg_scores<T, D>(s, qf, k_tile(tile));
      tt_wgmma_commit();
      tt_wg_pv<T, D>(acc, pf, v_tile(tile - 1));
      tt_wgmma_commit();

      tt_wgmma_wait<1>();  // S(tile); P(tile - 1)·V(tile - 1) may still run
      tt_wgmma_fence_regs(&s[0][0], 4 * ST);
      tt_softmax_tile<ST>(s, row_max, row_sum, alpha, tile * TT_ATT_BN, keys, r0, t,
                          scale_log2);
    }
    if (tiles > 1) {
      tt_wgmma_wait<0>();
      tt_wgmma_fence_regs(&acc[0][0], 4 * NT);
      tt_rescale<NT>(acc, alpha);
      tt_wg_probabilities<T>(s, pf);
    }

    // The last P·V.
    tt_cp_async_wait<0>();
    landed();
    tt_wgmma_fence_regs(&acc[0][0], 4 * NT);
    tt_wgmma_fence_regs(&pf[0][0], 4 * PT);
    tt_wgmma_fence();
    tt_wg_pv<T, D>(acc, pf, v_tile(tiles - 1));
    tt_wgmma_commit();
    tt_wgmma_wait<0>();
    tt_wgmma_fence_regs(&acc[0][0], 4 * NT);
  }

  tt_attention_store<T, D, NT>(acc, row_sum, out, b, h, heads, lq, r0, t);
}

// tt_attention_<dtype>_d<D>_wg<warpgroups>[p]
#define TT_ATTENTION_WG(TN, T, D, WG, SUFFIX, PIPE)                                               \
  extern "C" __global__ void __launch_bounds__(128 * WG)                                         \
      tt_attention_##TN##_d##D##_wg##WG##SUFFIX(                                                 \
          const T *q, const T *k, const T *v, T *out, const int *key_ranges, int heads,         \
          int kv_group, int lq, int lk, int causal_off, long long q_sb, long long q_sh,          \
          long long q_sl, long long k_sb, long long k_sh, long long k_sl, long long v_sb,        \
          long long v_sh, long long v_sl, float scale_log2) {                                    \
    tt_attention_wg_impl<T, D, WG, PIPE>(q, k, v, out, key_ranges, heads, kv_group, lq, lk,      \
                                         causal_off, q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb,   \
                                         v_sh, v_sl, scale_log2);                                \
  }

// Both schedules of one head size and warpgroup count.
#define TT_ATTENTION_WG_BOTH(TN, T, D, WG) \
  TT_ATTENTION_WG(TN, T, D, WG, , false)   \
  TT_ATTENTION_WG(TN, T, D, WG, p, true)

#define TT_ATTENTION_WG_ALL(TN, T)     \
  TT_ATTENTION_WG_BOTH(TN, T, 40, 1)   \
  TT_ATTENTION_WG_BOTH(TN, T, 64, 1)   \
  TT_ATTENTION_WG_BOTH(TN, T, 72, 1)   \
  TT_ATTENTION_WG_BOTH(TN, T, 80, 1)   \
  TT_ATTENTION_WG_BOTH(TN, T, 128, 1)  \
  TT_ATTENTION_WG_BOTH(TN, T, 160, 1)  \
  TT_ATTENTION_WG_BOTH(TN, T, 40, 2)   \
  TT_ATTENTION_WG_BOTH(TN, T, 64, 2)   \
  TT_ATTENTION_WG_BOTH(TN, T, 72, 2)   \
  TT_ATTENTION_WG_BOTH(TN, T, 80, 2)   \
  TT_ATTENTION_WG_BOTH(TN, T, 128, 2)  \
  TT_ATTENTION_WG_BOTH(TN, T, 160, 2)

TT_ATTENTION_WG_ALL(bf16, tt_bf16)
TT_ATTENTION_WG_ALL(f16, tt_f16)
#endif  // TT_HAVE_WGMMA
