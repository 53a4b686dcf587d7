// Runs every extern "C" kernel of kernels/attention.cu and kernels/norm.cu on the CPU through the
// CUDA emulator (cuda_emu.h) and compares it with a double-precision reference computed from the
// same 16-bit-rounded inputs. One line per case: name, sizes, the measured error, the bound. Exits
// with status 1 if any case fails. Built and run by tests/unit/cuda_emulated.rs, one section a
// test (`emu_tests attention-bf16-small`; no argument: every section):
//   c++ -std=c++20 -O2 -pthread -DTT_CUDA_EMU -fno-strict-aliasing -Wall -Wno-unknown-pragmas
//       -I kernels kernels/emu/emu_tests.cpp -o emu_tests
//
// Attention runs each of its block tiles (w4r16, w8r16, w4r32, and the wgmma tiles wg2, wg1,
// wg2p and wg1p) on the same inputs: the first is checked against the reference, the others
// must be bit-identical to it; a "tile" line per kernel gives its launch shape.
//
// Inputs are deterministic (xorshift). Whatever a kernel must not read (padding of strided rows,
// keys past a row's end or in its hole, other chunks of the modulation vector, cos/sin rows before pos_offset) is
// NaN, and every output starts as NaN, so a wrong index, a leaking mask or a missed store shows up
// as a NaN error. Buffers end at a page with no access rights, so reads past their end crash.
//
// Errors are max |out - ref| / max |ref| over a case. Largest measured values over the cases of a
// family (x86-64, g++ 12, -O2), and the bounds:
//   attention       bf16 3.7e-3 (8e-3)   f16 4.4e-4 (1.5e-3)
//   layer_norm_mod  f32 1.7e-7 (6e-7)    bf16 3.3e-3 (5e-3)   f16 4.1e-4 (6e-4)
//   qk_norm_rope    f32 1.5e-7 (6e-7)    bf16 3.5e-3 (5e-3)   f16 4.0e-4 (6e-4)
//   gelu_tanh       f32 7.1e-8 (3e-7)    bf16 1.3e-3 (5e-3)   f16 1.6e-4 (6e-4)
//   geglu           f32 6.1e-8 (3e-7)    bf16 2.2e-3 (5e-3)   f16 3.2e-4 (6e-4)
//   group_norm      f32 1.7e-7 (6e-7)    bf16 3.0e-3 (5e-3)   f16 3.5e-4 (6e-4)
//   gated_residual  f32 4.3e-8 (3e-7)    bf16 2.8e-3 (5e-3)   f16 3.1e-4 (6e-4)
// (gelu_tanh is measured against max(max|ref|, 1), see test_gelu.)
// The 16-bit bounds of the norms and activations are about 1.25 units of roundoff (2^-8 for bf16,
// 2^-11 for f16): their outputs are one rounding away from the reference, relative to |out| <=
// max |ref|. Attention also rounds the probabilities to T before P·V, hence looser bounds. The f32
// bounds are about 3x the measured float32 errors.
#ifndef TT_CUDA_EMU
#define TT_CUDA_EMU
#endif
#include "../attention.cu"
#include "../norm.cu"

#include <algorithm>
#include <climits>
#include <cstdarg>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace {

int g_cases = 0;
int g_failed = 0;

std::string fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char *f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

void report(const std::string &name, double err, double bound, const std::string &note = "",
            bool extra_ok = true) {
  ++g_cases;
  const bool ok = err <= bound && extra_ok;  // false for NaN
  if (!ok) ++g_failed;
  printf("%-4s %-66s err %9.3e  bound %.1e%s%s\n", ok ? "ok" : "FAIL", name.c_str(), err, bound,
         note.empty() ? "" : "  ", note.c_str());
  fflush(stdout);
}

// Largest error relative to the largest reference magnitude; NaN anywhere makes it infinite.
// For 16-bit outputs it also counts the elements equal to the reference rounded to T.
struct ErrTracker {
  double max_err = 0.0;
  double max_ref = 0.0;
  long count = 0, same = 0;
  void add(double out, double ref) {
    const double e = std::fabs(out - ref);
    if (std::isnan(e)) max_err = INFINITY;
    else max_err = std::max(max_err, e);
    max_ref = std::max(max_ref, std::fabs(ref));
  }
  template <class T> void add(T out, double ref);
  double rel() const { return max_ref > 0.0 ? max_err / max_ref : max_err; }
  double same_frac() const { return count > 0 ? static_cast<double>(same) / count : 1.0; }
  // Where the kernel rounds once (or at the same points as the reference), nearly every 16-bit
  // output must equal the rounded reference; a missing or extra rounding to T drops the share to
  // somewhere around a half. `min_same` 0 makes the share informative only.
  bool same_ok(double min_same) const { return same_frac() >= min_same; }
  std::string note(double min_same = 0.0) const {
    std::string s = fmt("max|ref| %.2f", max_ref);
    if (count > 0) {
      s += fmt(", %.2f%% equal the rounded ref", 100.0 * same_frac());
      if (min_same > 0.0) s += fmt(" (min %.0f%%)", 100.0 * min_same);
    }
    return s;
  }
};

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull) {}
  uint64_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1p-53; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  // Irwin-Hall with four terms, scaled to unit variance: N(0, 1)-ish, bounded by 3.5.
  double normal() {
    double x = 0.0;
    for (int i = 0; i < 4; ++i) x += uniform();
    return (x - 2.0) * 1.7320508075688772;
  }
};

template <class T> const char *tname();
template <> const char *tname<float>() { return "f32"; }
template <> const char *tname<tt_bf16>() { return "bf16"; }
template <> const char *tname<tt_f16>() { return "f16"; }

template <class T> double val(T x) { return static_cast<double>(tt_to_float(x)); }
template <class T> T make(double x) { return tt_from_float<T>(static_cast<float>(x)); }
template <class T> double rnd(double x) { return val(make<T>(x)); }  // rounded to T

template <class T> void ErrTracker::add(T out, double ref) {
  add(val(out), ref);
  if constexpr (!std::is_same_v<T, float>) {
    const T r = make<T>(ref);
    ++count;
    if (memcmp(&out, &r, sizeof(T)) == 0) ++same;
  }
}

