// A host C++ emulation of exactly the CUDA features tt-scale's kernels use, so that the same kernel
// sources (kernels/*.cu, through tt_common.cuh with TT_CUDA_EMU defined) run on the CPU and can be
// checked against references (kernels/emu/emu_tests.cpp, driven by tests/unit/cuda_emulated.rs).
//
// Execution model
//   * Every emulated CUDA thread is a cooperative user-level thread (a fiber with its own stack),
//     all on the calling OS thread: the run is deterministic and needs no locks.
//   * tt_emu_launch(grid, block, body) runs the blocks of a grid one after the other (x fastest);
//     inside a block, its blockDim.x threads are fibers that run until they reach a barrier, then
//     hand over to the next runnable fiber. `__shared__` is `static`, so the threads of a block
//     share the arrays; that is also why blocks never overlap.
//   * The order in which runnable fibers are picked rotates from block to block among four
//     policies (ascending or descending thread order; all threads interleaved, one step each, or
//     each warp running as far as it can), so that code relying on one interleaving, such as a
//     missing __syncthreads that lets a warp overwrite shared data that another still reads,
//     gives wrong results in some blocks. Set tt_emu::g.fixed_policy to pin one.
//   * Dynamic shared memory (`extern __shared__`, see TT_DYNAMIC_SMEM in tt_common.cuh) is one
//     buffer of the launch's size, ending at a guard page and refilled with 0xff bytes (a NaN in
//     bf16 and f16) before each block, so reads past it fault and reads of what the block never
//     wrote show up in the results.
//   * __syncthreads() waits for every thread of the block that has not exited (an exiting thread
//     drops out of the barrier, like arrive_and_drop).
//   * cp.async copies land either at their wait (lazy) or at issue (eager), alternating every
//     four blocks: the two extremes of what the hardware may do (see tt_emu_cp_async16).
//   * wgmma.mma_async (m64nNk16, A from registers, B from shared memory through a descriptor
//     without swizzling) is a collective of the 4 warps of a warpgroup. Its result is delivered
//     to the accumulator registers only by the wgmma.wait_group that covers its commit group, so
//     a kernel that reads or modifies the accumulators before waiting, or never commits, gets
//     wrong results; chained products into the same registers accumulate. A is taken at issue;
//     B is read either at issue or at that wait, alternating every eight blocks (independently
//     of the cp.async mode): the two extremes of when the tensor cores may read shared memory,
//     so a kernel that issues a product before its operand has landed, or overwrites an operand
//     before the product has been waited for, gets wrong results. B is read through the
//     descriptor's start address, leading and stride byte offsets exactly as the PTX ISA
//     defines the canonical K-major and MN-major layouts, from the launch's dynamic shared memory
//     (shared-window addresses are offsets into it), and a read outside it is reported.
//   * Warp collectives (__shfl_xor_sync, the m16n8k16 tensor-core product, ldmatrix) are one
//     warp barrier each: lanes publish their operands to a per-warp exchange area, wait for the
//     32 lanes, then read what they need. Two exchange areas are used alternately, so a lane that
//     runs ahead into the next collective never overwrites operands that a slower lane still has
//     to read (it would first have to pass the next barrier, which the slow lane has not reached).
//   * Misuse is reported and aborts: a warp collective with lanes that have exited, a lane exiting
//     while its warp waits in a collective, a block where no thread can make progress (divergent
//     __syncthreads), unsupported masks, launch shapes or nested launches.
//
// Context switches: on x86-64 ELF systems a few lines of assembly save and restore the
// callee-saved registers and the stack pointer (no system call: the attention kernel needs
// millions of switches). Elsewhere, or with TT_EMU_UCONTEXT defined, ucontext's swapcontext is
// used (correct, but each switch costs a system call).
//
// Kernels reinterpret 16-bit element storage as uint4 / uint32_t, as CUDA code does; compile with
// -fno-strict-aliasing so that the host compiler does not reorder those accesses.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <type_traits>
#include <vector>

#if !defined(TT_EMU_UCONTEXT) && !(defined(__x86_64__) && defined(__ELF__))
#define TT_EMU_UCONTEXT 1
#endif
#ifdef TT_EMU_UCONTEXT
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------------------------
// Qualifiers. (__restrict__ is a keyword of GCC and Clang already.)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

// ---------------------------------------------------------------------------------------------
// Vector types and the built-in index variables.
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

struct __attribute__((aligned(16))) uint4 {
  unsigned int x, y, z, w;
};

inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  uint4 r;
  r.x = x;
  r.y = y;
  r.z = z;
  r.w = w;
  return r;
}

