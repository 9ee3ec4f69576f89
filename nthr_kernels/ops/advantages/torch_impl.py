"""``nthr_advantages`` in batched PyTorch (CPU or CUDA): float32 arithmetic, bounded scratch memory.

The factored form of ``docs/NTHR.md``, for the active groups of a batch:

1. ``log Z_t = z_t[y_t] / T - l_t`` (:func:`log_normaliser`) from the sampled token's log-prob ``l_t``: the
   old log-probs, or ``-softplus`` of the other tokens' logsumexp over the whole vocabulary (a chunked pass
   with the weight, or over the given logits rows; :func:`nthr_kernels.core.rules.sampled_logprob`). With the
   weight and old log-probs, ``z_t[y_t]`` is computed in step 3 from the rows its blocks gather anyway, where
   one column block holds the group's ``V*`` (:func:`plan_normaliser`).
2. ``V*`` per group and the token order: :func:`nthr_kernels.core.plan.make_plan`.
3. Group by group (one active group at a time, with plain GEMMs on its own sizes: nothing is padded to
   another group's ``|V*|`` or token count), ``N_i = E_i^T H_i`` for each positive response ``i`` from
   blocks of the group's positive tokens, ``M_g = sum_i N_i``, each anchor numerator ``<M_g, N_i>``
   (minus ``<N_i, N_i>`` for ``anchor="others"``), then ``s_t = g_t^T M_g h_t`` for each negative token
   (every token with ``score_positive``). The prediction errors ``g_t = onehot(y_t) - exp(z_t / T - log Z_t)``
   on ``V*`` are recomputed inside each block from ``h``, the ``|V*|`` weight rows (or gathered logits) and
   ``log Z_t``; they are never stored for the batch. Block sizes depend only on the group's ``|V*|``, its
   number of positive responses, ``d`` and the budget, so each group's arithmetic is independent of the
   other groups of the batch (a distributed rank holding a group computes it as one process does).

Scratch memory, with ``E`` = the budget in float32 elements (``SCRATCH_ELEMS``, default ``2**22``, 16 MiB):
the ``M``, ``N`` and weight rows of a group (or ``V*`` column block) together, and each block tensor,
hold at most about ``E`` elements; the stated bound is **``10 * 4 * E`` bytes plus ``TOKEN_BYTES`` (512)
bytes per completion token** (index, order and score vectors), i.e. 160 MiB plus 512 B/token by default.
``tests/test_memory.py`` measures the peak resident rise at two batch sizes and two budgets against this
formula. A group whose ``(1 + N+) |V*| d`` exceeds the budget is split into ``V*`` column blocks. No ``[N, |V|]`` or ``[N, N]`` tensor
is ever formed.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...core.plan import Plan, chunks, finish, make_plan, runs
from ...core.rules import SCRATCH_ELEMS
from ...core.rules import sampled_logprob
from ..prediction_errors.torch_impl import logits_logprob, vocab_logsumexp



# --------------------------------------------------------------------------------------------------
# log Z
# --------------------------------------------------------------------------------------------------
LOGZ_ROWS = 1024  # tokens per block of the old-log-prob shortcut: cache-sized temporaries, reused
def log_normaliser(batch, tok: torch.Tensor, budget: int, logits_scale: Optional[float] = None) -> tuple:
    """``(log Z_t, l_t)`` (float32) of the canonical tokens ``tok`` (temperature applied): ``l_t`` the sampled
    token's log-prob, the old log-probs or else from the other tokens' logsumexp
    (:func:`nthr_kernels.core.rules.sampled_logprob`), and ``log Z_t = z_y / T - l_t``. ``logits_scale``: with
    ``logits``, multiply them by this instead of dividing by the temperature (the Triton kernels apply
    ``z * (1 / T)``, and a token's ``p`` must come from the same rounding as its ``log Z``)."""
    n = tok.numel()
    out = torch.empty(n, dtype=torch.float32, device=batch.device)
    lp = torch.empty(n, dtype=torch.float32, device=batch.device)
    if n == 0:
        return out, lp
    t = batch.opts.temperature
    if batch.logits is not None:
        vocab = batch.logits.shape[-1]
        nb = max(1, budget // vocab)
        for i in range(0, n, nb):
            rows = gather_rows(batch, batch.logits, tok[i : i + nb]).float()
            z = rows / t if logits_scale is None else rows * logits_scale
            out[i : i + nb], lp[i : i + nb] = logits_logprob(z, batch.tok_ids[tok[i : i + nb]])
        return out, lp
    w = batch.lm_head_weight
    d = w.shape[1]
    if batch.old_logprobs is not None:
        nb = min(max(1, budget // d), LOGZ_ROWS)
        for i in range(0, n, nb):
            idx = tok[i : i + nb]
            h = gather_rows(batch, batch.hidden, idx).float()
            z_y = (h * w.index_select(0, batch.tok_ids[idx]).float()).sum(-1) / t
            lp[i : i + nb] = gather_rows(batch, batch.old_logprobs, idx).float()
            out[i : i + nb] = z_y - lp[i : i + nb]
        return out, lp
    nb = min(n, max(1, budget // d), 4096)
    for i in range(0, n, nb):
        idx = tok[i : i + nb]
        others, z_y = vocab_logsumexp(gather_rows(batch, batch.hidden, idx).float(), w, batch.tok_ids[idx], t, budget)
        lp[i : i + nb] = sampled_logprob(others, z_y)
        out[i : i + nb] = z_y - lp[i : i + nb]
    return out, lp


def plan_normaliser(batch, tok: torch.Tensor, budget: int) -> tuple:
    """The normaliser :func:`nthr_scores` plans with: :func:`log_normaliser`, except with the weight and old
    log-probs, where it returns ``(None, l_t)``: :class:`_GroupErrors` then computes each token's
    ``log Z_t = z_y / T - l_t`` in the errors block, from the hidden rows it gathers anyway and ``y_t``'s row
    among the block's ``V*`` weight rows (the same values and arithmetic as :func:`log_normaliser`, which
    gathers both ``[n, d]`` again: 7.5 ms of the plan's 10.8 on the medium batch, dev box, 2 threads)."""
    if batch.lm_head_weight is None or batch.old_logprobs is None or tok.numel() == 0:
        return log_normaliser(batch, tok, budget)
    return None, gather_rows(batch, batch.old_logprobs, tok).float()


def gather_rows(batch, x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """``batch.gather(x, tok)`` by ``index_select``: the padded ``[R, L, ...]`` layout is read through a
    flat view (one index instead of two, far cheaper to gather) when ``x`` can be viewed so."""
    if batch.tok_b is None:
        return x.index_select(0, batch.tok_a[tok])
    try:
        flat = x.view(-1, *x.shape[2:])
    except RuntimeError:
        return batch.gather(x, tok)
    return flat.index_select(0, batch.tok_a[tok] * x.shape[1] + batch.tok_b[tok])


class _GroupErrors:
    """Prediction errors (with their sign flipped, ``p - onehot``) and hidden rows of runs of ``plan.order``
    within one group, recomputed from ``h``, the ``V*`` weight rows (or gathered logits) and ``log Z``;
    never stored for the batch and never padded. The flipped sign is exact and cancels everywhere: ``M``
    and each ``N_i`` flip with the errors, so ``<M, N_i>`` and ``g_t^T M h_t`` are unchanged."""

    def __init__(self, batch, plan: Plan, budget: int):
        self.batch, self.plan, self.budget = batch, plan, budget
        # the column of each token's id in its group's V* (V* is sorted by (group, id))
        vocab = batch.vocab_size
        vs_group = torch.repeat_interleave(torch.arange(plan.vs_count.numel(), device=batch.device), plan.vs_count)
        key = plan.grp_of * vocab + batch.tok_ids[plan.order]
        self.col = torch.searchsorted(vs_group * vocab + plan.vs_id, key) - plan.vs_start[plan.grp_of]
        self.lz_group = -1  # the first position of the group whose log Z self.lz holds (columns)

    def columns(self, cols: torch.Tensor, c0: int, wc: Optional[torch.Tensor], g0: int, g1: int, blk: int,
                all_cols: bool):
        """Work on the ``V*`` columns ``cols = V*[c0 : c0 + |cols|]`` of the group at ``plan.order[g0:g1]``
        (``wc`` their float32 weight rows, ``None`` with logits; ``all_cols``: they are the whole ``V*``) in
        blocks of at most ``blk`` tokens: a group that fits one block gets its errors once, for both passes.
        Without ``plan.log_z`` (:func:`plan_normaliser`), ``log Z`` comes from the block's hidden and weight
        rows when the block holds the whole ``V*``, else from :func:`log_normaliser` for the group's tokens
        (once per group)."""
        self.cols, self.c0, self.wc, self.g0 = cols, c0, wc, g0
        self.own_lz = self.plan.log_z is None and all_cols
        if self.plan.log_z is None and not all_cols and self.lz_group != g0:
            self.lz = log_normaliser(self.batch, self.plan.order[g0:g1], self.budget)[0]
            self.lz_group = g0
        self.whole = None
        self.whole = self.block(g0, g1) if g1 - g0 <= blk else None

    def block(self, p0: int, p1: int):
        """Flipped errors ``[p1 - p0, |cols|]`` and hidden rows ``[p1 - p0, d]`` of ``plan.order[p0:p1]``."""
        if self.whole is not None:
            return self.whole[0][p0 - self.g0 : p1 - self.g0], self.whole[1][p0 - self.g0 : p1 - self.g0]
        batch, cols = self.batch, self.cols
        t = batch.opts.temperature
        h = gather_rows(batch, batch.hidden, self.plan.order[p0:p1]).float()
        j = self.col[p0:p1] - self.c0  # each token's own column in this block (where it holds y_t)
        if self.wc is not None:  # z / T - log Z in one GEMM (log Z enters as the broadcast bias)
            if self.plan.log_z is not None:
                log_z = self.plan.log_z[p0:p1]
            elif self.own_lz:  # z_y / T - l_t as log_normaliser computes it, y_t's weight row from the block's
                log_z = (h * self.wc.index_select(0, j)).sum(-1) / t - self.plan.lp[p0:p1]
            else:
                log_z = self.lz[p0 - self.g0 : p1 - self.g0]
            log_z = log_z[:, None]
            if batch.old_logprobs is None:  # z / T rounded as vocab_logsumexp rounds it: (h / T) @ W^T
                err = torch.addmm(log_z, h / t if t != 1.0 else h, self.wc.T, beta=-1)
            else:
                err = torch.addmm(log_z, h, self.wc.T, beta=-1, alpha=1 / t)
        else:
            tok = self.plan.order[p0:p1]
            a = batch.tok_a[tok][:, None]
            err = (batch.logits[a, cols[None, :]] if batch.tok_b is None else
                   batch.logits[a, batch.tok_b[tok][:, None], cols[None, :]]).float()
            err /= t
            err -= self.plan.log_z[p0:p1, None]
        err.exp_()  # in place: one buffer for logits and errors
        # - onehot(y_t), where this column block holds y_t
        hit = ((j >= 0) & (j < cols.numel())).nonzero().squeeze(1)
        # the sampled token's own probability is exp(l_t) by the definition log Z_t = z_y / T - l_t (l_t the old
        # log-prob, or from the other tokens' logsumexp), so its (flipped) error is exp(l_t) - 1 = expm1(l_t):
        # taken from l_t, not from a second rounding of z_y / T (whose difference from log Z's would give a
        # certain token, l_t = 0, an error of ~1e-7 instead of 0 and spurious selections), nor as exp(l_t) - 1
        # in float32, which cancels the small digits of a near-certain token's error
        err.view(-1)[hit * cols.numel() + j[hit]] = self.plan.lp[p0:p1][hit].expm1()
        return err, h


def positive_responses(batch, plan: Plan):
    """The positive responses of the active groups as ranges of ``plan.order`` (one run of tokens each):
    ``(start, length, group)`` (dense active-group index), grouped by group."""
    ar = torch.arange(plan.order.numel(), device=batch.device)
    p_idx = (ar < (plan.g_start + plan.g_pos)[plan.grp_of]).nonzero().squeeze(1)
    firsts, r_len = runs(batch.tok_resp[plan.order[p_idx]])
    r_start = p_idx[firsts]
    return r_start, r_len, plan.grp_of[r_start]


def nthr_scores(batch, budget: Optional[int] = None, plan: Optional[Plan] = None, reduce_m=None):
    """Scores of the tokens to score and the anchors of the positive responses.

    Group by group (and ``V*`` column block), with plain GEMMs on the group's own sizes (no padding):
    ``N_i = E_i^T H_i`` for each positive response ``i`` (``[|V*|, d]``, from blocks of the group's
    positive tokens), ``M_g = sum_{i in P_g} N_i``, then ``<M_g, N_i>`` (minus ``<N_i, N_i>`` for
    ``anchor="others"``) accumulates response ``i``'s anchor numerator, and every token to score gets
    ``s_t = g_t^T M_g h_t``. Positive tokens are scored only with ``score_positive``: the anchors need
    none of their scores (``docs/NTHR.md``). ``reduce_m(M, k, k + 1, c0, c1)`` (``M`` of shape
    ``[1, c1 - c0, d]``) may transform each group's ``M`` before use (the distributed all-reduce); it is
    called for every group and column block, which depend only on the (global) ``|V*|`` and positive
    response counts. Returns ``(scores [n] float32, (resp, anchors float64))``.
    """
    budget = budget or SCRATCH_ELEMS
    dev = batch.device
    plan = plan or make_plan(batch, lambda order: plan_normaliser(batch, order, budget))
    d = batch.hidden.shape[-1]
    n_g = plan.g_start.numel()
    r_start, r_len, r_group = positive_responses(batch, plan)
    # which tokens are scored: negative ones, and positive ones when asked
    sc_start = plan.g_start if batch.opts.score_positive else plan.g_start + plan.g_pos
    sc_len = plan.g_len if batch.opts.score_positive else plan.g_len - plan.g_pos
    # a group's column block holds M plus N for each of its positive responses (global counts)
    copies = (1 + batch.n_pos[plan.g_batch]).tolist()
    r_first = torch.searchsorted(r_group, torch.arange(n_g + 1, device=dev)).tolist()
    g_start, g_pos, g_len = plan.g_start.tolist(), plan.g_pos.tolist(), plan.g_len.tolist()
    s_start, s_len = sc_start.tolist(), sc_len.tolist()
    vs_start, vs_count = plan.vs_start.tolist(), plan.vs_count.tolist()
    rs, re = r_start.tolist(), (r_start + r_len).tolist()
    numer = torch.zeros(r_start.numel(), dtype=torch.float64, device=dev)
    out = torch.zeros(plan.order.numel(), dtype=torch.float32, device=dev)
    others = batch.opts.anchor == "others"
    w = batch.lm_head_weight
    ge = _GroupErrors(batch, plan, budget)
    for k in range(n_g):
        ra, rb = r_first[k], r_first[k + 1]
        for _, _, c0, c1 in chunks([vs_count[k]], d, budget, [copies[k]]):
            vcols = c1 - c0
            m = torch.zeros(1, vcols, d, dtype=torch.float32, device=dev)
            if g_len[k] == 0:  # a distributed rank without tokens of this group still joins the reduction
                if reduce_m is not None:
                    reduce_m(m, k, k + 1, c0, c1)
                continue
            cols = plan.vs_id[vs_start[k] + c0 : vs_start[k] + c1]
            wc = None if w is None else w.index_select(0, cols).float()
            blk = max(1, budget // max(vcols, d))  # tokens per block: each block tensor within the budget
            n_mat = torch.empty(rb - ra, vcols, d, dtype=torch.float32, device=dev)
            p0, p1 = g_start[k], g_start[k] + g_pos[k]
            q0, q1 = s_start[k], s_start[k] + s_len[k]
            ge.columns(cols, c0, wc, g_start[k], g_start[k] + g_len[k], blk, c0 == 0 and c1 == vs_count[k])
            for b0 in range(p0, p1, blk):
                b1 = min(p1, b0 + blk)
                err, h = ge.block(b0, b1)
                for i in range(ra, rb):  # the positive responses in this block
                    lo, hi = max(rs[i], b0), min(re[i], b1)
                    if lo >= hi:
                        continue
                    e_i, h_i = err[lo - b0 : hi - b0].T, h[lo - b0 : hi - b0]
                    if lo == rs[i]:  # the response's first block writes N_i, later ones add to it
                        torch.mm(e_i, h_i, out=n_mat[i - ra])
                    else:
                        n_mat[i - ra].addmm_(e_i, h_i)
            for i in range(rb - ra):  # M = sum_i N_i, in response order
                m[0] += n_mat[i]
            if reduce_m is not None:
                m = reduce_m(m, k, k + 1, c0, c1)
            m = m[0]
            # <M, N_i> ("all") or <M - N_i, N_i> ("others"): row dots, then a sequential sum per response, whose
            # bits do not depend on the thread count (torch.mv and torch.dot split their sums across threads).
            # "others" in float64, one response at a time: <M, N_i> - <N_i, N_i> as two float32 row dots cancelled
            # where response i's own part dominates (tau off by 4e-3 relative on a fuzz case where native's float64
            # form, the one taken here, is within 2e-4; what is left is M's own float32 rounding, docs/NTHR.md)
            if others:
                dots = torch.stack([((m - n_mat[i]).double() * n_mat[i].double()).sum(-1) for i in range(rb - ra)]) \
                    if rb > ra else n_mat.new_zeros(0, vcols, dtype=torch.float64)
            else:
                dots = (n_mat * m).sum(-1).to(torch.float64)
            numer[ra:rb] += dots.cumsum(-1)[:, -1] if rb > ra else 0
            del n_mat
            for b0 in range(q0, q1, blk):
                b1 = min(q1, b0 + blk)
                err, h = ge.block(b0, b1)
                out[b0:b1] += (torch.mm(err, m) * h).sum(-1)
            ge.whole = None
    scores = torch.zeros(batch.n_tokens, dtype=torch.float32, device=dev)
    scores[plan.order] = out
    resp = batch.tok_resp[plan.order[r_start]]
    return scores, (resp, numer / r_len.to(torch.float64))


def nthr_advantages(batch, budget: Optional[int] = None):
    scores, anchors = nthr_scores(batch, budget)
    selected, token_adv, tau, eta = finish(batch, scores, anchors)
    return scores, selected, token_adv, tau, eta
