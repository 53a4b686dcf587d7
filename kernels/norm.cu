// Normalisations fused with what follows them in the transformer blocks.
#include "tt_common.cuh"

// Layer norm over the last dimension fused with the optional affine parameters and the adaLN
// modulation, one row per block (256 threads), statistics in float32:
//   y = ((x - mean) / sqrt(var + eps) * weight + bias) * (1 + scale) + shift
// x, y: contiguous (rows, cols). weight, bias: (cols) or null. shift, scale: null, or one row of
// `cols` per group of `rows_per_group` consecutive rows (row r uses group r / rows_per_group),
// groups `mod_stride` elements apart (a chunk of the modulation vector (B, 1, n * cols)).
template <typename T>
__device__ __forceinline__ void tt_layer_norm_mod_impl(const T *__restrict__ x, T *__restrict__ y,
                                                       const T *__restrict__ weight,
                                                       const T *__restrict__ bias,
                                                       const T *__restrict__ shift,
                                                       const T *__restrict__ scale, int cols,
                                                       int rows_per_group, long long mod_stride,
                                                       float eps) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const T *xr = x + row * cols;
  T *yr = y + row * cols;
  float sum = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += tt_to_float(xr[c]);
  const float mean = tt_block_sum(sum, scratch) / cols;
  float sq = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float d = tt_to_float(xr[c]) - mean;
    sq += d * d;
  }
  const float rstd = rsqrtf(tt_block_sum(sq, scratch) / cols + eps);
  const long long group = row / rows_per_group;
  const T *sh = shift != nullptr ? shift + group * mod_stride : nullptr;
  const T *sc = scale != nullptr ? scale + group * mod_stride : nullptr;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float v = (tt_to_float(xr[c]) - mean) * rstd;
    if (weight != nullptr) v *= tt_to_float(weight[c]);
    if (bias != nullptr) v += tt_to_float(bias[c]);
    if (sc != nullptr) v *= 1.0f + tt_to_float(sc[c]);
    if (sh != nullptr) v += tt_to_float(sh[c]);
    yr[c] = tt_from_float<T>(v);
  }
}

#define TT_LAYER_NORM_MOD(NAME, T)                                                              \
  extern "C" __global__ void NAME(const T *x, T *y, const T *weight, const T *bias,           \
                                  const T *shift, const T *scale, int cols, int rows_per_group, \
                                  long long mod_stride, float eps) {                            \
    tt_layer_norm_mod_impl<T>(x, y, weight, bias, shift, scale, cols, rows_per_group,           \
                              mod_stride, eps);                                                 \
  }

TT_LAYER_NORM_MOD(tt_layer_norm_mod_f32, float)
TT_LAYER_NORM_MOD(tt_layer_norm_mod_bf16, tt_bf16)
TT_LAYER_NORM_MOD(tt_layer_norm_mod_f16, tt_f16)

// Group norm of an (N, C, spatial...) contiguous tensor with the affine parameters and
// optionally SiLU fused, float32 statistics:
//   y = act((x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c]),  act = SiLU when `silu`
// over the C / groups channels of group g times `hw` positions (contiguous in memory).
//
// Two kernels, each on a grid (chunks, groups, N) of 256-thread blocks, so that a few large
// groups (SDXL's 32 groups of 2 samples; the VAE's 32 groups of one 1024x1024 image) still fill
// the GPU: block (k, g, s) covers elements [k * chunk, (k + 1) * chunk) of group g of sample s.
//   tt_group_stats_*   each block's count, mean and sum of squared deviations (Welford within a
//                      thread, Chan's merge across threads) -> partial[(s * groups + g) * chunks + k]
//   tt_group_norm_*    each block merges its group's partials (in double) and normalises its chunk
// Two reads and one write of x in all. With `vec` (hw and chunk multiples of 16 / sizeof(T),
// 16-byte-aligned x and y), 16-byte loads and stores, one channel per load. weight, bias: (C)
// or null; (C / groups) * hw < 2^31; chunk <= 2^24 (exact counts in float).

// Where block (k, g, s) of a group-norm grid works: its group's first element in x (`base`),
// the first channel of the group (`c0`) and its elements [begin, end) of the group.
struct TtGroupChunk {
  long long base, begin, end;
  int c0;
};