// A buffer that ends where an inaccessible page begins (reads past the end fault), 16-byte
// aligned at the start, and filled with 0xff bytes (NaN for f32, bf16 and f16).
template <class T> class Buf {
 public:
  explicit Buf(size_t n) : n_(n) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = std::max<size_t>(n, 1) * sizeof(T);
    const size_t data_pages = (bytes + 15 + page - 1) / page;
    map_bytes_ = (data_pages + 1) * page;
    void *m = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      perror("mmap");
      exit(2);
    }
    base_ = static_cast<char *>(m);
    char *end = base_ + data_pages * page;
    if (mprotect(end, page, PROT_NONE) != 0) {
      perror("mprotect");
      exit(2);
    }
    p_ = reinterpret_cast<T *>(reinterpret_cast<uintptr_t>(end - bytes) & ~uintptr_t{15});
    memset(static_cast<void *>(p_), 0xff, bytes);
  }
  ~Buf() { munmap(base_, map_bytes_); }
  Buf(const Buf &) = delete;
  Buf &operator=(const Buf &) = delete;
  T *data() { return p_; }
  size_t size() const { return n_; }
  T &operator[](size_t i) { return p_[i]; }

 private:
  size_t n_;
  size_t map_bytes_ = 0;
  char *base_ = nullptr;
  T *p_ = nullptr;
};

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// ---------------------------------------------------------------------------------------------
// The emulator's own 16-bit conversions against references built in double: every half / bf16
// decodes right, and float -> 16 bits picks the nearest value (ties to even mantissa, overflow to
// infinity from the midpoint between the largest finite value and the next power of two) for all
// values, their midpoints and the floats adjacent to the midpoints, plus random bit patterns.

double decode_ref(uint16_t h, int man_bits, int bias) {
  const int exp_max = (1 << (15 - man_bits)) - 1;
  const int e = (h & 0x7fff) >> man_bits;
  const int m = h & ((1 << man_bits) - 1);
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (e == exp_max) return m == 0 ? sign * INFINITY : NAN;
  if (e == 0) return sign * std::ldexp(m, 1 - bias - man_bits);
  return sign * std::ldexp((1 << man_bits) + m, e - bias - man_bits);
}

bool is_nan16(uint16_t h, int man_bits) {
  const int exp_max = (1 << (15 - man_bits)) - 1;
  return ((h & 0x7fff) >> man_bits) == exp_max && (h & ((1 << man_bits) - 1)) != 0;
}

struct Format16 {
  const char *name;
  int man_bits, bias;
  float (*to_float)(uint16_t);
  uint16_t (*from_float)(float);
};

void test_format(const Format16 &fm, Rng &rng) {
  const uint16_t inf_bits = static_cast<uint16_t>(((1 << (15 - fm.man_bits)) - 1) << fm.man_bits);
  std::vector<double> pos;  // values of the finite non-negative patterns 0 .. inf_bits - 1
  for (uint32_t b = 0; b < inf_bits; ++b)
    pos.push_back(decode_ref(static_cast<uint16_t>(b), fm.man_bits, fm.bias));
  const int exp_top = (1 << (15 - fm.man_bits)) - 1 - fm.bias;  // the power of two past the largest
  const double overflow_mid = (pos.back() + std::ldexp(1.0, exp_top)) / 2;

  long bad_decode = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint16_t h = static_cast<uint16_t>(b);
    const double ref = decode_ref(h, fm.man_bits, fm.bias);
    const float got = fm.to_float(h);
    const bool ok = std::isnan(ref) ? std::isnan(got)
                                    : (static_cast<double>(got) == ref &&
                                       std::signbit(got) == std::signbit(ref));
    if (!ok) ++bad_decode;
  }
  report(fmt("convert %s -> f32, all 65536 patterns", fm.name), static_cast<double>(bad_decode),
         0.0, "(count of wrong values)");

  auto nearest = [&](float f) -> uint16_t {
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    const double a = std::fabs(static_cast<double>(f));
    if (a >= overflow_mid) return static_cast<uint16_t>(sign | inf_bits);
    size_t hi = static_cast<size_t>(std::upper_bound(pos.begin(), pos.end(), a) - pos.begin());
    if (hi == pos.size()) return static_cast<uint16_t>(sign | (hi - 1));
    const size_t lo = hi - 1;
    const double dl = a - pos[lo];
    const double dh = pos[hi] - a;
    const size_t pick = dl < dh ? lo : dh < dl ? hi : ((lo & 1) == 0 ? lo : hi);
    return static_cast<uint16_t>(sign | pick);
  };
  long checked = 0, bad = 0;
  auto check = [&](float f) {
    ++checked;
    const uint16_t got = fm.from_float(f);
    if (std::isnan(f)) {
      if (!is_nan16(got, fm.man_bits)) ++bad;
      return;
    }
    if (got != nearest(f)) {
      if (bad < 5)
        printf("     %s(%a) = 0x%04x, expected 0x%04x\n", fm.name, static_cast<double>(f), got,
               nearest(f));
      ++bad;
    }
  };
  for (size_t i = 0; i + 1 < pos.size(); ++i) {
    const float v = static_cast<float>(pos[i]);
    const float mid = static_cast<float>((pos[i] + pos[i + 1]) / 2);  // exact in float
    for (float f : {v, mid, std::nextafter(mid, -INFINITY), std::nextafter(mid, INFINITY)}) {
      check(f);
      check(-f);
    }
  }
  const float omid = static_cast<float>(overflow_mid);
  for (float f : {0.0f, INFINITY, NAN, 3.4028234663852886e38f, 65504.0f, 65519.996f, 65520.0f,
                  65536.0f, 1e-8f, 1e-40f, 1.4e-45f, 2.9802322387695312e-08f, omid,
                  std::nextafter(omid, 0.0f)}) {
    check(f);
    check(-f);
  }
  for (int i = 0; i < 200000; ++i) {
    const uint32_t u = static_cast<uint32_t>(rng.next() >> 32);
    check(tt_emu::bits_float(u));
  }
  report(fmt("convert f32 -> %s, %ld values", fm.name, checked), static_cast<double>(bad), 0.0,
         "(count of wrong roundings)");
}

void test_conversions() {
  Rng rng(7);
  test_format({"f16", 10, 15, tt_emu::half_to_float, tt_emu::float_to_half}, rng);
  test_format({"bf16", 7, 127, tt_emu::bf16_to_float, tt_emu::float_to_bf16}, rng);
}

