"""Shared test machinery: backends under test, the tolerance table, case builders, comparisons."""
from __future__ import annotations

import dataclasses
import math

import torch

import nthr_kernels as nk
from nthr_kernels.core.rules import SCORE_TOLERANCE
from nthr_kernels.core.checks import validate_batch
from nthr_kernels.core.rules import Inputs, Options
from nthr_kernels.registry import available_backends, implementation
from nthr_kernels.core.rules import group_advantages as grpo_advantages
from nthr_kernels.synthetic import make_batch

TOL = SCORE_TOLERANCE  # the one tolerance table, with its reasons: nthr_kernels/core/rules.py


def backends() -> list[str]:
    """The fast backends under test in this process (the reference is what they are compared with)."""
    return [b for b in available_backends() if b != "reference"]


PATTERNS = ("mixed", "all_correct", "all_wrong", "one_correct", "one_wrong")


def rewards_for(pattern: str, n_groups: int, group_size: int, gen: torch.Generator) -> torch.Tensor:
    if pattern == "mixed":
        r = (torch.rand(n_groups, group_size, generator=gen) < 0.5).float()
        r[:, 0], r[:, -1] = 1.0, 0.0  # every group mixed
    elif pattern == "all_correct":
        r = torch.ones(n_groups, group_size)
    elif pattern == "all_wrong":
        r = torch.zeros(n_groups, group_size)
    elif pattern == "one_correct":
        r = torch.zeros(n_groups, group_size)
        r[:, 0] = 1.0
    elif pattern == "one_wrong":
        r = torch.ones(n_groups, group_size)
        r[:, -1] = 0.0
    else:
        raise AssertionError(pattern)
    return r.reshape(-1)


def case(
    *,
    n_groups=3,
    group_size=4,
    lengths=(0, 9),
    d=16,
    vocab=61,
    seed=0,
    dtype=torch.float32,
    packed=False,
    pattern="mixed",
    temperature=1.0,
    holes=False,
):
    b = make_batch(
        n_groups, group_size, lengths, d, vocab, seed=seed, dtype=dtype, packed=packed,
        temperature=temperature, holes=holes,
    )
    if pattern != "random":
        gen = torch.Generator().manual_seed(seed + 1000)
        b.rewards = rewards_for(pattern, n_groups, group_size, gen)
        b.advantages = grpo_advantages(b.rewards, group_size)
    return b


def run(b, backend, *, with_logprobs=True, use_logits=False, **kw):
    kwargs = b.kwargs(with_logprobs=with_logprobs and not use_logits)
    if use_logits:
        w = kwargs.pop("lm_head_weight")
        kwargs["logits"] = (b.hidden.double() @ w.double().T).to(b.hidden.dtype)
    kwargs.update(kw)
    return nk.nthr_advantages(b.hidden, b.token_ids, b.rewards, b.advantages, backend=backend, **kwargs)


def group_of_tokens(b) -> torch.Tensor:
    """Group index of every position in the token layout (-1 at padding)."""
    g = torch.arange(b.rewards.numel(), device=b.rewards.device) // b.group_size
    if b.cu_seqlens is not None:
        lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(g, lens)
    out = g[:, None].expand_as(b.mask).clone()
    out[~b.mask] = -1
    return out


def assert_matches_reference(res, ref, b, dtype=None, tol=None):
    """Scores within the dtype's tolerance of the group's scale; selection equal except within the
    margin of tau; token advantages consistent with the selection; per-group outputs equal."""
    dtype = dtype or b.hidden.dtype
    tol = TOL[dtype] if tol is None else tol
    assert torch.equal(res.active, ref.active)
    assert torch.equal(res.group_ids, ref.group_ids)
    assert res.token_advantages.dtype == torch.float32 and res.scores.dtype == torch.float32
    assert res.selected.dtype == torch.bool
    assert res.token_advantages.shape == b.token_ids.shape == res.scores.shape == res.selected.shape
    torch.testing.assert_close(res.eta, ref.eta, rtol=1e-6, atol=1e-7)
    gtok = group_of_tokens(b)
    n_g = ref.group_ids.numel()
    for g in range(n_g):
        at = gtok == g
        s_ref, s = ref.scores[at].double(), res.scores[at].double()
        scale = float(s_ref.abs().max()) if s_ref.numel() else 0.0
        scale = max(scale, 1e-30)
        err = float((s - s_ref).abs().max()) if s.numel() else 0.0
        assert err <= tol * scale, f"group {g}: score error {err:.3e} > {tol:.1e} * scale {scale:.3e}"
        tau_ref, tau = float(ref.tau[g]), float(res.tau[g])
        if math.isnan(tau_ref):
            assert math.isnan(tau)
            assert not bool(res.selected[at].any())
            continue
        # tau is beta times a positive response's mean score: its scale is its own, which the tokens' scores
        # above miss when positive tokens are not scored (score_positive=False: they read 0 there)
        tau_scale = max(scale, abs(tau_ref)) if math.isfinite(tau_ref) else scale
        if math.isinf(tau_ref):
            assert tau == tau_ref
        else:
            assert abs(tau - tau_ref) <= tol * tau_scale, f"group {g}: tau {tau} vs {tau_ref}"
        differ = res.selected[at] != ref.selected[at]
        if bool(differ.any()):
            near = (s_ref[differ] - tau_ref).abs() <= 2 * tol * tau_scale
            assert bool(near.all()), f"group {g}: selection differs away from tau"
    # advantages: padding 0, unselected tokens keep A, selected ones get eta * A
    a_tok = _adv_layout(b)
    valid = gtok >= 0
    assert bool((res.token_advantages[~valid] == 0).all())
    assert bool((~res.selected[~valid]).all())
    eta_tok = torch.ones_like(a_tok)
    eta_tok[valid] = res.eta[gtok[valid]]
    expect = torch.where(res.selected, a_tok * eta_tok, a_tok)
    expect[~valid] = 0
    torch.testing.assert_close(res.token_advantages, expect, rtol=1e-6, atol=1e-7)


