"""Every fast backend against the float64 reference, on fresh random inputs.

Odd sizes, empty and single-token responses, degenerate groups, both layouts, both old-policy
sources, the old_logprobs shortcut, temperature, beta, every eta form and both anchors. Tolerances:
``SCORE_TOLERANCE`` in ``nthr_kernels/core/rules.py`` (per input dtype, with the reason).
"""
import math

import pytest
import torch

import nthr_kernels as nk
from _helpers import (PATTERNS, TOL, assert_matches_reference, backends, case, group_score_errors, near_certain_call, run,
                      run_impl, stable_seed, validated)

BACKENDS = backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("packed", [False, True])
def test_patterns_and_layouts(backend, pattern, packed):
    b = case(pattern=pattern, packed=packed, seed=stable_seed(pattern, packed), holes=not packed)
    ref = run(b, "reference")
    res = run(b, backend)
    assert_matches_reference(res, ref, b)
    if pattern in ("all_correct", "all_wrong"):
        assert not bool(res.active.any()) and not bool(res.selected.any())
        assert bool(torch.isnan(res.tau).all()) and bool((res.eta == 1).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("source", ["weight+logprobs", "weight", "logits"])
def test_dtypes_and_sources(backend, dtype, source):
    b = case(dtype=dtype, seed=7, n_groups=3, group_size=5, lengths=(1, 12), d=24, vocab=97, temperature=0.8)
    kw = dict(with_logprobs=source == "weight+logprobs", use_logits=source == "logits")
    assert_matches_reference(run(b, backend, **kw), run(b, "reference", **kw), b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["weight+logprobs", "weight", "logits"])
@pytest.mark.parametrize("seed,scale", [(13, 2), (37, 2), (23, 3), (20, 4)])
def test_near_certain_tokens_keep_their_small_errors(backend, source, seed, scale):
    """|V| = 2 with large logits: near-certain sampled tokens, whose error ``1 - pi(y_t)`` is tiny. It is
    ``-expm1(l_t)`` from the sampled token's log-prob ``l_t``: the old log-prob, or else ``-softplus`` of the
    other tokens' log-sum-exp minus ``z_y`` (``core.rules.sampled_logprob``). Taken as ``1 - exp(z_y - log Z)``
    (every backend without old log-probs, before), the float32 ``log Z``'s rounding swamped it: relative score
    errors of 3e-3, 7e-3, 0.5 and 0.5 on these four batches, on torch and native alike, with the weight or the
    logits; with old log-probs, ``1 - exp(l_t)`` in float32 cancelled (0.5 on the last two). Now within the
    float32 tolerance for every source."""
    args, kw = near_certain_call(seed, scale, 2, source=source)
    ref = nk.nthr_advantages(*args, backend="reference", **kw)
    out = nk.nthr_advantages(*args, backend=backend, **kw)
    for grp, err in enumerate(group_score_errors(out, ref)):
        assert err <= TOL[torch.float32], f"group {grp}: relative score error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_others_anchor_where_a_response_dominates_its_own_anchor(backend):
    """``anchor="others"`` on a small batch (tenth-session fuzz, case 1098) whose positive responses' own terms
    dominate their anchors: the torch backend took ``<M, N_i> - <N_i, N_i>`` as two float32 row dots, which
    cancelled (tau 1.5149e-4 against the reference's 1.5210e-4, 4e-3 relative); it now takes
    ``<M - N_i, N_i>`` in float64 as the native backend does (1.5207e-4). M's own float32 rounding remains
    (docs/NTHR.md, "Known precision limit")."""
    from nthr_kernels.core.rules import group_advantages
    from nthr_kernels.synthetic import make_batch

    from _helpers import rewards_for

    b = make_batch(2, 4, (0, 2), 8, 17, seed=27061, temperature=0.725, logit_scale=4.0)
    b.rewards = rewards_for("mixed", 2, 4, torch.Generator().manual_seed(27061 + 7))
    b.advantages = group_advantages(b.rewards, 4)
    kw = dict(with_logprobs=False, anchor="others", beta=1.0)
    assert_matches_reference(run(b, backend, **kw), run(b, "reference", **kw), b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.1, -math.inf])
