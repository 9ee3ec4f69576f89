// sgemm for the native ops: C = A B or C += A B on float32 matrices of any strides, on one thread, in a
// fixed summation order. On x86-64 CPUs with AVX-512, or with AVX2 and FMA, a packed kernel of its own (below);
// elsewhere, or with the environment variable NTHR_NATIVE_GEMM=aten, ATen's mm (BLAS).
//
// Why its own kernels: the BLAS torch ships (MKL) takes its AVX2 path on AMD CPUs, so on an AVX-512 Zen CPU it
// reaches about half of the float32 FMA peak (measured on the 2-core Zen 5 dev box, one thread: MKL ~108
// GFLOP/s, the AVX-512 kernel ~210, the FMA peak of a register-only loop ~262). On an AVX2 CPU the AVX2 kernel
// runs at about MKL's rate (Zen 3, one thread: 46 to 71 GFLOP/s against MKL's 50 to 68, FMA peak ~91) and
// gives the AVX-512 kernel's bits, where MKL's order depends on the shape of each product.
// Layout (Goto/BLIS): a K block of B (kKc x kNc) is packed into column panels of kNr columns (AVX-512: 32, two
// 16-lane registers; AVX2: 16, two 8-lane registers); a kMr = 12 row panel of A is read in place when its rows
// are contiguous (each value broadcast straight from memory), else packed (column-major A too). AVX-512: 24
// registers hold a 12 x 32 block of C over the K block; AVX2 (16 registers): 12 hold a 6 x 16 block, twice
// per 12-row panel.
// Bits: C[i, j] = C (or 0) + the K blocks in order, each summed k = 0, 1, ... by fused multiply-adds in one
// register lane from 0; no dependence on the other dimensions' blocking, the vector width, the thread count
// or the machine: both kernels give the same bits on every CPU that runs them (tests/test_native.py checks
// them against this order emulated in float64). ATen's BLAS has an order of its own.
#include "gemm.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include <unistd.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define NTHR_HAVE_X86_KERNELS 1
#else
#define NTHR_HAVE_X86_KERNELS 0
#endif

namespace nthr {
namespace {

// Blocking of the packed kernels (also the size gemm_col_block() reports on any CPU).
constexpr int64_t kKc = 256;  // K block: one A panel (12 KiB) in L1, the B block in L2
constexpr int64_t kNc = 512;  // the most columns of B per packed block (512 KiB at kKc): gemm_col_block()

#if NTHR_HAVE_X86_KERNELS
constexpr int64_t kMr = kGemmRowBlock;  // rows of a panel of A (the register block of C: 12 x 32 or 2 x 6 x 16)

// 64-byte aligned per-thread packing buffers: one A panel (kMr kKc floats) and one B block (kNc kKc): 524 KiB
// (both kernels).
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

// The A panel A[0 .. mr, 0 .. kc] as ap[k][i] (kMr values per k; zero rows past mr).
void pack_a(const float* a, int64_t ars, int64_t acs, int64_t mr, int64_t kc, float* ap) {
  if (ars == 1 && mr == kMr) {  // column-major A: each k's kMr values are contiguous, one fixed-size copy
    for (int64_t k = 0; k < kc; ++k) std::memcpy(ap + k * kMr, a + k * acs, sizeof(float) * kMr);
    return;
  }
  for (int64_t k = 0; k < kc; ++k) {
    for (int64_t i = 0; i < mr; ++i) ap[k * kMr + i] = a[i * ars + k * acs];
    for (int64_t i = mr; i < kMr; ++i) ap[k * kMr + i] = 0.0f;
  }
}

// One column panel of B (B[0 .. kc, 0 .. nr] of any strides) as bp[k][j], `width` values per k (the kernel's
// panel width; zero past nr): element by element, for the strides the kernels' vector paths do not cover.
void pack_b_panel_strided(const float* b, int64_t brs, int64_t bcs, int64_t kc, int64_t nr, int64_t width, float* bp) {
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t j = 0; j < width; ++j) bp[k * width + j] = j < nr ? b[k * brs + j * bcs] : 0.0f;
}

// Fetches the cache lines of C[0 .. rows, 0 .. cols) (row stride ldc) into L1: a kernel calls it for its block of
// C before its k loop, so that the C tile it reads or writes after the loop is in cache by then. Without it the
// kernels stalled on C at the end of every register block (AVX2 kernel, one thread, medians of 50 alternations
// in one process, three runs: 2 to 18 % slower at the op's shapes, e.g. [700, 480] x [480, 256] 46.4 GFLOP/s
// against 53.6 with it, MKL 55.0).
inline void prefetch_c(const float* c, int64_t ldc, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; j += kFloatsPerLine) _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + j), _MM_HINT_T0);
}

