// Shared device helpers of tt-scale's kernels: element conversions, warp reductions and the
// tensor-core product. Compiled by nvcc (build.rs) for the GPU, and, with TT_CUDA_EMU defined, by a
// host C++ compiler on top of kernels/emu/cuda_emu.h, which runs the same kernels on CPU threads
// (tests/unit/cuda_emulated.rs). Kernels use only what this header and the emulator both provide.
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

// ---------------------------------------------------------------------------------------------
// Hopper warpgroup MMA (sm_90a; TT_HAVE_WGMMA is defined where it exists, the emulator included).
// A warpgroup is 4 consecutive warps (128 threads) starting at a multiple of 128.
//
// tt_wgmma_rs<T, N, TRANS_B>(d, a, desc): D (64 x N, float32) += A (64 x 16) · B (16 x N), A from
// registers (thread of warp w, g = lane / 4, t = lane % 4: the mma.m16n8k16 A fragment of rows
// 16w + g and 16w + g + 8), B from shared memory through `desc` (tt_wgmma_desc), K-major
// (TRANS_B 0: element (k, n) at (n % 8)·16 + (n / 8)·SBO + (k % 8)·2 + (k / 8)·LBO bytes) or
// MN-major (TRANS_B 1: (n % 8)·2 + (n / 8)·SBO + (k % 8)·16 + (k / 8)·LBO), no swizzling.
// d[4j + e] = D[16w + g + 8·(e / 2)][8j + 2t + e % 2] (the mma.m16n8 accumulator, n-tile j).
// Asynchronous: tt_wgmma_fence() before the first product that reads registers written since
// the last one, tt_wgmma_commit() after the products, tt_wgmma_wait<0>() before d is read; shared
// memory written by ordinary stores or cp.async needs tt_fence_proxy_async() by the writers,
// then a barrier, before a product reads it.
#if defined(TT_CUDA_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TT_HAVE_WGMMA 1

template <typename T, int N, int TRANS_B>
__device__ __forceinline__ void tt_wgmma_rs(float *d, const uint32_t a[4], uint64_t desc);

// The descriptor of a no-swizzle operand starting at `smem` with leading / stride byte offsets.
__device__ __forceinline__ uint64_t tt_wgmma_desc(const void *smem, uint32_t lbo, uint32_t sbo);

#ifdef TT_CUDA_EMU
template <typename T, int N, int TRANS_B>
__device__ __forceinline__ void tt_wgmma_rs(float *d, const uint32_t a[4], uint64_t desc) {
  tt_emu_wgmma(d, N, a, desc, std::is_same_v<T, tt_bf16>, TRANS_B != 0);
}
__device__ __forceinline__ uint64_t tt_wgmma_desc(const void *smem, uint32_t lbo, uint32_t sbo) {
  auto e = [](uint32_t x) { return static_cast<uint64_t>((x & 0x3FFFF) >> 4); };
  return e(tt_emu_smem_addr(smem)) | e(lbo) << 16 | e(sbo) << 32;
}
__device__ __forceinline__ void tt_wgmma_fence() {}
__device__ __forceinline__ void tt_wgmma_commit() { tt_emu_wgmma_commit(); }
template <int N> __device__ __forceinline__ void tt_wgmma_wait() { tt_emu_wgmma_wait(N); }
__device__ __forceinline__ void tt_fence_proxy_async() {}
#else
__device__ __forceinline__ uint64_t tt_wgmma_desc(const void *smem, uint32_t lbo, uint32_t sbo) {
  auto e = [](uint32_t x) { return static_cast<uint64_t>((x & 0x3FFFF) >> 4); };
  return e(static_cast<uint32_t>(__cvta_generic_to_shared(smem))) | e(lbo) << 16 | e(sbo) << 32;
}
__device__ __forceinline__ void tt_wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void tt_wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void tt_wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void tt_fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The accumulator operands of an m64nNk16 product: N/2 float registers, as the asm template's
// register list and as the output constraints (N = 40, 64, 72, 80, 128, 160).
#define TT_WGMMA_D20_REGS \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19" \
  "}"
#define TT_WGMMA_D20_OUTS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), \
  "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), \
  "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), \
  "+f"(d[19])
#define TT_WGMMA_D32_REGS \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
  "}"
#define TT_WGMMA_D32_OUTS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), \
  "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), \
  "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), \
  "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
  "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), \
  "+f"(d[31])
#define TT_WGMMA_D36_REGS \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35" \
  "}"
#define TT_WGMMA_D36_OUTS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), \
  "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), \
  "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), \
  "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
  "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), \
  "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35])
#define TT_WGMMA_D40_REGS \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39" \
  "}"
#define TT_WGMMA_D40_OUTS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), \
  "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), \
  "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), \
  "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
  "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), \
  "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), \
  "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
#define TT_WGMMA_D64_REGS \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
  "}"
#define TT_WGMMA_D64_OUTS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), \
  "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), \
  "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), \
  "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
  "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), \
  "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), \
  "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), \
  "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
  "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), \
  "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), \
  "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define TT_WGMMA_D80_REGS \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79" \
  "}"
