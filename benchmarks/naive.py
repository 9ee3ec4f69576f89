"""The baseline: a naive per-group NTHR pipeline, in the style of the method's public implementation.

For each prompt group, in a Python loop:

1. the group's completion tokens are gathered from the padded batch;
2. without ``old_logprobs``: full logits over the whole vocabulary, ``hidden @ W.T / T`` in float32
   (``[T_g, |V|]``; split into row chunks only when one group's logits would exceed ``MAX_LOGITS_BYTES``), and
   the normaliser ``log Z`` by an fp32 logsumexp over them; with ``old_logprobs``: the logits on ``V*`` only,
   ``hidden @ W[V*].T / T``, and the shortcut ``log Z_t = w_{y_t} . h_t / T - l_t`` (so that each setting of
   the library has a naive counterpart doing the same work);
4. dense fp32 prediction errors on ``V*`` (sorted unique ids of the group);
5. factored scores ``M = G+^T H+``, ``s = rowsum((G M) * H)`` for every token of the group;
6. anchors (``anchor="all"``: mean score of each positive response), ``tau = beta * min anchor``,
   selection of the negative tokens with ``s > tau`` and token advantages.

It computes the same function as :func:`nthr_kernels.nthr_advantages` with ``anchor="all"``, takes the
same inputs (padded layout, ``group_size``) and returns the same fields (it scores every token, as the
public implementation does; with ``score_positive=False`` the positive tokens' scores read 0, the
library's rule). It is honest: float32 matmuls, vectorised within a group,
no artificial slow-downs. It exists to be measured against.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from nthr_kernels.core.rules import EtaSpec, eta_value
from nthr_kernels.ops.advantages.reference import threshold

MAX_LOGITS_BYTES = 1 << 30


class NaiveResult(NamedTuple):
    token_advantages: torch.Tensor  # [R, L] float32, 0 at padding
    selected: torch.Tensor  # [R, L] bool
    scores: torch.Tensor  # [R, L] float32, 0 outside active groups
    group_ids: torch.Tensor  # [n_groups] int64, 0 .. n_groups - 1
    tau: torch.Tensor  # [n_groups] float32, NaN when inactive
    eta: torch.Tensor  # [n_groups] float32, 1.0 when inactive
    active: torch.Tensor  # [n_groups] bool: mixed, with a positive token


def _log_z_and_vstar_logits(h: torch.Tensor, w: torch.Tensor, vstar: torch.Tensor, temperature: float):
    """``log Z [T]`` and the logits on ``V*`` ``[T, |V*|]`` from the full-vocabulary logits of ``h``."""
    n, vocab = h.shape[0], w.shape[0]
    rows = max(1, MAX_LOGITS_BYTES // (4 * vocab))
    log_z = torch.empty(n, dtype=torch.float32, device=h.device)
    z_vs = torch.empty(n, vstar.numel(), dtype=torch.float32, device=h.device)
    for r0 in range(0, n, rows):
        logits = h[r0 : r0 + rows] @ w.T  # [rows, |V|] float32: the full lm_head forward
        logits /= temperature
        log_z[r0 : r0 + rows] = torch.logsumexp(logits, dim=-1)
        z_vs[r0 : r0 + rows] = logits[:, vstar]
    return log_z, z_vs


def naive_nthr(
    hidden: torch.Tensor,
    token_ids: torch.Tensor,
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    *,
    lm_head_weight: torch.Tensor,
    group_size: int,
    mask: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    beta: float = 1.0,
    eta: EtaSpec = "2|0.5-p|",
    reward_threshold: float = 0.5,
    score_positive: bool = False,
) -> NaiveResult:
    """NTHR (``anchor="all"``) for a padded batch ``hidden [R, L, d]``, ``token_ids [R, L]``, one group
    loop iteration at a time. Same keywords as :func:`nthr_kernels.nthr_advantages`."""
    with torch.no_grad():
        n_resp = hidden.shape[0]
        dev = hidden.device
        if mask is None:
            mask = torch.ones(token_ids.shape, dtype=torch.bool, device=dev)
        mask = mask.to(torch.bool)
        w = lm_head_weight.float()
        positive = rewards.double() > reward_threshold
        adv = advantages.float()
        token_adv = torch.where(mask, adv[:, None], torch.zeros((), dtype=torch.float32, device=dev))
        selected = torch.zeros(token_ids.shape, dtype=torch.bool, device=dev)
        scores = torch.zeros(token_ids.shape, dtype=torch.float32, device=dev)
        n_groups = n_resp // group_size
        tau_g = torch.full((n_groups,), math.nan, dtype=torch.float32)
        eta_g = torch.ones(n_groups, dtype=torch.float32)
        active = torch.zeros(n_groups, dtype=torch.bool)
        for g in range(n_groups):
            r0, r1 = g * group_size, (g + 1) * group_size
            m = mask[r0:r1]
            n_pos = int(positive[r0:r1].sum())
            lens = m.sum(1)
            resp = torch.repeat_interleave(torch.arange(group_size, device=dev), lens)  # group-local response per token
            tok_pos = positive[r0:r1][resp]
            if not (0 < n_pos < group_size) or not bool(tok_pos.any()):
                continue
            h = hidden[r0:r1][m].float()  # [T_g, d]
            ids = token_ids[r0:r1][m].to(torch.int64)
            vstar = torch.unique(ids)
            if old_logprobs is None:
                log_z, z_vs = _log_z_and_vstar_logits(h, w, vstar, temperature)
            else:  # the shortcut: only the V* rows of the weight (and each token's own row)
                z_vs = h @ w[vstar].T / temperature
                log_z = (h * w[ids]).sum(-1) / temperature - old_logprobs[r0:r1][m].float()
            err = torch.exp(z_vs - log_z[:, None]).neg_()  # dense fp32 errors on V*: onehot - p
            err += ids[:, None] == vstar[None, :]
            mm = err[tok_pos].T @ h[tok_pos]  # M = G+^T H+  [|V*|, d]
            s = ((err @ mm) * h).sum(-1)  # [T_g]
            # anchor="all": mean score of every positive response with tokens; tau = beta * min anchor
            cnt = torch.bincount(resp, minlength=group_size).tolist()
            sums = torch.zeros(group_size, dtype=torch.float64, device=dev).index_add_(0, resp, s.double()).tolist()
            pos_r = positive[r0:r1].tolist()
            anchors = [sums[i] / cnt[i] for i in range(group_size) if pos_r[i] and cnt[i] > 0]
            tau = threshold(anchors, beta)
            e = eta_value(eta, n_pos / group_size)
            tau32 = torch.tensor(tau, dtype=torch.float32, device=dev)
            sel = ~tok_pos & (s > tau32)
            a = adv[r0:r1][resp]
            scores[r0:r1][m] = s if score_positive else torch.where(tok_pos, torch.zeros_like(s), s)
            selected[r0:r1][m] = sel
            token_adv[r0:r1][m] = torch.where(sel, a * e, a)
            tau_g[g] = tau
            eta_g[g] = e
            active[g] = True
        return NaiveResult(token_adv, selected, scores, torch.arange(n_groups, device=dev), tau_g.to(dev),
                           eta_g.to(dev), active.to(dev))


def naive_nthr_on(rb, *, with_logprobs: bool = True, **kw) -> NaiveResult:
    """:func:`naive_nthr` on a padded :class:`nthr_kernels.synthetic.RolloutBatch` (same inputs as
    ``nthr_advantages(rb.hidden, rb.token_ids, rb.rewards, rb.advantages, **rb.kwargs())``)."""
    return naive_nthr(
        rb.hidden, rb.token_ids, rb.rewards, rb.advantages, lm_head_weight=rb.lm_head_weight,
        group_size=rb.group_size, mask=rb.mask, old_logprobs=rb.old_logprobs if with_logprobs else None,
        temperature=rb.temperature, **kw,
    )


def naive_score_tokens(h_pos, h_neg, err_pos, err_neg) -> torch.Tensor:
    """Dense factored scores in one shot (the naive counterpart of :func:`nthr_kernels.score_tokens`)."""
    with torch.no_grad():
        mm = err_pos.float().T @ h_pos.float()
        return ((err_neg.float() @ mm) * h_neg.float()).sum(-1)
