// sgemm for the native ops: C = A B or C += A B on float32 matrices of any strides, on one thread, in a
// fixed summation order. On CPUs with AVX-512 a kernel of its own (below); elsewhere, or with the environment
// variable NTHR_NATIVE_GEMM=aten, ATen's mm (BLAS).
//
// Why its own kernel: the BLAS torch ships (MKL) takes its AVX2 path on AMD CPUs, so on an AVX-512 Zen CPU it
// reaches about half of the float32 FMA peak (measured on the 2-core Zen 5 dev box, one thread: MKL ~108
// GFLOP/s, this kernel ~210, the FMA peak of a register-only loop ~262). Layout (Goto/BLIS): a K block of
// B (kKc x kNc) is packed into column panels of kNr = 32 columns (two 16-lane registers); a kMr = 12 row
// panel of A is read in place when its rows or its columns are contiguous (each value broadcast straight
// from memory), else packed; 24 registers hold a 12 x 32 block of C over the K block.
// Bits: C[i, j] = C (or 0) + the K blocks in order, each summed k = 0, 1, ... by fused multiply-adds in one
// register lane; no dependence on the other dimensions' blocking, the thread count or the machine (every
// AVX-512 CPU gives the same bits; another CPU uses ATen's BLAS and its own order).
#include "gemm.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define NTHR_HAVE_AVX512_KERNEL 1
#else
#define NTHR_HAVE_AVX512_KERNEL 0
#endif

namespace nthr {
namespace {

#if NTHR_HAVE_AVX512_KERNEL
constexpr int64_t kMr = kGemmRowBlock, kNr = 32;  // register block of C
constexpr int64_t kKc = 256;           // K block: one A panel (12 KiB) in L1, the B block in L2
constexpr int64_t kNc = 512;           // columns of B per packed block (512 KiB at kKc)

// 64-byte aligned per-thread packing buffers: one A panel (kMr kKc floats) and one B block (kNc kKc): 524 KiB.
struct PackBuffers {
  float* a = nullptr;
  float* b = nullptr;
  PackBuffers() {
    a = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * kMr * kKc));
    b = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * kNc * kKc));
    TORCH_CHECK(a && b, "nthr gemm: out of memory for the packing buffers");
  }
  ~PackBuffers() {
    std::free(a);
    std::free(b);
  }
};

// Lanes of the q-th 16-lane vector that hold one of a row's first n values.
inline __mmask16 lane_mask(int64_t n, int q) {
  const int64_t k = std::max<int64_t>(0, std::min<int64_t>(16, n - 16 * q));
  return static_cast<__mmask16>(k >= 16 ? 0xFFFFu : (1u << k) - 1u);
}

// The A panel A[0 .. mr, 0 .. kc] as ap[k][i] (kMr values per k; zero rows past mr).
void pack_a(const float* a, int64_t ars, int64_t acs, int64_t mr, int64_t kc, float* ap) {
  for (int64_t k = 0; k < kc; ++k) {
    for (int64_t i = 0; i < mr; ++i) ap[k * kMr + i] = a[i * ars + k * acs];
    for (int64_t i = mr; i < kMr; ++i) ap[k * kMr + i] = 0.0f;
  }
}

// In-register transpose of 16 rows of 16 floats: on return r[c] holds column c (rows 0..15 in order).
__attribute__((target("avx512f"))) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved per 128-bit lane
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + m], lane l: column 4l + m of rows 4i .. 4i + 3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  __m512 o[16];
  for (int m = 0; m < 4; ++m) {  // column 4l + m: lane l of r[m], r[4 + m], r[8 + m], r[12 + m]
    const __m512 a = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88), b = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88), d = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
    o[m] = _mm512_shuffle_f32x4(a, c, 0x88);
    o[8 + m] = _mm512_shuffle_f32x4(a, c, 0xDD);
    o[4 + m] = _mm512_shuffle_f32x4(b, d, 0x88);
    o[12 + m] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = o[i];
}

