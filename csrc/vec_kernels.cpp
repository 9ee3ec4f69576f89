// Inner loops for the native NTHR ops, written with GCC/Clang vector extensions: 8-lane float vectors
// that the compiler lowers to one AVX2 (or AVX-512VL) register or two SSE registers. On x86-64 every function also
// gets AVX-512 / AVX2 / baseline clones picked at load time (target_clones), so one build runs on any
// x86-64 CPU. The lane layout, the order of every reduction and every fused multiply-add are fixed by the
// source, not by the ISA: the build disables the compiler's own contraction (-ffp-contract=off, which would
// fuse a * b + c only in the clones whose ISA has FMA), and fmadd() below fuses explicitly in every clone
// (one vfmadd where the ISA has it, libm's correctly rounded fmaf in the baseline clone). So the same
// inputs give the same bits on every machine.
// exp() is a Cody-Waite reduction plus a degree-7 Taylor polynomial on |r| <= ln2/2 (relative error
// ~2 ulp); inputs below -87 give ~1e-38 instead of a denormal/zero, which is 0 at the float32 precision
// of every quantity that uses it (probabilities and sums of exponentials of max-shifted values).
#include "vec_kernels.h"

#include <cmath>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(NTHR_NO_CLONES)
#define NTHR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NTHR_CLONES
#endif

