"""Layer 2: the plan of a validated batch (active tokens by group, ``V*`` per group, chunks) and the
finishing step shared by the batched implementations (anchors, ``tau``, selection, rescale).

Everything works on whole batches with segment reductions (no loop over groups or tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .rules import group_eta, tau_from_min_anchor


def runs(keys: torch.Tensor):
    """Start index and length of each run of equal consecutive ``keys``."""
    change = torch.ones_like(keys, dtype=torch.bool)
    change[1:] = keys[1:] != keys[:-1]
    firsts = change.nonzero().squeeze(1)
    return firsts, torch.diff(torch.cat([firsts, firsts.new_tensor([keys.numel()])]))


def tau_from_anchors(anchor_group, anchors, n_groups: int, beta: float, reduce_min_anchor=None) -> torch.Tensor:
    """float64 ``tau`` per group from the anchors ``anchors[k]`` of positive responses in groups
    ``anchor_group[k]``.

    ``tau_g = beta * min_{i in P_g} sbar_i``; groups without an anchor get ``+inf * beta`` style garbage
    and must be masked by the caller's ``active`` flag. ``reduce_min_anchor`` (optional) maps the
    per-group minimum anchor (``+inf`` where this process holds no anchor of the group) to the final
    one; the distributed path passes an all-reduce-min over ranks.
    """
    min_anchor = torch.full((n_groups,), math.inf, dtype=torch.float64, device=anchor_group.device)
    min_anchor = min_anchor.scatter_reduce(0, anchor_group, anchors.to(torch.float64), reduce="amin",
                                           include_self=True)
    if reduce_min_anchor is not None:
        min_anchor = reduce_min_anchor(min_anchor)
    return tau_from_min_anchor(min_anchor, beta)


def finish(batch, scores: torch.Tensor, anchors, reduce_min_anchor: Optional[Callable] = None):
    """tau, eta, selection and token advantages for a whole batch.

    ``scores [n]`` (float32) are the per-token scores of the negative tokens (anything elsewhere);
    ``anchors = (resp, values)``: the float64 anchor of each positive response ``resp[k]`` that has tokens.
    ``reduce_min_anchor``: see :func:`tau_from_anchors`.
    Returns ``(selected [n], token_adv [n] float32, tau [g] float32, eta [g] float32)``.
    """
    tok_resp, resp_group, group_active = batch.tok_resp, batch.resp_group, batch.group_active
    resp, values = anchors
    tau = tau_from_anchors(resp_group[resp], values, group_active.numel(), batch.opts.beta, reduce_min_anchor)
    tau = torch.where(group_active, tau, torch.full_like(tau, math.nan))
    eta_g = group_eta(batch.opts.eta, batch.n_pos, batch.n_resp, group_active)
    tok_group = resp_group[tok_resp]
    tau_tok = tau.to(torch.float32)[tok_group]
    # Compare in float32 with tau rounded to float32, the same rule the fused kernels apply.
    selected = group_active[tok_group] & ~batch.positive[tok_resp] & (scores > tau_tok)
    adv_tok = batch.adv[tok_resp]
    token_adv = torch.where(selected, adv_tok * eta_g.to(torch.float32)[tok_group], adv_tok)
    return selected, token_adv, tau.to(torch.float32), eta_g.to(torch.float32)


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
    log_z: Optional[torch.Tensor]  # [n_act] float32, for order[i]; None: the implementation finds it later
    lp: torch.Tensor  # [n_act] float32, the sampled token's log-prob l_t (log Z_t = z_y / T - l_t)


def make_plan(batch, normaliser: Callable, vstar: Optional[Callable] = None) -> Plan:
    """Order the active tokens and build ``V*``. ``vstar(grp_of, ids, n_g)`` may replace the local
    unique (the distributed path takes the union over ranks); it returns ``(vs_group, vs_id)`` sorted by
    ``(group, id)``. ``normaliser(order)`` gives ``(log Z, l)`` of the ordered tokens (each implementation brings
    its own)."""
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
    log_z, lp = normaliser(order)
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
        log_z=log_z,
        lp=lp,
    )


def chunks(counts: list, d: int, budget: int, copies: Optional[list] = None):
    """Consecutive segments packed so that ``sum(copies) * max|V*| * d <= budget``, where segment ``k``
    holds ``copies[k]`` (default 1) ``[|V*|, d]`` matrices; a segment too large on its own is split into
    ``V*`` column blocks. ``counts``: ``|V*|`` per segment (host ints). Yields ``(k0, k1, c0, c1)``. Depends
    only on its arguments, so every rank of a distributed run that passes global sizes walks the same chunks."""
    copies = copies or [1] * len(counts)
    k, n = 0, len(counts)
    while k < n:
        vmax, held = max(counts[k], 1), copies[k]
        if held * vmax * d > budget:
            vb = max(1, budget // (d * held))
            for c0 in range(0, vmax, vb):
                yield k, k + 1, c0, min(vmax, c0 + vb)
            k += 1
            continue
        k1 = k + 1
        while k1 < n and (held + copies[k1]) * max(vmax, counts[k1]) * d <= budget:
            vmax = max(vmax, counts[k1])
            held += copies[k1]
            k1 += 1
        yield k, k1, 0, vmax
        k = k1
