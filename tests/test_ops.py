"""The ``nthr`` torch.library ops: opcheck, dispatch registrations, torch.compile, errors raised inside.

The public functions call ``torch.ops.nthr.score_tokens`` / ``torch.ops.nthr.nthr_advantages``; the
native ops (``nthr::native_*``) are checked here when the C++ extension is loaded (their numerics are in
``tests/test_native.py``).
"""
from __future__ import annotations

import math

import pytest
import torch

import nthr_kernels as nk
from nthr_kernels.registry import native_available
from nthr_kernels.synthetic import make_batch

from _helpers import assert_matches_reference, run, validated

NATIVE = native_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="native C++ ops not built (see nthr_kernels.ops.native_lib)")
OP_BACKENDS = ["torch", "reference"] + (["native"] if NATIVE else [])


def _mixed_batch(packed=False, seed=1):
    """Every group mixed with non-empty positive responses, so no output is NaN (opcheck compares
    outputs with assert_close, which treats NaN as unequal)."""
    b = make_batch(3, 4, (1, 9), 16, 61, seed=seed, packed=packed, holes=not packed)
    b.rewards = torch.tensor([1.0, 0.0, 1.0, 0.0] * 3)
    return b


def _adv_args(b, *, backend, group_ids=None, logits=False, eta_table=None, anchor="all"):
    lay_mask = None if b.cu_seqlens is not None else b.mask
    w = None if logits else b.lm_head_weight
    lg = (b.hidden @ b.lm_head_weight.T) if logits else None
    lp = None if logits else b.old_logprobs
    gs = None if group_ids is not None else b.group_size
    return (
        b.hidden, b.token_ids, b.rewards, b.advantages, w, lg, lp, 0.9, lay_mask, b.cu_seqlens, gs, group_ids,
        1.0, "" if eta_table is not None else "2|0.5-p|", 0.0, eta_table, anchor, None, backend, True, True, False,
    )


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("variant", ["padded", "packed", "group_ids", "logits", "eta_table_others"])
def test_opcheck_nthr_advantages(backend, variant):
    b = _mixed_batch(packed=variant == "packed")
    kw = {}
    if variant == "group_ids":
        kw["group_ids"] = torch.arange(12) // 4 * 5 - 3  # data-dependent group count in the fake kernel
    if variant == "logits":
        kw["logits"] = True
    if variant == "eta_table_others":
        kw.update(eta_table=torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), anchor="others")
    torch.library.opcheck(torch.ops.nthr.nthr_advantages.default, _adv_args(b, backend=backend, **kw))


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("shape", [(5, 7, 11, 6), (40, 3, 2, 64), (0, 4, 3, 5)])
def test_opcheck_score_tokens(backend, shape):
    tp, tn, v, d = shape
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(tp, d, generator=g), torch.randn(tn, d, generator=g),
            torch.randn(tp, v, generator=g), torch.randn(tn, v, generator=g)]
    torch.library.opcheck(torch.ops.nthr.score_tokens.default, (*args, backend, True))


@needs_native
def test_opcheck_native_ops():
    from nthr_kernels.ops import native_lib

    g = torch.Generator().manual_seed(0)
    hp, hn, ep, en = torch.randn(6, 8, generator=g), torch.randn(9, 8, generator=g), torch.randn(6, 5, generator=g), torch.randn(9, 5, generator=g)
    torch.library.opcheck(torch.ops.nthr.native_score_tokens.default, (hp, hn, ep, en, 1 << 20))
    b = _mixed_batch()
    batch = validated(b, with_logprobs=False, eta="p", anchor="others")
    eta_g = torch.full((batch.group_ids.numel(),), 0.5, dtype=torch.float64)
    args = (batch.hidden, batch.tok_a, batch.tok_b, batch.tok_ids, batch.tok_resp, batch.resp_group, batch.positive,
            batch.adv, batch.group_active, eta_g, batch.lm_head_weight, None, None, 1.0, 1.0, True, 1 << 20)
    torch.library.opcheck(torch.ops.nthr.native_advantages.default, args)
    # the wrapper computes the same thing
    out = torch.ops.nthr.native_advantages(*args)
    assert out[0].shape == batch.tok_ids.shape and out[3].shape == batch.group_ids.shape
    assert native_lib.available()


