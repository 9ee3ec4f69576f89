"""Pieces shared by every backend: the eta table, the threshold rule and the final selection/rescale.

The finishing step works on per-token scores of a whole batch with segment reductions (no loop over
groups or tokens), so the torch and Triton backends share it; the float64 reference has its own loop.
"""
from __future__ import annotations

import math
from typing import Callable, Union

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


def segment_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive segments of ``values`` with the given ``lengths`` (deterministic scan)."""
    csum = torch.cat([values.new_zeros(1), torch.cumsum(values, 0)])
    ends = torch.cumsum(lengths, 0)
    return csum[ends] - csum[ends - lengths]


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
):
    """Anchors, tau, eta, selection and token advantages for a whole batch.

    ``scores [n]`` (float32) are the per-token scores (0 for tokens of inactive groups);
    ``anchor_scores [n]`` the scores that enter the positive anchors (the same tensor for
    ``anchor="all"``, the scores without the response's own tokens for ``"others"``).
    Returns ``(selected [n], token_adv [n] float32, tau [g] float32, eta [g] float32)``.
    """
    dev = scores.device
    n_groups = group_active.numel()
    n_r = resp_group.numel()
    tok_pos = positive[tok_resp]
    # Per-response mean of anchor scores over its tokens (tok_resp is sorted; a float64 scan keeps the
    # reduction order fixed, so results are bitwise reproducible on every device).
    cnt = torch.bincount(tok_resp, minlength=n_r).to(torch.float64)
    tot = segment_sum(anchor_scores.to(torch.float64), cnt.to(torch.int64))
    has_anchor = positive & (cnt > 0)
    sbar = torch.where(has_anchor, tot / cnt.clamp_min(1), torch.full_like(tot, math.inf))
    min_anchor = torch.full((n_groups,), math.inf, dtype=torch.float64, device=dev)
    min_anchor = min_anchor.scatter_reduce(0, resp_group, sbar, reduce="amin", include_self=True)
    tau = tau_from_min_anchor(min_anchor, beta)
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