// Set by the scheduler whenever it resumes a thread (threadIdx) or starts a block (blockIdx).
inline uint3 threadIdx = {0, 0, 0};
inline uint3 blockIdx = {0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

// ---------------------------------------------------------------------------------------------
// 16-bit floating-point types: the bits only, converted with round-to-nearest-even.
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivially_copyable_v<__nv_bfloat16>);
static_assert(sizeof(__half) == 2 && std::is_trivially_copyable_v<__half>);

namespace tt_emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN
  // Round to nearest even on bit 16; a carry out of the mantissa bumps the exponent, which is
  // also right for the largest finite values (they round to infinity).
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) {  // infinity, or NaN (kept quiet, payload kept)
    return bits_float(sign | 0x7f800000u | (man << 13) | (man != 0 ? 0x00400000u : 0u));
  }
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;
    return bits_float(sign | float_bits(mag));
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  // 65520 = halfway between 65504 (the largest half) and 65536: ties go to the even 65536 = inf.
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  const uint32_t e = a >> 23;
  if (e < 113) {  // below 2^-14: a half subnormal (or zero), in units of 2^-24
    const uint32_t shift = 126 - e;  // >= 14
    if (shift > 24) return sign;     // below 2^-25: rounds to zero (2^-25 itself ties to zero)
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;  // may become 0x400, the least normal
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t q = ((e - 112u) << 10) | ((a >> 13) & 0x3ffu);
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;  // a carry bumps the exponent
  return static_cast<uint16_t>(sign | q);
}

}  // namespace tt_emu

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{tt_emu::float_to_bf16(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return tt_emu::bf16_to_float(h.bits); }
inline __half __float2half(float f) { return __half{tt_emu::float_to_half(f)}; }
inline float __half2float(__half h) { return tt_emu::half_to_float(h.bits); }

// Device math that the C library lacks.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

// ---------------------------------------------------------------------------------------------
// Scheduler.
namespace tt_emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;

[[noreturn]] inline void fatal(const char *what) {
  fprintf(stderr,
          "tt_emu: %s (block (%u, %u, %u) of grid (%u, %u, %u), thread %u of %u)\n", what,
          blockIdx.x, blockIdx.y, blockIdx.z, gridDim.x, gridDim.y, gridDim.z, threadIdx.x,
          blockDim.x);
  fflush(stderr);
  abort();
}

// A cp.async copy of 16 bytes that has been issued but not performed yet.
// A wgmma product whose shared-memory operand is read at the wait: the thread's two rows of A
// (16w + g and 16w + g + 8, converted to float at issue) and B's descriptor and layout.
struct DeferredMma {
  float a[2][16];
  uint64_t desc;
  bool bf16, trans_b;
};

// A wgmma result not yet delivered: the accumulator registers it goes to and their values
// (the registers at issue plus the products chained into them since, except the deferred ones,
// which are added in order at the wait).
struct PendingMma {
  float *d;
  int n;  // registers
  float v[128];
  unsigned group;  // the wgmma commit group of its last product (committed count at issue)
  std::vector<DeferredMma> deferred;
};

struct AsyncCopy {
  void *dst;
  const void *src;  // null: zero-fill
  unsigned group;   // the commit group it belongs to
};

struct Fiber {
  std::vector<AsyncCopy> copies;  // cp.async: issued, not yet performed
  unsigned committed = 0;         // cp.async commit groups closed so far
  void *sp = nullptr;                  // saved stack pointer (assembly switch)
  const unsigned *wait_gen = nullptr;  // blocked while *wait_gen == wait_val
  unsigned wait_val = 0;
  unsigned phase = 0;  // which of the two warp exchange areas the next collective uses
  unsigned wg_phase = 0;  // the same for warpgroup collectives (wgmma)
  std::vector<PendingMma> mmas;  // wgmma: issued, results not yet delivered
  unsigned mma_committed = 0;    // wgmma commit groups closed so far
  bool done = true;
  char *stack = nullptr;  // kStackBytes, the lowest page a guard page
#ifdef TT_EMU_UCONTEXT
  ucontext_t uc;
#endif
};

struct Warp {
  int count = 0;      // lanes arrived at the current warp barrier
  int expected = 32;  // lanes that have not exited
  unsigned gen = 0;   // bumped when the barrier opens
  uint32_t ival[2][32];  // __shfl_xor_sync: the 32-bit values of the lanes
  float a[2][16 * 16];  // mma: A row-major (16 x 16)
  float b[2][16 * 8];   // mma: B as [k][n] (16 x 8)
  bool bf16[2][32];
  const void *rows[2][32];  // ldmatrix: the row address each lane gives
};

// Four consecutive warps (128 threads from a multiple of 128): the unit of wgmma. Its exchange
// areas hold each thread's operands, alternately, as the warps' do.
struct WarpGroup {
  int count = 0;
  int expected = 128;
  unsigned gen = 0;
  uint32_t a[2][128][4];  // the A fragments of the 128 threads
  uint64_t desc[2][128];  // the B descriptors (must agree)
  int shape[2][128];      // N | bf16 << 16 | trans-b << 17 (must agree)
};

struct State {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<WarpGroup> groups;
  Fiber main;
  int nthreads = 0;
  int cur = -1;  // running fiber, -1 outside a launch
  int live = 0;  // threads of the block that have not exited
  int blk_count = 0, blk_expected = 0;
  unsigned blk_gen = 0;
  void (*invoke)(const void *) = nullptr;
  const void *body = nullptr;
  int policy = 0;        // scheduling order of the running block, see candidate()
  int fixed_policy = -1;  // 0-3: use it for every block; -1: block i uses policy i % 4
  int fixed_copy_mode = -1;  // cp.async: 0 lazy, 1 eager; -1: block i is eager when (i / 4) % 2
  int fixed_mma_mode = -1;   // wgmma B: 0 at issue, 1 at the wait; -1: at the wait when (i / 8) % 2
  unsigned long long switches = 0, warp_barriers = 0, block_barriers = 0, blocks = 0;
  unsigned char *dyn = nullptr;  // the launch's dynamic shared memory (null: none)
  size_t dyn_bytes = 0;
};

inline State g;

#ifndef TT_EMU_UCONTEXT
// tt_emu_switch_x64(save, next): pushes the callee-saved registers, stores the stack pointer in
// *save, loads `next` and pops the registers saved there; `ret` resumes that fiber. Weak, so the
// header could be included by several translation units.
extern "C" void tt_emu_switch_x64(void **save, void *next);
asm(R"(
    .pushsection .text
    .weak tt_emu_switch_x64
    .type tt_emu_switch_x64, @function
    .p2align 4
tt_emu_switch_x64:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size tt_emu_switch_x64, .-tt_emu_switch_x64
    .popsection
)");
#endif

inline void switch_fibers(Fiber &from, Fiber &to) {
  asm volatile("" ::: "memory");
#ifdef TT_EMU_UCONTEXT
  if (swapcontext(&from.uc, &to.uc) != 0) fatal("swapcontext failed");
#else
  tt_emu_switch_x64(&from.sp, to.sp);
#endif
  asm volatile("" ::: "memory");
}

// The i-th thread (1 <= i <= n; the n-th is `from` itself) that the scheduler considers after
// `from` under the block's policy: bit 0 picks descending instead of ascending thread order, bit 1
// keeps running the current warp for as long as it can (so one warp may run far ahead of the
// others, which exposes missing __syncthreads) instead of interleaving all threads (where every
// thread advances by one step per round).
inline int candidate(int policy, int n, int from, int i) {
  if (i == n) return from;
  const bool desc = policy & 1;
  if (!(policy & 2)) {
    int j = desc ? from - i : from + i;
    if (j < 0) j += n;
    if (j >= n) j -= n;
    return j;
  }
  const int w = from >> 5, l = from & 31, nw = n >> 5;
  if (i < 32) return w * 32 + ((desc ? l - i + 32 : l + i) & 31);
  const int k = i - 32;
  const int ow = k / 32 + 1, ol = k & 31;
  return desc ? ((w - ow + nw) % nw) * 32 + (31 - ol) : ((w + ow) % nw) * 32 + ol;
}

// Hands the CPU to the next runnable thread (the current one is blocked or has exited). Returns
// when the current thread is resumed.
[[gnu::noinline]] inline void schedule() {
  State &s = g;
  const int n = s.nthreads;
  const int from = s.cur;
  Fiber &self = s.fibers[from];
  for (int i = 1; i <= n; ++i) {
    const int j = candidate(s.policy, n, from, i);
    Fiber &f = s.fibers[j];
    if (f.done || (f.wait_gen != nullptr && *f.wait_gen == f.wait_val)) continue;
    if (j == from) return;
    s.cur = j;
    threadIdx.x = static_cast<unsigned>(j);
    ++s.switches;
    switch_fibers(self, f);
    return;
  }
  if (s.live == 0) {  // the block is finished: back to the launcher, never to come back here
    s.cur = -1;
    switch_fibers(self, s.main);
  }
  fatal("deadlock: no thread of the block can proceed (divergent __syncthreads or collective?)");
}

// Completes, in issue order, the pending operations (cp.async copies, wgmma results) of every
// committed group but the `n` most recent, and keeps the others pending.
template <class Op, class Complete>
inline void complete_groups(std::vector<Op> &pending, unsigned committed, unsigned n,
                            Complete complete) {
  const unsigned limit = committed >= n ? committed - n : 0;
  size_t kept = 0;
  for (size_t i = 0; i < pending.size(); ++i) {
    if (pending[i].group < limit)
      complete(pending[i]);
    else
      pending[kept++] = pending[i];
  }
  pending.resize(kept);
}

inline void wait_while(const unsigned *gen, unsigned val) {
  Fiber &f = g.fibers[g.cur];
  f.wait_gen = gen;
  f.wait_val = val;
  schedule();
  f.wait_gen = nullptr;
}

// Barrier of the current thread's warp; the last lane to arrive opens it and runs on.
inline Warp &enter_warp_collective(unsigned mask) {
  if (g.cur < 0) fatal("warp collective outside a kernel launch");
  if (mask != 0xffffffffu) fatal("only full-warp masks are emulated");
  Warp &w = g.warps[g.cur >> 5];
  if (w.expected != 32) fatal("warp collective in a warp some of whose lanes have exited");
  return w;
}

// Barrier of a warp or a warpgroup (anything with count / expected / gen): the last thread to
// arrive opens it and runs on.
template <class Group> inline void group_barrier(Group &w) {
  ++g.warp_barriers;
  const unsigned gen = w.gen;
  if (++w.count == w.expected) {
    w.count = 0;
    ++w.gen;
    return;
  }
  wait_while(&w.gen, gen);
}

inline void warp_barrier(Warp &w) { group_barrier(w); }

inline unsigned next_phase() {
  Fiber &f = g.fibers[g.cur];
  const unsigned p = f.phase;
  f.phase = p ^ 1u;
  return p;
}

[[noreturn]] inline void thread_exit() {
  State &s = g;
  Fiber &f = s.fibers[s.cur];
  if (!f.copies.empty()) fatal("a thread exited with cp.async copies never waited for");
  if (!f.mmas.empty()) fatal("a thread exited with wgmma results never waited for");
  f.done = true;
  --s.live;
  Warp &w = s.warps[s.cur >> 5];
  --w.expected;
  if (w.count > 0) fatal("a lane exited while other lanes of its warp wait in a collective");
  WarpGroup &wg = s.groups[s.cur >> 7];
  --wg.expected;
  if (wg.count > 0) fatal("a thread exited while its warpgroup waits in a wgmma");
  --s.blk_expected;
  if (s.blk_count > 0 && s.blk_count >= s.blk_expected) {  // the others need not wait for it
    s.blk_count = 0;
    ++s.blk_gen;
  }
  schedule();
  fatal("an exited thread was resumed");
}

[[noreturn]] inline void fiber_entry() {
  g.invoke(g.body);
  thread_exit();
}

inline char *new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void *p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) fatal("cannot map a fiber stack");
  if (mprotect(p, page, PROT_NONE) != 0) fatal("cannot protect a fiber stack's guard page");
  return static_cast<char *>(p);
}

