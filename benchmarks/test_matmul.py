"""The matrix unit's rate, measured in the same run as the ops: float32 sgemm on CPU, bf16 on CUDA.

The summary divides every FLOP floor by the best rate measured here (over the sizes below), so "x
floor" says how far a call is from what this machine's matrix unit can do under the same settings
(threads, load). Smoke runs use a tiny size.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import runner

SIZES = (512, 1024, 2048)
SMOKE_SIZE = 64
ROUNDS = (10, 2)  # (measured, warm-up)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("n", SIZES, ids=[f"n{n}" for n in SIZES])
@pytest.mark.parametrize("device", DEVICES)
def test_matmul(benchmark, bench_session, device, n):
    n = SMOKE_SIZE if bench_session.smoke else n
    a, b = runner.matmul_operands(device, n)
    rounds, warmup = ROUNDS
    out = benchmark.pedantic(runner.synced(lambda: a @ b, device), rounds=rounds, warmup_rounds=warmup, iterations=1)
    want = a.double() @ b.double()
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    benchmark.group = "matmul"
    benchmark.extra_info.update(op="matmul", device=device, dtype=str(a.dtype).replace("torch.", ""), n=n,
                                flops=runner.matmul_flops(n), threads=torch.get_num_threads())
