// nthr::native_advantages: the whole NTHR batch on CPU (scores, anchors, tau, selection, advantages).
//
// The op's arguments are checked (CHECK_* below) and gathered into AdvantagesParams (params.h) in one
// place, set_advantages_params; then:
//   order_groups       the active groups' tokens in `order`, positive responses first (counting sort);
//   log_z_full_vocab   weight without old log-probs only: log Z_t and l_t over the whole vocabulary;
//   group_vstar        per active group, in parallel: V* (sorted unique ids) and each token's column in it;
//   then per active group, groups in parallel (most FLOPs first, group_flops), each on its own scratch slice:
//     group_log_z        log Z_t from the old log-probs or the logits (unless done above, or taken from each
//                        token's own logit by errors_block: old log-probs and V* in one column block);
//     per column block of V*:
//       errors_block       E = onehot - exp(z / T - log Z) of every token of the group (with the weight: in
//                          the logits GEMM's epilogue, per row panel while it is in cache);
//       factored groups:
//       positive_block     N_i = E_i^T H_i per positive response i, M = sum_i N_i, and the anchor terms
//                          <M, N_i> ("all") or <M - N_i, N_i> ("others"), in float64;
//       score_block        s_t += (E_t M) . h_t for the negative tokens (every token with score_positive);
//       pairwise groups (pairwise_group: few positive tokens):
//       pairwise_block     K_e += E+ E^T [T+, T];
//     pairwise_finish    pairwise groups: K_h = H+ H^T per token tile, s_t = sum_u K_e K_h, anchor sums;
//     finish_group       anchors sbar_i = sum / |y_i|, tau, selection s_t > tau, rescaled advantages.
//   The row chunks of errors_block and score_block and the N_i of positive_block are share()d (params.h): a
//   worker out of groups runs some of them for the groups still running (for_row_chunks; the same bits).
// Positive tokens are not scored one by one unless asked: a positive response's mean score is
// <M, N_i> / |y_i|, which saves 2 |V*| d T+ FLOPs per group.
// Scratch per worker slice of E = scratch_elems / kWorkers float32 elements: the E cache [T, vb] <= E,
// N and M [(P+1) vb, d] <= E, W* rows [vb, d], hidden cache [T, d] (when <= E, else [tb, d] blocks),
// one [tb, d] product tile, the logits' log-sum-exp tile <= E (which also holds W*^T or M packed once for the
// shared row chunks, <= E); a worker helping another group uses its own product tile; pairwise groups keep
// K_e [T+, T] <= E in the N_i and M buffer and K_h tiles <= E in the product tile; plus O(T) index vectors and one [|V|] int32
// marker (distinct_ids). Block sizes depend on E and the group only, never on the thread count. Nothing of
// size [n, |V|] exists, and [T+, T] only within a slice.
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "gemm.h"
#include "native.h"
#include "params.h"
#include "vec_kernels.h"

// op_name: a const char* in the calling scope (the op whose argument is wrong).
#define CHECK_ARG(cond, name, ...) TORCH_CHECK(cond, "nthr ", op_name, ": ", name, ": ", __VA_ARGS__)
#define CHECK_CPU_FLOAT(x, name) \
  CHECK_ARG((x).device().is_cpu() && at::isFloatingType((x).scalar_type()), name, "expected a floating-point CPU tensor")
#define CHECK_NUMEL(x, n, name) CHECK_ARG((x).numel() == (n), name, "expected ", (n), " elements, got ", (x).numel())
#define CHECK_IN_RANGE(v, hi, name) CHECK_ARG((v) >= 0 && (v) < (hi), name, "index ", (v), " outside [0, ", (hi), ")")
// Every x[0..n) in [0, hi): one branch-free min/max pass; the element-wise check (naming the first bad index)
// only when that pass fails.
#define CHECK_ALL_IN_RANGE(x, n, hi, name)                                     \
  do {                                                                         \
    if (!all_in_range((x), (n), (hi)))                                         \
      for (int64_t i_ = 0; i_ < (n); ++i_) CHECK_IN_RANGE((x)[i_], (hi), name); \
  } while (0)