inline void start_fiber(Fiber &f) {
  f.done = false;
  f.mmas.clear();
  f.mma_committed = 0;
  f.wait_gen = nullptr;
  f.phase = 0;
#ifdef TT_EMU_UCONTEXT
  if (getcontext(&f.uc) != 0) fatal("getcontext failed");
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = kStackBytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, fiber_entry, 0);
#else
  // A frame that tt_emu_switch_x64 "returns" into: six zeroed registers, then fiber_entry as the
  // return address, placed so that fiber_entry starts with the stack aligned as after a call.
  uintptr_t ret = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes - 64) & ~uintptr_t{15};
  void **slot = reinterpret_cast<void **>(ret);
  slot[0] = reinterpret_cast<void *>(&fiber_entry);
  slot[1] = nullptr;  // fiber_entry's own return address: it never returns
  for (int r = 1; r <= 6; ++r) slot[-r] = nullptr;
  f.sp = slot - 6;
#endif
}

// Maps `bytes` (> 0) of dynamic shared memory ending at an inaccessible page; returns the
// mapping's start and length through `base`/`len` for unmap_dynamic_smem.
inline unsigned char *map_dynamic_smem(size_t bytes, void **base, size_t *len) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t data_pages = (bytes + page - 1) / page;
  *len = (data_pages + 1) * page;
  void *m = mmap(nullptr, *len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) fatal("cannot map dynamic shared memory");
  char *end = static_cast<char *>(m) + data_pages * page;
  if (mprotect(end, page, PROT_NONE) != 0) fatal("cannot protect the dynamic shared memory guard");
  *base = m;
  // 16-byte aligned, as CUDA's dynamic shared memory base is (at least).
  return reinterpret_cast<unsigned char *>(reinterpret_cast<uintptr_t>(end - bytes) & ~uintptr_t{15});
}

