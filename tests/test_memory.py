"""The torch backend's scratch bound (its module docstring): about 7 * 4 * SCRATCH_ELEMS bytes plus
O(N) per-token vectors; never an [N, V] or [N, N] tensor."""
import pytest
import torch

from nthr_kernels.ops.advantages import torch_impl
from nthr_kernels.synthetic import make_batch
from nthr_kernels.testing import peak_rss_rise

from _helpers import run_impl, validated

PER_TOKEN_BYTES = 256  # index/score vectors, generous
SLACK = 24 << 20  # allocator and interpreter noise


@pytest.mark.parametrize("with_logprobs", [True, False])
def test_peak_scratch_within_bound(with_logprobs):
    small_budget = 1 << 18  # 1 MiB per block tensor
    # [N, V] in float32 would be ~N * V * 4 = 3000 * 60000 * 4 = 720 MB; [N, N] 36 MB.
    b = make_batch(6, 4, (100, 150), 64, 60000, seed=0)
    n = b.n_tokens
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-thread pools would blur the measurement
    try:
        fn = lambda: run_impl(b, "torch", small_budget, with_logprobs=with_logprobs)  # noqa: E731
        fn()
        rise = peak_rss_rise(fn)
    finally:
        torch.set_num_threads(threads)
    if rise is None:
        pytest.skip("peak RSS is not measurable on this platform")
    bound = 7 * 4 * small_budget + PER_TOKEN_BYTES * n + SLACK
    assert rise <= bound, f"peak rise {rise / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    assert rise < n * 60000 * 4 / 8


def test_blocks_respect_budget(monkeypatch):
    """Every block tensor the factored pass forms stays within SCRATCH_ELEMS elements."""
    b = make_batch(5, 4, (1, 40), 24, 3000, seed=2)
    budget = 1 << 12
    seen = []
    real_bmm = torch.bmm

    def spy(a, c, *args, **kw):
        out = real_bmm(a, c, *args, **kw)
        seen.append(max(a.numel(), c.numel(), out.numel()))
        return out

    monkeypatch.setattr(torch, "bmm", spy)
    torch_impl.nthr_scores(validated(b), budget)
    assert seen and max(seen) <= budget
