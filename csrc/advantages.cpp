// nthr::native_advantages: the whole NTHR batch on CPU (scores, anchors, tau, selection, advantages).
//
// Inputs are the canonical token list built by nthr_kernels/core/checks.py (tokens ordered by response;
// tok_a/tok_b locate token t in the caller's hidden/logits without copying them). Steps:
//  1. order the tokens of every active group (positive responses first, canonical order kept);
//  2. weight without old log-probs only: log Z_t over the full vocabulary: per token super-block and
//     vocabulary chunk one GEMM tile, folded at once into an online log-sum-exp, rows in parallel;
//  3. per active group, in parallel over groups (largest first, handed out dynamically): V* (sorted
//     unique ids), log Z from the old log-probs or the logits if not done in 2, then for each column
//     block of V*: the prediction errors
//     E = onehot - exp(z / T - log Z) of every token (cached for the group), M = E+^T H+ (ATen addmm),
//     s_t += (E_t M) . h_t; for anchor="others" each positive response's own contribution (pairwise
//     Gram tiles or factored, whichever is cheaper); then in the same pass the anchors (float64 means),
//     tau = beta * min anchor, the selection s_t > tau of negative tokens and their rescaled advantages.
// Scratch: step 2 at most scratch_elems float32 elements (hidden block and logits tile) plus a
// [1024, d] converted weight chunk for non-float32 weights; step 3 per thread at most ~8 buffers of
// Eb = scratch_elems / threads elements (E cache, M, W rows, hidden cache/blocks, E M block, Gram
// tiles) plus O(T_g) index vectors per group; O(n) per-token log Z. Nothing of size [n, |V|] or
// [T+, T] is ever formed.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "native.h"
#include "vec_kernels.h"

namespace nthr {
namespace {

using at::Tensor;

// Scratch float buffer from the ATen CPU allocator (so memory profilers see it).
struct Buf {
  Tensor t;
  float* p = nullptr;
  explicit Buf(int64_t n) : t(at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(at::kFloat))) {
    p = t.data_ptr<float>();
  }
};

// Runs fn(i) for i in [0, n) on the ATen thread pool, handing out items one at a time (dynamic
// scheduling: uneven items and busy cores do not leave threads idle). Each item's result does not depend
// on which thread runs it, so the output is deterministic.
template <typename F>
void dynamic_for(int64_t n, const F& fn) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(n, std::max<int64_t>(1, at::get_num_threads()));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t i = next++; i < n; i = next++) fn(i);
  });
}

struct Layout {  // where canonical token t lives: src[a[t]] (packed) or src[a[t], b[t]] (padded)
  const int64_t* a;
  const int64_t* b;
};

struct Gatherer {
  Layout lay;
  std::vector<int64_t> ia, ib;
  void operator()(const Tensor& src, const int64_t* toks, int64_t count, const int64_t* cols, int64_t ncols,
                  float* out, int64_t ld) {
    ia.resize(count);
    ib.resize(count);
    for (int64_t r = 0; r < count; ++r) {
      ia[r] = lay.a[toks[r]];
      if (lay.b) ib[r] = lay.b[toks[r]];
    }
    gather_rows(src, ia.data(), lay.b ? ib.data() : nullptr, count, cols, ncols, out, ld);
  }
};