namespace nthr {
namespace {

using at::Tensor;

bool all_in_range(const int64_t* x, int64_t n, int64_t hi) {
  int64_t lo = 0, top = -1;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    top = std::max(top, x[i]);
  }
  return lo >= 0 && top < hi;
}

// Per-worker scratch, reused across work items (see Scratch in params.h).
struct Workspace {
  Scratch h, wc, e, nm, prod, z;
  std::vector<int32_t> mark;  // [|V|], -1 between uses (distinct_ids)
};

// The distinct values of ids[0..n) (each in [0, vocab)) into vs, ascending (else in order of first
// appearance); with col, col[i] = the index of ids[i] in vs. Marks seen ids in ws.mark (O(n) and a sort of
// the distinct ids only, not of all n).
void distinct_ids(const int64_t* ids, int64_t n, int64_t vocab, Workspace& ws, std::vector<int64_t>& vs,
                  int64_t* col, bool ascending = true) {
  if (static_cast<int64_t>(ws.mark.size()) < vocab) ws.mark.assign(vocab, -1);
  vs.clear();
  for (int64_t i = 0; i < n; ++i)
    if (ws.mark[ids[i]] < 0) {
      ws.mark[ids[i]] = 0;
      vs.push_back(ids[i]);
    }
  if (ascending) std::sort(vs.begin(), vs.end());
  for (size_t j = 0; j < vs.size(); ++j) ws.mark[vs[j]] = static_cast<int32_t>(j);
  if (col)
    for (int64_t i = 0; i < n; ++i) col[i] = ws.mark[ids[i]];
  for (int64_t v : vs) ws.mark[v] = -1;
}

// A contiguous CPU copy of x in dtype `dt`, owned by p.keep; returns its data.
template <typename T>
const T* owned(AdvantagesParams& p, const Tensor& x, at::ScalarType dt) {
  p.keep.push_back(x.to(dt).contiguous());
  return p.keep.back().template const_data_ptr<T>();
}

// Copies rows toks[0..count) of src (a hidden- or logits-shaped tensor) into out (row stride ld).
void gather_tokens(const AdvantagesParams& p, const Tensor& src, const int64_t* toks, int64_t count,
                   const int64_t* cols, int64_t ncols, float* out, int64_t ld) {
  if (count == 0) return;
  std::vector<int64_t> ia(count), ib(p.tok_b ? count : 0);
  for (int64_t r = 0; r < count; ++r) {
    ia[r] = p.tok_a[toks[r]];
    if (p.tok_b) ib[r] = p.tok_b[toks[r]];
  }
  gather_rows(src, ia.data(), p.tok_b ? ib.data() : nullptr, count, cols, ncols, out, ld);
}

// ---------------------------------------------------------------------------------------------------
// the active groups' tokens
// ---------------------------------------------------------------------------------------------------
struct Groups {
  std::vector<int64_t> order;  // canonical token indices, by active group, positive responses first
  std::vector<int64_t> batch_index, start, len, n_pos_tokens;  // per active group
};

Groups order_groups(const AdvantagesParams& p) {
  Groups g;
  std::vector<int64_t> dense(p.n_groups, -1);
  for (int64_t k = 0; k < p.n_groups; ++k)
    if (p.group_active[k]) {
      dense[k] = static_cast<int64_t>(g.batch_index.size());
      g.batch_index.push_back(k);
    }
  const int64_t n_act = static_cast<int64_t>(g.batch_index.size());
  g.len.assign(n_act, 0);
  g.n_pos_tokens.assign(n_act, 0);
  for (int64_t t = 0; t < p.n_tokens; ++t) {
    const int64_t dg = dense[p.resp_group[p.tok_resp[t]]];
    if (dg < 0) continue;
    ++g.len[dg];
    g.n_pos_tokens[dg] += p.positive[p.tok_resp[t]];
  }
  g.start.assign(n_act + 1, 0);
  for (int64_t k = 0; k < n_act; ++k) g.start[k + 1] = g.start[k] + g.len[k];
  g.order.resize(g.start[n_act]);
  std::vector<int64_t> cur_pos(g.start.begin(), g.start.end() - 1), cur_neg(n_act);
  for (int64_t k = 0; k < n_act; ++k) cur_neg[k] = g.start[k] + g.n_pos_tokens[k];
  for (int64_t t = 0; t < p.n_tokens; ++t) {
    const int64_t r = p.tok_resp[t], dg = dense[p.resp_group[r]];
    if (dg >= 0) g.order[p.positive[r] ? cur_pos[dg]++ : cur_neg[dg]++] = t;
  }
  return g;
}

// fn(i, row) for the rows ia[i] (with ib: src[ia[i], ib[i]]) of src, i < n, each as float32 [d]: read in place
// where src has float32 rows, kPrefetchRows rows ahead prefetched, else converted into buf [n, d] first.
template <typename F>
void for_rows(const Tensor& src, const int64_t* ia, const int64_t* ib, int64_t n, int64_t d, Scratch& buf, const F& fn) {
  if (src.scalar_type() == at::kFloat && src.stride(-1) == 1) {
    const float* base = src.const_data_ptr<float>();
    const int64_t s0 = src.stride(0), s1 = ib ? src.stride(1) : 0;
    auto row = [&](int64_t i) { return base + ia[i] * s0 + (ib ? ib[i] * s1 : 0); };
    for (int64_t i = 0; i < n; ++i) {
      if (i + kPrefetchRows < n)
        for (int64_t j = 0; j < d; j += kFloatsPerLine) __builtin_prefetch(row(i + kPrefetchRows) + j);
      fn(i, row(i));
    }
    return;
  }
  float* b = buf.get(n * d);
  gather_rows(src, ia, ib, n, nullptr, d, b, d);
  for (int64_t i = 0; i < n; ++i) fn(i, b + i * d);
}

// out[i] = h_i . w_{ids[i]} for the n rows h [n, d] (weight rows through for_rows).
void dot_weight_rows(const Tensor& weight, const int64_t* ids, const float* h, int64_t n, int64_t d, Scratch& buf,
                     float* out) {
  for_rows(weight, ids, nullptr, n, d, buf, [&](int64_t i, const float* w) { out[i] = vec::dot(h + i * d, w, d); });
}

// ---------------------------------------------------------------------------------------------------
// log-sum-exp over weight rows: log Z over the whole vocabulary, and the old log-probs check over V*
// ---------------------------------------------------------------------------------------------------
// (max, sum) with max + log(sum) = log sum_v exp(h_i . w_v / T), for the rn hidden rows h [rn, d] and the
// weight rows ids[0..nc) (rows 0..nc when ids is null): per chunk of vc rows one GEMM tile Z^T = W_chunk H^T
// [vc, rn] (scratch ws.z; the weight rows are the GEMM's row-major left operand, read in place where they are
// float32 rows, else copied into ws.wc [vc, d]; H^T, the smaller operand when rn < vc, is the packed one),
// folded into a running (max, sum) per row of h by the GEMM's epilogue, a panel of rows at a time while it is
// in cache (the packed kernels: kGemmRowBlock weight rows per fold, the same on every machine; ATen's mm: the
// whole tile). With own (rows 0..nc only): own_z[i] = the logit of row i at weight row own[i], which is left
// out of the sum (the sum of the other tokens, sampled_logprob).
// Callers keep rn <= gemm_col_block(), so that the packed H^T stays in half of L2 (gemm.cpp).
void lse_over_rows(const Tensor& weight, float temperature, const float* h, int64_t rn, int64_t d,
                   const int64_t* ids, int64_t nc, int64_t vc, Workspace& ws, float* rmax, float* rsum,
                   const int64_t* own = nullptr, float* own_z = nullptr) {
  const bool w_view = ids == nullptr && weight.scalar_type() == at::kFloat && weight.stride(1) == 1;
  float* z = ws.z.get(rn * std::min(vc, nc));
  float* wb = w_view ? nullptr : ws.wc.get(std::min(vc, nc) * d);
  std::vector<int64_t> seq(ids || w_view ? 0 : vc);
  std::vector<std::pair<int64_t, int64_t>> mine;
  std::fill(rmax, rmax + rn, -std::numeric_limits<float>::infinity());
  std::fill(rsum, rsum + rn, 0.0f);
  const Tensor ht = mat(const_cast<float*>(h), rn, d, d).t();
  for (int64_t v0 = 0; v0 < nc; v0 += vc) {
    const int64_t vn = std::min(vc, nc - v0);
    Tensor wc;
    if (w_view) {
      wc = weight.narrow(0, v0, vn);
    } else {
      const int64_t* rows = ids ? ids + v0 : seq.data();
      if (!ids)
        for (int64_t j = 0; j < vn; ++j) seq[j] = v0 + j;
      gather_rows(weight, rows, nullptr, vn, nullptr, d, wb, d);
      wc = mat(wb, vn, d, d);
    }
    mine.clear();  // (row of the tile, row of h) of the own logits in this chunk, by tile row
    for (int64_t i = 0; own && i < rn; ++i)
      if (own[i] >= v0 && own[i] < v0 + vn) mine.emplace_back(own[i] - v0, i);
    std::sort(mine.begin(), mine.end());
    size_t next = 0;
    auto fold = [&](int64_t r0, int64_t rows) {  // rows in increasing order (RowsDone)
      for (; next < mine.size() && mine[next].first < r0 + rows; ++next) {
        float& zo = z[mine[next].first * rn + mine[next].second];
        own_z[mine[next].second] = zo;
        zo = -std::numeric_limits<float>::infinity();
      }
      vec::lse_update_cols(z + r0 * rn, rows, rn, rn, temperature, rmax, rsum);
    };
    gemm(mat(z, vn, rn, rn), wc, ht, false, fold, w_view);  // rows read in place stream from memory
  }
}

// log Z_t = z_y / T - l_t and the sampled token's log-prob l_t = -softplus(L - z_y / T) (vec::sampled_logprob)
// from L, the log-sum-exp of the other tokens' scaled logits, and the sampled token's own logit zy (unscaled).
inline void normaliser_from_others(float others, float zy, float temperature, float* log_z, float* lp) {
  const float z = vec::scaled_logit(zy, temperature);
  *lp = vec::sampled_logprob(others, z);
  *log_z = z - *lp;
}

// Weight without old log-probs: log Z_t and l_t over the whole vocabulary for rows toks[0..n), in chunks of rc
// tokens (rc from the slice and gemm_col_block(); no bit depends on it), one chunk per item, its hidden rows
// gathered once: the log-sum-exp of every token but the sampled one, whose logit comes from the same product
// (normaliser_from_others). Every item does the same arithmetic whichever thread runs it. errors_block takes
// the sampled token's error from lp[t].
void log_z_full_vocab(const AdvantagesParams& p, const int64_t* toks, int64_t n, float* out, float* lp) {
  const int64_t d = p.d, vocab = p.vocab;
  const int64_t vc = std::max<int64_t>(1, std::min<int64_t>(vocab, 1024));
  const int64_t rc = std::max<int64_t>(1, std::min<int64_t>({n, p.slice / (vc + d), gemm_col_block()}));
  std::vector<Workspace> ws(kWorkers);
  for_each_item((n + rc - 1) / rc, [&](int64_t item, int64_t w) {
    const int64_t r0 = item * rc, rn = std::min(rc, n - r0);
    float* h = ws[w].h.get(rn * d);
    std::vector<float> rmax(rn), rsum(rn), zy(rn);
    std::vector<int64_t> own(rn);
    for (int64_t i = 0; i < rn; ++i) own[i] = p.tok_ids[toks[r0 + i]];
    gather_tokens(p, p.hidden, toks + r0, rn, nullptr, d, h, d);
    lse_over_rows(p.weight, p.temperature, h, rn, d, nullptr, vocab, vc, ws[w], rmax.data(), rsum.data(), own.data(),
                  zy.data());
    for (int64_t i = 0; i < rn; ++i)
      normaliser_from_others(rmax[i] + std::log(rsum[i]), zy[i], p.temperature, out + r0 + i, lp + r0 + i);
  });
}

// ---------------------------------------------------------------------------------------------------
// one active group
// ---------------------------------------------------------------------------------------------------
struct Group {
  Group(const int64_t* toks_, int64_t T_, int64_t tp_, int64_t batch_index_)
      : toks(toks_), T(T_), tp(tp_), batch_index(batch_index_) {}
  const int64_t* toks;  // its tokens, the first tp of them positive
  int64_t T, tp, batch_index;
  std::vector<int64_t> seg;  // positive responses: toks[seg[k]..seg[k+1]) (each non-empty)
  std::vector<int64_t> vs, col;  // V* and each token's column in it
  std::vector<float> lz;  // log Z per token
  std::vector<float> lp;  // the sampled token's log-prob per token without old log-probs (with them: p.logprobs)
  int64_t vb = 1, tb = 1;  // column block of V*, token block
  int64_t vb_max = 1;  // the widest logits GEMM the slice allows (E cache T x width, W* rows width x d)
  int64_t ld = 1;  // row stride of the E cache in the current column block (>= its width)
  // scratch (the worker's): hidden cache [T, d] or one [tb, d] block; W* rows, E cache, N_i and M, tile
  float *h = nullptr, *wc = nullptr, *e = nullptr, *nm = nullptr, *prod = nullptr;
  float* pack = nullptr;  // W*^T or M packed once for the shared row chunks (can_share), pack_cap floats
  int64_t pack_cap = 0;
  bool h_cached = false;
  bool lz_from_row = false;  // log Z from each token's own logit in the logits GEMM (old log-probs, one V* block)
  bool pairwise = false;  // scores from the positive tokens' products, no M (pairwise_group, set by group_vstar)
  float* ke = nullptr;  // pairwise: K_e = E+ E^T [tp, T], summed over the column blocks

