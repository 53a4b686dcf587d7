// Fused scaled-dot-product attention (FlashAttention-2 style) on tensor cores.
//
// out[b, i, h, :] = sum_j softmax_j(scale * q[b, h, i, :] . k[b, h, j, :]) v[b, h, j, :]
// over the keys j < key_lens[b] (all Lk keys when key_lens is null). The score matrix is never
// materialised: each warp keeps 16 query rows, streams 64-key tiles of K and V through shared
// memory, and keeps a running maximum and sum per row (online softmax), all in float32. Tiles
// arrive by cp.async, V(t) overlapping the scores of K(t) and K(t+1) the product with V(t); K and
// V reach the tensor cores through ldmatrix (V transposed on the way), the probabilities straight
// from the score accumulators (their layout is the A fragment's).
//
// q, k, v: 16-bit (bf16 or f16), innermost dimension contiguous, any batch/head/sequence strides
// that are multiples of 8 elements, 16-byte aligned bases. out: contiguous (B, Lq, H, D).
// Head sizes: D a multiple of 8 up to 160 (instantiated for 40, 64, 72, 80, 128, 160); the
// product over D is zero-padded to a multiple of 16 in shared memory.
// Grid (ceil(Lq / 64), H, B), 128 threads.
#include "tt_common.cuh"

#define TT_ATT_BM 64
#define TT_ATT_BN 64
#define TT_ATT_THREADS 128

template <typename T, int D>
__device__ __forceinline__ void tt_attention_impl(
    const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, T *__restrict__ out,
    const int *__restrict__ key_lens, int heads, int lq, int lk, long long q_sb, long long q_sh,
    long long q_sl, long long k_sb, long long k_sh, long long k_sl, long long v_sb,
    long long v_sh, long long v_sl, float scale_log2) {
  constexpr int DP = (D + 15) / 16 * 16;  // padded head size: the k extent of Q·Kᵀ
  constexpr int SROW = DP + 8;            // shared row stride; +8 spreads rows over banks
  constexpr int KT = DP / 16;             // k-steps of Q·Kᵀ
  constexpr int NT = D / 8;               // n-tiles of the output
  constexpr int CH = DP / 8;              // 16-byte chunks per shared row
  constexpr int ST = TT_ATT_BN / 8;       // n-tiles of a score tile
  __shared__ __align__(16) T ks[TT_ATT_BN * SROW];
  __shared__ __align__(16) T vs[TT_ATT_BN * SROW];

  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  int kv_len = lk;
  if (key_lens != nullptr) {
    kv_len = key_lens[b];
    if (kv_len > lk) kv_len = lk;
    if (kv_len < 0) kv_len = 0;
  }
  const T *qp = q + b * q_sb + h * q_sh;
  const T *kp = k + b * k_sb + h * k_sh;
  const T *vp = v + b * v_sb + h * v_sh;
  const int r0 = blockIdx.x * TT_ATT_BM + warp * 16 + g;  // this thread's rows: r0 and r0 + 8
  const T zero = tt_from_float<T>(0.0f);

  // The warp's 16 query rows as A fragments, straight from global memory (read once).
  uint32_t qf[KT][4];
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

  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this thread's share; summed over the quad at the end
  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  // One 64-key tile of K or V into shared memory with cp.async, zeros past the keys and the head.
  auto load_tile = [&](T *buf, const T *base, long long sl, int kb) {
    for (int i = tid; i < TT_ATT_BN * CH; i += TT_ATT_THREADS) {
      const int row = i / CH;
      const int c = (i % CH) * 8;
      const int key = kb + row;
      const bool valid = key < kv_len && c < D;
      tt_cp_async16(&buf[row * SROW + c], valid ? base + key * sl + c : base, valid);
    }
  };

  // Pipeline: V(t) streams in while the scores of K(t) are computed, K(t+1) while V(t) is
  // multiplied. One buffer each; barriers separate a buffer's readers from its next writer.
  const int tiles = (kv_len + TT_ATT_BN - 1) / TT_ATT_BN;
  if (tiles > 0) {
    load_tile(ks, kp, k_sl, 0);
    tt_cp_async_commit();
  }
  for (int tile = 0; tile < tiles; ++tile) {
    const int kb = tile * TT_ATT_BN;
    load_tile(vs, vp, v_sl, kb);  // vs is free: the previous P·V ended with a barrier
    tt_cp_async_commit();
    tt_cp_async_wait<1>();  // K(tile) has landed (V(tile) may still be in flight)
    __syncthreads();

    // Scores of this warp's 16 rows against the tile's 64 keys, two 8-key n-tiles at a time:
    // one ldmatrix.x4 gives the B fragments (keys as n, head dims as k) of both.
    float s[ST][4];
#pragma unroll
    for (int j = 0; j < ST; j += 2) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
      s[j + 1][0] = s[j + 1][1] = s[j + 1][2] = s[j + 1][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        // Matrix m = lane / 8: keys (j + m / 2)·8.., head dims kk·16 + (m % 2)·8..
        const int m = lane >> 3;
        uint32_t kf[4];
        tt_ldmatrix_x4(kf, &ks[((j + (m >> 1)) * 8 + (lane & 7)) * SROW + kk * 16 + (m & 1) * 8]);
        const uint32_t b0[2] = {kf[0], kf[1]};
        const uint32_t b1[2] = {kf[2], kf[3]};
        tt_mma_16816<T>(s[j], qf[kk], b0);
        tt_mma_16816<T>(s[j + 1], qf[kk], b1);
      }
    }
#pragma unroll
    for (int j = 0; j < ST; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = kb + j * 8 + 2 * t + (e & 1);
        s[j][e] = key < kv_len ? s[j][e] * scale_log2 : -INFINITY;
      }
    }

    // Online softmax, per row (rr = 0: row r0, elements 0-1; rr = 1: row r0 + 8, elements 2-3).
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < ST; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * rr], s[j][2 * rr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(TT_FULL_MASK, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(TT_FULL_MASK, mx, 2));
      const float new_max = fmaxf(row_max[rr], mx);
      const float alpha = exp2f(row_max[rr] - new_max);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < ST; ++j) {
        s[j][2 * rr] = exp2f(s[j][2 * rr] - new_max);
        s[j][2 * rr + 1] = exp2f(s[j][2 * rr + 1] - new_max);
        sum += s[j][2 * rr] + s[j][2 * rr + 1];
      }
      row_sum[rr] = row_sum[rr] * alpha + sum;
      row_max[rr] = new_max;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        acc[n][2 * rr] *= alpha;
        acc[n][2 * rr + 1] *= alpha;
      }
    }

    __syncthreads();  // every warp is done with K(tile)
    if (tile + 1 < tiles) {
      load_tile(ks, kp, k_sl, kb + TT_ATT_BN);
      tt_cp_async_commit();
      tt_cp_async_wait<1>();  // V(tile) has landed (K(tile + 1) may still be in flight)
    } else {
      tt_cp_async_wait<0>();
    }
    __syncthreads();

    // acc += P·V; the score accumulators are already laid out as A fragments.
