"""Statistics of the LLD study: per-method summaries with bootstrap intervals, paired differences.

Every question is one draw; a method's Delta(x) on it is paired with GRPO's on the same question (same
model, same group, same responses), so differences are taken question by question before resampling.
The bootstrap is the plain percentile bootstrap over questions with a fixed seed: the same deltas
always give the same intervals.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "CI_LEVEL", "summarize", "paired", "resample_indices", "excludes_zero"]

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 20251126
CI_LEVEL = 0.95


def resample_indices(n: int) -> np.ndarray:
    """``[BOOTSTRAP_RESAMPLES, n]`` question indices drawn with replacement (deterministic)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return np.random.default_rng(BOOTSTRAP_SEED).integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))


def _ci(samples: np.ndarray) -> list[float]:
    lo, hi = np.quantile(samples, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
    return [float(lo), float(hi)]


def _deltas(deltas) -> np.ndarray:
    d = np.asarray([float(x) for x in deltas], dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or not np.isfinite(d).all():
        raise ValueError("deltas must be a non-empty sequence of finite numbers")
    return d


def summarize(deltas) -> dict:
    """Mean and median Delta and the LLD fraction (share of questions with Delta <= 0), each with its
    bootstrap interval in ``ci95``; ``deltas`` as given."""
    d = _deltas(deltas)
    idx = resample_indices(d.size)
    boot = d[idx]
    lld = d <= 0
    return {"mean_delta": float(d.mean()), "median_delta": float(np.median(d)), "lld_fraction": float(lld.mean()),
            "ci95": {"mean_delta": _ci(boot.mean(1)), "median_delta": _ci(np.median(boot, axis=1)),
                     "lld_fraction": _ci(lld[idx].mean(1))},
            "deltas": d.tolist()}


def paired(deltas, baseline) -> dict:
    """``deltas`` against ``baseline`` question by question.

    ``mean_diff``: mean of ``deltas - baseline`` with its interval ``ci95``; ``win_rate`` / ``tie_rate``:
    share of questions where ``deltas`` is larger / equal; ``lld_diff``: change of the LLD fraction
    (``deltas`` minus ``baseline``) with its paired interval ``lld_ci95``.
    """
    d, b = _deltas(deltas), _deltas(baseline)
    if d.size != b.size:
        raise ValueError(f"deltas and baseline must pair up, got {d.size} and {b.size} questions")
    diff = d - b
    lld_diff = (d <= 0).astype(np.float64) - (b <= 0).astype(np.float64)
    idx = resample_indices(d.size)
    return {"mean_diff": float(diff.mean()), "ci95": _ci(diff[idx].mean(1)),
            "win_rate": float((diff > 0).mean()), "tie_rate": float((diff == 0).mean()),
            "lld_diff": float(lld_diff.mean()), "lld_ci95": _ci(lld_diff[idx].mean(1))}


def excludes_zero(ci) -> bool:
    lo, hi = ci
    return (lo > 0 or hi < 0) and not (math.isnan(lo) or math.isnan(hi))