  // hidden rows t0..t0+tn of the group (from the cache, or gathered into the block buffer)
  const float* hrows(const AdvantagesParams& p, int64_t t0, int64_t tn) {
    if (h_cached) return h + t0 * p.d;
    gather_tokens(p, p.hidden, toks + t0, tn, nullptr, p.d, h, p.d);
    return h;
  }
};

// One worker's slice of the scratch budget (params.h): scratch_elems / kWorkers float32 elements, at least d.
int64_t worker_slice(int64_t scratch_elems, int64_t d) {
  return std::max<int64_t>(std::max<int64_t>(scratch_elems, 1) / kWorkers, d);
}

// Pairwise or factored, per group (docs/NTHR.md, "Positive anchors without scoring positive tokens"): the
// scores need sum_u (e_u . e_t)(h_u . h_t) over the positive tokens u, for the negative tokens t and (as the
// anchors' sums) the positive ones: 2 T+ T (|V*| + d) FLOPs, against 2 |V*| d T for M and E_t M (plus 2 |V*| d T+ with score_positive). Pairwise needs K_e [T+, T]
// and the hidden cache [T, d] within the slice. The cost comparison is the rule of
// nthr_kernels.ops.advantages.native_impl.pairwise_cheaper (tests compare the two through
// nthr::native_pairwise_group); exact integer arithmetic.
bool pairwise_group(int64_t tp, int64_t T, int64_t nv, int64_t d, bool score_positive, int64_t slice) {
  if (tp <= 0 || tp > slice / std::max<int64_t>(T, 1) || T > slice / std::max<int64_t>(d, 1)) return false;
  using wide = __int128;
  return wide(tp) * T * (nv + d) < wide(nv) * d * (T + (score_positive ? tp : 0));
}

// V*, each token's column in it, the path, the positive responses' segments.
void group_vstar(const AdvantagesParams& p, Group& g, Workspace& ws) {
  std::vector<int64_t> ids(g.T);
  for (int64_t i = 0; i < g.T; ++i) ids[i] = p.tok_ids[g.toks[i]];
  g.col.resize(g.T);
  distinct_ids(ids.data(), g.T, p.vocab, ws, g.vs, g.col.data());
  g.pairwise = pairwise_group(g.tp, g.T, static_cast<int64_t>(g.vs.size()), p.d, p.score_positive, p.slice);
  g.seg.assign(1, 0);
  for (int64_t i = 1; i < g.tp; ++i)
    if (p.tok_resp[g.toks[i]] != p.tok_resp[g.toks[i - 1]]) g.seg.push_back(i);
  if (g.tp > 0) g.seg.push_back(g.tp);
}

// Block sizes from the slice E alone: E cache T vb <= E, N and M (P + 1) vb d <= E, tiles tb d <= E;
// V* in equal column blocks (no small remainder block). The logits GEMM of a block computes
// errors_width(cw) >= cw columns (see there), still within vb_max.
// The logits GEMM [tn, d] x [d, width] runs 10-15 % slower in MKL when its width is not a multiple of 16
// (measured: 97 GFLOP/s at 235 columns, 110 at 240, one thread): a column block of cw columns computes
// that many, the extra ones against zero weight rows and never read. Only with the weight; within vb_max.
constexpr int64_t kGemmWidth = 16;
int64_t errors_width(const AdvantagesParams& p, const Group& g, int64_t cw) {
  if (!p.weight.defined()) return cw;
  return std::max(cw, std::min((cw + kGemmWidth - 1) / kGemmWidth * kGemmWidth, g.vb_max));
}

void group_blocks(const AdvantagesParams& p, Group& g, Workspace& ws) {
  const int64_t d = p.d, E = p.slice, nv = static_cast<int64_t>(g.vs.size());
  const int64_t n_pos = static_cast<int64_t>(g.seg.size()) - 1;
  const int64_t nm_cols = g.pairwise ? nv : E / ((n_pos + 1) * d);  // pairwise keeps no N_i, M
  const int64_t vb_max = std::max<int64_t>(1, std::min<int64_t>({nv, E / std::max<int64_t>(g.T, 1), nm_cols}));
  const int64_t n_blocks = std::max<int64_t>(1, (nv + vb_max - 1) / vb_max);
  g.vb = std::max<int64_t>(1, (nv + n_blocks - 1) / n_blocks);
  g.vb_max = std::max(g.vb, std::min(E / std::max<int64_t>(g.T, 1), E / d));
  g.tb = std::max<int64_t>(1, std::min<int64_t>(g.T, E / std::max(g.vb, d)));
  g.h_cached = g.T * d <= E;
  g.h = ws.h.get(g.h_cached ? g.T * d : g.tb * d);
  if (g.h_cached) gather_tokens(p, p.hidden, g.toks, g.T, nullptr, d, g.h, d);
  g.wc = ws.wc.get(p.weight.defined() ? errors_width(p, g, g.vb) * d : 0);
  g.e = ws.e.get(g.T * errors_width(p, g, g.vb));
  g.nm = g.pairwise ? nullptr : ws.nm.get((n_pos + 1) * g.vb * d);
  g.prod = ws.prod.get(g.tb * d);
  g.ke = g.pairwise ? ws.nm.get(g.tp * g.T) : nullptr;
}

// log Z_t = z_t[y_t] / T - l_t: l_t the old log-prob, or from the log-sum-exp of the given logits row but the
// sampled token (normaliser_from_others; into g.lp).
void group_log_z(const AdvantagesParams& p, Group& g, Workspace& ws) {
  const int64_t d = p.d;
  g.lz.resize(g.T);
  if (p.logprobs) {
    std::vector<int64_t> ids(g.tb);
    for (int64_t t0 = 0; t0 < g.T; t0 += g.tb) {
      const int64_t tn = std::min(g.tb, g.T - t0);
      for (int64_t i = 0; i < tn; ++i) ids[i] = p.tok_ids[g.toks[t0 + i]];
      dot_weight_rows(p.weight, ids.data(), g.hrows(p, t0, tn), tn, d, ws.prod, g.lz.data() + t0);
      for (int64_t i = 0; i < tn; ++i) g.lz[t0 + i] = vec::scaled_logit(g.lz[t0 + i], p.temperature) - p.logprobs[g.toks[t0 + i]];
    }
    return;
  }
  const int64_t vc = std::max<int64_t>(1, std::min(p.vocab, p.slice / g.tb));
  float* zb = ws.z.get(g.tb * vc);
  std::vector<int64_t> cols(vc);
  std::vector<float> rmax(g.tb), rsum(g.tb), zy(g.tb);
  g.lp.resize(g.T);
  for (int64_t t0 = 0; t0 < g.T; t0 += g.tb) {
    const int64_t tn = std::min(g.tb, g.T - t0);
    std::fill(rmax.begin(), rmax.end(), -std::numeric_limits<float>::infinity());
    std::fill(rsum.begin(), rsum.end(), 0.0f);
    for (int64_t v0 = 0; v0 < p.vocab; v0 += vc) {
      const int64_t vn = std::min(vc, p.vocab - v0);
      for (int64_t j = 0; j < vn; ++j) cols[j] = v0 + j;
      gather_tokens(p, p.logits, g.toks + t0, tn, cols.data(), vn, zb, vn);
      for (int64_t i = 0; i < tn; ++i) {
        const int64_t y = p.tok_ids[g.toks[t0 + i]] - v0;
        if (y >= 0 && y < vn) {  // the sampled token leaves the sum
          zy[i] = zb[i * vn + y];
          zb[i * vn + y] = -std::numeric_limits<float>::infinity();
        }
        vec::lse_update(zb + i * vn, vn, p.temperature, &rmax[i], &rsum[i]);
      }
    }
    for (int64_t i = 0; i < tn; ++i)
      normaliser_from_others(rmax[i] + std::log(rsum[i]), zy[i], p.temperature, &g.lz[t0 + i], &g.lp[t0 + i]);
  }
}

// Rows [0, rows) of a phase as fn(r0, rn, w) over chunks of at most `chunk` rows, w the worker running the chunk
// (its scratch is free to use). Where a worker of the group loop has run out of groups, the chunks (of at most
// kShareRows) are shared with it (share(), params.h): only with the hidden rows cached (no shared gather buffer)
// and the packed GEMM kernels, whose rows do not depend on how the rows are blocked (ATen's do), so the chunks
// give the same bits however they are cut and whichever thread runs them.
constexpr int64_t kShareRows = 16 * kGemmRowBlock;
bool can_share(const Group& g) { return g.h_cached && gemm_rows_independent() && team_shares(); }

// B for the row chunks of a product: packed once into g.pack where the chunks may be shared and it fits, else
// B as it is (each chunk packs it again; the same bits either way).
PackedB pack_for_chunks(const Group& g, const Tensor& b) {
  if (can_share(g) && packed_b_elems(b.size(0), b.size(1)) <= g.pack_cap) return pack_b_once(b, g.pack);
  return PackedB{b};
}

template <typename F>
void for_row_chunks(const Group& g, int64_t rows, int64_t chunk, const F& fn) {
  if (can_share(g)) {
    const int64_t c = std::max<int64_t>(1, std::min(chunk, kShareRows));
    share((rows + c - 1) / c, [&](int64_t i, int64_t w) { fn(i * c, std::min(c, rows - i * c), w); });
    return;
  }
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) fn(r0, std::min(chunk, rows - r0), tl_worker);
}