// ---------------------------------------------------------------------------------------------
// Attention.

template <class T>
using AttnFn = void (*)(const T *, const T *, const T *, T *, const int *, int, int, int, int, int,
                        long long, long long, long long, long long, long long, long long,
                        long long, long long, long long, float);

enum class Layout { HeadsMajor, TokenMajor, Mixed };
// Which keys each row sees (key_ranges: end, hole start, hole end per batch row).
enum class Keys {
  All,       // key_ranges null
  FiveAll,   // ends {5, lk}
  ZeroMost,  // ends {0, lk - 1}
  Clamp,     // ends {lk + 7, 3}: clamped to lk
  Holes,     // ends {lk, lk - 2}, holes [2, 9) (left padding after a cached prefix) and
             // [0, lk - 9) (no prefix: whole tiles that a row does not see, then a few keys)
};

struct AttnCase {
  int lq, lk;
  Layout layout;
  Keys keys;
  double qmul;     // scales q: 12 gives logits of about ±50
  bool causal = false;  // causal_off = lk - lq (else INT_MAX, no causality)
  int group = 1;        // query heads per key/value head
};

const char *layout_name(Layout l) {
  switch (l) {
    case Layout::HeadsMajor: return "BHLD";
    case Layout::TokenMajor: return "BLHD";
    case Layout::Mixed: return "q BHLD, k in fused qkv, v padded";
  }
  return "?";
}

struct View {
  long long off, sb, sh, sl;  // base offset in its buffer, batch / head / sequence strides
  size_t size;                // elements of the buffer
};

View heads_major(int B, int H, int L, int D) {
  return {0, 1LL * H * L * D, 1LL * L * D, D, static_cast<size_t>(B) * H * L * D};
}
View token_major(int B, int H, int L, int D) {
  return {0, 1LL * L * H * D, D, 1LL * H * D, static_cast<size_t>(B) * L * H * D};
}

// One block tile of an attention kernel (see attention.cu): its function and launch shape.
template <class T> struct AttnKernel {
  const char *tile;  // "w4r16", ...
  AttnFn<T> fn;
  int rows;     // query rows of a block
  int threads;  // threads of a block
  int smem;     // dynamic shared memory, bytes
};
#define ATTN_KERNEL(TN, T, D, W, R)                                                 \
  AttnKernel<T> {                                                                   \
    "w" #W "r" #R, tt_attention_##TN##_d##D##_w##W##r##R, W * R, W * 32,              \
        TtAttnTile<T, D, W, R / 16>::SMEM_BYTES                                     \
  }
#define ATTN_KERNEL_WG(TN, T, D, WG, SUFFIX, PIPE)                                              \
  AttnKernel<T> {                                                                               \
    "wg" #WG #SUFFIX, tt_attention_##TN##_d##D##_wg##WG##SUFFIX, 64 * WG, 128 * WG,              \
        TtAttnWgTile<T, D, WG, PIPE>::SMEM_BYTES                                                \
  }
// The four wgmma tiles of a head size.
#define ATTN_KERNELS_WG(TN, T, D)                                                   \
  ATTN_KERNEL_WG(TN, T, D, 2, , false), ATTN_KERNEL_WG(TN, T, D, 1, , false),       \
      ATTN_KERNEL_WG(TN, T, D, 2, p, true), ATTN_KERNEL_WG(TN, T, D, 1, p, true)
// Every tile of a head size up to 128 (w4r32 stops there), then of a larger one.
#define ATTN_KERNELS(TN, T, D)                                                      \
  {ATTN_KERNEL(TN, T, D, 4, 16), ATTN_KERNEL(TN, T, D, 8, 16), ATTN_KERNEL(TN, T, D, 4, 32), \
   ATTN_KERNELS_WG(TN, T, D)}
#define ATTN_KERNELS_LARGE(TN, T, D) \
  {ATTN_KERNEL(TN, T, D, 4, 16), ATTN_KERNEL(TN, T, D, 8, 16), ATTN_KERNELS_WG(TN, T, D)}