namespace nthr {
namespace vec {
namespace {

#define NTHR_INLINE inline __attribute__((always_inline))

// 8 lanes, not 16: GCC lowered the 16-lane compares, selects and per-lane fmaf loops of exp partly to scalar
// code with a branch per lane in the AVX2 clone (two 8-lane registers per vector). Measured on a Zen 3 core,
// 2^20 values: neg_softmax_slice 2.2 to 2.7 ns per value at 16 lanes, 0.64 at 8; lse_update 3.7 to 4.5 and
// 0.75; dot 0.4 to 0.6 and 0.17. The AVX-512 clone runs 256-bit vectors now (not measured there).
constexpr int kLanes = 8;
typedef float fvec __attribute__((vector_size(4 * kLanes)));
typedef uint32_t uvec __attribute__((vector_size(4 * kLanes)));
typedef double dvec __attribute__((vector_size(8 * kLanes)));

NTHR_INLINE fvec load(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
NTHR_INLINE void store(float* p, fvec v) { std::memcpy(p, &v, sizeof(v)); }
NTHR_INLINE fvec splat(float x) { return fvec{} + x; }

// a * b + c rounded once (see the top of this file), float32 (the float64 sums below need none: the product
// of two floats is exact in float64).
NTHR_INLINE float fmadd(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
NTHR_INLINE fvec fmadd(fvec a, fvec b, fvec c) {
  fvec r;
  for (int l = 0; l < kLanes; ++l) r[l] = fmadd(a[l], b[l], c[l]);
  return r;
}

constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;

// The exponent's bits in unsigned arithmetic (U: uint32_t lanes): the clamp keeps n + 127 in [1, 254] for every
// number, but lets NaN through (NaN in, NaN out), whose bits made a signed n + 127 overflow in the shift
// (undefined behaviour). Unsigned wraps: the same bits for every number, and p * scale is NaN for a NaN.
template <typename F, typename U>
NTHR_INLINE F exp_body(F v, F lo, F hi, F shifter, U shifter_bits) {
  v = v < lo ? lo : v;
  v = v > hi ? hi : v;
  F t = fmadd(v, kLog2e + F{}, shifter);
  U n;
  std::memcpy(&n, &t, sizeof(n));
  n = n - shifter_bits;
  F fn = t - shifter;
  F r = fmadd(fn, -kLn2Lo + F{}, fmadd(fn, -kLn2Hi + F{}, v));
  F p = fmadd(r, (1.0f / 5040.0f) + F{}, (1.0f / 720.0f) + F{});
  p = fmadd(p, r, (1.0f / 120.0f) + F{});
  p = fmadd(p, r, (1.0f / 24.0f) + F{});
  p = fmadd(p, r, (1.0f / 6.0f) + F{});
  p = fmadd(p, r, 0.5f + F{});
  p = fmadd(p, r, 1.0f + F{});
  p = fmadd(p, r, 1.0f + F{});
  U bits = (n + 127u) << 23;
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

NTHR_INLINE fvec vexp(fvec v) {
  uvec sb = uvec{} + __builtin_bit_cast(uint32_t, kShifter);
  return exp_body<fvec, uvec>(v, splat(-87.0f), splat(88.0f), splat(kShifter), sb);
}

NTHR_INLINE float sexp(float v) {
  return exp_body<float, uint32_t>(v, -87.0f, 88.0f, kShifter, __builtin_bit_cast(uint32_t, kShifter));
}

NTHR_INLINE float hmax(fvec v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// Horizontal sums in a fixed pairwise order: lane l += lane l + w for w = kLanes/2, ..., 1 (halves of the
// vector added in registers; the same bits as that loop over an array, without the store and reloads).
template <typename V>
NTHR_INLINE auto hsum_lanes(V v) {
  auto v4 = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  auto v2 = __builtin_shufflevector(v4, v4, 0, 1) + __builtin_shufflevector(v4, v4, 2, 3);
  return v2[0] + v2[1];
}
static_assert(kLanes == 8, "hsum_lanes halves 8 lanes");

NTHR_INLINE float hsum(fvec v) { return hsum_lanes(v); }

NTHR_INLINE dvec widen(fvec v) { return __builtin_convertvector(v, dvec); }

NTHR_INLINE double hsum(dvec v) { return hsum_lanes(v); }

// The dot products keep kChains independent accumulators (vector i goes to chain i % kChains, the chains
// are added in a fixed order at the end): one accumulator left each step waiting for the previous add.
constexpr int kChains = 4;

// acc = step(acc, j) over the vector offsets j = 0, kLanes, ... with j + kLanes <= n, in kChains chains
// (step adds one vector's terms, e.g. with an fmadd); *tail = the first index not covered (the caller adds
// the scalar remainder).
template <typename V, typename Step>
NTHR_INLINE V chained_sum(int64_t n, int64_t* tail, Step step) {
  static_assert(kChains == 4, "the final add below names four chains");
  V acc[kChains] = {};
  int64_t i = 0;
  for (; i + kChains * kLanes <= n; i += kChains * kLanes) {
#pragma GCC unroll 4  // unrolled, the chains stay in registers
    for (int c = 0; c < kChains; ++c) acc[c] = step(acc[c], i + c * kLanes);
  }
  for (int c = 0; i + kLanes <= n; i += kLanes, ++c) acc[c] = step(acc[c], i);
  *tail = i;
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

}  // namespace

NTHR_CLONES
void lse_update(const float* x, int64_t n, float temperature, float* run_max, float* run_sum) {
  if (n <= 0) return;
  // x / T as x * (1 / T) (within 1 ulp of the division; exact for T = 1, the usual case), the product
  // rounded before the shift is subtracted (never one FMA): neg_softmax_slice and lz_from_row (advantages.cpp)
  // round it the same way, so a certain token's exp(x / T - log Z) is exactly 1
  const float inv = 1.0f / temperature;
  const fvec iv = splat(inv);
  fvec vm = splat(-INFINITY);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    fvec v = load(x + i);
    vm = v > vm ? v : vm;
  }
  float m = hmax(vm);
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  m *= inv;  // max(x) / T = max(x / T) for T > 0
  const float new_max = m > *run_max ? m : *run_max;
  if (new_max == -INFINITY) return;  // every value -inf so far: nothing to add
  const fvec nm = splat(new_max);
  fvec vs = fvec{};
  i = 0;
  for (; i + kLanes <= n; i += kLanes) vs += vexp(load(x + i) * iv - nm);
  float s = hsum(vs);
  for (; i < n; ++i) s += sexp(x[i] * inv - new_max);
  const float old = *run_sum == 0.0f ? 0.0f : *run_sum * sexp(*run_max - new_max);
  *run_sum = old + s;
  *run_max = new_max;
}

NTHR_CLONES
void lse_update_cols(const float* z, int64_t rows, int64_t cols, int64_t ld, float temperature, float* run_max,
                     float* run_sum) {
  const float inv = 1.0f / temperature;
  const fvec iv = splat(inv), ninf = splat(-INFINITY), zero = fvec{};
  int64_t c = 0;
  for (; c + kLanes <= cols; c += kLanes) {
    fvec vm = ninf;
    for (int64_t r = 0; r < rows; ++r) {
      const fvec v = load(z + r * ld + c);
      vm = v > vm ? v : vm;
    }
    vm *= iv;  // max(x) / T = max(x / T) for T > 0
    const fvec old_max = load(run_max + c), old_sum = load(run_sum + c);
    const fvec nm = vm > old_max ? vm : old_max;
    const fvec live = nm == ninf ? zero : splat(1.0f);  // lanes whose values are all -inf so far: unchanged
    const fvec shift = nm == ninf ? zero : nm;
    fvec vs = fvec{};
    for (int64_t r = 0; r < rows; ++r) vs += vexp(load(z + r * ld + c) * iv - shift);  // as lse_update
    const fvec old = old_sum == zero ? zero : old_sum * vexp(old_max - shift);
    store(run_sum + c, live == zero ? old_sum : old + vs);
    store(run_max + c, nm);
  }
  for (; c < cols; ++c) {
    float m = -INFINITY;
    for (int64_t r = 0; r < rows; ++r) m = z[r * ld + c] > m ? z[r * ld + c] : m;
    m *= inv;
    const float new_max = m > run_max[c] ? m : run_max[c];
    if (new_max == -INFINITY) continue;
    float s = 0.0f;
    for (int64_t r = 0; r < rows; ++r) s += sexp(z[r * ld + c] * inv - new_max);
    const float old = run_sum[c] == 0.0f ? 0.0f : run_sum[c] * sexp(run_max[c] - new_max);
    run_sum[c] = old + s;
    run_max[c] = new_max;
  }
}

NTHR_CLONES
void neg_softmax_slice(float* e, int64_t n, float temperature, float log_z) {
  const float inv = 1.0f / temperature;
  const fvec iv = splat(inv), lz = splat(log_z);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(e + i, -vexp(load(e + i) * iv - lz));  // product rounded: lse_update
  for (; i < n; ++i) e[i] = -sexp(e[i] * inv - log_z);
}

static NTHR_INLINE float dot_body(const float* a, const float* b, int64_t n) {
  int64_t i;
  float s = hsum(chained_sum<fvec>(n, &i, [&](fvec acc, int64_t j) { return fmadd(load(a + j), load(b + j), acc); }));
  for (; i < n; ++i) s = fmadd(a[i], b[i], s);
  return s;
}

NTHR_CLONES
float dot(const float* a, const float* b, int64_t n) { return dot_body(a, b, n); }

NTHR_CLONES
void dot_rows(const float* a, const float* b, int64_t rows, int64_t d, float* out) {
  for (int64_t r = 0; r < rows; ++r) out[r] += dot_body(a + r * d, b + r * d, d);
}

NTHR_CLONES
double dot_f64(const float* a, const float* b, int64_t n) {
  int64_t i;
  // a float times a float is exact in float64: the unfused add rounds once, as a fused one would
  double s = hsum(chained_sum<dvec>(n, &i, [&](dvec acc, int64_t j) { return acc + widen(load(a + j)) * widen(load(b + j)); }));
  for (; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

NTHR_CLONES
double dot_others_f64(const float* m, const float* x, int64_t n) {
  int64_t i;
  double s = hsum(chained_sum<dvec>(n, &i, [&](dvec acc, int64_t j) {
    const dvec xv = widen(load(x + j));
    return acc + (widen(load(m + j)) - xv) * xv;  // unfused: the same in every clone (no contraction)
  }));
  for (; i < n; ++i) s += (static_cast<double>(m[i]) - x[i]) * x[i];
  return s;
}

NTHR_CLONES
void colsum_product(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows, int64_t cols, float* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* ai = a + i * lda;
    const float* bi = b + i * ldb;
    for (int64_t j = 0; j < cols; ++j) out[j] = fmadd(ai[j], bi[j], out[j]);
  }
}

}  // namespace vec
}  // namespace nthr