inline void launch(dim3 grid, dim3 block, void (*invoke)(const void *), const void *body,
                   size_t smem_bytes) {
  State &s = g;
  if (s.cur != -1) fatal("kernel launch from inside a kernel");
  if (block.y != 1 || block.z != 1 || block.x < 32 || block.x > kMaxThreads || block.x % 32 != 0)
    fatal("blocks must be one-dimensional with a multiple of 32 threads, at most 1024");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fatal("empty grid");
  const int n = static_cast<int>(block.x);
  if (s.fibers.size() < static_cast<size_t>(n)) {
    s.fibers.reserve(kMaxThreads);  // never reallocated while fibers run
    s.fibers.resize(n);
    s.warps.resize(kMaxThreads / 32);
    s.groups.resize(kMaxThreads / 128);
  }
  for (int i = 0; i < n; ++i)
    if (s.fibers[i].stack == nullptr) s.fibers[i].stack = new_stack();
  gridDim = grid;
  blockDim = block;
  s.invoke = invoke;
  s.body = body;
  s.nthreads = n;
  void *dyn_map = nullptr;
  size_t dyn_len = 0;
  s.dyn = smem_bytes > 0 ? map_dynamic_smem(smem_bytes, &dyn_map, &dyn_len) : nullptr;
  s.dyn_bytes = smem_bytes;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        if (s.dyn != nullptr) memset(s.dyn, 0xff, smem_bytes);
        for (int i = 0; i < n; ++i) start_fiber(s.fibers[i]);
        for (int w = 0; w < n / 32; ++w) {
          s.warps[w].count = 0;
          s.warps[w].expected = 32;
        }
        for (int w = 0; w < (n + 127) / 128; ++w) {
          s.groups[w].count = 0;
          s.groups[w].expected = n - 128 * w < 128 ? n - 128 * w : 128;
        }
        s.blk_count = 0;
        s.blk_expected = n;
        s.live = n;
        s.policy = s.fixed_policy >= 0 ? (s.fixed_policy & 3) : static_cast<int>(s.blocks & 3);
        s.cur = (s.policy & 1) ? n - 1 : 0;  // descending orders also start from the end
        threadIdx = uint3{static_cast<unsigned>(s.cur), 0, 0};
        ++s.blocks;
        switch_fibers(s.main, s.fibers[s.cur]);
        if (s.live != 0 || s.cur != -1) fatal("a block ended with live threads");
      }
  if (dyn_map != nullptr) munmap(dyn_map, dyn_len);
  s.dyn = nullptr;
  s.dyn_bytes = 0;
}

