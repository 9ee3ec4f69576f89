"""pytest-benchmark entry for CUDA: triton vs torch vs the naive pipeline on one GPU.

    pytest benchmarks/test_gpu.py --benchmark-only

Skipped without a CUDA device. Uses the `qwen1.5b-step` shape with a quarter of its groups (16 x 8
responses, 256..1792 tokens, d = 1536, |V| = 151936, bf16, old log-probs given) so one session stays
within a few minutes; the full shape and its selection-agreement figures are in `benchmarks/gpu_suite.py`.
Each row's timed output (the last round's) is checked against the float64 reference computed on the GPU
once per session (``assert_matches_reference``, as the CPU rows are).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import nthr_kernels as nk
from benchmarks.naive import naive_nthr
from benchmarks.shapes import SHAPES, batch_work
from tests._helpers import assert_matches_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPE = dataclasses.replace(SHAPES["qwen1.5b-step"], name="qwen1.5b-quarter", n_groups=16)


@pytest.fixture(scope="module")
def rb():
    return SHAPE.batch(device="cuda")


@pytest.fixture(scope="module")
def ref(rb):
    """The float64 reference on the same batch (on the GPU), the check of every row's timed output."""
    out = nk.nthr_advantages(rb.hidden, rb.token_ids, rb.rewards, rb.advantages, backend="reference", **rb.kwargs())
    torch.cuda.synchronize()
    return out


def _sync_call(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("backend", ["triton", "torch", "naive"])
def test_nthr_advantages_cuda(benchmark, rb, ref, record, backend):
    kw = rb.kwargs()
    if backend == "naive":
        fn = lambda: naive_nthr(rb.hidden, rb.token_ids, rb.rewards, rb.advantages, lm_head_weight=rb.lm_head_weight,  # noqa: E731
                                group_size=rb.group_size, mask=rb.mask, old_logprobs=rb.old_logprobs,
                                temperature=rb.temperature)
    else:
        fn = lambda: nk.nthr_advantages(rb.hidden, rb.token_ids, rb.rewards, rb.advantages, backend=backend, **kw)  # noqa: E731
    benchmark.group = f"nthr_advantages {SHAPE.name} cuda"
    rounds = 10 if backend == "triton" else 2
    out = benchmark.pedantic(_sync_call(fn), rounds=rounds, warmup_rounds=1, iterations=1)
    assert out.token_advantages.shape == rb.token_ids.shape
    assert_matches_reference(out, ref, rb)
    work = batch_work(rb)
    record("nthr_advantages", SHAPE.name, backend if backend != "torch" else "torch-cuda", work.floor(True),
           work.algorithm(True))
