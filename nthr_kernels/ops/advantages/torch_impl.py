"""``nthr_advantages`` in batched PyTorch (CPU or CUDA): float32 arithmetic, bounded scratch memory.

The factored form of ``docs/NTHR.md``, for the active groups of a batch:

1. ``log Z_t`` (:func:`log_normaliser`): the old-log-prob shortcut ``z_t[y_t] / T - l_t``, a chunked
   logsumexp over the whole vocabulary (weight without log-probs), or over the given logits rows.
2. ``V*`` per group and the token order: :func:`nthr_kernels.core.plan.make_plan`.
3. Groups are packed into chunks (padded to the chunk's largest ``|V*|``). Per chunk, ``N_i = E_i^T H_i``
   for each positive response ``i`` from blocks of its tokens, ``M_g = sum_i N_i``, each anchor
   numerator ``<M_g, N_i>`` (minus ``<N_i, N_i>`` for ``anchor="others"``), then ``s_t = g_t^T M_g h_t``
   for each negative token (every token with ``score_positive``). The prediction errors
   ``g_t = onehot(y_t) - exp(z_t / T - log Z_t)`` on ``V*`` are recomputed inside each block from ``h``,
   the ``|V*|`` weight rows (or gathered logits) and ``log Z_t``; they are never stored for the batch.

Scratch memory, with ``E`` = the budget in float32 elements (``SCRATCH_ELEMS``, default ``2**22``, 16 MiB):
the ``M``, ``N`` and weight rows of a chunk together, and each block tensor, hold at most about ``E``
elements; the stated bound is **``10 * 4 * E`` bytes plus ``TOKEN_BYTES`` (512) bytes per completion token** (index,
order and score vectors), i.e. 160 MiB plus 512 B/token by default. ``tests/test_memory.py`` measures the
peak resident rise at two batch sizes and two budgets against this formula. A single group whose
``|V*| * d`` exceeds the budget is split into ``V*`` column blocks. No ``[N, |V|]`` or ``[N, N]`` tensor
is ever formed.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...core.plan import Plan, chunks, finish, make_plan, runs
from ...core.rules import SCRATCH_ELEMS
from ..prediction_errors.torch_impl import vocab_logsumexp



# --------------------------------------------------------------------------------------------------
# log Z
# --------------------------------------------------------------------------------------------------
def log_normaliser(batch, tok: torch.Tensor, budget: int) -> torch.Tensor:
    """``log Z_t`` (float32) of the canonical tokens ``tok`` (temperature applied)."""
    n = tok.numel()
    out = torch.empty(n, dtype=torch.float32, device=batch.device)
    if n == 0:
        return out
    t = batch.opts.temperature
    if batch.logits is not None:
        vocab = batch.logits.shape[-1]
        nb = max(1, budget // vocab)
        for i in range(0, n, nb):
            rows = batch.gather(batch.logits, tok[i : i + nb]).float()
            out[i : i + nb] = torch.logsumexp(rows / t, dim=-1)
        return out
    w = batch.lm_head_weight
    d = w.shape[1]
    if batch.old_logprobs is not None:
        nb = max(1, budget // d)
        for i in range(0, n, nb):
            idx = tok[i : i + nb]
            h = batch.gather(batch.hidden, idx).float()
            z_y = (h * w[batch.tok_ids[idx]].float()).sum(-1) / t
            out[i : i + nb] = z_y - batch.gather(batch.old_logprobs, idx).float()
        return out
    nb = min(n, max(1, budget // d), 4096)
    for i in range(0, n, nb):
        out[i : i + nb] = vocab_logsumexp(batch.gather(batch.hidden, tok[i : i + nb]).float(), w, t, budget)
    return out


class _ChunkErrors:
    """Prediction errors and hidden rows of token blocks of one chunk (segments that share the chunk's
    padded ``V*`` columns ``c0 .. c1``), recomputed from ``h``, the ``V*`` weight rows (or gathered logits)
    and ``log Z``; never stored for the batch."""

    def __init__(self, batch, plan: Plan, groups: torch.Tensor, c0: int, c1: int):
        dev = batch.device
        self.batch, self.plan = batch, plan
        cols = c0 + torch.arange(c1 - c0, device=dev)
        self.vvalid = cols[None, :] < plan.vs_count[groups][:, None]  # [S, vcols]
        vidx = (plan.vs_start[groups][:, None] + cols[None, :]).clamp_max(max(plan.vs_id.numel() - 1, 0))
        self.vids = torch.where(self.vvalid, plan.vs_id[vidx], torch.zeros_like(vidx))  # [S, vcols]
        self.wc = None
        if batch.lm_head_weight is not None:
            self.wc = batch.lm_head_weight[self.vids].float()  # [S, vcols, d]
            self.wc *= self.vvalid[..., None]

    def block(self, rows: torch.Tensor, start: torch.Tensor, length: torch.Tensor, t0: int, blk: int):
        """Errors ``[R, blk, vcols]`` and hidden ``[R, blk, d]`` of tokens ``start + t0 ..`` of each range
        (``rows[r]``: the chunk-local segment whose ``V*`` range ``r`` uses); padding rows are zero."""
        batch, plan = self.batch, self.plan
        dev = batch.device
        ar = t0 + torch.arange(blk, device=dev)
        valid = ar[None, :] < length[:, None]  # [R, B]
        pos = (start[:, None] + ar[None, :]).clamp_max(max(plan.order.numel() - 1, 0))
        tok = plan.order[pos]
        vids, vvalid = self.vids[rows], self.vvalid[rows]
        h = batch.gather(batch.hidden, tok).float()
        h *= valid[..., None]
        if self.wc is not None:
            z = torch.bmm(h, self.wc[rows].transpose(1, 2))
        else:
            a = batch.tok_a[tok][..., None]
            z = (batch.logits[a, vids[:, None, :]] if batch.tok_b is None else
                 batch.logits[a, batch.tok_b[tok][..., None], vids[:, None, :]]).float()
        z /= batch.opts.temperature
        z -= plan.log_z[pos][..., None]
        err = z.exp_().neg_()  # in place: one [R, blk, vcols] buffer for logits and errors
        err += batch.tok_ids[tok][..., None] == vids[:, None, :]
        err *= valid[..., None] & vvalid[:, None, :]
        return err, h, pos, valid


def _block_len(longest: int, budget: int, n_rows: int, width: int) -> int:
    """Tokens per block: ``n_rows * blk * width <= budget``, never wider than the longest range, and
    balanced so the last block is not mostly padding."""
    blk = max(1, budget // max(n_rows * width, 1))
    return -(-longest // -(-longest // blk)) if longest > 0 else 1


def _still_running(length: torch.Tensor, t0: int):
    """Indices of the ranges longer than ``t0`` (``None`` when all are): the rows of the next block."""
    act = (length > t0).nonzero().squeeze(1)
    return None if act.numel() == length.numel() else act


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

    Per chunk of groups (and ``V*`` column block): ``N_i = E_i^T H_i`` for each positive response ``i``
    (``[|V*|, d]``, from blocks of its tokens), ``M_g = sum_{i in P_g} N_i``, then
    ``<M_g, N_i>`` (minus ``<N_i, N_i>`` for ``anchor="others"``) accumulates response ``i``'s anchor
    numerator, and every token to score gets ``s_t = g_t^T M_g h_t``. Positive tokens are scored only
    with ``score_positive``: the anchors need none of their scores (``docs/NTHR.md``).
    ``reduce_m(M, k0, k1, c0, c1)`` may transform each chunk's ``M`` before use (the distributed
    all-reduce). Returns ``(scores [n] float32, (resp, anchors float64))``.
    """
    budget = budget or SCRATCH_ELEMS
    dev = batch.device
    plan = plan or make_plan(batch, lambda order: log_normaliser(batch, order, budget))
    d = batch.hidden.shape[-1]
    n_g = plan.g_start.numel()
    r_start, r_len, r_group = positive_responses(batch, plan)
    # which tokens are scored: negative ones, and positive ones when asked
    sc_start = plan.g_start if batch.opts.score_positive else plan.g_start + plan.g_pos
    sc_len = plan.g_len if batch.opts.score_positive else plan.g_len - plan.g_pos
    # every chunk holds M for its groups plus N for each of their positive responses (global counts)
    copies = (1 + batch.n_pos[plan.g_batch]).tolist()
    r_first = torch.searchsorted(r_group, torch.arange(n_g + 1, device=dev)).tolist()
    numer = torch.zeros(r_start.numel(), dtype=torch.float64, device=dev)
    out = torch.zeros(plan.order.numel(), dtype=torch.float32, device=dev)
    others = batch.opts.anchor == "others"
    for k0, k1, c0, c1 in chunks(plan.vs_count.tolist(), d, budget, copies):
        groups = torch.arange(k0, k1, device=dev)
        ce = _ChunkErrors(batch, plan, groups, c0, c1)
        n_seg, vcols = k1 - k0, c1 - c0
        ra, rb = r_first[k0], r_first[k1]
        rows = r_group[ra:rb] - k0
        rs, rl = r_start[ra:rb], r_len[ra:rb]
        n_mat = torch.zeros(rb - ra, vcols, d, dtype=torch.float32, device=dev)
        longest = int(rl.max()) if rb > ra else 0
        blk = _block_len(longest, budget, max(rb - ra, 1), max(vcols, d))
        for t0 in range(0, longest, blk):
            act = _still_running(rl, t0)  # a short response stops early instead of adding zero rows
            if act is None:
                err, h, _, _ = ce.block(rows, rs, rl, t0, blk)
                n_mat.baddbmm_(err.transpose(1, 2), h)
            else:
                err, h, _, _ = ce.block(rows[act], rs[act], rl[act], t0, blk)
                n_mat.index_add_(0, act, torch.bmm(err.transpose(1, 2), h))
        m = torch.zeros(n_seg, vcols, d, dtype=torch.float32, device=dev).index_add_(0, rows, n_mat)
        if reduce_m is not None:
            m = reduce_m(m, k0, k1, c0, c1)
        flat_n = n_mat.reshape(rb - ra, 1, vcols * d)
        dots = torch.bmm(flat_n, m[rows].reshape(rb - ra, vcols * d, 1)).reshape(-1)
        if others:
            dots -= torch.bmm(flat_n, flat_n.transpose(1, 2)).reshape(-1)
        numer[ra:rb] += dots.to(torch.float64)
        del n_mat, flat_n
        s_start, s_len = sc_start[k0:k1], sc_len[k0:k1]
        longest = int(s_len.max()) if n_seg else 0
        blk = _block_len(longest, budget, n_seg, max(vcols, d))
        for t0 in range(0, longest, blk):
            act = _still_running(s_len, t0)
            seg = groups - k0 if act is None else act
            err, h, pos, valid = ce.block(seg, s_start[seg], s_len[seg], t0, blk)
            s = (torch.bmm(err, m if act is None else m[act]) * h).sum(-1)
            out[pos[valid]] += s[valid]
    scores = torch.zeros(batch.n_tokens, dtype=torch.float32, device=dev)
    scores[plan.order] = out
    resp = batch.tok_resp[plan.order[r_start]]
    return scores, (resp, numer / r_len.to(torch.float64))


def nthr_advantages(batch, budget: Optional[int] = None):
    scores, anchors = nthr_scores(batch, budget)
    selected, token_adv, tau, eta = finish(batch, scores, anchors)
    return scores, selected, token_adv, tau, eta
