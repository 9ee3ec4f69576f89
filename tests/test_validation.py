"""Bad input is loud: a ValueError or TypeError whose message starts with the argument's name."""
import dataclasses
import math

import pytest
import torch

import nthr_kernels as nk
from _helpers import backends, case
from nthr_kernels.core.rules import Inputs
from nthr_kernels.synthetic import make_batch


@pytest.fixture(scope="module")
def b():
    return case(seed=3, n_groups=2, group_size=4, lengths=(1, 6), d=8, vocab=23)


def call(b, **over):
    kw = dict(
        hidden=b.hidden, token_ids=b.token_ids, rewards=b.rewards, advantages=b.advantages,
        lm_head_weight=b.lm_head_weight, old_logprobs=b.old_logprobs, mask=b.mask, group_size=b.group_size,
    )
    kw.update(over)
    kw = {k: v for k, v in kw.items() if v is not _DROP}
    pos = [kw.pop(k) for k in ("hidden", "token_ids", "rewards", "advantages")]
    return nk.nthr_advantages(*pos, **kw)


_DROP = object()


def raises(exc, name, fn):
    with pytest.raises(exc) as ei:
        fn()
    assert str(ei.value).startswith(name), f"message does not name {name!r}: {ei.value}"


def test_valid_call_works(b):
    call(b)


@pytest.mark.parametrize(
    "over,exc,name",
    [
        (dict(hidden="x"), TypeError, "hidden"),
        (dict(hidden=None), TypeError, "hidden"),
        (dict(token_ids=None), TypeError, "token_ids"),
        (dict(hidden=torch.zeros(8, 6, 8, dtype=torch.int32)), TypeError, "hidden"),
        (dict(token_ids=torch.zeros(8, 6)), TypeError, "token_ids"),
        (dict(hidden=torch.zeros(8, 8)), ValueError, "hidden"),
        (dict(hidden=torch.zeros(8)), ValueError, "hidden"),
    ],
)
def test_types_and_ranks(b, over, exc, name):
    raises(exc, name, lambda: call(b, **over))


def test_shape_mismatches(b):
    R, L, d = b.hidden.shape
    raises(ValueError, "token_ids", lambda: call(b, token_ids=b.token_ids[:, :-1]))
    raises(ValueError, "mask", lambda: call(b, mask=b.mask[:, :-1]))
    raises(ValueError, "rewards", lambda: call(b, rewards=b.rewards[:-1]))
    raises(ValueError, "advantages", lambda: call(b, advantages=b.advantages[:-1]))
    raises(ValueError, "advantages", lambda: call(b, advantages=b.advantages[:, None]))
    raises(ValueError, "old_logprobs", lambda: call(b, old_logprobs=b.old_logprobs[:, :-1]))
    raises(ValueError, "lm_head_weight", lambda: call(b, lm_head_weight=b.lm_head_weight[:, :-1]))
    raises(ValueError, "lm_head_weight", lambda: call(b, lm_head_weight=b.lm_head_weight[0]))
    raises(ValueError, "logits", lambda: call(b, lm_head_weight=None, old_logprobs=None, logits=torch.zeros(R, L - 1, 5)))
    raises(ValueError, "group_ids", lambda: call(b, group_size=None, group_ids=torch.zeros(R - 1, dtype=torch.int64)))


def test_hidden_of_the_whole_sequence_is_named(b):
    # hidden states of prompt + completion where token_ids and mask are the completion's: the message named
    # mask ("expected shape (R, L + P) (hidden's [R, L])"), which was right; hidden was wrong
    R, L, d = b.hidden.shape
    whole = torch.cat([torch.zeros(R, 3, d), b.hidden], 1)
    with pytest.raises(ValueError) as ei:
        call(b, hidden=whole)
    msg = str(ei.value)
    assert msg.startswith(f"hidden: expected shape [{R}, {L}, d]"), msg
    assert f"got ({R}, {L + 3}, {d})" in msg, msg
    # the same with another response count (the batch's rewards/advantages follow token_ids too)
    raises(ValueError, "hidden", lambda: call(b, hidden=b.hidden[:-1]))
    # a wrong token_ids or mask alone is still named
    raises(ValueError, "token_ids", lambda: call(b, token_ids=b.token_ids[:, :-1]))
    raises(ValueError, "mask", lambda: call(b, mask=b.mask[:, :-1]))


def test_transposed_lm_head_weight_message_shows_the_expected_shape(b):
    # it read "lm_head_weight: hidden size 23 differs from hidden's 8", naming neither layout
    V, d = b.lm_head_weight.shape
    with pytest.raises(ValueError) as ei:
        call(b, lm_head_weight=b.lm_head_weight.T)
    assert str(ei.value) == f"lm_head_weight: expected [V, {d}] (d: hidden's last dim), got shape ({d}, {V})"


def test_rewards_must_be_binary(b):
    r = b.rewards.clone()
    r[0] = 0.3
    raises(ValueError, "rewards", lambda: call(b, rewards=r))
    r = b.rewards.clone()
    r[0] = float("nan")
    raises(ValueError, "rewards", lambda: call(b, rewards=r))
    # other binary encodings are fine with a matching threshold
    call(b, rewards=b.rewards * 2 - 1, reward_threshold=0.0)
    call(b, rewards=b.rewards.bool())


def test_groups(b):
    R = b.rewards.numel()
    raises(ValueError, "group_size", lambda: call(b, group_size=3))
    raises(ValueError, "group_size", lambda: call(b, group_size=0))
    raises(TypeError, "group_size", lambda: call(b, group_size=2.0))
    raises(ValueError, "group_size, group_ids", lambda: call(b, group_ids=torch.zeros(R, dtype=torch.int64)))
    raises(ValueError, "group_size, group_ids", lambda: call(b, group_size=None))
    raises(TypeError, "group_ids", lambda: call(b, group_size=None, group_ids=torch.zeros(R)))
    call(b, group_size=None, group_ids=[5] * 4 + [-1] * 4)


def test_old_policy_sources(b):
    R, L, _ = b.hidden.shape
    raises(ValueError, "lm_head_weight, logits", lambda: call(b, lm_head_weight=None, old_logprobs=None))
    raises(ValueError, "lm_head_weight, logits", lambda: call(b, logits=torch.zeros(R, L, 23)))
    raises(ValueError, "old_logprobs", lambda: call(b, lm_head_weight=None, logits=torch.zeros(R, L, 23)))


def test_token_ids_out_of_range(b):
    t = b.token_ids.clone()
    t[b.mask] = t[b.mask].clamp_max(0) + 23  # == V
    raises(ValueError, "token_ids", lambda: call(b, token_ids=t))
    t = b.token_ids.clone()
    t[0, 0] = -1
    raises(ValueError, "token_ids", lambda: call(b, token_ids=t))
    # padding positions may hold anything (e.g. -100)
    t = b.token_ids.clone()
    t[~b.mask] = -100
    call(b, token_ids=t)


def test_cu_seqlens_malformed():
    p = case(seed=4, n_groups=2, group_size=2, lengths=(1, 5), d=8, vocab=23, packed=True)
    kw = dict(lm_head_weight=p.lm_head_weight, group_size=2)
    cu = p.cu_seqlens
    for bad in (cu[1:], torch.flip(cu, [0]), cu + 1, cu.float(), cu.view(1, -1)):
        exc = TypeError if bad.is_floating_point() else ValueError
        with pytest.raises((ValueError, TypeError)) as ei:
            nk.nthr_advantages(p.hidden, p.token_ids, p.rewards, p.advantages, cu_seqlens=bad, **kw)
        assert isinstance(ei.value, exc)
        assert str(ei.value).startswith(("cu_seqlens", "rewards", "advantages")), ei.value
    bad = cu.clone()
    bad[1], bad[2] = bad[2], bad[1] - 1 if bad[1] > 0 else bad[1]
    if not bool((bad[1:] >= bad[:-1]).all()):
        raises(ValueError, "cu_seqlens", lambda: nk.nthr_advantages(p.hidden, p.token_ids, p.rewards, p.advantages, cu_seqlens=bad, **kw))
    raises(ValueError, "mask", lambda: nk.nthr_advantages(p.hidden, p.token_ids, p.rewards, p.advantages, cu_seqlens=cu, mask=torch.ones(5, dtype=torch.bool), **kw))


def test_hidden_size_mismatch(b):
    w = torch.randn(23, 9)
    raises(ValueError, "lm_head_weight", lambda: call(b, lm_head_weight=w))


def test_old_logprobs_positive(b):
    lp = b.old_logprobs.clone()
    lp[b.mask.nonzero()[0].tolist()] = 0.5
    raises(ValueError, "old_logprobs", lambda: call(b, old_logprobs=lp))
    lp = b.old_logprobs.clone()
    lp[~b.mask] = 3.0  # padding is ignored
    call(b, old_logprobs=lp)


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
def test_temperature(b, t):
    raises(ValueError, "temperature", lambda: call(b, temperature=t))


@pytest.mark.parametrize("eta,exc", [(1.5, ValueError), (-0.1, ValueError), ("2p", ValueError), (float("nan"), ValueError), ([0.5], TypeError), (True, TypeError)])
def test_eta(b, eta, exc):
    raises(exc, "eta", lambda: call(b, eta=eta))


def test_eta_callable_out_of_range(b):
    raises(ValueError, "eta", lambda: call(b, eta=lambda p: 1.5, backend="torch"))


def test_anchor_backend_beta(b):
    raises(ValueError, "anchor", lambda: call(b, anchor="mine"))
    raises(ValueError, "backend", lambda: call(b, backend="cuda"))
    raises(ValueError, "beta", lambda: call(b, beta=float("nan")))
    raises(ValueError, "beta", lambda: call(b, beta=float("inf")))
    raises(TypeError, "beta", lambda: call(b, beta="1"))
    call(b, beta=-math.inf)


