// sgemm for the native ops (gemm.cpp): one thread, fixed summation order.
#pragma once
#include <ATen/ATen.h>

#include <functional>

namespace nthr {

// Rows of C per register block of the packed kernel: row splits in multiples of it keep every panel full.
constexpr int64_t kGemmRowBlock = 12;

// float32 values per 64-byte cache line (prefetch strides).
constexpr int64_t kFloatsPerLine = 16;

// done(r0, rn): rows [r0, r0 + rn) of C are final (no later step of the product writes them); called once per
// row, rows in increasing order: a row-wise epilogue. The packed kernel calls it per panel of kGemmRowBlock
// rows, while they are still in cache; ATen's path once for all rows, after the product.
using RowsDone = std::function<void(int64_t r0, int64_t rn)>;

// c = a b, or c += a b with accumulate: float32 2-D views of any strides (c with unit column stride for the
// packed kernel, else ATen's mm); then `done` (if given) over every row of c. prefetch_a: a's rows come from
// memory the thread has not touched lately (weight rows streamed through once per product): the packed kernel
// then prefetches each next row panel of a into L2 while the current one computes (measured on the
// full-vocabulary log Z pass: about 2.5 % faster; on a cache-resident a it cost about 1 %, so it is a hint).
void gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate = false,
          const RowsDone& done = nullptr, bool prefetch_a = false);

// B packed once for several products with it (gemm_packed): the row chunks of one product that threads share
// then read one packing instead of each packing B again. With ATen's engine, B itself.
struct PackedB {
  at::Tensor b;  // B (ATen's engine: the products use it as it is)
  const float* data = nullptr;  // the packed kernels' blocks of B, in their order (caller's scratch)
};

// float32 elements of scratch pack_b_once needs for a [K, N] B (0 with ATen's engine): at most
// (N + 32) K.
int64_t packed_b_elems(int64_t K, int64_t N);

// B (float32, any strides) packed into scratch (packed_b_elems(K, N) floats), which must outlive every
// gemm_packed with it.
PackedB pack_b_once(const at::Tensor& b, float* scratch);

// gemm(c, a, b, accumulate, done) with B packed by pack_b_once: the same bits.
void gemm_packed(const at::Tensor& c, const at::Tensor& a, const PackedB& b, bool accumulate = false,
                 const RowsDone& done = nullptr);

// Columns of B the packed kernels take per block (half of L2 at a K block of 256; gemm.cpp): a caller that
// chooses how many columns its products have keeps them within this, and the packed B stays in L2.
int64_t gemm_col_block();

// Which engine gemm uses on this CPU: "nthr-avx512" or "nthr-avx2" (the packed kernels) or "aten" (ATen's mm).
const char* gemm_engine();

// Whether a row of c gets the same bits however many rows the call has: true for the packed kernels (each
// element summed over K in order, whatever panel holds its row); ATen's mm blocks by the whole shape, so a
// caller must not let a thread count choose its row splits there.
bool gemm_rows_independent();

}  // namespace nthr