// AVX-512: 12 x 32 register blocks (24 accumulators), B panels of 32 columns.
struct Avx512 {
  static constexpr int64_t kNr = 32;

  // Lanes of the q-th 16-lane vector that hold one of a row's first n values.
  static __mmask16 lane_mask(int64_t n, int q) {
    const int64_t k = std::max<int64_t>(0, std::min<int64_t>(16, n - 16 * q));
    return static_cast<__mmask16>(k >= 16 ? 0xFFFFu : (1u << k) - 1u);
  }

  // In-register transpose of 16 rows of 16 floats: on return r[c] holds column c (rows 0..15 in order).
  __attribute__((target("avx512f"))) static void transpose16(__m512 r[16]) {
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
  __attribute__((target("avx512f"))) static void pack_b(const float* b, int64_t brs, int64_t bcs, int64_t kc,
                                                         int64_t nc, float* bp) {
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
        pack_b_panel_strided(b + j0 * bcs, brs, bcs, kc, nr, kNr, bp);
      }
    }
  }

  // C[0 .. mr, 0 .. nr] (row stride ldc) = (add ? C : 0) + sum_k A[i, k] B[k, j] over k < kc, B[k, j] = b[k * kNr + j]
  // (a packed panel, zero past nr), with
  // A[i, k] = a[i * ars + k] (kRows: A's rows are contiguous, read in place) or a[k * acs + i] (a packed panel,
  // acs = kMr). Every A value is broadcast straight from memory (the kMr rows of a panel stay in L1 across the
  // column panels of B).
  template <bool kRows>
  __attribute__((target("avx512f"), aligned(64))) static void kernel(int64_t kc, const float* a, int64_t ars, int64_t acs,
                                                                     const float* b, float* c, int64_t ldc, bool add,
                                                                     int64_t mr, int64_t nr) {
    prefetch_c(c, ldc, mr, kNr + 1);  // the +1: the tile's last line where its rows are not line-aligned
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
};

// AVX2 + FMA (16 registers): 6 x 16 register blocks (12 accumulators), two per 12-row panel of A; B panels of
// 16 columns. Each C value gets the AVX-512 kernel's order (above): the same bits.
struct Avx2 {
  static constexpr int64_t kNr = 16;
  static constexpr int64_t kRb = kMr / 2;  // rows of a register block
  static constexpr int64_t kPrefetchAhead = 4 * kFloatsPerLine;  // pack_b's prefetch distance along a row of W

  // Lanes of the q-th 8-lane vector that hold one of a row's first n values (for the masked loads and stores).
  __attribute__((target("avx2,fma"))) static __m256i lane_mask(int64_t n, int q) {
    const int64_t k = std::max<int64_t>(0, std::min<int64_t>(8, n - 8 * q));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }

  // In-register transpose of 8 rows of 8 floats: on return r[c] holds column c (rows 0..7 in order).
  __attribute__((target("avx2,fma"))) static void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; ++i) {  // pairs of rows interleaved per 128-bit lane
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {  // u[4i + m], lane half l: column 4l + m of rows 4i .. 4i + 3
      u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int m = 0; m < 4; ++m) {
      r[m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
      r[4 + m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
    }
  }

  // B[0 .. kc, 0 .. nc] into column panels of kNr: bp[q][k][j] (zero columns past nc); the cases of Avx512::pack_b.
  __attribute__((target("avx2,fma"))) static void pack_b(const float* b, int64_t brs, int64_t bcs, int64_t kc,
                                                         int64_t nc, float* bp) {
    for (int64_t j0 = 0; j0 < nc; j0 += kNr, bp += kNr * kc) {
      const int64_t nr = std::min(kNr, nc - j0);
      if (bcs == 1) {
        const __m256i m0 = lane_mask(nr, 0), m1 = lane_mask(nr, 1);
        for (int64_t k = 0; k < kc; ++k) {
          const float* src = b + k * brs + j0;
          _mm256_store_ps(bp + k * kNr, _mm256_maskload_ps(src, m0));
          _mm256_store_ps(bp + k * kNr + 8, _mm256_maskload_ps(src + 8, m1));
        }
      } else if (brs == 1) {
        for (int64_t h = 0; h < kNr; h += 8) {
          const int64_t nh = std::max<int64_t>(0, std::min<int64_t>(8, nr - h));  // valid columns of this half
          for (int64_t k0 = 0; k0 < kc; k0 += 8) {
            const int64_t kn = std::min<int64_t>(8, kc - k0);
            const __m256i km = lane_mask(kn, 0);
            __m256 r[8];
            if (k0 % kFloatsPerLine == 0 && k0 + kPrefetchAhead < kc)  // 8 strided streams: the hardware prefetcher
              for (int64_t j = 0; j < nh; ++j)                         // lags (pack_b took 18 % of a product's time)
                _mm_prefetch(reinterpret_cast<const char*>(b + (j0 + h + j) * bcs + k0 + kPrefetchAhead), _MM_HINT_T0);
            for (int64_t j = 0; j < 8; ++j)
              r[j] = j < nh ? _mm256_maskload_ps(b + (j0 + h + j) * bcs + k0, km) : _mm256_setzero_ps();
            transpose8(r);
            for (int64_t k = 0; k < kn; ++k) _mm256_store_ps(bp + (k0 + k) * kNr + h, r[k]);
          }
        }
      } else {
        pack_b_panel_strided(b + j0 * bcs, brs, bcs, kc, nr, kNr, bp);
      }
    }
  }

  // Avx512::kernel's contract (rows past mr of a packed panel are zero), as two blocks of kRb rows; a panel of
  // at most kRb rows computes one.
  template <bool kRows>
  __attribute__((target("avx2,fma"), aligned(64))) static void kernel(int64_t kc, const float* a, int64_t ars,
                                                                      int64_t acs, const float* b, float* c,
                                                                      int64_t ldc, bool add, int64_t mr, int64_t nr) {
    const __m256i m0 = lane_mask(nr, 0), m1 = lane_mask(nr, 1);
    for (int64_t r0 = 0; r0 < mr; r0 += kRb) {
      prefetch_c(c + r0 * ldc, ldc, std::min(kRb, mr - r0), kNr + 1);  // +1: see Avx512::kernel
      __m256 acc[kRb][2];
      for (int i = 0; i < kRb; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
      const float* bk = b;
      for (int64_t k = 0; k < kc; ++k, bk += kNr) {
        const __m256 b0 = _mm256_load_ps(bk), b1 = _mm256_load_ps(bk + 8);
        const float* ak = kRows ? a + r0 * ars + k : a + k * acs + r0;
#pragma GCC unroll 6
        for (int i = 0; i < kRb; ++i) {
          const __m256 av = _mm256_broadcast_ss(kRows ? ak + i * ars : ak + i);
          acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
        }
      }
      // masked loads and stores only where a panel has fewer than kNr columns (masked stores are microcoded on
      // AMD CPUs)
      for (int i = 0; i < kRb && r0 + i < mr; ++i) {
        float* row = c + (r0 + i) * ldc;
        __m256 v0 = acc[i][0], v1 = acc[i][1];
        if (nr == kNr) {
          if (add) {
            v0 = _mm256_add_ps(_mm256_loadu_ps(row), v0);
            v1 = _mm256_add_ps(_mm256_loadu_ps(row + 8), v1);
          }
          _mm256_storeu_ps(row, v0);
          _mm256_storeu_ps(row + 8, v1);
          continue;
        }
        if (add) {
          v0 = _mm256_add_ps(_mm256_maskload_ps(row, m0), v0);
          v1 = _mm256_add_ps(_mm256_maskload_ps(row + 8, m1), v1);
        }
        _mm256_maskstore_ps(row, m0, v0);
        _mm256_maskstore_ps(row + 8, m1, v1);
      }
    }
  }
};
static_assert(Avx2::kRb * 2 == kMr, "two AVX2 register blocks per panel of A");

// The blocks of B, in the order packed_sgemm takes them: fn(j0, nc, k0, kc) per block of nc columns and kc rows.
template <typename F>
void for_b_blocks(int64_t N, int64_t K, const F& fn) {
  const int64_t ncb = gemm_col_block();
  for (int64_t j0 = 0; j0 < N; j0 += ncb)
    for (int64_t k0 = 0; k0 < K; k0 += kKc) fn(j0, std::min(ncb, N - j0), k0, std::min(kKc, K - k0));
}

// Floats of one packed block of B: its panels of Isa::kNr columns (zero columns past nc), kc values each.
template <class Isa>
int64_t packed_block_elems(int64_t nc, int64_t kc) {
  return (nc + Isa::kNr - 1) / Isa::kNr * Isa::kNr * kc;
}

// Every block of B packed into out, one after the other (packed_sgemm's prepacked).
template <class Isa>
void pack_all_b(int64_t N, int64_t K, const float* b, int64_t brs, int64_t bcs, float* out) {
  for_b_blocks(N, K, [&](int64_t j0, int64_t nc, int64_t k0, int64_t kc) {
    Isa::pack_b(b + k0 * brs + j0 * bcs, brs, bcs, kc, nc, out);
    out += packed_block_elems<Isa>(nc, kc);
  });
}

// `done` after each row panel of the last column and K block (the rows' last writes). With prepacked (pack_all_b
// of this B), B's blocks are read from there instead of being packed here.
template <class Isa>
void packed_sgemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b,
                  int64_t brs, int64_t bcs, float* c, int64_t ldc, bool accumulate, const RowsDone& done,
                  bool prefetch_a, const float* prepacked) {
  thread_local PackBuffers buf;
  // A panels are read in place when A's rows are contiguous; any other A (column-major ones included) is packed.
  // A column-major A read in place (its 12 rows' values contiguous per k) touched one cache line per k: the panel
  // spread over kc lines beside the B panel in L1 and was fetched again for every B panel. Packed, it is
  // 12 kc floats in a row (measured: E^T H, [523, 479] x [479, 256], one thread, medians of 60 alternations in one
  // process: 57 and 69 GFLOP/s in place, 67 and 75 packed; MKL 73 and 80).
  const bool rows = acs == 1;
  const int64_t ncb = gemm_col_block();
  for (int64_t j0 = 0; j0 < N; j0 += ncb) {
    const int64_t nc = std::min(ncb, N - j0);
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min(kKc, K - k0);
      const bool add = accumulate || k0 > 0, last = j0 + ncb >= N && k0 + kKc >= K;
      const float* bp = buf.b;
      if (prepacked) {
        bp = prepacked;
        prepacked += packed_block_elems<Isa>(nc, kc);
      } else {
        Isa::pack_b(b + k0 * brs + j0 * bcs, brs, bcs, kc, nc, buf.b);
      }
      auto panel = [&](int64_t jr) { return bp + jr * kc; };
      for (int64_t i0 = 0; i0 < M; i0 += kMr) {
        const int64_t mr = std::min(kMr, M - i0);
        const float* ap = a + i0 * ars + k0 * acs;
        float* ci = c + i0 * ldc + j0;
        if (prefetch_a && rows && i0 + 2 * kMr <= M)  // the next panel's rows into L2 while this one runs
          for (int64_t i = kMr; i < 2 * kMr; ++i)
            for (int64_t k = 0; k < kc; k += kFloatsPerLine)
              _mm_prefetch(reinterpret_cast<const char*>(ap + i * ars + k), _MM_HINT_T1);
        if (mr == kMr && rows) {
          for (int64_t jr = 0; jr < nc; jr += Isa::kNr)
            Isa::template kernel<true>(kc, ap, ars, 1, panel(jr), ci + jr, ldc, add, kMr, std::min(Isa::kNr, nc - jr));
        } else {  // a last panel of fewer rows, or A of other strides: packed, zero rows past mr
          pack_a(ap, ars, acs, mr, kc, buf.a);
          for (int64_t jr = 0; jr < nc; jr += Isa::kNr)
            Isa::template kernel<false>(kc, buf.a, 1, kMr, panel(jr), ci + jr, ldc, add, mr, std::min(Isa::kNr, nc - jr));
        }
        if (last && done) done(i0, mr);
      }
    }
  }
}
#endif