// The running launch's dynamic shared memory (TT_DYNAMIC_SMEM) and its size in bytes.
inline unsigned char *dynamic_smem() {
  if (g.cur < 0) fatal("dynamic shared memory outside a kernel launch");
  if (g.dyn == nullptr) fatal("the kernel uses dynamic shared memory but its launch gave none");
  return g.dyn;
}
inline unsigned dynamic_smem_size() { return static_cast<unsigned>(g.dyn_bytes); }

}  // namespace tt_emu

// Runs `body` (typically a lambda calling an extern "C" kernel) as the kernel of a launch with
// `smem_bytes` of dynamic shared memory.
template <class F> void tt_emu_launch(dim3 grid, dim3 block, F &&body, size_t smem_bytes = 0) {
  using Fn = std::remove_reference_t<F>;
  tt_emu::launch(
      grid, block, [](const void *p) { (*static_cast<const Fn *>(p))(); },
      static_cast<const void *>(&body), smem_bytes);
}

// __trap(): the kernel aborts (on a GPU, the launch fails with an error).
[[noreturn]] inline void __trap() { tt_emu::fatal("__trap() in a kernel"); }

// ---------------------------------------------------------------------------------------------
// Synchronisation and warp collectives.
inline void __syncthreads() {
  tt_emu::State &s = tt_emu::g;
  if (s.cur < 0) tt_emu::fatal("__syncthreads outside a kernel launch");
  ++s.block_barriers;
  const unsigned gen = s.blk_gen;
  if (++s.blk_count >= s.blk_expected) {
    s.blk_count = 0;
    ++s.blk_gen;
    return;
  }
  tt_emu::wait_while(&s.blk_gen, gen);
}