// The attention cases of every head size of one dtype (inside main: uses its rng).
// The head sizes in two halves, run as separate sections (and tests).
#define ATTENTION_SUITES_SMALL(TN, T, BOUND)                                                \
  attention_suite<T, 40>("attention " #TN " d=40", ATTN_KERNELS(TN, T, 40), BOUND, rng);    \
  attention_suite<T, 64>("attention " #TN " d=64", ATTN_KERNELS(TN, T, 64), BOUND, rng);    \
  attention_suite<T, 72>("attention " #TN " d=72", ATTN_KERNELS(TN, T, 72), BOUND, rng);
#define ATTENTION_SUITES_LARGE(TN, T, BOUND)                                                \
  attention_suite<T, 80>("attention " #TN " d=80", ATTN_KERNELS(TN, T, 80), BOUND, rng);    \
  attention_suite<T, 128>("attention " #TN " d=128", ATTN_KERNELS(TN, T, 128), BOUND, rng); \
  attention_suite<T, 160>("attention " #TN " d=160", ATTN_KERNELS_LARGE(TN, T, 160), BOUND, rng);

// Runs every tile of `kernels` on the same inputs: the first is checked against the reference,
// the others must give bit-identical outputs (every row takes the same operations in every tile).
template <class T, int D>
void test_attention(const char *kname, const std::vector<AttnKernel<T>> &kernels,
                    const AttnCase &c, double bound, Rng &rng) {
  constexpr int B = 2;
  const int G = c.group, H = 3 * G, HK = 3;  // query heads, key/value heads
  const int lq = c.lq, lk = c.lk;
  const long long HD = 1LL * HK * D;
  View qv, kv, vv;
  switch (c.layout) {
    case Layout::HeadsMajor:
      qv = heads_major(B, H, lq, D);
      kv = vv = heads_major(B, HK, lk, D);
      break;
    case Layout::TokenMajor:
      qv = token_major(B, H, lq, D);
      kv = vv = token_major(B, HK, lk, D);
      break;
    case Layout::Mixed: {
      qv = heads_major(B, H, lq, D);
      // k: the k slot of a fused (B, Lk, 3, HK, D) projection; v: (B, Lk, HK, D) with rows
      // padded by 8 elements, batches by 16 more, starting 8 elements into its buffer.
      kv = {HD, 3 * HD * lk, D, 3 * HD, static_cast<size_t>(B * 3 * HD * lk)};
      const long long vsl = HD + 8, vsb = vsl * lk + 16;
      vv = {8, vsb, D, vsl, static_cast<size_t>(8 + B * vsb)};
      break;
    }
  }
  int ranges[B][3] = {{lk, 0, 0}, {lk, 0, 0}};
  switch (c.keys) {
    case Keys::All: break;
    case Keys::FiveAll: ranges[0][0] = 5; break;
    case Keys::ZeroMost: ranges[0][0] = 0, ranges[1][0] = lk - 1; break;
    case Keys::Clamp: ranges[0][0] = lk + 7, ranges[1][0] = 3; break;
    case Keys::Holes:
      ranges[0][0] = lk, ranges[0][1] = 2, ranges[0][2] = 9;
      ranges[1][0] = lk - 2, ranges[1][1] = 0, ranges[1][2] = lk - 9;
      break;
  }
  const int causal_off = c.causal ? lk - lq : INT_MAX;
  // The reference's view of the mask, written independently of the kernel's TtKeyMask.
  auto sees = [&](int b, int i, int j) {
    const int end = std::clamp(ranges[b][0], 0, lk);
    const bool in_hole = j >= ranges[b][1] && j < ranges[b][2];
    return j < end && !in_hole && (!c.causal || j <= i + (lk - lq));
  };
  // Keys no row sees past the end or in a hole stay NaN: they must never count.
  auto stored = [&](int b, int j) {
    return j < std::clamp(ranges[b][0], 0, lk) && !(j >= ranges[b][1] && j < ranges[b][2]);
  };

  Buf<T> qb(qv.size), kb(kv.size), vb(vv.size);
  Buf<int> ranges_buf(3 * B);
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < 3; ++r) ranges_buf[3 * b + r] = ranges[b][r];
  auto at = [](const View &w, int b, int h, int l, int d) {
    return w.off + b * w.sb + h * w.sh + l * w.sl + d;
  };
  auto qi = [&](int b, int h, int i, int d) { return at(qv, b, h, i, d); };
  auto ki = [&](int b, int h, int j, int d) { return at(kv, b, h / G, j, d); };
  auto vi = [&](int b, int h, int j, int d) { return at(vv, b, h / G, j, d); };
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < lq; ++i)
        for (int d = 0; d < D; ++d) qb[qi(b, h, i, d)] = make<T>(c.qmul * rng.normal());
    for (int h = 0; h < H; h += G)
      for (int j = 0; j < lk; ++j)
        if (stored(b, j))
          for (int d = 0; d < D; ++d) {
            kb[ki(b, h, j, d)] = make<T>(rng.normal());
            vb[vi(b, h, j, d)] = make<T>(rng.normal());
          }
  }

  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const float scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const int *ranges_ptr = c.keys == Keys::All ? nullptr : ranges_buf.data();
  const size_t out_elems = static_cast<size_t>(B) * lq * H * D;
  std::vector<std::unique_ptr<Buf<T>>> outs;
  for (const AttnKernel<T> &kn : kernels) {
    outs.push_back(std::make_unique<Buf<T>>(out_elems));
    T *o = outs.back()->data();
    tt_emu_launch(
        dim3((lq + kn.rows - 1) / kn.rows, H, B), dim3(kn.threads),
        [&] {
          kn.fn(qb.data() + qv.off, kb.data() + kv.off, vb.data() + vv.off, o, ranges_ptr, H, G,
                lq, lk, causal_off, qv.sb, qv.sh, qv.sl, kv.sb, kv.sh, kv.sl, vv.sb, vv.sh, vv.sl,
                scale_log2);
        },
        kn.smem);
  }
  Buf<T> &ob = *outs[0];
  std::string same;  // the other tiles, each "=" (bit-identical) or "DIFFERS"
  bool all_same = true;
  for (size_t i = 1; i < kernels.size(); ++i) {
    const bool eq = memcmp(outs[i]->data(), ob.data(), out_elems * sizeof(T)) == 0;
    all_same = all_same && eq;
    same += fmt(", %s %s", kernels[i].tile, eq ? "=" : "DIFFERS");
  }

  ErrTracker et;
  bool empty_rows_zero = true;
  int empty_rows = 0;
  double max_logit = 0.0;
  std::vector<double> s(lk), acc(D);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < lq; ++i) {
        const T *o = ob.data() + ((1LL * b * lq + i) * H + h) * D;
        double mx = -INFINITY;
        for (int j = 0; j < lk; ++j) {
          if (!sees(b, i, j)) continue;
          double dot = 0.0;
          for (int d = 0; d < D; ++d) dot += val(qb[qi(b, h, i, d)]) * val(kb[ki(b, h, j, d)]);
          s[j] = dot * scale_log2;  // log2 units, as the kernel
          mx = std::max(mx, s[j]);
          max_logit = std::max(max_logit, std::fabs(s[j]) / 1.4426950408889634);
        }
        if (mx == -INFINITY) {  // no keys: exactly zero
          ++empty_rows;
          for (int d = 0; d < D; ++d) {
            if (val(o[d]) != 0.0) empty_rows_zero = false;
            et.add(o[d], 0.0);
          }
          continue;
        }
        double sum = 0.0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int j = 0; j < lk; ++j) {
          if (!sees(b, i, j)) continue;
          const double p = std::exp2(s[j] - mx);
          sum += p;
          for (int d = 0; d < D; ++d) acc[d] += p * val(vb[vi(b, h, j, d)]);
        }
        for (int d = 0; d < D; ++d) et.add(o[d], acc[d] / sum);
      }
  std::string keys = "all";
  if (c.keys != Keys::All) {
    keys.clear();
    for (int b = 0; b < B; ++b) {
      keys += fmt("%s<%d", b ? "," : "{", ranges[b][0]);
      if (ranges[b][2] > ranges[b][1]) keys += fmt(" not [%d,%d)", ranges[b][1], ranges[b][2]);
    }
    keys += "}";
  }
  report(fmt("%s Lq=%d Lk=%d keys=%s%s%s %s", kname, lq, lk, keys.c_str(),
             c.causal ? " causal" : "", G > 1 ? fmt(" group=%d", G).c_str() : "",
             layout_name(c.layout)),
         empty_rows_zero ? et.rel() : INFINITY, bound,
         fmt("%s, max|logit| %.0f, %d empty rows%s; %s%s", et.note().c_str(), max_logit,
             empty_rows, empty_rows_zero ? "" : " (not zero)", kernels[0].tile, same.c_str()),
         all_same);
}

const AttnCase kAttnCases[] = {
    {1, 1, Layout::HeadsMajor, Keys::All, 1.0},
    {77, 77, Layout::TokenMajor, Keys::FiveAll, 1.0},
    {130, 200, Layout::HeadsMajor, Keys::All, 1.0},
    {64, 64, Layout::TokenMajor, Keys::ZeroMost, 1.0},
    {65, 129, Layout::Mixed, Keys::FiveAll, 1.0},
    {33, 50, Layout::Mixed, Keys::Clamp, 1.0},
    {65, 129, Layout::TokenMajor, Keys::All, 12.0},  // logits of about ±50
    {300, 70, Layout::Mixed, Keys::FiveAll, 1.0},  // several 128-row blocks, a partial last one
    // Causal self-attention over whole blocks and tiles (the tiles above the diagonal skipped).
    {130, 130, Layout::TokenMajor, Keys::All, 1.0, true},
    // A batched prefill after a cached prefix: left padding as holes, causal, grouped heads.
    {70, 75, Layout::HeadsMajor, Keys::Holes, 12.0, true, 2},
    // One decode step over the cache: a single query row sees every key but the holes.
    {1, 140, Layout::Mixed, Keys::Holes, 1.0, true, 2},
    // More queries than keys: the first rows see no key at all and must come out as zeros.
    {100, 70, Layout::TokenMajor, Keys::FiveAll, 1.0, true},
};

template <class T, int D>
void attention_suite(const char *name, const std::vector<AttnKernel<T>> &kernels, double bound,
                     Rng &rng) {
  // The launch shapes, which tests/unit/cuda_emulated.rs compares with the Rust launcher's
  // (ops::AttentionTile).
  for (const AttnKernel<T> &k : kernels)
    printf("tile %s d=%d rows=%d threads=%d smem=%d\n", k.tile, D, k.rows, k.threads, k.smem);
  for (const AttnCase &c : kAttnCases) test_attention<T, D>(name, kernels, c, bound, rng);
}

// Least shares of 16-bit outputs equal to the rounded reference (measured: layer norm and
// qk_norm_rope >= 99.5%, geglu >= 98.5%; gelu_tanh only 86%, since 1 + tanhf(x) cancels for
// negative x in float, and attention rounds the probabilities to T, so neither is checked).
constexpr double kMinSameLn = 0.98, kMinSameQk = 0.98, kMinSameGeglu = 0.95;

// ---------------------------------------------------------------------------------------------
// Layer norm with adaLN modulation.

template <class T>
using LnFn = void (*)(const T *, T *, const T *, const T *, const T *, const T *, int, int,
                      long long, float);

enum : unsigned { kWeight = 1, kBias = 2, kShift = 4, kScale = 8 };

template <class T>
void test_layer_norm(LnFn<T> fn, int cols, unsigned parts, double bound, Rng &rng) {
  constexpr int rows = 7, rows_per_group = 3, groups = 3;
  const long long mod_stride = 6LL * cols;  // chunks (shift, ., ., ., scale, .) of (B, 1, 6 cols)
  const float eps = 1e-6f;
  Buf<T> x(1LL * rows * cols), y(1LL * rows * cols), w(cols), bias(cols), mod(groups * mod_stride);
  for (size_t i = 0; i < x.size(); ++i) x[i] = make<T>(3.0 + 2.0 * rng.normal());
  for (int c = 0; c < cols; ++c) {
    w[c] = make<T>(1.0 + 0.5 * rng.normal());
    bias[c] = make<T>(0.5 * rng.normal());
  }
  for (int g = 0; g < groups; ++g)  // the other chunks stay NaN
    for (int c = 0; c < cols; ++c) {
      mod[g * mod_stride + c] = make<T>(0.5 * rng.normal());
      mod[g * mod_stride + 4 * cols + c] = make<T>(0.5 * rng.normal());
    }
  const T *wp = parts & kWeight ? w.data() : nullptr;
  const T *bp = parts & kBias ? bias.data() : nullptr;
  const T *shp = parts & kShift ? mod.data() : nullptr;
  const T *scp = parts & kScale ? mod.data() + 4 * cols : nullptr;
  tt_emu_launch(dim3(rows), dim3(256), [&] {
    fn(x.data(), y.data(), wp, bp, shp, scp, cols, rows_per_group, mod_stride, eps);
  });

  ErrTracker et;
  for (int r = 0; r < rows; ++r) {
    double mean = 0.0, var = 0.0;
    for (int c = 0; c < cols; ++c) mean += val(x[1LL * r * cols + c]);
    mean /= cols;
    for (int c = 0; c < cols; ++c) {
      const double d = val(x[1LL * r * cols + c]) - mean;
      var += d * d;
    }
    var /= cols;
    const double rstd = 1.0 / std::sqrt(var + static_cast<double>(eps));
    const long long g = r / rows_per_group;
    for (int c = 0; c < cols; ++c) {
      double v = (val(x[1LL * r * cols + c]) - mean) * rstd;
      if (wp) v *= val(w[c]);
      if (bp) v += val(bias[c]);
      if (scp) v *= 1.0 + val(scp[g * mod_stride + c]);
      if (shp) v += val(shp[g * mod_stride + c]);
      et.add(y[1LL * r * cols + c], v);
    }
  }
  report(fmt("layer_norm_mod %s rows=%d cols=%d rows/group=%d%s%s%s%s%s", tname<T>(), rows, cols,
             rows_per_group, parts & kWeight ? " weight" : "", parts & kBias ? " bias" : "",
             parts & kShift ? " shift" : "", parts & kScale ? " scale" : "",
             parts == 0 ? " (plain)" : ""),
         et.rel(), bound, et.note(kMinSameLn), et.same_ok(kMinSameLn));
}

template <class T> void layer_norm_suite(LnFn<T> fn, double bound, Rng &rng) {
  for (int cols : {1, 31, 300, 3072})
    for (unsigned parts : {kWeight | kBias | kShift | kScale, 0u, kWeight | kShift, kBias | kScale})
      test_layer_norm<T>(fn, cols, parts, bound, rng);
}

// ---------------------------------------------------------------------------------------------
// Flux q/k RMS norm + RoPE.

template <class T>
using QkFn = void (*)(const T *, long long, const T *, long long, int, T *, const T *, const T *,
                      const T *, const T *, const float *, const float *, int, int, int, int, int,
                      float);

// One stream of q/k/v rows: (B, rows, 3·H·D + pad) and its q/k norm weights.
template <class T> struct QkStream {
  int rows;
  long long row_stride;
  Buf<T> qkv, qw, kw;
  QkStream(int batch, int rows_, long long hd, int pad, int D, Rng &rng)
      : rows(rows_), row_stride(3 * hd + pad), qkv(std::max<long long>(1, batch * rows_ * (3 * hd + pad))),
        qw(D), kw(D) {
    const int H = static_cast<int>(hd / D);
    for (int bl = 0; bl < batch * rows; ++bl)
      for (int part = 0; part < 3 * H; ++part) {  // row padding stays NaN
        const double amp = rng.uniform(0.2, 3.0);  // RMS varies from head to head
        for (int d = 0; d < D; ++d) qkv[bl * row_stride + part * D + d] = make<T>(amp * rng.normal());
      }
    for (int d = 0; d < D; ++d) {
      qw[d] = make<T>(1.0 + 0.3 * rng.normal());
      kw[d] = make<T>(1.0 + 0.3 * rng.normal());
    }
  }
};

// `La` rows of a first stream and, when `Lb` > 0, `Lb` rows of a second one (Flux's text and
// image streams of a double block) into one (3, B, La + Lb, H, D) output.
template <class T>
void test_qk_norm_rope(QkFn<T> fn, int D, int row_pad, int pos_offset, int La, int Lb,
                       double bound, Rng &rng) {
  constexpr int B = 2, H = 3;
  const int L = La + Lb;
  const long long HD = 1LL * H * D;
  const int half = D / 2, P = pos_offset + L;
  const float eps = 1e-6f;
  QkStream<T> sa(B, La, HD, row_pad, D, rng), sb(B, Lb, HD, row_pad + 8, D, rng);
  Buf<T> out(3 * B * L * HD);
  Buf<float> cos_t(1LL * P * half), sin_t(1LL * P * half);  // rows before pos_offset stay NaN
  for (int p = pos_offset; p < P; ++p)
    for (int i = 0; i < half; ++i) {
      const double angle = rng.uniform(-3.141592653589793, 3.141592653589793);
      cos_t[1LL * p * half + i] = static_cast<float>(std::cos(angle));
      sin_t[1LL * p * half + i] = static_cast<float>(std::sin(angle));
    }
  tt_emu_launch(dim3((B * L * H + 7) / 8), dim3(256), [&] {
    fn(sa.qkv.data(), sa.row_stride, Lb > 0 ? sb.qkv.data() : nullptr, sb.row_stride, La,
       out.data(), sa.qw.data(), sa.kw.data(), Lb > 0 ? sb.qw.data() : nullptr,
       Lb > 0 ? sb.kw.data() : nullptr, cos_t.data(), sin_t.data(), pos_offset, B, L, H, D, eps);
  });

  ErrTracker et;
  bool v_exact = true;
  const long long plane = B * L * HD;
  std::vector<double> a(D);
  for (int b = 0; b < B; ++b)
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < H; ++h) {
        QkStream<T> &st = l < La ? sa : sb;
        const int r = l < La ? l : l - La;
        const T *src = st.qkv.data() + (1LL * b * st.rows + r) * st.row_stride + h * D;
        const long long dst = (1LL * b * L + l) * HD + h * D;
        for (int which = 0; which < 2; ++which) {
          const T *x = src + which * HD;
          const T *w = which == 0 ? st.qw.data() : st.kw.data();
          double ss = 0.0;
          for (int d = 0; d < D; ++d) ss += val(x[d]) * val(x[d]);
          const double rstd = 1.0 / std::sqrt(ss / D + static_cast<double>(eps));
          for (int d = 0; d < D; ++d) a[d] = rnd<T>(rnd<T>(val(x[d]) * rstd) * val(w[d]));
          for (int p = 0; p < half; ++p) {
            const double cs = cos_t[1LL * (pos_offset + l) * half + p];
            const double sn = sin_t[1LL * (pos_offset + l) * half + p];
            const T *o = out.data() + which * plane + dst + 2 * p;
            et.add(o[0], a[2 * p] * cs - a[2 * p + 1] * sn);
            et.add(o[1], a[2 * p] * sn + a[2 * p + 1] * cs);
          }
        }
        if (memcmp(out.data() + 2 * plane + dst, src + 2 * HD, D * sizeof(T)) != 0) v_exact = false;
      }
  report(fmt("qk_norm_rope %s B=%d L=%d+%d H=%d D=%d row_stride=%lld pos_offset=%d", tname<T>(), B,
             La, Lb, H, D, sa.row_stride, pos_offset),
         v_exact ? et.rel() : INFINITY, bound,
         et.note(kMinSameQk) + (v_exact ? ", v copied exactly" : ", v copy WRONG"),
         et.same_ok(kMinSameQk));
}