#pragma unroll
    for (int kk = 0; kk < TT_ATT_BN / 16; ++kk) {
      uint32_t pf[4];
      pf[0] = tt_pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pf[1] = tt_pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pf[2] = tt_pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pf[3] = tt_pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
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
        tt_mma_16816<T>(acc[n], pf, b0);
        tt_mma_16816<T>(acc[n + 1], pf, b1);
      }
      if (NT & 1) {  // an odd number of n-tiles (D = 40, 72): the last one alone
        uint32_t vf[2];
        tt_ldmatrix_x2_trans(vf, vrow + (NT - 1) * 8);
        tt_mma_16816<T>(acc[NT - 1], pf, vf);
      }
    }
    __syncthreads();  // every warp is done with V(tile) before the next tile overwrites it
  }

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float l = row_sum[rr];
    l += __shfl_xor_sync(TT_FULL_MASK, l, 1);
    l += __shfl_xor_sync(TT_FULL_MASK, l, 2);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const int row = r0 + 8 * rr;
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

#define TT_ATTENTION(NAME, T, D)                                                                 \
  extern "C" __global__ void __launch_bounds__(TT_ATT_THREADS) NAME(                           \
      const T *q, const T *k, const T *v, T *out, const int *key_lens, int heads, int lq,        \
      int lk, long long q_sb, long long q_sh, long long q_sl, long long k_sb, long long k_sh,    \
      long long k_sl, long long v_sb, long long v_sh, long long v_sl, float scale_log2) {        \
    tt_attention_impl<T, D>(q, k, v, out, key_lens, heads, lq, lk, q_sb, q_sh, q_sl, k_sb, k_sh, \
                            k_sl, v_sb, v_sh, v_sl, scale_log2);                                 \
  }

TT_ATTENTION(tt_attention_bf16_d40, tt_bf16, 40)
TT_ATTENTION(tt_attention_bf16_d64, tt_bf16, 64)
TT_ATTENTION(tt_attention_bf16_d72, tt_bf16, 72)
TT_ATTENTION(tt_attention_bf16_d80, tt_bf16, 80)
TT_ATTENTION(tt_attention_bf16_d128, tt_bf16, 128)
TT_ATTENTION(tt_attention_bf16_d160, tt_bf16, 160)
TT_ATTENTION(tt_attention_f16_d40, tt_f16, 40)
TT_ATTENTION(tt_attention_f16_d64, tt_f16, 64)
TT_ATTENTION(tt_attention_f16_d72, tt_f16, 72)
TT_ATTENTION(tt_attention_f16_d80, tt_f16, 80)
TT_ATTENTION(tt_attention_f16_d128, tt_f16, 128)
TT_ATTENTION(tt_attention_f16_d160, tt_f16, 160)
