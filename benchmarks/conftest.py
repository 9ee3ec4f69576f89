"""pytest wiring of the benchmark suites: thread count, shape selection, the shared runner session, the
machine information stored with the JSON, and the summary printed at the end.

``NTHR_BENCH_THREADS=k`` sets torch's CPU thread count for the whole run (every suite, the GRPO step
included). ``--shapes=medium`` (comma-separated) keeps only the cases of those shapes. Under
``--benchmark-disable`` (the CI smoke run) every body runs once on shapes reduced to
``runner.SMOKE_GROUPS`` groups and no summary is printed. With ``--benchmark-json=FILE`` the bar
chart of time vs floor is written beside it (``FILE`` with the suffix ``.png``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*`, `tests.*` importable

from benchmarks import report, runner  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402

_LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def pytest_addoption(parser):
    parser.addoption("--shapes", default=None, help="comma-separated benchmark shapes to keep (default: all)")


def pytest_configure(config):
    threads = os.environ.get("NTHR_BENCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config, items):
    # the second matrix-rate pass (test_matmul.PASSES) runs after everything else
    last = [it for it in items if getattr(getattr(it, "callspec", None), "params", {}).get("when") == "last"]
    items[:] = [it for it in items if it not in last] + last
    keep = config.getoption("shapes")
    if not keep:
        return
    keep = set(keep.split(","))
    unknown = keep - set(SHAPES)
    if unknown:
        raise pytest.UsageError(f"--shapes: unknown shape(s) {sorted(unknown)}; known: {sorted(SHAPES)}")
    drop = [it for it in items if isinstance(getattr(getattr(it, "callspec", None), "params", {}).get("case"), runner.Case)
            and it.callspec.params["case"].shape not in keep]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [it for it in items if it not in drop]


def _disabled(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


@pytest.fixture(scope="session")
def bench_session(pytestconfig) -> runner.Session:
    return runner.Session(smoke=_disabled(pytestconfig), shapes=SHAPES)


@pytest.fixture
def record(benchmark):
    """``record(op, shape, backend, floor_flops, algorithm_flops)`` for suites that time on their own
    (test_gpu.py): the row joins the summary, on CUDA, with old log-probs."""

    def add(op: str, shape: str, backend: str, flops: int, algorithm_flops: int) -> None:
        import torch

        benchmark.extra_info.update(op=op, shape=shape, shape_text=shape, backend=backend, device="cuda",
                                    logprobs=True, rounds=len(benchmark.stats.stats.data) if benchmark.stats else 1,
                                    warmup=1, threads=torch.get_num_threads(), peak_scratch_bytes=None,
                                    floor_flops=flops, algorithm_flops=algorithm_flops)

    return add


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["nthr"] = report.machine_info(_LOAD_AT_START)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables: the run ends with this summary
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if _disabled(config) or bs is None or not bs.benchmarks:
        return
    records = [b.as_dict(include_data=False) for b in bs.benchmarks if not b.has_error]
    records = [r for r in records if "op" in r["extra_info"]]
    if records:
        terminalreporter.section("nthr-kernels benchmark summary")
        for line in report.summary(records, report.machine_info(_LOAD_AT_START)).splitlines():
            terminalreporter.write_line(line)
        if bs.json:  # the chart beside pytest-benchmark's JSON
            png = report.json_path(bs.json).with_suffix(".png")
            report.chart(records, png)
            terminalreporter.write_line(f"Chart of time vs floor: {png}")