def _adv_layout(b) -> torch.Tensor:
    if b.cu_seqlens is not None:
        lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(b.advantages, lens)
    out = b.advantages[:, None].expand_as(b.mask).clone()
    out[~b.mask] = 0
    return out


def inputs(b, *, with_logprobs=True, use_logits=False, **kw):
    """``(Inputs, Options)`` of a synthetic batch, as the public API would build them."""
    kwargs = b.kwargs(with_logprobs=with_logprobs and not use_logits)
    if use_logits:
        w = kwargs.pop("lm_head_weight")
        kwargs["logits"] = (b.hidden.double() @ w.double().T).to(b.hidden.dtype)
    kwargs.update(kw)
    opt_names = {f.name for f in dataclasses.fields(Options)}
    opts = Options(**{k: v for k, v in kwargs.items() if k in opt_names})
    x = Inputs(b.hidden, b.token_ids, b.rewards, b.advantages, **{k: v for k, v in kwargs.items() if k not in opt_names})
    return x, opts


def validated(b, **kw):
    """The validated :class:`~nthr_kernels.core.checks.Batch` of a synthetic batch."""
    return validate_batch(*inputs(b, **kw))


def run_impl(b, backend, budget=None, **kw):
    """One implementation called directly with an explicit scratch ``budget`` (a setting the public API
    does not expose); returns the public result."""
    batch = validated(b, **kw)
    impl = implementation("nthr_advantages", backend)
    out = impl(batch) if budget is None else impl(batch, budget)
    return batch.result(*out)


def stable_seed(*params) -> int:
    """A seed derived from test parameters, the same in every process (``hash()`` of a str is salted)."""
    import zlib

    return zlib.crc32(repr(params).encode()) % 100_000


NEAR_CERTAIN_GROUP = 4  # responses per group of near_certain_call's batch (2 groups)


def near_certain_call(seed: int, h_scale: float, w_scale: float, device="cpu", source: str = "weight+logprobs",
                      dtype=torch.float32):
    """``(args, kwargs)`` of an ``nthr_advantages`` call whose sampled tokens are near-certain: a two-token
    vocabulary, logits scaled up by ``h_scale * w_scale``, T = 0.7, 2 groups of ``NEAR_CERTAIN_GROUP``
    responses of 12 tokens (every position a completion token). ``source``: ``"weight+logprobs"`` (exact old
    log-probs, from float64 logits), ``"weight"`` (no old log-probs) or ``"logits"`` (the float32 logits).
    ``dtype``: of the hidden states and the weight (or logits), rounded before the rest is drawn from them."""
    g = torch.Generator().manual_seed(seed)
    r, length, d, v, t = 2 * NEAR_CERTAIN_GROUP, 12, 16, 2, 0.7
    hidden = (torch.randn(r, length, d, generator=g) * h_scale).to(dtype)
    w = (torch.randn(v, d, generator=g) * w_scale).to(dtype)
    logits = (hidden.double() @ w.double().T) / t
    ids = torch.multinomial(torch.softmax(logits, -1).reshape(-1, v).float(), 1, generator=g).reshape(r, length)
    lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0].float()
    rewards = torch.tensor([1.0, 0, 1, 0, 0, 1, 0, 0])
    args = tuple(x.to(device) for x in (hidden, ids, rewards, rewards - 0.4))
    kw = dict(mask=torch.ones(r, length, dtype=torch.bool, device=device), group_size=NEAR_CERTAIN_GROUP,
              temperature=t)
    if source == "logits":
        kw["logits"] = (hidden.float() @ w.float().T).to(dtype).to(device)
    else:
        kw["lm_head_weight"] = w.to(device)
        if source == "weight+logprobs":
            kw["old_logprobs"] = lp.to(device)
    return args, kw


def group_score_errors(res, ref) -> list:
    """Per group of :func:`near_certain_call`'s batch: the largest score error of ``res`` against ``ref``,
    relative to the group's largest reference score."""
    out = []
    for grp in range(2):
        rows = slice(NEAR_CERTAIN_GROUP * grp, NEAR_CERTAIN_GROUP * (grp + 1))
        s_ref, s = (x.scores[rows].double().cpu() for x in (ref, res))
        out.append(float((s - s_ref).abs().max()) / float(s_ref.abs().max()))
    return out
