"""The portable backend: batched PyTorch (CPU or CUDA), float32 arithmetic, bounded scratch memory.

Algorithm (factored form of ``docs/NTHR.md``), for the active groups of a batch:

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

from typing import Callable, Optional

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
    t = batch.opts.temperature
    w = batch.lm_head_weight
    for k0, k1, c0, c1 in chunks(plan.vs_count, seg_group, d, budget):
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
    plan = plan or make_plan(batch, lambda order: log_normaliser(batch, order, budget))
    n_g = plan.g_start.numel()
    seg = torch.arange(n_g, device=batch.device)
    s_order = segment_scores(batch, plan, seg, plan.g_start, plan.g_pos, plan.g_start, plan.g_len, budget, reduce_m)
    scores = torch.zeros(batch.n_tokens, dtype=torch.float32, device=batch.device)
    scores[plan.order] = s_order
    if batch.opts.anchor == "all":
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
    selected, token_adv, tau, eta = finish(batch, scores, anchor_scores)
    return scores, selected, token_adv, tau, eta