// B[0 .. kc, 0 .. nc] into column panels of kNr: bp[q][k][j] (zero columns past nc). Rows of B contiguous
// (bcs = 1): two masked vector copies per k; columns contiguous (brs = 1, e.g. B = W^T of a row-major W):
// 16 x 16 blocks loaded along the columns and transposed in registers; other strides: element by element.
__attribute__((target("avx512f"))) void pack_b(const float* b, int64_t brs, int64_t bcs, int64_t kc, int64_t nc,
                                                float* bp) {
  for (int64_t j0 = 0; j0 < nc; j0 += kNr, bp += kNr * kc) {
    const int64_t nr = std::min(kNr, nc - j0);
    if (bcs == 1) {
      const __mmask16 m0 = lane_mask(nr, 0), m1 = lane_mask(nr, 1);
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = b + k * brs + j0;
        _mm512_store_ps(bp + k * kNr, _mm512_maskz_loadu_ps(m0, src));
        _mm512_store_ps(bp + k * kNr + 16, _mm512_maskz_loadu_ps(m1, src + 16));
      }
    } else if (brs == 1) {
      for (int64_t h = 0; h < kNr; h += 16) {
        const int64_t nh = std::max<int64_t>(0, std::min<int64_t>(16, nr - h));  // valid columns of this half
        for (int64_t k0 = 0; k0 < kc; k0 += 16) {
          const int64_t kn = std::min<int64_t>(16, kc - k0);
          const __mmask16 km = lane_mask(kn, 0);
          __m512 r[16];
          for (int64_t j = 0; j < 16; ++j)
            r[j] = j < nh ? _mm512_maskz_loadu_ps(km, b + (j0 + h + j) * bcs + k0) : _mm512_setzero_ps();
          transpose16(r);
          for (int64_t k = 0; k < kn; ++k) _mm512_store_ps(bp + (k0 + k) * kNr + h, r[k]);
        }
      }
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t j = 0; j < kNr; ++j) bp[k * kNr + j] = j < nr ? b[k * brs + (j0 + j) * bcs] : 0.0f;
    }
  }
}

// C[0 .. mr, 0 .. nr] (row stride ldc) = (add ? C : 0) + sum_k A[i, k] B[k, j] over k < kc, B[k, j] = b[k * kNr + j]
// (a packed panel, zero past nr), with
// A[i, k] = a[i * ars + k] (kRows: A's rows are contiguous) or a[k * acs + i] (its columns are; a packed panel is
// this case with acs = kMr). Every A value is broadcast straight from memory: row-major and column-major A need
// no packing (the kMr rows of a panel stay in L1 across the column panels of B).
template <bool kRows>
__attribute__((target("avx512f"), aligned(64))) void kernel(int64_t kc, const float* a, int64_t ars, int64_t acs, const float* b,
                                                float* c, int64_t ldc, bool add, int64_t mr, int64_t nr) {
  __m512 acc[kMr][2];
  for (int i = 0; i < kMr; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, b += kNr) {
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
    const float* ak = kRows ? a + k : a + k * acs;
#pragma GCC unroll 12
    for (int i = 0; i < kMr; ++i) {
      const __m512 av = _mm512_set1_ps(kRows ? ak[i * ars] : ak[i]);
      acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
    }
  }
  const __mmask16 m0 = lane_mask(nr, 0), m1 = lane_mask(nr, 1);
  for (int i = 0; i < kMr; ++i) {
    if (i >= mr) break;
    float* row = c + i * ldc;
    __m512 v0 = acc[i][0], v1 = acc[i][1];
    if (add) {
      v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, row), v0);
      v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, row + 16), v1);
    }
    _mm512_mask_storeu_ps(row, m0, v0);
    _mm512_mask_storeu_ps(row + 16, m1, v1);
  }
}

