"""CPU benchmark: the native C++ backend against the torch backend, same inputs, one process.

    pytest benchmarks/test_native.py --benchmark-only        # timings, ratio and peak scratch printed
    pytest benchmarks --benchmark-disable                    # smoke run: 2 groups, each body once

Shape ``medium`` of ``benchmarks/shapes.py`` (16 groups x 8 responses x 64..192 tokens, d = 256,
|V| = 32000, Zipf ids), with and without ``old_logprobs``. ``test_ratio_and_peak_scratch`` times the two
backends interleaved (best of 3 after a warm-up, so a loaded machine hurts both alike) and measures the
peak scratch of one call of each with :func:`nthr_kernels.testing.peak_rss_rise` (the rise of the
process's peak resident set above its resident size when the call starts). That counts every allocation
of every thread (ATen, MKL, std::vector), outputs included, which a profiler hooked to the ATen
allocator would miss. It needs Linux; elsewhere only the timings are reported. On a shared, loaded
machine the best-of-3 of a single thread (``NTHR_BENCH_THREADS=1``) is the steadiest ratio.
``NTHR_BENCH_THREADS=k`` (benchmarks/conftest.py) fixes torch's thread count.
"""
from __future__ import annotations

import time

import pytest
import torch

from benchmarks.shapes import batch_work
from nthr_kernels import nthr_advantages
from nthr_kernels.ops import native_lib
from nthr_kernels.registry import native_available
from nthr_kernels.testing import peak_rss_rise

pytestmark = pytest.mark.skipif(
    not native_available(), reason=f"native C++ ops not built: {native_lib.unavailable_reason() or 'unknown'}"
)

SHAPE = "medium"
LOGPROBS = [True, False]
LP_IDS = ["logprobs", "no-logprobs"]


def _call(rb, backend: str, with_logprobs: bool):
    kw = rb.kwargs(with_logprobs=with_logprobs)
    return lambda: nthr_advantages(rb.hidden, rb.token_ids, rb.rewards, rb.advantages, backend=backend, **kw)


@pytest.mark.parametrize("with_logprobs", LOGPROBS, ids=LP_IDS)
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_nthr_advantages_backend(benchmark, batch_of, record, backend, with_logprobs):
    rb = batch_of(SHAPE)
    benchmark.group = f"nthr_advantages {SHAPE} {'with' if with_logprobs else 'without'} old_logprobs"
    out = benchmark.pedantic(_call(rb, backend, with_logprobs), rounds=3, warmup_rounds=1, iterations=1)
    assert out.token_advantages.shape == rb.token_ids.shape
    record("nthr_advantages", SHAPE, backend + ("+logprobs" if with_logprobs else ""),
           batch_work(rb).floor(with_logprobs))


@pytest.mark.parametrize("with_logprobs", LOGPROBS, ids=LP_IDS)
def test_ratio_and_peak_scratch(smoke, batch_of, capsys, with_logprobs):
    rb = batch_of(SHAPE)
    fns = {be: _call(rb, be, with_logprobs) for be in ("torch", "native")}
    results = {be: f() for be, f in fns.items()}  # warm-up, and the outputs to compare
    t, n = results["torch"], results["native"]
    assert torch.equal(t.active, n.active)
    scale = float(t.scores.abs().max()) if t.scores.numel() else 1.0
    assert float((t.scores - n.scores).abs().max()) <= 1e-5 * max(scale, 1e-30)
    times = {be: [] for be in fns}
    for _ in range(1 if smoke else 3):
        for be, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[be].append(time.perf_counter() - t0)
    peaks = {be: peak_rss_rise(f) for be, f in fns.items()}
    best = {be: min(v) for be, v in times.items()}
    ratio = best["torch"] / best["native"]
    mib = {be: (f"{p / 2**20:.1f} MiB" if p is not None else "n/a") for be, p in peaks.items()}
    with capsys.disabled():
        print(
            f"\n[native vs torch] {SHAPE}{' (smoke)' if smoke else ''}, "
            f"{'with' if with_logprobs else 'without'} old_logprobs, {torch.get_num_threads()} threads: "
            f"torch {1e3 * best['torch']:.1f} ms, native {1e3 * best['native']:.1f} ms, "
            f"ratio torch/native = {ratio:.2f}; peak scratch torch {mib['torch']}, native {mib['native']}"
        )
    if not smoke and None not in peaks.values():
        assert peaks["native"] <= peaks["torch"], peaks