enum class Engine { kAvx512, kAvx2, kAten };

// The engine on this CPU: the AVX-512 kernel, else the AVX2 one (AVX2 and FMA), else ATen's mm. NTHR_NATIVE_GEMM
// (read once) = "auto" (that choice), "avx512" or "avx2" (that kernel; refused on a CPU without its ISA) or
// "aten"; any other value is refused.
Engine engine() {
  static const Engine e = [] {
    const char* env = std::getenv("NTHR_NATIVE_GEMM");
    const std::string want = env ? env : "auto";
    TORCH_CHECK(want == "auto" || want == "avx512" || want == "avx2" || want == "aten",
                "NTHR_NATIVE_GEMM: expected 'auto', 'avx512', 'avx2' or 'aten', got '", want, "'");
    if (want == "aten") return Engine::kAten;
#if NTHR_HAVE_X86_KERNELS
    const bool avx512 = __builtin_cpu_supports("avx512f");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    TORCH_CHECK(want != "avx512" || avx512, "NTHR_NATIVE_GEMM: 'avx512' needs a CPU with AVX-512, this one has none");
    TORCH_CHECK(want != "avx2" || avx2, "NTHR_NATIVE_GEMM: 'avx2' needs a CPU with AVX2 and FMA, this one lacks them");
    if (want == "avx2") return Engine::kAvx2;
    return avx512 ? Engine::kAvx512 : avx2 ? Engine::kAvx2 : Engine::kAten;
#else
    TORCH_CHECK(want == "auto", "NTHR_NATIVE_GEMM: '", want, "' needs an x86-64 CPU");
    return Engine::kAten;
#endif
  }();
  return e;
}