@pytest.mark.parametrize("where", ["hidden", "lm_head_weight", "logits"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_detected(b, where, value):
    kw = {}
    if where == "hidden":
        h = b.hidden.clone()
        r, c = b.mask.nonzero()[0].tolist()
        h[r, c, 0] = value
        kw["hidden"] = h
    elif where == "lm_head_weight":
        w = b.lm_head_weight.clone()
        w[int(b.token_ids[b.mask][0]), 1] = value  # a row the call reads (a completion token's id)
        kw["lm_head_weight"] = w
    else:
        lg = (b.hidden @ b.lm_head_weight.T).clone()
        r, c = b.mask.nonzero()[0].tolist()
        lg[r, c, 2] = value
        kw.update(logits=lg, lm_head_weight=None, old_logprobs=None)
    raises(ValueError, where, lambda: call(b, **kw))
    call(b, check_finite=False, **kw)  # opt-out: no check (the result is then the caller's problem)


def test_non_finite_at_padding_is_ignored(b):
    h = b.hidden.clone()
    r, c = (~b.mask).nonzero()[0].tolist()
    h[r, c, :] = float("nan")
    res = call(b, hidden=h)
    assert bool(torch.isfinite(res.scores).all())


def test_score_tokens_validation():
    g = torch.Generator().manual_seed(0)
    hp, hn = torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g)
    ep, en = torch.randn(4, 5, generator=g), torch.randn(3, 5, generator=g)
    nk.score_tokens(hp, hn, ep, en)
    raises(ValueError, "h_pos", lambda: nk.score_tokens(hp[0], hn, ep, en))
    raises(ValueError, "err_neg", lambda: nk.score_tokens(hp, hn, ep, en[0]))
    raises(TypeError, "h_neg", lambda: nk.score_tokens(hp, hn.long(), ep, en))
    raises(TypeError, "err_pos", lambda: nk.score_tokens(hp, hn, ep.int(), en))
    raises(ValueError, "err_pos", lambda: nk.score_tokens(hp, hn, ep[:3], en))
    raises(ValueError, "h_neg", lambda: nk.score_tokens(hp, hn[:, :5], ep, en))
    raises(ValueError, "err_neg", lambda: nk.score_tokens(hp, hn, ep, en[:, :4]))
    raises(ValueError, "backend", lambda: nk.score_tokens(hp, hn, ep, en, backend="tpu"))
    bad = en.clone()
    bad[1, 1] = float("nan")
    raises(ValueError, "err_neg", lambda: nk.score_tokens(hp, hn, ep, bad))
    bad = hp.clone()
    bad[0, 0] = float("inf")
    raises(ValueError, "h_pos", lambda: nk.score_tokens(bad, hn, ep, en))
    nk.score_tokens(bad, hn, ep, en, check_finite=False)


def test_prediction_errors_validation(b):
    ids = torch.tensor([1, 2, 3])
    h = torch.randn(3, 8)
    raises(ValueError, "lm_head_weight, logits", lambda: nk.prediction_errors(ids, hidden=h))
    raises(ValueError, "hidden", lambda: nk.prediction_errors(ids, lm_head_weight=b.lm_head_weight))
    raises(ValueError, "token_ids", lambda: nk.prediction_errors(torch.tensor([1, 99, 3]), hidden=h, lm_head_weight=b.lm_head_weight))
    raises(ValueError, "old_logprobs", lambda: nk.prediction_errors(ids, hidden=h, lm_head_weight=b.lm_head_weight, old_logprobs=torch.tensor([0.1, -1.0, -1.0])))
    raises(ValueError, "temperature", lambda: nk.prediction_errors(ids, hidden=h, lm_head_weight=b.lm_head_weight, temperature=0))


def test_inputs_never_modified_on_error(b):
    snap = b.hidden.clone()
    with pytest.raises(ValueError):
        call(b, eta=2.0)
    assert torch.equal(snap, b.hidden)


# --------------------------------------------------------------------------------------------------
# issue 10: hostile inputs (findings 3, 5, 6, 8, 9); each raises before any work, on every backend
# --------------------------------------------------------------------------------------------------
ALL_BACKENDS = ["reference"] + backends()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_feature_sizes(b, backend):  # finding 3: d = 0 crashed native (SIGFPE), torch (ZeroDivisionError)
    R, L, _ = b.hidden.shape
    raises(ValueError, "hidden", lambda: call(b, hidden=b.hidden[..., :0], lm_head_weight=b.lm_head_weight[:, :0],
                                              backend=backend))
    raises(ValueError, "hidden", lambda: call(b, hidden=b.hidden[..., :0], lm_head_weight=None, old_logprobs=None,
                                              logits=torch.zeros(R, L, 23), backend=backend))
    raises(ValueError, "logits", lambda: call(b, lm_head_weight=None, old_logprobs=None,
                                              logits=torch.zeros(R, L, 0), backend=backend))
    raises(ValueError, "lm_head_weight", lambda: call(b, lm_head_weight=b.lm_head_weight[:0], backend=backend))
    hp, ep = torch.randn(4, 6), torch.randn(4, 5)
    raises(ValueError, "h_pos", lambda: nk.score_tokens(hp[:, :0], hp[:, :0], ep, ep, backend=backend))
    raises(ValueError, "err_pos", lambda: nk.score_tokens(hp, hp, ep[:, :0], ep[:, :0], backend=backend))


def test_zero_sizes_in_prediction_errors():
    ids = torch.tensor([1, 2])
    raises(ValueError, "hidden", lambda: nk.prediction_errors(ids, hidden=torch.zeros(2, 0),
                                                              lm_head_weight=torch.zeros(5, 0)))
    raises(ValueError, "logits", lambda: nk.prediction_errors(ids[:0], logits=torch.zeros(0, 0)))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batches_are_fine(b, backend):  # counts of responses and tokens may be 0 (a rank, a group)
    res = call(b, hidden=b.hidden[:0], token_ids=b.token_ids[:0], rewards=b.rewards[:0],
               advantages=b.advantages[:0], old_logprobs=b.old_logprobs[:0], mask=b.mask[:0], backend=backend)
    assert res.token_advantages.shape == (0, b.token_ids.shape[1]) and res.group_ids.numel() == 0
    res = call(b, mask=torch.zeros_like(b.mask), backend=backend)
    assert not bool(res.active.any()) and not bool(res.token_advantages.any())


def test_mask_required_with_padded_layout(b):  # finding 5: padding was scored and got advantages
    raises(ValueError, "mask", lambda: call(b, mask=_DROP))
    full = call(b, mask=torch.ones_like(b.mask), old_logprobs=None)  # no padding: an all-true mask
    assert full.selected.shape == b.mask.shape


def _bad_policy_value(b, where):
    """Keyword overrides putting one value beyond float32 range (the float64 input itself is finite)."""
    r, c = b.mask.nonzero()[0].tolist()
    if where == "hidden":
        h = b.hidden.double()
        h[r, c, 0] = 1e39
        return dict(hidden=h)
    if where == "lm_head_weight":
        w = b.lm_head_weight.double()
        w[int(b.token_ids[r, c]), 1] = 1e39
        return dict(lm_head_weight=w)
    if where == "logits":
        lg = (b.hidden @ b.lm_head_weight.T).double()
        lg[r, c, 2] = 1e39
        return dict(logits=lg, lm_head_weight=None, old_logprobs=None)
    if where == "advantages":
        a = b.advantages.double()
        a[0] = 1e300
        return dict(advantages=a)
    if where == "old_logprobs":
        lp = b.old_logprobs.double()
        lp[r, c] = -1e300
        return dict(old_logprobs=lp)
    raise AssertionError(where)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_weight_rows_not_read_are_not_checked(b, backend, dtype):
    """With old_logprobs a call reads only the weight rows of the completion tokens' ids: NaN in another row
    is fine (like NaN at padding); a NaN in a row read is named; without old_logprobs every row is read
    (the full-vocabulary normaliser), so every row is checked. The native backend's own norm pass (float32,
    float16, bfloat16) and the torch expressions (float64 here) agree on this."""
    bd = case(seed=3, n_groups=2, group_size=4, lengths=(1, 6), d=8, vocab=23, dtype=dtype)
    read = set(bd.token_ids[bd.mask].tolist())
    unread = min(set(range(23)) - read)
    w = bd.lm_head_weight.clone()
    w[unread, 2] = float("nan")
    res = call(bd, lm_head_weight=w, backend=backend)
    assert bool(torch.isfinite(res.scores).all())
    assert torch.equal(res.selected, call(bd, backend=backend).selected)
    raises(ValueError, "lm_head_weight", lambda: call(bd, lm_head_weight=w, old_logprobs=None, backend=backend))
    w = bd.lm_head_weight.clone()
    w[min(read), 2] = float("inf")
    with pytest.raises(ValueError, match=r"^lm_head_weight: .*in a row of a completion token's id"):
        call(bd, lm_head_weight=w, backend=backend)
    call(bd, lm_head_weight=w, backend=backend, check_finite=False)  # opt-out: no check


def test_native_row_norms_are_the_torch_norms():
    """nthr::native_check_values' norms (the native backend's norm pass) against torch's vector_norm over the same
    rows: hidden at the completion positions, the weight rows read; padded and packed, strided, bf16."""
    from nthr_kernels.core.checks import _max_row_norm, validate_batch, weight_rows_read
    from nthr_kernels.core.rules import Options
    from nthr_kernels.registry import native_available

    if not native_available():
        pytest.skip("native C++ ops not built here")
    from nthr_kernels.ops.advantages.native_impl import policy_norms

    for packed, dtype in ((False, torch.float32), (True, torch.float32), (False, torch.bfloat16)):
        bb = make_batch(3, 4, (0, 40), 24, 301, seed=2, packed=packed, dtype=dtype, holes=not packed)
        h = torch.empty(bb.hidden.shape[:-1] + (2 * bb.hidden.shape[-1],), dtype=dtype)[..., ::2]
        h.copy_(bb.hidden)  # strided rows
        x = Inputs(h, bb.token_ids, bb.rewards, bb.advantages, bb.lm_head_weight, None, bb.old_logprobs,
                   bb.mask, bb.cu_seqlens, bb.group_size, None)
        batch = validate_batch(x, Options(check_finite=False, check_logprobs=False))
        rows = None if packed else bb.mask
        seen = weight_rows_read(bb.token_ids, rows, 301)
        assert int(seen.sum()) < 301  # some rows are not read
        for all_rows, wrows in ((False, seen), (True, None)):
            got = policy_norms(batch, all_rows)
            want = torch.stack([_max_row_norm(h, rows), _max_row_norm(bb.lm_head_weight, wrows)]).double()
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        hn = h.clone()  # NaN in the first completion row: a NaN norm
        first = (int(batch.tok_a[0]),) if batch.tok_b is None else (int(batch.tok_a[0]), int(batch.tok_b[0]))
        hn[first][0] = float("nan")
        assert math.isnan(float(policy_norms(dataclasses.replace(batch, hidden=hn), False)[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_weight_rows_read_norm_gathers_the_same_value(monkeypatch, dtype):
    """On the CPU the largest norm over a few flagged weight rows is taken over those rows alone, gathered in
    blocks of SCAN_ELEMS elements: the same value as the norm pass over every row masked to them, NaN in a
    flagged row included and NaN elsewhere ignored, for no, few and most rows flagged, exact or not."""
    from nthr_kernels.core import checks

    def masked(x, rows, exact):  # every row's norm, then the flagged ones (the pass the gather replaces)
        norms = checks._row_norms(x, exact)
        return torch.where(rows, norms, torch.zeros((), dtype=norms.dtype)).max()

    monkeypatch.setattr(checks, "SCAN_ELEMS", 3 * 16)  # three rows of 16 per block: several blocks
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(101, 16, generator=g) * 3).to(dtype)
    for flagged in ([], [7], [0, 3, 50, 99, 100], list(range(0, 101, 3)), list(range(80))):
        rows = torch.zeros(101, dtype=torch.bool)
        rows[flagged] = True
        # every flagged row in turn holds the largest norm, then a NaN; row 1 holds a NaN (flagged in two cases)
        variants = [w, w.clone().index_fill_(0, torch.tensor([1]), float("nan"))]
        variants += [w.clone().index_fill_(0, torch.tensor([r]), v) for r in flagged for v in (100.0, float("nan"))]
        for x in variants:
            for exact in (False, True):
                got, want = checks._max_row_norm(x, rows, exact), masked(x, rows, exact)
                assert got.dtype == want.dtype, (flagged, exact, got.dtype, want.dtype)
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=str((flagged, exact)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inf_is_named(dtype):
    """Inf in a bfloat16/float16 hidden is named as such (the row scan compared with FLOAT32_MAX rounded to
    the dtype's inf, let it pass, and the logit-scale check spoke of the temperature instead)."""
    bd = case(seed=3, n_groups=2, group_size=4, lengths=(1, 6), d=8, vocab=23, dtype=dtype)
    h = bd.hidden.clone()
    r, c = bd.mask.nonzero()[0].tolist()
    h[r, c, 1] = float("inf")
    for backend in ALL_BACKENDS:
        with pytest.raises(ValueError, match=r"^hidden: contains NaN, Inf"):
            call(bd, hidden=h, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("where", ["hidden", "lm_head_weight", "logits", "advantages", "old_logprobs"])
def test_values_beyond_float32_range(b, backend, where):  # finding 6: they became inf/NaN in float32
    raises(ValueError, where, lambda: call(b, backend=backend, **_bad_policy_value(b, where)))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_temperature_that_overflows_float32(b, backend):  # finding 6: T = 1e-8 gave NaN
    R, L, _ = b.hidden.shape
    raises(ValueError, "temperature", lambda: call(b, temperature=1e-8, old_logprobs=None, backend=backend))
    logits = b.hidden @ b.lm_head_weight.T
    raises(ValueError, "temperature", lambda: call(b, temperature=1e-8, lm_head_weight=None, old_logprobs=None,
                                                   logits=logits, backend=backend))
    ids = b.token_ids[b.mask]
    raises(ValueError, "temperature", lambda: nk.prediction_errors(ids, logits=logits[b.mask], temperature=1e-8))
    call(b, temperature=0.05, old_logprobs=None, backend=backend)  # small but representable: fine


def test_rewards_binary_unless_threshold_given(b):  # finding 8: 0.3 / 0.7 were accepted silently
    r = torch.where(b.rewards > 0.5, 0.7, 0.3)
    raises(ValueError, "rewards", lambda: call(b, rewards=r))
    explicit = call(b, rewards=r, reward_threshold=0.5)  # the caller states the rule: today's rule
    assert torch.equal(explicit.selected, call(b).selected)
    raises(ValueError, "reward_threshold", lambda: call(b, rewards=b.rewards.bool(), reward_threshold=0.5))
    call(b, rewards=b.rewards.to(torch.int64))


_BIG = 2**53  # float64 holds every integer below it, not 2^53 + 1


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint64])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_integer_rewards_beyond_2_53_with_a_threshold(b, backend, dtype):
    """The threshold test ran in float64: 2^53 and 2^53 + 1 both became 2^53, so two distinct rewards above
    reward_threshold passed as one value, and 2^53 + 1 > 2^53 came out False (the batch was refused as
    "several values at or below"). Such rewards are refused, naming rewards; within +-2^53 the split is exact."""
    pos = b.rewards > 0.5
    two_above = torch.where(pos, _BIG + 1, 0).to(dtype)
    two_above[pos.nonzero()[0, 0]] = _BIG
    raises(ValueError, "rewards", lambda: call(b, backend=backend, rewards=two_above, reward_threshold=0.5))
    above = torch.where(pos, _BIG + 1, 0).to(dtype)
    with pytest.raises(ValueError, match=r"^rewards: integer rewards .* within \+-2\^53"):
        call(b, backend=backend, rewards=above, reward_threshold=float(_BIG))
    exact = call(b, backend=backend, rewards=torch.where(pos, _BIG - 1, _BIG - 2).to(dtype),
                 reward_threshold=float(_BIG - 2))
    assert torch.equal(exact.selected, call(b, backend=backend).selected)
    raises(ValueError, "rewards", lambda: call(b, backend=backend, rewards=above.to(torch.int64) * 2))


@pytest.mark.parametrize("threshold", [_BIG + 3, torch.tensor(_BIG + 3), "fraction", 10**400],
                         ids=["2^53+3", "tensor 2^53+3", "Fraction(1,3)", "10^400"])
def test_reward_threshold_that_float64_cannot_hold(b, threshold):
    """reward_threshold was converted to float64 first: 2^53 + 3 became 2^53 + 4, and float rewards 2^53 + 4
    (exactly above it) were refused as "several values at or below"; 1/3 as a Fraction moved to the nearest
    float; an int beyond float64 range raised an OverflowError. Each now raises a ValueError naming it."""
    import fractions
    threshold = fractions.Fraction(1, 3) if threshold == "fraction" else threshold
    r = torch.where(b.rewards > 0.5, torch.tensor(_BIG + 4.0, dtype=torch.float64), 0.0)
    raises(ValueError, "reward_threshold", lambda: call(b, rewards=r, reward_threshold=threshold))
    call(b, rewards=r, reward_threshold=_BIG + 2)  # an integer float64 holds is taken as it is


@pytest.mark.parametrize("ret", ["0.5", None, [0.5]])
def test_eta_callable_returning_a_non_number(b, ret):  # finding 9: a bare float() failed without naming eta
    raises(TypeError, "eta", lambda: call(b, eta=lambda p: ret))


def test_eta_callable_that_raises(b):
    raises(ValueError, "eta", lambda: call(b, eta=lambda p: 1 / (p - p)))


def test_meta_tensors_named(b):  # finding 9: prediction_errors failed inside Tensor.item()
    meta = lambda t: t.to("meta")  # noqa: E731
    raises(ValueError, "hidden", lambda: call(b, hidden=meta(b.hidden)))
    raises(ValueError, "token_ids", lambda: call(b, token_ids=meta(b.token_ids)))
    ids = b.token_ids[b.mask]
    h = b.hidden[b.mask]
    raises(ValueError, "token_ids", lambda: nk.prediction_errors(meta(ids), hidden=h, lm_head_weight=b.lm_head_weight))
    raises(ValueError, "hidden", lambda: nk.prediction_errors(ids, hidden=meta(h), lm_head_weight=b.lm_head_weight))
    raises(ValueError, "lm_head_weight", lambda: nk.prediction_errors(ids, hidden=h, lm_head_weight=meta(b.lm_head_weight)))
    raises(ValueError, "logits", lambda: nk.prediction_errors(ids, logits=meta(h @ b.lm_head_weight.T)))
    raises(ValueError, "h_pos", lambda: nk.score_tokens(meta(h), h, h, h))



# --------------------------------------------------------------------------------------------------
# the second audit (2026-11-27): dtypes, scalars on the meta device, bool flags, the scores' float32
# range, prediction_errors' old_logprobs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("where", ["hidden", "lm_head_weight", "advantages", "old_logprobs"])
def test_float8_is_refused(b, backend, where):  # is_floating_point() let it through to a RuntimeError
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    f8 = getattr(b, where).to(torch.float8_e4m3fn)
    raises(TypeError, where, lambda: call(b, backend=backend, **{where: f8}))
    raises(TypeError, where, lambda: call(b, backend=backend, check_finite=False, **{where: f8}))
    h = torch.randn(3, 4)
    raises(TypeError, "h_pos", lambda: nk.score_tokens(h.to(torch.float8_e4m3fn), h, h, h))
    ids = b.token_ids[b.mask]
    raises(TypeError, "hidden", lambda: nk.prediction_errors(ids, hidden=b.hidden[b.mask].to(torch.float8_e4m3fn),
                                                             lm_head_weight=b.lm_head_weight))


def test_scalars_on_the_meta_device(b):  # Tensor.item() raised a RuntimeError
    meta = torch.tensor(0.5, device="meta")
    for name in ("temperature", "beta", "reward_threshold"):
        raises(TypeError, name, lambda: call(b, **{name: meta}))
    raises(TypeError, "eta", lambda: call(b, eta=lambda p: meta))
    call(b, temperature=torch.tensor(1.5), beta=torch.tensor(0.5))  # a real 0-d tensor is a number


def test_check_flags_must_be_bools(b):  # score_tokens and prediction_errors took None or 0 as False
    h = torch.randn(3, 4)
    ids = b.token_ids[b.mask]
    for flag in (None, 0, "no"):
        raises(TypeError, "check_finite", lambda: nk.score_tokens(h, h, h, h, check_finite=flag))
        raises(TypeError, "check_finite", lambda: nk.prediction_errors(ids, hidden=b.hidden[b.mask],
                                                                        lm_head_weight=b.lm_head_weight, check_finite=flag))
        raises(TypeError, "check_logprobs", lambda: nk.prediction_errors(ids, hidden=b.hidden[b.mask],
                                                                          lm_head_weight=b.lm_head_weight, check_logprobs=flag))
        raises(TypeError, "check_finite", lambda: call(b, check_finite=flag))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("source", ["old_logprobs", "weight", "logits"])
def test_scores_beyond_float32_range(b, backend, source):  # the torch backend's anchors became inf / NaN
    def over(scale):
        h = b.hidden * scale
        o = dict(hidden=h, backend=backend, check_logprobs=False)
        if source == "weight":
            o["old_logprobs"] = _DROP
        if source == "logits":
            o.update(lm_head_weight=_DROP, old_logprobs=_DROP, logits=(h @ b.lm_head_weight.T) * 0)
        return o
    top = float(b.hidden[b.mask].norm(dim=-1).max())
    raises(ValueError, "hidden", lambda: call(b, temperature=1e30, **over(3e18 / top)))
    res = call(b, temperature=1e30, **over(1e15 / top))  # 1e30-sized scores: fine in float32
    ref = call(b, temperature=1e30, **{**over(1e15 / top), "backend": "reference"})
    assert torch.isfinite(res.tau[res.active]).all() and torch.equal(res.selected, ref.selected)
    call(b, temperature=1e30, check_finite=False, **{**over(3e18 / top), "backend": "reference"})  # the switch


def test_large_finite_hidden_gets_the_score_message_not_the_temperature_one(b):
    # a float32 row norm overflows past ~1.8e19 although every value is finite: the logit bound is
    # recomputed in float64 (it was reported as "temperature: ... up to inf"), and the scores' range fails
    raises(ValueError, "hidden: row norms", lambda: call(b, hidden=b.hidden * 1e19, temperature=1e30,
                                                          check_logprobs=False))


def test_score_tokens_scores_beyond_float32_range():
    g = torch.Generator().manual_seed(1)
    hp, hn, ep, en = (torch.randn(n, 6, generator=g) for n in (4, 3, 4, 3))
    raises(ValueError, "h_pos, h_neg, err_pos, err_neg", lambda: nk.score_tokens(hp * 1e20, hn * 1e20, ep, en))
    s = nk.score_tokens(hp * 1e15, hn * 1e15, ep, en)  # the magnitude bound fails, the exact norms pass
    assert torch.isfinite(s).all()
    nk.score_tokens(hp * 1e20, hn * 1e20, ep, en, check_finite=False)  # the switch


def test_prediction_errors_checks_old_logprobs(b):  # it returned errors of -1e6 for log-probs of 0
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    ids = torch.randint(0, 30, (40,), generator=g)
    lp = torch.log_softmax(h @ w.T, -1).gather(1, ids[:, None])[:, 0]
    ok = nk.prediction_errors(ids, hidden=h, lm_head_weight=w, old_logprobs=lp)
    ref = nk.prediction_errors(ids, logits=h @ w.T)
    torch.testing.assert_close(ok.errors, ref.errors, atol=1e-5, rtol=0)
    raises(ValueError, "old_logprobs: inconsistent", lambda: nk.prediction_errors(
        ids, hidden=h, lm_head_weight=w, old_logprobs=torch.zeros(40)))
    shifted = torch.roll(lp, 1)  # one position off
    raises(ValueError, "old_logprobs: inconsistent", lambda: nk.prediction_errors(
        ids, hidden=h, lm_head_weight=w, old_logprobs=shifted))
    nk.prediction_errors(ids, hidden=h, lm_head_weight=w, old_logprobs=shifted, check_logprobs=False)  # the switch
    # only the rows of vocab and of the ids are read: NaN in another row is no error
    w_nan = w.clone()
    unused = sorted(set(range(30)) - set(ids.tolist()))
    w_nan[unused[0]] = float("nan")
    nk.prediction_errors(ids, hidden=h, lm_head_weight=w_nan, old_logprobs=lp)
    raises(ValueError, "lm_head_weight", lambda: nk.prediction_errors(ids, hidden=h, lm_head_weight=w_nan))
    raises(ValueError, "hidden", lambda: nk.prediction_errors(ids, hidden=h, logits=h @ w.T))  # ignored before

# --------------------------------------------------------------------------------------------------
# the old_logprobs check's implied mass, computed in blocks without synchronisation
# --------------------------------------------------------------------------------------------------
def _native_implied_mass(budget):
    from nthr_kernels.ops.advantages import native_impl
    from nthr_kernels.registry import native_available

    if not native_available():
        pytest.skip("native C++ ops not built here")
    return lambda batch, idx: native_impl.implied_mass(batch, idx, budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("impl, blocks", [("torch", 1 << 26), ("torch", 300), ("native", None), ("native", 300)])
def test_implied_mass_matches_float64(monkeypatch, packed, impl, blocks, dtype):
    """The old_logprobs check's implied log-mass on V*, from the torch blocks (one block; many blocks and
    split groups) and the native kernels (default scratch; a budget that splits rows and V*); float32 and
    bfloat16 inputs (the float64 reference reads the same rounded values)."""
    from nthr_kernels.core import checks
    from nthr_kernels.core.checks import implied_vstar_mass, logprob_sample, validate_batch
    from nthr_kernels.core.rules import Options

    if impl == "torch":
        monkeypatch.setattr(checks, "_CHECK_ELEMS", blocks)
        mass = None
    else:
        mass = _native_implied_mass(blocks)
    b = make_batch(4, 3, (0, 15), 8, 97, seed=11, packed=packed, temperature=0.7, dtype=dtype)
    gids = torch.tensor([3, 1, 3, 0, 2, 1, 0, 2, 3, 1, 0, 2])  # groups interleaved across responses
    x = Inputs(b.hidden, b.token_ids, b.rewards, b.advantages, b.lm_head_weight, None, b.old_logprobs,
               b.mask, b.cu_seqlens, None, gids)
    checks = None
    if mass is not None:  # the native backend's hook at this budget
        from nthr_kernels.ops.advantages import native_impl
        checks = lambda batch, w, idx: native_impl.value_checks(batch, w, idx, blocks)  # noqa: E731
    batch = validate_batch(x, Options(temperature=0.7), value_checks=checks)
    everyone = torch.arange(batch.n_tokens)
    got = (mass or implied_vstar_mass)(batch, everyone)
    g_tok = batch.resp_group[batch.tok_resp]
    h = batch.gather(batch.hidden).double()
    w = batch.lm_head_weight.double()
    lp = batch.gather(batch.old_logprobs).double()
    for t in range(batch.n_tokens):
        vs = torch.unique(batch.tok_ids[g_tok == g_tok[t]])
        z = (w[vs] - w[batch.tok_ids[t]]) @ h[t] / 0.7
        torch.testing.assert_close(got[t], lp[t] + torch.logsumexp(z, 0), rtol=1e-5, atol=1e-5)
    if mass is not None:  # the check's own sample, in the order validation passes it
        idx = logprob_sample(batch.n_tokens)
        torch.testing.assert_close(mass(batch, idx), got[idx], rtol=0, atol=0)
    # the check itself, in the same blocks: consistent log-probs pass, log-probs one position off fail
    shifted = b.old_logprobs.roll(1, dims=-1 if not packed else 0)
    with pytest.raises(ValueError, match="old_logprobs: inconsistent"):
        validate_batch(x._replace(old_logprobs=shifted), Options(temperature=0.7), value_checks=checks)


# --------------------------------------------------------------------------------------------------
# audit e: tensor layouts (sparse, mkldnn, nested) reached the kernels and failed with NotImplementedError
# --------------------------------------------------------------------------------------------------
def _odd_layouts(t: torch.Tensor) -> dict:
    out = {"sparse_coo": t.to_sparse()}
    if t.dim() == 2:
        out["sparse_csr"] = t.to_sparse_csr()
        if t.is_floating_point() and t.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            out["mkldnn"] = t.to_mkldnn()
        out["nested"] = torch.nested.nested_tensor(list(t.unbind(0)))
    return out


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("where", ["hidden", "token_ids", "rewards", "advantages", "lm_head_weight", "old_logprobs",
                                   "mask", "group_ids"])
def test_non_strided_layouts_are_named(b, backend, where):
    over = {"group_ids": torch.arange(b.rewards.shape[0]) // b.group_size, "group_size": _DROP} if where == "group_ids" else {}
    t = over.get(where, getattr(b, where, None))
    for layout, odd in _odd_layouts(t).items():
        raises(TypeError, where, lambda: call(b, backend=backend, **{**over, where: odd}))
        raises(TypeError, where, lambda: call(b, backend=backend, check_finite=False, **{**over, where: odd}))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_strided_layouts_are_named_by_score_tokens_and_prediction_errors(b, backend):
    g = torch.Generator().manual_seed(0)
    args = dict(h_pos=torch.randn(4, 6, generator=g), h_neg=torch.randn(3, 6, generator=g),
                err_pos=torch.randn(4, 5, generator=g), err_neg=torch.randn(3, 5, generator=g))
    for name, t in args.items():
        for layout, odd in _odd_layouts(t).items():
            for cf in (True, False):
                raises(TypeError, name, lambda: nk.score_tokens(**{**args, name: odd}, backend=backend, check_finite=cf))
    ids = b.token_ids[b.mask]
    pe = dict(token_ids=ids, hidden=b.hidden[b.mask], lm_head_weight=b.lm_head_weight, old_logprobs=b.old_logprobs[b.mask],
              vocab=torch.unique(ids))
    for name, t in pe.items():
        for layout, odd in _odd_layouts(t).items():
            raises(TypeError, name, lambda: nk.prediction_errors(**{**pe, name: odd}))


def _other_device(t: torch.Tensor) -> torch.Tensor:
    """``t``'s shape and dtype on another device: a real CUDA tensor where there is one, else a fake one
    (FakeTensorMode: it has a device and no data, so only checks that read no values can pass it)."""
    if torch.cuda.is_available():
        return t.cuda()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(t.shape, dtype=t.dtype, device="cuda")


def test_prediction_errors_names_a_device_mismatch(b):  # it raised a RuntimeError from inside torch
    ids = b.token_ids[b.mask]
    pe = dict(token_ids=ids, hidden=b.hidden[b.mask], lm_head_weight=b.lm_head_weight, old_logprobs=b.old_logprobs[b.mask],
              vocab=torch.unique(ids))
    for name, t in pe.items():
        if name == "token_ids":
            continue
        raises(ValueError, name, lambda: nk.prediction_errors(**{**pe, name: _other_device(t)}))
        raises(ValueError, name, lambda: nk.prediction_errors(**{**pe, name: _other_device(t)}, check_finite=False,
                                                              check_logprobs=False))
    logits = b.hidden[b.mask] @ b.lm_head_weight.T
    raises(ValueError, "logits", lambda: nk.prediction_errors(ids, logits=_other_device(logits)))
    # the same check in the other public functions (they had it already)
    raises(ValueError, "lm_head_weight", lambda: call(b, lm_head_weight=_other_device(b.lm_head_weight)))
    h = torch.randn(3, 4)
    raises(ValueError, "h_pos, h_neg", lambda: nk.score_tokens(h, _other_device(h), h, h))


def test_hidden_alone_on_another_device_is_named(b):
    # hidden left on the GPU (or moved off it) while every other tensor is elsewhere: the message named
    # token_ids ("expected device cuda:0 (the device of hidden), got cpu"), then each other argument in turn
    h = _other_device(b.hidden)
    with pytest.raises(ValueError) as ei:
        call(b, hidden=h)
    msg = str(ei.value)
    assert msg.startswith("hidden: expected device cpu (that of every other tensor argument: token_ids, "), msg
    assert msg.endswith(f"got {h.device}"), msg
    # one argument off hidden's device is still that argument
    raises(ValueError, "rewards", lambda: call(b, rewards=_other_device(b.rewards)))
    raises(ValueError, "mask", lambda: call(b, mask=_other_device(b.mask)))