// E [T, cw] = onehot - exp(z / T - log Z) on columns [c0, c0 + cw) of V*, rows g.ld apart; with the weight,
// each row finished by the logits GEMM's epilogue while it is in cache (with g.lz_from_row, first its
// log Z = z[y_t] / T - l_t from its own logit, z / T rounded as neg_softmax_slice rounds it).
void errors_block(const AdvantagesParams& p, Group& g, int64_t c0, int64_t cw) {
  const int64_t d = p.d, ld = g.ld = errors_width(p, g, cw);
  PackedB wt;  // W*^T for the row chunks
  if (p.weight.defined()) {
    gather_rows(p.weight, g.vs.data() + c0, nullptr, cw, nullptr, d, g.wc, d);
    std::fill(g.wc + cw * d, g.wc + ld * d, 0.0f);
    const Tensor w = mat(g.wc, ld, d, d).t();
    wt = pack_for_chunks(g, w);
  }
  for_row_chunks(g, g.T, g.tb, [&](int64_t t0, int64_t tn, int64_t) {
    float* et = g.e + t0 * ld;
    auto finish = [&](int64_t r0, int64_t rn) {
      for (int64_t i = r0; i < r0 + rn; ++i) {
        float* row = et + i * ld;
        const int64_t t = t0 + i, c = g.col[t] - c0;
        if (g.lz_from_row) g.lz[t] = vec::scaled_logit(row[c], p.temperature) - p.logprobs[g.toks[t]];
        vec::neg_softmax_slice(row, cw, p.temperature, g.lz[t]);
        // the sampled token's own probability is exp(l_t) by the definition log Z_t = z_t[y_t] / T - l_t (l_t the
        // old log-prob or from the other tokens' log-sum-exp): its error 1 - exp(l_t) = -expm1(l_t), taken from
        // l_t, not from exp(z / T - log Z), where the rounding of log Z (one float32 step of z / T) would give a
        // near-certain token an error of that size, nor as 1 - exp(l_t) in float32, which cancels its small
        // digits (the torch and Triton backends do the same)
        if (c >= 0 && c < cw) row[c] = -std::expm1(p.logprobs ? p.logprobs[g.toks[t]] : g.lp[t]);
      }
    };
    if (p.weight.defined()) {
      gemm_packed(mat(et, tn, ld, ld), mat(const_cast<float*>(g.hrows(p, t0, tn)), tn, d, d), wt, false, finish);
    } else {
      gather_tokens(p, p.logits, g.toks + t0, tn, g.vs.data() + c0, cw, et, ld);
      finish(0, tn);
    }
  });
}

