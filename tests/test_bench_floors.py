"""The FLOP floors of benchmarks/shapes.py, counted by hand per active group (|V*|, T, T+)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from benchmarks.shapes import batch_work  # noqa: E402
from nthr_kernels.synthetic import make_batch  # noqa: E402


def _by_hand(rb):
    """``(sum_g 2 |V*| d (2T + T+), sum_g 2 |V*| d (T + T+), 2 N |V| d)`` over the active groups."""
    V, d = rb.lm_head_weight.shape
    G = rb.group_size
    every = logits = n = 0
    for g in range(rb.rewards.numel() // G):
        rows = range(g * G, (g + 1) * G)
        pos = [bool(rb.rewards[r] > 0.5) for r in rows]
        lens = [int(rb.mask[r].sum()) for r in rows]
        t, t_pos = sum(lens), sum(n_ for n_, p in zip(lens, pos) if p)
        if not 0 < sum(pos) < G or t_pos == 0:
            continue
        v = len(set(torch.cat([rb.token_ids[r][rb.mask[r]] for r in rows]).tolist()))
        every += 2 * v * d * (2 * t + t_pos)
        logits += 2 * v * d * (t + t_pos)
        n += t
    return every, logits, 2 * n * V * d


def test_floor_with_logits_leaves_out_the_products_the_logits_hold():
    """With logits given, the floor has no full-vocabulary normaliser (2 N |V| d: the lm_head product the logits
    are) and no 2 |V*| d T for the errors on V* (read off the logits); the GPU suite's mid-fp32-logits counted
    both (its floor was 91 % a product nobody computes)."""
    import gpu_suite

    rb = make_batch(5, 4, (0, 30), 16, 120, seed=2)
    every, logits, lse = _by_hand(rb)
    work = batch_work(rb)
    assert work.floor(True) == every and work.floor(False) == every + lse
    assert work.floor(True, logits=True) == logits
    kw = rb.kwargs(with_logprobs=False)
    kw["logits"] = rb.hidden.float() @ kw.pop("lm_head_weight").float().T
    assert gpu_suite.floor_of(work, kw) == (logits, "sum_g 2 |V*| d (T + T+)")
    assert gpu_suite.floor_of(work, rb.kwargs())[0] == every
    assert gpu_suite.floor_of(work, rb.kwargs(with_logprobs=False))[0] == every + lse


def test_each_floor_is_over_the_matmul_rate_of_its_dtype(monkeypatch):
    """The GPU suite divides a floor by the matmul rate of the products the kernels run for the config's work
    dtype: bf16 and fp16 in their own dtype, float32 at the kernels' float32 precision (IEEE: torch's "highest",
    no TF32), each measured once per run. It used the bf16 rate for every config, so the float32 config's
    floor read about 10x low (an H200's dense bf16 rate against its float32 one)."""
    import gpu_suite
    from nthr_kernels.ops import triton_kernels as tk

    seen = []
    monkeypatch.setattr(gpu_suite, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_suite, "bench", lambda fn, rep: seen.append((torch.get_float32_matmul_precision(), fn().dtype)) or 1.0)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # a caller's TF32 setting must not reach the float32 rate
        rates = {}
        fp32 = gpu_suite.floor_rate(torch.float32, rates)
        assert tk.product_precision(torch.float32) == tk.F32_PRECISION.value == "ieee"
        assert seen == [("highest", torch.float32)] and fp32["dtype"] == "float32" and fp32["precision"] == "ieee"
        assert torch.get_float32_matmul_precision() == "high"  # restored
        assert gpu_suite.floor_rate(torch.float32, rates) is fp32 and len(seen) == 1  # measured once per run
        for dt in (torch.bfloat16, torch.float16):
            r = gpu_suite.floor_rate(dt, rates)
            assert seen[-1][1] == dt and r["dtype"] == str(dt)[6:] and r["precision"] is None
        assert sorted(rates) == ["bfloat16", "float16", "float32"]
    finally:
        torch.set_float32_matmul_precision(before)
