"""Benchmark of ``nthr_advantages``: every backend and the naive pipeline on the same batch per shape.

    pytest benchmarks --benchmark-only      # timings, checks, peak scratch; the summary table at the end
    pytest benchmarks --benchmark-disable   # CI smoke run: every body once on reduced shapes

Each backend is timed with and without ``old_logprobs`` (without, it computes the full-vocabulary
normaliser), the native backend with them once more with its input checks off (``native-unchecked``);
the naive pipeline (``benchmarks/naive.py``) too, each setting against its own. The float64 reference runs
without ``old_logprobs`` on ``small`` only (on ``medium`` the float64 normaliser takes minutes).
Every output is checked against the float64 reference with old log-probs: the synthetic old
log-probs are exact, so both settings compute the same function.
"""
from __future__ import annotations

import pytest

from benchmarks import runner
from benchmarks.naive import naive_nthr_on
from benchmarks.report import UNCHECKED
from benchmarks.shapes import CPU_SHAPES, batch_work
from nthr_kernels import nthr_advantages
from tests._helpers import assert_matches_reference


def setup(rb):
    """The inputs are the shape's synthetic batch itself."""
    return rb


def _backend(name: str, **options):
    def call(rb, with_logprobs):
        kw = {**rb.kwargs(with_logprobs=with_logprobs), **options}
        return lambda: nthr_advantages(rb.hidden, rb.token_ids, rb.rewards, rb.advantages, backend=name, **kw)

    return call


PROVIDERS = (
    runner.Provider("reference", _backend("reference"), configs=lambda s: (True, False) if s == "small" else (True,)),
    runner.Provider("torch", _backend("torch")),
    runner.Provider("native", _backend("native"), requires=runner.backend_missing("native")),
    # the native backend without the input value checks (every other row runs the defaults): the report
    # states the difference as what the checks cost
    runner.Provider(UNCHECKED[0], _backend("native", check_finite=False, check_logprobs=False), configs=lambda s: (True,),
                    requires=runner.backend_missing("native")),
    runner.Provider("triton", _backend("triton"), device="cuda", requires=runner.backend_missing("triton")),
    # the naive pipeline in both settings: each row's "vs naive" compares the same work
    runner.Provider("naive", lambda rb, lp: lambda: naive_nthr_on(rb, with_logprobs=lp)),
)


def _reference(rb):
    return nthr_advantages(rb.hidden, rb.token_ids, rb.rewards, rb.advantages, backend="reference", **rb.kwargs())


def _flops(rb, with_logprobs):
    native = runner.backend_missing("native")() is None
    work = batch_work(rb, native=native)
    return {"floor": work.floor(with_logprobs), "algorithm": work.algorithm(with_logprobs),
            **({"native_algorithm": work.algorithm(with_logprobs, native=True)} if native else {})}


OP = runner.Op(
    "nthr_advantages", setup, PROVIDERS, _reference,
    check=lambda out, ref, rb: assert_matches_reference(out, ref, rb),
    flops=_flops,
)


@pytest.mark.parametrize("case", runner.cases(OP, CPU_SHAPES))
def test_nthr_advantages(benchmark, bench_session, case):
    runner.measure(benchmark, bench_session, OP, case)
