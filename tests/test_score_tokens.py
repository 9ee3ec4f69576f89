"""score_tokens and prediction_errors against the float64 reference, every backend, both paths."""
import pytest
import torch

import nthr_kernels as nk
from nthr_kernels.ops.prediction_errors import reference as ref_pe
from nthr_kernels.ops.score_tokens import reference as ref
from _helpers import TOL, backends

BACKENDS = backends()


def _inputs(tp, tn, v, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(tp, d), mk(tn, d), (mk(tp, v) * 0.3), (mk(tn, v) * 0.3)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tp,tn,v,d", [(1, 1, 1, 1), (7, 33, 5, 3), (33, 7, 64, 17), (0, 5, 4, 4), (5, 0, 4, 4), (40, 40, 3, 2)])
def test_score_tokens_matches_reference(backend, dtype, tp, tn, v, d):
    hp, hn, ep, en = _inputs(tp, tn, v, d, dtype, tp * 31 + tn)
    s = nk.score_tokens(hp, hn, ep, en, backend=backend)
    assert s.dtype == torch.float32 and s.shape == (tn,)
    r = ref.pairwise_scores(hp, hn, ep, en)
    scale = float(r.abs().max()) if tn else 1.0
    err = float((s.double() - r).abs().max()) if tn else 0.0
    assert err <= TOL[dtype] * max(scale, 1e-30)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "triton")])
@pytest.mark.parametrize("path", ["factored", "pairwise"])
def test_both_paths_agree(backend, path):
    """The cost model picks a path; each path alone must give the same scores."""
    hp, hn, ep, en = _inputs(19, 23, 37, 11, torch.float32, 5)
    mod = __import__(f"nthr_kernels.ops.score_tokens.{backend}_impl", fromlist=["x"])
    s = mod.score_tokens(hp, hn, ep, en, path=path)
    r = ref.factored_scores(hp, hn, ep, en)
    torch.testing.assert_close(s.double(), r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


def test_cost_model_picks_cheaper_path():
    from nthr_kernels.core.rules import factored_cost, pairwise_cost

    assert pairwise_cost(10, 10, 5000, 1024) < factored_cost(10, 10, 5000, 1024)
    assert factored_cost(4000, 8000, 2700, 1536) < pairwise_cost(4000, 8000, 2700, 1536)


@pytest.mark.parametrize("source", ["weight", "weight+logprobs", "logits"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_prediction_errors_helper(source, temperature):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 6, generator=g)
    w = torch.randn(40, 6, generator=g)
    ids = torch.randint(0, 40, (9,), generator=g)
    vocab = torch.unique(ids)
    expect = ref_pe.prediction_errors(h, ids, vocab, lm_head_weight=w, temperature=temperature)
    if source == "logits":
        out = nk.prediction_errors(ids, logits=h @ w.T, temperature=temperature)
    elif source == "weight":
        out = nk.prediction_errors(ids, hidden=h, lm_head_weight=w, temperature=temperature)
    else:
        lp = torch.log_softmax(h.double() @ w.double().T / temperature, -1).gather(1, ids[:, None]).squeeze(1).float()
        out = nk.prediction_errors(ids, hidden=h, lm_head_weight=w, old_logprobs=lp, temperature=temperature)
    assert torch.equal(out.vocab, vocab)
    torch.testing.assert_close(out.errors.double(), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_prediction_errors_of_certain_and_near_certain_tokens(temperature):
    """With old log-probs a sampled token's error is ``1 - exp(l_t)``, by the definition of ``log Z_t``: 0 for a
    certain token (a one-token vocabulary, ``l_t = 0``), where the two roundings of ``z_y / T`` (errors and
    ``log Z``) gave ~1e-7, and accurate to its small digits for a near-certain one (``l_t`` = -1e-6: float32's
    ``1 - exp(l_t)`` cancels to 1.19e-6 or 0)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(12, 5, generator=g) * 4
    w = torch.randn(1, 5, generator=g) * 4
    ids = torch.zeros(12, dtype=torch.int64)
    out = nk.prediction_errors(ids, hidden=h, lm_head_weight=w, old_logprobs=torch.zeros(12), temperature=temperature)
    assert torch.equal(out.errors, torch.zeros(12, 1))
    lp = torch.full((12,), -1e-6)
    w2 = torch.cat([w, w - 100.0])  # a second token far less likely than the first
    out = nk.prediction_errors(ids, hidden=h, lm_head_weight=w2, old_logprobs=lp, temperature=temperature,
                               check_logprobs=False, vocab=torch.tensor([0]))
    torch.testing.assert_close(out.errors[:, 0].double(), torch.full((12,), 1e-6, dtype=torch.float64).neg().expm1().neg(),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("source", ["weight", "logits"])
def test_prediction_errors_of_near_certain_tokens_without_old_logprobs(source):
    """Without old log-probs the sampled token's error is ``-expm1(l_t)`` with ``l_t = -softplus(L - z_y / T)``,
    ``L`` the log-sum-exp of the other tokens (``core.rules.sampled_logprob``): relative precision for errors of
    1e-4 down to 1e-13. As ``1 - exp(z_y / T - log Z)`` a float32 ``log Z`` of about 30 (a step of 2e-6) decided
    them: relative errors up to 1."""
    g = torch.Generator().manual_seed(5)
    margin = torch.linspace(9.0, 30.0, 40)  # errors sigmoid(-margin): 1.2e-4 down to 9e-14
    h2 = torch.stack([30.0 + 30.0 * torch.rand(40, generator=g), margin], 1)  # |log Z| 30 to 60
    w2 = torch.tensor([[1.0, 0.0], [1.0, -1.0]])  # logits (c, c - margin)
    ids = torch.zeros(40, dtype=torch.int64)
    vocab = torch.tensor([0, 1])
    expect = ref_pe.prediction_errors(h2, ids, vocab, lm_head_weight=w2)
    if source == "logits":
        out = nk.prediction_errors(ids, logits=h2 @ w2.T, vocab=vocab)
    else:
        out = nk.prediction_errors(ids, hidden=h2, lm_head_weight=w2, vocab=vocab)
    assert float(expect[:, 0].min()) < 1e-12 < 1e-4 < float(expect[:, 0].max())
    torch.testing.assert_close(out.errors.double(), expect, rtol=1e-4, atol=0)


def test_prediction_errors_feed_score_tokens():
    """The documented recipe: errors of a whole group, split into positive and negative tokens."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(20, 8, generator=g)
    w = torch.randn(30, 8, generator=g)
    ids = torch.randint(0, 30, (20,), generator=g)
    err, vocab = nk.prediction_errors(ids, hidden=h, lm_head_weight=w)
    s = nk.score_tokens(h[:8], h[8:], err[:8], err[8:])
    e64 = ref_pe.prediction_errors(h, ids, vocab, lm_head_weight=w)
    torch.testing.assert_close(s.double(), ref.pairwise_scores(h[:8], h[8:], e64[:8], e64[8:]), rtol=1e-4, atol=1e-4)
