"""The torch backend's scratch bound (its module docstring): about 7 * 4 * SCRATCH_ELEMS bytes plus
O(N) per-token vectors; never an [N, V] or [N, N] tensor."""
import pytest
import torch

import nthr_kernels as nk
from nthr_kernels.backends import torch_backend
from nthr_kernels.synthetic import make_batch
from nthr_kernels.testing import peak_rss_rise

PER_TOKEN_BYTES = 256  # index/score vectors, generous
SLACK = 24 << 20  # allocator and interpreter noise


@pytest.fixture
def small_budget():
    old = torch_backend.SCRATCH_ELEMS
    torch_backend.SCRATCH_ELEMS = 1 << 18  # 1 MiB per block tensor
    yield torch_backend.SCRATCH_ELEMS
    torch_backend.SCRATCH_ELEMS = old


@pytest.mark.parametrize("with_logprobs", [True, False])
def test_peak_scratch_within_bound(small_budget, with_logprobs):
    # [N, V] in float32 would be ~N * V * 4 = 3000 * 60000 * 4 = 720 MB; [N, N] 36 MB.
    b = make_batch(6, 4, (100, 150), 64, 60000, seed=0)
    n = b.n_tokens
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-thread pools would blur the measurement
    try:
        fn = lambda: nk.nthr_advantages(b.hidden, b.token_ids, b.rewards, b.advantages, backend="torch", **b.kwargs(with_logprobs=with_logprobs))  # noqa: E731
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
    from nthr_kernels._validate import validate_batch

    batch = validate_batch(
        b.hidden, b.token_ids, b.rewards, b.advantages, lm_head_weight=b.lm_head_weight, logits=None,
        old_logprobs=b.old_logprobs, temperature=1.0, mask=b.mask, cu_seqlens=None, group_size=4, group_ids=None,
        beta=1.0, eta="2|0.5-p|", anchor="all", reward_threshold=0.5, check_finite=True,
    )
    torch_backend.nthr_scores(batch, budget)
    assert seen and max(seen) <= budget