// N_i = E_i^T H_i [cw, d] for every positive response i (slots 1..P of nm), M = sum_i N_i in response
// order (slot 0); anchor[i] += <M, N_i> ("all") or <M - N_i, N_i> ("others"), in float64.
void positive_block(const AdvantagesParams& p, Group& g, int64_t cw, std::vector<double>& anchor) {
  const int64_t d = p.d, n_pos = static_cast<int64_t>(g.seg.size()) - 1;
  auto one = [&](int64_t k, int64_t) {  // N_k: its own slot of nm, summed over its tokens in order
    Tensor nk = mat(g.nm + (k + 1) * cw * d, cw, d, d);
    for (int64_t t0 = g.seg[k]; t0 < g.seg[k + 1]; t0 += g.tb) {
      const int64_t tn = std::min(g.tb, g.seg[k + 1] - t0);
      gemm(nk, mat(g.e + t0 * g.ld, tn, cw, g.ld).t(), mat(const_cast<float*>(g.hrows(p, t0, tn)), tn, d, d),
           t0 > g.seg[k]);
    }
  };
  if (can_share(g)) share(n_pos, one);  // one response per sub-item: the same bits (see for_row_chunks)
  else
    for (int64_t k = 0; k < n_pos; ++k) one(k, tl_worker);
  Tensor m = mat(g.nm, cw, d, d);
  for (int64_t k = 0; k < n_pos; ++k) {
    const Tensor nk = mat(g.nm + (k + 1) * cw * d, cw, d, d);
    if (k == 0) m.copy_(nk);
    else m.add_(nk);
  }
  for (int64_t k = 0; k < n_pos; ++k) {
    const float* nk = g.nm + (k + 1) * cw * d;
    anchor[k] += p.anchor_others ? vec::dot_others_f64(g.nm, nk, cw * d) : vec::dot_f64(g.nm, nk, cw * d);
  }
}

// s[t] += (E_t M) . h_t for tokens t in [r0, T) (the product tile: the running worker's, ws[w].prod).
void score_block(const AdvantagesParams& p, Group& g, int64_t cw, int64_t r0, std::vector<float>& s,
                 std::vector<Workspace>& ws) {
  const int64_t d = p.d;
  const Tensor m = mat(g.nm, cw, d, d);
  const PackedB mp = pack_for_chunks(g, m);
  for_row_chunks(g, g.T - r0, g.tb, [&](int64_t a, int64_t tn, int64_t w) {
    const int64_t t0 = r0 + a;
    float* prod = ws[w].prod.get(tn * d);  // tn <= tb: the group's own tile where w is its worker
    gemm_packed(mat(prod, tn, d, d), mat(g.e + t0 * g.ld, tn, cw, g.ld), mp);
    vec::dot_rows(prod, g.hrows(p, t0, tn), tn, d, s.data() + t0);
  });
}

// Pairwise: K_e [tp, T] (+)= E+ E^T on the columns of this block (E+ the first tp rows of the E cache).
void pairwise_block(Group& g, int64_t cw, bool first) {
  Tensor ke = mat(g.ke, g.tp, g.T, g.T);
  const Tensor ep = mat(g.e, g.tp, cw, g.ld), ea = mat(g.e, g.T, cw, g.ld).t();
  gemm(ke, ep, ea, !first);
}

// Pairwise, after the last block: per token tile, K_h = H+ H_tile^T [tp, tn] (hidden cache), then
// s_t = sum_u K_e[u, t] K_h[u, t] (float32, u in order) for the negative tokens (every token with
// score_positive), and the anchor sums in float64: anchor[k] += K_e[u, t] K_h[u, t] over the tokens t of
// positive response k and the positive tokens u (not those of response k for "others").
void pairwise_finish(const AdvantagesParams& p, Group& g, Workspace& ws, std::vector<double>& anchor,
                     std::vector<float>& s) {
  const int64_t d = p.d, tp = g.tp, T = g.T;
  const int64_t tn_max = std::max<int64_t>(1, std::min(T, p.slice / tp));
  float* kh = g.prod = ws.prod.get(tp * tn_max);
  std::vector<int64_t> resp(tp);  // each positive token's response slot
  for (size_t k = 0; k + 1 < g.seg.size(); ++k)
    for (int64_t i = g.seg[k]; i < g.seg[k + 1]; ++i) resp[i] = static_cast<int64_t>(k);
  const Tensor hp = mat(g.h, tp, d, d);
  for (int64_t t0 = 0; t0 < T; t0 += tn_max) {
    const int64_t tn = std::min(tn_max, T - t0);
    Tensor khm = mat(kh, tp, tn, tn);
    gemm(khm, hp, mat(g.h + t0 * d, tn, d, d).t());
    const int64_t r0 = std::max<int64_t>(t0, p.score_positive ? 0 : tp);  // first token scored in the tile
    if (r0 < t0 + tn) vec::colsum_product(g.ke + r0, T, kh + (r0 - t0), tn, tp, t0 + tn - r0, s.data() + r0);
    for (int64_t t = t0; t < std::min(t0 + tn, tp); ++t) {  // the positive tokens of the tile
      double a = 0.0;
      for (int64_t u = 0; u < tp; ++u)
        if (!(p.anchor_others && resp[u] == resp[t])) a += static_cast<double>(g.ke[u * T + t]) * kh[u * tn + (t - t0)];
      anchor[resp[t]] += a;
    }
  }
}

// tau = beta * min anchor, with beta = 0 -> 0 and beta = -inf -> -inf: the rule of
// nthr_kernels.core.rules.tau_from_min_anchor (tests compare the two).
double tau_from_min_anchor(double min_anchor, double beta) {
  if (beta == 0.0) return 0.0;
  if (std::isinf(beta) && beta < 0) return -std::numeric_limits<double>::infinity();
  return beta * min_anchor;
}