inline uint32_t tt_emu_shfl_xor_bits(unsigned mask, uint32_t v, int lane_mask, int width) {
  if (width != 32 || lane_mask < 0 || lane_mask > 31) tt_emu::fatal("unsupported shuffle");
  tt_emu::Warp &w = tt_emu::enter_warp_collective(mask);
  const unsigned p = tt_emu::next_phase();
  const int lane = tt_emu::g.cur & 31;
  w.ival[p][lane] = v;
  tt_emu::warp_barrier(w);
  return w.ival[p][lane ^ lane_mask];
}

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  return tt_emu::bits_float(tt_emu_shfl_xor_bits(mask, tt_emu::float_bits(v), lane_mask, width));
}
inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask, int width = 32) {
  return static_cast<int>(tt_emu_shfl_xor_bits(mask, static_cast<uint32_t>(v), lane_mask, width));
}
inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask, int width = 32) {
  return tt_emu_shfl_xor_bits(mask, v, lane_mask, width);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: D = A (16x16) · B (16x8) + D, float32
// accumulation, with the per-lane fragments of tt_common.cuh (g = lane / 4, t = lane % 4):
//   a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]  b[1] = B[2t+8, 2t+9][g]
//   d[0..1] = D[g][2t, 2t+1]  d[2..3] = D[g+8][2t, 2t+1]
// (a packed pair holds its first element in the low 16 bits). Products of 16-bit values are exact
// in float; the 16 of an output are summed in order, then added to the accumulator.
inline void tt_emu_mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], bool bf16) {
  tt_emu::Warp &w = tt_emu::enter_warp_collective(0xffffffffu);
  const unsigned p = tt_emu::next_phase();
  const int lane = tt_emu::g.cur & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  float *A = w.a[p];
  float *B = w.b[p];
  auto cv = [bf16](uint32_t bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    return bf16 ? tt_emu::bf16_to_float(h) : tt_emu::half_to_float(h);
  };
  A[g * 16 + 2 * t] = cv(a[0]);
  A[g * 16 + 2 * t + 1] = cv(a[0] >> 16);
  A[(g + 8) * 16 + 2 * t] = cv(a[1]);
  A[(g + 8) * 16 + 2 * t + 1] = cv(a[1] >> 16);
  A[g * 16 + 2 * t + 8] = cv(a[2]);
  A[g * 16 + 2 * t + 9] = cv(a[2] >> 16);
  A[(g + 8) * 16 + 2 * t + 8] = cv(a[3]);
  A[(g + 8) * 16 + 2 * t + 9] = cv(a[3] >> 16);
  B[(2 * t) * 8 + g] = cv(b[0]);
  B[(2 * t + 1) * 8 + g] = cv(b[0] >> 16);
  B[(2 * t + 8) * 8 + g] = cv(b[1]);
  B[(2 * t + 9) * 8 + g] = cv(b[1] >> 16);
  w.bf16[p][lane] = bf16;
  tt_emu::warp_barrier(w);
  if (lane == 0)
    for (int l = 1; l < 32; ++l)
      if (w.bf16[p][l] != bf16) tt_emu::fatal("mma with mixed element types across the warp");
  for (int e = 0; e < 4; ++e) {
    const float *ar = A + (g + ((e & 2) ? 8 : 0)) * 16;
    const float *bc = B + 2 * t + (e & 1);
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) sum += ar[k] * bc[k * 8];
    d[e] += sum;
  }
}

