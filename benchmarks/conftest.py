"""Shared fixtures of the benchmark suites: cached batches and an end-of-session timing table.

Under ``--benchmark-disable`` (the CI smoke run) every benchmark body runs once, and the shapes are
reduced to a few groups (``SMOKE_GROUPS``) so the whole suite takes seconds; the timing table is only
printed when benchmarks are enabled. ``NTHR_BENCH_THREADS=k`` sets torch's CPU thread count (on a
shared, loaded machine one thread gives steadier ratios than several).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` importable from anywhere

from benchmarks.shapes import SHAPES, Shape  # noqa: E402
from nthr_kernels.demo_synthetic import machine_description  # noqa: E402

SMOKE_GROUPS = 2
_ROWS: list[dict] = []  # filled by the `record` fixture, printed by pytest_terminal_summary


def pytest_configure(config):
    threads = os.environ.get("NTHR_BENCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _disabled(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


@pytest.fixture(scope="session")
def smoke(pytestconfig) -> bool:
    return _disabled(pytestconfig)


@pytest.fixture(scope="session")
def shape_of(smoke):
    """``shape_of(name)``: the named shape, reduced to ``SMOKE_GROUPS`` groups in smoke runs."""

    def get(name: str) -> Shape:
        s = SHAPES[name]
        return dataclasses.replace(s, n_groups=min(s.n_groups, SMOKE_GROUPS)) if smoke else s

    return get


@pytest.fixture(scope="session")
def batch_of(shape_of):
    """``batch_of(name)``: the synthetic batch of a shape, built once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = shape_of(name).batch()
        return cache[name]

    return get


@pytest.fixture
def record(benchmark):
    """``record(suite, shape, impl, flops)`` after the benchmark ran: keeps its median for the table."""

    def add(suite: str, shape: str, impl: str, flops: int) -> None:
        if benchmark.enabled and benchmark.stats is not None:
            _ROWS.append(dict(suite=suite, shape=shape, impl=impl, flops=flops, median=benchmark.stats.stats.median))

    return add


# ratios printed per shape: (suite, label, numerator impl, denominator impl, target text)
RATIOS = (
    ("nthr_advantages", "naive / torch with old_logprobs (speed-up)", "naive", "torch+logprobs", ">= 3 at medium"),
    ("nthr_advantages", "torch without old_logprobs / naive (slow-down)", "torch", "naive", "<= 1.25 at medium"),
    ("score_tokens", "naive / torch (speed-up)", "naive", "torch", None),
)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _disabled(config) or not _ROWS:
        return
    tr = terminalreporter
    tr.section("nthr-kernels CPU benchmarks (median per call)")
    tr.write_line(machine_description())
    tr.write_line(f"{'suite':16s} {'shape':8s} {'impl':22s} {'median ms':>11s} {'floor GFLOP':>12s} {'GFLOP/s':>9s}")
    for r in _ROWS:
        gf = r["flops"] / 1e9
        tr.write_line(
            f"{r['suite']:16s} {r['shape']:8s} {r['impl']:22s} {1e3 * r['median']:11.2f} {gf:12.3f} {gf / r['median']:9.2f}"
        )
    med = {(r["suite"], r["shape"], r["impl"]): r["median"] for r in _ROWS}
    for shape in dict.fromkeys(r["shape"] for r in _ROWS):
        for suite, label, num, den, target in RATIOS:
            a, b = med.get((suite, shape, num)), med.get((suite, shape, den))
            if a is not None and b is not None:
                aim = f"  (target {target})" if target else ""
                tr.write_line(f"ratio {shape:8s} {suite}: {label} = {a / b:.2f}{aim}")
