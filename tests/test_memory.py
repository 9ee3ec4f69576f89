"""The torch implementation's scratch bound (its module docstring, nthr_kernels/ops/advantages/torch_impl.py):
at most 10 * 4 * E bytes plus 512 bytes per completion token; never an [N, V] or [N, N] tensor."""
import pytest
import torch

from nthr_kernels.core.rules import TOKEN_BYTES
from nthr_kernels.ops.advantages import torch_impl
from nthr_kernels.synthetic import make_batch
from nthr_kernels.testing import peak_rss_rise

from _helpers import run_impl, validated

SCRATCH_SLOTS = 10  # the documented bound: SCRATCH_SLOTS * 4 * E bytes ...
PER_TOKEN_BYTES = TOKEN_BYTES  # ... plus this per completion token (nthr_kernels/core/rules.py)
SLACK = 4 << 20  # allocator and interpreter noise


def _peak(b, budget, with_logprobs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-thread pools would blur the measurement
    try:
        fn = lambda: run_impl(b, "torch", budget, with_logprobs=with_logprobs)  # noqa: E731
        fn()
        return peak_rss_rise(fn)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("budget", [1 << 18, 1 << 20], ids=lambda e: f"E{e}")
@pytest.mark.parametrize("with_logprobs", [True, False], ids=["logprobs", "no-logprobs"])
def test_peak_scratch_within_stated_formula(budget, with_logprobs):
    """Two batch sizes (5x the tokens): each peak within the formula, and the growth per token too."""
    # [N, V] in float32 would be N * 30000 * 4 bytes (360 MB at the small size); [N, N] 36 MB.
    peaks = {}
    for n_groups in (6, 30):
        b = make_batch(n_groups, 4, (100, 150), 64, 30000, seed=0)
        rise = _peak(b, budget, with_logprobs)
        if rise is None:
            pytest.skip("peak RSS is not measurable on this platform")
        bound = SCRATCH_SLOTS * 4 * budget + PER_TOKEN_BYTES * b.n_tokens + SLACK
        assert rise <= bound, f"{b.n_tokens} tokens: peak rise {rise / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
        assert rise < b.n_tokens * 30000 * 4 / 8
        peaks[b.n_tokens] = rise
    (n0, p0), (n1, p1) = sorted(peaks.items())
    assert p1 - p0 <= SCRATCH_SLOTS * 4 * budget + PER_TOKEN_BYTES * (n1 - n0) + SLACK


def test_blocks_respect_budget(monkeypatch):
    """Every block tensor the factored pass forms stays within the budget's elements."""
    b = make_batch(5, 4, (1, 40), 24, 3000, seed=2)
    budget = 1 << 12
    seen = {}

    def spy(name, real):
        def f(*args, **kw):
            out = real(*args, **kw)
            seen.setdefault(name, []).append(max(x.numel() for x in (*args[:3], out) if isinstance(x, torch.Tensor)))
            return out
        return f

    batch = validated(b)  # validation has its own block budget (the old_logprobs check)
    for name in ("mm", "addmm"):
        monkeypatch.setattr(torch, name, spy(name, getattr(torch, name)))
    torch_impl.nthr_scores(batch, budget)
    assert set(seen) == {"mm", "addmm"}
    assert max(max(v) for v in seen.values()) <= budget


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_failure_path_norms_stay_within_the_scan_block(monkeypatch, backend):
    """An input refused for its scale builds its message from exact (float64) row norms of ``hidden``. Taken
    at once they convert the whole tensor to float64 first (``torch.linalg.vector_norm`` with a wider dtype:
    2x a float32 hidden, gigabytes at a real batch, an out-of-memory error in place of the ValueError); they
    are taken over blocks of ``SCAN_ELEMS`` elements. Every conversion is counted where it happens (the
    resident-memory rise of this call varies by tens of MiB on this machine, whose kernel reclaims cold
    pages): before, one converted all 8.4M elements of ``hidden``."""
    import nthr_kernels.core.checks as checks
    from nthr_kernels import nthr_advantages
    from nthr_kernels.registry import available_backends

    if backend not in available_backends():
        pytest.skip(f"backend {backend!r} not available")
    block = 1 << 18
    monkeypatch.setattr(checks, "SCAN_ELEMS", block)
    converted = []
    norm = torch.linalg.vector_norm

    def counting_norm(x, *args, dtype=None, **kw):
        if dtype is not None and dtype != x.dtype:
            converted.append(x.numel())
        return norm(x, *args, dtype=dtype, **kw)

    monkeypatch.setattr(torch.linalg, "vector_norm", counting_norm)
    g = torch.Generator().manual_seed(5)
    r, length, d, v = 64, 512, 256, 1000
    hidden = torch.randn(r, length, d, generator=g)
    hidden[3, 5] = 1e20  # finite in float32; logits beyond the float32 maths' range
    ids = torch.randint(0, v, (r, length), generator=g)
    rewards = (torch.arange(r) % 2).float()
    with pytest.raises(ValueError, match="scales the logits"):
        nthr_advantages(hidden, ids, rewards, rewards - 0.5, lm_head_weight=torch.randn(v, d, generator=g) * 0.02,
                        old_logprobs=torch.full((r, length), -3.0), mask=torch.ones(r, length, dtype=torch.bool),
                        group_size=8, backend=backend)
    assert converted and max(converted) <= block, f"vector_norm converted {max(converted)} elements at once"
