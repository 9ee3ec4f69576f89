"""The portable backend: batched PyTorch (CPU or CUDA), float32 arithmetic, bounded scratch memory.

Algorithm (factored form of ``shared/NTHR.md``), for the active groups of a batch:

1. ``log Z_t``: with ``lm_head_weight`` and ``old_logprobs`` the shortcut ``z_t[y_t] / T - l_t`` (one dot
   per token); with the weight alone a chunked logsumexp over the vocabulary (``2 N |V| d`` FLOPs, the
   cost of the lm_head forward); with ``logits`` a chunked logsumexp over the given rows.
2. ``V*`` per group: sorted unique ids of the group's completion tokens (one ``torch.unique`` for the
   batch).
3. Groups are packed into chunks, padded to the chunk's largest ``|V*|``; per chunk
   ``M_g = sum_{u in P_g} g_u h_u^T`` accumulates over blocks of positive tokens (``bmm``), then every
   token's score ``s_t = g_t^T M_g h_t`` is computed block by block. The prediction errors
   ``g_t = onehot(y_t) - exp(z_t / T - log Z_t)`` on ``V*`` are recomputed from ``h``, the ``|V*|`` weight
   rows (or gathered logits) and ``log Z_t`` inside each block; they are never stored for the batch.

Scratch memory. With ``E = SCRATCH_ELEMS`` (default ``2**22`` float32 elements, 16 MiB), every block
tensor (``W`` rows and ``M`` of a chunk, the ``[chunk, block, |V*|]`` logits/errors, the hidden block and
``err @ M``) holds at most ``E`` elements; at most seven live at once, so the peak scratch is about
``7 * 4 * E`` bytes (112 MiB by default), plus ``O(N)`` per-token index and score vectors (about 64
bytes per completion token). A single group whose ``|V*| * d`` exceeds ``E`` is split into column blocks
of ``V*``. No ``[N, V]`` or ``[N, N]`` tensor is ever formed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .._common import finish, runs

SCRATCH_ELEMS = 1 << 22


# --------------------------------------------------------------------------------------------------
# log Z
# --------------------------------------------------------------------------------------------------
def log_normaliser(batch, tok: torch.Tensor, budget: int) -> torch.Tensor:
    """``log Z_t`` (float32) of the canonical tokens ``tok`` (temperature applied)."""
    n = tok.numel()
    out = torch.empty(n, dtype=torch.float32, device=batch.device)
    if n == 0:
        return out
    t = batch.temperature
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


def vocab_logsumexp(h: torch.Tensor, w: torch.Tensor, temperature: float, budget: int) -> torch.Tensor:
    """``logsumexp_v (w_v . h_t) / T`` over the whole vocabulary for float32 rows ``h [n, d]`` (which
    it may scale in place), in vocabulary chunks: an online logsumexp, no ``[n, |V|]`` tensor.

    Only the logits chunk and its exp are live here, so a chunk may take 3 of the 7 scratch slots of
    the module's bound: fewer, larger chunks (fewer launches / thread-pool barriers), same peak.
    """
    vocab, d = w.shape
    vc = max(1, min(vocab, 3 * budget // max(h.shape[0], 1), budget // d))
    if temperature != 1.0:
        h /= temperature  # (h / T) @ W^T == (h @ W^T) / T: one [n, d] pass instead of one per chunk
    m = torch.full((h.shape[0], 1), -math.inf, dtype=torch.float32, device=h.device)
    s = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    for v0 in range(0, vocab, vc):
        z = h @ w[v0 : v0 + vc].float().T
        m_new = torch.maximum(m, z.amax(-1, keepdim=True))  # online logsumexp: 3 passes over z
        s = s * torch.exp(m - m_new).squeeze(1) + z.sub_(m_new).exp_().sum(-1)
        m = m_new
    return m.squeeze(1) + torch.log(s)


# --------------------------------------------------------------------------------------------------
# plan: active tokens ordered by group (positive responses first), V* per group
# --------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    order: torch.Tensor  # [n_act] canonical token index, grouped by active group, positive tokens first
    grp_of: torch.Tensor  # [n_act] dense active-group index of order[i]
    g_start: torch.Tensor  # [n_g] first position in order of each active group
    g_len: torch.Tensor  # [n_g] tokens of the group
    g_pos: torch.Tensor  # [n_g] positive tokens of the group
    g_batch: torch.Tensor  # [n_g] batch group index
    vs_id: torch.Tensor  # [K] V* ids, concatenated over active groups (sorted within each)
    vs_start: torch.Tensor  # [n_g]
    vs_count: torch.Tensor  # [n_g]
    log_z: torch.Tensor  # [n_act] float32, for order[i]


def make_plan(batch, budget: int, vstar: Optional[Callable] = None, log_z: Optional[Callable] = None) -> Plan:
    """Order the active tokens and build ``V*``. ``vstar(grp_of, ids, n_g)`` may replace the local
    unique (the distributed path takes the union over ranks); it returns ``(vs_group, vs_id)`` sorted by
    ``(group, id)``. ``log_z(order)`` may replace :func:`log_normaliser` (the Triton backend's kernel)."""
    dev = batch.device
    tok_group = batch.resp_group[batch.tok_resp]
    act_tok = batch.group_active[tok_group]
    tok = act_tok.nonzero().squeeze(1)
    act_groups = batch.group_active.nonzero().squeeze(1)
    dense = torch.full_like(batch.group_active, -1, dtype=torch.int64)
    dense[act_groups] = torch.arange(act_groups.numel(), device=dev)
    g = dense[tok_group[tok]]
    neg = (~batch.positive[batch.tok_resp[tok]]).to(torch.int64)
    _, perm = torch.sort(g * 2 + neg, stable=True)
    order = tok[perm]
    grp_of = g[perm]
    n_g = act_groups.numel()
    g_len = torch.bincount(grp_of, minlength=n_g)
    g_pos = torch.bincount(grp_of[neg[perm] == 0], minlength=n_g)
    g_start = torch.cumsum(g_len, 0) - g_len
    ids = batch.tok_ids[order]
    if vstar is None:
        vocab = batch.vocab_size
        keys = torch.unique(grp_of * vocab + ids)
        vs_group, vs_id = keys // vocab, keys % vocab
    else:
        vs_group, vs_id = vstar(grp_of, ids, n_g)
    vs_count = torch.bincount(vs_group, minlength=n_g)
    vs_start = torch.cumsum(vs_count, 0) - vs_count
    return Plan(
        order=order,
        grp_of=grp_of,
        g_start=g_start,
        g_len=g_len,
        g_pos=g_pos,
        g_batch=act_groups,
        vs_id=vs_id,
        vs_start=vs_start,
        vs_count=vs_count,
        log_z=log_normaliser(batch, order, budget) if log_z is None else log_z(order),
    )


def _chunks(vs_count: torch.Tensor, seg_group: torch.Tensor, d: int, budget: int):
    """Consecutive segments packed so that ``n_seg * max|V*| * d <= budget``; a segment too large on its
    own is split into ``V*`` column blocks. Yields ``(k0, k1, c0, c1)``. Depends only on ``V*`` sizes, so
    every rank of a distributed run walks the same chunks."""
    counts = vs_count[seg_group].tolist()
    k, n = 0, len(counts)
    while k < n:
        vmax = max(counts[k], 1)
        if vmax * d > budget:
            vb = max(1, budget // d)
            for c0 in range(0, vmax, vb):
                yield k, k + 1, c0, min(vmax, c0 + vb)
            k += 1
            continue
        k1 = k + 1
        while k1 < n and (k1 + 1 - k) * max(vmax, counts[k1]) * d <= budget:
            vmax = max(vmax, counts[k1])
            k1 += 1
        yield k, k1, 0, vmax
        k = k1


def segment_scores(
    batch,
    plan: Plan,
    seg_group: torch.Tensor,
    acc_start: torch.Tensor,
    acc_len: torch.Tensor,
    sc_start: torch.Tensor,
    sc_len: torch.Tensor,
    budget: int,
    reduce_m: Optional[Callable[[torch.Tensor, int, int, int, int], torch.Tensor]] = None,
) -> torch.Tensor:
    """Factored scores for segments ("which tokens build M, which are scored", both ranges of ``order``).

    Segment ``k`` uses the ``V*`` of active group ``seg_group[k]``; ``M_k`` sums ``g_u h_u^T`` over
    ``order[acc_start[k] : acc_start[k] + acc_len[k]]`` and every token of the score range gets
    ``g_t^T M_k h_t``. Score ranges must be disjoint. ``reduce_m(M, k0, k1, c0, c1)`` may transform each
    chunk's ``M`` before scoring (the distributed all-reduce). Returns float32 ``[len(order)]``.
    """
    dev = batch.device
    d = batch.hidden.shape[-1]
    out = torch.zeros(plan.order.numel(), dtype=torch.float32, device=dev)
    t = batch.temperature
    w = batch.lm_head_weight
    for k0, k1, c0, c1 in _chunks(plan.vs_count, seg_group, d, budget):
        sg = seg_group[k0:k1]
        n_seg, vcols = k1 - k0, c1 - c0
        cols = c0 + torch.arange(vcols, device=dev)
        vvalid = cols[None, :] < plan.vs_count[sg][:, None]  # [S, vcols]
        vidx = (plan.vs_start[sg][:, None] + cols[None, :]).clamp_max(max(plan.vs_id.numel() - 1, 0))
        vids = torch.where(vvalid, plan.vs_id[vidx], torch.zeros_like(vidx))  # [S, vcols]
        wc = None
        if w is not None:
            wc = w[vids].float()
            wc *= vvalid[..., None]
        blk = max(1, min(budget // (n_seg * vcols), budget // (n_seg * d)))
        # never wider than the longest range of the chunk, and balanced so the last block is not mostly padding
        longest = max(int(acc_len[k0:k1].max()), int(sc_len[k0:k1].max())) if n_seg else 1
        blk = -(-longest // -(-longest // blk)) if longest > 0 else 1

        def errors_and_hidden(start, length, t0):
            ar = t0 + torch.arange(blk, device=dev)
            valid = ar[None, :] < length[k0:k1][:, None]  # [S, B]
            pos = (start[k0:k1][:, None] + ar[None, :]).clamp_max(max(plan.order.numel() - 1, 0))
            tok = plan.order[pos]
            h = batch.gather(batch.hidden, tok).float()
            h *= valid[..., None]
            if wc is not None:
                z = torch.bmm(h, wc.transpose(1, 2))
            else:
                a = batch.tok_a[tok][..., None]
                z = (batch.logits[a, vids[:, None, :]] if batch.tok_b is None else
                     batch.logits[a, batch.tok_b[tok][..., None], vids[:, None, :]]).float()
            z /= t
            z -= plan.log_z[pos][..., None]
            err = torch.exp(z).neg_()
            err += batch.tok_ids[tok][..., None] == vids[:, None, :]
            err *= (valid[..., None] & vvalid[:, None, :])
            return err, h, pos, valid

        m = torch.zeros(n_seg, vcols, d, dtype=torch.float32, device=dev)
        for t0 in range(0, int(acc_len[k0:k1].max()) if n_seg else 0, blk):
            err, h, _, _ = errors_and_hidden(acc_start, acc_len, t0)
            m.baddbmm_(err.transpose(1, 2), h)
        if reduce_m is not None:
            m = reduce_m(m, k0, k1, c0, c1)
        for t0 in range(0, int(sc_len[k0:k1].max()) if n_seg else 0, blk):
            err, h, pos, valid = errors_and_hidden(sc_start, sc_len, t0)
            s = (torch.bmm(err, m) * h).sum(-1)
            out[pos[valid]] += s[valid]
    return out


def nthr_scores(batch, budget: Optional[int] = None, plan: Optional[Plan] = None, reduce_m=None):
    """Per-token scores and anchor scores (canonical token order), both float32 ``[n]``."""
    budget = budget or SCRATCH_ELEMS
    plan = plan or make_plan(batch, budget)
    n_g = plan.g_start.numel()
    seg = torch.arange(n_g, device=batch.device)
    s_order = segment_scores(batch, plan, seg, plan.g_start, plan.g_pos, plan.g_start, plan.g_len, budget, reduce_m)
    scores = torch.zeros(batch.n_tokens, dtype=torch.float32, device=batch.device)
    scores[plan.order] = s_order
    if batch.anchor == "all":
        return scores, scores
    # anchor="others": subtract each positive response's own contribution from its own tokens.
    ar = torch.arange(plan.order.numel(), device=batch.device)
    p_idx = (ar < (plan.g_start + plan.g_pos)[plan.grp_of]).nonzero().squeeze(1)
    # positions of p_idx are grouped by response (stable order): one segment per response run
    firsts, r_len = runs(batch.tok_resp[plan.order[p_idx]])
    r_start = p_idx[firsts]
    r_group = plan.grp_of[r_start]
    own = segment_scores(batch, plan, r_group, r_start, r_len, r_start, r_len, budget)
    anchor_scores = scores.clone()
    anchor_scores[plan.order] -= own
    return scores, anchor_scores


def nthr_advantages(batch, budget: Optional[int] = None):
    scores, anchor_scores = nthr_scores(batch, budget)
    selected, token_adv, tau, eta = finish(
        scores,
        anchor_scores,
        batch.tok_resp,
        batch.resp_group,
        batch.positive,
        batch.adv,
        batch.group_active,
        batch.n_pos,
        batch.n_resp,
        beta=batch.beta,
        eta=batch.eta,
    )
    return scores, selected, token_adv, tau, eta


# --------------------------------------------------------------------------------------------------
# score_tokens: one group, dense errors
# --------------------------------------------------------------------------------------------------
def factored_cost(t_pos: int, t_neg: int, v: int, d: int) -> int:
    return 2 * v * d * (t_pos + t_neg)


def pairwise_cost(t_pos: int, t_neg: int, v: int, d: int) -> int:
    return 2 * t_pos * t_neg * (v + d)


def score_tokens(h_pos, h_neg, err_pos, err_neg, budget: Optional[int] = None, path: str = "auto"):
    """``s_t = sum_u <err_pos[u], err_neg[t]> <h_pos[u], h_neg[t]>`` in float32, factored or pairwise
    (whichever costs fewer FLOPs), every temporary bounded by ``budget`` elements."""
    budget = budget or SCRATCH_ELEMS
    tp, tn = h_pos.shape[0], h_neg.shape[0]
    v, d = err_pos.shape[1], h_pos.shape[1]
    out = torch.zeros(tn, dtype=torch.float32, device=h_neg.device)
    if tp == 0 or tn == 0:
        return out
    if path == "auto":
        path = "pairwise" if pairwise_cost(tp, tn, v, d) < factored_cost(tp, tn, v, d) else "factored"
    if path == "factored":
        vb = max(1, min(v, budget // d))
        rb = max(1, budget // max(vb, d))
        for c0 in range(0, v, vb):
            m = torch.zeros(min(vb, v - c0), d, dtype=torch.float32, device=h_neg.device)
            for r0 in range(0, tp, rb):
                m.addmm_(err_pos[r0 : r0 + rb, c0 : c0 + vb].float().T, h_pos[r0 : r0 + rb].float())
            for r0 in range(0, tn, rb):
                e = err_neg[r0 : r0 + rb, c0 : c0 + vb].float()
                out[r0 : r0 + rb] += ((e @ m) * h_neg[r0 : r0 + rb].float()).sum(-1)
        return out
    # pairwise, flash-attention style: [bn, bp] tiles of both Gram matrices, row sums accumulated.
    bn = max(1, min(tn, int(math.sqrt(budget))))
    bp = max(1, min(tp, budget // max(bn, v, d)))
    for n0 in range(0, tn, bn):
        en, hn = err_neg[n0 : n0 + bn].float(), h_neg[n0 : n0 + bn].float()
        acc = torch.zeros(en.shape[0], dtype=torch.float32, device=h_neg.device)
        for p0 in range(0, tp, bp):
            a = en @ err_pos[p0 : p0 + bp].float().T
            a *= hn @ h_pos[p0 : p0 + bp].float().T
            acc += a.sum(1)
        out[n0 : n0 + bn] = acc
    return out
