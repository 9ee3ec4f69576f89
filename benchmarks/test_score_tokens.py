"""Benchmark of ``score_tokens`` on one group: every backend and the naive one-shot product per shape.

The inputs are the mixed group of the shape's batch with the most tokens, every token scored, its
prediction errors on ``V*`` from ``prediction_errors``. The floor is the cheaper of the factored and
the pairwise FLOP counts (``nthr_kernels.core.rules``), which is what the backends choose between.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import runner
from benchmarks.naive import naive_score_tokens
from benchmarks.shapes import CPU_SHAPES
from nthr_kernels import prediction_errors, score_tokens
from nthr_kernels.core.rules import SCORE_TOLERANCE, factored_cost, pairwise_cost


def setup(rb):
    """``(h_pos, h_all, err_pos, err_all)`` of the largest mixed group of the shape's batch."""
    g_size, best = rb.group_size, None
    for g in range(rb.rewards.numel() // g_size):
        rs = slice(g * g_size, (g + 1) * g_size)
        pos, m = rb.rewards[rs] > 0.5, rb.mask[rs]
        if 0 < int(pos.sum()) < g_size and bool(m[pos].any()) and (best is None or int(m.sum()) > best[0]):
            best = (int(m.sum()), rs, pos)
    assert best is not None, "no mixed group in the batch"
    _, rs, pos = best
    m = rb.mask[rs]
    tok_pos = pos[:, None].expand_as(m)[m]
    h, ids, lp = rb.hidden[rs][m], rb.token_ids[rs][m], rb.old_logprobs[rs][m]
    err, _ = prediction_errors(ids, hidden=h, lm_head_weight=rb.lm_head_weight, old_logprobs=lp,
                               temperature=rb.temperature)
    return h[tok_pos], h, err[tok_pos], err


def _backend(name: str):
    return lambda args, _: lambda: score_tokens(*args, backend=name)


ONE_SETTING = lambda shape: (None,)  # noqa: E731  (score_tokens takes no old log-probs)
PROVIDERS = (
    runner.Provider("reference", _backend("reference"), configs=ONE_SETTING),
    runner.Provider("torch", _backend("torch"), configs=ONE_SETTING),
    runner.Provider("native", _backend("native"), configs=ONE_SETTING, requires=runner.backend_missing("native")),
    runner.Provider("triton", _backend("triton"), device="cuda", configs=ONE_SETTING, requires=runner.backend_missing("triton")),
    runner.Provider("naive", lambda args, _: lambda: naive_score_tokens(*args), configs=ONE_SETTING),
)


def _check(out, ref, args):
    assert out.shape == (args[1].shape[0],) and out.dtype == torch.float32
    scale = max(float(ref.abs().max()), 1e-30)
    err = float((out.double() - ref.double()).abs().max())
    assert err <= SCORE_TOLERANCE[torch.float32] * scale, f"score error {err:.3e} vs scale {scale:.3e}"


def _flops(args, _):
    (t_pos, d), (t_all, v) = args[0].shape, args[3].shape
    cheaper = min(factored_cost(t_pos, t_all, v, d), pairwise_cost(t_pos, t_all, v, d))
    return {"floor": cheaper, "algorithm": cheaper}


OP = runner.Op("score_tokens", setup, PROVIDERS, lambda args: score_tokens(*args, backend="reference"), _check, _flops)


@pytest.mark.parametrize("case", runner.cases(OP, CPU_SHAPES))
def test_score_tokens(benchmark, bench_session, case):
    runner.measure(benchmark, bench_session, OP, case)
