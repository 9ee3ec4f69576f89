"""``nthr_advantages`` on the native C++ CPU kernels (``csrc/advantages.cpp``; loader in
:mod:`nthr_kernels.ops.native_lib`)."""
from __future__ import annotations

from typing import Optional

import torch

from ...core.rules import SCRATCH_ELEMS, group_eta
from .. import native_lib


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


def implied_mass(batch, idx: torch.Tensor, budget: Optional[int] = None) -> torch.Tensor:
    """float64 ``[k]``: :func:`~nthr_kernels.core.checks.implied_vstar_mass` at canonical tokens ``idx`` on the
    native kernels (each sampled token's group ``V*`` found in C++; no padding, no host-side block plan).
    Validation uses it for the ``old_logprobs`` check when this backend runs the call."""
    native_lib.require()
    return torch.ops.nthr.native_implied_mass(
        batch.hidden,
        batch.tok_a,
        batch.tok_b,
        batch.tok_ids,
        batch.resp_group[batch.tok_resp],
        batch.lm_head_weight,
        batch.gather(batch.old_logprobs, idx).to(torch.float32),
        idx,
        batch.group_ids.numel(),
        float(batch.opts.temperature),
        int(budget or SCRATCH_ELEMS),
    )


nthr_advantages.implied_mass = implied_mass  # read by nthr_kernels.library: validation's old_logprobs check