template <class T> void qk_norm_rope_suite(QkFn<T> fn, double bound, Rng &rng) {
  for (int D : {16, 72, 128})
    for (int pad : {0, 24})
      for (int pos_offset : {0, 2}) test_qk_norm_rope<T>(fn, D, pad, pos_offset, 5, 0, bound, rng);
  // Two streams (text then image rows), each with its own weights and row stride.
  for (int D : {16, 128}) {
    test_qk_norm_rope<T>(fn, D, 0, 0, 3, 4, bound, rng);
    test_qk_norm_rope<T>(fn, D, 24, 1, 1, 6, bound, rng);
  }
}

// ---------------------------------------------------------------------------------------------
// GELU (tanh) and GEGLU.

template <class T> using GeluFn = void (*)(const T *, T *, long long);
template <class T> using GegluFn = void (*)(const T *, T *, long long, int);

template <class T> void test_gelu(GeluFn<T> fn, long long n, double bound, Rng &rng) {
  Buf<T> x(n), y(n);
  for (long long i = 0; i < n; ++i) x[i] = make<T>(rng.uniform(-6.0, 6.0));
  const dim3 grid(2), block(128);  // 256 threads: most of them loop over several elements
  tt_emu_launch(grid, block, [&] { fn(x.data(), y.data(), n); });
  ErrTracker et;
  for (long long i = 0; i < n; ++i) {
    const double a = val(x[i]);
    et.add(y[i], 0.5 * a * (1.0 + std::tanh(0.7978845608028654 * (a + 0.044715 * a * a * a))));
  }
  // Relative to max(max|ref|, 1): for inputs below about -3, 1 + tanh(u) cancels in float (as
  // in PyTorch's and candle's kernels, which compute the same formula), so a case whose only
  // outputs are such tiny values would otherwise measure that cancellation against itself.
  const double err = et.max_err / std::max(et.max_ref, 1.0);
  report(fmt("gelu_tanh %s n=%lld grid=%u block=%u", tname<T>(), n, grid.x, block.x), err, bound,
         et.note());
}