__device__ __forceinline__ TtGroupChunk tt_group_chunk(int channels, int hw, int groups,
                                                       int chunk) {
  const int per_group = channels / groups;
  const long long n = static_cast<long long>(per_group) * hw;
  const long long begin = static_cast<long long>(blockIdx.x) * chunk;
  TtGroupChunk r;
  r.c0 = static_cast<int>(blockIdx.y) * per_group;
  r.base = (static_cast<long long>(blockIdx.z) * channels + r.c0) * hw;
  r.begin = begin;
  r.end = begin + chunk < n ? begin + chunk : n;
  return r;
}

// Running (count, mean, M2) of a set of values, and Chan's merge of two sets.
struct TtMoments {
  float n, mean, m2;
};

__device__ __forceinline__ TtMoments tt_merge(TtMoments a, TtMoments b) {
  const float n = a.n + b.n;
  if (n == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float fb = b.n / n;
  return TtMoments{n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

// The moments of one thread's share of [begin, end) of `xg`, V elements (one pack) at a time.
template <typename T, int V>
__device__ __forceinline__ TtMoments tt_thread_moments(const T *__restrict__ xg, long long begin,
                                                       long long end) {
  struct alignas(sizeof(T) * V) Pack {
    T v[V];
  };
  TtMoments acc{0.0f, 0.0f, 0.0f};
  for (long long i = begin + static_cast<long long>(threadIdx.x) * V; i < end;
       i += static_cast<long long>(blockDim.x) * V) {
    const Pack p = *reinterpret_cast<const Pack *>(xg + i);
    float sum = 0.0f;
#pragma unroll
    for (int e = 0; e < V; ++e) sum += tt_to_float(p.v[e]);
    const float mean = sum / V;
    float m2 = 0.0f;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float d = tt_to_float(p.v[e]) - mean;
      m2 += d * d;
    }
    acc = tt_merge(acc, TtMoments{static_cast<float>(V), mean, m2});
  }
  return acc;
}

template <typename T>
__device__ __forceinline__ void tt_group_stats_impl(const T *__restrict__ x,
                                                    float *__restrict__ partial, int channels,
                                                    int hw, int groups, int chunk, int vec) {
  __shared__ TtMoments scratch[32];
  const TtGroupChunk at = tt_group_chunk(channels, hw, groups, chunk);
  constexpr int VV = 16 / static_cast<int>(sizeof(T));
  TtMoments m = vec ? tt_thread_moments<T, VV>(x + at.base, at.begin, at.end)
                    : tt_thread_moments<T, 1>(x + at.base, at.begin, at.end);
  for (int o = 16; o > 0; o >>= 1) {
    const TtMoments other{__shfl_xor_sync(TT_FULL_MASK, m.n, o),
                          __shfl_xor_sync(TT_FULL_MASK, m.mean, o),
                          __shfl_xor_sync(TT_FULL_MASK, m.m2, o)};
    m = tt_merge(m, other);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    TtMoments total = scratch[0];
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) total = tt_merge(total, scratch[w]);
    float *out = partial + 3 * ((static_cast<long long>(blockIdx.z) * groups + blockIdx.y) *
                                    gridDim.x +
                                blockIdx.x);
    out[0] = total.n;
    out[1] = total.mean;
    out[2] = total.m2;
  }
}

// Normalises elements [begin, end) of one group, V at a time (a pack lies in one channel).
template <typename T, int V>
__device__ __forceinline__ void tt_group_apply(const T *__restrict__ xg, T *__restrict__ yg,
                                               const T *__restrict__ weight,
                                               const T *__restrict__ bias, int c0, int hw,
                                               long long begin, long long end, float mean,
                                               float rstd, int silu) {
  struct alignas(sizeof(T) * V) Pack {
    T v[V];
  };
  for (long long i = begin + static_cast<long long>(threadIdx.x) * V; i < end;
       i += static_cast<long long>(blockDim.x) * V) {
    const int c = c0 + static_cast<int>(i / hw);
    // (x - mean) * (rstd * w) + b: one scale and one shift per channel.
    const float scale = rstd * (weight != nullptr ? tt_to_float(weight[c]) : 1.0f);
    const float shift = bias != nullptr ? tt_to_float(bias[c]) : 0.0f;
    const Pack p = *reinterpret_cast<const Pack *>(xg + i);
    Pack o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float v = fmaf(tt_to_float(p.v[e]) - mean, scale, shift);
      if (silu) v = v / (1.0f + expf(-v));
      o.v[e] = tt_from_float<T>(v);
    }
    *reinterpret_cast<Pack *>(yg + i) = o;
  }
}