// log Z_t over the whole vocabulary of lm_head_weight, for tokens toks[0..n). Token super-blocks of
// ts rows are gathered once; for every vocabulary chunk one GEMM [ts, d] x [d, vc] (ATen/MKL, threaded
// at this level) fills a tile that is folded at once into a running (max, sum) per row, the rows split
// over threads with at::parallel_for. No BLAS call runs inside a parallel region: on a loaded machine
// nested teams and spinning threads made that up to 8x slower than this layout.
void log_z_full_vocab(const Tensor& hidden, Layout lay, const Tensor& w, const int64_t* toks, int64_t n,
                      double temperature, int64_t budget, float* out) {
  if (n == 0) return;
  const int64_t d = w.size(1), vocab = w.size(0);
  const int64_t vc = std::max<int64_t>(1, std::min<int64_t>(vocab, 1024));
  const int64_t ts = std::max<int64_t>(1, std::min<int64_t>(n, budget / (vc + d)));
  const bool w_view = w.scalar_type() == at::kFloat && w.stride(1) == 1;
  const float temp = static_cast<float>(temperature);
  Buf h(ts * d), z(ts * vc), wb(w_view ? 0 : vc * d);
  std::vector<float> rmax(ts), rsum(ts);
  std::vector<int64_t> ids(vc);
  Gatherer gather{lay, {}, {}};
  for (int64_t r0 = 0; r0 < n; r0 += ts) {
    const int64_t rn = std::min(ts, n - r0);
    gather(hidden, toks + r0, rn, nullptr, d, h.p, d);
    std::fill(rmax.begin(), rmax.end(), -std::numeric_limits<float>::infinity());
    std::fill(rsum.begin(), rsum.end(), 0.0f);
    for (int64_t v0 = 0; v0 < vocab; v0 += vc) {
      const int64_t vn = std::min(vc, vocab - v0);
      Tensor wc;
      if (w_view) {
        wc = w.narrow(0, v0, vn);
      } else {
        for (int64_t j = 0; j < vn; ++j) ids[j] = v0 + j;
        gather_rows(w, ids.data(), nullptr, vn, nullptr, d, wb.p, d);
        wc = mat(wb.p, vn, d, d);
      }
      Tensor zt = mat(z.p, rn, vn, vn);
      at::mm_out(zt, mat(h.p, rn, d, d), wc.t());
      at::parallel_for(0, rn, 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) vec::lse_update(z.p + i * vn, vn, temp, &rmax[i], &rsum[i]);
      });
    }
    for (int64_t i = 0; i < rn; ++i) out[r0 + i] = rmax[i] + std::log(rsum[i]);
  }
}

struct Batch {
  Tensor hidden, w, logits;  // w or logits undefined
  Layout lay;
  const int64_t* tok_ids;
  const int64_t* tok_resp;
  const float* logprobs;  // canonical [n] or null
  const float* lz_all;    // log Z per position of `order` (weight-only path) or null
  double temperature, beta;
  bool others;
  int64_t eb, d;
};

struct Outputs {
  float* scores;
  bool* selected;
  float* token_adv;
  float* tau;
  const float* adv;
};