template <class T>
void test_geglu(GegluFn<T> fn, long long rows, int inner, double bound, Rng &rng) {
  Buf<T> x(rows * 2 * inner), y(rows * inner);
  for (long long i = 0; i < rows * 2 * inner; ++i) x[i] = make<T>(2.0 * rng.normal());
  const dim3 grid(1), block(64);
  tt_emu_launch(grid, block, [&] { fn(x.data(), y.data(), rows, inner); });
  ErrTracker et;
  for (long long r = 0; r < rows; ++r)
    for (int c = 0; c < inner; ++c) {
      const double a = val(x[r * 2 * inner + c]);
      const double g = val(x[r * 2 * inner + inner + c]);
      const double ge = 0.5 * g * (1.0 + std::erf(g / std::sqrt(2.0)));
      et.add(y[r * inner + c], a * rnd<T>(ge));
    }
  report(fmt("geglu %s rows=%lld inner=%d grid=%u block=%u", tname<T>(), rows, inner, grid.x,
             block.x),
         et.rel(), bound, et.note(kMinSameGeglu), et.same_ok(kMinSameGeglu));
}

template <class T>
void gelu_suite(GeluFn<T> gelu, GegluFn<T> geglu, double gelu_bound, double geglu_bound, Rng &rng) {
  for (long long n : {1LL, 1000LL, 4099LL}) test_gelu<T>(gelu, n, gelu_bound, rng);
  test_geglu<T>(geglu, 3, 37, geglu_bound, rng);
  test_geglu<T>(geglu, 2, 300, geglu_bound, rng);
}

