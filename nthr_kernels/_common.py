"""Pieces shared by every backend: the eta table, the threshold rule and the final selection/rescale.

The finishing step works on per-token scores of a whole batch with segment reductions (no loop over
groups or tokens), so the torch and Triton backends share it; the float64 reference has its own loop.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

EtaSpec = Union[str, float, int, Callable[[float], float]]

ETA_NAMES = ("2|0.5-p|", "1-p", "p")


def check_eta(eta: EtaSpec) -> None:
    """Raise unless ``eta`` is a known name, a number in [0, 1], or a callable."""
    if isinstance(eta, str):
        if eta not in ETA_NAMES:
            raise ValueError(f"eta: unknown name {eta!r}; expected one of {ETA_NAMES}, a number in [0, 1] or a callable p -> eta")
        return
    if isinstance(eta, bool):
        raise TypeError("eta: expected a name, a number in [0, 1] or a callable, got a bool")
    if isinstance(eta, (int, float)):
        if not (0.0 <= float(eta) <= 1.0):  # also rejects NaN
            raise ValueError(f"eta: a constant eta must lie in [0, 1], got {eta}")
        return
    if callable(eta):
        return
    raise TypeError(f"eta: expected a name {ETA_NAMES}, a number in [0, 1] or a callable, got {type(eta).__name__}")


def eta_value(eta: EtaSpec, p: float) -> float:
    """eta for a group with success rate ``p``: ``2|0.5-p|`` (default), ``1-p``, ``p``, a constant or ``eta(p)``."""
    check_eta(eta)
    if eta == "2|0.5-p|":
        return 2.0 * abs(0.5 - p)
    if eta == "1-p":
        return 1.0 - p
    if eta == "p":
        return p
    if callable(eta):
        v = float(eta(p))
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"eta: the callable returned {v} for p={p}; expected a value in [0, 1]")
        return v
    return float(eta)


def eta_per_group(eta: EtaSpec, p: torch.Tensor) -> torch.Tensor:
    """Vectorised :func:`eta_value` over a float64 tensor of success rates (callables are called per group)."""
    if eta == "2|0.5-p|":
        return 2.0 * (0.5 - p).abs()
    if eta == "1-p":
        return 1.0 - p
    if eta == "p":
        return p.clone()
    if callable(eta):
        return torch.tensor([eta_value(eta, float(x)) for x in p.tolist()], dtype=p.dtype, device=p.device)
    return torch.full_like(p, float(eta))


def tau_from_min_anchor(min_anchor: torch.Tensor, beta: float) -> torch.Tensor:
    """``tau = beta * min anchor`` with the conventions ``beta = 0 -> 0`` and ``beta = -inf -> -inf``."""
    if beta == 0.0:
        return torch.zeros_like(min_anchor)
    if math.isinf(beta) and beta < 0:
        return torch.full_like(min_anchor, -math.inf)
    return beta * min_anchor


def runs(keys: torch.Tensor):
    """Start index and length of each run of equal consecutive ``keys``."""
    change = torch.ones_like(keys, dtype=torch.bool)
    change[1:] = keys[1:] != keys[:-1]
    firsts = change.nonzero().squeeze(1)
    return firsts, torch.diff(torch.cat([firsts, firsts.new_tensor([keys.numel()])]))


def run_means(values: torch.Tensor, keys: torch.Tensor):
    """Means of the runs of equal consecutive ``keys`` (a deterministic float64 scan).

    Returns ``(run_keys, means)``; ``keys`` must list each key in one contiguous run.
    """
    n = keys.numel()
    if n == 0:
        return keys, values.new_zeros(0, dtype=torch.float64)
    first, lengths = runs(keys)
    ends = first + lengths
    csum = torch.cat([values.new_zeros(1, dtype=torch.float64), torch.cumsum(values.to(torch.float64), 0)])
    return keys[first], (csum[ends] - csum[first]) / (ends - first).to(torch.float64)


def group_tau(anchor_scores, tok_resp, resp_group, n_groups: int, beta: float, reduce_min_anchor=None) -> torch.Tensor:
    """float64 ``tau`` per group from the anchor scores of positive tokens (``tok_resp`` in runs).

    ``tau_g = beta * min_{i in P_g} mean_k s_{i,k}``; groups without an anchor get ``+inf * beta``
    style garbage and must be masked by the caller's ``active`` flag.
    """
    resp, means = run_means(anchor_scores, tok_resp)
    min_anchor = torch.full((n_groups,), math.inf, dtype=torch.float64, device=tok_resp.device)
    min_anchor = min_anchor.scatter_reduce(0, resp_group[resp], means, reduce="amin", include_self=True)
    if reduce_min_anchor is not None:
        min_anchor = reduce_min_anchor(min_anchor)
    return tau_from_min_anchor(min_anchor, beta)


def finish(
    scores: torch.Tensor,
    anchor_scores: torch.Tensor,
    tok_resp: torch.Tensor,
    resp_group: torch.Tensor,
    positive: torch.Tensor,
    adv: torch.Tensor,
    group_active: torch.Tensor,
    n_pos: torch.Tensor,
    n_resp: torch.Tensor,
    *,
    beta: float,
    eta: EtaSpec,
    reduce_min_anchor: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
):
    """Anchors, tau, eta, selection and token advantages for a whole batch.

    ``scores [n]`` (float32) are the per-token scores (0 for tokens of inactive groups);
    ``anchor_scores [n]`` the scores that enter the positive anchors (the same tensor for
    ``anchor="all"``, the scores without the response's own tokens for ``"others"``).
    ``reduce_min_anchor`` (optional) maps the per-group float64 minimum anchor (``+inf`` where this
    process holds no positive response with tokens) to the final one; the distributed path passes an
    all-reduce-min over ranks.
    Returns ``(selected [n], token_adv [n] float32, tau [g] float32, eta [g] float32)``.
    """
    n_groups = group_active.numel()
    tok_pos = positive[tok_resp]
    tau = group_tau(anchor_scores[tok_pos], tok_resp[tok_pos], resp_group, n_groups, beta, reduce_min_anchor)
    tau = torch.where(group_active, tau, torch.full_like(tau, math.nan))
    p = n_pos.to(torch.float64) / n_resp.clamp_min(1).to(torch.float64)
    eta_g = torch.where(group_active, eta_per_group(eta, p), torch.ones_like(p))
    tok_group = resp_group[tok_resp]
    tau_tok = tau.to(torch.float32)[tok_group]
    # Compare in float32 with tau rounded to float32, the same rule the fused kernels apply.
    selected = group_active[tok_group] & ~tok_pos & (scores > tau_tok)
    adv_tok = adv[tok_resp]
    token_adv = torch.where(selected, adv_tok * eta_g.to(torch.float32)[tok_group], adv_tok)
    return selected, token_adv, tau.to(torch.float32), eta_g.to(torch.float32)
