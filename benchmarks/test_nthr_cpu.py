"""CPU benchmarks: ``score_tokens`` and ``nthr_advantages`` against the naive per-group pipeline.

    pytest benchmarks --benchmark-only      # timings, FLOP floors, GFLOP/s and the ratios at the end
    pytest benchmarks --benchmark-disable   # CI smoke run: every body once, reduced shapes, seconds

Every implementation of a shape sees the same batch (``benchmarks/shapes.py``). The reference backend
runs on ``small`` only. The naive pipeline ignores ``old_logprobs`` (it always computes the full
normaliser), so it is timed once and compared with the torch backend with and without them.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.naive import naive_nthr_on, naive_score_tokens
from benchmarks.shapes import CPU_SHAPES, batch_work
from nthr_kernels import nthr_advantages, prediction_errors, score_tokens
from nthr_kernels.core.rules import factored_cost, pairwise_cost

ROUNDS = {"small": (7, 1), "medium": (3, 1)}  # (measured rounds, warm-up rounds) per shape

ADV_IMPLS = [
    ("reference+logprobs", "small"),
    ("reference", "small"),
    *[(impl, shape) for shape in CPU_SHAPES for impl in ("torch+logprobs", "torch", "naive")],
]
SCORE_IMPLS = [("reference", "small"), *[(impl, shape) for shape in CPU_SHAPES for impl in ("torch", "naive")]]


def _run(benchmark, shape: str, fn):
    rounds, warmup = ROUNDS[shape]
    return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)


@pytest.mark.parametrize("impl,shape", ADV_IMPLS, ids=[f"{s}-{i}" for i, s in ADV_IMPLS])
def test_nthr_advantages(benchmark, record, batch_of, impl, shape):
    rb = batch_of(shape)
    with_lp = impl != "naive" and impl.endswith("+logprobs")
    if impl == "naive":
        fn = lambda: naive_nthr_on(rb)  # noqa: E731
    else:
        backend = impl.split("+")[0]
        kw = rb.kwargs(with_logprobs=with_lp)
        fn = lambda: nthr_advantages(rb.hidden, rb.token_ids, rb.rewards, rb.advantages, backend=backend, **kw)  # noqa: E731
    out = _run(benchmark, shape, fn)
    assert out.token_advantages.shape == rb.token_ids.shape
    record("nthr_advantages", shape, impl, batch_work(rb).floor(with_lp))


def _score_inputs(rb):
    """One group's ``score_tokens`` inputs: the mixed group with the most tokens, every token scored."""
    best = None
    g_size = rb.group_size
    for g in range(rb.rewards.numel() // g_size):
        rs = slice(g * g_size, (g + 1) * g_size)
        pos = rb.rewards[rs] > 0.5
        m = rb.mask[rs]
        if 0 < int(pos.sum()) < g_size and bool(m[pos].any()):
            n = int(m.sum())
            if best is None or n > best[0]:
                best = (n, rs, pos)
    assert best is not None, "no mixed group in the batch"
    _, rs, pos = best
    m = rb.mask[rs]
    tok_pos = pos[:, None].expand_as(m)[m]
    h, ids, lp = rb.hidden[rs][m], rb.token_ids[rs][m], rb.old_logprobs[rs][m]
    err, _ = prediction_errors(ids, hidden=h, lm_head_weight=rb.lm_head_weight, old_logprobs=lp,
                               temperature=rb.temperature)
    return h[tok_pos], h, err[tok_pos], err


@pytest.mark.parametrize("impl,shape", SCORE_IMPLS, ids=[f"{s}-{i}" for i, s in SCORE_IMPLS])
def test_score_tokens(benchmark, record, batch_of, impl, shape):
    args = _score_inputs(batch_of(shape))
    if impl == "naive":
        fn = lambda: naive_score_tokens(*args)  # noqa: E731
    else:
        fn = lambda: score_tokens(*args, backend=impl)  # noqa: E731
    out = _run(benchmark, shape, fn)
    assert out.shape == (args[1].shape[0],) and out.dtype == torch.float32
    (tp, d), (tn, v) = args[0].shape, args[3].shape
    record("score_tokens", shape, impl, min(factored_cost(tp, tn, v, d), pairwise_cost(tp, tn, v, d)))
