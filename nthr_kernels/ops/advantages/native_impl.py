"""``nthr_advantages`` on the native C++ CPU kernels (``csrc/advantages.cpp``; loader in
:mod:`nthr_kernels.ops.native_lib`)."""
from __future__ import annotations

from typing import Optional

import torch

# the native op's cost rule per group (own_pairs=False: it leaves a response's own pairs out in the same pass);
# the op takes the pairwise path where its scratch also fits (nthr::native_pairwise_group)
from ...core.rules import SCRATCH_ELEMS, group_eta, pairwise_cheaper  # noqa: F401  (pairwise_cheaper: re-exported)
from .. import native_lib


def pairwise_group(t_pos: int, t_all: int, nv: int, d: int, score_positive: bool = False,
                   budget: Optional[int] = None) -> bool:
    """Whether ``nthr::native_advantages`` runs a group of ``t_all`` tokens (``t_pos`` positive, ``|V*| = nv``)
    on the pairwise path: :func:`pairwise_cheaper` and its scratch within one worker's slice."""
    native_lib.require()
    return bool(torch.ops.nthr.native_pairwise_group(t_pos, t_all, nv, d, score_positive, int(budget or SCRATCH_ELEMS)))


# --------------------------------------------------------------------------------------------------
def nthr_advantages(batch, budget: Optional[int] = None):
    """``(scores [n] f32, selected [n] bool, token_adv [n] f32, tau [g] f32, eta [g] f32)`` of a
    validated :class:`~nthr_kernels.core.checks.Batch`, canonical token order (like the torch backend)."""
    native_lib.require()
    if batch.device.type != "cpu":
        raise ValueError(f"backend: 'native' runs on CPU tensors, got device {batch.device}")
    eta_g = group_eta(batch.opts.eta, batch.n_pos, batch.n_resp, batch.group_active)
    lp = batch.gather(batch.old_logprobs).to(torch.float32) if batch.old_logprobs is not None else None
    return torch.ops.nthr.native_advantages(
        batch.hidden,
        batch.tok_a,
        batch.tok_b,
        batch.tok_ids,
        batch.tok_resp,
        batch.resp_group,
        batch.positive,
        batch.adv,
        batch.group_active,
        eta_g,
        batch.lm_head_weight,
        batch.logits,
        lp,
        float(batch.opts.temperature),
        float(batch.opts.beta),
        batch.opts.anchor == "others",
        int(budget or SCRATCH_ELEMS),
        bool(batch.opts.score_positive),
    )


def value_checks(batch, weight_all_rows: Optional[bool], idx: Optional[torch.Tensor], budget: Optional[int] = None):
    """Validation's arithmetic on the native kernels, in one pass (``nthr::native_check_values``): ``(norms,
    excess)``. ``norms`` (unless ``weight_all_rows`` is None): float64 ``[2]``, the largest row norm of
    ``hidden`` at the canonical tokens and of the ``lm_head_weight`` rows read (all, or with ``old_logprobs``
    those of the completion ids), for :func:`~nthr_kernels.core.checks.check_policy_values`. ``excess``
    (unless ``idx`` is None): float64 ``[k]``, :func:`~nthr_kernels.core.checks.implied_vstar_mass` at the
    canonical tokens ``idx`` (each sampled token's group ``V*`` found in C++). Used by validation when this
    backend runs the call."""
    native_lib.require()
    sampled = idx is not None
    out = torch.ops.nthr.native_check_values(
        batch.hidden,
        batch.tok_a,
        batch.tok_b,
        batch.tok_ids,
        batch.lm_head_weight,
        weight_all_rows is not None,
        bool(weight_all_rows),
        batch.resp_group[batch.tok_resp] if sampled else None,
        batch.gather(batch.old_logprobs, idx).to(torch.float32) if sampled else None,
        idx,
        batch.group_ids.numel(),
        float(batch.opts.temperature),
        int(budget or SCRATCH_ELEMS),
    )
    return (out[:2] if weight_all_rows is not None else None), (out[2:] if sampled else None)


def implied_mass(batch, idx: torch.Tensor, budget: Optional[int] = None) -> torch.Tensor:
    """The ``excess`` part of :func:`value_checks` alone."""
    return value_checks(batch, None, idx, budget)[1]


def policy_norms(batch, weight_all_rows: bool) -> torch.Tensor:
    """The ``norms`` part of :func:`value_checks` alone."""
    return value_checks(batch, weight_all_rows, None)[0]


nthr_advantages.value_checks = value_checks  # read by nthr_kernels.library: validation's arithmetic