#if NTHR_HAVE_X86_KERNELS
// fn(Isa{}) with the packed kernel class of engine e (kAvx512 or kAvx2; not kAten): the one place that maps an
// engine to its ISA.
template <class F>
decltype(auto) with_isa(Engine e, F&& fn) {
  return e == Engine::kAvx512 ? fn(Avx512{}) : fn(Avx2{});
}
#endif

}  // namespace

bool gemm_rows_independent() { return engine() != Engine::kAten; }

// Half of the L2 cache (sysconf; 512 KiB taken where it gives no size) over one K block of B, in multiples of 32
// (both kernels' panel widths), from 32 to kNc. 256 on Zen 3 (512 KiB L2): at 409 columns the B block filled its
// L2 and the streamed A rows evicted it (the full-vocabulary pass of the medium shape, 409 tokens per item: 2.5
// to 2.8 s; at 192: 2.2 to 2.3); 512 on Zen 5 (1 MiB L2). No bit of the packed kernels depends on it (the order
// above). Without them (not x86-64): kNc.
int64_t gemm_col_block() {
#if NTHR_HAVE_X86_KERNELS
  static const int64_t n = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);  // glibc
#else
    const long l2 = 0;
#endif
    const int64_t bytes = l2 > 0 ? static_cast<int64_t>(l2) : int64_t{512} << 10;
    return std::clamp<int64_t>(bytes / 2 / (kKc * static_cast<int64_t>(sizeof(float))) / 32 * 32, 32, kNc);
  }();
  return n;