@pytest.mark.parametrize("anchor", ["all", "others"])
def test_beta_and_anchor(backend, beta, anchor):
    b = case(seed=11, n_groups=2, group_size=6, lengths=(0, 10), d=8, vocab=33)
    ref = run(b, "reference", beta=beta, anchor=anchor)
    res = run(b, backend, beta=beta, anchor=anchor)
    assert_matches_reference(res, ref, b)
    if beta == -math.inf:
        neg = (b.rewards == 0)[:, None] & b.mask
        act = res.active[torch.arange(b.rewards.numel()) // b.group_size][:, None]
        assert torch.equal(res.selected, neg & act)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta", ["2|0.5-p|", "1-p", "p", 0.0, 0.37, 1.0, "callable"])
def test_eta(backend, eta):
    eta = (lambda p: p**2) if eta == "callable" else eta
    b = case(seed=12, n_groups=3, group_size=4, lengths=(1, 8), d=8, vocab=29)
    assert_matches_reference(run(b, backend, eta=eta, beta=0.0), run(b, "reference", eta=eta, beta=0.0), b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [[1] * 8, [0, 0, 0, 1, 0, 1, 0, 0], [257, 1, 7, 0, 33, 2, 1, 3]])
def test_odd_lengths(backend, lengths):
    b = case(n_groups=2, group_size=4, lengths=lengths, d=7, vocab=41, seed=sum(lengths), pattern="mixed")
    assert_matches_reference(run(b, backend, beta=0.0), run(b, "reference", beta=0.0), b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffled_group_ids(backend):
    """Responses in any order with arbitrary integer group ids give the permuted result."""
    b = case(seed=21, n_groups=4, group_size=3, lengths=(0, 8), d=8, vocab=37, packed=False)
    base = run(b, backend, beta=0.0)
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(b.rewards.numel(), generator=g)
    ids = torch.tensor([907, -5, 12, 40])[torch.arange(b.rewards.numel()) // b.group_size]
    kw = b.kwargs()
    kw.pop("group_size")
    kw["mask"] = b.mask[perm]
    kw["old_logprobs"] = b.old_logprobs[perm]

    res = nk.nthr_advantages(
        b.hidden[perm], b.token_ids[perm], b.rewards[perm], b.advantages[perm], group_ids=ids[perm], backend=backend, beta=0.0, **kw
    )
    assert torch.equal(res.group_ids, torch.tensor([-5, 12, 40, 907]))
    order = torch.tensor([1, 2, 3, 0])  # sorted ids -> original group index
    torch.testing.assert_close(res.tau, base.tau[order], equal_nan=True, rtol=1e-5, atol=1e-5)
    assert torch.equal(res.selected, base.selected[perm])
    torch.testing.assert_close(res.scores, base.scores[perm], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    b = case(seed=31, n_groups=3, group_size=4, lengths=(0, 20), d=16, vocab=53, dtype=torch.bfloat16)
    r1, r2 = run(b, backend), run(b, backend)
    for f in ("scores", "token_advantages", "selected", "tau", "eta"):
        a, c = getattr(r1, f), getattr(r2, f)
        assert torch.equal(a, c) or (a.is_floating_point() and torch.equal(torch.isnan(a), torch.isnan(c)) and torch.equal(a[~torch.isnan(a)], c[~torch.isnan(c)]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified_and_no_grad(backend):
    b = case(seed=41, n_groups=2, group_size=4, lengths=(1, 9), d=8, vocab=31)
    h = b.hidden.clone().requires_grad_(True)
    w = b.lm_head_weight.clone().requires_grad_(True)
    snap = [t.clone() for t in (b.hidden, b.token_ids, b.rewards, b.advantages, b.old_logprobs, b.mask, b.lm_head_weight)]
    kw = b.kwargs()
    kw["lm_head_weight"] = w

    res = nk.nthr_advantages(h, b.token_ids, b.rewards, b.advantages, backend=backend, **kw)
    for t in (res.scores, res.token_advantages, res.tau, res.eta):
        assert t.grad_fn is None and not t.requires_grad
    for a, c in zip(snap, (h.detach(), b.token_ids, b.rewards, b.advantages, b.old_logprobs, b.mask, w.detach())):
        assert torch.equal(a, c)
    assert h.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_tolerance_is_meaningful(backend):
    """A wrong score (e.g. a missing positive token) must fail the comparison: guards the tolerance."""
    b = case(seed=51, n_groups=2, group_size=4, lengths=(3, 9), d=8, vocab=31)
    ref = run(b, "reference")
    res = run(b, backend)
    bad = type(res)(**{**res.__dict__, "scores": res.scores * (1 + 50 * TOL[torch.float32])})
    with pytest.raises(AssertionError):
        assert_matches_reference(bad, ref, b)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "triton")])
@pytest.mark.parametrize("anchor", ["all", "others"])
def test_tiny_scratch_budget(backend, anchor):
    """A budget far below one group's needs forces many chunks, V* column blocks (torch) and one group
    per chunk (triton); the result must not change."""
    budget = 64 if backend == "torch" else 1  # float32 elements (torch), bytes (triton)
    b = case(seed=61, n_groups=3, group_size=4, lengths=(2, 15), d=12, vocab=71)
    got = run_impl(b, backend, budget, anchor=anchor, beta=0.5)
    assert_matches_reference(got, run(b, "reference", anchor=anchor, beta=0.5), b)


@pytest.mark.parametrize("budget", [None, 64, 4000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_torch_log_z_in_the_blocks_same_bits_as_the_planned_one(budget, temperature, monkeypatch):
    """With the weight and old log-probs the torch backend computes log Z in its error blocks
    (``plan_normaliser``) rather than for the whole batch up front (``log_normaliser``): the same bits
    either way. Default budget: each group's V* and tokens in one block; 64: V* split into column blocks
    (log Z per group, from log_normaliser); 4000 (with d = 8): V* whole, the tokens in several blocks."""
    from nthr_kernels.ops.advantages import torch_impl

    b = case(seed=stable_seed("log-z-blocks", budget, temperature), n_groups=4, group_size=4, lengths=(20, 40), d=8,
             vocab=97, temperature=temperature)
    kw = dict(temperature=temperature, anchor="others", score_positive=True)
    got = run_impl(b, "torch", budget, **kw)
    monkeypatch.setattr(torch_impl, "plan_normaliser", torch_impl.log_normaliser)
    want = run_impl(b, "torch", budget, **kw)
    for name in ("scores", "token_advantages", "tau", "selected"):
        assert torch.equal(getattr(got, name).nan_to_num(7.0) if name == "tau" else getattr(got, name),
                           getattr(want, name).nan_to_num(7.0) if name == "tau" else getattr(want, name)), name
    assert bool(got.selected.any())  # the comparison covers selections


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
@pytest.mark.parametrize("path", ["factored", "pairwise"])
@pytest.mark.parametrize("anchor", ["all", "others"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_paths_each_match_reference(path, anchor, dtype):
    """The batched Triton path picks factored or pairwise per group by cost; force each in turn."""
    from nthr_kernels.ops.advantages import triton_impl

    b = case(seed=71, n_groups=3, group_size=4, lengths=(0, 14), d=12, vocab=53, dtype=dtype)
    batch = validated(b, anchor=anchor, beta=0.3)
    got = batch.result(*triton_impl.nthr_advantages(batch, path=path))
    assert_matches_reference(got, run(b, "reference", anchor=anchor, beta=0.3), b)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
def test_triton_paths_agree_and_cost_model_mixes():
    from nthr_kernels.ops.advantages import triton_impl

    # long groups over a small vocabulary favour factored, short ones pairwise: the batch mixes both
    lengths = [40] * 4 + [2] * 4 + [30] * 4
    picks = triton_impl.choose_paths([20, 60, 20], [80, 4, 60], [160, 8, 120], 32)
    assert picks == ["factored", "pairwise", "factored"]
    # the factored path scores positive tokens only with score_positive: 2 |V*| d T against the pairwise
    # 2 T+ T (|V*| + d) (13 x 52 = 676 > 640 = |V*| d); the old rule counted 2 |V*| d (T+ + T) always
    assert triton_impl.choose_paths([20], [13], [26], 32) == ["factored"]
    assert triton_impl.choose_paths([20], [13], [26], 32, score_positive=True) == ["pairwise"]
    # anchor="others" adds a pairwise pass over the positive tokens' own pairs, 2 T+ T+ (|V*| + d)
    assert triton_impl.choose_paths([60], [16], [32], 32) == ["pairwise"]
    assert triton_impl.choose_paths([60], [16], [32], 32, others=True) == ["factored"]
    b = case(seed=72, n_groups=3, group_size=4, lengths=lengths, d=32, vocab=60)
    res = {}
    batch = validated(b, beta=0.0)
    for path in ("factored", "pairwise", None):
        res[path] = batch.result(*triton_impl.nthr_advantages(batch, path=path))
    for path in ("pairwise", None):
        torch.testing.assert_close(res[path].scores, res["factored"].scores, rtol=1e-4, atol=1e-4 * float(res["factored"].scores.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("anchor", ["all", "others"])
@pytest.mark.parametrize("source", ["weight+logprobs", "logits"])
def test_score_positive(backend, anchor, source):
    """score_positive=True scores every token like the reference; the default leaves positive tokens at 0
    (their scores are not needed: anchors come from <M, N_i>) and changes nothing else."""
    b = case(seed=stable_seed("score_positive", anchor, source), n_groups=4, group_size=5, lengths=(0, 17), d=20,
             vocab=83, holes=True)
    kw = dict(anchor=anchor, beta=0.7, use_logits=source == "logits")
    full = run(b, backend, score_positive=True, **kw)
    assert_matches_reference(full, run(b, "reference", score_positive=True, **kw), b)
    default = run(b, backend, **kw)
    assert_matches_reference(default, run(b, "reference", **kw), b)
    pos = (b.rewards > 0.5)[:, None].expand_as(b.token_ids)
    assert not bool(default.scores[pos].any())
    torch.testing.assert_close(default.scores[~pos], full.scores[~pos], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(default.tau, full.tau, equal_nan=True)
    assert torch.equal(default.selected, full.selected)


def _certain_token_logits(b, spread: bool) -> torch.Tensor:
    """Logits in which every completion token (id 0) is certain: ``|V| = 1``, or (``spread``) four more
    columns 300 below, whose probabilities are 0 in float32 at these temperatures."""
    z = (b.hidden.double() @ b.lm_head_weight.double().T).to(b.hidden.dtype)
    return torch.cat([z] + [z - 300.0] * 4, dim=-1) if spread else z


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
@pytest.mark.parametrize("backend,spread", [("reference", False)] + [(b, s) for b in BACKENDS for s in (False, True)],
                         ids=lambda x: {False: "vocab1", True: "vocab5"}.get(x, x) if isinstance(x, bool) else x)
def test_certain_tokens_with_logits_score_zero(backend, dtype, temperature, spread):
    """A certain token (p = 1 in float32; |V| = 1, or the other logits 300 below) has error 0, so every
    score is exactly 0 and nothing is selected, at any temperature, as in the reference: log Z and the
    errors must scale the logits with the same rounding (the native backend fused z * (1/T) - shift into
    one FMA in both its log-sum-exp and its errors, unrounded product against a rounded one: scores of
    1e-13, several tokens selected at T != 1). The float64 reference is certain only with ``|V| = 1``: the
    other columns' probabilities of about e^-300 are not 0 there, and neither is the sampled token's error
    ``-expm1(l_t)`` of the same size (scores of about 1e-260, some above tau = 0): it runs ``vocab1`` only."""
    b = case(seed=3, n_groups=3, group_size=4, lengths=(1, 9), d=8, vocab=1, temperature=temperature, dtype=dtype)
    kw = b.kwargs(with_logprobs=False)
    kw.pop("lm_head_weight")
    for beta in (1.0, 0.0):
        res = nk.nthr_advantages(b.hidden, b.token_ids, b.rewards, b.advantages, logits=_certain_token_logits(b, spread),
                                 backend=backend, beta=beta, **kw)
        assert bool(res.active.all())
        assert bool((res.scores == 0).all()), (beta, float(res.scores.abs().max()))
        assert not bool(res.selected.any()), beta


@pytest.mark.parametrize("backend", ["reference", "torch", "native", "triton"])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
@pytest.mark.parametrize("with_logprobs", [True, False], ids=["old_logprobs", "vocab_lse"])
def test_certain_tokens_with_lm_head_score_zero(backend, temperature, with_logprobs):
    """The lm_head path of test_certain_tokens_with_logits_score_zero: with a one-token vocabulary every
    token is certain (old log-prob 0), its error is 0, so every score is 0 and nothing is selected, as in the
    reference. The torch backend took the sampled token's probability from a second rounding of z_y / T
    (GEMM with alpha = 1/T against log Z's dot product, or against (h / T) @ W^T): scores of 1e-12 and up
    to 11 of the batch's negative tokens selected; the Triton kernels did the same with old log-probs (the
    interpreter shows it; on the GPU the log-sum-exp kernel's FMA could add the case without them)."""

    if backend not in ["reference"] + BACKENDS:
        pytest.skip(f"{backend} not available")
    b = case(seed=3, n_groups=3, group_size=4, lengths=(1, 9), d=8, vocab=1, temperature=temperature)
    kw = b.kwargs(with_logprobs=with_logprobs)
    for beta in (1.0, 0.0):
        res = nk.nthr_advantages(b.hidden, b.token_ids, b.rewards, b.advantages, backend=backend, beta=beta, **kw)
        assert bool(res.active.all())
        assert bool((res.scores == 0).all()), (beta, float(res.scores.abs().max()))
        assert not bool(res.selected.any()), beta