void finish_group(const AdvantagesParams& p, const Group& g, const std::vector<double>& anchor,
                  const std::vector<float>& s) {
  double min_anchor = std::numeric_limits<double>::infinity();
  for (size_t k = 0; k + 1 < g.seg.size(); ++k)
    min_anchor = std::min(min_anchor, anchor[k] / static_cast<double>(g.seg[k + 1] - g.seg[k]));
  const float tau = static_cast<float>(tau_from_min_anchor(min_anchor, p.beta));
  const float eta = static_cast<float>(p.eta[g.batch_index]);
  for (int64_t i = 0; i < g.T; ++i) {
    const int64_t t = g.toks[i];
    p.scores[t] = s[i];
    if (i >= g.tp && s[i] > tau) {
      p.selected[t] = true;
      p.token_adv[t] = p.adv[p.tok_resp[t]] * eta;
    }
  }
  p.tau[g.batch_index] = tau;
}

// The group's FLOPs on the path it takes (for the schedule only; V* known).
double group_flops(const AdvantagesParams& p, const Group& g) {
  const double nv = static_cast<double>(g.vs.size()), d = static_cast<double>(p.d), T = g.T, tp = g.tp;
  return g.pairwise ? 2 * nv * d * T + 2 * tp * T * (nv + d) : 4 * nv * d * T;
}

// After group_vstar.
// On worker w, whose workspace is all[w] (score_block's helpers use theirs).
void process_group(const AdvantagesParams& p, Group& g, std::vector<Workspace>& all, int64_t w, const float* lz_full,
                   const float* lp_full) {
  Workspace& ws = all[w];
  group_blocks(p, g, ws);
  g.lz_from_row = p.logprobs && g.vb >= static_cast<int64_t>(g.vs.size());
  if (lp_full) g.lp.assign(lp_full, lp_full + g.T);
  if (lz_full) g.lz.assign(lz_full, lz_full + g.T);
  else if (g.lz_from_row) g.lz.resize(g.T);
  else group_log_z(p, g, ws);
  // after group_log_z, which also takes ws.z; within the slice (a larger packing is not shared: pack_for_chunks);
  // none where nothing is shared, and no W*^T without the weight
  g.pack_cap = !can_share(g) ? 0
               : std::min(p.slice, std::max(p.weight.defined() ? packed_b_elems(p.d, errors_width(p, g, g.vb)) : 0,
                                            g.pairwise ? 0 : packed_b_elems(g.vb, p.d)));
  g.pack = ws.z.get(g.pack_cap);
  std::vector<double> anchor(g.seg.size() - 1, 0.0);
  std::vector<float> s(g.T, 0.0f);
  const int64_t nv = static_cast<int64_t>(g.vs.size());
  // No positive token (only a direct call marks such a group active; validation does not): M is an empty sum, every
  // score 0 and tau = beta * inf. The blocks are skipped: positive_block would leave M, which score_block reads, unwritten.
  for (int64_t c0 = 0; g.tp > 0 && c0 < nv; c0 += g.vb) {
    const int64_t cw = std::min(g.vb, nv - c0);
    errors_block(p, g, c0, cw);
    if (g.pairwise) {
      pairwise_block(g, cw, c0 == 0);
    } else {
      positive_block(p, g, cw, anchor);
      score_block(p, g, cw, p.score_positive ? 0 : g.tp, s, all);
    }
  }
  if (g.pairwise) pairwise_finish(p, g, ws, anchor, s);
  finish_group(p, g, anchor, s);
}

// ---------------------------------------------------------------------------------------------------
// the op
// ---------------------------------------------------------------------------------------------------
// Checks every argument the kernels index with (so that no call, however malformed, reads out of bounds or
// divides by zero) and fills the params. Outputs are allocated by the caller and pointed to here.
// The token source, shared by both ops: hidden, the canonical token list, lm_head_weight or logits,
// the temperature and the scratch slice.
void set_token_params(AdvantagesParams& p, const char* op_name, const Tensor& hidden, const Tensor& tok_a,
                      const std::optional<Tensor>& tok_b, const Tensor& tok_ids,
                      const std::optional<Tensor>& lm_head_weight, const std::optional<Tensor>& logits,
                      double temperature, int64_t scratch_elems) {
  CHECK_CPU_FLOAT(hidden, "hidden");
  CHECK_ARG(hidden.dim() == (tok_b ? 3 : 2), "hidden", "expected ", (tok_b ? 3 : 2), " dims (", (tok_b ? "with" : "without"),
            " tok_b), got ", hidden.dim());
  CHECK_ARG(hidden.size(-1) > 0, "hidden", "the hidden size (last dim) must be positive, got 0");
  CHECK_ARG(lm_head_weight.has_value() != logits.has_value(), "lm_head_weight/logits", "pass exactly one");
  CHECK_ARG(temperature > 0 && std::isfinite(temperature), "temperature", "must be finite and > 0, got ", temperature);
  p.hidden = hidden;
  p.d = hidden.size(-1);
  p.n_tokens = tok_ids.numel();
  if (lm_head_weight) {
    p.weight = *lm_head_weight;
    CHECK_CPU_FLOAT(p.weight, "lm_head_weight");
    CHECK_ARG(p.weight.dim() == 2 && p.weight.size(1) == p.d, "lm_head_weight", "expected [V, ", p.d, "], got ",
              p.weight.sizes());
    p.vocab = p.weight.size(0);
  } else {
    p.logits = *logits;
    CHECK_CPU_FLOAT(p.logits, "logits");
    CHECK_ARG(p.logits.dim() == hidden.dim() && p.logits.sizes().slice(0, hidden.dim() - 1) ==
                                                  hidden.sizes().slice(0, hidden.dim() - 1),
              "logits", "expected hidden's leading dims ", hidden.sizes().slice(0, hidden.dim() - 1), ", got ",
              p.logits.sizes());
    p.vocab = p.logits.size(-1);
  }
  CHECK_NUMEL(tok_a, p.n_tokens, "tok_a");
  p.tok_a = owned<int64_t>(p, tok_a, at::kLong);
  p.tok_ids = owned<int64_t>(p, tok_ids, at::kLong);
  if (tok_b) {
    CHECK_NUMEL(*tok_b, p.n_tokens, "tok_b");
    p.tok_b = owned<int64_t>(p, *tok_b, at::kLong);
  }
  CHECK_ALL_IN_RANGE(p.tok_a, p.n_tokens, hidden.size(0), "tok_a");
  if (p.tok_b) CHECK_ALL_IN_RANGE(p.tok_b, p.n_tokens, hidden.size(1), "tok_b");
  CHECK_ALL_IN_RANGE(p.tok_ids, p.n_tokens, p.vocab, "tok_ids");
  p.temperature = static_cast<float>(temperature);
  p.slice = worker_slice(scratch_elems, p.d);
}