#else
  return kNc;
#endif
}

int64_t packed_b_elems(int64_t K, int64_t N) {
#if NTHR_HAVE_X86_KERNELS
  const Engine e = engine();
  if (e == Engine::kAten) return 0;
  int64_t n = 0;
  with_isa(e, [&](auto isa) {
    for_b_blocks(N, K, [&](int64_t, int64_t nc, int64_t, int64_t kc) {
      n += packed_block_elems<decltype(isa)>(nc, kc);
    });
  });
  return n;
#else
  (void)K, (void)N;
  return 0;
#endif
}

PackedB pack_b_once(const at::Tensor& b, float* scratch) {
  PackedB pb;
  pb.b = b;
#if NTHR_HAVE_X86_KERNELS
  const Engine e = engine();
  if (e != Engine::kAten && b.scalar_type() == at::kFloat && b.size(0) > 0 && b.size(1) > 0) {
    with_isa(e, [&](auto isa) {
      pack_all_b<decltype(isa)>(b.size(1), b.size(0), b.const_data_ptr<float>(), b.stride(0), b.stride(1), scratch);
    });
    pb.data = scratch;
  }
#else
  (void)scratch;
#endif
  return pb;
}

void gemm_packed(const at::Tensor& c, const at::Tensor& a, const PackedB& b, bool accumulate, const RowsDone& done) {
#if NTHR_HAVE_X86_KERNELS
  const int64_t M = a.size(0), K = a.size(1), N = b.b.size(1);
  if (b.data && M > 0 && c.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && c.stride(1) == 1) {
    TORCH_CHECK(b.b.size(0) == K && c.size(0) == M && c.size(1) == N, "nthr gemm: shapes do not match");
    with_isa(engine(), [&](auto isa) {
      packed_sgemm<decltype(isa)>(M, N, K, a.const_data_ptr<float>(), a.stride(0), a.stride(1), nullptr, 0, 0,
                                  const_cast<at::Tensor&>(c).data_ptr<float>(), c.stride(0), accumulate, done, false,
                                  b.data);
    });
    return;
  }
#endif
  gemm(c, a, b.b, accumulate, done);
}

const char* gemm_engine() {
  switch (engine()) {
    case Engine::kAvx512: return "nthr-avx512";
    case Engine::kAvx2: return "nthr-avx2";
    default: return "aten";
  }
}

void gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate, const RowsDone& done,
          bool prefetch_a) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K && c.size(0) == M && c.size(1) == N, "nthr gemm: shapes do not match");
#if NTHR_HAVE_X86_KERNELS
  const Engine e = engine();
  if (e != Engine::kAten && c.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
      b.scalar_type() == at::kFloat && c.stride(1) == 1) {
    if (M > 0 && N > 0 && K > 0) {
      with_isa(e, [&](auto isa) {
        packed_sgemm<decltype(isa)>(M, N, K, a.const_data_ptr<float>(), a.stride(0), a.stride(1),
                                    b.const_data_ptr<float>(), b.stride(0), b.stride(1),
                                    const_cast<at::Tensor&>(c).data_ptr<float>(), c.stride(0), accumulate, done,
                                    prefetch_a, nullptr);
      });
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
