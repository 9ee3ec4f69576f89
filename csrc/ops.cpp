// Native CPU ops: row gathering, nthr::native_score_tokens, and the dispatcher registrations.
// The schemas are defined in Python (nthr_kernels/ops/native_lib.py), so the fake (shape) kernels exist whether or
// not this library is built; this file only provides the CPU and Autograd kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "gemm.h"
#include "native.h"
#include "params.h"
#include "vec_kernels.h"

namespace nthr {

void gather_rows(const at::Tensor& src, const int64_t* ia, const int64_t* ib, int64_t count, const int64_t* cols,
                 int64_t ncols, float* out, int64_t ld) {
  const int64_t dim = src.dim();
  TORCH_CHECK(dim == 2 || dim == 3, "nthr native: expected a 2-D or 3-D source, got ", dim, "-D");
  TORCH_CHECK((dim == 3) == (ib != nullptr), "nthr native: row index pairs do not match the source layout");
  const int64_t s0 = src.stride(0), s1 = dim == 3 ? src.stride(1) : 0, sx = src.stride(dim - 1);
  const int64_t width = cols ? ncols : src.size(dim - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "nthr_gather_rows", [&] {
    const scalar_t* base = src.const_data_ptr<scalar_t>();
    auto at_row = [&](int64_t r) { return base + ia[r] * s0 + (ib ? ib[r] * s1 : 0); };
    constexpr int64_t per_line = 64 / sizeof(scalar_t);
    for (int64_t r = 0; r < count; ++r) {
      const scalar_t* row = at_row(r);
      if (!cols && sx == 1 && r + kPrefetchRows < count)  // indexed rows: fetch a few ahead (see params.h)
        for (int64_t j = 0; j < width; j += per_line) __builtin_prefetch(at_row(r + kPrefetchRows) + j);
      float* o = out + r * ld;
      if (cols) {
        for (int64_t j = 0; j < width; ++j) o[j] = static_cast<float>(row[cols[j] * sx]);
      } else if (std::is_same_v<scalar_t, float> && sx == 1) {
        std::memcpy(o, row, sizeof(float) * width);
      } else {
        for (int64_t j = 0; j < width; ++j) o[j] = static_cast<float>(row[j * sx]);
      }
    }
  });
}

at::Tensor mat(float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(p, {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

namespace {

#define CHECK_2D_FLOAT(x, name)                                                                          \
  TORCH_CHECK((x).device().is_cpu() && (x).dim() == 2 && at::isFloatingType((x).scalar_type()),         \
              "nthr native_score_tokens: ", name, ": expected a 2-D floating-point CPU tensor, got ", \
              (x).dim(), "-D ", (x).scalar_type(), " on ", (x).device())
#define CHECK_SIZE(x, dim, n, name)                                                                      \
  TORCH_CHECK((x).size(dim) == (n), "nthr native_score_tokens: ", name, ": expected size ", (n), " in dim ", \
              (dim), ", got ", (x).sizes())

// Work items per working thread on the packed kernel: a thread that runs slower than the other (the two
// vCPUs of the dev box differ by up to 30 %) takes fewer of them instead of holding up the region with its one
// item; B is packed once per product (pack_b_once), so an item costs no packing of its own.
constexpr int64_t kItemsPerThread = 4;

// Rows per work item (of M, of the scores): `rows` cut into kItemsPerThread items per working thread, in
// multiples of the GEMM's register block and at most `cap`. With the packed kernel the split changes no bits:
// every element of M and every score is summed in the same order whichever item holds its row
// (gemm_rows_independent; the score rows are independent). ATen's mm rounds a row differently at another row
// count, so there the split is one item for each of kWorkers threads, whatever the thread count.
int64_t item_rows(int64_t rows, int64_t cap) {
  const int64_t items = gemm_rows_independent() ? worker_count() * kItemsPerThread : kWorkers;
  const int64_t per = (rows + items - 1) / items;
  return std::max<int64_t>(1, std::min(cap, (per + kGemmRowBlock - 1) / kGemmRowBlock * kGemmRowBlock));
}

// B packed once for the items of a product (scratch of packed_b_elems floats; none with ATen's mm).
PackedB packed_once(const at::Tensor& b, at::Tensor& scratch) {
  scratch = at::empty({packed_b_elems(b.size(0), b.size(1))}, at::TensorOptions().dtype(at::kFloat));
  return pack_b_once(b, scratch.data_ptr<float>());
}

// Rows [r0, r0 + n) and columns [c0, c0 + nc) of x as float32 (a view when x already is float32).
at::Tensor block(const at::Tensor& x, int64_t r0, int64_t n, int64_t c0, int64_t nc) {
  return x.narrow(0, r0, n).narrow(1, c0, nc).to(at::kFloat);
}

// Factored: per column block of at most vb columns, M = E+^T H+ [cw, d] (per row block of rb positive tokens,
// in order, items of rows of M accumulate its product), then s_t += (E_t M) . h_t, items of at most sb tokens;
// each product's B (the H+ block, M) packed once for its items.
void score_factored(const at::Tensor& h_pos, const at::Tensor& h_neg, const at::Tensor& err_pos,
                    const at::Tensor& err_neg, int64_t budget, float* o) {
  const int64_t tp = h_pos.size(0), tn = h_neg.size(0), v = err_pos.size(1), d = h_pos.size(1);
  const int64_t vb = std::max<int64_t>(1, std::min(v, budget / d));
  const int64_t rb = std::max<int64_t>(1, budget / std::max(vb, d));
  const int64_t sb = item_rows(tn, rb);
  // each worker's product tile [sb, d] (<= the budget), allocated once here rather than per item: measured on
  // the medium benchmark group, per-item tiles page-faulted on each of the process's first 7 calls, these on
  // its first 4 only (glibc then serves the size from its heap)
  const at::Tensor tiles = at::empty({worker_count() * sb, d}, at::TensorOptions().dtype(at::kFloat));
  for (int64_t c0 = 0; c0 < v; c0 += vb) {
    const int64_t cw = std::min(vb, v - c0), mb = item_rows(cw, cw);
    at::Tensor m = at::empty({cw, d}, at::TensorOptions().dtype(at::kFloat)), scratch;
    for (int64_t r0 = 0; r0 < tp; r0 += rb) {  // every element of M sums the row blocks in order, as before
      const int64_t rn = std::min(rb, tp - r0);
      const PackedB hb = packed_once(block(h_pos, r0, rn, 0, d), scratch);
      for_each_item((cw + mb - 1) / mb, [&](int64_t item, int64_t) {
        const int64_t j0 = item * mb, jn = std::min(mb, cw - j0);
        gemm_packed(m.narrow(0, j0, jn), block(err_pos, r0, rn, c0 + j0, jn).t(), hb, r0 > 0);
      });
    }
    const PackedB mp = packed_once(m, scratch);
    for_each_item((tn + sb - 1) / sb, [&](int64_t b, int64_t w) {
      const int64_t r0 = b * sb, rn = std::min(sb, tn - r0);
      at::Tensor s = tiles.narrow(0, w * sb, rn);
      gemm_packed(s, block(err_neg, r0, rn, c0, cw), mp);
      at::Tensor h = block(h_neg, r0, rn, 0, d).contiguous();
      const float* sp = s.const_data_ptr<float>();
      const float* hp = h.const_data_ptr<float>();
      vec::dot_rows(sp, hp, rn, d, o + r0);
    });
  }
}

// Pairwise, tile by tile: s_t += sum_u (E+ E^T)[u, t] * (H+ H^T)[u, t]; never a T+ x T matrix.
void score_pairwise(const at::Tensor& h_pos, const at::Tensor& h_neg, const at::Tensor& err_pos,
                    const at::Tensor& err_neg, int64_t budget, float* o) {
  const int64_t tp = h_pos.size(0), tn = h_neg.size(0), v = err_pos.size(1), d = h_pos.size(1);
  const int64_t bn = std::max<int64_t>(1, std::min<int64_t>(tn, static_cast<int64_t>(std::sqrt(double(budget)))));
  const int64_t bp = std::max<int64_t>(1, std::min(tp, budget / std::max({bn, v, d})));
  for_each_item((tn + bn - 1) / bn, [&](int64_t b, int64_t) {
    const int64_t n0 = b * bn, nn = std::min(bn, tn - n0);
    at::Tensor en = block(err_neg, n0, nn, 0, v), hn = block(h_neg, n0, nn, 0, d);
    for (int64_t p0 = 0; p0 < tp; p0 += bp) {
      const int64_t pn = std::min(bp, tp - p0);
      at::Tensor a = at::empty({pn, nn}, at::TensorOptions().dtype(at::kFloat));  // [pn, nn]
      at::Tensor k = at::empty({pn, nn}, at::TensorOptions().dtype(at::kFloat));
      gemm(a, block(err_pos, p0, pn, 0, v), en.t());
      gemm(k, block(h_pos, p0, pn, 0, d), hn.t());
      vec::colsum_product(a.const_data_ptr<float>(), nn, k.const_data_ptr<float>(), nn, pn, nn, o + n0);
    }
  });
}

// Rows of a per work item of native_mm (fixed, so the bits do not depend on the thread count).
constexpr int64_t kMmRows = 256;

}  // namespace

// nthr::native_mm: a @ b for float32 [M, K] x [K, N] on gemm (gemm.cpp), rows in items of kMmRows across
// the threads. The native ops' own matrix products, exposed for tests and the benchmarks' matrix rate.
at::Tensor mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && a.dim() == 2 && b.dim() == 2 &&
                  a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
              "nthr native_mm: expected two 2-D float32 CPU tensors, got ", a.dim(), "-D ", a.scalar_type(), " and ",
              b.dim(), "-D ", b.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(0), "nthr native_mm: b: expected ", a.size(1), " rows (the columns of a), got ",
              b.size(0));
  const int64_t m = a.size(0);
  at::Tensor out = at::empty({m, b.size(1)}, at::TensorOptions().dtype(at::kFloat));
  for_each_item((m + kMmRows - 1) / kMmRows, [&](int64_t item, int64_t) {
    const int64_t r0 = item * kMmRows, rn = std::min(kMmRows, m - r0);
    gemm(out.narrow(0, r0, rn), a.narrow(0, r0, rn), b);
  });
  return out;
}

std::string gemm_engine_op() { return gemm_engine(); }

// s_t = sum_u <err_pos[u], err_neg[t]> <h_pos[u], h_neg[t]> in float32, on the path the caller chose.
// Every temporary holds at most `scratch_elems` elements (per item for the per-block ones).
at::Tensor score_tokens_cpu(const at::Tensor& h_pos, const at::Tensor& h_neg, const at::Tensor& err_pos,
                            const at::Tensor& err_neg, int64_t scratch_elems, bool pairwise) {
  CHECK_2D_FLOAT(h_pos, "h_pos");
  CHECK_2D_FLOAT(h_neg, "h_neg");
  CHECK_2D_FLOAT(err_pos, "err_pos");
  CHECK_2D_FLOAT(err_neg, "err_neg");
  const int64_t tp = h_pos.size(0), tn = h_neg.size(0), v = err_pos.size(1), d = h_pos.size(1);
  CHECK_SIZE(err_pos, 0, tp, "err_pos");
  CHECK_SIZE(err_neg, 0, tn, "err_neg");
  CHECK_SIZE(err_neg, 1, v, "err_neg");
  CHECK_SIZE(h_neg, 1, d, "h_neg");
  at::Tensor out = at::zeros({tn}, at::TensorOptions().dtype(at::kFloat));
  if (tp == 0 || tn == 0 || v == 0 || d == 0) return out;  // empty sums: every score is 0
  const int64_t budget = std::max<int64_t>(scratch_elems, 1);
  if (pairwise) score_pairwise(h_pos, h_neg, err_pos, err_neg, budget, out.data_ptr<float>());
  else score_factored(h_pos, h_neg, err_pos, err_neg, budget, out.data_ptr<float>());
  return out;
}

}  // namespace nthr

TORCH_LIBRARY_IMPL(nthr, CPU, m) {
  m.impl("native_score_tokens", &nthr::score_tokens_cpu);
  m.impl("native_advantages", &nthr::advantages_cpu);
  m.impl("native_check_values", &nthr::check_values_cpu);
  m.impl("native_mm", &nthr::mm_cpu);
}

// No tensor argument to dispatch on: the path rule serves every key.
TORCH_LIBRARY_IMPL(nthr, CompositeExplicitAutograd, m) {
  m.impl("native_pairwise_group", &nthr::pairwise_group_op);
  m.impl("native_gemm_engine", &nthr::gemm_engine_op);
}

// Nothing here is differentiable: backward through these ops raises instead of returning wrong grads.
TORCH_LIBRARY_IMPL(nthr, Autograd, m) {
  m.impl("native_score_tokens", torch::autograd::autogradNotImplementedFallback());
  m.impl("native_advantages", torch::autograd::autogradNotImplementedFallback());
  m.impl("native_check_values", torch::autograd::autogradNotImplementedFallback());
  m.impl("native_mm", torch::autograd::autogradNotImplementedFallback());
}