def test_dispatch_registrations():
    for op in ("nthr::score_tokens", "nthr::nthr_advantages"):
        dump = torch._C._dispatch_dump(op)
        assert "CompositeExplicitAutograd" in dump and "Meta" in dump, dump
    for op in ("nthr::native_score_tokens", "nthr::native_advantages"):
        dump = torch._C._dispatch_dump(op)
        assert "Meta" in dump, dump  # the fake kernel exists whether or not the library is built
        if NATIVE:
            assert "\nCPU: registered at" in dump and "csrc" in dump, dump
            assert "Autograd" in dump, dump


def test_public_functions_call_the_ops(monkeypatch):
    """The public API reaches torch.ops.nthr.* (the op is what torch.compile sees)."""
    calls = []
    real = torch.ops.nthr.nthr_advantages

    class Spy:
        def __call__(self, *a, **k):
            calls.append(a[18])
            return real(*a, **k)

    monkeypatch.setattr(torch.ops.nthr, "nthr_advantages", Spy())
    b = _mixed_batch()
    run(b, "torch")
    assert calls == ["torch"]


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------
def _compile_inputs():
    b = make_batch(3, 4, (0, 9), 16, 61, seed=3, holes=True)
    b.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # one inactive group
    g = torch.Generator().manual_seed(4)
    extra = (torch.randn(5, 16, generator=g), torch.randn(7, 16, generator=g), torch.randn(5, 11, generator=g),
             torch.randn(7, 11, generator=g), torch.tensor([7, 7, 7, 7, -1, -1, -1, -1, 3, 3, 3, 3]))
    return b, extra


def _pipeline(hidden, token_ids, rewards, adv, w, lp, mask, hp, hn, ep, en, gid):
    s = nk.score_tokens(hp, hn, ep, en)
    r1 = nk.nthr_advantages(hidden, token_ids, rewards, adv, lm_head_weight=w, old_logprobs=lp, mask=mask, group_size=4)
    r2 = nk.nthr_advantages(hidden, token_ids, rewards, adv, lm_head_weight=w, mask=mask, group_ids=gid, eta=0.3,
                            anchor="others", beta=0.0, temperature=0.8)
    return (s, r1.token_advantages, r1.selected, r1.scores, r1.tau, r1.eta, r1.active,
            r2.token_advantages, r2.selected, r2.scores, r2.tau, r2.group_ids)


def test_torch_compile_fullgraph_matches_eager():
    b, extra = _compile_inputs()
    args = (b.hidden, b.token_ids, b.rewards, b.advantages, b.lm_head_weight, b.old_logprobs, b.mask, *extra)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(_pipeline, fullgraph=True)  # fullgraph: any graph break raises
    out_c = compiled(*args)
    out_e = _pipeline(*args)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for e, c in zip(out_e, out_c):
        assert e.dtype == c.dtype and e.shape == c.shape
        assert torch.equal(e, c) or torch.equal(e.nan_to_num(123.0), c.nan_to_num(123.0))
    assert bool(torch.isnan(out_c[4]).any()), "the inactive group must give NaN tau (the test covers it)"
    assert torch.equal(out_c[11], torch.tensor([-1, 3, 7]))
    # a second batch with a different number of groups reuses the graph (dynamic group count)
    gid = torch.arange(12) // 2
    out2 = compiled(*args[:-1], gid)
    assert out2[11].numel() == 6


def _options_pipeline(hidden, token_ids, rewards, adv, w, mask, temperature, beta):
    r = nk.nthr_advantages(hidden, token_ids, rewards, adv, lm_head_weight=w, mask=mask, group_size=4,
                           temperature=temperature, beta=beta)
    return r.token_advantages, r.scores, r.tau