// Scores and the finishing step of one active group. toks[0..T): the group's tokens, the first tp of
// them positive; lz_off: offset of toks in `order` (for lz_all).
void process_group(const Batch& bt, const int64_t* toks, int64_t T, int64_t tp, int64_t lz_off, double eta,
                   int64_t group, const Outputs& o) {
  const int64_t d = bt.d, eb = bt.eb;
  const float temp = static_cast<float>(bt.temperature);
  Gatherer gather{bt.lay, {}, {}};

  // V* and each token's column in it
  std::vector<int64_t> vs(T), col(T);
  for (int64_t i = 0; i < T; ++i) vs[i] = bt.tok_ids[toks[i]];
  std::sort(vs.begin(), vs.end());
  vs.erase(std::unique(vs.begin(), vs.end()), vs.end());
  const int64_t nv = static_cast<int64_t>(vs.size());
  for (int64_t i = 0; i < T; ++i)
    col[i] = std::lower_bound(vs.begin(), vs.end(), bt.tok_ids[toks[i]]) - vs.begin();

  // block sizes: E cache [T, vb], M / W rows [vb, d], hidden and E M blocks [tb, d]
  const int64_t vb = std::max<int64_t>(1, std::min<int64_t>({nv, eb / d, eb / T}));
  const int64_t tb = std::max<int64_t>(1, std::min<int64_t>(T, eb / std::max(vb, d)));
  const bool h_cached = T * d <= eb;
  Buf hall(h_cached ? T * d : 0), hb(h_cached ? 0 : tb * d);
  auto hrows = [&](int64_t t0, int64_t tn, float* tmp) -> const float* {
    if (h_cached) return hall.p + t0 * d;
    gather(bt.hidden, toks + t0, tn, nullptr, d, tmp, d);
    return tmp;
  };
  if (h_cached) gather(bt.hidden, toks, T, nullptr, d, hall.p, d);

  // log Z per token
  std::vector<float> lz(T);
  if (bt.lz_all) {
    std::copy(bt.lz_all + lz_off, bt.lz_all + lz_off + T, lz.begin());
  } else if (bt.logprobs) {  // log Z_t = z_t[y_t] / T - l_t
    Buf wy(tb * d);
    std::vector<int64_t> ids(tb);
    for (int64_t t0 = 0; t0 < T; t0 += tb) {
      const int64_t tn = std::min(tb, T - t0);
      const float* h = hrows(t0, tn, hb.p);
      for (int64_t i = 0; i < tn; ++i) ids[i] = bt.tok_ids[toks[t0 + i]];
      gather_rows(bt.w, ids.data(), nullptr, tn, nullptr, d, wy.p, d);
      for (int64_t i = 0; i < tn; ++i)
        lz[t0 + i] = vec::dot(h + i * d, wy.p + i * d, d) / temp - bt.logprobs[toks[t0 + i]];
    }
  } else {  // logits: log-sum-exp of the given row
    const int64_t vocab = bt.logits.size(-1);
    const int64_t vc = std::max<int64_t>(1, std::min(vocab, eb / tb));
    Buf zb(tb * vc);
    std::vector<int64_t> cols(vc);
    std::vector<float> rmax(tb), rsum(tb);
    for (int64_t t0 = 0; t0 < T; t0 += tb) {
      const int64_t tn = std::min(tb, T - t0);
      std::fill(rmax.begin(), rmax.end(), -std::numeric_limits<float>::infinity());
      std::fill(rsum.begin(), rsum.end(), 0.0f);
      for (int64_t v0 = 0; v0 < vocab; v0 += vc) {
        const int64_t vn = std::min(vc, vocab - v0);
        for (int64_t j = 0; j < vn; ++j) cols[j] = v0 + j;
        gather(bt.logits, toks + t0, tn, cols.data(), vn, zb.p, vn);
        for (int64_t i = 0; i < tn; ++i) vec::lse_update(zb.p + i * vn, vn, temp, &rmax[i], &rsum[i]);
      }
      for (int64_t i = 0; i < tn; ++i) lz[t0 + i] = rmax[i] + std::log(rsum[i]);
    }
  }

  // positive responses: runs of equal tok_resp in toks[0..tp)
  std::vector<int64_t> seg{0};
  for (int64_t i = 1; i < tp; ++i)
    if (bt.tok_resp[toks[i]] != bt.tok_resp[toks[i - 1]]) seg.push_back(i);
  seg.push_back(tp);

  Buf e(T * vb), m(vb * d), wc(bt.w.defined() ? vb * d : 0), sb(tb * d);
  std::vector<float> s(T, 0.0f), own(bt.others ? tp : 0, 0.0f);
  std::unique_ptr<Buf> mi, gram, kern, hb2;

  for (int64_t c0 = 0; c0 < nv; c0 += vb) {
    const int64_t cw = std::min(vb, nv - c0);
    if (bt.w.defined()) gather_rows(bt.w, vs.data() + c0, nullptr, cw, nullptr, d, wc.p, d);
    // prediction errors of every token on columns [c0, c0 + cw) of V*
    for (int64_t t0 = 0; t0 < T; t0 += tb) {
      const int64_t tn = std::min(tb, T - t0);
      float* et = e.p + t0 * cw;
      if (bt.w.defined()) {
        Tensor z = mat(et, tn, cw, cw);
        at::mm_out(z, mat(const_cast<float*>(hrows(t0, tn, hb.p)), tn, d, d), mat(wc.p, cw, d, d).t());
      } else {
        gather(bt.logits, toks + t0, tn, vs.data() + c0, cw, et, cw);
      }
      for (int64_t i = 0; i < tn; ++i) {
        float* row = et + i * cw;
        vec::neg_softmax_slice(row, cw, temp, lz[t0 + i]);
        const int64_t c = col[t0 + i] - c0;
        if (c >= 0 && c < cw) row[c] += 1.0f;
      }
    }
    // M = sum over rows [r0, r1) of e_u h_u^T;  out[i] += (e_i M) . h_i for rows [r0, r1)
    auto accumulate = [&](float* mp, int64_t r0, int64_t r1) {
      Tensor mv = mat(mp, cw, d, d);
      mv.zero_();
      for (int64_t t0 = r0; t0 < r1; t0 += tb) {
        const int64_t tn = std::min(tb, r1 - t0);
        mv.addmm_(mat(e.p + t0 * cw, tn, cw, cw).t(), mat(const_cast<float*>(hrows(t0, tn, hb.p)), tn, d, d));
      }
    };
    auto score = [&](const float* mp, int64_t r0, int64_t r1, float* out) {
      for (int64_t t0 = r0; t0 < r1; t0 += tb) {
        const int64_t tn = std::min(tb, r1 - t0);
        Tensor st = mat(sb.p, tn, d, d);
        at::mm_out(st, mat(e.p + t0 * cw, tn, cw, cw), mat(const_cast<float*>(mp), cw, d, d));
        const float* h = hrows(t0, tn, hb.p);
        for (int64_t i = 0; i < tn; ++i) out[t0 + i] += vec::dot(sb.p + i * d, h + i * d, d);
      }
    };
    accumulate(m.p, 0, tp);
    score(m.p, 0, T, s.data());
    if (!bt.others) continue;
    // anchor="others": each positive response's contribution to its own tokens
    for (size_t k = 0; k + 1 < seg.size(); ++k) {
      const int64_t r0 = seg[k], r1 = seg[k + 1], len = r1 - r0;
      if (len == 0) continue;
      if (len * (cw + d) >= 2 * cw * d) {  // factored: 4 L cw d FLOPs <= pairwise 2 L^2 (cw + d)
        if (!mi) mi = std::make_unique<Buf>(vb * d);
        accumulate(mi->p, r0, r1);
        score(mi->p, r0, r1, own.data());
        continue;
      }
      const int64_t tt = std::max<int64_t>(
          1, std::min<int64_t>({len, tb, static_cast<int64_t>(std::sqrt(static_cast<double>(eb)))}));
      if (!gram) {
        gram = std::make_unique<Buf>(tt * tt);
        kern = std::make_unique<Buf>(tt * tt);
      } else if (gram->t.numel() < tt * tt) {
        *gram = Buf(tt * tt);
        *kern = Buf(tt * tt);
      }
      if (!h_cached && !hb2) hb2 = std::make_unique<Buf>(tb * d);
      for (int64_t t0 = r0; t0 < r1; t0 += tt) {
        const int64_t tn = std::min(tt, r1 - t0);
        const float* ht = hrows(t0, tn, h_cached ? nullptr : hb2->p);
        for (int64_t u0 = r0; u0 < r1; u0 += tt) {
          const int64_t un = std::min(tt, r1 - u0);
          const float* hu = hrows(u0, un, hb.p);
          Tensor g = mat(gram->p, un, tn, tn), kk = mat(kern->p, un, tn, tn);
          at::mm_out(g, mat(e.p + u0 * cw, un, cw, cw), mat(e.p + t0 * cw, tn, cw, cw).t());
          at::mm_out(kk, mat(const_cast<float*>(hu), un, d, d), mat(const_cast<float*>(ht), tn, d, d).t());
          vec::colsum_product(gram->p, tn, kern->p, tn, un, tn, own.data() + t0);
        }
      }
    }
  }

  // anchors (float64 means in token order), tau, selection and advantages, in one pass over the group
  double min_anchor = std::numeric_limits<double>::infinity();
  for (size_t k = 0; k + 1 < seg.size(); ++k) {
    const int64_t r0 = seg[k], r1 = seg[k + 1];
    if (r1 == r0) continue;
    double acc = 0.0;
    for (int64_t i = r0; i < r1; ++i) acc += static_cast<double>(bt.others ? s[i] - own[i] : s[i]);
    min_anchor = std::min(min_anchor, acc / static_cast<double>(r1 - r0));
  }
  double tau;
  if (bt.beta == 0.0) {
    tau = 0.0;
  } else if (std::isinf(bt.beta) && bt.beta < 0) {
    tau = -std::numeric_limits<double>::infinity();
  } else {
    tau = bt.beta * min_anchor;
  }
  const float tau_f = static_cast<float>(tau), eta_f = static_cast<float>(eta);
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = toks[i];
    o.scores[t] = s[i];
    if (i >= tp && s[i] > tau_f) {
      o.selected[t] = true;
      o.token_adv[t] = o.adv[bt.tok_resp[t]] * eta_f;
    }
  }
  o.tau[group] = tau_f;
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "nthr native_advantages: ", what); }

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> advantages_cpu(
    const Tensor& hidden, const Tensor& tok_a_in, const std::optional<Tensor>& tok_b_in, const Tensor& tok_ids_in,
    const Tensor& tok_resp_in, const Tensor& resp_group_in, const Tensor& positive_in, const Tensor& adv_in,
    const Tensor& group_active_in, const Tensor& eta_group_in, const std::optional<Tensor>& lm_head_weight,
    const std::optional<Tensor>& logits, const std::optional<Tensor>& logprobs_in, double temperature, double beta,
    bool anchor_others, int64_t scratch_elems) {
  Tensor tok_a = tok_a_in.to(at::kLong).contiguous(), tok_ids = tok_ids_in.to(at::kLong).contiguous();
  Tensor tok_resp = tok_resp_in.to(at::kLong).contiguous(), resp_group = resp_group_in.to(at::kLong).contiguous();
  Tensor tok_b = tok_b_in ? tok_b_in->to(at::kLong).contiguous() : Tensor();
  Tensor positive = positive_in.to(at::kBool).contiguous(), adv = adv_in.to(at::kFloat).contiguous();
  Tensor active = group_active_in.to(at::kBool).contiguous(), eta_g = eta_group_in.to(at::kDouble).contiguous();
  const int64_t n = tok_ids.numel(), n_resp = resp_group.numel(), n_groups = active.numel();
  check(hidden.device().is_cpu() && at::isFloatingType(hidden.scalar_type()), "hidden must be a floating CPU tensor");
  check(hidden.dim() == (tok_b.defined() ? 3 : 2), "hidden's rank does not match tok_b");
  check(tok_a.numel() == n && tok_resp.numel() == n && (!tok_b.defined() || tok_b.numel() == n), "token vectors differ in length");
  check(positive.numel() == n_resp && adv.numel() == n_resp && eta_g.numel() == n_groups, "per-response/group sizes");
  check(lm_head_weight.has_value() != logits.has_value(), "exactly one of lm_head_weight and logits");
  check(!(logprobs_in.has_value() && logits.has_value()), "logprobs only with lm_head_weight");
  check(temperature > 0, "temperature must be > 0");
  const int64_t d = hidden.size(-1);

  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  Tensor scores = at::zeros({n}, f32), selected = at::zeros({n}, at::TensorOptions().dtype(at::kBool));
  Tensor tau = at::full({n_groups}, std::numeric_limits<float>::quiet_NaN(), f32);
  Tensor eta_out = at::where(active, eta_g, at::ones_like(eta_g)).to(at::kFloat);
  Tensor token_adv = n ? adv.index_select(0, tok_resp) : at::zeros({0}, f32);

  const int64_t* ta = tok_ids.const_data_ptr<int64_t>();
  const int64_t* tr = tok_resp.const_data_ptr<int64_t>();
  const int64_t* rg = resp_group.const_data_ptr<int64_t>();
  const bool* pos = positive.const_data_ptr<bool>();
  const bool* act = active.const_data_ptr<bool>();

  // 1. active groups' tokens, positive first (counting sort, canonical order kept within each part)
  std::vector<int64_t> dense(n_groups, -1), g_batch;
  for (int64_t g = 0; g < n_groups; ++g)
    if (act[g]) {
      dense[g] = static_cast<int64_t>(g_batch.size());
      g_batch.push_back(g);
    }
  const int64_t n_act = static_cast<int64_t>(g_batch.size());
  std::vector<int64_t> g_pos(n_act, 0), g_len(n_act, 0);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t r = tr[t];
    check(r >= 0 && r < n_resp && rg[r] >= 0 && rg[r] < n_groups, "token/response/group index out of range");
    const int64_t dg = dense[rg[r]];
    if (dg < 0) continue;
    ++g_len[dg];
    g_pos[dg] += pos[r];
  }
  std::vector<int64_t> g_off(n_act + 1, 0);
  for (int64_t k = 0; k < n_act; ++k) g_off[k + 1] = g_off[k] + g_len[k];
  std::vector<int64_t> order(g_off[n_act]), cur_pos(g_off.begin(), g_off.end() - 1), cur_neg(n_act);
  for (int64_t k = 0; k < n_act; ++k) cur_neg[k] = g_off[k] + g_pos[k];
  for (int64_t t = 0; t < n; ++t) {
    const int64_t dg = dense[rg[tr[t]]];
    if (dg < 0) continue;
    order[pos[tr[t]] ? cur_pos[dg]++ : cur_neg[dg]++] = t;
  }

  Batch bt;
  bt.hidden = hidden;
  bt.w = lm_head_weight ? *lm_head_weight : Tensor();
  bt.logits = logits ? *logits : Tensor();
  bt.lay = Layout{tok_a.const_data_ptr<int64_t>(), tok_b.defined() ? tok_b.const_data_ptr<int64_t>() : nullptr};
  bt.tok_ids = ta;
  bt.tok_resp = tr;
  Tensor lp = logprobs_in ? logprobs_in->to(at::kFloat).contiguous() : Tensor();
  check(!lp.defined() || lp.numel() == n, "logprobs must be canonical [n]");
  bt.logprobs = lp.defined() ? lp.const_data_ptr<float>() : nullptr;
  bt.temperature = temperature;
  bt.beta = beta;
  bt.others = anchor_others;
  bt.d = d;
  bt.eb = std::max<int64_t>(std::max<int64_t>(scratch_elems, 1) / std::max<int64_t>(1, at::get_num_threads()), d);
  if (bt.w.defined()) check(bt.w.dim() == 2 && bt.w.size(1) == d, "lm_head_weight must be [V, d]");
  for (int64_t t = 0; t < n; ++t) {
    const int64_t vocab = bt.w.defined() ? bt.w.size(0) : bt.logits.size(-1);
    check(ta[t] >= 0 && ta[t] < vocab, "token id out of range");
  }

  // NTHR_NATIVE_TRACE=1: phase timings on stderr (diagnostics)
  const bool trace = std::getenv("NTHR_NATIVE_TRACE") != nullptr;
  auto clock = std::chrono::steady_clock::now();
  auto lap = [&](const char* what) {
    if (!trace) return;
    const auto now = std::chrono::steady_clock::now();
    std::fprintf(stderr, "nthr native_advantages: %s %.3f s\n", what, std::chrono::duration<double>(now - clock).count());
    clock = now;
  };
  lap("setup");

  // 2. log Z over the full vocabulary (weight without old log-probs)
  std::vector<float> lz_all;
  bt.lz_all = nullptr;
  if (bt.w.defined() && !bt.logprobs) {
    lz_all.resize(order.size());
    log_z_full_vocab(hidden, bt.lay, bt.w, order.data(), static_cast<int64_t>(order.size()), temperature,
                     std::max<int64_t>(scratch_elems, 1), lz_all.data());
    bt.lz_all = lz_all.data();
  }

  lap("log Z (full vocabulary)");

  // 3. groups in parallel
  Outputs o{scores.data_ptr<float>(), selected.data_ptr<bool>(), token_adv.data_ptr<float>(), tau.data_ptr<float>(),
            adv.const_data_ptr<float>()};
  const double* eta_p = eta_g.const_data_ptr<double>();
  std::vector<int64_t> by_size(n_act);  // largest groups first: better balance, same results
  for (int64_t k = 0; k < n_act; ++k) by_size[k] = k;
  std::stable_sort(by_size.begin(), by_size.end(), [&](int64_t x, int64_t y) { return g_len[x] > g_len[y]; });
  dynamic_for(n_act, [&](int64_t i) {
    const int64_t k = by_size[i];
    process_group(bt, order.data() + g_off[k], g_len[k], g_pos[k], g_off[k], eta_p[g_batch[k]], g_batch[k], o);
  });
  lap("groups");
  return {scores, selected, token_adv, tau, eta_out};
}

}  // namespace nthr