#define TT_WGMMA_D80_OUTS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), \
  "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), \
  "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), \
  "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
  "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), \
  "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), \
  "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), \
  "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
  "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), \
  "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), \
  "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), \
  "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), \
  "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), \
  "+f"(d[79])

// tt_wgmma_rs<T, N, TRANS_B> for one element type, N and transpose flag; REGS/OUTS the
// accumulator operands (N / 2 of them), A0-A3 and DESC the asm operand numbers that follow.
#define TT_WGMMA_RS(TN, T, N, TRANS_B, REGS, OUTS, A0, A1, A2, A3, DESC)                            \
  template <>                                                                                    \
  __device__ __forceinline__ void tt_wgmma_rs<T, N, TRANS_B>(float *d, const uint32_t a[4],      \
                                                             uint64_t desc) {                   \
    asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." #TN "." #TN " " REGS           \
                 ", {" A0 ", " A1 ", " A2 ", " A3 "}, " DESC ", 1, 1, 1, " #TRANS_B ";\n"        \
                 : OUTS                                                                          \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));                      \
  }

// QKᵀ with 64 keys (K-major K); P·V for each head size (MN-major V).
TT_WGMMA_RS(bf16, tt_bf16, 64, 0, TT_WGMMA_D32_REGS, TT_WGMMA_D32_OUTS, "%32", "%33", "%34", "%35",
            "%36")
TT_WGMMA_RS(bf16, tt_bf16, 40, 1, TT_WGMMA_D20_REGS, TT_WGMMA_D20_OUTS, "%20", "%21", "%22", "%23",
            "%24")
TT_WGMMA_RS(bf16, tt_bf16, 64, 1, TT_WGMMA_D32_REGS, TT_WGMMA_D32_OUTS, "%32", "%33", "%34", "%35",
            "%36")
TT_WGMMA_RS(bf16, tt_bf16, 72, 1, TT_WGMMA_D36_REGS, TT_WGMMA_D36_OUTS, "%36", "%37", "%38", "%39",
            "%40")
TT_WGMMA_RS(bf16, tt_bf16, 80, 1, TT_WGMMA_D40_REGS, TT_WGMMA_D40_OUTS, "%40", "%41", "%42", "%43",
            "%44")
TT_WGMMA_RS(bf16, tt_bf16, 128, 1, TT_WGMMA_D64_REGS, TT_WGMMA_D64_OUTS, "%64", "%65", "%66", "%67",
            "%68")
TT_WGMMA_RS(bf16, tt_bf16, 160, 1, TT_WGMMA_D80_REGS, TT_WGMMA_D80_OUTS, "%80", "%81", "%82", "%83",
            "%84")
TT_WGMMA_RS(f16, tt_f16, 64, 0, TT_WGMMA_D32_REGS, TT_WGMMA_D32_OUTS, "%32", "%33", "%34", "%35",
            "%36")
TT_WGMMA_RS(f16, tt_f16, 40, 1, TT_WGMMA_D20_REGS, TT_WGMMA_D20_OUTS, "%20", "%21", "%22", "%23",
            "%24")
TT_WGMMA_RS(f16, tt_f16, 64, 1, TT_WGMMA_D32_REGS, TT_WGMMA_D32_OUTS, "%32", "%33", "%34", "%35",
            "%36")
TT_WGMMA_RS(f16, tt_f16, 72, 1, TT_WGMMA_D36_REGS, TT_WGMMA_D36_OUTS, "%36", "%37", "%38", "%39",
            "%40")
TT_WGMMA_RS(f16, tt_f16, 80, 1, TT_WGMMA_D40_REGS, TT_WGMMA_D40_OUTS, "%40", "%41", "%42", "%43",
            "%44")
TT_WGMMA_RS(f16, tt_f16, 128, 1, TT_WGMMA_D64_REGS, TT_WGMMA_D64_OUTS, "%64", "%65", "%66", "%67",
            "%68")
TT_WGMMA_RS(f16, tt_f16, 160, 1, TT_WGMMA_D80_REGS, TT_WGMMA_D80_OUTS, "%80", "%81", "%82", "%83",
            "%84")
#endif  // TT_CUDA_EMU

// Pins register values in program order against the asm statements around them: after
// tt_wgmma_wait, so that the accumulators are not read before the products complete; before
// tt_wgmma_fence, so that the accumulators and A fragments are written before the fence (the
// asm statements above only tie the registers to the issue of a product).
__device__ __forceinline__ void tt_wgmma_fence_regs(float *d, int n) {
#ifndef TT_CUDA_EMU
  for (int i = 0; i < n; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
  (void)n;
#endif
}
__device__ __forceinline__ void tt_wgmma_fence_regs(uint32_t *r, int n) {
#ifndef TT_CUDA_EMU
  for (int i = 0; i < n; ++i) asm volatile("" : "+r"(r[i])::"memory");
#else
  (void)r;
  (void)n;
#endif
}
#endif  // wgmma
