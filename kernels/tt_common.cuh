// Shared device helpers of tt-scale's kernels: element conversions, warp reductions and the
// tensor-core product. Compiled by nvcc (build.rs) for the GPU, and, with TT_CUDA_EMU defined, by a
// host C++ compiler on top of kernels/emu/cuda_emu.h, which runs the same kernels on CPU threads
// (tests/cuda_emulated.rs). Kernels use only what this header and the emulator both provide.
#pragma once

#ifdef TT_CUDA_EMU
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

#define TT_FULL_MASK 0xffffffffu

// The kernel's dynamic shared memory as `unsigned char name[]` (16-byte aligned; its size is
// the launch's), and that size in bytes.
#ifdef TT_CUDA_EMU
#define TT_DYNAMIC_SMEM(name) unsigned char *name = tt_emu::dynamic_smem()
__device__ __forceinline__ unsigned tt_dynamic_smem_bytes() { return tt_emu::dynamic_smem_size(); }
#else
#define TT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
__device__ __forceinline__ unsigned tt_dynamic_smem_bytes() {
  unsigned n;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
  return n;
}
#endif

typedef __nv_bfloat16 tt_bf16;
typedef __half tt_f16;

// Element <-> float conversions (round to nearest even on the way back).
__device__ __forceinline__ float tt_to_float(float x) { return x; }
__device__ __forceinline__ float tt_to_float(tt_bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float tt_to_float(tt_f16 x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T tt_from_float(float x);
template <> __device__ __forceinline__ float tt_from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ tt_bf16 tt_from_float<tt_bf16>(float x) {
  return __float2bfloat16(x);
}
template <> __device__ __forceinline__ tt_f16 tt_from_float<tt_f16>(float x) {
  return __float2half(x);
}

// Two 16-bit elements packed in one 32-bit register, the low half first (the layout of the
// tensor-core fragments).
template <typename T> __device__ __forceinline__ uint32_t tt_pack2(float lo, float hi) {
  T l = tt_from_float<T>(lo);
  T h = tt_from_float<T>(hi);
  uint16_t lb, hb;
  memcpy(&lb, &l, 2);
  memcpy(&hb, &h, 2);
  return (uint32_t)lb | ((uint32_t)hb << 16);
}

template <typename T> __device__ __forceinline__ uint32_t tt_pack2_raw(T lo, T hi) {
  uint16_t lb, hb;
  memcpy(&lb, &lo, 2);
  memcpy(&hb, &hi, 2);
  return (uint32_t)lb | ((uint32_t)hb << 16);
}

// Sum and max over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float tt_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(TT_FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ float tt_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(TT_FULL_MASK, v, o));
  return v;
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `scratch` is 32 floats of shared memory; the call synchronises the block twice.
__device__ __forceinline__ float tt_block_sum(float v, float *scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  v = tt_warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// D += A·B on tensor cores, one m16n8k16 product per warp with float accumulators.
// Fragment layout (PTX ISA, mma.m16n8k16, 16-bit A/B), with g = lane / 4 and t = lane % 4:
//   a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   d[0..1] = D[g][2t, 2t+1]  d[2..3] = D[g+8][2t, 2t+1]
template <typename T>
__device__ __forceinline__ void tt_mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]);

// ldmatrix: four (x4) or two (x2) 8x8 matrices of 16-bit elements from shared memory, one
// 16-byte row per address: lanes 8i..8i+7 give the rows of matrix i (x2: lanes 0-15). Lane
// (g = lane / 4, t = lane % 4) receives r[i] = M_i[g][2t, 2t+1]; with `_trans`, the transpose:
// r[i] = (M_i[2t][g], M_i[2t+1][g]). Rows must be 16-byte aligned.
__device__ __forceinline__ void tt_ldmatrix_x4(uint32_t r[4], const void *row);
__device__ __forceinline__ void tt_ldmatrix_x4_trans(uint32_t r[4], const void *row);
__device__ __forceinline__ void tt_ldmatrix_x2_trans(uint32_t r[2], const void *row);

// cp.async (Ampere+): 16 bytes from global to shared memory without passing through registers;
// with `valid` false nothing is read and the 16 bytes are zero-filled (`src` must still be a
// valid global address, e.g. the tensor's base). Copies belong to the group the next commit closes;
// tt_cp_async_wait<N>() waits until at most N of the committed groups are still in flight (then
// a __syncthreads() makes other threads' copies visible). Both addresses 16-byte aligned.
__device__ __forceinline__ void tt_cp_async16(void *smem, const void *src, bool valid);
__device__ __forceinline__ void tt_cp_async_commit();
template <int N> __device__ __forceinline__ void tt_cp_async_wait();

#ifdef TT_CUDA_EMU
__device__ __forceinline__ void tt_cp_async16(void *smem, const void *src, bool valid) {
  tt_emu_cp_async16(smem, valid ? src : nullptr);
}
__device__ __forceinline__ void tt_cp_async_commit() { tt_emu_cp_async_commit(); }
template <int N> __device__ __forceinline__ void tt_cp_async_wait() { tt_emu_cp_async_wait(N); }
#else
__device__ __forceinline__ void tt_cp_async16(void *smem, const void *src, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // src-size 0: nothing read, 16 zero bytes written
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void tt_cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N> __device__ __forceinline__ void tt_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

#ifdef TT_CUDA_EMU
__device__ __forceinline__ void tt_ldmatrix_x4(uint32_t r[4], const void *row) {
  tt_emu_ldmatrix(r, row, 4, false);
}
__device__ __forceinline__ void tt_ldmatrix_x4_trans(uint32_t r[4], const void *row) {
  tt_emu_ldmatrix(r, row, 4, true);
}
__device__ __forceinline__ void tt_ldmatrix_x2_trans(uint32_t r[2], const void *row) {
  tt_emu_ldmatrix(r, row, 2, true);
}
#else
__device__ __forceinline__ uint32_t tt_smem_addr(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void tt_ldmatrix_x4(uint32_t r[4], const void *row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(tt_smem_addr(row)));
}
__device__ __forceinline__ void tt_ldmatrix_x4_trans(uint32_t r[4], const void *row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(tt_smem_addr(row)));
}
__device__ __forceinline__ void tt_ldmatrix_x2_trans(uint32_t r[2], const void *row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(tt_smem_addr(row)));
}
#endif

#ifdef TT_CUDA_EMU
template <>
__device__ __forceinline__ void tt_mma_16816<tt_bf16>(float d[4], const uint32_t a[4],
                                                      const uint32_t b[2]) {
  tt_emu_mma_16816(d, a, b, /*bf16=*/true);
}
template <>
__device__ __forceinline__ void tt_mma_16816<tt_f16>(float d[4], const uint32_t a[4],
                                                     const uint32_t b[2]) {
  tt_emu_mma_16816(d, a, b, /*bf16=*/false);
}
#else
template <>
__device__ __forceinline__ void tt_mma_16816<tt_bf16>(float d[4], const uint32_t a[4],
                                                      const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void tt_mma_16816<tt_f16>(float d[4], const uint32_t a[4],
                                                     const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif
