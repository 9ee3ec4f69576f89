"""Shared test machinery: backends under test, the tolerance table, case builders, comparisons."""
from __future__ import annotations

import math

import torch

import nthr_kernels as nk
from nthr_kernels.synthetic import grpo_advantages, make_batch

# Score error allowed, relative to the largest |score| of the group, per input dtype.
# float32: all backends accumulate in float32 from float32 inputs; the error is float32 rounding of
#   sums over |V*| and d terms plus exp() of float32 logits (observed ~1e-6; 2e-4 leaves room for
#   cancellation between positive and negative error products).
# bfloat16 / float16: the fused Triton kernels round the float32 prediction errors (and M) to the
#   input dtype before the tensor-core dots (unit roundoff 2^-8 for bf16, 2^-11 for fp16); summed with
#   cancellation this gives a few units of roundoff relative to the group's score scale.
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float64: 1e-6}


def backends() -> list[str]:
    out = ["torch"]
    from nthr_kernels.backends import native_available, triton_available

    if triton_available():
        out.append("triton")
    if native_available():
        out.append("native")
    return out


def dtypes_for(backend: str) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16, torch.float16]


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
    g = torch.arange(b.rewards.numel()) // b.group_size
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
        if math.isinf(tau_ref):
            assert tau == tau_ref
        else:
            assert abs(tau - tau_ref) <= tol * scale + 1e-6 * abs(tau_ref), f"group {g}: tau {tau} vs {tau_ref}"
        differ = res.selected[at] != ref.selected[at]
        if bool(differ.any()):
            near = (s_ref[differ] - tau_ref).abs() <= 2 * tol * scale
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