// The packed kernel where the CPU has AVX-512, unless NTHR_NATIVE_GEMM=aten asks for ATen's mm (read once;
// any other value than "auto" or "aten" is refused).
bool use_kernel() {
  static const bool yes = [] {
    const char* env = std::getenv("NTHR_NATIVE_GEMM");
    const std::string want = env ? env : "auto";
    TORCH_CHECK(want == "auto" || want == "aten", "NTHR_NATIVE_GEMM: expected 'auto' or 'aten', got '", want, "'");
    return want == "auto" && __builtin_cpu_supports("avx512f");
  }();
  return yes;
}

// `done` after each row panel of the last column and K block (the rows' last writes).
void packed_sgemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b,
                  int64_t brs, int64_t bcs, float* c, int64_t ldc, bool accumulate, const RowsDone& done,
                  bool prefetch_a) {
  thread_local PackBuffers buf;
  const bool rows = acs == 1, cols = !rows && ars == 1;  // else every A panel is packed
  for (int64_t j0 = 0; j0 < N; j0 += kNc) {
    const int64_t nc = std::min(kNc, N - j0);
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min(kKc, K - k0);
      const bool add = accumulate || k0 > 0, last = j0 + kNc >= N && k0 + kKc >= K;
      const float* bk = b + k0 * brs + j0 * bcs;
      pack_b(bk, brs, bcs, kc, nc, buf.b);
      auto panel = [&](int64_t jr) { return buf.b + jr * kc; };
      for (int64_t i0 = 0; i0 < M; i0 += kMr) {
        const int64_t mr = std::min(kMr, M - i0);
        const float* ap = a + i0 * ars + k0 * acs;
        float* ci = c + i0 * ldc + j0;
        if (prefetch_a && rows && i0 + 2 * kMr <= M)  // the next panel's rows into L2 while this one runs
          for (int64_t i = kMr; i < 2 * kMr; ++i)
            for (int64_t k = 0; k < kc; k += kFloatsPerLine)
              _mm_prefetch(reinterpret_cast<const char*>(ap + i * ars + k), _MM_HINT_T1);
        if (mr == kMr && (rows || cols)) {
          for (int64_t jr = 0; jr < nc; jr += kNr)
            if (rows) kernel<true>(kc, ap, ars, 1, panel(jr), ci + jr, ldc, add, kMr, std::min(kNr, nc - jr));
            else kernel<false>(kc, ap, 1, acs, panel(jr), ci + jr, ldc, add, kMr, std::min(kNr, nc - jr));
        } else {  // a last panel of fewer rows, or A of other strides: packed, zero rows past mr
          pack_a(ap, ars, acs, mr, kc, buf.a);
          for (int64_t jr = 0; jr < nc; jr += kNr)
            kernel<false>(kc, buf.a, 1, kMr, panel(jr), ci + jr, ldc, add, mr, std::min(kNr, nc - jr));
        }
        if (last && done) done(i0, mr);
      }
    }
  }
}
#endif

}  // namespace

bool gemm_rows_independent() {
#if NTHR_HAVE_AVX512_KERNEL
  return use_kernel();
#else
  return false;
#endif
}

const char* gemm_engine() { return gemm_rows_independent() ? "nthr-avx512" : "aten"; }

void gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate, const RowsDone& done,
          bool prefetch_a) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K && c.size(0) == M && c.size(1) == N, "nthr gemm: shapes do not match");
#if NTHR_HAVE_AVX512_KERNEL
  if (use_kernel() && c.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
      b.scalar_type() == at::kFloat && c.stride(1) == 1) {
    if (M > 0 && N > 0 && K > 0) {
      packed_sgemm(M, N, K, a.const_data_ptr<float>(), a.stride(0), a.stride(1), b.const_data_ptr<float>(),
                   b.stride(0), b.stride(1), const_cast<at::Tensor&>(c).data_ptr<float>(), c.stride(0), accumulate,
                   done, prefetch_a);
      return;
    }
    if (M > 0 && N > 0 && !accumulate) const_cast<at::Tensor&>(c).zero_();  // K == 0
  } else
#endif
  {
    at::Tensor out = c;
    if (accumulate) out.addmm_(a, b);
    else at::mm_out(out, a, b);
  }
  if (done && M > 0) done(0, M);
}

}  // namespace nthr