// ---------------------------------------------------------------------------------------------
// Gated residual.

template <class T>
using GrFn = void (*)(const T *, const T *, long long, const T *, T *, long long, int, long long);

// x, y (batch·len, cols) and a gate row per batch row at a padded stride (the padding NaN: it must
// not be read); the reference rounds once, as the kernel does.
template <class T>
void test_gated_residual(GrFn<T> fn, int batch, int len, int cols, double bound, Rng &rng) {
  const long long rows = 1LL * batch * len, gstride = cols + 24;
  Buf<T> x(rows * cols), y(rows * cols), out(rows * cols), gate(batch * gstride);
  for (long long i = 0; i < rows * cols; ++i) {
    x[i] = make<T>(rng.normal());
    y[i] = make<T>(3.0 * rng.normal());
  }
  for (int b = 0; b < batch; ++b)
    for (int c = 0; c < cols; ++c) gate[b * gstride + c] = make<T>(rng.normal());
  const dim3 grid(3), block(64);  // fewer threads than packs: the grid-stride loop runs
  tt_emu_launch(grid, block, [&] {
    fn(x.data(), gate.data(), gstride, y.data(), out.data(), rows, cols, len);
  });
  ErrTracker et;
  for (long long r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const long long i = r * cols + c;
      et.add(out[i], val(x[i]) + val(gate[(r / len) * gstride + c]) * val(y[i]));
    }
  report(fmt("gated_residual %s batch=%d len=%d cols=%d", tname<T>(), batch, len, cols), et.rel(),
         bound, et.note(kMinSameGeglu), et.same_ok(kMinSameGeglu));
}

template <class T> void gated_residual_suite(GrFn<T> fn, double bound, Rng &rng) {
  test_gated_residual<T>(fn, 1, 1, 16, bound, rng);
  test_gated_residual<T>(fn, 2, 37, 72, bound, rng);
  test_gated_residual<T>(fn, 3, 50, 3072, bound, rng);
}

// ---------------------------------------------------------------------------------------------
// Group norm (+ SiLU).

template <class T>
using GnStatsFn = void (*)(const T *, float *, int, int, int, int, int);
template <class T>
using GnFn = void (*)(const T *, T *, const T *, const T *, const float *, int, int, int, int,
                      float, int, int);

// The two group-norm kernels over `chunks` blocks per group (the last one shorter where they do
// not divide), with 16-byte packs where `vec`, as src/ops/cuda.rs launches them.
template <class T>
void test_group_norm(GnStatsFn<T> stats, GnFn<T> fn, int channels, int groups, int hw, bool affine,
                     bool silu, int chunks, bool vec, double bound, Rng &rng,
                     double offset = 1.5) {
  constexpr int batch = 2;
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const float eps = 1e-5f;
  const int per_group = channels / groups;
  const long long m = 1LL * per_group * hw;
  long long chunk = (m + chunks - 1) / chunks;
  if (vec) chunk = (chunk + V - 1) / V * V;
  const int grid_x = static_cast<int>((m + chunk - 1) / chunk);
  const long long n = 1LL * batch * channels * hw;
  Buf<T> x(n), y(n), w(channels), b(channels);
  Buf<float> partial(3LL * batch * groups * grid_x);
  for (long long i = 0; i < n; ++i) x[i] = make<T>(offset + 2.0 * rng.normal());
  for (int c = 0; c < channels; ++c) {
    w[c] = make<T>(1.0 + 0.5 * rng.normal());
    b[c] = make<T>(0.5 * rng.normal());
  }
  const dim3 grid(grid_x, groups, batch);
  tt_emu_launch(grid, dim3(256), [&] {
    stats(x.data(), partial.data(), channels, hw, groups, static_cast<int>(chunk), vec ? 1 : 0);
  });
  tt_emu_launch(grid, dim3(256), [&] {
    fn(x.data(), y.data(), affine ? w.data() : nullptr, affine ? b.data() : nullptr,
       partial.data(), channels, hw, groups, static_cast<int>(chunk), eps, silu ? 1 : 0,
       vec ? 1 : 0);
  });
  ErrTracker et;
  for (int s = 0; s < batch; ++s)
    for (int g = 0; g < groups; ++g) {
      const long long base = (1LL * s * channels + 1LL * g * per_group) * hw;
      double mean = 0.0, var = 0.0;
      for (long long i = 0; i < m; ++i) mean += val(x[base + i]);
      mean /= m;
      for (long long i = 0; i < m; ++i) var += (val(x[base + i]) - mean) * (val(x[base + i]) - mean);
      var /= m;
      const double rstd = 1.0 / std::sqrt(var + static_cast<double>(eps));
      for (long long i = 0; i < m; ++i) {
        const int c = g * per_group + static_cast<int>(i / hw);
        double v = (val(x[base + i]) - mean) * rstd;
        if (affine) v = v * val(w[c]) + val(b[c]);
        if (silu) v = v / (1.0 + std::exp(-v));
        et.add(y[base + i], v);
      }
    }
  report(fmt("group_norm %s C=%d groups=%d hw=%d%s%s chunks=%d%s", tname<T>(), channels, groups,
             hw, affine ? " affine" : "", silu ? " silu" : "", grid_x, vec ? " vec" : ""),
         et.rel(), bound, et.note(kMinSameLn), et.same_ok(kMinSameLn));
}

