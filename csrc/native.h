// Shared declarations of the native CPU ops (see README.md in this folder).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace nthr {

// Copies `count` rows of a 2-D [N, X] or 3-D [R, L, X] tensor of any floating dtype and any strides
// into a dense float32 buffer `out` (row stride `ld`). Row r is src[ia[r]] (2-D) or src[ia[r], ib[r]]
// (3-D). With `cols` only the listed last-dim entries are copied (ncols of them), else all X.
void gather_rows(const at::Tensor& src, const int64_t* ia, const int64_t* ib, int64_t count,
                 const int64_t* cols, int64_t ncols, float* out, int64_t ld);

// A float32 [rows, cols] matrix view of scratch memory (row stride ld), for ATen's mm/addmm.
at::Tensor mat(float* p, int64_t rows, int64_t cols, int64_t ld);

// nthr::native_score_tokens: pairwise chooses the path (decided in Python by
// nthr_kernels.core.rules.cheaper_path; the C++ side holds no cost model).
at::Tensor score_tokens_cpu(const at::Tensor& h_pos, const at::Tensor& h_neg, const at::Tensor& err_pos,
                            const at::Tensor& err_neg, int64_t scratch_elems, bool pairwise);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> advantages_cpu(
    const at::Tensor& hidden, const at::Tensor& tok_a, const std::optional<at::Tensor>& tok_b,
    const at::Tensor& tok_ids, const at::Tensor& tok_resp, const at::Tensor& resp_group,
    const at::Tensor& positive, const at::Tensor& adv, const at::Tensor& group_active,
    const at::Tensor& eta_group, const std::optional<at::Tensor>& lm_head_weight,
    const std::optional<at::Tensor>& logits, const std::optional<at::Tensor>& logprobs, double temperature,
    double beta, bool anchor_others, int64_t scratch_elems, bool score_positive);

// nthr::native_check_values: float64 [2 + k], the value checks' arithmetic in one pass: with `norms`, the
// largest row norm of hidden at the canonical tokens and of the lm_head_weight rows read (all, or those of the
// distinct tok_ids); with idx, the old log-probs check's implied log-mass on V* at the k sampled canonical tokens
// (logprobs [k] their l_t, tok_group [n] each canonical token's group).
at::Tensor check_values_cpu(const at::Tensor& hidden, const at::Tensor& tok_a, const std::optional<at::Tensor>& tok_b,
                            const at::Tensor& tok_ids, const at::Tensor& lm_head_weight, bool norms,
                            bool weight_all_rows, const std::optional<at::Tensor>& tok_group,
                            const std::optional<at::Tensor>& logprobs, const std::optional<at::Tensor>& idx,
                            int64_t n_groups, double temperature, int64_t scratch_elems);

// nthr::native_pairwise_group: whether native_advantages takes the pairwise path for a group of t_all tokens,
// t_pos of them positive, |V*| = nv, hidden size d, at the scratch budget scratch_elems.
bool pairwise_group_op(int64_t t_pos, int64_t t_all, int64_t nv, int64_t d, bool score_positive,
                       int64_t scratch_elems);

// nthr::native_mm: a @ b (float32) on the native ops' gemm, across the threads; nthr::native_gemm_engine: its engine.
at::Tensor mm_cpu(const at::Tensor& a, const at::Tensor& b);
std::string gemm_engine_op();

}  // namespace nthr