// ldmatrix.sync.aligned.m8n8.{x4,x2}[.trans].shared.b16: lanes 8i..8i+7 give the 16-byte rows of
// 8x8 matrix i (x2: lanes 0-15; the other lanes' addresses are ignored). Lane (g = lane / 4,
// t = lane % 4) gets r[i] = M_i[g][2t] | M_i[g][2t+1] << 16, or with `trans`
// M_i[2t][g] | M_i[2t+1][g] << 16. One warp barrier: lanes publish their row address, then every
// lane reads its elements through the published addresses.
inline void tt_emu_ldmatrix(uint32_t *r, const void *row, int count, bool trans) {
  tt_emu::Warp &w = tt_emu::enter_warp_collective(0xffffffffu);
  const unsigned p = tt_emu::next_phase();
  const int lane = tt_emu::g.cur & 31;
  if (count == 4 || lane < 16) {
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
      tt_emu::fatal("ldmatrix row not 16-byte aligned");
  }
  w.rows[p][lane] = row;
  tt_emu::warp_barrier(w);
  const int g = lane >> 2;
  const int t = lane & 3;
  for (int i = 0; i < count; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t *m = static_cast<const uint16_t *>(w.rows[p][8 * i + g]);
      lo = m[2 * t];
      hi = m[2 * t + 1];
    } else {
      lo = static_cast<const uint16_t *>(w.rows[p][8 * i + 2 * t])[g];
      hi = static_cast<const uint16_t *>(w.rows[p][8 * i + 2 * t + 1])[g];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

// cp.async.cg.shared.global (16 bytes) with commit_group / wait_group. The hardware may land a
// copy at any time between its issue and the wait for its group; the emulator takes the two
// extremes, alternating every four blocks (so each extreme meets every scheduling order): lazy,
// the copy is performed when the issuing thread waits for its group (a kernel that reads shared
// memory before waiting, or before the barrier after the others' waits, reads stale data), and
// eager, performed at issue (a kernel that issues a copy into a buffer other warps may still be
// reading, without a barrier in between, corrupts what they read). `src` null: zero-fill (PTX
// src-size 0).
inline void tt_emu_cp_async16(void *dst, const void *src) {
  tt_emu::State &s = tt_emu::g;
  if (s.cur < 0) tt_emu::fatal("cp.async outside a kernel launch");
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0)
    tt_emu::fatal("cp.async destination not 16-byte aligned");
  if (src != nullptr && reinterpret_cast<uintptr_t>(src) % 16 != 0)
    tt_emu::fatal("cp.async source not 16-byte aligned");
  const bool eager = s.fixed_copy_mode >= 0 ? s.fixed_copy_mode == 1
                                            : (((s.blocks - 1) >> 2) & 1) != 0;
  if (eager) {
    if (src != nullptr)
      memcpy(dst, src, 16);
    else
      memset(dst, 0, 16);
    return;
  }
  tt_emu::Fiber &f = s.fibers[s.cur];
  f.copies.push_back(tt_emu::AsyncCopy{dst, src, f.committed});
}

inline void tt_emu_cp_async_commit() {
  tt_emu::State &s = tt_emu::g;
  if (s.cur < 0) tt_emu::fatal("cp.async.commit_group outside a kernel launch");
  ++s.fibers[s.cur].committed;
}

// Performs every copy of the committed groups but the `n` most recent.
inline void tt_emu_cp_async_wait(unsigned n) {
  tt_emu::State &s = tt_emu::g;
  if (s.cur < 0) tt_emu::fatal("cp.async.wait_group outside a kernel launch");
  tt_emu::Fiber &f = s.fibers[s.cur];
  tt_emu::complete_groups(f.copies, f.committed, n, [](const tt_emu::AsyncCopy &c) {
    if (c.src != nullptr)
      memcpy(c.dst, c.src, 16);
    else
      memset(c.dst, 0, 16);
  });
}

// ---------------------------------------------------------------------------------------------
// Hopper warpgroup MMA.

// The shared-window address of a pointer into the dynamic shared memory (its offset there).
inline uint32_t tt_emu_smem_addr(const void *p) {
  const tt_emu::State &s = tt_emu::g;
  const unsigned char *c = static_cast<const unsigned char *>(p);
  if (s.dyn == nullptr || c < s.dyn || c >= s.dyn + s.dyn_bytes)
    tt_emu::fatal("shared-memory address of a pointer outside the dynamic shared memory");
  return static_cast<uint32_t>(c - s.dyn);
}

namespace tt_emu {
// Adds a thread's share of A (64 x 16, its rows given) · B (16 x N, read now from the dynamic
// shared memory through `desc`) to its accumulator values v: v[4j + e] is D[row e / 2][8j + 2t +
// e % 2]. Each output sums its 16 products in order, then adds them to the accumulator (as the
// mma emulation).
inline void wgmma_accumulate(float *v, int n, const float (&a)[2][16], uint64_t desc, bool bf16,
                             bool trans_b, int tq) {
  State &s = g;
  const size_t start = (desc & 0x3FFF) << 4;
  const size_t lbo = ((desc >> 16) & 0x3FFF) << 4;
  const size_t sbo = ((desc >> 32) & 0x3FFF) << 4;
  auto b_at = [&](int k, int col) {
    const size_t off = trans_b ? (col % 8) * 2 + (col / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo
                               : (col % 8) * 16 + (col / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo;
    if (start + off + 2 > s.dyn_bytes) fatal("wgmma reads B outside the shared memory");
    uint16_t h;
    memcpy(&h, s.dyn + start + off, 2);
    return bf16 ? bf16_to_float(h) : half_to_float(h);
  };
  for (int j = 0; j < n / 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int col = 8 * j + 2 * tq + (e & 1);
      float sum = 0.0f;
      for (int k = 0; k < 16; ++k) sum += a[e >> 1][k] * b_at(k, col);
      v[4 * j + e] += sum;
    }
}
}  // namespace tt_emu

// wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}.{bf16,f16} with A in registers:
// D (64 x N) += A (64 x 16) · B (16 x N). Thread (warp w of its warpgroup, g = lane / 4,
// t = lane % 4) holds the A fragment of rows 16w + g and 16w + g + 8 as mma.m16n8k16 does, and
// d[4j + e] = D[16w + g + 8·(e / 2)][8j + 2t + e % 2]. B's element (k, n) lies at the descriptor's
// start address plus, K-major (trans_b 0): (n % 8)·16 + (n / 8)·SBO + (k % 8)·2 + (k / 8)·LBO
// bytes; MN-major (trans_b 1): (n % 8)·2 + (n / 8)·SBO + (k % 8)·16 + (k / 8)·LBO.
inline void tt_emu_wgmma(float *d, int n, const uint32_t a[4], uint64_t desc, bool bf16,
                         bool trans_b) {
  tt_emu::State &s = tt_emu::g;
  if (s.cur < 0) tt_emu::fatal("wgmma outside a kernel launch");
  if (n < 8 || n > 256 || n % 8 != 0) tt_emu::fatal("wgmma N must be a multiple of 8 up to 256");
  tt_emu::WarpGroup &w = s.groups[s.cur >> 7];
  if (w.expected != 128) tt_emu::fatal("wgmma in an incomplete warpgroup");
  tt_emu::Fiber &f = s.fibers[s.cur];
  const unsigned p = f.wg_phase;
  f.wg_phase = p ^ 1u;
  const int tw = s.cur & 127;
  for (int r = 0; r < 4; ++r) w.a[p][tw][r] = a[r];
  w.desc[p][tw] = desc;
  const int shape = n | (bf16 ? 1 << 16 : 0) | (trans_b ? 1 << 17 : 0);
  w.shape[p][tw] = shape;
  tt_emu::group_barrier(w);
  for (int o = 0; o < 128; ++o)
    if (w.desc[p][o] != desc || w.shape[p][o] != shape)
      tt_emu::fatal("wgmma operands differ across the warpgroup (descriptor, shape or types)");
  if ((desc >> 62) != 0) tt_emu::fatal("the wgmma emulation knows only the no-swizzle layout");
  if (((desc >> 49) & 7) != 0) tt_emu::fatal("wgmma base offset must be 0 without swizzling");
  // The thread's two rows of A, from their owners' fragments.
  const int warp = tw >> 5, lane = tw & 31, gq = lane >> 2, tq = lane & 3;
  tt_emu::DeferredMma op{};
  for (int rr = 0; rr < 2; ++rr)
    for (int k = 0; k < 16; ++k) {
      const int row = 16 * warp + gq + 8 * rr;
      const int owner = (row / 16) * 32 + (row % 8) * 4 + (k % 8) / 2;
      const uint32_t bits = w.a[p][owner][(row % 16) / 8 + 2 * (k / 8)];
      const uint16_t h = static_cast<uint16_t>((k % 2) ? bits >> 16 : bits);
      op.a[rr][k] = bf16 ? tt_emu::bf16_to_float(h) : tt_emu::half_to_float(h);
    }
  op.desc = desc;
  op.bf16 = bf16;
  op.trans_b = trans_b;
  // The pending product into the same registers, else a new one from their current values.
  tt_emu::PendingMma *pm = nullptr;
  for (tt_emu::PendingMma &m : f.mmas)
    if (m.d == d) pm = &m;
  if (pm != nullptr && pm->n != n / 2) tt_emu::fatal("chained wgmma products of different shapes");
  if (pm == nullptr) {
    f.mmas.push_back(tt_emu::PendingMma{d, n / 2, {}, 0, {}});
    pm = &f.mmas.back();
    for (int i = 0; i < n / 2; ++i) pm->v[i] = d[i];
  }
  pm->group = f.mma_committed;
  const bool at_wait = s.fixed_mma_mode >= 0 ? s.fixed_mma_mode == 1
                                             : (((s.blocks - 1) >> 3) & 1) != 0;
  if (at_wait || !pm->deferred.empty())  // keep the chain's order once one product is deferred
    pm->deferred.push_back(op);
  else
    tt_emu::wgmma_accumulate(pm->v, n, op.a, desc, bf16, trans_b, tq);
}

// wgmma.commit_group: closes the group of the products issued since the last commit.
inline void tt_emu_wgmma_commit() {
  tt_emu::State &s = tt_emu::g;
  if (s.cur < 0) tt_emu::fatal("wgmma.commit_group outside a kernel launch");
  ++s.fibers[s.cur].mma_committed;
}

// wgmma.wait_group n: delivers the results of every committed group but the n most recent.
inline void tt_emu_wgmma_wait(unsigned n) {
  tt_emu::State &s = tt_emu::g;
  if (s.cur < 0) tt_emu::fatal("wgmma.wait_group outside a kernel launch");
  tt_emu::Fiber &f = s.fibers[s.cur];
  const int tq = (s.cur & 127) & 3;
  tt_emu::complete_groups(f.mmas, f.mma_committed, n, [tq](tt_emu::PendingMma &m) {
    for (const tt_emu::DeferredMma &op : m.deferred)
      tt_emu::wgmma_accumulate(m.v, 2 * m.n, op.a, op.desc, op.bf16, op.trans_b, tq);
    for (int r = 0; r < m.n; ++r) m.d[r] = m.v[r];
  });
}
