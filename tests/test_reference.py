"""The float64 reference against itself: brute force vs factored, conventions of tau and eta, GWHES."""
import math

import pytest
import torch

from nthr_kernels.core.rules import eta_value
from nthr_kernels.ops.advantages import reference as ref

f64 = torch.float64


@pytest.mark.parametrize("tp,tn,v,d", [(1, 1, 1, 1), (7, 33, 5, 3), (33, 7, 64, 17), (0, 5, 4, 4), (5, 0, 4, 4)])
def test_pairwise_equals_factored(tp, tn, v, d):
    g = torch.Generator().manual_seed(tp * 100 + tn)
    hp, hn = torch.randn(tp, d, generator=g, dtype=f64), torch.randn(tn, d, generator=g, dtype=f64)
    ep, en = torch.randn(tp, v, generator=g, dtype=f64), torch.randn(tn, v, generator=g, dtype=f64)
    a = ref.pairwise_scores(hp, hn, ep, en)
    b = ref.factored_scores(hp, hn, ep, en)
    assert a.shape == (tn,)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and the literal double sum
    lit = torch.tensor([sum(float(ep[u] @ en[t]) * float(hp[u] @ hn[t]) for u in range(tp)) for t in range(tn)], dtype=f64)
    torch.testing.assert_close(a, lit, rtol=1e-12, atol=1e-12)


def _group(seed=0, T=12, d=6, V=20):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g, dtype=f64)
    w = torch.randn(V, d, generator=g, dtype=f64)
    ids = torch.randint(0, V, (T,), generator=g)
    resp = torch.tensor([0] * 3 + [1] * 4 + [2] * 2 + [3] * 3)
    return h, w, ids, resp


def test_prediction_errors_definition():
    h, w, ids, _ = _group()
    vocab = torch.unique(ids)
    err = ref.prediction_errors(h, ids, vocab, lm_head_weight=w, temperature=0.7)
    p = torch.softmax(h @ w.T / 0.7, -1)
    expect = (ids[:, None] == vocab[None]).to(f64) - p[:, vocab]
    torch.testing.assert_close(err, expect)
    # not renormalised on the slice: rows do not sum to 0 unless V* is the whole vocabulary
    assert bool((err.sum(1).abs() > 1e-6).any())


def test_old_logprob_shortcut_equals_full_normaliser():
    h, w, ids, _ = _group(1)
    vocab = torch.unique(ids)
    lp = torch.log_softmax(h @ w.T / 1.3, -1).gather(1, ids[:, None]).squeeze(1)
    a = ref.prediction_errors(h, ids, vocab, lm_head_weight=w, temperature=1.3)
    b = ref.prediction_errors(h, ids, vocab, lm_head_weight=w, old_logprobs=lp, temperature=1.3)
    c = ref.prediction_errors(h, ids, vocab, logits=h @ w.T, temperature=1.3)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("source", ["weight", "weight+logprobs", "logits"])
def test_near_certain_errors_keep_their_digits(source):
    """Two tokens whose logits differ by m: the sampled (larger) one's error is exactly the other's probability,
    ``sigmoid(-m)``, down to e^-60. Taken as ``1 - exp(z_y - log Z)``, float64 lost it below about 1e-12 (an
    error of 0 or 1.1e-16 at m = 40); the reference now takes ``-expm1(l_t)``, with ``l_t`` the old log-prob or
    ``-softplus`` of the other token's logit minus ``z_y``."""
    m = torch.tensor([0.5, 5.0, 20.0, 40.0, 60.0], dtype=f64)
    h = torch.stack([m, torch.zeros_like(m)], 1)  # z = h @ W^T with W = I: logits (m, 0)
    w, ids = torch.eye(2, dtype=f64), torch.zeros(5, dtype=torch.long)
    exact = torch.exp(-m) / (1 + torch.exp(-m))  # sigmoid(-m), no cancellation
    kw = {"logits": h} if source == "logits" else {"lm_head_weight": w}
    if source == "weight+logprobs":
        kw["old_logprobs"] = -torch.log1p(torch.exp(-m))
    err = ref.prediction_errors(h, ids, torch.arange(2), **kw)
    torch.testing.assert_close(err[:, 0], exact, rtol=1e-13, atol=0)
    torch.testing.assert_close(err[:, 1], -exact, rtol=1e-13, atol=0)