template <typename T>
__device__ __forceinline__ void tt_group_norm_impl(const T *__restrict__ x, T *__restrict__ y,
                                                   const T *__restrict__ weight,
                                                   const T *__restrict__ bias,
                                                   const float *__restrict__ partial,
                                                   int channels, int hw, int groups, int chunk,
                                                   float eps, int silu, int vec) {
  __shared__ float stats[2];
  const TtGroupChunk at = tt_group_chunk(channels, hw, groups, chunk);
  if (threadIdx.x == 0) {
    // The group's chunks in order, merged in double: every block of the group gets the same
    // mean and rstd.
    const float *p =
        partial + 3 * (static_cast<long long>(blockIdx.z) * groups + blockIdx.y) * gridDim.x;
    double count = 0.0, mean = 0.0, m2 = 0.0;
    for (unsigned k = 0; k < gridDim.x; ++k) {
      const double nb = p[3 * k], mb = p[3 * k + 1], m2b = p[3 * k + 2];
      const double total = count + nb;
      if (total == 0.0) continue;
      const double delta = mb - mean;
      mean += delta * nb / total;
      m2 += m2b + delta * delta * count * nb / total;
      count = total;
    }
    stats[0] = static_cast<float>(mean);
    stats[1] = static_cast<float>(1.0 / sqrt(m2 / (count > 0.0 ? count : 1.0) + eps));
  }
  __syncthreads();
  constexpr int VV = 16 / static_cast<int>(sizeof(T));
  if (vec)
    tt_group_apply<T, VV>(x + at.base, y + at.base, weight, bias, at.c0, hw, at.begin, at.end,
                          stats[0], stats[1], silu);
  else
    tt_group_apply<T, 1>(x + at.base, y + at.base, weight, bias, at.c0, hw, at.begin, at.end,
                         stats[0], stats[1], silu);
}

#define TT_GROUP_NORM(STATS, NAME, T)                                                          \
  extern "C" __global__ void STATS(const T *x, float *partial, int channels, int hw, int groups, \
                                   int chunk, int vec) {                                       \
    tt_group_stats_impl<T>(x, partial, channels, hw, groups, chunk, vec);                      \
  }                                                                                            \
  extern "C" __global__ void NAME(const T *x, T *y, const T *weight, const T *bias,           \
                                  const float *partial, int channels, int hw, int groups,      \
                                  int chunk, float eps, int silu, int vec) {                   \
    tt_group_norm_impl<T>(x, y, weight, bias, partial, channels, hw, groups, chunk, eps, silu, \
                          vec);                                                                \
  }

TT_GROUP_NORM(tt_group_stats_f32, tt_group_norm_f32, float)
TT_GROUP_NORM(tt_group_stats_bf16, tt_group_norm_bf16, tt_bf16)
TT_GROUP_NORM(tt_group_stats_f16, tt_group_norm_f16, tt_f16)