AdvantagesParams set_advantages_params(
    const Tensor& hidden, const Tensor& tok_a, const std::optional<Tensor>& tok_b, const Tensor& tok_ids,
    const Tensor& tok_resp, const Tensor& resp_group, const Tensor& positive, const Tensor& adv,
    const Tensor& group_active, const Tensor& eta_group, const std::optional<Tensor>& lm_head_weight,
    const std::optional<Tensor>& logits, const std::optional<Tensor>& logprobs, double temperature, double beta,
    bool anchor_others, int64_t scratch_elems, bool score_positive) {
  constexpr const char* op_name = "native_advantages";
  AdvantagesParams p;
  set_token_params(p, op_name, hidden, tok_a, tok_b, tok_ids, lm_head_weight, logits, temperature, scratch_elems);
  CHECK_ARG(!(logprobs && logits), "logprobs", "only with lm_head_weight");
  CHECK_ARG(!std::isnan(beta), "beta", "must not be NaN");
  p.n_resp = resp_group.numel();
  p.n_groups = group_active.numel();
  CHECK_NUMEL(tok_resp, p.n_tokens, "tok_resp");
  CHECK_NUMEL(positive, p.n_resp, "positive");
  CHECK_NUMEL(adv, p.n_resp, "adv");
  CHECK_NUMEL(eta_group, p.n_groups, "eta_group");
  p.tok_resp = owned<int64_t>(p, tok_resp, at::kLong);
  p.resp_group = owned<int64_t>(p, resp_group, at::kLong);
  p.positive = owned<bool>(p, positive, at::kBool);
  p.adv = owned<float>(p, adv, at::kFloat);
  p.group_active = owned<bool>(p, group_active, at::kBool);
  p.eta = owned<double>(p, eta_group, at::kDouble);
  if (logprobs) {
    CHECK_NUMEL(*logprobs, p.n_tokens, "logprobs");
    p.logprobs = owned<float>(p, *logprobs, at::kFloat);
  }
  CHECK_ALL_IN_RANGE(p.resp_group, p.n_resp, p.n_groups, "resp_group");
  CHECK_ALL_IN_RANGE(p.tok_resp, p.n_tokens, p.n_resp, "tok_resp");
  p.beta = beta;
  p.anchor_others = anchor_others;
  p.score_positive = score_positive;
  return p;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> advantages_cpu(
    const Tensor& hidden, const Tensor& tok_a, const std::optional<Tensor>& tok_b, const Tensor& tok_ids,
    const Tensor& tok_resp, const Tensor& resp_group, const Tensor& positive, const Tensor& adv,
    const Tensor& group_active, const Tensor& eta_group, const std::optional<Tensor>& lm_head_weight,
    const std::optional<Tensor>& logits, const std::optional<Tensor>& logprobs, double temperature, double beta,
    bool anchor_others, int64_t scratch_elems, bool score_positive) {
  AdvantagesParams p = set_advantages_params(hidden, tok_a, tok_b, tok_ids, tok_resp, resp_group, positive, adv,
                                             group_active, eta_group, lm_head_weight, logits, logprobs, temperature,
                                             beta, anchor_others, scratch_elems, score_positive);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const Tensor active = group_active.to(at::kBool), eta_g = eta_group.to(at::kDouble);
  Tensor scores = at::zeros({p.n_tokens}, f32), selected = at::zeros({p.n_tokens}, at::TensorOptions().dtype(at::kBool));
  Tensor tau = at::full({p.n_groups}, std::numeric_limits<float>::quiet_NaN(), f32);
  Tensor eta_out = at::where(active, eta_g, at::ones_like(eta_g)).to(at::kFloat);
  Tensor token_adv = adv.to(at::kFloat).index_select(0, tok_resp.to(at::kLong));
  p.scores = scores.data_ptr<float>();
  p.selected = selected.data_ptr<bool>();
  p.token_adv = token_adv.data_ptr<float>();
  p.tau = tau.data_ptr<float>();

  // NTHR_NATIVE_TRACE=1: phase timings on stderr (diagnostics; any other value, "0" included, leaves them off)
  const char* trace_env = std::getenv("NTHR_NATIVE_TRACE");
  const bool trace = trace_env != nullptr && std::strcmp(trace_env, "1") == 0;
  auto clock = std::chrono::steady_clock::now();
  auto lap = [&](const char* what) {
    if (!trace) return;
    const auto now = std::chrono::steady_clock::now();
    std::fprintf(stderr, "nthr native_advantages: %s %.3f s\n", what, std::chrono::duration<double>(now - clock).count());
    clock = now;
  };

  Groups g = order_groups(p);
  lap("setup");
  std::vector<float> lz_full, lp_full;
  if (p.weight.defined() && !p.logprobs) {
    lz_full.resize(g.order.size());
    lp_full.resize(g.order.size());
    log_z_full_vocab(p, g.order.data(), static_cast<int64_t>(g.order.size()), lz_full.data(), lp_full.data());
  }
  lap("log Z (full vocabulary)");
  const int64_t n_act = static_cast<int64_t>(g.batch_index.size());
  std::vector<Group> groups;
  groups.reserve(n_act);
  for (int64_t k = 0; k < n_act; ++k) groups.emplace_back(g.order.data() + g.start[k], g.len[k], g.n_pos_tokens[k], g.batch_index[k]);
  std::vector<Workspace> ws(kWorkers);
  for_each_item(n_act, [&](int64_t k, int64_t w) { group_vstar(p, groups[k], ws[w]); });
  // most FLOPs first (pairwise groups do far less work per token): better balance, same results
  std::vector<double> flops(n_act);
  std::vector<int64_t> order(n_act);
  for (int64_t k = 0; k < n_act; ++k) {
    flops[k] = group_flops(p, groups[k]);
    order[k] = k;
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return flops[x] > flops[y]; });
  lap("V*");
  for_each_item(n_act, [&](int64_t i, int64_t w) {
    const int64_t k = order[i];
    process_group(p, groups[k], ws, w, lz_full.empty() ? nullptr : lz_full.data() + g.start[k],
                  lp_full.empty() ? nullptr : lp_full.data() + g.start[k]);
  }, /*help=*/true);
  lap("groups");
  return {scores, selected, token_adv, tau, eta_out};
}

// ---------------------------------------------------------------------------------------------------
// the value checks: row norms and the old log-probs check
// ---------------------------------------------------------------------------------------------------
namespace {
constexpr int64_t kNormRows = 256;  // rows per norm item

inline double max_norm(double acc, double r) { return (r > acc || std::isnan(r)) && !std::isnan(acc) ? r : acc; }

// The largest norm of rows ia[0..rn) (with ib: src[ia, ib]) of src (through for_rows), from float32 sums of
// squares of the float32 values, like the torch path's vector_norm (a non-finite value gives a non-finite norm,
// and so does a finite one beyond ~1.8e19; NaN wins).
double max_row_norm(const Tensor& src, const int64_t* ia, const int64_t* ib, int64_t rn, int64_t d, Scratch& buf) {
  double acc = 0.0;
  for_rows(src, ia, ib, rn, d, buf, [&](int64_t, const float* r) { acc = max_norm(acc, std::sqrt(vec::dot(r, r, d))); });
  return acc;
}
}  // namespace

