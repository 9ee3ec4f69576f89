"""Utilities for tests and benchmarks (not used by the library itself)."""
from __future__ import annotations

import ctypes
import sys
from typing import Callable, Optional


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_rss_rise(fn: Callable[[], object]) -> Optional[int]:
    """Peak resident memory (bytes) of ``fn()`` above the resident size at its start, or None where
    it cannot be measured (non-Linux). Freed heap is returned to the OS first (``malloc_trim``) and the
    high-water mark reset (``/proc/self/clear_refs``), so reused memory shows up as a rise."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        base = _status_bytes("VmRSS:")
    except OSError:
        return None
    fn()
    return _status_bytes("VmHWM:") - base


def logprob_variants(model, rollout, seed: int = 0) -> dict:
    """``name -> (old_logprobs [R, L], temperature to pass)`` for a rollout of :mod:`nthr_kernels.grpo`
    sampled at ``rollout.temperature``: log-probs that belong to its hidden states (its own float32
    ones, a bf16 forward, rollout-engine noise N(0, sd) for sd in 0.01, 0.1, 0.3) and ones that do not
    (taken one position off either way, a lower or higher temperature passed). The cases of the
    ``old_logprobs`` check (``benchmarks/logprob_check.py``, ``tests/test_grpo.py``)."""
    import copy

    import torch

    from .grpo.rollout import completion_logprobs

    t, m, lp = rollout.temperature, rollout.mask, rollout.old_logprobs
    gen = torch.Generator().manual_seed(seed)
    out = {"float32 (exact)": (lp, t)}
    with torch.no_grad():
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        bf = completion_logprobs(bf16, rollout.prompt_ids, rollout.completion_ids, temperature=t)
    out["bf16 forward"] = (torch.where(m, bf.float(), 0.0), t)
    for sd in (0.01, 0.1, 0.3):
        noise = torch.randn(m.shape, generator=gen) * sd
        out[f"rollout noise N(0, {sd})"] = (torch.where(m, (lp + noise).clamp_max(0.0), 0.0), t)
    later, earlier = torch.zeros_like(lp), torch.zeros_like(lp)
    later[:, :-1] = lp[:, 1:]  # the log-prob of token k+1 paired with the hidden state of token k
    earlier[:, 1:] = lp[:, :-1]
    out["one position off"] = (torch.where(m, later, 0.0), t)
    out["one position off (other way)"] = (torch.where(m, earlier, 0.0), t)
    for factor in (0.6, 0.8, 1.25):
        out[f"temperature {factor:g} x the sampling one passed"] = (lp, t * factor)
    return out