// Flux's query/key preparation in one pass: from the fused projection qkv (B, L, >= 3·H·D, rows
// `row_stride` elements apart; q, k, v at columns 0, H·D, 2·H·D), writes out (3, B, L, H, D):
//   out[0] = rope(rms_norm(q) * q_weight), out[1] = rope(rms_norm(k) * k_weight), out[2] = v.
// rms_norm: x / sqrt(mean(x²) + eps) rounded to T, times the weight rounded to T (diffusers'
// RMSNorm). rope rotates pairs (2i, 2i+1) by the angle of row pos_offset + l of cos/sin
// ((P, D/2) float32), in float32: (a, b) -> (a cos - b sin, a sin + b cos).
// Joint attention (Flux's double blocks): the first len_a rows of each batch row come from
// `qkv` (B, len_a, ...) with q_weight, k_weight, the other len - len_a from `qkv_b` (B, len -
// len_a, ..., rows `row_stride_b` apart) with q_weight_b, k_weight_b, so that the text and image
// streams land in one (3, B, L, H, D) tensor without a concatenation; len_a = len (qkv_b unused)
// for one stream.
// One warp per (b, l, h): grid (ceil(B·L·H / 8)), 256 threads.
template <typename T>
__device__ __forceinline__ void tt_qk_norm_rope_impl(
    const T *__restrict__ qkv, long long row_stride, const T *__restrict__ qkv_b,
    long long row_stride_b, int len_a, T *__restrict__ out, const T *__restrict__ q_weight,
    const T *__restrict__ k_weight, const T *__restrict__ q_weight_b,
    const T *__restrict__ k_weight_b, const float *__restrict__ cos_t,
    const float *__restrict__ sin_t, int pos_offset, int batch, int len, int heads, int dim,
    float eps) {
  const long long item =
      static_cast<long long>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const long long items = static_cast<long long>(batch) * len * heads;
  if (item >= items) return;  // whole warps only: no block-wide synchronisation below
  const int h = static_cast<int>(item % heads);
  const long long bl = item / heads;  // b * len + l
  const int l = static_cast<int>(bl % len);
  const long long b = bl / len;
  const bool second = l >= len_a;
  const int half = dim / 2;
  const long long hd = static_cast<long long>(heads) * dim;
  const T *src = second ? qkv_b + (b * (len - len_a) + (l - len_a)) * row_stride_b
                        : qkv + (b * len_a + l) * row_stride;
  src += static_cast<long long>(h) * dim;
  const long long plane = static_cast<long long>(batch) * len * hd;
  T *dst = out + bl * hd + static_cast<long long>(h) * dim;
  const float *cr = cos_t + static_cast<long long>(pos_offset + l) * half;
  const float *sr = sin_t + static_cast<long long>(pos_offset + l) * half;
  for (int which = 0; which < 2; ++which) {
    const T *xs = src + which * hd;
    const T *w = which == 0 ? (second ? q_weight_b : q_weight) : (second ? k_weight_b : k_weight);
    T *ys = dst + which * plane;
    float ss = 0.0f;
    for (int i = lane; i < dim; i += 32) {
      const float a = tt_to_float(xs[i]);
      ss += a * a;
    }
    const float rstd = rsqrtf(tt_warp_sum(ss) / dim + eps);
    for (int p = lane; p < half; p += 32) {
      const float a = tt_to_float(tt_from_float<T>(
          tt_to_float(tt_from_float<T>(tt_to_float(xs[2 * p]) * rstd)) * tt_to_float(w[2 * p])));
      const float b = tt_to_float(tt_from_float<T>(
          tt_to_float(tt_from_float<T>(tt_to_float(xs[2 * p + 1]) * rstd)) *
          tt_to_float(w[2 * p + 1])));
      ys[2 * p] = tt_from_float<T>(a * cr[p] - b * sr[p]);
      ys[2 * p + 1] = tt_from_float<T>(a * sr[p] + b * cr[p]);
    }
  }
  const T *vs = src + 2 * hd;
  T *vd = dst + 2 * plane;
  for (int i = lane; i < dim; i += 32) vd[i] = vs[i];
}

#define TT_QK_NORM_ROPE(NAME, T)                                                                \
  extern "C" __global__ void NAME(const T *qkv, long long row_stride, const T *qkv_b,           \
                                  long long row_stride_b, int len_a, T *out, const T *q_weight, \
                                  const T *k_weight, const T *q_weight_b, const T *k_weight_b,  \
                                  const float *cos_t, const float *sin_t, int pos_offset,       \
                                  int batch, int len, int heads, int dim, float eps) {          \
    tt_qk_norm_rope_impl<T>(qkv, row_stride, qkv_b, row_stride_b, len_a, out, q_weight,        \
                            k_weight, q_weight_b, k_weight_b, cos_t, sin_t, pos_offset, batch,  \
                            len, heads, dim, eps);                                              \
  }

TT_QK_NORM_ROPE(tt_qk_norm_rope_f32, float)
TT_QK_NORM_ROPE(tt_qk_norm_rope_bf16, tt_bf16)
TT_QK_NORM_ROPE(tt_qk_norm_rope_f16, tt_f16)