// float64 [2 + k]. With `norms`: [0] the largest norm of the hidden rows at the canonical tokens, [1] of the
// lm_head_weight rows the call reads (every row with weight_all_rows, else the rows of the distinct tok_ids);
// else both 0. With idx (k sampled canonical tokens, their old log-probs logprobs [k], tok_group [n]): [2 + j] =
// m_j = l_j + log sum_{v in V*} exp((w_v - w_{y_t}) . h_t / T) at t = idx[j] (docs/NTHR.md, "Checking
// old_logprobs"), V* the distinct ids of token t's group (in order of first appearance), float32 products and
// float64 result, per group in blocks of rb sampled rows against V* in column blocks of vc (rb d, vc d, rb vc <=
// the slice), through lse_over_rows.
// One parallel region: the groups holding sampled tokens (GEMMs) interleaved with chunks of kNormRows rows for
// the norms (memory reads), so that one thread streams rows while the other multiplies.
Tensor check_values_cpu(const Tensor& hidden, const Tensor& tok_a, const std::optional<Tensor>& tok_b,
                        const Tensor& tok_ids, const Tensor& lm_head_weight, bool norms, bool weight_all_rows,
                        const std::optional<Tensor>& tok_group, const std::optional<Tensor>& logprobs,
                        const std::optional<Tensor>& idx, int64_t n_groups, double temperature, int64_t scratch_elems) {
  constexpr const char* op_name = "native_check_values";
  AdvantagesParams p;
  set_token_params(p, op_name, hidden, tok_a, tok_b, tok_ids, lm_head_weight, std::nullopt, temperature, scratch_elems);
  CHECK_ARG(idx.has_value() == logprobs.has_value() && idx.has_value() == tok_group.has_value(), "idx/logprobs/tok_group",
            "pass all three or none");
  const int64_t k = idx ? idx->numel() : 0, d = p.d, n = p.n_tokens;
  const int64_t *group = nullptr, *sample = nullptr;
  const float* lp = nullptr;
  if (idx) {
    CHECK_NUMEL(*tok_group, n, "tok_group");
    CHECK_NUMEL(*logprobs, k, "logprobs");
    group = owned<int64_t>(p, *tok_group, at::kLong);
    sample = owned<int64_t>(p, *idx, at::kLong);
    lp = owned<float>(p, *logprobs, at::kFloat);
    CHECK_ALL_IN_RANGE(group, n, n_groups, "tok_group");
    CHECK_ALL_IN_RANGE(sample, k, n, "idx");
  }
  Tensor out = at::zeros({2 + k}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();

  // the old log-probs check: each group's sampled positions (sample order) and token ids (canonical order,
  // ids[id_start[g] .. id_start[g + 1]), a counting sort)
  std::vector<std::vector<int64_t>> picks(k ? n_groups : 0);
  std::vector<int64_t> mass_items, id_start(k ? n_groups + 1 : 0, 0), ids(k ? n : 0);
  for (int64_t j = 0; j < k; ++j) picks[group[sample[j]]].push_back(j);
  for (int64_t g = 0; g < static_cast<int64_t>(picks.size()); ++g)
    if (!picks[g].empty()) mass_items.push_back(g);
  if (k) {
    for (int64_t t = 0; t < n; ++t) ++id_start[group[t] + 1];
    for (int64_t g = 0; g < n_groups; ++g) id_start[g + 1] += id_start[g];
    std::vector<int64_t> cur(id_start.begin(), id_start.end() - 1);
    for (int64_t t = 0; t < n; ++t) ids[cur[group[t]]++] = p.tok_ids[t];
  }

  // the norms: hidden rows, then the weight rows read
  std::vector<Workspace> ws(kWorkers);
  std::vector<int64_t> wrows;  // the distinct ids (empty with weight_all_rows)
  if (norms && !weight_all_rows) distinct_ids(p.tok_ids, n, p.vocab, ws[0], wrows, nullptr, false);
  const int64_t nw = !norms ? 0 : weight_all_rows ? p.vocab : static_cast<int64_t>(wrows.size());
  const int64_t items_h = norms ? (n + kNormRows - 1) / kNormRows : 0, items_w = (nw + kNormRows - 1) / kNormRows;

  // items: >= 0 a group of the mass check, < 0 norm chunk -1 - c; interleaved (see above)
  std::vector<int64_t> items;
  const int64_t n_mass = static_cast<int64_t>(mass_items.size()), n_norm = items_h + items_w;
  for (int64_t a = 0, b = 0; a < n_mass || b < n_norm;) {
    if (a < n_mass) items.push_back(mass_items[a++]);
    for (int64_t r = 0; b < n_norm && (r == 0 || a >= n_mass || b * n_mass < a * n_norm); ++r) items.push_back(-1 - b++);
  }
  std::vector<double> part(2 * kWorkers, 0.0);
  for_each_item(static_cast<int64_t>(items.size()), [&](int64_t item, int64_t w) {
    if (items[item] < 0) {
      const int64_t c = -1 - items[item];
      const bool is_w = c >= items_h;
      const int64_t r0 = (is_w ? c - items_h : c) * kNormRows, rn = std::min(kNormRows, (is_w ? nw : n) - r0);
      int64_t ia[kNormRows], ib[kNormRows];
      for (int64_t i = 0; i < rn; ++i) {
        ia[i] = is_w ? (weight_all_rows ? r0 + i : wrows[r0 + i]) : p.tok_a[r0 + i];
        if (!is_w && p.tok_b) ib[i] = p.tok_b[r0 + i];
      }
      const double m = max_row_norm(is_w ? p.weight : p.hidden, ia, !is_w && p.tok_b ? ib : nullptr, rn, d, ws[w].h);
      part[2 * w + is_w] = max_norm(part[2 * w + is_w], m);
      return;
    }
    const int64_t g = items[item], kg = static_cast<int64_t>(picks[g].size());
    std::vector<int64_t> vs;
    distinct_ids(ids.data() + id_start[g], id_start[g + 1] - id_start[g], p.vocab, ws[w], vs, nullptr, false);
    const int64_t nv = static_cast<int64_t>(vs.size());
    const int64_t rb = std::max<int64_t>(1, std::min<int64_t>({kg, p.slice / d, gemm_col_block()}));
    const int64_t vc = std::max<int64_t>(1, std::min<int64_t>(nv, p.slice / std::max(rb, d)));
    float* h = ws[w].h.get(rb * d);
    std::vector<int64_t> toks(rb), ys(rb);
    std::vector<float> rmax(rb), rsum(rb), zy(rb);
    for (int64_t r0 = 0; r0 < kg; r0 += rb) {
      const int64_t rn = std::min(rb, kg - r0);
      for (int64_t i = 0; i < rn; ++i) {
        toks[i] = sample[picks[g][r0 + i]];
        ys[i] = p.tok_ids[toks[i]];
      }
      gather_tokens(p, p.hidden, toks.data(), rn, nullptr, d, h, d);
      dot_weight_rows(p.weight, ys.data(), h, rn, d, ws[w].prod, zy.data());
      lse_over_rows(p.weight, p.temperature, h, rn, d, vs.data(), nv, vc, ws[w], rmax.data(), rsum.data());
      for (int64_t i = 0; i < rn; ++i) {
        const int64_t j = picks[g][r0 + i];
        o[2 + j] = static_cast<double>(lp[j]) + rmax[i] + std::log(static_cast<double>(rsum[i])) -
                   static_cast<double>(zy[i]) / p.temperature;
      }
    }
  });
  for (int64_t w = 0; w < kWorkers; ++w)
    for (int c = 0; c < 2; ++c) o[c] = max_norm(o[c], part[2 * w + c]);
  return out;
}

// nthr::native_pairwise_group: the per-group path rule above at a scratch budget (tests, FLOP counts).
bool pairwise_group_op(int64_t t_pos, int64_t t_all, int64_t nv, int64_t d, bool score_positive,
                       int64_t scratch_elems) {
  return pairwise_group(t_pos, t_all, nv, d, score_positive, worker_slice(scratch_elems, d));
}

}  // namespace nthr
