"""Utilities for tests and benchmarks (not used by the library itself)."""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Callable, Optional

# Target of issue 12: host synchronisations per public call on a GPU (one reads the checks, one sizes the plan).
HOST_SYNCS_PER_CALL = 2
# torch functions (besides torch.Tensor methods) whose result size or value needs the device's data.
TORCH_SYNC_FUNCTIONS = ("nonzero", "unique", "unique_consecutive", "bincount", "masked_select", "histc",
                        "repeat_interleave")


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


def count_host_syncs(fn, cuda: Optional[bool] = None) -> tuple:
    """``(count, events)``: host synchronisations of one ``fn()``.

    On a GPU the count comes from ``torch.cuda.set_sync_debug_mode`` (every synchronising CUDA call,
    device-to-host copies and blocking host-to-device copies included). On the CPU it counts the Python
    calls that would synchronise there (``tolist``, ``item``, ``bool``/``int``/``float`` of a tensor,
    ``nonzero``, ``unique``, ``bincount``, bool-mask indexing, ``repeat_interleave`` without
    ``output_size``, ...), patched on ``torch`` and ``torch.Tensor`` for the call (so they are seen inside
    the custom op's Python implementation as well). Blocking host-to-device copies are not seen on the
    CPU: the GPU count includes them. ``cuda`` (default: whether CUDA is available) picks the method.
    """
    import traceback
    import warnings

    import torch

    events = []
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        events = [str(w.message).splitlines()[0][:120] for w in caught if "synchroniz" in str(w.message)]
        return len(events), events

    def _caller() -> str:
        here = [f for f in traceback.extract_stack()[:-2] if "nthr_kernels" in f.filename]
        return f"{Path(here[-1].filename).name}:{here[-1].lineno}" if here else "?"

    def is_mask(i) -> bool:
        idx = i if isinstance(i, tuple) else (i,)
        return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in idx)

    # Python-level entry points (the custom op's implementation is Python, so these see inside it too)
    when = {
        "tolist": None, "numpy": None, "cpu": None, "item": None, "__bool__": None, "__int__": None,
        "__float__": None, "__index__": None, "nonzero": None, "unique": None, "unique_consecutive": None,
        "bincount": None, "masked_select": None, "histc": None,
        "repeat_interleave": lambda a, k: k.get("output_size") is None,
        "__getitem__": lambda a, k: is_mask(a[1]) if len(a) > 1 else False,
        "__setitem__": lambda a, k: is_mask(a[1]) if len(a) > 1 else False,
    }
    patched = []  # (owner, name, the attribute it had in its own __dict__, or None: inherited)

    def wrap(name, orig, cond):
        def call(*a, **k):
            if cond is None or cond(a, k):
                events.append(f"{name} at {_caller()}")
            return orig(*a, **k)
        return call

    targets = [(torch.Tensor, name) for name in when] + [(torch, name) for name in TORCH_SYNC_FUNCTIONS]
    try:
        for owner, name in targets:
            orig = getattr(owner, name, None)
            if orig is None:
                continue
            patched.append((owner, name, vars(owner).get(name)))
            setattr(owner, name, wrap(name, orig, when[name]))
        fn()
    finally:
        for owner, name, own in reversed(patched):
            if own is None:
                delattr(owner, name)  # inherited: the base class's attribute shows through again
            else:
                setattr(owner, name, own)
    return len(events), events