// GELU with the tanh approximation, elementwise over n contiguous elements (float32 inside):
//   y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))
template <typename T>
__device__ __forceinline__ void tt_gelu_tanh_impl(const T *__restrict__ x, T *__restrict__ y,
                                                  long long n) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float a = tt_to_float(x[i]);
    const float inner = 0.7978845608028654f * (a + 0.044715f * a * a * a);
    y[i] = tt_from_float<T>(0.5f * a * (1.0f + tanhf(inner)));
  }
}

// GEGLU (diffusers' GEGLU, exact erf GELU): x (rows, 2·inner) -> y (rows, inner),
//   y[r, c] = x[r, c] * gelu(x[r, inner + c]),  gelu(g) = 0.5 g (1 + erf(g / sqrt 2))
template <typename T>
__device__ __forceinline__ void tt_geglu_impl(const T *__restrict__ x, T *__restrict__ y,
                                              long long rows, int inner) {
  const long long n = rows * inner;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const long long r = i / inner;
    const int c = static_cast<int>(i % inner);
    const float a = tt_to_float(x[r * 2 * inner + c]);
    const float gate = tt_to_float(x[r * 2 * inner + inner + c]);
    const float ge = 0.5f * gate * (1.0f + erff(gate * 0.7071067811865476f));
    y[i] = tt_from_float<T>(a * tt_to_float(tt_from_float<T>(ge)));
  }
}

#define TT_GELU(NAME, GEGLU, T)                                                           \
  extern "C" __global__ void NAME(const T *x, T *y, long long n) {                        \
    tt_gelu_tanh_impl<T>(x, y, n);                                                        \
  }                                                                                       \
  extern "C" __global__ void GEGLU(const T *x, T *y, long long rows, int inner) {         \
    tt_geglu_impl<T>(x, y, rows, inner);                                                  \
  }

TT_GELU(tt_gelu_tanh_f32, tt_geglu_f32, float)
TT_GELU(tt_gelu_tanh_bf16, tt_geglu_bf16, tt_bf16)
TT_GELU(tt_gelu_tanh_f16, tt_geglu_f16, tt_f16)

// The gated residual of Flux's blocks: out = x + gate ⊙ y, x, y, out contiguous (rows, cols),
// gate (groups, cols) with rows gate_stride elements apart, row r of x taking gate row
// r / rows_per_group (a batch row's tokens). One fused multiply-add in float32 and one rounding
// per element. Each thread moves 16 bytes of x, y and out at a time: cols must be a multiple of
// 16 / sizeof(T) and x, y, out 16-byte aligned (the launcher checks).
template <typename T>
__device__ __forceinline__ void tt_gated_residual_impl(const T *__restrict__ x,
                                                       const T *__restrict__ gate,
                                                       long long gate_stride,
                                                       const T *__restrict__ y, T *__restrict__ out,
                                                       long long rows, int cols,
                                                       long long rows_per_group) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  struct alignas(16) Pack {
    T v[V];
  };
  const long long packs = rows * cols / V;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long p = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += stride) {
    const long long i = p * V;
    const long long r = i / cols;
    const T *g = gate + (r / rows_per_group) * gate_stride + (i - r * cols);
    const Pack a = reinterpret_cast<const Pack *>(x)[p];
    const Pack b = reinterpret_cast<const Pack *>(y)[p];
    Pack o;
#pragma unroll
    for (int e = 0; e < V; ++e)
      o.v[e] = tt_from_float<T>(fmaf(tt_to_float(g[e]), tt_to_float(b.v[e]), tt_to_float(a.v[e])));
    reinterpret_cast<Pack *>(out)[p] = o;
  }
}

#define TT_GATED_RESIDUAL(NAME, T)                                                             \
  extern "C" __global__ void NAME(const T *x, const T *gate, long long gate_stride, const T *y, \
                                  T *out, long long rows, int cols, long long rows_per_group) {  \
    tt_gated_residual_impl<T>(x, gate, gate_stride, y, out, rows, cols, rows_per_group);        \
  }

TT_GATED_RESIDUAL(tt_gated_residual_f32, float)
TT_GATED_RESIDUAL(tt_gated_residual_bf16, tt_bf16)
TT_GATED_RESIDUAL(tt_gated_residual_f16, tt_f16)