template <class T>
void group_norm_suite(GnStatsFn<T> stats, GnFn<T> fn, double bound, Rng &rng) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  for (int hw : {1, 37, 300})
    for (int mode = 0; mode < 4; ++mode)
      test_group_norm<T>(stats, fn, 12, 3, hw, mode & 1, mode & 2, 1 + mode, false, bound, rng);
  // Packed loads: hw a multiple of the pack, one and several chunks (the last one shorter).
  for (int chunks : {1, 3, 7})
    test_group_norm<T>(stats, fn, 12, 3, 8 * V, true, chunks & 1, chunks, true, bound, rng);
  test_group_norm<T>(stats, fn, 64, 32, 64, true, true, 2, true, bound, rng);
  // Groups whose mean is ten standard deviations from zero, over 13 merged chunks.
  test_group_norm<T>(stats, fn, 8, 2, 1024, true, false, 13, true, bound, rng, 20.0);
}

}  // namespace

// The sections, each run when `argv[1]` (a comma-separated list; all when absent) names it:
// tests/unit/cuda_emulated.rs runs them as separate tests, side by side.
bool wanted(int argc, char **argv, const char *name) {
  if (argc < 2) return true;
  std::string list = std::string(",") + argv[1] + ",";
  return list.find(std::string(",") + name + ",") != std::string::npos;
}

int main(int argc, char **argv) {
  const auto t_start = std::chrono::steady_clock::now();
  // Each section draws from its own generator, so a section's inputs do not depend on which
  // other sections run.
  auto section = [&](const char *name, auto &&run) {
    if (!wanted(argc, argv, name)) return;
    const auto t = std::chrono::steady_clock::now();
    printf("== %s\n", name);
    Rng rng(20240611);
    run(rng);
    printf("   (%s: %.2f s)\n", name, seconds_since(t));
  };
  if (const char *p = getenv("TT_EMU_POLICY")) {  // pin one scheduling order (0-3) for debugging
    tt_emu::g.fixed_policy = atoi(p);
    printf("scheduling policy pinned to %d\n", tt_emu::g.fixed_policy);
  }

  section("conversions", [&](Rng &) { test_conversions(); });
  section("attention-bf16-small", [&](Rng &rng) { ATTENTION_SUITES_SMALL(bf16, tt_bf16, 8e-3) });
  section("attention-bf16-large", [&](Rng &rng) { ATTENTION_SUITES_LARGE(bf16, tt_bf16, 8e-3) });
  section("attention-f16-small", [&](Rng &rng) { ATTENTION_SUITES_SMALL(f16, tt_f16, 1.5e-3) });
  section("attention-f16-large", [&](Rng &rng) { ATTENTION_SUITES_LARGE(f16, tt_f16, 1.5e-3) });
  section("norms", [&](Rng &rng) {
    layer_norm_suite<float>(tt_layer_norm_mod_f32, 6e-7, rng);
    layer_norm_suite<tt_bf16>(tt_layer_norm_mod_bf16, 5e-3, rng);
    layer_norm_suite<tt_f16>(tt_layer_norm_mod_f16, 6e-4, rng);
    qk_norm_rope_suite<float>(tt_qk_norm_rope_f32, 6e-7, rng);
    qk_norm_rope_suite<tt_bf16>(tt_qk_norm_rope_bf16, 5e-3, rng);
    qk_norm_rope_suite<tt_f16>(tt_qk_norm_rope_f16, 6e-4, rng);
    group_norm_suite<float>(tt_group_stats_f32, tt_group_norm_f32, 6e-7, rng);
    group_norm_suite<tt_bf16>(tt_group_stats_bf16, tt_group_norm_bf16, 5e-3, rng);
    group_norm_suite<tt_f16>(tt_group_stats_f16, tt_group_norm_f16, 6e-4, rng);
    gated_residual_suite<float>(tt_gated_residual_f32, 3e-7, rng);
    gated_residual_suite<tt_bf16>(tt_gated_residual_bf16, 5e-3, rng);
    gated_residual_suite<tt_f16>(tt_gated_residual_f16, 6e-4, rng);
    gelu_suite<float>(tt_gelu_tanh_f32, tt_geglu_f32, 3e-7, 3e-7, rng);
    gelu_suite<tt_bf16>(tt_gelu_tanh_bf16, tt_geglu_bf16, 5e-3, 5e-3, rng);
    gelu_suite<tt_f16>(tt_gelu_tanh_f16, tt_geglu_f16, 6e-4, 6e-4, rng);
  });

  const tt_emu::State &s = tt_emu::g;
  printf("%d cases, %d failed, %.2f s; emulated %llu blocks, %llu warp barriers, %llu block "
         "barriers, %llu thread switches\n",
         g_cases, g_failed, seconds_since(t_start), s.blocks, s.warp_barriers, s.block_barriers,
         s.switches);
  if (g_cases == 0) {
    printf("FAIL no section named %s\n", argc > 1 ? argv[1] : "");
    return 1;
  }
  return g_failed == 0 ? 0 : 1;
}
