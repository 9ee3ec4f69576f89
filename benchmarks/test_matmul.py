"""The matrix unit's rate, measured in the same run as the ops: float32 sgemm on CPU, bf16 on CUDA.

The summary divides every FLOP floor by the best rate measured here (over the sizes, engines and the two
passes below), so "x floor" says how far a call is from what this machine's matrix unit can do under the
same settings (threads, load). Engines and sizes: ``benchmarks/runner.py`` (``matmul_engines``,
``MATMUL_SIZES``; the paired rounds of the ops time the same products): on a CPU where one beats torch's
BLAS (MKL takes its AVX2 path on AMD CPUs with AVX-512) the floor is that faster rate, so no backend looks
closer to the limit than the machine allows. oneDNN compiles a kernel per new
shape, which the warm-up rounds absorb here; no backend multiplies with it (a training step brings new shapes
every time), it only measures what the machine can do. Smoke runs use a tiny size.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import runner

SIZES = runner.MATMUL_SIZES
SMOKE_SIZE = 64
ROUNDS = (10, 2)  # (measured, warm-up)
ENGINES = runner.matmul_engines()


# Each size and engine is timed twice, once before the ops and once after them (benchmarks/conftest.py moves
# the "last" pass to the end of the session): the floor takes the best of both, so a slow spell of a shared
# machine during one pass does not lengthen every floor of the run.
PASSES = ("first", "last")


@pytest.mark.parametrize("when", PASSES)
@pytest.mark.parametrize("n", SIZES, ids=[f"n{n}" for n in SIZES])
@pytest.mark.parametrize("device,engine", ENGINES, ids=[f"{d}-{e}" for d, e in ENGINES])
def test_matmul(benchmark, bench_session, device, engine, n, when):
    n = SMOKE_SIZE if bench_session.smoke else n
    a, b = runner.matmul_operands(device, n)
    mm = runner.engine_mm(engine, b)
    rounds, warmup = ROUNDS
    out = benchmark.pedantic(runner.synced(lambda: mm(a), device), rounds=rounds, warmup_rounds=warmup, iterations=1)
    want = a.double() @ b.double()
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    benchmark.group = "matmul"
    benchmark.extra_info.update(op="matmul", device=device, engine=engine, when=when, dtype=str(a.dtype).replace("torch.", ""), n=n,
                                flops=runner.matmul_flops(n), threads=torch.get_num_threads())