@pytest.mark.parametrize("dynamic", [None, True])
def test_torch_compile_with_temperature_and_beta_as_arguments(dynamic):
    """A trainer passes beta and temperature as plain arguments: the second value makes them symbolic, and
    the static checks' isnan on them used to break the full graph ("torch.* op returned non-Tensor"); the op
    checks the concrete values when it runs, so a NaN beta still raises, naming it."""
    b, _ = _compile_inputs()
    args = (b.hidden, b.token_ids, b.rewards, b.advantages, b.lm_head_weight, b.mask)
    torch._dynamo.reset()
    compiled = torch.compile(_options_pipeline, fullgraph=True, dynamic=dynamic)
    for temperature, beta in ((1.0, 1.0), (0.9, 0.5), (0.8, 0.25)):
        out_c, out_e = compiled(*args, temperature, beta), _options_pipeline(*args, temperature, beta)
        for e, c in zip(out_e, out_c):
            assert torch.equal(e.nan_to_num(123.0), c.nan_to_num(123.0))
    with pytest.raises(ValueError, match=r"^beta: must not be NaN"):
        compiled(*args, 0.7, math.nan)
    with pytest.raises(ValueError, match=r"^temperature: must be > 0"):
        compiled(*args, -0.5, 1.0)


def test_torch_compile_raises_value_errors_from_inside_the_op():
    b, extra = _compile_inputs()
    bad = b.rewards.clone()
    bad[0] = 0.7  # three distinct reward values
    args = (b.hidden, b.token_ids, bad, b.advantages, b.lm_head_weight, b.old_logprobs, b.mask, *extra)
    torch._dynamo.reset()
    compiled = torch.compile(_pipeline, fullgraph=True)
    with pytest.raises(ValueError, match=r"^rewards: expected binary rewards"):
        compiled(*args)


# --------------------------------------------------------------------------------------------------
# static checks before the op, value checks inside it: same errors as before the split
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mutate, exc, pattern",
    [
        (lambda k: k.update(cu_seqlens=k["cu_seqlens"][[0, 2, 1] + list(range(3, 13))]), ValueError, r"^cu_seqlens: expected non-decreasing"),
        (lambda k: k.update(old_logprobs=k["old_logprobs"] + 5.0), ValueError, r"^old_logprobs: log-probabilities must be <= 0"),
        (lambda k: k.update(hidden=k["hidden"].index_fill(0, torch.tensor([1]), math.nan)), ValueError, r"^hidden: contains NaN, Inf or a value beyond float32 range"),
        (lambda k: k.update(token_ids=k["token_ids"] + 1000), ValueError, r"^token_ids: completion token ids must lie in"),
        (lambda k: k.update(group_size=5), ValueError, r"^group_size: must be a positive divisor"),
        (lambda k: k.update(eta=1.5), ValueError, r"^eta: a constant eta must lie in"),
        (lambda k: k.update(advantages=k["advantages"].to(torch.int64)), TypeError, r"^advantages: expected a float16, bfloat16, float32 or float64 tensor"),
    ],
)
def test_errors_name_the_argument(mutate, exc, pattern):
    b = make_batch(3, 4, (1, 9), 16, 61, seed=5, packed=True)
    assert int(b.cu_seqlens[1]) < int(b.cu_seqlens[2])  # so that swapping them breaks monotonicity
    kw = dict(hidden=b.hidden, token_ids=b.token_ids, rewards=b.rewards, advantages=b.advantages,
              lm_head_weight=b.lm_head_weight, old_logprobs=b.old_logprobs, cu_seqlens=b.cu_seqlens, group_size=4)
    mutate(kw)
    with pytest.raises(exc, match=pattern):
        nk.nthr_advantages(**kw)


def test_callable_eta_goes_through_a_table():
    b = make_batch(4, 4, (1, 9), 16, 61, seed=6)
    eta = lambda p: 0.5 * p + 0.1  # noqa: E731
    assert_matches_reference(run(b, "torch", eta=eta, beta=0.0), run(b, "reference", eta=eta, beta=0.0), b)
    with pytest.raises(ValueError, match=r"^eta: the callable returned"):
        run(b, "torch", eta=lambda p: 2.0)


def test_unavailable_native_backend(monkeypatch):
    """Where the extension is not loaded: "native" is refused by name, "auto" runs the torch backend."""
    from nthr_kernels.ops import native_lib

    b = _mixed_batch()
    monkeypatch.setitem(native_lib._state, "ok", False)
    monkeypatch.setitem(native_lib._state, "reason", "simulated")
    assert "native" not in nk.available_backends()
    with pytest.raises(ValueError, match=r"^backend: 'native' is not available"):
        run(b, "native")
    auto, torch_res = run(b, "auto"), run(b, "torch")
    assert torch.equal(auto.token_advantages, torch_res.token_advantages)
