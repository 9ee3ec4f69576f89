"""The benchmark baseline (``benchmarks/naive.py``) computes the same function as the library."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _helpers import assert_matches_reference  # noqa: E402
from benchmarks.naive import naive_nthr_on, naive_score_tokens  # noqa: E402
from nthr_kernels import nthr_advantages, prediction_errors, score_tokens  # noqa: E402
from nthr_kernels.synthetic import make_batch  # noqa: E402


def _compare(rb, *, with_logprobs=True, score_positive=True, **kw):
    ref = nthr_advantages(
        rb.hidden, rb.token_ids, rb.rewards, rb.advantages, backend="reference", score_positive=score_positive,
        **rb.kwargs(with_logprobs=with_logprobs), **kw,
    )
    nv = naive_nthr_on(rb, with_logprobs=with_logprobs, score_positive=score_positive, **kw)
    # the benchmark's check (benchmarks/test_nthr_advantages.py): the fields of the library's result
    assert_matches_reference(nv, ref, rb)
    scale = float(ref.scores.abs().max()) or 1.0
    assert torch.allclose(nv.scores, ref.scores, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(nv.tau, ref.tau, rtol=1e-4, atol=1e-5 * scale, equal_nan=True)
    torch.testing.assert_close(nv.eta, ref.eta)
    # selection and advantages agree except on tokens within float32 noise of tau
    tau_tok = torch.nan_to_num(ref.tau, nan=math.inf).repeat_interleave(rb.group_size)[:, None]
    near = (ref.scores - tau_tok).abs() <= 1e-4 * scale
    assert torch.equal(nv.selected & ~near, ref.selected & ~near)
    assert torch.allclose(nv.token_advantages[~near], ref.token_advantages[~near], atol=1e-6)
    assert not nv.token_advantages[~rb.mask].any()
    return ref


@pytest.mark.parametrize("score_positive", [True, False], ids=["score-positive", "negative-only"])
@pytest.mark.parametrize("with_logprobs", [True, False], ids=["logprobs", "no-logprobs"])
@pytest.mark.parametrize("holes", [False, True], ids=["dense", "holes"])
def test_naive_matches_reference(with_logprobs, holes, score_positive):
    rb = make_batch(5, 6, (0, 20), 16, 97, seed=3, holes=holes)
    ref = _compare(rb, with_logprobs=with_logprobs, score_positive=score_positive)
    assert bool(ref.active.any()) and bool(ref.selected.any())
    assert bool(ref.scores[rb.rewards > 0.5].any()) == score_positive


@pytest.mark.parametrize("beta", [1.0, 0.0, -math.inf, 0.5])
@pytest.mark.parametrize("eta", ["2|0.5-p|", "1-p", "p", 0.3])
def test_naive_beta_eta(beta, eta):
    rb = make_batch(4, 4, (1, 12), 8, 50, seed=11, temperature=0.7)
    _compare(rb, beta=beta, eta=eta)


def test_naive_edge_groups():
    # all-correct, all-wrong, one-correct, one-wrong groups, empty and one-token responses
    lengths = [0, 3, 1, 5, 4, 0, 2, 6, 1, 7, 0, 3, 2, 2, 1, 9]
    rb = make_batch(4, 4, lengths, 8, 40, seed=5, success=[1.0, 0.0, 0.3, 0.7])
    rb.rewards[:4] = 1.0
    rb.rewards[4:8] = 0.0
    rb.rewards[8:12] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    rb.rewards[12:16] = torch.tensor([1.0, 1.0, 0.0, 1.0])
    ref = _compare(rb)
    assert ref.active.tolist() == [False, False, True, True]


def test_naive_score_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (30,), generator=g)
    h = torch.randn(30, 12, generator=g)
    w = torch.randn(60, 12, generator=g)
    err, _ = prediction_errors(ids, hidden=h, lm_head_weight=w)
    args = (h[:11], h, err[:11], err)
    want = score_tokens(*args, backend="reference")
    torch.testing.assert_close(naive_score_tokens(*args), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
