// Plain-C++ inner loops of the native NTHR ops (no torch headers). Defined in vec_kernels.cpp, which is
// compiled with per-ISA clones (AVX-512 / AVX2 / baseline) selected at load time, so one build runs on
// any x86-64 machine and still vectorises where the CPU allows.
#pragma once
#include <cmath>
#include <cstdint>

namespace nthr {
namespace vec {

// Online log-sum-exp over x[i] / temperature (computed as x[i] * (1 / temperature)): merges the chunk x[0..n) into (run_max, run_sum), where
// the running value is run_max + log(run_sum).
void lse_update(const float* x, int64_t n, float temperature, float* run_max, float* run_sum);

// lse_update for every column c < cols of the tile z [rows, cols] (row stride ld): merges the column's values into
// (run_max[c], run_sum[c]), lanes across columns, each column summed over its rows in order.
void lse_update_cols(const float* z, int64_t rows, int64_t cols, int64_t ld, float temperature, float* run_max,
                     float* run_sum);

// In place: e[i] = -exp(e[i] * (1 / temperature) - log_z). The caller adds the one-hot term.
// Here and in the log-sum-exps above, x / T is scaled_logit(x, T), rounded before anything is subtracted
// (-ffp-contract=off keeps it so): a log Z taken from the same scaled logit gives a certain token exactly 1.
void neg_softmax_slice(float* e, int64_t n, float temperature, float log_z);

inline float scaled_logit(float z, float temperature) { return z * (1.0f / temperature); }

// The sampled token's log-prob l = -softplus(others - zy) from the log-sum-exp of the other tokens' scaled logits
// and its own zy, as -(max(x, 0) + log1p(exp(-|x|))): its error -expm1(l) keeps its relative precision where
// 1 - exp(zy - log Z) with a float32 log Z would not (nthr_kernels.core.rules.sampled_logprob); others = -inf
// (no other token) gives 0.
inline float sampled_logprob(float others, float zy) {
  const float x = others - zy;
  return -((x > 0.0f ? x : 0.0f) + std::log1p(std::exp(-std::fabs(x))));
}

// Dot product in float32 with a fixed (deterministic) lane-wise summation order.
float dot(const float* a, const float* b, int64_t n);

// out[r] += dot(a + r * d, b + r * d, d) for r < rows (the same bits as dot per row, in one streaming pass).
void dot_rows(const float* a, const float* b, int64_t rows, int64_t d, float* out);

// sum_i a[i] * b[i] with exact float64 products, summed in float64 in a fixed lane-wise order.
double dot_f64(const float* a, const float* b, int64_t n);

// sum_i (m[i] - x[i]) * x[i] in float64, fixed order (<M, N> - <N, N> without the cancellation).
double dot_others_f64(const float* m, const float* x, int64_t n);

// out[j] += sum_i a[i * lda + j] * b[i * ldb + j] for i < rows, j < cols (column sums of a .* b).
void colsum_product(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows, int64_t cols, float* out);

}  // namespace vec
}  // namespace nthr