def test_anchors_all_vs_others():
    h, w, ids, resp = _group(2)
    positive = [True, True, False, False]
    err = ref.prediction_errors(h, ids, torch.unique(ids), lm_head_weight=w)
    a_all = ref.anchors(h, err, resp, positive, "all")
    a_oth = ref.anchors(h, err, resp, positive, "others")
    assert set(a_all) == set(a_oth) == {0, 1}
    s = ref.group_scores(h, err, resp, positive)
    assert a_all[0] == pytest.approx(float(s[resp == 0].mean()), rel=1e-12)
    # "others" for response 0 = scores against response 1's tokens only
    own = resp == 0
    s_oth = ref.pairwise_scores(h[resp == 1], h[own], err[resp == 1], err[own])
    assert a_oth[0] == pytest.approx(float(s_oth.mean()), rel=1e-12)
    assert a_all[0] != pytest.approx(a_oth[0])


def test_threshold_conventions():
    assert ref.threshold([3.0, -2.0], 1.0) == -2.0
    assert ref.threshold([3.0, 2.0], 0.5) == 1.0
    assert ref.threshold([3.0, -2.0], 0.0) == 0.0
    assert ref.threshold([math.inf], 0.0) == 0.0
    assert ref.threshold([3.0, 5.0], -math.inf) == -math.inf
    assert ref.threshold([-3.0], -math.inf) == -math.inf
    assert math.isnan(ref.threshold([], 1.0))


@pytest.mark.parametrize(
    "eta,p,expect",
    [("2|0.5-p|", 0.25, 0.5), ("2|0.5-p|", 0.5, 0.0), ("2|0.5-p|", 0.875, 0.75), ("1-p", 0.25, 0.75), ("p", 0.25, 0.25), (0.3, 0.9, 0.3), (lambda p: p * p, 0.5, 0.25)],
)
def test_eta_forms(eta, p, expect):
    assert eta_value(eta, p) == pytest.approx(expect)


@pytest.mark.parametrize("bad", ["2|p|", 1.5, -0.1, float("nan")])
def test_eta_rejects(bad):
    with pytest.raises(ValueError, match="eta"):
        eta_value(bad, 0.5)


def test_eta_callable_out_of_range():
    with pytest.raises(ValueError, match="eta"):
        eta_value(lambda p: 2.0, 0.5)


def test_nthr_group_selection_and_advantages():
    h, w, ids, resp = _group(3)
    positive = [True, False, True, False]
    adv = [1.0, -1.0, 1.0, -1.0]
    for beta in (1.0, 0.0, -math.inf):
        r = ref.nthr_group(h, ids, resp, positive, adv, lm_head_weight=w, beta=beta, eta="1-p")
        assert r["active"] and r["eta"] == 0.5
        neg = torch.tensor([not positive[i] for i in resp.tolist()])
        expect_sel = (r["scores"] > r["tau"]) & neg
        assert torch.equal(r["selected"], expect_sel)
        if beta == -math.inf:
            assert bool(r["selected"][neg].all())
        adv_tok = torch.tensor([adv[i] for i in resp.tolist()], dtype=f64)
        torch.testing.assert_close(r["token_advantages"], torch.where(expect_sel, 0.5 * adv_tok, adv_tok))


def test_nthr_group_inactive():
    h, w, ids, resp = _group(4)
    for positive in ([True] * 4, [False] * 4):
        r = ref.nthr_group(h, ids, resp, positive, [0.0] * 4, lm_head_weight=w)
        assert not r["active"] and math.isnan(r["tau"]) and r["eta"] == 1.0
        assert not bool(r["selected"].any())
    # mixed, but the only positive response is empty: nothing selected
    resp2 = torch.tensor([1] * 6 + [2] * 6)
    r = ref.nthr_group(h, ids, resp2, [True, False, False], [1.0, -1.0, -1.0], lm_head_weight=w)
    assert not r["active"] and not bool(r["selected"].any())


def test_gwhes_matches_definition():
    h, w, ids, resp = _group(5)
    positive = [True, False, True, False]
    out = ref.gwhes(h, ids, resp, positive, lm_head_weight=w)
    err = ref.prediction_errors(h, ids, torch.unique(ids), lm_head_weight=w)
    p = 0.5
    pp, pm = (1 - p) / math.sqrt(p * (1 - p)), p / math.sqrt(p * (1 - p))
    alpha = err @ err.T
    gram = h @ h.T
    k = alpha * gram
    pos_tok = torch.tensor([positive[i] for i in resp.tolist()])
    vals = []
    for i in (0, 2):
        own = resp == i
        v = pm * k[own][:, ~pos_tok].sum() - pp * k[own][:, pos_tok].sum()
        assert out["per_response"][i] == pytest.approx(float(v), rel=1e-10)
        vals.append(float(v))
    assert out["score"] == pytest.approx(sum(vals) / 2)
    assert math.isnan(ref.gwhes(h, ids, resp, [True] * 4, lm_head_weight=w)["score"])
